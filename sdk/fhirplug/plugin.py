"""Load a plugin bundle and predict: FHIR in, coded predictions out, FHIR again on request.

>>> plugin = fhirplug.load_plugin("plugins/medical-abstracts-mesh/bundle", allow_unsigned=True)
>>> result = plugin.predict(document_reference_json)
>>> bundle = result.to_fhir("transaction")     # ready to POST to a FHIR server
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fhirplug.bundle import VerifiedBundle, verify_bundle
from fhirplug.errors import PluginError, TaskError
from fhirplug.fhir.outcome import Issue, operation_outcome
from fhirplug.fhir.reader import FhirInput, read_fhir
from fhirplug.fhir.writer import ModelInfo, build_resources, to_bundle, to_ndjson
from fhirplug.manifest import Manifest
from fhirplug.predictions import Prediction, TextSource
from fhirplug.registry import get_task, resolve_plugin
from fhirplug.runtime import choose_variant
from fhirplug.session import ModelSession

__all__ = ["DEFAULT_MAX_CHARS", "Plugin", "PredictionResult", "load_plugin"]

#: Longest note (characters) read by default: about 250k tokens, a few seconds of int8 inference.
DEFAULT_MAX_CHARS = 1_000_000

OutputFormat = Literal["collection", "transaction", "ndjson"]


@dataclass
class PredictionResult:
    """What one ``predict`` call produced: predictions, the sources they came from, and every issue."""

    predictions: list[Prediction]
    sources: list[TextSource]
    issues: list[Issue]
    model: ModelInfo
    recorded: datetime
    #: Wall-clock seconds: reading FHIR, tokenizing + running the model, interpreting.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def has_errors(self) -> bool:
        """True when some input could not be used (the rest was still predicted)."""
        return any(i.is_error for i in self.issues)

    def resources(self) -> list[dict[str, Any]]:
        """The generated FHIR resources: one per prediction, then the Device and the run's Provenance."""
        if not self.predictions:
            return []
        return build_resources(self.predictions, self.sources, self.model, recorded=self.recorded)

    def to_fhir(self, kind: Literal["collection", "transaction"] = "collection") -> dict[str, Any]:
        """A ``collection`` Bundle, or a ``transaction`` Bundle ready to POST to a FHIR server."""
        return to_bundle(self.resources(), kind)

    def to_ndjson(self) -> str:
        return to_ndjson(self.resources())

    def outcome(self) -> dict[str, Any]:
        """An OperationOutcome holding every issue met while reading and predicting."""
        return operation_outcome(self.issues)


