"""Assertion (ConText/NegEx style) on hand-written sentences with their expected statuses.

Each case: the sentence, the mention, and the expected status: ``present``, ``negated``, ``possible``,
``historical``, ``family``, ``family-negated`` or ``other``. The rules must get at least 90% right; the failures
are listed so a regression says which sentences moved.
"""

from __future__ import annotations

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
