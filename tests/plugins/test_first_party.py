"""Every first-party plugin in plugins/: its recipe, card, examples and — where a built bundle is committed — the
real bundle's decisions.

- **Examples, in full**: each example input yields exactly the predictions ``expected.json`` names for each of its
  source notes — every code and every absence; for an entity plugin also the mention, the resource the writer
  makes of it and its assertion (present, negated, historical, family, possible). ``expected.json`` was written by
  reading each note as a clinician would, not by copying a plugin's output. A code the plugin withholds
  (``calibration.withheld``, with its reason in the card) is never predicted, and is not expected from it.
- **Abstention** (text-classification): the off-domain sentences of ``tests/fixtures/ood/off_domain.jsonl`` get no
  code and an informational "abstained" issue; the in-domain examples are answered.
- **Evidence** (text-classification): removing a prediction's evidence span from its note lowers that code's
  probability.
- **Batch independence**: a note's probabilities are the same alone and among 16 other notes (to 1e-6).
- **The card is the runtime's**: with ``../shared/data`` beside the checkout (CI; a user's clone skips), the
  bundle's stored test split (``test_split.json``), re-scored through the public runtime API, gives the card's test
  metrics to 4 decimals, and no shipped code is predicted for more than 80% of the test notes unless at least 80%
  of them carry it.

A recipe whose training data is present is also built end to end with the tiny random BERT in place of its base
model (a few steps), so a recipe that no longer matches its data fails here, not in a 30-minute real build.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fhirplug import load_plugin
from fhirplug.bundle import verify_bundle
from fhirplug.fhir.reader import read_fhir
from fhirplug.plugin import Plugin, PredictionResult
from fhirplug.predictions import Prediction, TextSource
from tests.conftest import FIXTURES, REPO, SHARED_DATA
from tests.sdk.helpers import document_reference

PLUGINS = sorted(p for p in (REPO / "plugins").iterdir() if (p / "recipe.toml").is_file())
NAMES = [p.name for p in PLUGINS]


def _recipe(plugin: Path) -> dict[str, Any]:
    return tomllib.loads((plugin / "recipe.toml").read_text(encoding="utf-8"))


TEXT_PLUGINS = [p for p in PLUGINS if _recipe(p)["task"] == "text-classification"]
TEXT_NAMES = [p.name for p in TEXT_PLUGINS]
#: What an entity mention is, as expected.json says it (see ``_entries``).
ASSERTIONS = ("present", "negated", "historical", "family", "possible")
OFF_DOMAIN = [
    json.loads(line)["text"]
    for line in (FIXTURES / "ood" / "off_domain.jsonl").read_text(encoding="utf-8").splitlines()
    if line.strip()
]
#: The share of the off-domain sentences a text-classification plugin must refuse.
MIN_ABSTAINED = 0.95
#: Test texts per runtime call when re-scoring (each call is held to the runtime's budget; a note's scores do not
#: depend on its batch-mates, so the chunking changes no number).
CHUNK = 32
#: No shipped code may be predicted for more of the test notes than this, unless at least as many carry it.
MAX_PREDICTED_SHARE = 0.8


def _label_codes(plugin: Path) -> dict[str, str]:
    """label → code, from the recipe's ``labels_file`` or its ``[[labels]]``."""
    recipe = _recipe(plugin)
    if "labels_file" in recipe:
        rows = csv.DictReader((plugin / recipe["labels_file"]).read_text(encoding="utf-8").splitlines())
        return {row["label"]: row["code"] for row in rows}
    return {spec["label"]: spec["code"] for spec in recipe["labels"]}


def _expected(plugin: Path) -> dict[str, dict[str, list[Any]]]:
    data: dict[str, dict[str, list[Any]]] = json.loads((plugin / "expected.json").read_text(encoding="utf-8"))
    return data


# --- the committed bundles, each loaded once per module -------------------------------------------------------


