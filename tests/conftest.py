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
