"""Abbreviations defined in a note (Schwartz & Hearst 2003) and their use when coding a mention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fhirplug import load_plugin
from fhirplug._abbrev import abbreviations, find_abbreviations
from fhirplug._coding import ConceptIndex, build_index, merge_names
from fhirplug.predictions import TextSource
from tests.sdk.test_token_classification import TAGS, build_ner_bundle


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("Patients with Parkinson's disease (PD) were seen.", {"PD": "Parkinson's disease"}),
        (
            "acute myeloid leukemia (AML) and chronic lymphocytic leukaemia (CLL)",
            {
                "AML": "acute myeloid leukemia",
                "CLL": "chronic lymphocytic leukaemia",
            },
        ),
        ("a case of Creutzfeldt-Jakob disease (CJD) in 1990", {"CJD": "Creutzfeldt-Jakob disease"}),
        ("the 5-fluorouracil (5-FU) arm", {"5-FU": "5-fluorouracil"}),
        # Text after ";" or "," inside the parentheses is not part of the short form.
        ("given nitric oxide (NO; 20 ppm) daily", {"NO": "nitric oxide"}),
        # The shortest long form that holds the letters: "hemochromatosis" alone has both h's.
        ("Hereditary hemochromatosis (HH) is common.", {"HH": "hemochromatosis"}),
        # "SF (long form)": more than two words in the parentheses, a capital in the word before ...
        ("treated for PD (idiopathic Parkinson disease) since", {"PD": "Parkinson disease"}),
        # ... or more text in the parentheses than before them in the sentence.
        ("treated for PD (Parkinson disease) since", {"PD": "Parkinson disease"}),
        ("treated for pd (idiopathic Parkinson disease) since", {}),
    ],
)
def test_definitions_are_found(text: str, pairs: dict[str, str]) -> None:
    assert abbreviations(text) == pairs
    for pair in find_abbreviations(text):  # offsets point at the very strings
        assert text[pair.short_start : pair.short_start + len(pair.short_form)] == pair.short_form
        assert text[pair.long_start : pair.long_start + len(pair.long_form)] == pair.long_form


@pytest.mark.parametrize(
    "text",
    [
        "Levels were higher in the treated group (p < 0.05) than in controls.",
        "It was significant (p=0.05).",
        "We enrolled twelve patients (n = 12).",
        "The effect was seen in all groups (Figure 2).",
        "The first trial (1998) was long.",
        "It was the main reason (see below).",
        "A single letter (A) is no short form.",
        "The letters are not there (XYZ).",
        "Sentences end. Parkinson disease was seen. Then (PD) came.",  # the long form never crosses a sentence
        "unbalanced (parenthesis",
        "",
    ],
)
def test_asides_are_not_definitions(text: str) -> None:
    assert abbreviations(text) == {}


def test_the_first_definition_of_a_short_form_wins() -> None:
    text = "panic disorder (PD) and, later, Parkinson's disease (PD)."
    assert len(find_abbreviations(text)) == 2
    assert abbreviations(text) == {"PD": "panic disorder"}


def test_the_long_form_must_not_contain_the_short_form() -> None:
    assert abbreviations("the HIV infection (HIV) spread") == {}


# --- coding ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index() -> ConceptIndex:
    concepts = merge_names(
        [
            ("Disease", "D010300", "Parkinson's disease", "Parkinson Disease"),
            ("Disease", "D003924", "NIDDM", "Diabetes Mellitus, Type 2"),
            ("Disease", "D001714", "bipolar disorder", "Bipolar Disorder"),
        ]
    )
    data, arrays = build_index(concepts, "https://www.nlm.nih.gov/mesh")
    return ConceptIndex(data, arrays, threshold=0.6)


def test_a_defined_short_form_is_coded_as_its_long_form(index: ConceptIndex) -> None:
    alone = index.code("PD", "Disease")
    assert alone.code is None and alone.method == "none"
    coded = index.code("PD", "Disease", {"PD": "Parkinson's disease"})
    assert (coded.code, coded.method, coded.score) == ("D010300", "abbreviation", 1.0)
    assert coded.long_form == "Parkinson's disease" and coded.display == "Parkinson Disease"
    # A long form coded by its nearest neighbour passes its (lower) score on.
    near = index.code("PD", "Disease", {"PD": "Parkinsons diseases"})
    assert near.code == "D010300" and near.method == "abbreviation" and 0.6 <= near.score <= 1.0
    # The cache holds the mention alone: the note's abbreviations never leak into the next note.
    assert index.code("PD", "Disease").code is None


def test_a_dictionary_hit_wins_and_an_uncodable_long_form_changes_nothing(index: ConceptIndex) -> None:
    exact = index.code("NIDDM", "Disease", {"NIDDM": "bipolar disorder"})
    assert (exact.code, exact.method) == ("D003924", "exact")
    unknown = index.code("PD", "Disease", {"PD": "periodontal disease"})
    assert unknown.code is None and unknown.long_form is None
    # The type still restricts the dictionary: no Chemical is called Parkinson's disease.
    assert index.code("PD", "Chemical", {"PD": "Parkinson's disease"}).code is None


# --- through the token-classification task ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_plugin(
        build_ner_bundle(tmp_path_factory.mktemp("abbrev") / "bundle", max_tokens=64), allow_unsigned=True
    )


def _interpret(plugin: Any, text: str, words: set[str]) -> list[Any]:
    """The task's predictions when the model tags exactly ``words`` (every sub-word token of them) as Disease."""
    windows = plugin.session.windows([text])
    outputs = []
    for window in windows:
        tags = []
        for s, e in window.offsets:
            start = s
            while start > 0 and text[start - 1].isalnum():
                start -= 1
            end = e
            while end < len(text) and text[end].isalnum():
                end += 1
            if e <= s or text[start:end] not in words:
                tags.append("O")
            else:
                tags.append("B-Disease" if start == s else "I-Disease")
        logits = np.full((len(tags), len(TAGS)), -4.0, dtype=np.float32)
        for i, tag in enumerate(tags):
            logits[i, TAGS.index(tag)] = 4.0
        outputs.append(logits)
    source = TextSource("DocumentReference/n1", "DocumentReference", "DocumentReference.text", text, text)
    return list(plugin.task.interpret([source], windows, outputs))


