"""Reduced-precision variants: dynamic int8 for CPUs, fp16 for GPUs."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import onnx

from fhirplug.errors import ConvertError

__all__ = ["convert_fp16", "layer_matmuls", "quantize_int8"]


class _DropPreprocessHint(logging.Filter):
    # quantize_dynamic logs an advisory about shape-inference pre-processing on the root logger every call;
    # the parity gate is what tells whether the int8 model is good, so the hint is noise to a user.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(source: Path, target: Path, keep_fp32: Sequence[str] = ()) -> None:
    """Dynamic quantization: int8 weights (per channel), activations quantized at run time.

    ``keep_fp32`` names nodes left in fp32 (mixed precision: see :func:`layer_matmuls`).

    On a fused graph, ``DefaultTensorType=FLOAT`` is needed: ONNX shape inference gives no type to tensors
    computed from contrib ops (Attention, SkipLayerNormalization), and without a default the quantizer stops
    ("Unable to find data type for weight_name=...").

    Raises:
        ConvertError: the quantizer failed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hint = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=list(keep_fp32),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
        raise ConvertError(f"int8 quantization of {source.name} failed: {exc}") from exc
    finally:
        root.removeFilter(hint)


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
