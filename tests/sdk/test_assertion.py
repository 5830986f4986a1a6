"""Assertion (ConText/NegEx style) on hand-written sentences with their expected statuses.

Each case: the sentence, the mention, and the expected status: ``present``, ``negated``, ``possible``,
``historical``, ``family``, ``family-negated`` or ``other``. The rules must get at least 90% right; the failures
are listed so a regression says which sentences moved. These were what the rules were tuned on: a regression
check, not a held-out score. The held-out score is on ``tests/fixtures/assertion/context_eval.jsonl`` (written
separately, split into dev and test halves; see ``benchmarks/assertion_eval.py``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fhirplug._assertion import Assertion, Lexicon, assert_spans, sentences

CASES: list[tuple[str, str, str]] = [
    ("no chest pain, history of type 2 diabetes", "chest pain", "negated"),
    ("no chest pain, history of type 2 diabetes", "type 2 diabetes", "historical"),
    ("Patient denies fever or chills.", "fever", "negated"),
    ("Patient denies fever or chills.", "chills", "negated"),
    ("She has hypertension.", "hypertension", "present"),
    ("No evidence of pneumonia.", "pneumonia", "negated"),
    ("Negative for malignancy.", "malignancy", "negated"),
    ("Pulmonary embolism was ruled out.", "Pulmonary embolism", "negated"),
    ("Without signs of infection.", "infection", "negated"),
    ("Possible pneumonia in the left lower lobe.", "pneumonia", "possible"),
    ("Findings suspicious for appendicitis.", "appendicitis", "possible"),
    ("Rule out myocardial infarction.", "myocardial infarction", "possible"),
    ("Stroke cannot be excluded.", "Stroke", "possible"),
    ("Sepsis is likely.", "Sepsis", "possible"),
    ("Concern for deep vein thrombosis.", "deep vein thrombosis", "possible"),
    ("History of asthma.", "asthma", "historical"),
    ("Past medical history of hepatitis C.", "hepatitis C", "historical"),
    ("Status post appendectomy for appendicitis.", "appendicitis", "historical"),
    ("He had tuberculosis years ago.", "tuberculosis", "historical"),
    ("Previous myocardial infarction in 2010.", "myocardial infarction", "historical"),
    ("Mother has breast cancer.", "breast cancer", "family"),
    ("Family history of colon cancer.", "colon cancer", "family"),
    ("His father died of a heart attack.", "heart attack", "family"),
    ("Diabetes runs in the family.", "Diabetes", "family"),
    ("Sister with lupus.", "lupus", "family"),
    ("No family history of colon cancer.", "colon cancer", "family-negated"),
    ("His wife has influenza.", "influenza", "other"),
    ("No fever, but reports cough.", "cough", "present"),
    ("No fever, but reports cough.", "fever", "negated"),
    ("Denies nausea; complains of headache.", "headache", "present"),
    ("Denies nausea; complains of headache.", "nausea", "negated"),
    ("No pain however there is swelling.", "swelling", "present"),
    ("No rash except for mild erythema.", "erythema", "present"),
    ("The patient has no history of seizures.", "seizures", "negated"),
    ("Chest x-ray shows no change in the effusion.", "effusion", "present"),
    ("Gram negative bacteremia.", "bacteremia", "present"),
    ("Pneumonia has resolved.", "Pneumonia", "historical"),
    ("Asthma, not ruled out.", "Asthma", "possible"),
    ("Patient presents with dyspnea.", "dyspnea", "present"),
    ("Aspirin was not given.", "Aspirin", "present"),
    ("No aspirin or warfarin.", "warfarin", "negated"),
    ("Hypertension.\nNo diabetes.", "Hypertension", "present"),
    ("Hypertension.\nNo diabetes.", "diabetes", "negated"),
    ("Known history of COPD, currently with pneumonia.", "COPD", "historical"),
    ("She is free of cancer.", "cancer", "negated"),
    ("Migraine is unlikely.", "Migraine", "possible"),
    ("Heart failure, no edema.", "Heart failure", "present"),
    ("Heart failure, no edema.", "edema", "negated"),
]


def status(a: Assertion) -> str:
    if a.subject == "family":
        return "family-negated" if a.negated else "family"
    if a.subject == "other":
        return "other"
    if a.negated:
        return "negated"
    if a.possible:
        return "possible"
    if a.historical:
        return "historical"
    return "present"


def test_assertion_accuracy_on_written_sentences() -> None:
    assert len(CASES) >= 40
    failures = []
    for sentence, mention, expected in CASES:
        start = sentence.index(mention)
        (got,) = assert_spans(sentence, [(start, start + len(mention))])
        if status(got) != expected:
            failures.append(f"{sentence!r} / {mention!r}: expected {expected}, got {status(got)} {got.triggers}")
    accuracy = 1 - len(failures) / len(CASES)
    print(f"assertion accuracy {accuracy:.3f} ({len(CASES) - len(failures)}/{len(CASES)})")
    print("\n".join(failures))
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f}; failures:\n" + "\n".join(failures)


def test_sentences_and_terminators_bound_the_scope() -> None:
    text = "No fever. Cough present."
    assert sentences(text) == [(0, 9), (9, 24)]
    (cough,) = assert_spans(text, [(10, 15)])
    assert not cough.negated
    # A trigger inside the mention itself is part of the mention, not a trigger.
    (mention,) = assert_spans("no-reflow phenomenon", [(0, 20)])
    assert mention == Assertion()


def test_relationship_codes_and_triggers_are_reported() -> None:
    text = "Father with diabetes."
    (a,) = assert_spans(text, [(12, 20)])
    assert (a.subject, a.relationship) == ("family", "FTH")
    assert a.triggers == ("family:father",)


def test_max_scope_words_limits_the_reach() -> None:
    lexicon = Lexicon.from_dict({"max_scope_words": 2, "triggers": {"negated": {"forward": ["no"]}}})
    text = "no fever or chills or cough"
    spans = [(3, 8), (12, 18), (22, 27)]
    negated = [a.negated for a in assert_spans(text, spans, lexicon)]
    assert negated == [True, False, False]


def test_a_bad_lexicon_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown assertion category"):
        Lexicon.from_dict({"triggers": {"maybe": {"forward": ["perhaps"]}}})
    with pytest.raises(ValueError, match="expected forward or backward"):
        Lexicon.from_dict({"triggers": {"negated": {"sideways": ["no"]}}})


@pytest.mark.parametrize("text", ["", "   ", "😀 no 中文", "no" * 1000])
def test_odd_text_does_not_crash(text: str) -> None:
    assert assert_spans(text, [(0, min(len(text), 1))]) is not None


def test_hypothetical_is_reported_in_as_dict() -> None:
    (a,) = assert_spans("Return if chest pain recurs.", [(10, 20)])
    assert a.as_dict()["hypothetical"] is True
    assert a.triggers == ("hypothetical:return if",)
    (b,) = assert_spans("Chest pain recurs.", [(0, 10)])
    assert b.as_dict()["hypothetical"] is False


# Explicit hypotheticals (ConText's hypothetical temporality): a condition or an instruction, never a finding,
# and never a negation either ("return if chest pain" does not say the patient has no chest pain).
HYPOTHETICAL = [
    ("Return if chest pain recurs.", "chest pain"),
    ("If the wheezing worsens, use the inhaler.", "wheezing"),
    ("Should she develop a rash, stop the amoxicillin.", "rash"),
    ("Should the patient develop hematuria, repeat the urinalysis.", "hematuria"),
    ("Watch for bleeding at the puncture site.", "bleeding"),
    ("Call if you have a fever above 38.", "fever"),
    ("Ibuprofen as needed for knee pain.", "knee pain"),
    ("Come back if the vomiting returns.", "vomiting"),
    ("In case of chest tightness, use nitroglycerin.", "chest tightness"),
    ("Monitor for hyperkalemia on the new dose.", "hyperkalemia"),
    ("If her husband's test shows hepatitis B, she will be vaccinated.", "hepatitis B"),
]


@pytest.mark.parametrize(("text", "mention"), HYPOTHETICAL, ids=[t for t, _ in HYPOTHETICAL])
def test_explicit_hypotheticals_are_hypothetical_and_not_negated(text: str, mention: str) -> None:
    start = text.index(mention)
    (a,) = assert_spans(text, [(start, start + len(mention))])
    assert a.hypothetical, a.triggers
    assert not a.negated and not a.historical, a.triggers


@pytest.mark.parametrize(
    ("text", "mention"),
    [
        ("Even if the cough settles, finish the antibiotics for the pneumonia.", "pneumonia"),
        ("She asked if her anemia explains the fatigue.", "anemia"),
        ("He returned with worsening cellulitis.", "cellulitis"),
        ("She should keep taking lisinopril for her hypertension.", "hypertension"),
        ("If the rash spreads, return; he currently has impetigo.", "impetigo"),
        ("Return if fever develops, otherwise treat the otitis media.", "otitis media"),
    ],
)
def test_pseudo_triggers_and_terminators_keep_a_fact_a_fact(text: str, mention: str) -> None:
    start = text.index(mention)
    (a,) = assert_spans(text, [(start, start + len(mention))])
    assert a == Assertion(), a.triggers


def test_a_negated_history_is_negated_not_historical() -> None:
    for text, mention in [
        ("No prior history of gout.", "gout"),
        ("Denies any history of asthma.", "asthma"),
        ("She has no history of stroke.", "stroke"),
    ]:
        start = text.index(mention)
        (a,) = assert_spans(text, [(start, start + len(mention))])
        assert (a.negated, a.historical) == (True, False), (text, a.triggers)
    # Apart, the two still hold: the negation ends at the next trigger.
    text = "No wheezing, history of asthma."
    (wheeze, asthma) = assert_spans(text, [(3, 11), (24, 30)])
    assert (wheeze.negated, wheeze.historical, asthma.negated, asthma.historical) == (True, False, False, True)


def test_category_terminators_end_only_their_category() -> None:
    lexicon = Lexicon.from_dict(
        {
            "triggers": {"negated": {"forward": ["no"]}, "family": {"forward": ["mother"]}},
            "category_terminators": {"negated": ["diagnosed with"]},
        }
    )
    (flu,) = assert_spans("no fever, diagnosed with flu", [(25, 28)], lexicon)
    assert not flu.negated
    (cancer,) = assert_spans("mother diagnosed with cancer", [(22, 28)], lexicon)
    assert (cancer.subject, cancer.negated) == ("family", False)
    with pytest.raises(ValueError, match=r"category_terminators\.maybe: unknown assertion category"):
        Lexicon.from_dict({"triggers": {"negated": {"forward": ["no"]}}, "category_terminators": {"maybe": ["x"]}})
    with pytest.raises(ValueError, match="already listed"):
        Lexicon.from_dict({"triggers": {"negated": {"forward": ["no"]}}, "category_terminators": {"negated": ["no"]}})
    with pytest.raises(ValueError, match="category_terminators: expected an object"):
        Lexicon.from_dict({"triggers": {"negated": {"forward": ["no"]}}, "category_terminators": ["but"]})
    lexicon = Lexicon.from_dict({"triggers": {"negated": {"forward": ["no"]}, "hypothetical": {"forward": ["if"]}}})
    assert {p.text for p in lexicon.phrases if "hypothetical" in p.categories} == {"if"}


# ---- the held-out evaluation set ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
EVAL_SET = ROOT / "tests" / "fixtures" / "assertion" / "context_eval.jsonl"

#: Floors on the held-out (``test``) split, a little under what the default lexicon reaches there (measured by
#: ``python benchmarks/assertion_eval.py``): category → (precision, recall). Historical recall is the weak spot
#: (past events without a trigger phrase: "had a stroke in 2018", "last year").
FLOORS = {
    "negated": (0.9, 0.95),
    "possible": (0.95, 0.85),
    "historical": (0.95, 0.65),
    "hypothetical": (0.95, 0.8),
    "family": (0.95, 0.95),
    "other": (0.95, 0.8),
}


@pytest.fixture(scope="module")
def evaluation() -> ModuleType:
    spec = importlib.util.spec_from_file_location("assertion_eval", ROOT / "benchmarks" / "assertion_eval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_evaluation_set_is_well_formed_and_separate(evaluation: ModuleType) -> None:
    cases = evaluation.load_cases(EVAL_SET)
    assert len(cases) >= 150
    assert {c.split for c in cases} == {"dev", "test"}
    test = [c for c in cases if c.split == "test"]
    for category in evaluation.CATEGORIES:
        support = sum(evaluation.labels(c.expected)[category] for c in test)
        assert support >= 5, f"{category}: only {support} held-out sentences"
    assert {c.category for c in cases} >= {"pseudo", "terminator", "affirmed", "combination"}
    tuned_on = {sentence for sentence, _, _ in CASES}
    assert not tuned_on & {c.text for c in cases}, "the evaluation set must not reuse the tuning sentences"
    for c in cases:
        assert set(c.expected) == {"negated", "possible", "historical", "hypothetical", "subject", "relationship"}
        assert c.expected["subject"] in ("patient", "family", "other")
        assert (c.expected["relationship"] is None) == (c.expected["subject"] != "family"), c.text


def test_held_out_precision_and_recall_per_category(evaluation: ModuleType) -> None:
    result = evaluation.evaluate(evaluation.load_cases(EVAL_SET))
    low = []
    for category, (precision, recall) in FLOORS.items():
        got = result["test"][category]
        if got["precision"] < precision or got["recall"] < recall:
            low.append(f"{category}: P {got['precision']} (floor {precision}), R {got['recall']} (floor {recall})")
    errors = "\n".join(f"  {e['text']!r} / {e['target']!r}: {e['wrong']} {e['triggers']}" for e in result["errors"])
    assert not low, "\n".join(low) + "\nmisclassified:\n" + errors


def test_history_is_never_absence(evaluation: ModuleType) -> None:
    cases = evaluation.load_cases(EVAL_SET)
    historical = [c for c in cases if c.expected["historical"] and not c.expected["negated"]]
    assert len(historical) >= 20
    for case, got in zip(historical, evaluation.run(historical), strict=True):
        assert not got.negated, f"{case.text!r}: a history marked negated {got.triggers}"


def test_benchmark_script_writes_its_numbers(evaluation: ModuleType, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "assertion.json"
    assert evaluation.main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("$ python ")
    assert "hypothetical" in printed and "misclassified" in printed
    numbers = json.loads(out.read_text())
    assert set(numbers) >= {"dev", "test", "all", "errors"}
    assert numbers["all"]["sentences"] == numbers["dev"]["sentences"] + numbers["test"]["sentences"]
    assert numbers["test"]["hypothetical"]["support"] >= 5
