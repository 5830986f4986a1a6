"""``fhirplug score --engine spark``: a local Spark session (``local[2]``) writes what the local engine writes.

Needs the ``[spark]`` extra and a Java runtime (17); marked ``spark`` (``pytest -m spark``) and skipped without them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhirplug.bulk import score
from tests.conftest import FIXTURES, TINY_PLUGIN

pytestmark = [
    pytest.mark.spark,
    # pyspark's result sockets (collect) are closed by the garbage collector, which Python reports as unraisable.
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
]

EXPORT = FIXTURES / "bulk" / "export"
WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    pyspark = pytest.importorskip("pyspark", reason="needs the [spark] extra")
    pytest.importorskip("pyarrow", reason="needs the [spark] extra")
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime")
    # Executors start their own Python: it must be one where fhirplug is installed (on a cluster: every node).
    previous = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (
        pyspark.sql.SparkSession.builder.master("local[2]")
        .appName("fhirplug-bulk-test")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if previous is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = previous


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_spark_writes_the_bytes_the_local_engine_writes(tmp_path: Path, spark: Any) -> None:
    inputs = [EXPORT, EXPORT / "Mixed.ndjson"]  # a plain file per chunk task, a gzip file read through by one task
    options: dict[str, Any] = {"allow_unsigned": True, "transaction_time": WHEN, "chunk_lines": 3}
    local = score(TINY_PLUGIN, inputs, tmp_path / "local", **options)
    on_spark = score(TINY_PLUGIN, inputs, tmp_path / "spark", engine="spark", spark=spark, **options)
    assert on_spark.notes == local.notes == 16 and on_spark.error_lines == 2
    assert on_spark.skipped == {"Encounter": 1, "Patient": 3}
    assert _outputs(tmp_path / "spark") == _outputs(tmp_path / "local")
    # Started again, a finished run redoes nothing (and needs no Spark job).
    again = score(TINY_PLUGIN, inputs, tmp_path / "spark", engine="spark", spark=spark, **options)
    assert again.already_complete