@dataclass
class _Bundles:
    """Each committed bundle loaded once (int8 on the CPU), with its examples' results and re-scored test split."""

    plugins: dict[str, Plugin] = field(default_factory=dict)
    examples: dict[str, dict[str, PredictionResult]] = field(default_factory=dict)
    rescored: dict[str, _Rescored] = field(default_factory=dict)

    def plugin(self, folder: Path) -> Plugin:
        if not (folder / "bundle").is_dir():
            pytest.skip(f"{folder.name}: no committed bundle (built by its recipe)")
        if folder.name not in self.plugins:
            self.plugins[folder.name] = load_plugin(folder / "bundle", allow_unsigned=True, provider="cpu")
        return self.plugins[folder.name]

    def results(self, folder: Path) -> dict[str, PredictionResult]:
        """Each example file's result (read and predicted on its own, as a user would)."""
        plugin = self.plugin(folder)
        if folder.name not in self.examples:
            self.examples[folder.name] = {
                path.name: plugin.predict_files([path]) for path in sorted((folder / "examples").glob("*.json"))
            }
        return self.examples[folder.name]


@pytest.fixture(scope="module")
def bundles() -> _Bundles:
    return _Bundles()


# --- recipes, cards, expectations ------------------------------------------------------------------------------


def test_there_are_first_party_plugins() -> None:
    assert {"medical-abstracts-mesh", "synthea-conditions", "bc5cdr-ner"} <= set(NAMES)


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_every_plugin_has_examples_a_card_and_expectations(plugin: Path) -> None:
    """expected.json names every example and, per example, each source note's full expected predictions."""
    examples = sorted((plugin / "examples").glob("*.json"))
    assert examples, f"{plugin.name} has no example FHIR input in examples/"
    assert (plugin / "README.md").is_file(), f"{plugin.name} has no model card"
    expected = _expected(plugin)
    assert set(expected) == {e.name for e in examples}, "expected.json must name every example, and only those"
    recipe = _recipe(plugin)
    for name, notes in expected.items():
        assert isinstance(notes, dict) and notes, f"{name}: expected.json maps each source note to its predictions"
        assert any(notes.values()), f"{name}: every example must promise at least one code"
        for reference, items in notes.items():
            assert re.fullmatch(r"[A-Za-z]+/[A-Za-z0-9\-.]+|urn:uuid:[0-9a-f-]+", reference), reference
            assert isinstance(items, list), f"{name} {reference}: a list of predictions"
            if recipe["task"] == "text-classification":
                codes = set(_label_codes(plugin).values())
                assert all(isinstance(c, str) and c in codes for c in items), f"{name} {reference}: {items}"
                assert len(set(items)) == len(items), f"{name} {reference}: a code twice"
                if not recipe.get("output", {}).get("multi_label", False):
                    assert len(items) <= 1, f"{name} {reference}: a multi-class plugin gives one code a note"
                continue
            kinds = {*recipe["entities"]["resources"].values(), "FamilyMemberHistory"}
            for item in items:
                assert set(item) == {"code", "resource", "assertion", "mention"}, f"{name} {reference}: {item}"
                assert re.fullmatch(r"[CD]\d{6,9}", item["code"]), f"{name}: {item['code']} is not a MeSH ID"
                assert item["resource"] in kinds and item["assertion"] in ASSERTIONS, f"{name}: {item}"
                assert (item["assertion"] == "family") == (item["resource"] == "FamilyMemberHistory"), item


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_recipe_is_valid(plugin: Path) -> None:
    pytest.importorskip("fhirplug_convert.recipe")
    from fhirplug_convert.recipe import load_recipe

    recipe = load_recipe(plugin / "recipe.toml")
    assert recipe.name == plugin.name
    assert {spec.system for spec in recipe.labels} <= {
        "http://snomed.info/sct",
        "https://www.nlm.nih.gov/mesh",
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://loinc.org",
    }


# --- the examples, in full ------------------------------------------------------------------------------------


def _codes(result: PredictionResult) -> dict[str, list[str]]:
    """Per source note of the input (every one, with or without a prediction): its predicted codes, sorted."""
    found: dict[str, list[str]] = {source.reference: [] for source in result.sources}
    for p in result.predictions:
        found[p.source.reference].append(p.code)
    return {reference: sorted(codes) for reference, codes in found.items()}


def _entry(p: Prediction) -> dict[str, str] | None:
    """A mention as expected.json says it, or None when the writer records nothing for it (uncoded,
    hypothetical, someone else's: see fhirplug.fhir.writer)."""
    entity = p.entity
    assert entity is not None
    if not entity.coded or not p.code or entity.hypothetical or entity.subject == "other":
        return None
    family = entity.subject == "family"
    assertion = (
        "family"
        if family
        else "negated"
        if entity.negated
        else "possible"
        if entity.possible
        else "historical"
        if entity.historical
        else "present"
    )
    resource = "FamilyMemberHistory" if family else entity.resource
    return {"code": p.code, "resource": resource, "assertion": assertion, "mention": entity.text}


