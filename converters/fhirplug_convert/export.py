"""Export to ONNX and optimize with onnxruntime's BERT fusion.

Measured on this project's machines: onnxruntime's BERT fusion (``onnxruntime.transformers.optimizer``) only
fires on a graph from the legacy TorchScript exporter (``dynamo=False``) of a model loaded with eager attention;
the dynamo exporter and the sdpa attention path give graphs it leaves unfused. So that is the path used here.

optimum was measured against it (``python benchmarks/optimum_compare.py``, ``benchmarks/results/optimum_compare.json``,
MiniLM-L6): ``main_export`` + ``ORTOptimizer`` (level 2, which calls the same onnxruntime optimizer) fuse Attention,
SkipLayerNormalization and BiasGelu but not EmbedLayerNormalization (58 nodes vs 51 here; no latency gain beyond
the run's noise, in which its sdpa and eager exports, the same graph, differed 1.5×), and its exporter takes a
transformers model for a known task, so it cannot export the modules the converter ships (the ``embedding``
second output, prompt tuning's virtual tokens). The converter keeps its own export.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from fhirplug.errors import ConvertError
from fhirplug_convert.tasks import TaskSpec

__all__ = ["export_onnx", "optimize_onnx", "save_tokenizer"]


def export_onnx(module: nn.Module, path: Path, task: TaskSpec, opset: int, vocab_size: int) -> None:
    """Export ``module`` (``(input_ids, attention_mask, token_type_ids) → logits``) with dynamic batch and
    sequence axes, int64 inputs, opset ``opset``. A task whose outputs include ``embedding`` (text
    classification) also exports the pooled vector the head reads (:class:`~fhirplug_convert.abstention.WithEmbedding`),
    for abstention.

    Raises:
        ConvertError: the exporter failed.
    """
    module.eval()
    # Two rows of different content, one with padding, so no shape or mask value can be folded in as constant.
    ids = torch.randint(5, max(vocab_size, 6), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    types = torch.zeros_like(ids)
    args = (ids, mask, types)
    dynamic: dict[str, Any] = {name: dict(axes) for name, axes in (*task.inputs.items(), *task.outputs.items())}
    if "embedding" in task.outputs:
        from fhirplug_convert.abstention import WithEmbedding

        with torch.inference_mode():
            n_labels = int(module(*args).shape[-1])
        module = WithEmbedding(module, n_labels)
    try:
        with warnings.catch_warnings():
            # The tracer warns about Python control flow on shapes inside transformers (it is shape-only and
            # checked by the parity gate), and torch announces the legacy exporter's deprecation: both are
            # expected here and would otherwise reach every user of `fhirplug convert`.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(task.inputs),
                output_names=list(task.outputs),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # torch.onnx raises many unrelated types; one boundary here
        raise ConvertError(f"ONNX export to {path.name} failed: {exc}") from exc
    finally:
        # torch.onnx.export restores the module's previous train/eval state on exit; keep it in eval.
        module.eval()


def ensure_ort_transformers_path() -> None:
    """Put onnxruntime.transformers' own folder on sys.path (again).

    Its modules import each other as top-level modules (``from fusion_options import ...``); the package adds its
    folder to sys.path when first imported. Code that later restores an older sys.path (pytest's monkeypatch, an
    embedding application) leaves the package cached but its siblings unimportable, so check before each use.
    """
    import sys

    import onnxruntime.transformers

    folder = str(Path(onnxruntime.transformers.__file__).parent)
    if folder not in sys.path:
        sys.path.append(folder)


def optimize_onnx(source: Path, target: Path, config: Any, *, attention: bool = True) -> dict[str, int]:
    """onnxruntime's BERT graph fusion (Attention, SkipLayerNormalization, EmbedLayerNormalization, Gelu …).

    ``attention=False`` leaves the attention unfused, so its Q/K/V projections are plain MatMuls that static int8
    quantizes (the fused Attention op keeps them fp32): the source graph of the int8 variant. Measured with
    ``python benchmarks/int8_speed.py`` (MiniLM, 1×128, 2 threads): 1.40× faster than quantizing the fused graph,
    same max |Δlogit| (0.011) and decision agreement.

    Only the Python-level fusion runs (``opt_level=0``): the result stays portable across execution providers,
    and each provider applies its own graph optimizations at load.

    Returns:
        The fused-operator counts (only those that fired).
    """
    ensure_ort_transformers_path()
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = getattr(config, "model_type", "bert")
    kind = "bert" if model_type not in ("bert", "roberta", "distilbert") else model_type
    options = FusionOptions(kind)
    options.enable_attention = attention
    try:
        optimized = optimize_model(
            str(source),
            model_type=kind,
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=0,
            optimization_options=options,
        )
        optimized.save_model_to_file(str(target))
    except Exception as exc:  # onnxruntime's optimizer raises plain Exceptions
        raise ConvertError(f"onnxruntime optimization of {source.name} failed: {exc}") from exc
    stats = optimized.get_fused_operator_statistics()
    return {name: int(count) for name, count in sorted(stats.items()) if count}


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write tokenizer.json with padding and truncation off: the runtime makes its own windows."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.save(str(path))
