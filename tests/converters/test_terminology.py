"""The coding dictionary: training + development mentions, extra name lists (NCBI Disease, PubTator), no test leak."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from fhirplug.errors import ConvertError
from fhirplug_convert.datasets import load_splits, read_ncbi_disease
from fhirplug_convert.recipe import load_recipe
from fhirplug_convert.terminology import build_terminology

NCBI = Path(__file__).resolve().parents[1] / "fixtures" / "converters" / "ncbi-disease-sample.txt"


def _doc(pmid: str, text: str, mentions: list[tuple[str, str, str]]) -> str:
    """A PubTator block (title only) with each mention's first occurrence located in the text."""
    lines = [f"{pmid}|t|{text}"]
    for name, kind, code in mentions:
        start = text.index(name)
        lines.append(f"{pmid}\t{start}\t{start + len(name)}\t{name}\t{kind}\t{code}")
    return "\n".join(lines)


TRAIN = [
    _doc("1", "Aspirin caused asthma.", [("Aspirin", "Chemical", "D001241"), ("asthma", "Disease", "D001249")]),
    _doc("2", "Metformin for diabetes.", [("Metformin", "Chemical", "D008687"), ("diabetes", "Disease", "D003920")]),
    # The NCBI sample codes "Wilson disease" D006527; the training data's own code must win.
    _doc("5", "Wilson disease in twins.", [("Wilson disease", "Disease", "D008107")]),
]
DEV = [
    _doc(
        "3", "Lithium induced nephropathy.", [("Lithium", "Chemical", "D008094"), ("nephropathy", "Disease", "D007674")]
    ),
    _doc(
        "4",
        "Heparin and thrombocytopenia.",
        [("Heparin", "Chemical", "D006493"), ("thrombocytopenia", "Disease", "D013921")],
    ),
]
# PMID 90000003 of the NCBI sample is a test document here (another text: the PMID alone must exclude it).
TEST = [_doc("90000003", "Gout flares after diuretics.", [("Gout", "Disease", "D006073")])]


def _recipe(folder: Path, dictionaries: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.txt", TRAIN), ("dev.txt", DEV), ("test.txt", TEST)):
        (folder / name).write_text("\n\n".join(docs) + "\n\n", encoding="utf-8")
    shutil.copyfile(NCBI, folder / "ncbi.txt")
    text = textwrap.dedent(
        """\
        name = "tiny-ner"
        version = "0.0.1"
        task = "token-classification"
        license = "Apache-2.0"
        intended_use = "Tests."

        [output]
        resource = "Condition"

        [data]
        format = "pubtator"
        train = "train.txt"
        validation = "dev.txt"
        test = "test.txt"
        validation_into_train = 0.5

        [[labels]]
        label = "Disease"
        system = "https://www.nlm.nih.gov/mesh"
        code = "C"
        display = "Diseases"

        [[labels]]
        label = "Chemical"
        system = "https://www.nlm.nih.gov/mesh"
        code = "D"
        display = "Chemicals"

        [entities]
        resources = { Disease = "Condition", Chemical = "MedicationStatement" }
        system = "https://www.nlm.nih.gov/mesh"
        """
    )
    path = folder / "recipe.toml"
    path.write_text(text + dictionaries + "\n", encoding="utf-8")
    return path


NCBI_ENTRY = 'dictionaries = [{ format = "ncbi-disease", path = "ncbi.txt", type = "Disease" }]'


def _names(work: Path) -> dict[str, set[str]]:
    concepts = json.loads((work / "concepts.json").read_text(encoding="utf-8"))["concepts"]
    return {c["code"]: set(c["names"]) for c in concepts}


def test_ncbi_reader_normalises_ids_and_reads_a_repeated_pmid_once() -> None:
    docs = read_ncbi_disease(NCBI, entity_type="Disease")
    assert [d.group for d in docs] == ["90000001", "90000002", "90000003"]  # the second 90000001 is dropped
    first, second, _ = docs
    assert {m.text: m.codes for m in first.mentions}["iron overload"] == ("D019190",)  # leading space stripped
    codes = [(m.text, m.codes) for m in second.mentions]
    assert codes == [
        ("Copper toxicosis", ("OMIM:215600",)),
        ("breast or ovarian cancer", ("D001943", "D010051")),
        ("Wilson disease", ("D006527",)),  # MESH: prefix stripped
        ("Copper toxicosis", ("D006527", "OMIM:277900")),
    ]
    assert all(m.type == "Disease" and first.text[m.start : m.end] == m.text for m in first.mentions)


def test_ncbi_reader_rejects_offsets_that_miss_the_text(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("7|t|Gout here.\n7|a|Nothing.\n7\t0\t4\tGoat\tSpecificDisease\tD006073\n", encoding="utf-8")
    with pytest.raises(ConvertError, match=r"bad\.txt document 7: offsets 0-4 select 'Gout'"):
        read_ncbi_disease(bad)


def test_dictionary_from_train_dev_and_ncbi_without_test_documents(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path / "r", NCBI_ENTRY))
    splits = load_splits(recipe)
    assert len(splits.validation) == 1  # one development abstract stays out of training
    work = tmp_path / "work"
    work.mkdir()
    # Only the training split is passed: the validation file's remaining abstract must code all the same.
    index, files, facts = build_terminology(recipe, splits.train, work)
    assert set(files) == {"concepts.json", "concept_vectors.npz", "assertion.json"}
    names = _names(work)
    for text, kind, code in [
        ("nephropathy", "Disease", "D007674"),
        ("thrombocytopenia", "Disease", "D013921"),
        ("Heparin", "Chemical", "D006493"),
        ("asthma", "Disease", "D001249"),
        ("Hereditary hemochromatosis", "Disease", "D006432"),  # from NCBI
        ("iron overload", "Disease", "D019190"),
        ("Wilson disease", "Disease", "D008107"),  # the training data's code, not NCBI's
    ]:
        coding = index.code(text, kind)
        assert (coding.code, coding.method) == (code, "exact"), text
    # The test document (same PMID as an NCBI one) gave nothing; OMIM-only and OMIM-mixed mentions gave nothing;
    # "HH" is a short form defined in its own abstract: left to the runtime's in-note resolution.
    assert "D006073" not in names and "Gout" not in {n for ns in names.values() for n in ns}
    assert "Copper toxicosis" not in {n for ns in names.values() for n in ns}
    assert not any(code.startswith("OMIM") for code in names)
    assert names["D006432"] == {"Hereditary hemochromatosis"}
    (ncbi,) = facts["dictionaries"]
    assert ncbi == {
        "format": "ncbi-disease",
        "file": "ncbi.txt",
        "documents": 2,
        "test_documents_dropped": 1,
        "names": 3,
        "omim_only_skipped": 1,
        "composite_mentions": 2,
        "mentions_without_concept": 0,
        "local_short_forms_skipped": 2,
        "names_known_from_training": 1,
    }
    assert facts["training_documents"] == 5 and facts["training_names"] == 9


def test_without_dictionaries_only_the_data_codes(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path / "r", ""))
    work = tmp_path / "work"
    work.mkdir()
    index, _, facts = build_terminology(recipe, [], work)
    assert "dictionaries" not in facts and facts["concepts"] == 9
    assert index.code("Hereditary hemochromatosis", "Disease").code is None


