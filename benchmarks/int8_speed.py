"""What each int8 choice buys at 1×128 on the shipped-style MiniLM model, against PyTorch eager fp32 and the int8
GEMM floor, in one interleaved run.

    python benchmarks/int8_speed.py --corpus ../shared/data/medical-abstracts/medical_tc_test.csv \
        --text-column medical_abstract --out benchmarks/results/int8_speed.json

The model is all-MiniLM-L6-v2 with a seeded random 5-label head, exported by the converter with both
text-classification outputs (``logits``, ``embedding``), as a plugin ships it. Graph variants (all but the
``unfused`` ones on the converter's BERT-fused graph; static ones calibrated with MinMax on the same
``--calibration`` real windows of ``--corpus``):

- ``dynamic``, ``static``: ``fhirplug_convert.quantize.quantize_int8`` on the BERT-fused graph (Attention fused);
- ``*-unfused``: the same on the graph before onnxruntime's BERT fusion (``[export] optimize = false``);
- ``static-qkv`` (what the converter ships): fused without the Attention fusion, so the Q/K/V projections are
  MatMuls static int8 covers (the attention products Q·Kᵀ and softmax·V stay fp32);
- ``static+Attention``: ``op_types_to_quantize=["MatMul", "Attention"]`` (static quantization has no
  quantized Attention: checked to give the shipped graph);
- ``static-qoperator``: ``QuantFormat.QOperator`` (QLinearMatMul, int8 outputs) instead of QDQ;
- ``static-asym-act`` / ``static-sym-act``, ``static-asym-w``, ``static-s8s8``, ``static-keep-removable``:
  ``extra_options`` ``ActivationSymmetric``, ``WeightSymmetric=False``, int8 activations,
  ``QDQKeepRemovableActivations``.

Session settings on the shipped graph: intra-op threads 1 vs 2, ``session.intra_op.allow_spinning`` on (the
runtime's default) vs off, graph optimization basic / extended / all. Every other session has the runtime's
options (2 threads, 1 inter-op thread, ``ORT_ENABLE_ALL``) with spinning off, so its idle spinning threads do
not steal the cores of the engine timed after it.

Timing: PyTorch eager fp32, every session and the GEMM probes of ``benchmarks/_floor.py`` at 1×128 interleaved
in ``--rounds`` rounds (the starting engine rotating), ``--reps`` calls each per round after one discarded warm
call; medians. Accuracy: max |Δlogit| and argmax agreement vs PyTorch fp32 on ``--eval`` held-out windows, one
window per call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ helpers

from _floor import EncoderShape, encoder_flops, floor_ms, gemm_calls, gemm_rates
from fhirplug._bench import machine, summarize
from optimum_compare import WATCHED, accuracy, checkpoint, read_texts
from quantization import _attention_products, _optimize_without_attention, inputs_for, ort_session

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "tests" / "fixtures" / "converters" / "notes.csv"
SHIPPED = "static-qkv"  # the converter quantizes the graph fused without Attention (pipeline._build)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def static_variant(
    source: Path,
    target: Path,
    feeds: list[dict[str, np.ndarray]],
    *,
    fmt: str = "QDQ",
    op_types: Sequence[str] = ("MatMul",),
    activation: str = "QUInt8",
    extra: dict[str, Any] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """``quantize.quantize_int8(mode="static")`` with one setting changed (the same pre-processing, calibration,
    per-channel weights and ``extra_options`` unless ``extra`` overrides them)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    options: dict[str, Any] = {
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        "OpTypesToExcludeOutputQuantization": ["MatMul"],
    }
    options.update(extra or {})
    typed = target.with_suffix(".typed.onnx")
    quant_pre_process(str(source), str(typed), skip_optimization=True, auto_merge=True)
    quantize_static(
        str(typed),
        str(target),
        Reader(),
        quant_format=getattr(QuantFormat, fmt),
        per_channel=True,
        activation_type=getattr(QuantType, activation),
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(op_types),
        nodes_to_exclude=list(exclude),
        calibration_providers=["CPUExecutionProvider"],
        extra_options=options,
    )
    typed.unlink()


