"""``fhirplug score`` on a synthetic Bulk Data export made from the Synthea notes (GitHub issue 14).

    .venv/bin/python benchmarks/bulk.py --evidence-segments 0 --json benchmarks/results/bulk.json   # 100,000 notes
    .venv/bin/python benchmarks/bulk.py --notes 20000 --runs local1,local2,spark                   # a shorter run

The plugin is synthea-conditions (``--plugin``: any bundle), the first-party plugin these notes are for: it codes
most of them, so the run writes Conditions and Provenance, not only abstentions. ``--evidence-segments 0`` keeps
the model window as each prediction's evidence (one model pass per note); by default a predicted note costs one
more batched pass of its occluded copies.

The export is built in a temporary folder (never committed): every DocumentReference of
``../shared/data/synthea-r4/bundles`` (371 plain-text notes), copied with new ids until ``--notes`` notes, written
as ``DocumentReference.000.ndjson`` … (``--per-file`` notes each, as servers split an export), plus the Patients
(a type the plugin does not read: skipped with a count) and a Bulk Data ``manifest.json``. Each run is the real
CLI in its own process (``fhirplug score PLUGIN EXPORT --out DIR``) with ``--engine local --workers 1``,
``--workers 2`` and ``--engine spark --workers 2`` (Spark ``local[2]``). Reported per run: wall seconds, notes/s
(notes scored ÷ wall time, process start, plugin load and Spark start included) and peak RSS: the largest sum
of RSS over the run's whole process tree (main process, workers, the JVM and its Python workers), sampled every
0.2 s with psutil. Also checked: every run writes the same bytes (resource ids, counts, manifest).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _shared import REPO, SYNTHEA, repo_relative, synthea_resources

DEFAULT_PLUGIN = REPO / "plugins" / "synthea-conditions" / "bundle"
RUNS = {
    "local1": ["--engine", "local", "--workers", "1"],
    "local2": ["--engine", "local", "--workers", "2"],
    "spark": ["--engine", "spark", "--workers", "2"],
}


def build_export(folder: Path, n_notes: int, per_file: int) -> dict[str, Any]:
    """Write the synthetic export into ``folder``; returns facts about it."""
    notes, patients = synthea_resources()
    if not notes:
        raise SystemExit(f"no Synthea notes under {SYNTHEA}")
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    chars = 0
    handle = None
    for i in range(n_notes):
        if i % per_file == 0:
            if handle:
                handle.close()
            name = f"DocumentReference.{i // per_file:03d}.ndjson"
            outputs.append({"type": "DocumentReference", "url": f"https://ehr.example.org/bulk/{name}"})
            handle = (folder / name).open("w")
        original = notes[i % len(notes)]
        copy = {**original, "id": f"{original['id']}-{i // len(notes)}"}  # a distinct note, the same text
        chars += sum(
            len(base64.b64decode(c["attachment"]["data"])) for c in copy["content"] if "data" in c["attachment"]
        )
        assert handle is not None
        handle.write(json.dumps(copy, separators=(",", ":")) + "\n")
    if handle:
        handle.close()
    (folder / "Patient.ndjson").write_text("".join(json.dumps(p, separators=(",", ":")) + "\n" for p in patients))
    outputs.append({"type": "Patient", "url": "https://ehr.example.org/bulk/Patient.ndjson"})
    manifest = {"transactionTime": "2025-07-28T00:00:00Z", "request": "synthetic", "requiresAccessToken": False}
    (folder / "manifest.json").write_text(json.dumps({**manifest, "output": outputs, "error": []}, indent=1))
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"notes": n_notes, "distinct_notes": len(notes), "files": len(outputs), "bytes": size, "note_chars": chars}


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def run_one(name: str, plugin: str, export: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    command = [
        sys.executable,
        "-c",
        "import sys; from fhirplug.cli import main; sys.exit(main())",
        "score",
        plugin,
        str(export),
        "--out",
        str(out),
        "--transaction-time",
        "2025-07-28T00:00:00Z",
        "--no-progress",
        *RUNS[name],
        *extra,
    ]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(process.pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if process.returncode not in (0, 4):
        raise SystemExit(f"{name}: exit {process.returncode}\n{stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    notes = manifest["extension"]["fhirplug"]["notes"]
    digest = hashlib.sha256()
    for path in [*sorted(out.glob("*.ndjson")), out / "manifest.json"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "run": name,
        "args": RUNS[name] + extra,
        "wall_s": round(wall, 1),
        "notes": notes,
        "notes_per_s": round(notes / wall, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "outputs": {o["type"]: o["count"] for o in manifest["output"] + manifest["error"]},
        "outputs_sha256": digest.hexdigest(),
        "summary": stderr.strip().splitlines()[-1] if stderr.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=100_000, help="notes in the synthetic export (default 100,000)")
    parser.add_argument("--per-file", type=int, default=25_000, help="notes per DocumentReference NDJSON file")
    parser.add_argument("--plugin", default=str(DEFAULT_PLUGIN), help="plugin bundle (default synthea-conditions)")
    parser.add_argument(
        "--evidence-segments",
        type=int,
        default=None,
        help="passed to fhirplug score (0: the model window is the evidence, one model pass per note)",
    )
    parser.add_argument("--runs", default="local1,local2,spark", help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--unsigned", action="store_true", help="pass --allow-unsigned (a plugin with no pin)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--keep", type=Path, default=None, help="build the export here and keep it")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    extra = ["--allow-unsigned"] if args.unsigned else []
    if args.evidence_segments is not None:
        extra += ["--evidence-segments", str(args.evidence_segments)]
    work = Path(tempfile.mkdtemp(prefix="fhirplug-bulk-"))
    try:
        export = args.keep or work / "export"
        started = time.perf_counter()
        facts = build_export(export, args.notes, args.per_file)
        facts["build_s"] = round(time.perf_counter() - started, 1)
        print(f"export: {json.dumps(facts)}", file=sys.stderr)
        results = []
        for name in runs:
            result = run_one(name, args.plugin, export, work / f"out-{name}", extra)
            print(json.dumps(result), file=sys.stderr)
            results.append(result)
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
        report = {
            "command": "python benchmarks/bulk.py " + " ".join(sys.argv[1:]),
            "export": facts,
            "plugin": repo_relative(args.plugin),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "same_bytes_everywhere": len({r["outputs_sha256"] for r in results}) == 1,
            "runs": results,
        }
        text = json.dumps(report, indent=2)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        print(text)
        print("\n| run | notes | wall s | notes/s | peak RSS (MiB, process tree) |\n|---|---|---|---|---|")
        for r in results:
            print(
                f"| {' '.join(r['args'])} | {r['notes']:,} | {r['wall_s']} | {r['notes_per_s']} | {r['peak_rss_mib']} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
