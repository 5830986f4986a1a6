"""The engines compared at fixed shapes, each a way to run one forward pass on the same token ids.

Each engine turns an :class:`Inputs` (one batch × tokens shape) into a zero-argument call returning logits, so
the timing loop treats them all alike. Engines that cannot run here (no GPU, no fp16 variant) are kept with a
``skipped: ...`` status, so the results say why they are missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fhirplug.errors import ProviderError

TORCH, OPTIMUM = "torch-fp32", "optimum-fp32"


@dataclass
class Inputs:
    """One fixed shape: the same token ids as fhirplug windows, numpy arrays and (lazily) torch tensors."""

    batch: int
    tokens: int
    windows: list[Any]
    arrays: dict[str, np.ndarray]
    _torch: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.batch}x{self.tokens}"

    def tensors(self) -> dict[str, Any]:
        if self._torch is None:
            import torch

            self._torch = {k: torch.from_numpy(v) for k, v in self.arrays.items()}
        return self._torch


@dataclass
class Engine:
    id: str
    label: str
    precision: str
    #: Which floor applies: "fp32", "int8" or None (GPU engines: the CPU GEMM floor says nothing).
    floor: str | None
    #: Inputs → a zero-argument call that runs one forward pass and returns its logits.
    prepare: Callable[[Inputs], Callable[[], Any]] | None = None
    status: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)


def logits_of(out: Any) -> np.ndarray:
    if isinstance(out, list):
        return np.stack(out)
    if hasattr(out, "numpy"):
        return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out.numpy())
    return np.asarray(out)


def torch_engine(checkpoint: Path, threads: int) -> tuple[Engine, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def prepare(x: Inputs) -> Callable[[], Any]:
        feed = x.tensors()

        def call() -> Any:
            with torch.inference_mode():
                return model(**feed).logits

        return call

    details = {
        "torch": torch.__version__,
        "attn_implementation": model.config._attn_implementation,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return Engine(TORCH, "PyTorch eager fp32", "fp32", "fp32", prepare, details=details), model


def optimum_dir(bundle: Path, checkpoint: Path, work: Path) -> Path:
    """The layout ORTModel expects: config.json beside model.onnx (a link to the bundle's fp32 model)."""
    target = work / "optimum"
    target.mkdir()
    shutil.copy2(checkpoint / "config.json", target / "config.json")
    try:
        (target / "model.onnx").symlink_to((bundle / "model.fp32.onnx").resolve())
    except OSError:
        shutil.copy2(bundle / "model.fp32.onnx", target / "model.onnx")
    return target


def optimum_engine(model_dir: Path, threads: int) -> tuple[Engine, Any]:
    from optimum.onnxruntime import ORTModelForSequenceClassification

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = ORTModelForSequenceClassification.from_pretrained(
        model_dir, file_name="model.onnx", provider="CPUExecutionProvider", session_options=options
    )

    def prepare(x: Inputs) -> Callable[[], Any]:
        feed = x.tensors()  # what a transformers tokenizer with return_tensors="pt" hands it
        return lambda: model(**feed).logits

    details = {
        "optimum": version("optimum"),
        "optimum-onnx": version("optimum-onnx"),
        "model": "model.fp32.onnx (the bundle's)",
    }
    return Engine(OPTIMUM, "Optimum ORTModel fp32", "fp32", "fp32", prepare, details=details), model


def fhirplug_engine(plugin: Any) -> Engine:
    session = plugin.session

    def prepare(x: Inputs) -> Callable[[], Any]:
        def call() -> Any:
            session.batch_size = x.batch  # one onnxruntime call per measured batch, as `fhirplug bench` does
            return session.run(x.windows)

        return call

    gpu = plugin.provider != "CPUExecutionProvider"
    provider = plugin.provider.removesuffix("ExecutionProvider")
    return Engine(
        f"fhirplug-{plugin.variant}" + ("-cuda" if gpu else ""),
        f"fhirplug {plugin.variant} ({provider})",
        plugin.variant,
        None if gpu else plugin.variant,
        prepare,
        details={"provider": plugin.provider},
    )


def gpu_engines(bundle: Path, manifest: Any, threads: int, batch_size: int) -> list[Engine]:
    """fp16 on CUDA: fhirplug's session, and a bare onnxruntime session with IO binding (outputs stay on the
    device until copied back once)."""
    ids = ("fhirplug-fp16-cuda", "ort-fp16-cuda-iobinding")
    labels = ("fhirplug fp16 (CUDA)", "onnxruntime fp16 CUDA + IO binding")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [
            Engine(i, lbl, "fp16", None, status="skipped: no GPU provider") for i, lbl in zip(ids, labels, strict=True)
        ]
    try:
        spec = manifest.variant("fp16")
    except ProviderError:
        return [
            Engine(i, lbl, "fp16", None, status="skipped: the bundle has no fp16 variant")
            for i, lbl in zip(ids, labels, strict=True)
        ]
    import fhirplug

    plugin = fhirplug.load_plugin(
        bundle, allow_unsigned=True, provider="cuda", variant="fp16", threads=threads, batch_size=batch_size
    )
    session = ort.InferenceSession(str(bundle / spec.file), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def prepare(x: Inputs) -> Callable[[], Any]:
        binding = session.io_binding()
        feed = {k: v for k, v in x.arrays.items() if k in names}

        def call() -> Any:
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(spec.output_names[0], "cuda")
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        return call

    return [
        fhirplug_engine(plugin),
        Engine(ids[1], labels[1], "fp16", None, prepare, details={"provider": session.get_providers()[0]}),
    ]