def build(work: Path, model: Any, tokenizer: Path, args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    from fhirplug_convert import _core, export, finetune, quantize
    from fhirplug_convert.tasks import get_task

    raw, fp32 = work / "raw.onnx", work / "fp32.onnx"
    export.export_onnx(
        finetune.LogitsModel(model).eval(), raw, get_task("text-classification"), 17, int(model.config.vocab_size)
    )
    fused = export.optimize_onnx(raw, fp32, model.config)
    session = _core.open_session(fp32, tokenizer, max_tokens=128, stride=32, precision="fp32", threads=args.threads)
    windows = _core.calibration_feeds(session, texts, args.calibration + args.eval)
    feeds, held_out = windows[: args.calibration], windows[args.calibration :]
    if not held_out:
        raise SystemExit(f"only {len(windows)} windows in the corpus; need more than --calibration")
    noattn = _optimize_without_attention(raw, work / "fp32-noattention.onnx", model.config)

    files: dict[str, Path] = {"fp32": fp32}
    recipes: dict[str, Callable[[Path], None]] = {
        "dynamic": lambda t: quantize.quantize_int8(fp32, t, mode="dynamic"),
        "static": lambda t: quantize.quantize_int8(fp32, t, mode="static", calibration=feeds),
        "dynamic-unfused": lambda t: quantize.quantize_int8(raw, t, mode="dynamic"),
        "static-unfused": lambda t: quantize.quantize_int8(raw, t, mode="static", calibration=feeds),
        "static-qkv": lambda t: quantize.quantize_int8(
            noattn, t, _attention_products(noattn), mode="static", calibration=feeds
        ),
        "static+Attention": lambda t: static_variant(fp32, t, feeds, op_types=("MatMul", "Attention")),
        "static-qoperator": lambda t: static_variant(fp32, t, feeds, fmt="QOperator"),
        "static-sym-act": lambda t: static_variant(fp32, t, feeds, extra={"ActivationSymmetric": True}),
        "static-asym-w": lambda t: static_variant(fp32, t, feeds, extra={"WeightSymmetric": False}),
        "static-s8s8": lambda t: static_variant(fp32, t, feeds, activation="QInt8"),
        "static-keep-removable": lambda t: static_variant(fp32, t, feeds, extra={"QDQKeepRemovableActivations": True}),
        "static-qkv-s8s8": lambda t: static_variant(
            noattn, t, feeds, activation="QInt8", exclude=_attention_products(noattn)
        ),
    }
    seconds: dict[str, float] = {}
    for name, make in recipes.items():
        if args.only and name not in (*args.only, SHIPPED, "dynamic"):
            continue
        target = work / f"{name}.onnx"
        started = time.perf_counter()
        try:
            make(target)
        except Exception as exc:  # a variant the quantizer cannot make is a result, not a crash
            progress(f"{name}: could not be built ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            seconds[name] = float("nan")
            continue
        seconds[name] = round(time.perf_counter() - started, 2)
        files[name] = target
        progress(f"built {name} in {seconds[name]} s")
    runs_as = {}
    for name, path in files.items():
        ops = quantize.runtime_op_counts(path)
        runs_as[name] = {op: n for op, n in ops.items() if op.startswith(WATCHED) or "Attention" in op}
        runs_as[name]["nodes"] = sum(ops.values())
    same_as_shipped = [n for n, p in files.items() if n != SHIPPED and p.read_bytes() == files[SHIPPED].read_bytes()]
    return {
        "files": files,
        "feeds": feeds,
        "held_out": held_out,
        "facts": {
            "fused_operators": fused,
            "quantize_s": seconds,
            "runs_as": runs_as,
            "same_graph_as_shipped": same_as_shipped,
            "file_mb": {n: round(p.stat().st_size / 1e6, 2) for n, p in files.items()},
            "calibration_windows": len(feeds),
            "accuracy_windows": len(held_out),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8_speed.json")
    p.add_argument("--corpus", type=Path, default=NOTES, help="CSV of texts for calibration and accuracy windows")
    p.add_argument("--text-column", default="text")
    p.add_argument("--calibration", type=int, default=150)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=[], help="build only these graph variants (and static, dynamic)")
    args = p.parse_args(argv)

    import torch

    from fhirplug_convert import finetune

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's per-tensor notices
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    load_start = os.getloadavg()
    progress(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    texts = read_texts(args.corpus, args.text_column)
    with tempfile.TemporaryDirectory(prefix="fhirplug-int8-speed-") as tmp:
        work = Path(tmp)
        model, ckpt = checkpoint(work, args.seed)
        from tokenizers import Tokenizer

        from fhirplug_convert import export

        tokenizer = work / "tokenizer.json"
        export.save_tokenizer(Tokenizer.from_file(str(ckpt / "tokenizer.json")), tokenizer)
        built = build(work, model, tokenizer, args, texts)
        files: dict[str, Path] = built["files"]
        module = finetune.LogitsModel(model).eval()

        sessions = {name: ort_session(path, args.threads, spinning=False) for name, path in files.items()}
        acc = accuracy(sessions, module, built["held_out"])
        progress(f"accuracy on {len(built['held_out'])} windows: {json.dumps(acc)}")
        shipped = files[SHIPPED]
        settings = {
            f"{SHIPPED} | spinning on (runtime default)": ort_session(shipped, args.threads, spinning=None),
            f"{SHIPPED} | 1 thread": ort_session(shipped, 1, spinning=False),
            f"{SHIPPED} | 1 thread, spinning on": ort_session(shipped, 1, spinning=None),
            f"{SHIPPED} | ORT_ENABLE_EXTENDED": ort_session(shipped, args.threads, spinning=False, level="extended"),
            f"{SHIPPED} | ORT_ENABLE_BASIC": ort_session(shipped, args.threads, spinning=False, level="basic"),
            "dynamic | spinning on (runtime default)": ort_session(files["dynamic"], args.threads, spinning=None),
        }
        feed = inputs_for(1, 128, int(model.config.vocab_size), args.seed)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}

        def run_torch() -> object:
            with torch.inference_mode():
                return module(tensors["input_ids"], tensors["attention_mask"], tensors["token_type_ids"])

        shape = EncoderShape.from_config(model.config)
        calls: dict[str, Callable[[], object]] = {"torch-fp32": run_torch}
        for name, session in {**sessions, **settings}.items():
            calls[name] = lambda session=session: session.run(None, feed)
        for probe, call in gemm_calls(128, shape.hidden, shape.intermediate, args.threads).items():
            calls[f"gemm:{probe}"] = call
        progress(f"latency at 1×128: {args.rounds} rounds × {len(calls)} calls × {args.reps} reps, interleaved")
        samples = interleaved_blocks(calls, args.rounds, args.reps)

    stats = {name: summarize(s) for name, s in samples.items()}
    probes = {n.removeprefix("gemm:"): s["p50_ms"] for n, s in stats.items() if n.startswith("gemm:")}
    rates = gemm_rates(128, shape.hidden, shape.intermediate, args.threads, probes)
    floor = floor_ms(encoder_flops(shape, 128, 1), rates)
    torch_p50 = stats["torch-fp32"]["p50_ms"]
    per_round = {name: round_medians(s, args.rounds, args.reps) for name, s in samples.items()}
    engines: dict[str, Any] = {}
    for name, s in stats.items():
        if name.startswith("gemm:"):
            continue
        engines[name] = {
            "p50_ms": round(s["p50_ms"], 3),
            "p95_ms": round(s["p95_ms"], 3),
            "speedup_vs_torch": round(torch_p50 / s["p50_ms"], 3),
            "int8_floor_share": round(floor["int8_ms"] / s["p50_ms"], 3),
            # Per round: the same ratio inside each round, so a burst of load that hit one round shows.
            "speedup_vs_torch_round_median": round(
                float(np.median([t / e for t, e in zip(per_round["torch-fp32"], per_round[name], strict=True)])), 3
            ),
            **acc.get(name.split(" | ")[0], {}),
        }
    shipped_p50 = stats[SHIPPED]["p50_ms"]
    for e in engines.values():
        e["vs_shipped"] = round(shipped_p50 / e["p50_ms"], 3)
    load_end = os.getloadavg()
    command = "python benchmarks/int8_speed.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    result = {
        "what": "MiniLM-L6 + seeded random 5-label head (logits + embedding outputs, as shipped) at 1×128: int8 graph "
        "variants and session settings vs PyTorch eager fp32 and the int8 GEMM floor, interleaved",
        "command": command.strip(),
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "reps": args.reps,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "targets": {"speedup_vs_torch": 5.0, "int8_floor_share": 0.40},
        "build": built["facts"],
        "floor_ms": {k: round(v, 3) for k, v in floor.items()},
        "gemm": {
            "fp32_gflops": round(rates["fp32_gflops"], 1),
            "int8_gflops": round(rates["int8_gflops"], 1),
            "probes_p50_ms": {k: round(v, 4) for k, v in probes.items()},
        },
        "engines": dict(sorted(engines.items(), key=lambda kv: kv[1]["p50_ms"])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result))
    progress(f"wrote {args.out}")
    return 0


def interleaved_blocks(calls: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Per call id ``rounds × reps`` wall times (s): in each round every call runs one untimed warm call, then
    ``reps`` timed ones; the call that goes first rotates from round to round."""
    names = list(calls)
    for name in names:
        calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            calls[name]()
            for _ in range(reps):
                started = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - started)
    return samples


def round_medians(samples: list[float], rounds: int, reps: int) -> list[float]:
    return [float(np.median(samples[r * reps : (r + 1) * reps])) for r in range(rounds)]


def table(result: dict[str, Any]) -> str:
    lines = [
        f"1×128, floor {result['floor_ms']['int8_ms']:.2f} ms (int8 GEMM {result['gemm']['int8_gflops']:.0f} GOP/s)",
        "| engine | p50 ms | × torch | × torch (per round) | % of int8 floor | × shipped | max Δlogit | agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["engines"].items():
        lines.append(
            f"| {name} | {e['p50_ms']:.2f} | {e['speedup_vs_torch']:.2f} | {e['speedup_vs_torch_round_median']:.2f} | "
            f"{e['int8_floor_share']:.0%} | {e['vs_shipped']:.2f} | {e.get('max_abs_logit_diff_vs_torch', '')} | "
            f"{e.get('argmax_agreement_vs_torch', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
