"""The whole pipeline on a tiny random BERT: every method, the parity gate, signing, the CLI, the runtime."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tests.converters.conftest import LABELS, corrupt_int8, is_classifier_weight_scale, write_recipe

import fhirplug_convert._core
import fhirplug_convert.quantize
import fhirplug_convert.validate
from fhirplug.bundle import generate_keypair, verify_bundle
from fhirplug.errors import SignatureError
from fhirplug_convert import ConvertResult, ParityError, convert
from fhirplug_convert.cli import convert as convert_command

pytestmark = pytest.mark.train

METHODS = ["full", "lora", "bitfit", "prompt-tuning"]


@pytest.fixture(scope="module", params=METHODS)
def built(request: pytest.FixtureRequest, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    method = request.param
    folder = tmp_path_factory.mktemp(f"recipe-{method}")
    # Prompt tuning: a window as long as the model allows, to check the virtual tokens are taken off it.
    max_tokens = 64 if method == "prompt-tuning" else 32
    parity = ""
    if method in ("bitfit", "prompt-tuning"):
        # A frozen *random* encoder gives these methods weak, near-tied scores, where int8 rounding flips a
        # few of the 30 validation decisions (measured: 87-97% agreement). Pretrained bases are far from ties;
        # the gate itself is tested below on full fine-tuning with the default tolerance.
        parity = "min_agreement = 0.8\nmax_metric_drop = 15.0"
    recipe = write_recipe(folder, tiny_base, method=method, max_tokens=max_tokens, parity=parity)
    return convert(recipe, folder / "bundle", progress=False)


def test_every_method_builds_a_verified_bundle(built: ConvertResult) -> None:
    verified = verify_bundle(built.bundle, allow_unsigned=True)
    manifest = verified.manifest
    method = manifest.training.method
    assert manifest.name == f"tiny-{method}"
    assert [(s.label, s.code) for s in manifest.outputs.labels] == [(n, c) for n, c, _ in LABELS]
    assert [v.precision for v in manifest.variants] == ["fp32", "int8", "fp16"]
    assert manifest.variant("int8").providers == ("CPUExecutionProvider",)
    assert manifest.variant("fp16").providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert len(manifest.variant("fp32").providers) == 3
    assert sorted(manifest.files) == [
        "README.md",
        "abstention.npz",
        "labels.json",
        "metrics.json",
        "parity.json",
        "test_split.json",
        "tokenizer.json",
    ]
    assert manifest.tokenizer.max_tokens == (60 if method == "prompt-tuning" else 32)  # prompt: 64 − 4 virtual
    assert manifest.tokenizer.stride == 8
    assert json.loads((built.bundle / "parity.json").read_text()) == manifest.parity
    assert manifest.training.trainable_parameters is not None and manifest.training.total_parameters is not None
    share = manifest.training.trainable_parameters / manifest.training.total_parameters
    assert share == 1.0 if method == "full" else share < 0.2
    card = (built.bundle / "README.md").read_text()
    for heading in ("## Intended use", "## Limitations", "## Metrics", "## Calibration", "## Parity", "## Reproduce"):
        assert heading in card
    assert "fhirplug convert" in card and "recipe.toml" in card
    if method == "full":  # the other methods learn little on a random frozen encoder
        assert built.metrics["test"]["fp32"]["accuracy"] >= 0.8
        assert built.metrics["test"]["int8"]["accuracy"] >= 0.8


def test_parity_is_within_tolerance(built: ConvertResult) -> None:
    parity = built.parity
    tolerance = parity["tolerance"]
    if built.manifest.training is not None and built.manifest.training.method in ("full", "lora"):
        assert tolerance == {"max_abs_logit_diff": 1e-3, "max_metric_drop": 1.0, "min_agreement": 0.98}
    assert parity["packaged"] == ["fp32", "int8", "fp16"] and parity["dropped"] == []
    assert parity["variants"]["fp32"]["max_abs_logit_diff_vs_torch"] <= 1e-3
    for precision in ("int8", "fp16"):
        entry = parity["variants"][precision]
        assert entry["status"] == "passed"
        assert entry["metric_drop_points"] <= tolerance["max_metric_drop"]
        assert entry["agreement"] >= tolerance["min_agreement"]
    assert parity["variants"]["fp16"]["agreement"] >= 0.98  # fp16 is close to fp32 for every method
    if built.manifest.tokenizer.max_tokens == 32:  # some validation notes are longer than one window
        assert parity["windows"] > parity["texts"]


def test_the_onnx_graph_is_fused_and_has_the_runtime_inputs(built: ConvertResult) -> None:
    assert built.fused_operators.get("Attention") == 2
    assert built.fused_operators.get("SkipLayerNormalization") == 4
    model = onnx.load(str(built.bundle / "model.fp32.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for value in inputs.values():
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"]
    # logits, and the pooled vector the head reads (abstention's out-of-domain score)
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]


def test_tokenizer_json_has_no_fixed_padding_or_truncation(built: ConvertResult) -> None:
    tokenizer = json.loads((built.bundle / "tokenizer.json").read_text())
    assert tokenizer["padding"] is None and tokenizer["truncation"] is None


def _macro_f1(predicted: np.ndarray, truth: np.ndarray, classes: int) -> float:
    scores = []
    for k in range(classes):
        tp = int(((predicted == k) & (truth == k)).sum())
        fp = int(((predicted == k) & (truth != k)).sum())
        fn = int(((predicted != k) & (truth == k)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def test_the_stored_test_split_rescored_by_the_runtime_gives_the_cards_metrics(built: ConvertResult) -> None:
    """test_split.json names the test rows (and hashes the data): load_plugin + predict_texts on those rows gives
    metrics.json's test metrics for every packaged variant, to 4 decimals."""
    import fhirplug

    split = json.loads((built.bundle / "test_split.json").read_text())
    folder = built.bundle.parent  # the recipe's folder: the data file is beside the recipe
    (data,) = split["data"]
    assert data["file"] == "notes.csv"
    assert data["sha256"] == hashlib.sha256((folder / "notes.csv").read_bytes()).hexdigest()
    rows = list(csv.DictReader((folder / "notes.csv").read_text(encoding="utf-8").splitlines()))
    texts, truth = [], []
    names = [name for name, _, _ in LABELS]
    for example in split["examples"]:
        file, _, number = example["where"].partition(" row ")
        row = rows[int(number) - 2]  # CSV rows count the header as row 1
        assert file == "notes.csv" and [row["label"]] == example["labels"]
        texts.append(row["text"])
        truth.append(names.index(row["label"]))
    digest = hashlib.sha256(b"".join(t.encode("utf-8") + b"\0" for t in texts)).hexdigest()
    assert digest == split["texts_sha256"]
    assert len(texts) == built.metrics["splits"]["test"] > 5

    stored = json.loads((built.bundle / "metrics.json").read_text())["test"]
    assert sorted(stored) == sorted(built.parity["packaged"])
    for precision, expected in stored.items():
        if precision == "fp16":
            continue  # a GPU variant: the manifest offers it to no CPU provider, and the test runs on the CPU
        plugin = fhirplug.load_plugin(built.bundle, allow_unsigned=True, variant=precision, provider="cpu")
        predicted = plugin.predict_texts(texts).argmax(axis=1)
        answer = np.array(truth)
        assert round(float((predicted == answer).mean()), 4) == round(expected["accuracy"], 4)
        assert round(_macro_f1(predicted, answer, len(names)), 4) == round(expected["macro_f1"], 4)


