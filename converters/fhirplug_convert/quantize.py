"""Reduced-precision variants: int8 for CPUs (static by default, or dynamic), fp16 for GPUs.

Static int8 (``[export] int8 = "static"``, the default) is QDQ with activation ranges calibrated once on real
training windows (MinMax), weights per channel: every scale is a constant in the graph, so a note's scores do not
depend on the other notes in its batch. Dynamic int8 quantizes activations per call with the range of the whole
batch, so a note's probabilities move with its batch-mates (issue 11 measured Δp up to 0.04) and the card's
metrics were only the runtime's at the converter's exact batching.

The int8 variant is made from a graph fused without the Attention fusion (``export.optimize_onnx(...,
attention=False)``): static int8 covers its weight MatMuls (Q/K/V projections, attention output, feed-forward up and
down), whose inputs are quantized with calibrated constants and which onnxruntime runs as MatMulIntegerToFloat (see
:func:`runtime_op_counts`). The attention products (Q·Kᵀ, softmax·V: two activations, :func:`activation_matmuls`),
LayerNorm, GELU and softmax stay fp32, as do the pooler and classifier Gemms: they see one row per window (about
0.1 % of the FLOPs), and their error lands on the logits directly (measured on the tiny test model: quantizing them
doubled the largest |Δlogit| vs fp32 and flipped a validation decision). Calibration is MinMax: onnxruntime's
Percentile and Entropy calibrators stack the activations of all feeds, so they need equal-shape (padded) feeds,
whose padding positions would then enter the histograms.

optimum's ``ORTQuantizer`` (``AutoQuantizationConfig.avx512_vnni(is_static=True, per_channel=True)``, MinMax on the
same windows) was measured against this path (``python benchmarks/optimum_compare.py``): on the fused graph it fails
as is ("Unable to get valid quantization scale", the missing contrib-op types that ``quant_pre_process`` fixes here),
and after that pre-processing its preset quantizes MatMul outputs, Gemms and Gathers (QLinearMatMul, QGemm) with no
option to keep them float: same latency, 3× the max |Δlogit| vs PyTorch (0.033 vs 0.011) and 71 % vs 92 % argmax
agreement on 150 held-out windows. So the converter keeps onnxruntime's ``quantize_static`` with its own options.
None of the other static options measured by ``python benchmarks/int8_speed.py`` (``results/int8_speed.json``)
beats them at equal accuracy: ``WeightSymmetric=False`` and ``QDQKeepRemovableActivations`` gave the very same graph
(in the first, loaded run), ``ActivationSymmetric`` and QOperator format run no faster with a larger |Δlogit|,
int8 (S8S8) activations run 1.7× (loaded) to 2.5× (idle) slower. The graph fused *without* the Attention fusion,
whose QKV projections then quantize too, is the int8 source graph the pipeline uses: 1.4× faster in a run on a
loaded machine, about 2% faster (12.21 vs 12.43 ms at 1×128, within noise) at a similar |Δlogit| in the idle
re-run, so it stays for the smaller fp32 share of the work.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from fhirplug.errors import ConvertError

__all__ = ["Int8Mode", "activation_matmuls", "convert_fp16", "layer_matmuls", "quantize_int8", "runtime_op_counts"]

Int8Mode = Literal["static", "dynamic"]


class _DropPreprocessHint(logging.Filter):
    # quantize_dynamic logs an advisory about shape-inference pre-processing on the root logger every call;
    # the parity gate is what tells whether the int8 model is good, so the hint is noise to a user.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quantizer(what: str) -> Iterator[None]:
    """Run onnxruntime's quantizer: its pre-processing hint filtered out, its plain Exceptions as ConvertError."""
    hint = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    except ConvertError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
        raise ConvertError(f"{what} failed: {exc}") from exc
    finally:
        root.removeFilter(hint)


