from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fhirplug import load_plugin
from fhirplug._assertion import DEFAULT_LEXICON, Lexicon
from fhirplug._coding import ConceptIndex
from fhirplug.bundle import SIGNATURE_FILE, generate_keypair, verify_bundle, write_manifest
from fhirplug.errors import IntegrityError, ManifestError, PluginError, SignatureError, TaskError, UsageError
from tests.conftest import REPO


def _flip_one_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _resign(bundle: Path, key: Path | None) -> None:
    """Re-write the manifest of a bundle (keeping its fields), signed with ``key``."""
    raw = json.loads((bundle / "manifest.json").read_text())
    variants = [{k: v for k, v in spec.items() if k != "sha256"} for spec in raw.pop("variants")]
    raw.pop("files")
    write_manifest(bundle, raw, variants=variants, signing_key=key)


def test_unsigned_bundle_needs_permission(tiny_bundle: Path) -> None:
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle(tiny_bundle)
    verified = verify_bundle(tiny_bundle, allow_unsigned=True)
    assert verified.signed_by is None
    assert len(verified.manifest_sha256) == 64


@pytest.mark.parametrize("name", ["model.int8.onnx", "model.fp32.onnx", "tokenizer.json", "labels.json"])
def test_one_flipped_byte_is_named(tiny_bundle: Path, name: str) -> None:
    _flip_one_byte(tiny_bundle / name, at=100)
    with pytest.raises(IntegrityError, match=rf"{name}: sha256 is [0-9a-f]{{64}}, the manifest says"):
        verify_bundle(tiny_bundle, allow_unsigned=True)
    with pytest.raises(IntegrityError, match=name):
        load_plugin(tiny_bundle, allow_unsigned=True)


def test_missing_model_file_is_named(tiny_bundle: Path) -> None:
    (tiny_bundle / "model.fp32.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"missing: model\.fp32\.onnx"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_extra_model_file_is_named(tiny_bundle: Path) -> None:
    (tiny_bundle / "model.fp16.onnx").write_bytes(b"not declared")
    with pytest.raises(IntegrityError, match=r"not declared in the manifest: model\.fp16\.onnx"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a plugin bundle directory"):
        verify_bundle(tmp_path / "nowhere", allow_unsigned=True)
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        verify_bundle(tmp_path, allow_unsigned=True)


def test_signed_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    generate_keypair(tmp_path / "b.key", tmp_path / "b.pub")
    _resign(tiny_bundle, tmp_path / "a.key")
    assert (tiny_bundle / SIGNATURE_FILE).exists()
    verified = verify_bundle(tiny_bundle, trusted_keys=[tmp_path / "b.pub", tmp_path / "a.pub"])
    assert verified.signed_by is not None
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(tiny_bundle, trusted_keys=[tmp_path / "b.pub"])
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify_bundle(tiny_bundle)
    # A signed bundle never falls back to "unsigned allowed".
    with pytest.raises(SignatureError):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_edited_manifest_breaks_the_signature(tiny_bundle: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    _resign(tiny_bundle, tmp_path / "a.key")
    manifest = tiny_bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace("Tiny test plugin", "Tiny tampered plugin"))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(tiny_bundle, trusted_keys=[tmp_path / "a.pub"])


def test_rewriting_without_a_key_drops_a_stale_signature(tiny_bundle: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    _resign(tiny_bundle, tmp_path / "a.key")
    _resign(tiny_bundle, None)
    assert not (tiny_bundle / SIGNATURE_FILE).exists()


# --- every file the runtime reads from a bundle is checked against its schema at load (GitHub issue 9) ---------

NER = REPO / "plugins" / "bc5cdr-ner" / "bundle"
needs_ner = pytest.mark.skipif(not NER.is_dir(), reason="the bc5cdr-ner bundle is not committed in this checkout")


def _rewrite(bundle: Path, name: str, data: bytes) -> None:
    """Replace one file and re-hash the manifest: an internally consistent bundle with a bad file."""
    (bundle / name).write_bytes(data)
    _resign(bundle, None)


@pytest.fixture
def ner_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bc5cdr-ner"
    shutil.copytree(NER, target)
    return target


@needs_ner
def test_a_lexicon_without_triggers_fails_the_load(ner_copy: Path) -> None:
    _rewrite(ner_copy, "assertion.json", b'{"x": 1}')
    with pytest.raises(PluginError, match=r"assertion\.json: unknown key\(s\) \['x'\]"):
        load_plugin(ner_copy, allow_unsigned=True)


@needs_ner
def test_a_bad_concepts_file_fails_the_load_naming_it(ner_copy: Path) -> None:
    concepts = json.loads((ner_copy / "concepts.json").read_text())
    del concepts["concepts"][3]["names"]
    _rewrite(ner_copy, "concepts.json", json.dumps(concepts).encode())
    with pytest.raises(PluginError, match=r"concepts\.json: .*concepts\[3\]: expected exactly the keys"):
        load_plugin(ner_copy, allow_unsigned=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"triggers": {"possible": {"forward": ["maybe"]}}}, "no negated phrase"),
        ({"pseudo": ["no change"]}, "missing key 'triggers'"),
        ({"triggers": {"negated": {"forward": ["no"]}}, "terminator": ["but"]}, r"unknown key\(s\) \['terminator'\]"),
        ({"triggers": {"negated": {"forward": "no"}}}, r"triggers\.negated\.forward: expected a list"),
        ({"triggers": {"negated": {"forward": ["no"]}}, "max_scope_words": True}, "max_scope_words"),
        ({"triggers": {"negated": {"forward": ["no"]}}, "max_scope_words": -1}, "max_scope_words"),
        ({"triggers": {"negated": {"forward": ["no"]}}, "pseudo": [3]}, r"pseudo: 3 is not a phrase|pseudo: '3'"),
        ({"triggers": {"negated": {"forward": ["no"]}}, "family_relationships": {"mother": 1}}, "family_relation"),
        ({"triggers": {"negated": {"forward": ["no"]}}, "version": 2}, "lexicon version 1"),
        ({"triggers": []}, "triggers: expected an object"),
    ],
)
def test_lexicon_schema(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TaskError, match=message):
        Lexicon.from_bytes(json.dumps(data).encode(), "assertion.json")
    with pytest.raises(UsageError, match=message):  # also a ValueError, as from_dict always raised
        Lexicon.from_dict(data)