def test_the_runtime_abstains_on_exactly_the_test_texts_the_card_counts(built: ConvertResult) -> None:
    """The card's abstention rate on the test split (per variant) is what the runtime's own task computes from
    the shipped abstention.npz and threshold; the calibration split was kept apart from model selection."""
    import fhirplug
    from fhirplug._abstain import mean_embeddings

    manifest = verify_bundle(built.bundle, allow_unsigned=True).manifest
    spec = manifest.calibration.abstention
    assert spec is not None and spec.output == "embedding" and spec.threshold > 0
    # Out-of-domain calibration texts (fhirplug's generic English) were given: the discriminator is fitted too.
    assert spec.method == "mahalanobis+discriminator" and spec.discriminator_threshold is not None
    assert 0.5 <= spec.discriminator_threshold < 1
    assert built.metrics["abstention"]["discriminator"]["texts"]["out_of_domain"] > 0
    assert all(v.output_names == ("logits", "embedding") for v in manifest.variants)
    assert 0 < manifest.calibration.min_probability <= 0.5  # multi-class floor from the decision policy
    facts = built.metrics["abstention"]
    assert facts["threshold_choice"]["threshold"] == pytest.approx(spec.threshold, abs=1e-4)
    assert [s["name"] for s in facts["out_of_domain_sets"]] == ["generic English (fhirplug)"]
    assert built.metrics["splits"]["calibration"] >= 2
    assert built.metrics["calibration"]["measured_on"] == "test"
    split = json.loads((built.bundle / "test_split.json").read_text())
    rows = list(csv.DictReader((built.bundle.parent / "notes.csv").read_text(encoding="utf-8").splitlines()))
    texts = [rows[int(e["where"].partition(" row ")[2]) - 2]["text"] for e in split["examples"]]
    for precision in ("fp32", "int8"):
        plugin = fhirplug.load_plugin(built.bundle, allow_unsigned=True, variant=precision, provider="cpu")
        windows, outputs = plugin._run(texts, range(len(texts)))
        distances = plugin.task.distances(len(texts), windows, outputs)
        embeddings = mean_embeddings([w.text_index for w in windows], outputs, len(manifest.outputs.labels), len(texts))
        by_discriminator = plugin.task.abstainer.ood_probability(embeddings) > spec.discriminator_threshold
        out_of_domain = ~(distances <= spec.threshold) | by_discriminator
        rate = float(out_of_domain.mean())
        assert round(rate, 4) == facts["rates"][precision]["in-domain test"]["abstained"]
        probs = plugin.task.scores(len(texts), windows, outputs)
        refused = out_of_domain | (probs.max(axis=1) < manifest.calibration.min_probability)
        np.testing.assert_array_equal(plugin.task.abstains(len(texts), windows, outputs), refused)
        assert facts["answered"][precision]["answered"] == int((~refused).sum())
    card = (built.bundle / "README.md").read_text()
    assert "## Abstention (out-of-domain texts get no code)" in card and "## Decision policy" in card


