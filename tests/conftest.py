"""Shared fixtures. Nothing here reads ../shared: a user's clone has no such folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_PLUGIN = FIXTURES / "plugins" / "tiny-notes"
REPO = Path(__file__).resolve().parents[1]
#: Real third-party data, present on the team's machines and in CI; tests that use it skip without it.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A private copy of the tiny test plugin, safe to tamper with."""
    target = tmp_path / "tiny-notes"
    shutil.copytree(TINY_PLUGIN, target)
    return target


@pytest.fixture(scope="session")
def tiny_expected() -> list[dict]:
    """Reference probabilities computed with torch when the tiny plugin was built."""
    return json.loads((FIXTURES / "plugins" / "tiny-notes.expected.json").read_text())


@pytest.fixture(scope="session")
def tiny_plugin():
    """The tiny plugin loaded once (fp32 on the CPU), shared by read-only tests."""
    from fhirplug import load_plugin

    return load_plugin(TINY_PLUGIN, allow_unsigned=True, variant="fp32", provider="cpu")


@pytest.fixture(scope="session")
def fhir_server():
    """A real FHIR R4 server (Medplum's FhirRouter, in memory) on 127.0.0.1 for the whole session.

    Yields the :class:`tests.fhir_tools.FhirServer`; its ``base`` is the URL, ``new_base()`` an empty server of
    its own. Installs tests/fhir_node's pinned npm packages first when they are missing; skips without node.
    """
    from tests.fhir_tools import FhirServer

    server = FhirServer()
    yield server
    server.stop()


@pytest.fixture
def fhir_base(fhir_server) -> str:
    """The base URL of an empty FHIR server for one test (same process as ``fhir_server``, separate data)."""
    return fhir_server.new_base()