def test_the_task_codes_a_short_form_defined_in_the_note(plugin: Any) -> None:
    text = "Known hypertension (HTN) since 2010. HTN is controlled."
    predictions = _interpret(plugin, text, {"hypertension", "HTN"})
    assert [p.entity.text for p in predictions] == ["hypertension", "HTN", "HTN"]
    for p in predictions[1:]:
        assert (p.code, p.entity.coded, p.entity.coding_method) == ("D006973", True, "abbreviation")
        assert p.entity.coding_score == 1.0 and p.details["long_form"] == "hypertension"
        assert p.display == "Hypertension"
    assert predictions[0].entity.coding_method == "exact" and "long_form" not in predictions[0].details


def test_the_task_can_code_mentions_alone(tmp_path: Path) -> None:
    plugin = load_plugin(build_ner_bundle(tmp_path / "bundle", max_tokens=64), allow_unsigned=True)
    plugin.task.resolve_abbreviations = False
    text = "Known hypertension (HTN) since 2010. HTN is controlled."
    predictions = _interpret(plugin, text, {"HTN"})
    assert [(p.entity.text, p.entity.coded, p.code) for p in predictions] == [("HTN", False, ""), ("HTN", False, "")]


def test_a_short_form_defined_in_another_note_is_not_resolved(plugin: Any) -> None:
    (p,) = _interpret(plugin, "HTN is controlled.", {"HTN"})
    assert not p.entity.coded and p.entity.coding_method == "none"