def test_int8_is_static_qdq_and_runs_as_fixed_scale_integer_kernels(built: ConvertResult) -> None:
    """The default int8 is static: no activation quantized per call in what onnxruntime runs."""
    entry = built.parity["variants"]["int8"]
    quantization = entry["quantization"]
    assert quantization["mode"] == "static" and quantization["format"] == "QDQ"
    assert 0 < quantization["calibration"]["windows"] <= 256
    ops = quantization["runs_as"]
    # 6 weight MatMuls per layer × 2 layers: Q, K, V, attention output, feed-forward up and down (the int8 source
    # graph leaves attention unfused); the attention products stay fp32, and no fused Attention runs.
    assert ops.get("MatMulIntegerToFloat", 0) == 12
    assert "Attention" not in ops
    assert not set(ops) & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention"}
    assert "static QDQ" in (built.bundle / "README.md").read_text()


# --- one-off runs (full fine-tuning, few steps) -------------------------------------------------------------------


_corrupt_int8 = corrupt_int8


def test_the_gate_rejects_a_broken_required_variant(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8 is in parity.require: its failure stops the build and nothing is written."""
    _corrupt_int8(monkeypatch)
    recipe = write_recipe(
        tmp_path, tiny_base, export='variants = ["fp32", "int8"]\nint8_fallback = false', parity='require = ["int8"]'
    )
    with pytest.raises(ParityError, match=r"parity gate failed — int8: .*; nothing was written") as caught:
        convert(recipe, tmp_path / "bundle", progress=False)
    entry = caught.value.report["variants"]["int8"]
    assert entry["status"] == "failed" and entry["agreement"] < 0.98
    assert not (tmp_path / "bundle").exists()


def test_a_broken_variant_is_left_out_and_the_rest_is_written(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not required, not allowed to drop: the bundle is still written (fp32), and the report says int8 failed."""
    _corrupt_int8(monkeypatch)
    recipe = write_recipe(tmp_path, tiny_base, export='variants = ["fp32", "int8"]\nint8_fallback = false')
    result = convert(recipe, tmp_path / "bundle", progress=False)
    manifest = verify_bundle(result.bundle, allow_unsigned=True).manifest
    assert [v.precision for v in manifest.variants] == ["fp32"]
    assert result.left_out == ["int8"] and result.parity["packaged"] == ["fp32"]
    entry = json.loads((result.bundle / "parity.json").read_text())["variants"]["int8"]
    assert entry["status"] == "failed" and entry["agreement"] < 0.98
    assert any(reason.startswith("accuracy drops") for reason in entry["reasons"])
    assert "Left out: int8 failed the parity gate" in (result.bundle / "README.md").read_text()


def test_int8_falls_back_to_mixed_precision(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full int8 fails the gate; keeping a MatMul of layer 1 in fp32 passes: the smallest such variant ships."""
    real = fhirplug_convert.quantize.quantize_int8
    calls: list[tuple[str, ...]] = []

    def sensitive_layer_1(source: Path, target: Path, keep_fp32: Sequence[str] = (), **options: Any) -> None:
        calls.append(tuple(keep_fp32))
        assert options["mode"] == "static" and options["calibration"]  # the fallback re-uses the calibration
        real(source, target, keep_fp32, **options)
        if not any("layer.1/" in name for name in keep_fp32):  # layer 1 quantized: decisions flip
            model = onnx.load(str(target))
            for init in model.graph.initializer:
                if is_classifier_weight_scale(init.name):
                    init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), init.name))
            onnx.save(model, str(target))

    monkeypatch.setattr(fhirplug_convert.quantize, "quantize_int8", sensitive_layer_1)
    recipe = write_recipe(tmp_path, tiny_base, export='variants = ["fp32", "int8"]')
    result = convert(recipe, tmp_path / "bundle", progress=False)
    # full int8 (from the graph without the Attention fusion); the Attention-fused graph (its Q/K/V fp32 inside the
    # fused op, nothing kept by name); each of the 2 layers kept fp32 (6 weight MatMuls each: Q, K, V, attention
    # output, feed-forward up and down); then each MatMul of layer 1 alone
    assert calls[0] == () and [len(c) for c in calls[1:]] == [0, 6, 6, 1, 1, 1, 1, 1, 1]
    manifest = verify_bundle(result.bundle, allow_unsigned=True).manifest
    entry = manifest.parity["variants"]["int8"]
    assert entry["status"] == "passed"
    mixed = entry["mixed_precision"]
    assert len(mixed["kept_fp32"]) == 1 and "layer.1/" in mixed["kept_fp32"][0]
    assert mixed["full_int8"]["agreement"] < 0.98
    graph = onnx.load(str(result.bundle / "model.int8.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    # A QDQ MatMul reads DequantizeLinear outputs; the one kept fp32 reads plain float tensors.
    weights = {i.name for i in graph.initializer}
    # A kept MatMul multiplies by its fp32 weight initializer; a quantized one by a DequantizeLinear output (the
    # attention products multiply two activations and read neither).
    layer_matmuls = [n for n in graph.node if n.op_type == "MatMul" and "layer." in n.name]
    float_matmuls = [n.name for n in layer_matmuls if weights.intersection(n.input)]
    assert float_matmuls == mixed["kept_fp32"]
    assert sum(bool(dequantized.intersection(n.input)) for n in layer_matmuls) >= 11
    assert "int8 is mixed precision" in (result.bundle / "README.md").read_text()


def test_the_gate_drops_a_broken_variant_when_allowed(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corrupt_int8(monkeypatch)
    recipe = write_recipe(tmp_path, tiny_base, export='variants = ["fp32", "int8"]\nallow_drop = ["int8"]')
    result = convert(recipe, tmp_path / "bundle", progress=False)
    manifest = verify_bundle(result.bundle, allow_unsigned=True).manifest
    assert [v.precision for v in manifest.variants] == ["fp32"]
    assert not (result.bundle / "model.int8.onnx").exists()
    assert manifest.parity["variants"]["int8"]["status"] == "dropped"
    assert manifest.parity["dropped"] == ["int8"]
    assert list(result.metrics["test"]) == ["fp32"]


def test_fp16_that_no_provider_runs_is_unverified_and_left_out(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fhirplug_convert._core.open_session

    def cpu_without_fp16(path: Path, tokenizer: Path, **options: Any) -> Any:
        if options["precision"] == "fp16":
            raise RuntimeError("NOT_IMPLEMENTED : Could not find an implementation for MatMul(13) (float16)")
        return real(path, tokenizer, **options)

    monkeypatch.setattr(fhirplug_convert._core, "open_session", cpu_without_fp16)
    recipe = write_recipe(tmp_path, tiny_base, export='variants = ["fp32", "fp16"]')
    result = convert(recipe, tmp_path / "bundle", progress=False, max_steps=6)
    entry = result.parity["variants"]["fp16"]
    assert entry["status"] == "unverified" and entry["reason"].startswith("no GPU provider")
    assert result.parity["packaged"] == ["fp32"]
    assert [v.precision for v in result.manifest.variants] == ["fp32"]
    assert not (result.bundle / "model.fp16.onnx").exists()


def test_multilabel_tunes_thresholds(tiny_base: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_base, multi_label=True, export='variants = ["fp32", "int8"]')
    result = convert(recipe, tmp_path / "bundle", progress=False)
    manifest = verify_bundle(result.bundle, allow_unsigned=True).manifest
    assert manifest.outputs.multi_label
    assert set(manifest.calibration.thresholds) == {"diabetes", "hypertension", "asthma"}
    assert result.parity["variants"]["int8"]["metric"] == "micro_f1"
    per_label = result.metrics["test"]["fp32"]["per_label"]
    assert all(per_label[label]["auroc"] is not None for label in per_label)
    # Every code's threshold comes with the reason the decision policy chose it (tuned, default, flagged, capped).
    decisions = result.metrics["decisions"]["labels"]
    assert set(decisions) == {"diabetes", "hypertension", "asthma"}
    assert all(record["reason"] and 0.2 <= record["threshold"] <= 1.0 for record in decisions.values())
    assert result.metrics["test"]["fp32"]["micro_f1"] > 0.3


def test_fhir_data_end_to_end(tiny_base: Path, tmp_path: Path) -> None:
    data = 'format = "fhir"\npath = "synthea-like-bundle.json"\n[data.split]\nvalidation = 0.25\ntest = 0.25\nseed = 1'
    recipe = write_recipe(tmp_path, tiny_base, multi_label=True, data=data, export='variants = ["fp32"]')
    result = convert(recipe, tmp_path / "bundle", progress=False, max_steps=4)
    manifest = verify_bundle(result.bundle, allow_unsigned=True).manifest
    # Two validation notes are too few to halve: calibration shares them (and the dataset description says so).
    assert manifest.metrics["splits"] == {"train": 4, "validation": 2, "test": 1, "calibration": 2}
    assert "validation too small to halve (2 texts)" in manifest.training.dataset
    assert manifest.training.dataset.startswith("synthea-like-bundle.json: 7 examples, split by patient")


def test_same_seed_same_model(tiny_base: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        recipe = write_recipe(tmp_path / name, tiny_base, export='variants = ["fp32"]')
        runs.append(convert(recipe, tmp_path / name / "bundle", progress=False, max_steps=8))
    assert runs[0].metrics["history"] == runs[1].metrics["history"]
    assert runs[0].manifest.calibration == runs[1].manifest.calibration


def test_signed_bundles(tiny_base: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    recipe = write_recipe(tmp_path / "r", tiny_base, export='variants = ["fp32"]')
    result = convert(recipe, tmp_path / "bundle", sign_key=tmp_path / "k.key", progress=False, max_steps=2)
    assert (result.bundle / "manifest.sig").is_file()
    assert verify_bundle(result.bundle, trusted_keys=[tmp_path / "k.pub"]).signed_by is not None
    with pytest.raises(SignatureError):
        verify_bundle(result.bundle, trusted_keys=[tmp_path / "other.pub"])


def test_out_dir_is_refused_when_it_holds_something_else(tiny_base: Path, tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "precious.txt").write_text("keep me")
    recipe = write_recipe(tmp_path / "r", tiny_base, export='variants = ["fp32"]')
    with pytest.raises(fhirplug_convert.validate.ConvertError, match="not empty and holds no plugin bundle"):
        convert(recipe, tmp_path / "bundle", progress=False, max_steps=1)
    assert (tmp_path / "bundle" / "precious.txt").read_text() == "keep me"


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_help() -> None:
    result = CliRunner().invoke(convert_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--out", "--sign-key", "--max-steps", "--epochs", "--quiet"):
        assert option in result.output


def test_cli_builds_a_bundle(tiny_base: Path, tmp_path: Path) -> None:
    # Three steps leave the model near its ties, where int8 would (rightly) fail the gate: fp32 only.
    recipe = write_recipe(tmp_path, tiny_base, export='variants = ["fp32"]')
    out = tmp_path / "bundle"
    result = CliRunner().invoke(convert_command, [str(recipe), "--out", str(out), "--max-steps", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"built {out} (fp32)"
    verify_bundle(out, allow_unsigned=True)
    assert "--max-steps 3" in (out / "README.md").read_text()


def test_fhirplug_convert_reaches_this_command(tmp_path: Path) -> None:
    """The SDK's ``fhirplug convert`` (attached lazily) runs this command, exit codes included."""
    from fhirplug.cli import main

    runner = CliRunner()
    assert "--max-steps" in runner.invoke(main, ["convert", "--help"]).output
    recipe = write_recipe(tmp_path, Path("unused"), data='format = "csv"\npath = "absent.csv"')
    result = runner.invoke(main, ["convert", str(recipe), "--out", str(tmp_path / "b")])
    assert result.exit_code == 7, result.output
    assert "absent.csv: data file not found" in result.output


def test_cli_errors_are_one_line_with_exit_code_7(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, Path("unused"), training="learning_rte = 1")
    result = CliRunner().invoke(convert_command, [str(recipe), "--out", str(tmp_path / "b")])
    assert result.exit_code == 7
    assert result.output.count("\n") == 1
    assert "unknown key 'training.learning_rte' (did you mean 'learning_rate'?)" in result.output
    assert "Traceback" not in result.output


def test_convert_without_the_train_extra_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a runtime-only install: torch cannot be imported. One line, exit 6, no traceback."""
    import sys

    from fhirplug.cli import main

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    for module in [m for m in sys.modules if m == "fhirplug_convert" or m.startswith("fhirplug_convert.")]:
        monkeypatch.delitem(sys.modules, module)  # imported afresh, as in a new process
    result = CliRunner().invoke(main, ["convert", "recipe.toml", "--out", "x"])
    assert result.exit_code == 6
    assert "needs the [train] extra" in result.output and "pip install -c constraints.txt" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
