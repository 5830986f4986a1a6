"""Spark integration: the partition function (no Spark needed) and, where pyspark is installed, a local Spark run."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from fhirplug.spark import OUTPUT_SCHEMA, predict_rows
from tests.conftest import TINY_PLUGIN
from tests.sdk.helpers import document_reference

DIABETES = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."
# pyspark leaves a py4j socket open at session stop; it is not ours to close.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)
ROWS = [
    ("r1", json.dumps(document_reference(DIABETES, id_="n1"))),
    ("r2", "{not json"),
    ("r3", None),
    ("r4", json.dumps(document_reference(DIABETES, id_="n4"))),
]


def test_every_good_row_is_predicted_and_every_bad_one_reported() -> None:
    out = list(predict_rows(ROWS, str(TINY_PLUGIN), allow_unsigned=True, chunk=2))
    coded = sorted((r["key"], r["reference"], r["code"]) for r in out if r["code"])
    assert coded == [("r1", "DocumentReference/n1", "44054006"), ("r4", "DocumentReference/n4", "44054006")]
    problems = {r["key"]: r for r in out if r["severity"]}
    assert set(problems) == {"r2", "r3"}
    assert problems["r2"]["issue_code"] == "structure" and problems["r3"]["issue_code"] == "required"
    good = next(r for r in out if r["key"] == "r1")
    # The evidence is the sentence that drives the code (occlusion), with offsets into the note.
    assert DIABETES[good["start"] : good["end"]] == "Type 2 diabetes, elevated HbA1c on metformin."
    assert 0.0 < good["probability"] <= 1.0
    fields = [f.strip().split(" ")[0] for f in OUTPUT_SCHEMA.split(",")]
    assert all(list(r) == fields for r in out)


def test_chunking_does_not_change_the_answer() -> None:
    one = list(predict_rows(ROWS, str(TINY_PLUGIN), allow_unsigned=True, chunk=1))
    big = list(predict_rows(ROWS, str(TINY_PLUGIN), allow_unsigned=True, chunk=1000))

    def key(r: dict) -> tuple:
        return (r["key"], r["code"] or "", r["severity"] or "")

    assert sorted(map(key, one)) == sorted(map(key, big))
    assert {k: v for k, v in sorted(one, key=key)[0].items() if k != "probability"} == {
        k: v for k, v in sorted(big, key=key)[0].items() if k != "probability"
    }


@pytest.mark.slow
def test_predict_dataframe_on_local_spark(monkeypatch: pytest.MonkeyPatch) -> None:
    pyspark = pytest.importorskip("pyspark", reason="needs the [spark] extra")
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime")
    from fhirplug.spark import predict_dataframe

    # Executors start their own Python: it must be one where fhirplug is installed (on a cluster: every node).
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    spark = pyspark.sql.SparkSession.builder.master("local[1]").appName("fhirplug-test").getOrCreate()
    try:
        df = spark.createDataFrame([(k, t) for k, t in ROWS], "id string, value string")
        rows = predict_dataframe(df, str(TINY_PLUGIN), key_column="id", allow_unsigned=True).collect()
        coded = sorted((r["key"], r["code"]) for r in rows if r["code"])
        assert coded == [("r1", "44054006"), ("r4", "44054006")]
        assert sorted(r["key"] for r in rows if r["severity"]) == ["r2", "r3"]
    finally:
        spark.stop()
