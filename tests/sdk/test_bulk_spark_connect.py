"""Spark Connect: ``fhirplug score --engine spark`` writes what the local engine writes, and
``fhirplug.spark.predict_dataframe`` predicts, on a Connect session.

Spark Connect (``SparkSession.builder.remote(...)``) has no SparkContext and no RDDs: the engine uses only
DataFrame calls (``createDataFrame``, ``mapInArrow``, ``collect``) so it runs on a Connect server as on a classic
session. ``remote("local[2]")`` starts a Connect server on loopback in a JVM of its own (pyspark's ``[connect]``
extra, the connect jar that ships with pyspark 4). Marked ``spark``; skipped without pyspark[connect] or Java.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhirplug.bulk import score
from tests.conftest import TINY_PLUGIN
from tests.sdk.test_bulk_spark import EXPORT, WHEN, _outputs

pytestmark = [
    pytest.mark.spark,
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(scope="module")
def connect() -> Iterator[Any]:
    pytest.importorskip("pyarrow", reason="needs the [spark] extra")
    pytest.importorskip("grpc", reason="needs pyspark[connect] (the [spark] extra)")
    pytest.importorskip("google.rpc", reason="needs pyspark[connect] (the [spark] extra)")
    sql = pytest.importorskip("pyspark.sql", reason="needs the [spark] extra")
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime")
    if sql.SparkSession.getActiveSession() is not None:
        pytest.skip("a classic Spark session is active in this process")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYSPARK_PYTHON", sys.executable)  # the server's Python workers: one with fhirplug installed
        session = sql.SparkSession.builder.remote("local[2]").appName("fhirplug-connect-test").getOrCreate()
        yield session
        session.stop()


def test_spark_connect_writes_the_bytes_the_local_engine_writes(tmp_path: Path, connect: Any) -> None:
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    assert isinstance(connect, ConnectSession), "the fixture must be a Spark Connect session, not a classic one"
    inputs = [EXPORT, EXPORT / "Mixed.ndjson"]  # plain files (a task per chunk) and a gzip file (read through)
    options: dict[str, Any] = {"allow_unsigned": True, "transaction_time": WHEN, "chunk_lines": 3}
    local = score(TINY_PLUGIN, inputs, tmp_path / "local", **options)
    remote = score(TINY_PLUGIN, inputs, tmp_path / "connect", engine="spark", spark=connect, **options)
    assert remote.notes == local.notes == 16 and remote.error_lines == local.error_lines == 2
    assert remote.skipped == local.skipped == {"Encounter": 1, "Patient": 3}
    assert _outputs(tmp_path / "connect") == _outputs(tmp_path / "local")


def test_predict_dataframe_on_spark_connect(connect: Any) -> None:
    from fhirplug.spark import predict_dataframe
    from tests.sdk.test_spark import ROWS

    # A null key would otherwise fall back to the row's index, which may be another row's real key ("1" here).
    keyless = (None, ROWS[0][1])
    df = connect.createDataFrame([*ROWS, keyless, ("1", ROWS[3][1])], "id string, value string").coalesce(1)
    rows = predict_dataframe(df, str(TINY_PLUGIN), key_column="id", allow_unsigned=True, chunk=2).collect()
    assert sorted((r["key"], r["reference"], r["code"]) for r in rows if r["code"]) == [
        ("1", "DocumentReference/n4", "44054006"),
        ("r1", "DocumentReference/n1", "44054006"),
        ("r4", "DocumentReference/n4", "44054006"),
    ]
    problems = sorted((r["key"] or "", r["issue_code"]) for r in rows if r["severity"])
    assert problems == [("", "required"), ("r2", "structure"), ("r3", "required")]
    assert "key column is null" in next(r["diagnostics"] for r in rows if r["key"] is None)
    # Without a key column, the key is the row's index within its partition.
    unkeyed = predict_dataframe(
        connect.createDataFrame([(ROWS[0][1],)], "value string"), str(TINY_PLUGIN), allow_unsigned=True
    )
    assert {(r["key"], r["code"]) for r in unkeyed.collect() if r["code"]} == {("0", "44054006")}