def _entries(result: PredictionResult) -> dict[str, list[dict[str, str]]]:
    found: dict[str, list[dict[str, str]]] = {source.reference: [] for source in result.sources}
    for p in result.predictions:
        entry = _entry(p)
        if entry is not None:
            found[p.source.reference].append(entry)
    return {reference: sorted(items, key=_key) for reference, items in found.items()}


def _key(item: dict[str, str]) -> str:
    return json.dumps(item, sort_keys=True)


def _written(entry: dict[str, str]) -> tuple[str, str, str, str | None]:
    """The resource the writer makes of an expected mention: (type, code, status, clinical status)."""
    kind, code, assertion = entry["resource"], entry["code"], entry["assertion"]
    if kind == "FamilyMemberHistory":
        return kind, code, "partial", None
    if kind == "MedicationStatement":
        return kind, code, "not-taken" if assertion == "negated" else "unknown", None
    status = {"negated": "refuted", "possible": "unconfirmed"}.get(assertion, "provisional")
    return kind, code, status, "active" if assertion in ("present", "possible") else None


def _resource_facts(resource: dict[str, Any]) -> tuple[str, str, str, str | None] | None:
    kind = resource["resourceType"]
    if kind == "Condition":
        clinical = resource.get("clinicalStatus", {}).get("coding", [{}])[0].get("code")
        verification = resource["verificationStatus"]["coding"][0]["code"]
        return kind, resource["code"]["coding"][0]["code"], verification, clinical
    if kind == "MedicationStatement":
        return kind, resource["medicationCodeableConcept"]["coding"][0]["code"], resource["status"], None
    if kind == "FamilyMemberHistory":
        return kind, resource["condition"][0]["code"]["coding"][0]["code"], resource["status"], None
    return None


