"""Memory and speed of one plugin process under onnxruntime's memory settings (why the session disables the memory
pattern).

    .venv/bin/python benchmarks/ort_memory.py --json benchmarks/results/ort_memory.json

Each setting runs in a fresh process (one intra-op thread, as each ``fhirplug score --workers 2`` worker has):
the synthea-conditions plugin (``--plugin``) predicts every Synthea note of ``../shared/data/synthea-r4`` twice,
250 notes per ``predict_texts`` call, window evidence. Reported: RSS after loading, RSS after the run, peak RSS
(``ru_maxrss``) and notes/s. Settings, interleaved for ``--repeats`` rounds:

- ``pattern``: onnxruntime's defaults (memory arena, memory pattern on) — fhirplug before this script;
- ``no-pattern``: ``enable_mem_pattern = False`` (what ``fhirplug.session`` sets now);
- ``no-arena``: also ``enable_cpu_mem_arena = False``.

The memory pattern plans one allocation per distinct input shape; with dynamic padding (each batch as wide as its
longest window) nearly every batch is a new shape, so the plans pile up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _shared import REPO, SYNTHEA, repo_relative, synthea_note_texts

SETTINGS = ("pattern", "no-pattern", "no-arena")

CHILD = r"""
import json, resource, sys, time
import onnxruntime as ort

setting, plugin_path, notes_file = sys.argv[1:4]
Base = ort.SessionOptions


class Options(Base):
    # The setting under test wins over whatever fhirplug.session assigns.
    @property
    def enable_mem_pattern(self):
        return Base.enable_mem_pattern.__get__(self)

    @enable_mem_pattern.setter
    def enable_mem_pattern(self, value):
        Base.enable_mem_pattern.__set__(self, setting == "pattern")

    def __init__(self):
        super().__init__()
        self.enable_mem_pattern = None
        if setting == "no-arena":
            self.enable_cpu_mem_arena = False


ort.SessionOptions = Options  # what fhirplug.session builds its session with
import fhirplug

notes = json.loads(open(notes_file).read())
plugin = fhirplug.load_plugin(plugin_path, threads=1, evidence_segments=0, allow_unsigned=True)


def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


loaded = rss()
started = time.perf_counter()
for _ in range(2):
    for i in range(0, len(notes), 250):
        plugin.predict_texts(notes[i : i + 250])
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
assert plugin.session.session.get_session_options().enable_mem_pattern == (setting == "pattern")
print(json.dumps({"setting": setting, "notes": 2 * len(notes), "notes_per_s": round(2 * len(notes) / seconds, 1),
                  "rss_loaded_mib": loaded, "rss_after_mib": rss(), "peak_rss_mib": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugin", default=str(REPO / "plugins" / "synthea-conditions" / "bundle"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    notes_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"fhirplug-ort-memory-{os.getpid()}.json"
    notes = synthea_note_texts()
    if not notes:
        raise SystemExit(f"no Synthea notes under {SYNTHEA}")
    notes_file.write_text(json.dumps(notes))
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeats):
            for setting in SETTINGS:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, setting, args.plugin, str(notes_file)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=REPO,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), file=sys.stderr)
    finally:
        notes_file.unlink(missing_ok=True)
    summary = {}
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        summary[setting] = {
            "notes_per_s_median": statistics.median(r["notes_per_s"] for r in mine),
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in mine),
            "rss_after_mib_max": max(r["rss_after_mib"] for r in mine),
        }
    report = {
        "command": "python benchmarks/ort_memory.py " + " ".join(sys.argv[1:]),
        "plugin": repo_relative(args.plugin),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "runs": runs,
        "summary": summary,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
