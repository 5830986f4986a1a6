"""int8 on the tiny BERT: static QDQ scores do not depend on the batch, dynamic ones do; what each graph runs as.

The model is the tiny random BERT with a fresh 3-label head (no training: batch dependence is a property of the
quantized graph, not of what it learned), exported and fused by the converter, scored by the runtime's session.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from tests.converters.conftest import DATA, LABELS

from fhirplug.session import ModelSession
from fhirplug.tasks.text_classification import aggregate, window_probabilities
from fhirplug_convert import _core, export, finetune, quantize
from fhirplug_convert.tasks import get_task

pytestmark = pytest.mark.train

#: Operators that quantize activations per call (dynamic int8), as onnxruntime runs the graph.
PER_CALL = ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention")


@pytest.fixture(scope="module")
def models(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 (fused), static int8 calibrated on the first 64 training-note windows, dynamic int8; tokenizer.json."""
    folder = tmp_path_factory.mktemp("int8")
    model, tokenizer = finetune.load_base(str(tiny_base), [name for name, _, _ in LABELS], False)
    module = finetune.LogitsModel(model).eval()
    export.export_onnx(module, folder / "raw.onnx", get_task("text-classification"), 17, model.config.vocab_size)
    export.optimize_onnx(folder / "raw.onnx", folder / "fp32.onnx", model.config)
    export.save_tokenizer(tokenizer, folder / "tokenizer.json")
    session = _open(folder / "fp32.onnx", folder / "tokenizer.json")
    feeds = _core.calibration_feeds(session, _notes()[20:], 64)
    assert len(feeds) == 64
    quantize.quantize_int8(folder / "fp32.onnx", folder / "static.onnx", mode="static", calibration=feeds)
    quantize.quantize_int8(folder / "fp32.onnx", folder / "dynamic.onnx", mode="dynamic")
    return {
        "fp32": folder / "fp32.onnx",
        "static": folder / "static.onnx",
        "dynamic": folder / "dynamic.onnx",
        "tokenizer": folder / "tokenizer.json",
    }


def _notes() -> list[str]:
    rows = (DATA / "notes.csv").read_text(encoding="utf-8").splitlines()
    return [row["text"] for row in csv.DictReader(rows)]


def _open(model: Path, tokenizer: Path, batch_size: int = _core.RUNTIME_BATCH_SIZE) -> ModelSession:
    precision = "fp32" if "fp32" in model.name else "int8"
    return _core.open_session(model, tokenizer, max_tokens=32, stride=8, precision=precision, batch_size=batch_size)


def _probabilities(session: ModelSession, texts: list[str]) -> np.ndarray:
    notes = _core.note_logits(session, texts)
    return np.stack([aggregate(window_probabilities(n, 1.0, False), False) for n in notes])


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_note_alone_and_inside_a_batch_of_16(models: dict[str, Path], kind: str) -> None:
    """One onnxruntime call holds the note and 16 others (longer ones, so it is padded too)."""
    notes = _notes()
    note = notes[1]  # "Type 2 diabetes with elevated hba1c. medications reconciled."
    session = _open(models[kind], models["tokenizer"], batch_size=17)
    one_window = [n for n in notes if session.count_windows(n) == 1]
    others = [n for n in one_window if n != note and len(n) > len(note)][:16]
    assert len(others) == 16
    windows = list(session.iter_windows([note, *others]))
    assert len(windows) == 17  # every text is one window: one batch of 17
    alone = _probabilities(session, [note])[0]
    in_batch = _probabilities(session, [note, *others])[0]
    difference = float(np.abs(alone - in_batch).max())
    print(f"{kind}: max |Δp| alone vs in a batch of 17: {difference:.3g}")
    if kind == "static":
        assert difference <= 1e-6
    else:  # activations quantized with the range of the whole batch (padding included): the note moves
        assert difference > 1e-4
    fp32 = _probabilities(_open(models["fp32"], models["tokenizer"]), [note])[0]
    assert float(np.abs(alone - fp32).max()) < 0.05  # int8, not something else


def test_what_onnxruntime_runs(models: dict[str, Path]) -> None:
    """Fusion still fires on fp32; static QDQ runs as fixed-scale integer GEMMs, dynamic quantizes per call."""
    fp32 = quantize.runtime_op_counts(models["fp32"])
    assert fp32.get("Attention") == 2 and fp32.get("SkipLayerNormalization") == 4
    static = quantize.runtime_op_counts(models["static"])
    assert static.get("MatMulIntegerToFloat") == 6  # per layer: attention output, feed-forward up and down
    assert static.get("QuantizeLinear", 0) >= 1  # activations quantized with a constant scale
    assert not set(static) & set(PER_CALL)
    assert static.get("Attention") == 2  # the QKV projection stays fp32
    dynamic = quantize.runtime_op_counts(models["dynamic"])
    per_call = sum(n for op, n in dynamic.items() if op in PER_CALL)
    assert per_call >= 6 and "MatMulIntegerToFloat" not in dynamic


def test_static_without_calibration_windows_is_a_convert_error(models: dict[str, Path], tmp_path: Path) -> None:
    from fhirplug.errors import ConvertError

    with pytest.raises(ConvertError, match="needs calibration windows"):
        quantize.quantize_int8(models["fp32"], tmp_path / "x.onnx", mode="static", calibration=[])