def _known_misses(plugin: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """plugins/<name>/known_misses.json: per example and note, what the committed bundle gets wrong and why.

    The expectations stay what a clinician reads in the note; a listed miss must be exactly what the bundle does
    (a bundle that starts getting it right, or wrong differently, fails until the file is updated), and the
    model card prints the list."""
    path = plugin / "known_misses.json"
    if not path.is_file():
        return {}
    misses = json.loads(path.read_text(encoding="utf-8"))
    for notes in misses.values():
        for entry in notes.values():
            assert set(entry) == {"missing", "extra", "why"} and entry["why"], f"{path}: {entry}"
    return dict(misses)


def _rebuilt(loaded: Plugin) -> bool:
    """Built by this converter version: static int8 (batch-independent) and the stored test split."""
    mode = loaded.manifest.parity.get("variants", {}).get("int8", {}).get("quantization", {}).get("mode")
    return "test_split.json" in loaded.manifest.files and mode in ("static", None)


def _require_rebuilt(plugin: Path, loaded: Plugin) -> None:
    if not _rebuilt(loaded):
        pytest.skip(
            f"{plugin.name}: the committed bundle predates this converter (dynamic int8, no test_split.json), so "
            "it promises neither batch independence nor a stored test split: rebuild pending (issue 11)"
        )


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_committed_bundle_yields_exactly_the_expected_predictions(plugin: Path, bundles: _Bundles) -> None:
    """Codes and absences: per source note, the predictions equal expected.json's (not a subset of them)."""
    loaded = bundles.plugin(plugin)
    assert verify_bundle(plugin / "bundle", allow_unsigned=True).manifest.name == plugin.name
    expected = _expected(plugin)
    entity = loaded.manifest.task == "token-classification"
    withheld = {s.code for s in loaded.manifest.outputs.labels if s.label in loaded.manifest.calibration.withheld}
    misses = _known_misses(plugin)
    wrong = []
    for name, result in bundles.results(plugin).items():
        assert not [i for i in result.issues if i.code == "exception"], f"{name}: {result.issues}"
        if entity:
            got: dict[str, list[Any]] = dict(_entries(result))
            want: dict[str, list[Any]] = {ref: sorted(items, key=_key) for ref, items in expected[name].items()}
            facts = Counter(f for f in map(_resource_facts, result.resources()) if f is not None)
            written = Counter(_written(e) for items in want.values() for e in items)
            for known in misses.get(name, {}).values():  # what the documented misses write instead
                written -= Counter(_written(e) for e in known["missing"])
                written += Counter(_written(e) for e in known["extra"])
            if facts != written:
                wrong.append(
                    f"{name}: FHIR written but not expected {sorted(facts - written, key=str)}, expected "
                    f"but not written {sorted(written - facts, key=str)}"
                )
        else:
            got = dict(_codes(result))
            want = {ref: sorted(c for c in codes if c not in withheld) for ref, codes in expected[name].items()}
            if not any(want.values()):
                wrong.append(f"{name}: the plugin withholds every code the example expects ({sorted(withheld)})")
        if got == want:
            continue
        if set(got) != set(want):
            wrong.append(f"{name}: the source notes are {sorted(got)}, expected.json names {sorted(want)}")
            continue
        for ref in want:
            missing = [x for x in want[ref] if x not in got[ref]]
            extra = [x for x in got[ref] if x not in want[ref]]
            known = misses.get(name, {}).get(ref)
            if known is not None and (missing, extra) == (known["missing"], known["extra"]):
                continue  # a documented miss of this bundle (known_misses.json says why); still exactly this one
            if missing or extra:
                wrong.append(f"{name} {ref}: missing {json.dumps(missing)}; not expected {json.dumps(extra)}")
    assert not wrong, "\n".join(wrong)


# --- abstention (text-classification) ---------------------------------------------------------------------------


def _abstained(result: PredictionResult, reference: str) -> bool:
    return any(
        issue.severity == "information"
        and issue.code == "informational"
        and issue.diagnostics.startswith(f"{reference} ")
        and "abstained" in issue.diagnostics
        for issue in result.issues
    )


@pytest.mark.parametrize("plugin", TEXT_PLUGINS, ids=TEXT_NAMES)
def test_off_domain_sentences_get_no_code_and_an_abstention_issue(plugin: Path, bundles: _Bundles) -> None:
    loaded = bundles.plugin(plugin)
    assert loaded.manifest.calibration.abstention is not None, (
        f"{plugin.name}: the bundle has no calibration.abstention (built before abstention: rebuild it)"
    )
    resources = [document_reference(text, id_=f"off-domain-{i}") for i, text in enumerate(OFF_DOMAIN)]
    result = loaded.predict(resources, source_name="off_domain.jsonl")
    references = [f"DocumentReference/off-domain-{i}" for i in range(len(OFF_DOMAIN))]
    assert [s.reference for s in result.sources] == references
    coded = defaultdict(list)
    for p in result.predictions:
        coded[p.source.reference].append(f"{p.code} p={p.probability:.3f}")
    for reference in references:  # an abstention issue is only ever about a text that got no code
        assert not (reference in coded and _abstained(result, reference)), reference
    refused = [r for r in references if r not in coded and _abstained(result, r)]
    answered = [
        f"{OFF_DOMAIN[i]!r} → {coded[r] or 'no code, no abstention issue'}"
        for i, r in enumerate(references)
        if r not in refused
    ]
    assert len(refused) >= MIN_ABSTAINED * len(references), (
        f"{plugin.name} abstained on {len(refused)}/{len(references)} off-domain sentences (needs "
        f"{MIN_ABSTAINED:.0%}); answered: " + "; ".join(answered)
    )


@pytest.mark.parametrize("plugin", TEXT_PLUGINS, ids=TEXT_NAMES)
def test_the_in_domain_examples_are_answered_not_abstained(plugin: Path, bundles: _Bundles) -> None:
    bundles.plugin(plugin)
    for name, result in bundles.results(plugin).items():
        for source in result.sources:
            assert not _abstained(result, source.reference), f"{name} {source.reference}: " + "; ".join(
                i.diagnostics for i in result.issues if i.diagnostics.startswith(source.reference)
            )
            assert any(p.source is source for p in result.predictions), f"{name} {source.reference}: no code"


# --- evidence (text-classification) -----------------------------------------------------------------------------


def _text_span(source: TextSource, start: int, end: int) -> tuple[int, int]:
    """The span of ``source.text`` whose characters come from ``[start, end)`` of ``source.original``."""
    if source.offsets is None:
        return start, end
    inside = [i for i, at in enumerate(source.offsets) if start <= at < end]
    assert inside and inside == list(range(inside[0], inside[-1] + 1)), f"span {start}-{end} is not contiguous"
    return inside[0], inside[-1] + 1


@pytest.mark.parametrize("plugin", TEXT_PLUGINS, ids=TEXT_NAMES)
def test_removing_the_evidence_span_lowers_the_codes_probability(plugin: Path, bundles: _Bundles) -> None:
    loaded = bundles.plugin(plugin)
    column = {spec.label: k for k, spec in enumerate(loaded.manifest.outputs.labels)}
    checked = 0
    for name, result in bundles.results(plugin).items():
        for p in result.predictions:
            where = f"{name} {p.source.reference} {p.code}"
            assert p.details.get("evidence") == "occlusion", f"{where}: {p.details.get('evidence_reason')}"
            start, end = _text_span(p.source, p.evidence.start, p.evidence.end)
            text = p.source.text
            assert 0 < end - start < len(text.strip()), f"{where}: the evidence is the whole note"
            full, without = loaded.predict_texts([text, text[:start] + text[end:]])[:, column[p.label]]
            assert without < full, f"{where}: p {full:.4f} → {without:.4f} without {text[start:end]!r}"
            # The same numbers as the prediction's own (a note's scores do not depend on its batch-mates).
            assert full == pytest.approx(p.probability, abs=1e-6), where
            assert p.evidence.contribution == pytest.approx(full - without, abs=1e-5), where
            checked += 1
    assert checked, f"{plugin.name}: no example prediction to check"


# --- batch independence ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_a_note_scores_the_same_alone_and_among_16_others(plugin: Path, bundles: _Bundles) -> None:
    loaded = bundles.plugin(plugin)
    _require_rebuilt(plugin, loaded)
    notes = [source.text for result in bundles.results(plugin).values() for source in result.sources]
    assert notes
    for note in notes:
        mates = ([n for n in notes if n != note] + OFF_DOMAIN)[:16]
        batch = [*mates[:8], note, *mates[8:]]
        alone = np.asarray(loaded.predict_texts([note])[0], dtype=np.float64)
        among = np.asarray(loaded.predict_texts(batch)[8], dtype=np.float64)
        assert alone.shape == among.shape and alone.size and np.isfinite(alone).all()
        gap = float(np.abs(alone - among).max())
        assert gap <= 1e-6, f"{plugin.name}: {note[:60]!r} moves by {gap:.2e} among 16 other notes"


# --- the stored test split, re-scored through the runtime -------------------------------------------------------


@dataclass
class _Rescored:
    """A bundle's test split as the converter read it, and what the runtime makes of it."""

    examples: list[dict[str, Any]]
    texts: list[str]
    #: text-classification: [n, labels] probabilities and [n, labels] 0/1 gold labels.
    probs: np.ndarray | None = None
    truth: np.ndarray | None = None
    #: token-classification: gold and predicted (text index, start, end, type) and (text index, type, code).
    gold_mentions: set[tuple[int, int, int, str]] = field(default_factory=set)
    gold_concepts: set[tuple[int, str, str]] = field(default_factory=set)
    mentions: set[tuple[int, int, int, str]] = field(default_factory=set)
    concepts: set[tuple[int, str, str]] = field(default_factory=set)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _data_files(plugin: Path, split: dict[str, Any]) -> dict[str, Path]:
    """The test split's data files (named relative to the folder of the recipe's data path), hash-checked;
    skips when they are not here (../shared/data is beside CI's checkout, not a user's clone)."""
    data = _recipe(plugin)["data"]
    parents = [(plugin / data[k]).resolve().parent for k in ("path", "train", "validation", "test") if k in data]
    files = {}
    for item in split["data"]:
        found = next((parent / item["file"] for parent in parents if (parent / item["file"]).is_file()), None)
        if found is None:
            pytest.skip(
                f"{plugin.name}: the test split's data file {item['file']} is not in {SHARED_DATA} "
                "(../shared/data is beside CI's checkout, not a user's clone)"
            )
        if _sha256(found) != item["sha256"]:
            pytest.skip(f"{plugin.name}: {found} is not the file the bundle was built from (sha256 differs)")
        files[item["file"]] = found
    return files


def _pubtator(path: Path, types: set[str]) -> dict[str, tuple[str, list[tuple[int, int, str, tuple[str, ...]]]]]:
    """PMID → (title + " " + abstract, mentions of ``types`` with their concept IDs), as the converter reads it."""
    docs = {}
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        pmid, title, abstract, mentions = "", None, None, []
        for line in lines:
            if "|t|" in line[:40] and title is None:
                pmid, _, title = line.partition("|t|")
            elif "|a|" in line[:40] and abstract is None:
                abstract = line.partition("|a|")[2]
            else:
                cells = line.split("\t")
                if len(cells) >= 6 and cells[4] in types:
                    codes = tuple(c for c in cells[5].split("|") if c and c != "-1")
                    mentions.append((int(cells[1]), int(cells[2]), cells[4], codes))
        docs[pmid] = (f"{title} {abstract}" if abstract is not None else title or "", mentions)
    return docs


def _read_test_split(plugin: Path, loaded: Plugin) -> _Rescored:
    _require_rebuilt(plugin, loaded)
    split = json.loads((plugin / "bundle" / "test_split.json").read_text(encoding="utf-8"))
    files = _data_files(plugin, split)
    recipe = _recipe(plugin)
    data, examples = recipe["data"], split["examples"]
    texts: list[str] = []
    rescored = _Rescored(examples, texts)
    if data["format"] == "csv":
        tables = {
            name: list(csv.DictReader(path.read_text(encoding="utf-8").splitlines())) for name, path in files.items()
        }
        for example in examples:
            name, _, number = example["where"].rpartition(" row ")
            row = tables[name][int(number) - 2]  # CSV rows count the header as row 1
            assert "label_separator" in data or row[data["label"]].strip() in example["labels"], example
            texts.append(row[data["text"]])
    elif data["format"] == "jsonl":
        lines = {name: path.read_text(encoding="utf-8").splitlines() for name, path in files.items()}
        for example in examples:
            name, _, number = example["where"].rpartition(" line ")
            texts.append(json.loads(lines[name][int(number) - 1])[data["text"]])
    elif data["format"] == "fhir":  # the runtime's own reader: "where" is the note's reference
        found: dict[str, list[str]] = defaultdict(list)
        for path in files.values():
            read = read_fhir(path.read_bytes(), resource_types=loaded.manifest.inputs.resource_types)
            for source in read.sources:
                found[source.reference].append(source.text)
        for example in examples:
            texts.append(found[example["where"]].pop(0))
    elif data["format"] == "pubtator":
        types = {spec.label for spec in loaded.manifest.outputs.labels}
        docs = {name: _pubtator(path, types) for name, path in files.items()}
        for i, example in enumerate(examples):
            name, _, pmid = example["where"].rpartition(" document ")
            text, mentions = docs[name][pmid]
            texts.append(text)
            rescored.gold_mentions |= {(i, s, e, t) for s, e, t, _ in mentions}
            rescored.gold_concepts |= {(i, t, c) for _, _, t, codes in mentions for c in codes}
    else:
        pytest.fail(f"{plugin.name}: no re-scorer for data format {data['format']!r}")
    digest = hashlib.sha256(b"".join(t.encode("utf-8") + b"\0" for t in texts)).hexdigest()
    assert digest == split["texts_sha256"], f"{plugin.name}: the texts read are not the ones the converter scored"
    return rescored


def _rescored(plugin: Path, bundles: _Bundles) -> _Rescored:
    loaded = bundles.plugin(plugin)
    if plugin.name in bundles.rescored:
        return bundles.rescored[plugin.name]
    rescored = _read_test_split(plugin, loaded)
    texts = rescored.texts
    if loaded.manifest.task == "text-classification":
        labels = [spec.label for spec in loaded.manifest.outputs.labels]
        chunks = [loaded.predict_texts(texts[i : i + CHUNK]) for i in range(0, len(texts), CHUNK)]
        rescored.probs = np.concatenate(chunks)
        assert np.isfinite(rescored.probs).all(), "a test text was refused (budget) or failed"
        rescored.truth = np.zeros((len(texts), len(labels)), dtype=bool)
        for i, example in enumerate(rescored.examples):
            rescored.truth[i, [labels.index(label) for label in example["labels"]]] = True
    else:  # predict_texts gives token probabilities; spans and codes come from predict_sources
        sources = [TextSource(f"test/{i}", "DocumentReference", "text", t, t) for i, t in enumerate(texts)]
        issues: list[Any] = []
        predictions = []
        for i in range(0, len(sources), CHUNK):
            predictions += loaded.predict_sources(sources[i : i + CHUNK], issues=issues)
        assert not issues, issues[:3]
        index = {id(s): i for i, s in enumerate(sources)}
        for p in predictions:
            assert p.entity is not None
            i = index[id(p.source)]
            rescored.mentions.add((i, p.entity.start, p.entity.end, p.label))
            if p.code:
                rescored.concepts.add((i, p.label, p.code))
    bundles.rescored[plugin.name] = rescored
    return rescored


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _decisions(loaded: Plugin, probs: np.ndarray) -> np.ndarray:
    """[n, labels] codes the runtime gives each text (its decision rule; abstention aside: predict_texts does not
    abstain, so these are at least the runtime's codes)."""
    calibration, labels = loaded.manifest.calibration, loaded.manifest.outputs.labels
    chosen = np.zeros(probs.shape, dtype=bool)
    for i, row in enumerate(probs):
        if loaded.manifest.outputs.multi_label:
            for k, spec in enumerate(labels):
                limit = calibration.thresholds.get(spec.label, calibration.default_threshold)
                chosen[i, k] = spec.label not in calibration.withheld and row[k] >= limit
            continue
        top = int(np.argmax(row))
        limit = calibration.thresholds.get(labels[top].label, 0.0)
        chosen[i, top] = labels[top].label not in calibration.withheld and row[top] >= max(
            limit, calibration.min_probability
        )
    return chosen


def _classification_metrics(loaded: Plugin, probs: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """The card's test metrics (converter.evaluate.classification_metrics' rule, recomputed in numpy).

    Multi-label: a code is predicted at or above its manifest threshold (a withheld code never); ``accuracy`` is
    exact match. Multi-class: the top class, right when it is any of the note's gold labels (a note filed under
    two labels and predicted one of them is fully right; predicted neither, it misses both).
    """
    labels = loaded.manifest.outputs.labels
    if loaded.manifest.outputs.multi_label:
        calibration = loaded.manifest.calibration
        limits = np.array(
            [
                np.inf
                if s.label in calibration.withheld
                else calibration.thresholds.get(s.label, calibration.default_threshold)
                for s in labels
            ]
        )
        predicted, scored = probs >= limits, truth
    else:
        top = probs.argmax(axis=1)
        predicted = np.zeros_like(truth)
        predicted[np.arange(len(top)), top] = True
        hit = truth[np.arange(len(top)), top]
        scored = np.where(hit[:, None], predicted, truth)
    tp = (predicted & scored).sum(axis=0)
    fp = (predicted & ~scored).sum(axis=0)
    fn = (~predicted & scored).sum(axis=0)
    per_label = {
        s.label: {**_prf(int(tp[k]), int(fp[k]), int(fn[k])), "support": int(truth[:, k].sum())}
        for k, s in enumerate(labels)
    }
    return {
        "accuracy": float((predicted == scored).all(axis=1).mean()),
        "macro_f1": float(np.mean([v["f1"] for v in per_label.values()])),
        "micro_f1": _prf(int(tp.sum()), int(fp.sum()), int(fn.sum()))["f1"],
        "per_label": per_label,
    }


def _same(got: float, card: float) -> bool:
    # To 4 decimals: the card holds round(x, 4); a value on a rounding tie (0.65625) may round either way.
    return abs(got - card) <= 5e-5 + 1e-9


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_the_stored_test_split_rescored_by_the_runtime_gives_the_cards_metrics(plugin: Path, bundles: _Bundles) -> None:
    loaded = bundles.plugin(plugin)
    rescored = _rescored(plugin, bundles)
    metrics = json.loads((plugin / "bundle" / "metrics.json").read_text(encoding="utf-8"))
    assert len(rescored.texts) == metrics["splits"]["test"]
    card = metrics["test"][loaded.variant]
    wrong = []
    if rescored.probs is not None and rescored.truth is not None:
        got = _classification_metrics(loaded, rescored.probs, rescored.truth)
        for name in ("accuracy", "macro_f1", "micro_f1"):
            if not _same(got[name], card[name]):
                wrong.append(f"{name}: runtime {got[name]:.4f}, card {card[name]}")
        for label, row in got["per_label"].items():
            stored = card["per_label"][label]
            for name in ("precision", "recall", "f1", "support"):
                if not _same(row[name], stored[name]):
                    wrong.append(f"{label} {name}: runtime {row[name]:.4f}, card {stored[name]}")
    else:
        for measure, gold, pred, width in (
            ("mentions", rescored.gold_mentions, rescored.mentions, 3),
            ("concepts", rescored.gold_concepts, rescored.concepts, 1),
        ):
            kinds = {spec.label for spec in loaded.manifest.outputs.labels}
            for kind in [*sorted(kinds), "micro"]:
                g = {x for x in gold if kind == "micro" or x[width] == kind}
                p = {x for x in pred if kind == "micro" or x[width] == kind}
                got = _prf(len(g & p), len(p - g), len(g - p))
                for name in ("precision", "recall", "f1"):
                    if not _same(got[name], card[measure][kind][name]):
                        wrong.append(
                            f"{measure} {kind} {name}: runtime {got[name]:.4f}, card {card[measure][kind][name]}"
                        )
    assert not wrong, f"{plugin.name} {loaded.variant}: " + "; ".join(wrong)


def _notes_per_code(concepts: set[tuple[int, str, str]]) -> Counter[str]:
    """How many texts each code occurs in."""
    return Counter(code for _, code in {(i, code) for i, _, code in concepts})


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_no_shipped_code_is_predicted_for_almost_every_test_note(plugin: Path, bundles: _Bundles) -> None:
    loaded = bundles.plugin(plugin)
    rescored = _rescored(plugin, bundles)
    n = len(rescored.texts)
    shares: dict[str, tuple[float, float]] = {}  # code → (share predicted, share carrying it)
    if rescored.probs is not None and rescored.truth is not None:
        chosen = _decisions(loaded, rescored.probs)
        for k, spec in enumerate(loaded.manifest.outputs.labels):
            if spec.label not in loaded.manifest.calibration.withheld:
                shares[spec.code] = (float(chosen[:, k].mean()), float(rescored.truth[:, k].mean()))
    else:
        predicted, carried = _notes_per_code(rescored.concepts), _notes_per_code(rescored.gold_concepts)
        shares = {code: (predicted[code] / n, carried[code] / n) for code in predicted}
    assert shares, f"{plugin.name}: the plugin ships no code (every one is withheld)"
    over = {
        code: f"predicted for {rate:.0%} of {n} test notes, carried by {prevalence:.0%}"
        for code, (rate, prevalence) in shares.items()
        if rate > MAX_PREDICTED_SHARE and prevalence < MAX_PREDICTED_SHARE
    }
    assert not over, f"{plugin.name}: {over}"


# --- the recipe still builds ------------------------------------------------------------------------------------


@pytest.mark.train
@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_recipe_builds_with_a_tiny_model(plugin: Path, tiny_base: Path, tmp_path: Path) -> None:
    from fhirplug_convert import convert
    from fhirplug_convert.recipe import load_recipe

    recipe = load_recipe(plugin / "recipe.toml")
    data = recipe.data.path or recipe.data.train
    if data is None or not data.exists():
        pytest.skip(f"{plugin.name}: training data {data} is not here (../shared/data is beside CI's checkout)")
    result = convert(
        plugin / "recipe.toml",
        tmp_path / "bundle",
        progress=False,
        base_model=str(tiny_base),
        max_tokens=32,
        stride=8,
        max_steps=3,
        max_train_examples=48,
        variants=["fp32"],
        allow_drop=[],
    )
    manifest = verify_bundle(result.bundle, allow_unsigned=True).manifest
    assert manifest.name == plugin.name
    assert [spec.code for spec in manifest.outputs.labels] == [spec.code for spec in recipe.labels]
    predicted = load_plugin(result.bundle, allow_unsigned=True).predict_files(
        sorted((plugin / "examples").glob("*.json"))
    )
    assert predicted.sources  # the examples are readable by this plugin's inputs