@pytest.mark.parametrize("path", [DEFAULT_LEXICON, NER / "assertion.json"], ids=["default", "bc5cdr-ner"])
def test_shipped_lexicons_pass_their_schema(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    raw = json.loads(path.read_text())
    lexicon = Lexicon.load(path)
    listed = {p.lower().strip() for by_dir in raw["triggers"].values() for ps in by_dir.values() for p in ps}
    assert {p.text for p in lexicon.phrases if p.kind == "trigger"} == listed
    assert {p.text for p in lexicon.phrases if p.kind == "terminator"} == {t.lower() for t in raw["terminators"]}
    assert lexicon.relationships["mother"] == raw["family_relationships"]["mother"]


def _vectors(**change: np.ndarray) -> bytes:
    with np.load(NER / "concept_vectors.npz") as arrays:
        data = {k: arrays[k] for k in arrays.files}
    data.update(change)
    out = io.BytesIO()
    np.savez(out, **data)
    return out.getvalue()


@needs_ner
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {"indptr": a["indptr"][:-1]}, r"indptr has \d+ entries, expected rows \+ 1"),
        (lambda a: {"indices": np.where(a["indices"] == 0, len(a["ngrams"]), a["indices"])}, "indices must lie in"),
        (lambda a: {"row_concept": a["row_concept"] + 1}, "row_concept must name each row's concept"),
        (lambda a: {"indices": a["indices"].astype(np.float32)}, r"indices: expected a 1-d array of kind 'iu'"),
        (lambda a: {"idf": a["idf"][:-1]}, r"idf has \d+ entries, ngrams"),
        (lambda a: {"extra": a["idf"]}, r"unknown array\(s\) \['extra'\]"),
        (lambda a: {"data": np.full_like(a["data"], np.inf)}, "finite"),
    ],
    ids=["indptr", "indices", "row_concept", "dtype", "idf", "extra", "inf"],
)
def test_concept_vectors_schema(change: Any, message: str) -> None:
    with np.load(NER / "concept_vectors.npz") as arrays:
        edits = change({k: arrays[k] for k in arrays.files})
    concepts = (NER / "concepts.json").read_bytes()
    assert ConceptIndex.from_bytes(concepts, _vectors(), 0.6).system == "https://www.nlm.nih.gov/mesh"
    with pytest.raises(TaskError, match=rf"concept_vectors\.npz: .*{message}"):
        ConceptIndex.from_bytes(concepts, _vectors(**edits), 0.6)


@needs_ner
def test_pickled_vectors_are_refused() -> None:
    with pytest.raises(TaskError, match=r"concept_vectors\.npz: .*not an \.npz archive of plain arrays"):
        ConceptIndex.from_bytes((NER / "concepts.json").read_bytes(), _vectors(idf=np.array([{}])), 0.6)


@needs_ner
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(system="MeSH"), "system: expected the code system's canonical URI"),
        (lambda c: c.update(ngram=0), "ngram: expected an integer 1..8"),
        (lambda c: c["concepts"][0].update(names=["ok", ""]), r"concepts\[0\]\.names"),
        (lambda c: c["concepts"][1].update(code=7), r"concepts\[1\]\.code"),
        (lambda c: c.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    ],
    ids=["system", "ngram", "names", "code", "extra"],
)
def test_concepts_schema(edit: Any, message: str) -> None:
    concepts = json.loads((NER / "concepts.json").read_text())
    edit(concepts)
    with pytest.raises(TaskError, match=rf"concepts\.json: .*{message}"):
        ConceptIndex.from_bytes(json.dumps(concepts).encode(), _vectors(), 0.6)
