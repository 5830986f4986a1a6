"""The task contract: ``prepare`` (FHIR text → model texts), the SDK-owned ``run``, ``interpret`` (outputs →
coded predictions). MONAI Deploy's pre/predict/post split; third parties add tasks through the
``fhirplug.tasks`` entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fhirplug.fhir.outcome import Issue
from fhirplug.manifest import Manifest
from fhirplug.predictions import Prediction, TextSource
from fhirplug.session import Window

if TYPE_CHECKING:
    from fhirplug.bundle import VerifiedBundle

__all__ = ["Task"]


class Task(ABC):
    """One task (a Hugging Face pipeline tag). Instantiated once per loaded plugin.

    ``__init__`` validates the manifest for this task and raises ``TaskError`` (at load, never at first
    inference) when the plugin cannot work, e.g. a label count that does not match the model.
    """

    #: The Hugging Face pipeline tag, e.g. ``text-classification``.
    name: ClassVar[str]

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def load_files(self, bundle: VerifiedBundle) -> None:  # noqa: B027 - optional hook
        """Read task files from the verified bundle (called at load; raise ``TaskError``). Default: none.

        Read them with ``bundle.read(name)``: those are the bytes whose sha256 was checked; never re-open a file
        by path, which another process may have changed since.
        """

    def check_model(self, output_shape: Sequence[int | str | None]) -> None:  # noqa: B027 - optional hook
        """Check the model's output shape against the manifest (called at load). Default: accept."""

    def prepare(self, sources: Sequence[TextSource]) -> list[str]:
        """The text each source feeds the model (default: the extracted text as it is)."""
        return [s.text for s in sources]

    @abstractmethod
    def interpret(
        self, sources: Sequence[TextSource], windows: Sequence[Window], outputs: Sequence[np.ndarray]
    ) -> list[Prediction]:
        """Turn the per-window model outputs into coded predictions with evidence."""

    def notices(
        self, sources: Sequence[TextSource], windows: Sequence[Window], outputs: Sequence[np.ndarray]
    ) -> list[tuple[TextSource, Issue]]:
        """Informational issues about the texts, each with the source it is about: e.g. that the plugin
        abstained on a text outside its domain and why. Default: none."""
        return []

    @abstractmethod
    def scores(self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated per-text scores (shape depends on the task), for evaluation and parity checks."""
