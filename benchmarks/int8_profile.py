"""Where an int8 bundle's time goes at one shape: onnxruntime's own kernel profile, summed per operator type.

    python benchmarks/int8_profile.py plugins/medical-abstracts-mesh/bundle/model.int8.onnx --batch 1 --tokens 128

The session has the runtime's options (2 intra-op threads, 1 inter-op thread, ``ORT_ENABLE_ALL``, spinning left
on) plus onnxruntime's profiler, which itself adds time: compare the shares, not the absolute milliseconds, with
the interleaved benchmarks (``int8_speed.py``, ``compare.py``). Token ids are seeded random ids of the vocabulary's
middle (no padding); ``--warmup`` calls are run first and profiled too, so the per-run figures are over every call.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fhirplug-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        shape = (args.batch, args.tokens)
        feeds = {
            "input_ids": rng.integers(1000, 20000, shape).astype(np.int64),
            "attention_mask": np.ones(shape, np.int64),
            "token_type_ids": np.zeros(shape, np.int64),
        }
        feed = {i.name: feeds[i.name] for i in session.get_inputs()}
        for _ in range(args.warmup):
            session.run(None, feed)
        start = time.perf_counter()
        for _ in range(args.runs):
            session.run(None, feed)
        mean_ms = (time.perf_counter() - start) * 1000 / args.runs
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    spent: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    calls = args.warmup + args.runs
    total = sum(spent.values())
    print(f"{args.model} at {args.batch}x{args.tokens}, {args.threads} threads, profiled: {mean_ms:.2f} ms a call")
    print(f"{'operator':28s} {'ms/call':>8s} {'share':>6s} {'nodes':>6s}")
    for op, us in spent.most_common(args.top):
        print(f"{op:28s} {us / calls / 1000:8.3f} {us / total:6.1%} {nodes[op] / calls:6.0f}")
    print(f"{'all kernels':28s} {total / calls / 1000:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
