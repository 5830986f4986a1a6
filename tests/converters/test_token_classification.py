"""token-classification end to end on the tiny random BERT: PubTator data → BIO training (full, LoRA) → ONNX with
[batch, sequence, tags] logits → per-token parity gate → bundle → the runtime finds spans that slice the text."""

from __future__ import annotations

import base64
import json
import random
import textwrap
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class
from tests.converters.conftest import write_recipe

from fhirplug import load_plugin
from fhirplug.bundle import verify_bundle
from fhirplug.errors import ConvertError
from fhirplug_convert import ConvertResult, convert
from fhirplug_convert.datasets import read_conll, read_pubtator
from fhirplug_convert.recipe import load_recipe

pytestmark = pytest.mark.train

DISEASES = {"diabetes": "D003920", "hypertension": "D006973", "asthma": "D001249", "chest pain": "D002637"}
CHEMICALS = {"metformin": "D008687", "insulin": "D007328", "aspirin": "D001241"}
TEMPLATES = [
    "Patient with {d} was treated with {c}.",
    "{c} was given for {d} and {d2}.",
    "History of {d}; started {c} today.",
    "No {d} after {c} therapy.",
]


def _pubtator(n: int, seed: int) -> str:
    rng = random.Random(seed)
    blocks = []
    for k in range(n):
        title = f"Case {k} report"
        sentence = rng.choice(TEMPLATES)
        d, d2 = rng.sample(sorted(DISEASES), 2)
        c = rng.choice(sorted(CHEMICALS))
        abstract = sentence.format(d=d, d2=d2, c=c)
        text = f"{title} {abstract}"
        lines = [f"{1000 + k}|t|{title}", f"{1000 + k}|a|{abstract}"]
        for name, kind, code in (
            (d, "Disease", DISEASES[d]),
            (d2, "Disease", DISEASES[d2]),
            (c, "Chemical", CHEMICALS[c]),
        ):
            start = text.find(name, len(title))
            if start >= 0 and ("{d2}" in sentence or name != d2):
                lines.append(f"{1000 + k}\t{start}\t{start + len(name)}\t{name}\t{kind}\t{code}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\n"


LABELS = textwrap.dedent(
    """\
    [[labels]]
    label = "Disease"
    system = "https://www.nlm.nih.gov/mesh"
    code = "C"
    display = "Diseases"

    [[labels]]
    label = "Chemical"
    system = "https://www.nlm.nih.gov/mesh"
    code = "D"
    display = "Chemicals and Drugs"

    [entities]
    resources = { Disease = "Condition", Chemical = "MedicationStatement" }
    system = "https://www.nlm.nih.gov/mesh"
    coding_threshold = 0.5
    """
)


def ner_recipe(folder: Path, base: Path, method: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.txt", 80, 1), ("dev.txt", 16, 2), ("test.txt", 16, 3)):
        (folder / name).write_text(_pubtator(n, seed), encoding="utf-8")
    recipe = write_recipe(
        folder,
        base,
        method=method,
        labels=LABELS,
        data='format = "pubtator"\ntrain = "train.txt"\nvalidation = "dev.txt"\ntest = "test.txt"',
        max_tokens=24,
        export='variants = ["fp32", "int8"]',
        parity="min_agreement = 0.9\nmax_metric_drop = 20.0",
    )
    text = recipe.read_text().replace('task = "text-classification"', 'task = "token-classification"')
    text = text.replace('resource = "RiskAssessment"', 'resource = "Condition"').replace("stride = 8", "stride = 6")
    recipe.write_text(text.replace("epochs = 10", "epochs = 12"), encoding="utf-8")
    return recipe


@pytest.fixture(scope="module", params=["full", "lora"])
def built(request: pytest.FixtureRequest, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    folder = tmp_path_factory.mktemp(f"ner-{request.param}")
    recipe = ner_recipe(folder, tiny_base, request.param)
    return convert(recipe, folder / "bundle", progress=False, checkpoint=folder / "ckpt")


def test_bundle_verifies_and_declares_entities(built: ConvertResult) -> None:
    manifest = verify_bundle(built.bundle, allow_unsigned=True).manifest
    assert manifest.task == "token-classification"
    assert manifest.entities is not None
    assert manifest.entities.resources == {"Disease": "Condition", "Chemical": "MedicationStatement"}
    assert {"concepts.json", "concept_vectors.npz", "assertion.json", "tokenizer.json"} <= set(manifest.files)
    assert manifest.training is not None and manifest.training.details["tags"] == [
        "O",
        "B-Disease",
        "I-Disease",
        "B-Chemical",
        "I-Chemical",
    ]
    concepts = json.loads((built.bundle / "concepts.json").read_text())
    assert {c["code"] for c in concepts["concepts"]} == set(DISEASES.values()) | set(CHEMICALS.values())
    import onnx

    graph = onnx.load(str(built.bundle / "model.fp32.onnx")).graph
    (output,) = graph.output
    dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence", 5]


def test_parity_is_per_token(built: ConvertResult) -> None:
    parity = built.parity
    assert parity["variants"]["fp32"]["max_abs_logit_diff_vs_torch"] <= 1e-3
    int8 = parity["variants"]["int8"]
    assert int8["status"] == "passed" and int8["metric"] == "entity_f1"
    assert 0.9 <= int8["agreement"] <= 1.0
    assert parity["tokens"] > parity["windows"] > 0


def test_learns_the_entities_and_codes_them(built: ConvertResult) -> None:
    test = built.metrics["test"]["fp32"]
    # Template data: a tiny BERT learns it well; a broken BIO alignment or decoder scores near 0.
    assert test["mentions"]["micro"]["f1"] >= 0.8, test["mentions"]
    assert test["concepts"]["micro"]["f1"] >= 0.8, test["concepts"]
    card = (built.bundle / "README.md").read_text()
    assert "mentions (strict)" in card and "concepts (strict)" in card


def test_runtime_predicts_spans_that_slice_the_text(built: ConvertResult) -> None:
    plugin = load_plugin(built.bundle, allow_unsigned=True, variant="int8")
    note = "History of diabetes; started metformin today. No asthma after aspirin therapy. 😀 é"
    data = base64.b64encode(note.encode("utf-8")).decode()
    resource = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "data": data}}],
    }
    result = plugin.predict(resource)
    found = {(p.entity.text, p.entity.type) for p in result.predictions if p.entity is not None}
    # LoRA on a random tiny encoder misses the odd mention; both methods find these.
    assert ("diabetes", "Disease") in found
    assert {("metformin", "Chemical"), ("aspirin", "Chemical")} & found
    for p in result.predictions:
        assert p.entity is not None
        assert note[p.evidence.start : p.evidence.end] == p.entity.text
    by_text = {p.entity.text: p for p in result.predictions if p.entity is not None}
    assert by_text["diabetes"].code == "D003920" and by_text["diabetes"].entity.historical
    if "asthma" in by_text:
        assert by_text["asthma"].entity.negated
    for resource_json in result.resources():
        get_fhir_model_class(resource_json["resourceType"]).model_validate(resource_json)
    kinds = {r["resourceType"] for r in result.resources()}
    assert {"Condition", "MedicationStatement", "Device", "Provenance"} <= kinds