def test_a_pubtator_dictionary_is_read_for_its_type(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    recipe_path = _recipe(folder, 'dictionaries = [{ format = "pubtator", path = "extra.txt", type = "Chemical" }]')
    extra = _doc(
        "9",
        "Cisplatin nephrotoxicity.",
        [("Cisplatin", "Chemical", "D002945"), ("nephrotoxicity", "Disease", "D007674")],
    )
    (folder / "extra.txt").write_text(extra + "\n\n", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    index, _, facts = build_terminology(load_recipe(recipe_path), [], work)
    assert index.code("cisplatin", "Chemical").code == "D002945"
    assert "nephrotoxicity" not in _names(work)["D007674"]  # a Disease mention of a Chemical-only list
    assert facts["dictionaries"][0]["names"] == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('[{ format = "ncbi-disease", path = "ncbi.txt" }]', "an ncbi-disease dictionary needs type"),
        (
            '[{ format = "ncbi-disease", path = "ncbi.txt", type = "Gene" }]',
            r"dictionaries\[0\]\.type 'Gene' is not a label",
        ),
        ('[{ format = "bioc", path = "ncbi.txt", type = "Disease" }]', "dictionaries.0.format"),
        ('[{ format = "pubtator", path = "x.txt", typ = "Disease" }]', "did you mean 'type'"),
    ],
)
def test_bad_dictionary_entries_are_named(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        load_recipe(_recipe(tmp_path / "r", f"dictionaries = {entry}"))


def test_a_missing_dictionary_file_is_one_clear_error(tmp_path: Path) -> None:
    recipe = load_recipe(
        _recipe(tmp_path / "r", 'dictionaries = [{ format = "ncbi-disease", path = "no.txt", type = "Disease" }]')
    )
    with pytest.raises(ConvertError, match=r"entities\.dictionaries: .*no\.txt is not a file"):
        build_terminology(recipe, [], tmp_path)


def test_ncbi_names_need_a_mesh_plugin(tmp_path: Path) -> None:
    path = _recipe(tmp_path / "r", NCBI_ENTRY)
    mesh = 'system = "https://www.nlm.nih.gov/mesh"\n' + NCBI_ENTRY  # the [entities] system only
    path.write_text(
        path.read_text().replace(mesh, 'system = "http://snomed.info/sct"\n' + NCBI_ENTRY), encoding="utf-8"
    )
    with pytest.raises(ConvertError, match=r"gives MeSH IDs, but entities\.system is 'http://snomed\.info/sct'"):
        build_terminology(load_recipe(path), [], tmp_path)
