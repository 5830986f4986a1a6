"""The physical floor: how fast a BERT encoder could possibly run here, from its FLOPs and this machine's GEMMs.

The floor of one forward pass is its matrix-multiply work divided by the GEMM rate this machine reaches at
that size with the same threads (``compare.py`` times the GEMM probes inside its interleaved rounds, so they
meet the same machine noise as the engines). Everything else an engine does (embeddings, LayerNorm, softmax,
GELU, memory traffic, framework overhead) is left out, so no engine can reach the floor; the share of it an
engine reaches (floor / measured p50) says how much room is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class EncoderShape:
    """What the FLOP count needs from a BERT-style config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int

    @classmethod
    def from_config(cls, config: Any) -> EncoderShape:
        """From a transformers config (BERT names, with DistilBERT's as a fallback)."""
        layers = getattr(config, "num_hidden_layers", None) or config.n_layers
        hidden = getattr(config, "hidden_size", None) or config.dim
        intermediate = getattr(config, "intermediate_size", None) or config.hidden_dim
        heads = getattr(config, "num_attention_heads", None) or config.n_heads
        return cls(int(layers), int(hidden), int(intermediate), int(heads))


def encoder_flops(shape: EncoderShape, tokens: int, batch: int = 1) -> dict[str, float]:
    """FLOPs of the encoder's matrix multiplies for ``batch`` sequences of ``tokens`` tokens.

    Per layer, with T tokens, hidden size h and intermediate size f, the multiply-adds are

    - ``T·4h²``: the Q, K, V and output projections ([T,h]×[h,h], four times);
    - ``T·2hf``: the feed-forward up and down projections ([T,h]×[h,f] and [T,f]×[f,h]);
    - ``2·T²·h``: attention scores Q·Kᵀ and the weighted sum of V, over all heads together;

    and a multiply-add is 2 FLOPs, so per layer::

        FLOPs = 2·T·(4h² + 2hf) + 2·2·T²·h

    times L layers and the batch. Embeddings, LayerNorm, softmax, GELU, the pooler and the classifier are
    left out (under 1 % at these sizes): the count is a lower bound on the work.

    Returns:
        ``linear`` (weight GEMMs, which int8 quantization makes integer), ``attention`` (activation ×
        activation, which stays float in a dynamically quantized model) and ``total``.
    """
    h, f, t = shape.hidden, shape.intermediate, tokens
    linear = 2.0 * t * (4 * h * h + 2 * h * f) * shape.layers * batch
    attention = 2.0 * 2 * t * t * h * shape.layers * batch
    return {"linear": linear, "attention": attention, "total": linear + attention}


def _session(graph: Any, threads: int) -> ort.InferenceSession:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def gemm_calls(m: int, k: int, n: int, threads: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    """One onnxruntime session per kind, each a [m,k]×[k,n] product with the weight as an initializer."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    a_in = helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])
    y_out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    fp32 = _session(
        helper.make_graph(
            [helper.make_node("MatMul", ["A", "W"], ["Y"])], "fp32", [a_in], [y_out], [numpy_helper.from_array(w, "W")]
        ),
        threads,
    )
    # What a dynamically quantized model runs (the fused form of DynamicQuantizeLinear + MatMulInteger):
    # activations quantized per call, int8 per-column weights, float out.
    scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    w8 = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    dq = _session(
        helper.make_graph(
            [helper.make_node("DynamicQuantizeMatMul", ["A", "W8", "S", "Z"], ["Y"], domain="com.microsoft")],
            "dqmm",
            [a_in],
            [y_out],
            [
                numpy_helper.from_array(w8, "W8"),
                numpy_helper.from_array(scale, "S"),
                numpy_helper.from_array(np.zeros(n, np.int8), "Z"),
            ],
        ),
        threads,
    )
    # The bare integer GEMM (uint8 × int8 → int32), no quantization of the activations.
    a8 = rng.integers(0, 255, (m, k), dtype=np.uint8)
    mmi = _session(
        helper.make_graph(
            [helper.make_node("MatMulInteger", ["A8", "W8", "AZ", "WZ"], ["Y32"])],
            "mmi",
            [helper.make_tensor_value_info("A8", TensorProto.UINT8, [m, k])],
            [helper.make_tensor_value_info("Y32", TensorProto.INT32, [m, n])],
            [
                numpy_helper.from_array(w8, "W8"),
                numpy_helper.from_array(np.array(128, np.uint8), "AZ"),
                numpy_helper.from_array(np.zeros(n, np.int8), "WZ"),
            ],
        ),
        threads,
    )
    return {
        "fp32_matmul": lambda: fp32.run(None, {"A": a}),
        "int8_dynamic_quantize_matmul": lambda: dq.run(None, {"A": a}),
        "int8_matmul_integer": lambda: mmi.run(None, {"A8": a8}),
    }


def gemm_rates(m: int, k: int, n: int, threads: int, p50_ms: dict[str, float]) -> dict[str, Any]:
    """GFLOP/s of each GEMM kind at [m,k]×[k,n] from its measured p50 (2·m·k·n / p50).

    Returns:
        per kind: ``p50_ms`` and ``gflops``; ``fp32_gflops`` and ``int8_gflops`` (the faster int8 kind), the
        rates the floor uses.
    """
    flops = 2.0 * m * k * n
    out: dict[str, Any] = {"m": m, "k": k, "n": n, "threads": threads}
    for name, p50 in p50_ms.items():
        out[name] = {"p50_ms": p50, "gflops": flops / (p50 / 1000.0) / 1e9}
    out["fp32_gflops"] = out["fp32_matmul"]["gflops"]
    out["int8_gflops"] = max(out["int8_dynamic_quantize_matmul"]["gflops"], out["int8_matmul_integer"]["gflops"])
    return out


def floor_ms(flops: dict[str, float], rates: dict[str, Any]) -> dict[str, float]:
    """Floor in ms for an fp32 model and for a dynamically quantized int8 one.

    The int8 floor runs the weight GEMMs at the int8 rate and attention (activation × activation, float in a
    dynamically quantized model) at the fp32 rate.
    """
    fp32 = rates["fp32_gflops"] * 1e9
    int8 = rates["int8_gflops"] * 1e9
    return {
        "fp32_ms": flops["total"] / fp32 * 1000.0,
        "int8_ms": (flops["linear"] / int8 + flops["attention"] / fp32) * 1000.0,
    }