def test_pubtator_reader_checks_offsets(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("1|t|Aspirin use\n1|a|None.\n1\t0\t6\tAspiri\tChemical\tD001241\n\n", encoding="utf-8")
    # "Aspiri" is what the offsets select here: reading works and keeps the ID.
    (doc,) = read_pubtator(path, known=["Chemical"])
    assert doc.mentions[0].codes == ("D001241",)
    path.write_text("1|t|Aspirin use\n1|a|None.\n1\t0\t6\tAspirin\tChemical\tD001241\n\n", encoding="utf-8")
    with pytest.raises(ConvertError, match="offsets 0-6 select 'Aspiri'"):
        read_pubtator(path, known=["Chemical"])
    path.write_text(
        "2|t|Breast and ovarian cancer\n2|a|x\n2\t0\t25\tBreast and ovarian cancer\tDisease\tD001943|D010051"
        "\tBreast cancer|ovarian cancer\n2\t0\t6\tBreast\tDisease\t-1\n\n",
        encoding="utf-8",
    )
    (doc,) = read_pubtator(path, known=["Disease"])
    assert doc.mentions[0].codes == ("D001943", "D010051")
    assert doc.mentions[0].components == ("Breast cancer", "ovarian cancer")
    assert doc.mentions[1].codes == ()  # ID -1: an entity without a concept


def test_conll_reader(tmp_path: Path) -> None:
    path = tmp_path / "x.conll"
    path.write_text("No O\nchest B-Disease\npain I-Disease\n. O\n\nAspirin B-Chemical\nhelps O\n", encoding="utf-8")
    first, second = read_conll(path, known=["Disease", "Chemical"])
    assert first.text == "No chest pain ."
    assert [(m.text, m.type) for m in first.mentions] == [("chest pain", "Disease")]
    assert [(m.start, m.end) for m in second.mentions] == [(0, 7)]
    path.write_text("x B-Gene\n", encoding="utf-8")
    with pytest.raises(ConvertError, match="tag 'B-Gene'"):
        read_conll(path, known=["Disease"])


def test_token_recipe_needs_entities_and_span_data(tmp_path: Path, tiny_base: Path) -> None:
    recipe = ner_recipe(tmp_path / "r", tiny_base, "full")
    text = recipe.read_text()
    recipe.write_text(text.split("[entities]")[0] + text.split("coding_threshold = 0.5\n", 1)[1], encoding="utf-8")
    with pytest.raises(ConvertError, match=r"needs an \[entities\] table"):
        load_recipe(recipe)


def test_a_saved_tagger_is_packaged_again_without_training(built: ConvertResult, tmp_path: Path) -> None:
    """``--from-checkpoint`` for token classification: the same BIO model, the same test metrics, no training."""
    folder = built.bundle.parent
    again = convert(folder / "recipe.toml", tmp_path / "again", progress=False, from_checkpoint=folder / "ckpt")
    assert again.timings.get("train", 0.0) < 30
    assert again.metrics["test"]["fp32"]["mentions"] == built.metrics["test"]["fp32"]["mentions"]
    assert "int8" in again.metrics["test"]  # quantized and gated again from the same weights
    assert again.metrics["history"] == built.metrics["history"]
