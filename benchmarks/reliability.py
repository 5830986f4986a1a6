"""Load figures: hostile and heavy inputs through the public API, each in a fresh process (peak RSS per scenario).

    python benchmarks/reliability.py --out benchmarks/results/reliability.json

Scenarios (targets from GitHub issue 9):

- ``html-lt-a``: 1,000,000 characters of ``<a `` as a text/html attachment — scored or refused in < 2 s;
- ``html-nested``: 1,000,000 characters of nested tags — scored or refused in < 2 s;
- ``concurrent-43mb``: four threads, each ``plugin.predict`` of its own 43 MB Bundle of 50 long notes, on one
  shared plugin — peak RSS < 1.5 GB (the budget predicts each request's first notes and reports the rest);
- ``plain-1m``: a 1,000,000-character plain note — scored in < 30 s, with its peak RSS;
- ``bundle-5000``: a 5,000-entry Bundle of realistic short notes — notes per second.

Each scenario runs ``python benchmarks/reliability.py --scenario NAME`` in a new interpreter, which prints one
JSON line; peak RSS is that process's ``ru_maxrss``. Uses the default budget (``fhirplug.plugin.Budget()``).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLUGIN = REPO / "plugins" / "medical-abstracts-mesh" / "bundle"
SCENARIOS = ["html-lt-a", "html-nested", "concurrent-43mb", "plain-1m", "bundle-5000"]
#: (limit, unit) each scenario is held to; None: reported only.
TARGETS: dict[str, tuple[str, float] | None] = {
    "html-lt-a": ("seconds", 2.0),
    "html-nested": ("seconds", 2.0),
    "concurrent-43mb": ("peak_rss_mb", 1536.0),
    "plain-1m": ("seconds", 30.0),
    "bundle-5000": None,
}
PROSE = (
    "Patient presents with chest pain radiating to the left arm, shortness of breath and diaphoresis. "
    "History of type 2 diabetes mellitus and hypertension, on metformin and lisinopril. "
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _document(text: str, id_: str, content_type: str = "text/plain; charset=utf-8") -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": id_,
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": content_type, "data": base64.b64encode(text.encode()).decode()}}],
    }


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _short_notes(n: int, seed: int = 0) -> list[str]:
    """Varied 150–450 character notes: a complaint, findings, history and a plan, as clinicians write them."""
    rng = random.Random(seed)
    complaints = ["chest pain", "shortness of breath", "headache", "abdominal pain", "cough and fever", "fatigue"]
    findings = [
        "BP 148/92, HR 88, afebrile.",
        "Lungs with scattered wheezes bilaterally.",
        "Abdomen soft, tender in the RLQ, no guarding.",
        "Neuro exam non-focal; pupils equal and reactive.",
        "ECG shows sinus rhythm with no acute ST changes.",
        "CT head negative for acute hemorrhage.",
    ]
    history = ["type 2 diabetes", "hypertension", "asthma", "COPD", "migraine", "hyperlipidemia", "CKD stage 3"]
    plans = [
        "Start lisinopril 10 mg daily and recheck in two weeks.",
        "Albuterol as needed; follow up with pulmonology.",
        "Surgical consult for possible appendicitis.",
        "Sumatriptan for acute episodes; headache diary.",
        "Troponin x2, aspirin, admit to telemetry.",
    ]
    notes = []
    for i in range(n):
        parts = [
            f"{rng.randint(19, 91)} y/o {'male' if rng.random() < 0.5 else 'female'} with {rng.choice(complaints)} "
            f"for {rng.randint(1, 10)} days.",
            *rng.sample(findings, rng.randint(1, 3)),
            f"PMH: {', '.join(rng.sample(history, rng.randint(1, 3)))}.",
            rng.choice(plans),
        ]
        notes.append(f"Note {i}. " + " ".join(parts))
    return notes


def _summary(result: Any) -> dict[str, Any]:
    return {
        "predictions": len(result.predictions),
        "sources": len(result.sources),
        "issues": dict(Counter(f"{i.severity}/{i.code}" for i in result.issues)),
    }


def run_scenario(name: str, plugin_path: Path) -> dict[str, Any]:
    import fhirplug

    started = time.perf_counter()
    plugin = fhirplug.load_plugin(plugin_path, allow_unsigned=True, variant="int8", provider="cpu")
    out: dict[str, Any] = {"scenario": name, "load_s": time.perf_counter() - started, "rss_after_load_mb": _rss_mb()}
    if name in ("html-lt-a", "html-nested"):
        markup = ("<a " * 333_334)[:1_000_000] if name == "html-lt-a" else ("<b><i>" * 166_667)[:1_000_000]
        data = json.dumps(_document(markup, "html", "text/html; charset=utf-8")).encode()
        t = time.perf_counter()
        result = plugin.predict(data)
        out.update(seconds=time.perf_counter() - t, **_summary(result))
    elif name == "plain-1m":
        text = (PROSE * (1_000_000 // len(PROSE) + 1))[:1_000_000]
        data = json.dumps(_document(text, "long")).encode()
        out["windows"] = plugin.session.count_windows(text)
        t = time.perf_counter()
        result = plugin.predict(data)
        out.update(seconds=time.perf_counter() - t, **_summary(result))
    elif name == "concurrent-43mb":
        # 50 notes of 645,000 characters: 860 KB of base64 each, 43 MB per request, four requests at once.
        text = (PROSE * (645_000 // len(PROSE) + 1))[:645_000]
        requests = [json.dumps(_bundle([_document(text, f"r{r}n{i}") for i in range(50)])).encode() for r in range(4)]
        out["request_mb"] = len(requests[0]) / 1e6
        out["rss_before_requests_mb"] = _rss_mb()
        results: list[Any] = [None] * 4

        def call(k: int) -> None:
            results[k] = plugin.predict(requests[k], source_name=f"request {k}")

        t = time.perf_counter()
        threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        out.update(seconds=time.perf_counter() - t, per_request=[_summary(r) for r in results])
        out["gate_peak_windows"] = plugin.gate.peak
    elif name == "bundle-5000":
        notes = _short_notes(5000)
        data = json.dumps(_bundle([_document(n, f"n{i}") for i, n in enumerate(notes)])).encode()
        out["mean_note_chars"] = sum(map(len, notes)) / len(notes)
        t = time.perf_counter()
        result = plugin.predict(data)
        seconds = time.perf_counter() - t
        out.update(seconds=seconds, notes_per_s=len(result.sources) / seconds, **_summary(result))
        out["timings"] = result.timings
    else:
        raise SystemExit(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    out["peak_rss_mb"] = _rss_mb()
    return out


def _verdict(row: dict[str, Any]) -> str:
    target = TARGETS.get(row["scenario"])
    if target is None or "error" in row:
        return "-" if "error" not in row else "FAILED"
    key, limit = target
    return f"{'ok' if row[key] < limit else 'OVER'} (< {limit:g} {key.replace('_', ' ')})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", type=Path, default=DEFAULT_PLUGIN)
    parser.add_argument("--scenario", choices=SCENARIOS, help="Run one scenario here and print its JSON line.")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    parser.add_argument("--out", type=Path, default=None, help="Write every result here as JSON.")
    args = parser.parse_args()
    if args.scenario:
        print(json.dumps(run_scenario(args.scenario, args.plugin)))
        return
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    rows = []
    for name in args.only:
        command = [sys.executable, __file__, "--scenario", name, "--plugin", str(args.plugin)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
        if done.returncode != 0:
            rows.append({"scenario": name, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        seconds, rss = row.get("seconds", float("nan")), row.get("peak_rss_mb", float("nan"))
        print(f"{name:16} {seconds:8.2f} s  peak RSS {rss:7.0f} MB  {_verdict(row)}", flush=True)
    print()
    print("| scenario | seconds | peak RSS MB | outcome | target |")
    print("|---|---:|---:|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['scenario']} | | | error: {row['error']} | FAILED |")
            continue
        what = row.get("per_request") or {k: row[k] for k in ("predictions", "sources", "issues") if k in row}
        if "notes_per_s" in row:
            what = {"notes_per_s": round(row["notes_per_s"], 1), **what}
        print(
            f"| {row['scenario']} | {row['seconds']:.2f} | {row['peak_rss_mb']:.0f} | `{json.dumps(what)}` "
            f"| {_verdict(row)} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": sys.argv, "results": rows}, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