def quantize_int8(
    source: Path,
    target: Path,
    keep_fp32: Sequence[str] = (),
    *,
    mode: Int8Mode = "dynamic",
    calibration: Iterable[dict[str, np.ndarray]] = (),
) -> None:
    """int8 weights (per channel); activations quantized with calibrated constants (static) or per call (dynamic).

    Args:
        source: the fp32 ONNX model.
        target: where the int8 model goes.
        keep_fp32: nodes left in fp32 (mixed precision: see :func:`layer_matmuls`).
        mode: ``static`` (QDQ, MinMax ranges from ``calibration``) or ``dynamic``.
        calibration: static only: model feeds (``input_ids``, ``attention_mask``, ``token_type_ids``), e.g. one
            real training window each; read once.

    On a fused graph, ``DefaultTensorType=FLOAT`` is needed: ONNX shape inference gives no type to tensors
    computed from contrib ops (Attention, SkipLayerNormalization), and without a default the quantizer stops
    ("Unable to find data type for weight_name=...").

    Raises:
        ConvertError: the quantizer failed, or static mode got no calibration feeds.
    """
    if mode == "static":
        _quantize_static(source, target, keep_fp32, calibration)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quantizer(f"int8 quantization of {source.name}"):
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=list(keep_fp32),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def _quantize_static(
    source: Path, target: Path, keep_fp32: Sequence[str], calibration: Iterable[dict[str, np.ndarray]]
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = list(calibration)
    if not feeds:
        raise ConvertError(f"static int8 quantization of {source.name} needs calibration windows; none were given")
    # Only weight MatMuls are quantized: on a graph without the Attention fusion (see export.optimize_onnx's
    # ``attention``), Q·Kᵀ and softmax·V multiply two activations and stay fp32.
    keep_fp32 = [*keep_fp32, *activation_matmuls(source)]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    with (
        tempfile.TemporaryDirectory(prefix="fhirplug-int8-") as tmp,
        _quantizer(f"static int8 quantization of {source.name}"),
    ):
        # Symbolic shape inference knows the contrib ops of the fused graph (Attention, SkipLayerNormalization):
        # without it their outputs have no type and the quantizer skips the MatMuls after them, then fails on
        # the pooler's bias ("Unable to get valid quantization scale").
        typed = Path(tmp) / "typed.onnx"
        # auto_merge: prompt tuning concatenates virtual tokens onto the sequence axis, and symbolic
        # inference otherwise gives up on the two sequence lengths it cannot prove equal.
        quant_pre_process(str(source), str(typed), skip_optimization=True, auto_merge=True)
        quantize_static(
            str(typed),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=list(keep_fp32),
            # Ranges are measured where int8 runs (the CPU provider), even on a machine with a GPU.
            calibration_providers=["CPUExecutionProvider"],
            extra_options={
                "DefaultTensorType": onnx.TensorProto.FLOAT,
                # MatMul outputs stay float: onnxruntime then fuses DequantizeLinear + MatMul into
                # MatMulIntegerToFloat (int8 GEMM, fp32 out) instead of QLinearMatMul + a Quantize/Dequantize
                # pair. Measured on MiniLM: max |Δlogit| vs fp32 0.0036 instead of 0.0095, and faster.
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )
    _quantize_embedding_tables(target)


def embedding_gathers(model: onnx.ModelProto) -> list[str]:
    """The Gather nodes that look up rows of a float initializer: the word, position and token-type tables."""
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in floats]


def _quantize_embedding_tables(path: Path) -> None:
    """8-bit embedding tables, weight only: each Gather looks up quantized rows and dequantizes just those rows.

    The tables are most of the file (MiniLM's 30,522 × 384 word table is 47 MB of a 59 MB static int8 model) and
    static QDQ of MatMuls leaves them fp32. onnxruntime's dynamic quantizer restricted to these Gathers stores each
    table as uint8 with one constant scale and zero point (it ignores ``weight_type`` for Gather), so nothing depends
    on the batch. The parity gate judges the result as before: the rebuilt medical-abstracts-mesh int8 is 24 MB
    (67 MB before), validation agreement 98.56% as before, max |Δlogit| 0.26 (0.19 before, from the Attention-fused
    fallback graph), test top-1 0.6022 (0.6004 before) — ``plugins/medical-abstracts-mesh/bundle/parity.json`` and
    ``metrics.json``, and the same files at commit 43c6e3b.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = embedding_gathers(onnx.load(str(path), load_external_data=False))
    if not nodes:
        return
    with tempfile.TemporaryDirectory(prefix="fhirplug-int8-") as tmp:
        out = Path(tmp) / "tables.onnx"
        with _quantizer(f"int8 quantization of the embedding tables of {path.name}"):
            quantize_dynamic(
                str(path),
                str(out),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["Gather"],
                nodes_to_quantize=nodes,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        out.replace(path)


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose inputs are both activations (attention products Q·Kᵀ, softmax·V), by name."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not weights.intersection(n.input)]


def runtime_op_counts(model_path: Path) -> dict[str, int]:
    """Operator counts of the graph onnxruntime actually runs on the CPU (after its full graph optimization).

    Says what a variant runs as: a static QDQ model becomes QuantizeLinear (fixed scale) + MatMulIntegerToFloat,
    a dynamic one DynamicQuantizeLinear + MatMulInteger (fused: DynamicQuantizeMatMul, QAttention).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="fhirplug-ops-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        counts = Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)
    return dict(sorted(counts.items()))


_LAYER = re.compile(r"layers?[._/](\d+)[./]")


def layer_matmuls(model_path: Path) -> dict[int, list[str]]:
    """The MatMul nodes of each encoder layer (attention output and feed-forward projections), by layer index.

    These are the candidates a mixed-precision int8 model keeps in fp32 when full int8 fails the parity gate:
    quantization error concentrates in a few layers (measured on medical-abstracts-mesh: keeping layer 0's
    three MatMuls in fp32 took the validation micro-F1 drop from 1.06 to 0.19 points). Node names come from
    the exporter (``/model/bert/encoder/layer.0/intermediate/dense/MatMul``); a graph without such names
    yields ``{}`` and gets no fallback.
    """
    layers: dict[int, list[str]] = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        match = _LAYER.search(node.name)
        if node.op_type == "MatMul" and match:
            layers.setdefault(int(match.group(1)), []).append(node.name)
    return dict(sorted(layers.items()))


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (``keep_io_types``) so callers feed the same arrays.

    Uses onnxruntime's transformer-aware conversion, which keeps the ops that must stay fp32 (e.g. the
    LayerNormalization statistics) in fp32.

    Raises:
        ConvertError: the conversion failed.
    """
    from fhirplug_convert.export import ensure_ort_transformers_path

    ensure_ort_transformers_path()
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        model = OnnxModel(onnx.load(str(source)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(target))
    except Exception as exc:  # onnx / onnxruntime.transformers raise plain Exceptions
        raise ConvertError(f"fp16 conversion of {source.name} failed: {exc}") from exc
