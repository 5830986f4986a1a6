"""Load on ``fhirplug serve`` over loopback: 1, 4 and 16 clients, micro-batching on and off (GitHub issue 13).

    .venv/bin/python benchmarks/serve_load.py --json benchmarks/results/serve_load.json
    .venv/bin/python benchmarks/serve_load.py --seconds 20          # a shorter run on a busy machine

Each mode starts the real CLI in its own process (``fhirplug serve PLUGIN --insecure --port 0``: loopback only,
authentication off because the JWT check is not what is measured here) and each client is a thread with its
own keep-alive ``httpx.Client`` POSTing the plugin's example FHIR inputs (``plugins/<name>/examples/*.json``) to
``/fhir/$predict`` in turn, for ``--seconds`` per client count. Reported per mode and client count: requests/s,
p50/p95/p99 latency (ms), errors (any status but 200, any exception) and the server's RSS (``VmRSS`` at the end,
``VmHWM`` peak) from ``/proc/PID/status``, and the RSS of every process of the server (psutil: with ``--workers N``
the supervisor and each worker) once ready and after each phase. Everything stops by itself: each phase has a
deadline, the server is stopped at the end (and killed if it does not stop).

The aims (issue 13, 2 CPU cores): 0 errors, batched ≥ 1.5× the unbatched throughput at 16 clients, and batched
p99 at 16 clients ≤ 3× the single-client p50.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLUGIN = REPO / "plugins" / "medical-abstracts-mesh" / "bundle"
START_TIMEOUT_S = 120


def _rss_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class Server:
    """``fhirplug serve`` in a child process, its stderr (access log) in a temporary file."""

    def __init__(self, plugin: Path, extra: list[str]) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 (closed in stop)
        self.command = [
            sys.executable,
            "-c",
            "from fhirplug.cli import main; main()",
            "serve",
            str(plugin),
            "--insecure",
            "--port",
            "0",
            *extra,
        ]
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log, cwd=REPO)
        deadline = time.monotonic() + START_TIMEOUT_S
        self.url = ""
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"discovery: GET (http://127\.0\.0\.1:\d+)/cds-services", Path(self.log.name).read_text())
            if found:
                self.url = found.group(1)
                break
            time.sleep(0.1)
        if not self.url:
            self.stop()
            raise RuntimeError(f"the server did not start: {Path(self.log.name).read_text()[-2000:]}")
        while time.monotonic() < deadline:  # listening is printed before the lifespan starts the model threads
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def rss(self) -> dict[str, int]:
        return _rss_kb(self.process.pid)

    def tree_rss(self) -> dict[str, Any]:
        """RSS (KiB) of the server and each of its descendants (``--workers N``: the supervisor and the workers)."""
        import psutil

        root = psutil.Process(self.process.pid)
        rows = []
        for proc in [root, *root.children(recursive=True)]:
            try:
                rows.append(
                    {"pid": proc.pid, "rss_kb": proc.memory_info().rss // 1024, "cmd": " ".join(proc.cmdline()[-3:])}
                )
            except psutil.Error:
                continue
        return {"processes": rows, "total_kb": sum(r["rss_kb"] for r in rows)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)


def _client(url: str, bodies: list[bytes], deadline: float, offset: int, out: list[tuple[float, int]]) -> None:
    with httpx.Client(timeout=60, headers={"Content-Type": "application/fhir+json"}) as http:
        i = offset
        while time.monotonic() < deadline:
            body = bodies[i % len(bodies)]
            i += 1
            started = time.perf_counter()
            try:
                status = http.post(f"{url}/fhir/$predict", content=body).status_code
            except httpx.HTTPError:
                status = -1
            out.append((time.perf_counter() - started, status))


def _phase(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    # A short warm-up so the first phase does not pay onnxruntime's first-run cost.
    _client(url, bodies, time.monotonic() + 1.0, 0, [])
    results: list[list[tuple[float, int]]] = [[] for _ in range(clients)]
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(url, bodies, deadline, k, results[k]), daemon=True)
        for k in range(clients)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - started
    samples = [s for r in results for s in r]
    ok = sorted(lat for lat, status in samples if status == 200)

    def pct(q: float) -> float:
        return round(1000 * ok[min(len(ok) - 1, int(q * len(ok)))], 1) if ok else float("nan")

    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(samples),
        "errors": sum(1 for _, status in samples if status != 200),
        "requests_per_s": round(len(ok) / elapsed, 2),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(1000 * statistics.fmean(ok), 1) if ok else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", type=Path, default=DEFAULT_PLUGIN, help="bundle directory (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per client count (default 60)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--max-batch", type=int, default=32, help="texts per model run when batching (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5, help="batching wait (default 5 ms)")
    parser.add_argument("--workers", type=int, default=1, help="fhirplug serve --workers (default 1)")
    parser.add_argument(
        "--evidence-segments", type=int, help="fhirplug serve --evidence-segments (default: the plugin's, 8)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    examples = sorted((args.plugin.parent / "examples").glob("*.json"))
    if not examples:
        raise SystemExit(f"no examples under {args.plugin.parent / 'examples'}")
    bodies = [p.read_bytes() for p in examples]
    counts = [int(c) for c in args.clients.split(",")]
    workers = ["--workers", str(args.workers)] if args.workers != 1 else []
    if args.evidence_segments is not None:
        workers += ["--evidence-segments", str(args.evidence_segments)]
    modes = {
        "batched": ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *workers],
        "unbatched": ["--max-batch", "1", "--max-wait-ms", "0", *workers],
    }
    report: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "plugin": str(args.plugin.relative_to(REPO) if args.plugin.is_relative_to(REPO) else args.plugin),
        "examples": [p.name for p in examples],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "load_average_at_start": os.getloadavg(),
        "modes": {},
    }
    for mode, extra in modes.items():
        server = Server(args.plugin, extra)
        try:
            idle = server.tree_rss()
            phases = []
            for clients in counts:
                phase = _phase(server.url, bodies, clients, args.seconds)
                phase["server_rss_kb"] = server.rss()
                phase["process_tree_rss"] = server.tree_rss()
                phases.append(phase)
                print(
                    f"{mode:9} {clients:3} client(s): {phase['requests_per_s']:7.2f} req/s  p50 {phase['p50_ms']} "
                    f"p95 {phase['p95_ms']} p99 {phase['p99_ms']} ms  errors {phase['errors']}  "
                    f"RSS {phase['server_rss_kb'].get('VmRSS', 0) / 1024:.0f} MiB "
                    f"(all processes {phase['process_tree_rss']['total_kb'] / 1024:.0f} MiB)",
                    flush=True,
                )
            shown = ["python"] + [
                str(Path(a).relative_to(REPO)) if Path(a).is_relative_to(REPO) else a for a in server.command[1:]
            ]
            report["modes"][mode] = {"server": shlex.join(shown), "idle_process_tree_rss": idle, "phases": phases}
        finally:
            server.stop()
    batched, unbatched = report["modes"]["batched"]["phases"], report["modes"]["unbatched"]["phases"]
    top = max(range(len(counts)), key=lambda i: counts[i])
    report["summary"] = {
        "errors": sum(p["errors"] for m in report["modes"].values() for p in m["phases"]),
        "speedup_at_most_clients": round(
            batched[top]["requests_per_s"] / max(unbatched[top]["requests_per_s"], 1e-9), 2
        ),
        "p99_most_clients_over_p50_one_client": round(batched[top]["p99_ms"] / batched[0]["p50_ms"], 2),
    }
    print(json.dumps(report["summary"]))
    print(f"command: {report['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
