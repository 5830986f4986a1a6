"""Converter fixtures: a tiny random BERT built once per session, and recipes that point at it.

The base model is a 2-layer, hidden-64 BERT with a WordPiece vocabulary trained here on the fixture notes
(a few hundred tokens), saved with ``save_pretrained`` so ``AutoModelForSequenceClassification`` and
``AutoTokenizer`` load it like any Hugging Face checkpoint: no download, a pipeline run in seconds.
"""

from __future__ import annotations

import csv
import json
import shutil
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import FIXTURES

DATA = FIXTURES / "converters"
#: Label map of the fixture data (label, SNOMED CT code, display), in output order.
LABELS = [
    ("diabetes", "44054006", "Diabetes mellitus type 2"),
    ("hypertension", "38341003", "Hypertensive disorder, systemic arterial"),
    ("asthma", "195967001", "Asthma"),
]

torch = pytest.importorskip("torch", reason="converter tests need the [train] extra")


def _corpus() -> list[str]:
    rows = (DATA / "notes.csv").read_text(encoding="utf-8").splitlines()
    texts = [row["text"] for row in csv.DictReader(rows)]
    lines = (DATA / "notes-multilabel.jsonl").read_text(encoding="utf-8").splitlines()
    texts += [json.loads(line)["text"] for line in lines]
    return texts


def _vocab(texts: list[str], words: int = 200) -> dict[str, int]:
    """A WordPiece vocabulary built by counting, not by the (hash-ordered, so run-to-run different) trainer:
    special tokens, every character alone and as ``##`` continuation, then the most frequent words."""
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({ch for word in counts for ch in word})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{ch}" for ch in chars)]
    tokens += [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:words]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny BERT checkpoint folder (config, weights, fast tokenizer files)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(_vocab(_corpus()), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    fast.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


METHODS = {
    "full": ('kind = "full"', 3e-3),
    "lora": ('kind = "lora"\nr = 8\nalpha = 16\ndropout = 0.0\ntarget_modules = ["query", "value", "dense"]', 1e-2),
    "bitfit": ('kind = "bitfit"', 1e-2),
    "prompt-tuning": ('kind = "prompt-tuning"\nnum_virtual_tokens = 4', 1e-2),
}


def write_recipe(
    folder: Path,
    base: Path,
    *,
    method: str = "full",
    multi_label: bool = False,
    data: str | None = None,
    labels: str | None = None,
    training: str = "",
    max_tokens: int = 32,
    export: str = "",
    parity: str = "",
    top: str = "",
    omit: tuple[str, ...] = (),
) -> Path:
    """A recipe in ``folder`` with the fixture data copied beside it (so relative paths are exercised).

    ``data``/``labels`` replace the [data] table / the label map; ``training``, ``export``, ``parity`` and
    ``top`` add lines to those tables and to the top level; ``omit`` drops [training] keys (e.g.
    ``("learning_rate", "epochs")``) to leave them to the converter's defaults.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("notes.csv", "notes-multilabel.jsonl", "labels.csv", "synthea-like-bundle.json"):
        shutil.copyfile(DATA / name, folder / name)
    block, lr = METHODS[method]
    if data is None:
        data = (
            'format = "jsonl"\npath = "notes-multilabel.jsonl"\nlabel = "labels"'
            if multi_label
            else 'format = "csv"\npath = "notes.csv"'
        ) + "\n[data.split]\nvalidation = 0.2\ntest = 0.2\nseed = 3"
    if labels is None:
        labels = "\n".join(
            f'[[labels]]\nlabel = "{n}"\nsystem = "http://snomed.info/sct"\ncode = "{c}"\ndisplay = "{d}"\n'
            for n, c, d in LABELS
        )
    text = textwrap.dedent(
        """\
        name = "tiny-{method}"
        version = "0.0.1"
        task = "text-classification"
        license = "Apache-2.0"
        description = "Test plugin."
        intended_use = "Tests only."
        limitations = "Template sentences; not clinical."
        base_model = "{base}"
        {top}
        {labels}
        [output]
        resource = "RiskAssessment"
        multi_label = {multi_label}

        [data]
        {data}

        [method]
        {block}

        [training]
        epochs = 10
        batch_size = 16
        learning_rate = {lr}
        warmup_ratio = 0.1
        seed = 0
        max_tokens = {max_tokens}
        stride = 8
        early_stopping_patience = 8
        {training}
        [export]
        {export}

        [parity]
        {parity}
        """
    )
    recipe = folder / "recipe.toml"
    recipe.write_text(
        text.format(
            method=method,
            base=base.as_posix(),
            top=top,
            multi_label=str(multi_label).lower(),
            data=data,
            labels=labels,
            block=block,
            lr=lr,
            training=training,
            max_tokens=max_tokens,
            export=export,
            parity=parity,
        ),
        encoding="utf-8",
    )
    if omit:
        kept = [line for line in recipe.read_text(encoding="utf-8").splitlines() if line.split(" = ")[0] not in omit]
        recipe.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return recipe


def is_classifier_weight_scale(name: str) -> bool:
    """What scales the int8 model's classifier weights: the fp32 weight itself (static int8 keeps the classifier
    fp32, as ``classifier.weight_Transposed`` once the embedding-table pass has run) or its quantization scale
    (dynamic: ``..._weight_Transposed_scale``). Negating it flips decisions."""
    return name.endswith(("classifier.weight", "classifier.weight_Transposed")) or (
        "classifier.weight" in name and name.endswith("_scale")
    )


def corrupt_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 quantization that also negates the classifier's weights (or their scale), so decisions flip."""
    import onnx

    import fhirplug_convert.quantize

    real = fhirplug_convert.quantize.quantize_int8

    def broken(source: Path, target: Path, keep_fp32: Sequence[str] = (), **options: Any) -> None:
        real(source, target, keep_fp32, **options)
        model = onnx.load(str(target))
        hits = 0
        for init in model.graph.initializer:
            if is_classifier_weight_scale(init.name):
                values = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array(-values, init.name))
                hits += 1
        assert hits == 1
        onnx.save(model, str(target))

    monkeypatch.setattr(fhirplug_convert.quantize, "quantize_int8", broken)
