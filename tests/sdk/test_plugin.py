from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirplug import load_plugin
from fhirplug.errors import PluginError, PluginNotFoundError
from fhirplug.fhir.writer import AI_MODEL_CARD_PROFILE
from tests.conftest import TINY_PLUGIN
from tests.sdk.helpers import collection, document_reference

AIAST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"}


def test_probabilities_match_the_torch_reference(tiny_plugin, tiny_expected) -> None:
    got = tiny_plugin.predict_texts([e["text"] for e in tiny_expected])
    np.testing.assert_allclose(got, [e["probabilities"] for e in tiny_expected], atol=1e-4)


def test_int8_is_close_to_fp32(tiny_expected) -> None:
    plugin = load_plugin(TINY_PLUGIN, allow_unsigned=True)
    assert (plugin.variant, plugin.provider) == ("int8", "CPUExecutionProvider")
    got = plugin.predict_texts([e["text"] for e in tiny_expected])
    np.testing.assert_allclose(got, [e["probabilities"] for e in tiny_expected], atol=0.03)


def test_predict_document_reference(tiny_plugin) -> None:
    text = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."
    result = tiny_plugin.predict(document_reference(text))
    assert not result.issues
    assert [p.code for p in result.predictions] == ["44054006"]
    (p,) = result.predictions
    assert p.system == "http://snomed.info/sct"
    assert p.evidence.reference == "DocumentReference/note-1"
    assert p.evidence.element == "DocumentReference.content[0].attachment"
    # The sentence whose removal lowers the probability most (occlusion), not the whole window.
    assert text[p.evidence.start : p.evidence.end] == "Type 2 diabetes, elevated HbA1c on metformin."
    assert p.details["evidence"] == "occlusion"
    assert 0.5 <= p.probability <= 1.0


def test_evidence_points_at_the_window_that_says_it(tiny_plugin, tiny_expected) -> None:
    long_text = tiny_expected[3]["text"]
    result = tiny_plugin.predict(document_reference(long_text))
    asthma = next(p for p in result.predictions if p.label == "asthma")
    span = long_text[asthma.evidence.start : asthma.evidence.end]
    assert "asthma" in span
    assert asthma.evidence.start > 0  # not the first window
    assert asthma.details["windows"] == tiny_expected[3]["windows"]


def test_per_code_threshold_applies(tiny_plugin) -> None:
    # asthma has a 0.4 threshold in the manifest, the others the 0.5 default.
    result = tiny_plugin.predict(document_reference("asthma with wheezing"))
    asthma = next(p for p in result.predictions if p.label == "asthma")
    assert asthma.details["threshold"] == 0.4
    probs = tiny_plugin.predict_texts(["asthma with wheezing"])[0]
    expected = {
        code
        for code, prob, limit in zip(["44054006", "38341003", "195967001"], probs, [0.5, 0.5, 0.4], strict=True)
        if prob >= limit
    }
    assert {p.code for p in result.predictions} == expected


def test_fhir_output_validates_and_is_labelled(tiny_plugin) -> None:
    result = tiny_plugin.predict(
        collection(
            document_reference("type 2 diabetes on metformin", id_="a"),
            document_reference("uses albuterol inhaler, asthma with wheezing", id_="b"),
        )
    )
    bundle = result.to_fhir("transaction")
    get_fhir_model_class("Bundle").model_validate(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("RiskAssessment") == len(result.predictions) >= 2
    assert kinds.count("Provenance") == 1 and kinds.count("Device") == 1
    # Idempotent by id: every generated entry is PUT Type/<deterministic id>, nothing conditional.
    assert all(
        e["request"] == {"method": "PUT", "url": f"{e['resource']['resourceType']}/{e['resource']['id']}"}
        for e in bundle["entry"]
    )
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "DocumentReference":  # the model card: written by people, not AI
            assert entry["resource"]["meta"]["profile"] == [AI_MODEL_CARD_PROFILE]
            continue
        assert any(AIAST.items() <= s.items() for s in entry["resource"]["meta"]["security"]), entry
    risk = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment")
    assert risk["subject"] == {"reference": "Patient/p1"}
    assert risk["encounter"] == {"reference": "Encounter/e1"}
    provenance = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance")
    assert len(provenance["target"]) == len(result.predictions)
    assert {e["what"]["reference"] for e in provenance["entity"] if e["role"] == "source"} == {
        "DocumentReference/a",
        "DocumentReference/b",
    }
    # The model card is the other entity (AIProvenance: what the output derives from), by its fullUrl.
    (card,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    assert [e["what"]["reference"] for e in provenance["entity"] if e["role"] == "derivation"] == [card["fullUrl"]]


def test_ndjson_output(tiny_plugin) -> None:
    result = tiny_plugin.predict(document_reference("high blood pressure, hypertension on lisinopril"))
    lines = result.to_ndjson().splitlines()
    assert [json.loads(line)["resourceType"] for line in lines].count("RiskAssessment") == len(result.predictions)


def test_bad_entry_does_not_stop_the_good_ones(tiny_plugin) -> None:
    bad = document_reference("x", id_="bad")
    bad["content"][0]["attachment"]["data"] = "%%% not base64 %%%"
    result = tiny_plugin.predict(collection(document_reference("type 2 diabetes", id_="good"), bad))
    assert {p.evidence.reference for p in result.predictions} == {"DocumentReference/good"}
    assert result.has_errors
    (issue,) = [i for i in result.issues if i.is_error]
    assert issue.expression and issue.expression[0].startswith("Bundle.entry[1]")
    outcome = result.outcome()
    get_fhir_model_class("OperationOutcome").model_validate(outcome)


def test_threads_give_the_same_answers(tiny_plugin) -> None:
    texts = [
        f"note {i}: " + ("type 2 diabetes. " if i % 2 else "asthma with wheezing. ") * (1 + i % 7) for i in range(40)
    ]
    serial = tiny_plugin.predict_texts(texts)
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda t: tiny_plugin.predict_texts([t])[0], texts))
    np.testing.assert_allclose(np.stack(parallel), serial, atol=1e-5)


def test_label_count_mismatch_fails_at_load(tiny_bundle: Path) -> None:
    from fhirplug.bundle import write_manifest

    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    raw["outputs"]["labels"] = raw["outputs"]["labels"][:2]
    raw["calibration"]["thresholds"] = {}
    variants = [{k: v for k, v in spec.items() if k != "sha256"} for spec in raw.pop("variants")]
    raw.pop("files")
    write_manifest(tiny_bundle, raw, variants=variants)
    with pytest.raises(PluginError, match=r"logits of shape \[batch, 2\].*outputs \['batch', 3\]"):
        load_plugin(tiny_bundle, allow_unsigned=True, variant="fp32")


def test_unknown_plugin_name() -> None:
    with pytest.raises(PluginNotFoundError, match="no such bundle directory"):
        load_plugin("no-such-plugin-anywhere", allow_unsigned=True)


def test_predict_many_is_one_run_with_issues_named_by_input(tiny_plugin) -> None:
    text = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."
    result = tiny_plugin.predict_many(
        [
            ("first.json", document_reference(text, id_="a")),
            ("second.json", b"{broken"),
            ("third.json", document_reference(text, id_="c")),
        ]
    )
    assert [p.evidence.reference for p in result.predictions] == ["DocumentReference/a", "DocumentReference/c"]
    assert [(i.source, i.code) for i in result.issues] == [("second.json", "structure")]
    kinds = [r["resourceType"] for r in result.resources()]
    assert kinds.count("Provenance") == 1 and kinds.count("Device") == 1
