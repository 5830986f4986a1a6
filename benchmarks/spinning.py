"""onnxruntime's intra-op thread spinning on vs off for a plugin's int8 model, interleaved in one run.

    python benchmarks/spinning.py [--bundle plugins/medical-abstracts-mesh/bundle] [--reps 40]

Spinning threads wait for work by busy-looping: faster on an idle machine, slower when other processes want the
cores (they steal each other's time). The runtime keeps onnxruntime's default (on); this script says what that
choice costs or buys on the machine at hand. Prints the median latency per shape.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]


def _session(model: bytes, spin: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "plugins" / "medical-abstracts-mesh" / "bundle")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    print(f"$ python benchmarks/spinning.py --reps {args.reps}; load average {os.getloadavg()[0]:.2f}")
    model = (args.bundle / "model.int8.onnx").read_bytes()
    sessions = {"spinning on": _session(model, True), "spinning off": _session(model, False)}
    names = [i.name for i in sessions["spinning on"].get_inputs()]
    rng = np.random.default_rng(0)
    for shape in [(1, 32), (1, 128), (8, 128)]:
        feed = {
            n: (
                rng.integers(1000, 20000, size=shape) if n == "input_ids" else np.full(shape, n == "attention_mask")
            ).astype(np.int64)
            for n in names
        }
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for session in sessions.values():
            for _ in range(5):
                session.run(None, feed)
        for _ in range(args.reps):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[key].append(time.perf_counter() - start)
        medians = ", ".join(f"{k} {1000 * float(np.median(v)):.2f} ms" for k, v in times.items())
        print(f"{shape[0]}×{shape[1]}: {medians}")


if __name__ == "__main__":
    main()
