"""Plugin tests reuse the converter's tiny random BERT (built once per session, no download)."""

from tests.converters.conftest import tiny_base  # noqa: F401 - a fixture, used by name