class Plugin:
    """A verified plugin bundle, ready to predict. Build it with :func:`load_plugin`.

    Attributes:
        manifest: the parsed manifest.
        path: the bundle directory.
        provider: the onnxruntime execution provider that runs the model.
        variant: the precision of the model variant in use (fp32, int8, fp16).
        manifest_sha256: identifies the exact bundle (the manifest holds every file's hash).
    """

    def __init__(
        self,
        bundle: VerifiedBundle,
        *,
        provider: str = "auto",
        variant: str = "auto",
        threads: int | None = None,
        batch_size: int = 16,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        manifest = bundle.manifest
        self.manifest: Manifest = manifest
        self.path = bundle.path
        self.manifest_sha256 = bundle.manifest_sha256
        self.signed_by = bundle.signed_by
        self.max_chars = max_chars
        self.task = get_task(manifest.task)(manifest)
        try:
            self.task.load_files(bundle)
        except TaskError as exc:
            raise PluginError(f"{bundle.path}: {exc}") from exc
        choice = choose_variant(manifest, provider, variant)
        self.session = ModelSession(
            bundle.read(choice.variant.file),
            bundle.read(manifest.tokenizer.file),
            choice.variant,
            manifest.tokenizer,
            choice.providers,
            threads=threads,
            batch_size=batch_size,
            where=bundle.path / choice.variant.file,
        )
        outputs = {o.name: o.shape for o in self.session.session.get_outputs()}
        output_name = choice.variant.output_names[0]
        if output_name not in outputs:
            raise PluginError(
                f"{bundle.path / choice.variant.file}: no output named {output_name!r}; outputs: {sorted(outputs)}"
            )
        try:
            self.task.check_model(outputs[output_name])
        except TaskError as exc:
            raise PluginError(f"{bundle.path / choice.variant.file}: {exc}") from exc
        self.variant = choice.variant.precision
        self.provider = self.session.provider
        self.model_info = ModelInfo(
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=self.manifest_sha256,
            task=manifest.task,
            variant=self.variant,
            provider=self.provider,
            output_resource=manifest.outputs.resource,
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    def __repr__(self) -> str:
        return f"<Plugin {self.name} {self.manifest.version} {self.variant} on {self.provider}>"

    def predict_sources(self, sources: Sequence[TextSource]) -> list[Prediction]:
        """Predict for already-extracted texts (the task's prepare → run → interpret)."""
        if not sources:
            return []
        texts = self.task.prepare(sources)
        windows = self.session.windows(texts)
        outputs = self.session.run(windows)
        return self.task.interpret(sources, windows, outputs)

    def predict_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated scores for plain texts (text-classification: [n_texts, n_labels] probabilities)."""
        windows = self.session.windows(list(texts))
        return self.task.scores(len(texts), windows, self.session.run(windows))

    def predict(
        self,
        data: bytes | str | Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        source_name: str = "input",
    ) -> PredictionResult:
        """Read FHIR R4 input and predict.

        Args:
            data: one resource, a Bundle (any type), a list of resources, or NDJSON — as JSON text, bytes or
                already-decoded objects.
            source_name: how issues name this input (a file name, say).

        Returns:
            A :class:`PredictionResult`. Input problems do not raise: each bad resource or element becomes an
            OperationOutcome issue in ``result.issues`` and every good one is still predicted.
        """
        started = time.perf_counter()
        read = read_fhir(
            data,
            resource_types=self.manifest.inputs.resource_types,
            max_chars=self.max_chars,
            source_name=source_name,
        )
        return self._predict_read(read.sources, list(read.issues), started)

    def predict_many(self, inputs: Iterable[tuple[str, FhirInput]]) -> PredictionResult:
        """Read several named FHIR inputs (``(name, data)``: data as :meth:`predict` takes it) and predict them as
        one run: one Device and one Provenance for all; each input's issues are named by its name."""
        started = time.perf_counter()
        sources: list[TextSource] = []
        issues: list[Issue] = []
        for name, data in inputs:
            read = read_fhir(
                data,
                resource_types=self.manifest.inputs.resource_types,
                max_chars=self.max_chars,
                source_name=name,
            )
            sources.extend(read.sources)
            issues.extend(read.issues)
        return self._predict_read(sources, issues, started)

    def predict_files(self, paths: Iterable[str | os.PathLike[str]]) -> PredictionResult:
        """Read and predict several FHIR files (JSON or NDJSON) as one run with one Provenance."""
        started = time.perf_counter()
        sources: list[TextSource] = []
        issues: list[Issue] = []
        for path in paths:
            try:
                raw = Path(path).read_bytes()
            except OSError as exc:
                issues.append(Issue("error", "not-found", f"cannot read the file ({exc.strerror})", source=str(path)))
                continue
            read = read_fhir(
                raw,
                resource_types=self.manifest.inputs.resource_types,
                max_chars=self.max_chars,
                source_name=str(path),
            )
            sources.extend(read.sources)
            issues.extend(read.issues)
        return self._predict_read(sources, issues, started)

    def _predict_read(self, sources: list[TextSource], issues: list[Issue], started: float) -> PredictionResult:
        read_done = time.perf_counter()
        predictions = self.predict_sources(sources)
        done = time.perf_counter()
        return PredictionResult(
            predictions=predictions,
            sources=sources,
            issues=issues,
            model=self.model_info,
            recorded=datetime.now(UTC).replace(microsecond=0),
            timings={"read_s": read_done - started, "predict_s": done - read_done, "total_s": done - started},
        )


def load_plugin(
    path: str | os.PathLike[str],
    *,
    trusted_keys: Iterable[str | os.PathLike[str]] = (),
    allow_unsigned: bool = False,
    provider: str = "auto",
    variant: str = "auto",
    threads: int | None = None,
    batch_size: int = 16,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Plugin:
    """Verify and load a plugin bundle.

    Everything is checked here, not at first inference: the manifest, the sha256 of every file, the
    signature, the task, that the model loads and that its outputs match the manifest's labels.

    Args:
        path: a bundle directory, or the name of a discovered plugin (``fhirplug plugins`` lists them).
        trusted_keys: PEM ed25519 public keys; a signed bundle must verify with one of them.
        allow_unsigned: load a bundle that has no signature (off by default).
        provider: ``auto`` (TensorRT → CUDA → CPU), ``tensorrt``, ``cuda`` or ``cpu``.
        variant: ``auto`` (fp16 on GPU, int8 on CPU), ``fp32``, ``int8`` or ``fp16``.
        threads: onnxruntime intra-op threads (default: the cores this process may use).
        batch_size: windows per onnxruntime call.
        max_chars: longest text read from one element; longer ones are reported as too costly.

    Raises:
        PluginNotFoundError, ManifestError, IntegrityError, SignatureError, ProviderError, PluginError.
    """
    bundle = verify_bundle(
        resolve_plugin(path),
        trusted_keys=[Path(k) for k in trusted_keys],
        allow_unsigned=allow_unsigned,
    )
    return Plugin(
        bundle,
        provider=provider,
        variant=variant,
        threads=threads,
        batch_size=batch_size,
        max_chars=max_chars,
    )
