"""token-classification in the runtime: BIO decoding across windows, exact offsets, coding, FHIR out.

The end-to-end tests use a lookup "model" (an ONNX Gather: token id → tag logits) with a WordPiece tokenizer made
here, so the runtime is exercised with known per-token answers and no torch.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirplug import load_plugin
from fhirplug._assertion import DEFAULT_LEXICON, Lexicon
from fhirplug._coding import ConceptIndex, build_index, merge_names, normalize
from fhirplug.bundle import write_manifest
from fhirplug.errors import ManifestError, PluginError
from fhirplug.fhir.writer import ASSERTION_URL, EVIDENCE_SPAN_URL, ModelInfo, build_resources
from fhirplug.manifest import parse_manifest
from fhirplug.session import Window
from fhirplug.tasks.token_classification import decode_spans, merge_windows, tag_names

TYPES = ["Disease", "Chemical"]
TAGS = tag_names(TYPES)  # O, B-Disease, I-Disease, B-Chemical, I-Chemical


def logits_for(tags: list[str], pad: int = 0) -> np.ndarray:
    """One-hot-ish logits for a list of tags (special tokens: O), plus ``pad`` padded rows of noise."""
    out = np.full((len(tags) + pad, len(TAGS)), -4.0, dtype=np.float32)
    for i, tag in enumerate(tags):
        out[i, TAGS.index(tag)] = 4.0
    out[len(tags) :] = 9.0  # padding rows must be ignored, whatever they hold
    return out


# --- decoding -------------------------------------------------------------------------------------------------


def test_bio_decoding_across_window_boundaries() -> None:
    text = "aspirin caused chest pain and hypertension today"
    words = [(0, 7), (8, 14), (15, 20), (21, 25), (26, 29), (30, 35), (35, 42), (43, 48)]  # hyper|tension
    cls = (0, 0)
    # Window 1: tokens 0..4; window 2: tokens 1..7 (they share 1..4).
    w1 = Window(0, list(range(7)), [0] * 7, [cls, *words[0:5], cls], 0, 29)
    w2 = Window(0, list(range(9)), [0] * 9, [cls, *words[1:8], cls], 8, 48)
    # Near its right edge window 1 wrongly reads "pain" as O; window 2, where "pain" sits in the middle, is right.
    # Window 2 wrongly reads "chest" (near its left edge) as O: window 1 has it in the middle and says B-Disease.
    l1 = logits_for(["O", "B-Chemical", "O", "B-Disease", "O", "O", "O"], pad=3)
    l2 = logits_for(["O", "O", "O", "I-Disease", "O", "B-Disease", "O", "O", "O"])
    # "tension" (a sub-word of hypertension) reads O: the span is widened to the whole word.
    ((offsets, probs),) = merge_windows(1, [w1, w2], [l1, l2])
    assert offsets == sorted(set(words))  # each token once, in order, padding rows dropped
    spans = decode_spans(text, offsets, probs, TYPES)
    assert [(text[s.start : s.end], s.type) for s in spans] == [
        ("aspirin", "Chemical"),
        ("chest pain", "Disease"),
        ("hypertension", "Disease"),
    ]
    assert all(0.9 < s.score <= 1.0 for s in spans)


def test_inside_after_outside_opens_a_span_and_type_change_splits() -> None:
    text = "metformin insulin"
    offsets = [(0, 9), (10, 17)]
    probs = np.eye(len(TAGS))[[TAGS.index("I-Chemical"), TAGS.index("I-Disease")]]
    spans = decode_spans(text, offsets, probs, TYPES)
    assert [(s.start, s.end, s.type) for s in spans] == [(0, 9, "Chemical"), (10, 17, "Disease")]


def test_offsets_are_exact_on_multibyte_text() -> None:
    from tokenizers import Tokenizer

    from fhirplug.session import _window

    tok = Tokenizer.from_file(str(Path(__file__).parents[1] / "fixtures/plugins/tiny-notes/tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=8, stride=2)
    # Decomposed é (e + U+0301), CJK, an emoji (one code point, 4 UTF-8 bytes), a ZWJ sequence, then the words.
    text = "Cafe\u0301 中文 😀👩‍⚕️ diabetes ok, é hypertension!"
    enc = tok.encode(text)
    windows = [_window(0, e) for e in [enc, *enc.overflowing]]
    assert len(windows) > 2
    outputs = []
    for w in windows:
        tags = []
        for s, e in w.offsets:
            word = text[s:e].lower()
            tags.append("B-Disease" if word in ("diabetes", "hypertension") else "B-Chemical" if s == 0 < e else "O")
        outputs.append(logits_for(tags, pad=2))
    ((offsets, probs),) = merge_windows(1, windows, outputs)
    spans = decode_spans(text, offsets, probs, TYPES)
    got = [text[s.start : s.end] for s in spans]
    assert got == ["Cafe\u0301", "diabetes", "hypertension"]  # the combining accent stays with its letter
    assert spans[1].start == text.index("diabetes")


@pytest.mark.parametrize(
    "text",
    ["", "   \n\t  ", "x" * 100_000, "é" * 3 + "\u0301\u0301", "😀" * 50, "中" * 300, "a\u200bb"],
    ids=["empty", "whitespace", "one-100k-token", "combining", "emoji", "cjk", "zero-width"],
)
def test_bad_input_gives_valid_offsets(text: str, ner_plugin: Any) -> None:
    windows = ner_plugin.session.windows([text])
    rng = np.random.default_rng(0)
    outputs = [rng.normal(size=(len(w.ids) + 1, len(TAGS))).astype(np.float32) for w in windows]
    (spans,) = ner_plugin.task.spans([text], windows, outputs)
    for span in spans:
        assert 0 <= span.start < span.end <= len(text)
    # And through the whole plugin: nothing crashes, every evidence span lies inside the note.
    result = ner_plugin.predict(document(text or " "))
    for p in result.predictions:
        assert 0 <= p.evidence.start <= p.evidence.end <= len(p.source.original)


# --- coding ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index() -> ConceptIndex:
    concepts = merge_names(
        [
            ("Disease", "D003924", "type 2 diabetes mellitus", "Diabetes Mellitus, Type 2"),
            ("Disease", "D003924", "type 2 diabetes", ""),
            ("Disease", "D003924", "NIDDM", ""),
            ("Disease", "D006973", "hypertension", "Hypertension"),
            ("Disease", "D002637", "chest pain", "Chest Pain"),
            ("Disease", "D001943", "breast cancer", "Breast Neoplasms"),
            ("Chemical", "D001241", "aspirin", "Aspirin"),
            ("Chemical", "D001241", "acetylsalicylic acid", ""),
            ("Disease", "D006333", "heart failure", "Heart Failure"),
        ]
    )
    data, arrays = build_index(concepts, "https://www.nlm.nih.gov/mesh")
    return ConceptIndex(data, arrays, threshold=0.55)


def test_normalize() -> None:
    assert normalize("Type-2  Diabetes, MELLITUS.") == "type 2 diabetes mellitu" or normalize(
        "Type-2  Diabetes, MELLITUS."
    ) == normalize("type 2 diabetes mellitus")
    assert normalize("Breast cancers") == normalize("breast cancer")
    assert normalize("arteries") == normalize("artery")
    assert normalize("") == ""


def test_coding_falls_back_exact_normalized_nearest_then_abstains(index: ConceptIndex) -> None:
    exact = index.code("NIDDM", "Disease")
    assert (exact.code, exact.method, exact.score) == ("D003924", "exact", 1.0)
    assert exact.display == "Diabetes Mellitus, Type 2"
    normalized = index.code("Type-2 Diabetes", "Disease")
    assert (normalized.code, normalized.method) == ("D003924", "normalized")
    plural = index.code("breast cancers", "Disease")
    assert (plural.code, plural.method) == ("D001943", "normalized")
    near = index.code("diabetes mellitus type II", "Disease")
    assert (near.code, near.method) == ("D003924", "nearest")
    assert 0.55 <= near.score < 1.0
    misspelt = index.code("hypertensoin", "Disease")
    assert (misspelt.code, misspelt.method) == ("D006973", "nearest")
    unrelated = index.code("myocardial infarction", "Disease")
    assert unrelated.code is None and unrelated.method == "none" and unrelated.score < 0.55
    # The type restricts the dictionary: "aspirin" is no Disease, and the nearest Disease name is far away.
    assert index.code("aspirin", "Disease").code is None
    assert index.code("aspirin", "Chemical").code == "D001241"
    assert index.code("", "Disease").code is None
    assert index.code("😀中文", "Disease").code is None


# --- the lookup plugin ----------------------------------------------------------------------------------------

WORDS = {
    "no": "O",
    "chest": "B-Disease",
    "pain": "I-Disease",
    "history": "O",
    "of": "O",
    "type": "B-Disease",
    "2": "I-Disease",
    "diabetes": "I-Disease",
    "aspirin": "B-Chemical",
    "mother": "O",
    "has": "O",
    "breast": "B-Disease",
    "cancer": "I-Disease",
    "hypertension": "B-Disease",
    "takes": "O",
    "possible": "O",
    "pneumonia": "B-Disease",
    "infarction": "B-Disease",
    "and": "O",
}


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    chars = sorted({c for w in WORDS for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,;"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS, *chars, *(f"##{c}" for c in chars)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def _lookup_model(path: Path, tok: Any) -> None:
    onnx = pytest.importorskip("onnx", reason="building the lookup model needs onnx (the [train] extra)")
    from onnx import TensorProto, helper, numpy_helper

    table = np.full((tok.get_vocab_size(), len(TAGS)), -3.0, dtype=np.float32)
    table[:, 0] = 3.0
    for word, tag in WORDS.items():
        row = tok.token_to_id(word)
        table[row] = -3.0
        table[row, TAGS.index(tag)] = 3.0
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", len(TAGS)])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def build_ner_bundle(folder: Path, max_tokens: int = 8, stride: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    _lookup_model(folder / "model.fp32.onnx", tok)
    concepts = merge_names(
        [
            ("Disease", "D002637", "chest pain", "Chest Pain"),
            ("Disease", "D003924", "type 2 diabetes", "Diabetes Mellitus, Type 2"),
            ("Disease", "D001943", "breast cancer", "Breast Neoplasms"),
            ("Disease", "D006973", "hypertension", "Hypertension"),
            ("Disease", "D011014", "pneumonia", "Pneumonia"),
            ("Chemical", "D001241", "aspirin", "Aspirin"),
        ]
    )
    data, arrays = build_index(concepts, "https://www.nlm.nih.gov/mesh")
    (folder / "concepts.json").write_text(json.dumps(data), encoding="utf-8")
    np.savez_compressed(folder / "concept_vectors.npz", **arrays)
    shutil.copyfile(DEFAULT_LEXICON, folder / "assertion.json")
    fields = {
        "schema_version": 1,
        "name": "lookup-ner",
        "version": "0.0.1",
        "task": "token-classification",
        "license": "Apache-2.0",
        "intended_use": "Tests only.",
        "outputs": {
            "resource": "Condition",
            "labels": [
                {"label": "Disease", "system": "https://www.nlm.nih.gov/mesh", "code": "C", "display": "Diseases"},
                {"label": "Chemical", "system": "https://www.nlm.nih.gov/mesh", "code": "D", "display": "Chemicals"},
            ],
        },
        "tokenizer": {"file": "tokenizer.json", "max_tokens": max_tokens, "stride": stride},
        "entities": {
            "resources": {"Disease": "Condition", "Chemical": "MedicationStatement"},
            "system": "https://www.nlm.nih.gov/mesh",
            "coding_threshold": 0.6,
        },
    }
    variant = {
        "file": "model.fp32.onnx",
        "precision": "fp32",
        "providers": ["CPUExecutionProvider"],
        "input_names": ["input_ids"],
        "output_names": ["logits"],
        "opset": 13,
    }
    write_manifest(folder, fields, variants=[variant])
    return folder


@pytest.fixture(scope="module")
def ner_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ner_bundle(tmp_path_factory.mktemp("lookup-ner") / "bundle")


@pytest.fixture(scope="module")
def ner_plugin(ner_bundle: Path) -> Any:
    return load_plugin(ner_bundle, allow_unsigned=True)


def document(note: str, rid: str = "note-1") -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": rid,
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(note.encode()).decode(),
                }
            }
        ],
    }


def validate(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_the_issue_example(ner_plugin: Any) -> None:
    note = "no chest pain, history of type 2 diabetes"
    result = ner_plugin.predict(document(note))
    assert ner_plugin.session.windows([note]).__len__() > 1  # 8-token windows: the note spans several
    got = {p.entity.text: p for p in result.predictions if p.entity is not None}
    assert set(got) == {"chest pain", "type 2 diabetes"}
    pain, diabetes = got["chest pain"], got["type 2 diabetes"]
    assert (pain.code, pain.entity.negated, pain.entity.historical) == ("D002637", True, False)
    assert (diabetes.code, diabetes.entity.negated, diabetes.entity.historical) == ("D003924", False, True)
    for p in (pain, diabetes):
        assert note[p.evidence.start : p.evidence.end] == p.entity.text
        assert p.system == "https://www.nlm.nih.gov/mesh"
    resources = result.resources()
    for resource in resources:
        validate(resource)
    conditions = {r["code"]["coding"][0]["code"]: r for r in resources if r["resourceType"] == "Condition"}
    refuted = conditions["D002637"]
    assert refuted["verificationStatus"]["coding"][0]["code"] == "refuted"
    assert "clinicalStatus" not in refuted
    historical = conditions["D003924"]
    assert historical["verificationStatus"]["coding"][0]["code"] == "provisional"
    # History is not cure: no clinicalStatus is inferred (never "resolved"), the onset lies before the note.
    assert "clinicalStatus" not in historical
    assert "onsetPeriod" in historical or "onsetString" in historical
    (assertion,) = [e for e in historical["extension"] if e["url"] == ASSERTION_URL]
    assert {"url": "historical", "valueBoolean": True} in assertion["extension"]
    (span,) = [e for e in refuted["extension"] if e["url"] == EVIDENCE_SPAN_URL]
    parts = {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in span["extension"]}
    assert (parts["start"], parts["end"], parts["snippet"]) == (3, 13, "chest pain")


def test_family_possible_and_medication_resources(ner_plugin: Any) -> None:
    note = "Mother has breast cancer.\nPossible pneumonia. Takes aspirin. No aspirin."
    result = ner_plugin.predict(document(note))
    resources = result.resources()
    for resource in resources:
        validate(resource)
    (family,) = [r for r in resources if r["resourceType"] == "FamilyMemberHistory"]
    assert family["relationship"]["coding"][0]["code"] == "MTH"
    assert family["condition"][0]["code"]["coding"][0]["code"] == "D001943"
    assert family["patient"] == {"reference": "Patient/p1"}
    (pneumonia,) = [r for r in resources if r["resourceType"] == "Condition"]
    assert pneumonia["verificationStatus"]["coding"][0]["code"] == "unconfirmed"
    statuses = sorted(r["status"] for r in resources if r["resourceType"] == "MedicationStatement")
    assert statuses == ["not-taken", "unknown"]
    provenance = next(r for r in resources if r["resourceType"] == "Provenance")
    assert len(provenance["target"]) == 4


def test_uncoded_mentions_are_kept_but_not_written(ner_plugin: Any) -> None:
    result = ner_plugin.predict(document("infarction"))
    (p,) = result.predictions
    assert p.entity is not None and not p.entity.coded and p.code == ""
    assert p.entity.coding_method == "none"
    assert result.resources() == []


def test_caller_can_override_the_lexicon(ner_bundle: Path) -> None:
    plugin = load_plugin(ner_bundle, allow_unsigned=True)
    note = "hypertension nope"
    (before,) = plugin.predict(document(note)).predictions
    assert before.entity is not None and not before.entity.negated
    plugin.task.lexicon = Lexicon.from_dict({"triggers": {"negated": {"backward": ["nope"]}}})
    (after,) = plugin.predict(document(note)).predictions
    assert after.entity is not None and after.entity.negated


def test_a_bad_terminology_file_fails_at_load(ner_bundle: Path, tmp_path: Path) -> None:
    from fhirplug.bundle import read_manifest

    broken = tmp_path / "broken"
    shutil.copytree(ner_bundle, broken)
    (broken / "concept_vectors.npz").write_bytes(b"not numpy")
    manifest, _ = read_manifest(broken)
    fields = manifest.model_dump(mode="json", exclude={"variants", "files"})
    write_manifest(broken, fields, variants=[v.model_dump(mode="json", exclude={"sha256"}) for v in manifest.variants])
    with pytest.raises(PluginError, match="terminology files cannot be read"):
        load_plugin(broken, allow_unsigned=True)


def test_manifest_entities_must_name_hashed_files(ner_bundle: Path) -> None:
    raw = json.loads((ner_bundle / "manifest.json").read_text())
    del raw["files"]["concepts.json"]
    with pytest.raises(ManifestError, match=r"entities\.concepts file 'concepts\.json' has no sha256"):
        parse_manifest(raw)
    raw = json.loads((ner_bundle / "manifest.json").read_text())
    raw["entities"]["resources"]["Gene"] = "Condition"
    with pytest.raises(ManifestError, match=r"not in outputs\.labels"):
        parse_manifest(raw)


def test_text_classification_manifest_bytes_do_not_mention_entities() -> None:
    manifest = parse_manifest((Path(__file__).parents[1] / "fixtures/plugins/tiny-notes/manifest.json").read_bytes())
    assert manifest.entities is None
    assert "entities" not in manifest.to_json()


def test_writer_without_entities_is_unchanged(ner_plugin: Any) -> None:
    # A text-classification prediction next to an entity one: the former keeps its Condition shape exactly.
    result = ner_plugin.predict(document("hypertension"))
    (p,) = result.predictions
    from dataclasses import replace

    plain = replace(p, entity=None)
    model = ModelInfo("m", "1", "ab" * 32, "text-classification", "int8", "CPUExecutionProvider", "Condition")
    (condition, _device, _provenance) = build_resources([plain], result.sources, model)
    assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"
    assert all(e["url"] != ASSERTION_URL for e in condition["extension"])


def test_a_span_that_is_only_an_assertion_cue_is_dropped() -> None:
    from fhirplug._assertion import assert_spans
    from fhirplug.tasks.token_classification import Span, drop_cues

    text = "No fever, no cough."
    # A model that tags the cue itself ("No" as a Disease) would hide the negation from the assertion step.
    spans = [
        Span(0, 2, "Disease", 0.6),
        Span(3, 8, "Disease", 0.9),
        Span(10, 12, "Disease", 0.6),
        Span(13, 18, "Disease", 0.9),
    ]
    kept = drop_cues(text, spans, Lexicon.default())
    assert [text[s.start : s.end] for s in kept] == ["fever", "cough"]
    assert [a.negated for a in assert_spans(text, [(s.start, s.end) for s in kept])] == [True, True]
