"""Load a plugin bundle and predict: FHIR in, coded predictions out, FHIR again on request.

>>> plugin = fhirplug.load_plugin("plugins/medical-abstracts-mesh/bundle", allow_unsigned=True)
>>> result = plugin.predict(document_reference_json)
>>> bundle = result.to_fhir("transaction")     # ready to POST to a FHIR server
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fhirplug._budget import DEFAULT_BUDGET, Budget, WindowGate, over_budget
from fhirplug._explain import EVIDENCE_SEGMENTS, ExplainGroup, explain_groups
from fhirplug._inputs import read_input_file
from fhirplug.bundle import VerifiedBundle, verify_bundle
from fhirplug.errors import FhirplugError, PluginError, ProviderError, TaskError, UsageError
from fhirplug.fhir.outcome import Issue, operation_outcome
from fhirplug.fhir.reader import FhirInput, read_fhir
from fhirplug.fhir.writer import ModelInfo, build_resources, to_bundle, to_ndjson
from fhirplug.manifest import Manifest
from fhirplug.predictions import Prediction, TextSource
from fhirplug.registry import get_task, resolve_plugin
from fhirplug.runtime import choose_variant
from fhirplug.session import ModelSession, Window

__all__ = ["DEFAULT_MAX_CHARS", "Budget", "Plugin", "PredictionResult", "load_plugin"]

#: Longest note (characters) read by default: about 250k tokens, ≈ 29 s of int8 inference on 2 cores.
DEFAULT_MAX_CHARS = DEFAULT_BUDGET.max_chars

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
    #: Resources of unsent input transactions by ``urn:uuid:`` fullUrl: a transaction output carries those its
    #: outputs reference (the note, its subject), so one POST stores notes and predictions together.
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The input transaction's own ``entry.request`` for each of ``inputs`` (kept when an id-less input is POSTed).
    input_requests: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def has_errors(self) -> bool:
        """True when some input could not be used (the rest was still predicted)."""
        return any(i.is_error for i in self.issues)

    def resources(self) -> list[dict[str, Any]]:
        """The generated FHIR resources: one per prediction, then the model card, the Device and the Provenance."""
        if not self.predictions:
            return []
        return build_resources(self.predictions, self.sources, self.model, recorded=self.recorded, inputs=self.inputs)

    def to_fhir(self, kind: Literal["collection", "transaction"] = "collection") -> dict[str, Any]:
        """A ``collection`` Bundle, or a ``transaction`` Bundle ready to POST to a FHIR server.

        A reference that could not resolve in the output (a source known only by a ``urn:uuid:`` that the input
        did not carry) is left out, never emitted dangling; each such case is added to ``issues`` as a warning.
        """
        warnings: list[Issue] = []
        bundle = to_bundle(
            self.resources(), kind, inputs=self.inputs, input_requests=self.input_requests, warnings=warnings
        )
        self._note(warnings)
        return bundle

    def to_ndjson(self) -> str:
        """The generated resources as NDJSON (references as ``Type/id``; unresolvable ones left out, see
        :meth:`to_fhir`)."""
        warnings: list[Issue] = []
        text = to_ndjson(self.resources(), warnings=warnings)
        self._note(warnings)
        return text

    def _note(self, warnings: list[Issue]) -> None:
        for warning in warnings:
            if warning not in self.issues:
                self.issues.append(warning)

    def outcome(self) -> dict[str, Any]:
        """An OperationOutcome holding every issue met while reading and predicting."""
        return operation_outcome(self.issues)


class Plugin:
    """A verified plugin bundle, ready to predict. Build it with :func:`load_plugin`.

    Every ``predict*`` method is one exception boundary: nothing about the input raises. Bad input, work over
    the :class:`Budget`, and an unexpected failure on one text each become an OperationOutcome issue (the
    failure an ``error``/``exception`` for that text alone) and the rest is still predicted. What raises is
    misuse of the API (:class:`~fhirplug.errors.UsageError`) and a failing execution provider
    (:class:`~fhirplug.errors.ProviderError`).

    Attributes:
        manifest: the parsed manifest.
        path: the bundle directory.
        provider: the onnxruntime execution provider that runs the model.
        variant: the precision of the model variant in use (fp32, int8, fp16).
        manifest_sha256: identifies the exact bundle (the manifest holds every file's hash).
        budget: the limits every call is held to (see :class:`Budget`).
        gate: the windows all threads hold at once, bounded by ``budget.max_windows_in_flight``.
    """

    def __init__(
        self,
        bundle: VerifiedBundle,
        *,
        provider: str = "auto",
        variant: str = "auto",
        threads: int | None = None,
        batch_size: int = 16,
        max_chars: int | None = None,
        budget: Budget | None = None,
        evidence_segments: int | None = None,
    ) -> None:
        self.budget = _budget(budget, max_chars)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be an integer ≥ 1 or None, got {threads!r}")
        _check_segments(evidence_segments)
        self.gate = WindowGate(self.budget.max_windows_in_flight)
        manifest = bundle.manifest
        self.manifest: Manifest = manifest
        #: Text classification: at most this many sentence segments per note are occluded to find each code's
        #: evidence (one batched model pass of that many copies of the note); below 2, no occlusion runs and the
        #: evidence is the model window (e.g. for bulk scoring, where it multiplies the model work).
        self.evidence_segments: int = EVIDENCE_SEGMENTS if evidence_segments is None else evidence_segments
        self.path = bundle.path
        self.manifest_sha256 = bundle.manifest_sha256
        self.signed_by = bundle.signed_by
        #: How the bundle was trusted: ``key`` (a trusted signature), ``pin`` (a first-party pin) or ``unsigned``.
        self.trusted_by = bundle.trusted_by
        self.task = get_task(manifest.task)(manifest)
        try:
            self.task.load_files(bundle)
        except TaskError as exc:
            message = str(exc)
            raise PluginError(message if message.startswith(str(bundle.path)) else f"{bundle.path}: {message}") from exc
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
            model_card=bundle.read("README.md").decode("utf-8", "replace") if "README.md" in manifest.files else None,
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def max_chars(self) -> int:
        """Longest text read from one element (``budget.max_chars``)."""
        return self.budget.max_chars

    def __repr__(self) -> str:
        return f"<Plugin {self.name} {self.manifest.version} {self.variant} on {self.provider}>"

    def predict_sources(
        self,
        sources: Sequence[TextSource],
        *,
        issues: list[Issue] | None = None,
        names: Sequence[str | None] | None = None,
        explain: bool = False,
    ) -> list[Prediction]:
        """Predict for already-extracted texts (the task's prepare → run → interpret), within the budget.

        Args:
            sources: the texts, e.g. ``read_fhir(...).sources``.
            issues: where a text left out goes as an issue (over the budget, or a failure on that text alone);
                without it those texts are only left out.
            names: ``names[i]`` is how issues name the input ``sources[i]`` came from (``Issue.source``).
            explain: text-classification: each prediction's ``details["explanation"]`` lists every sentence
                (segment) of its note with its contribution to the code's probability (see :meth:`predict`).

        Returns:
            The predictions of every text that was predicted, in source order.

        Raises:
            UsageError: ``sources`` is not a sequence of TextSource, or ``names`` does not match it.
            ProviderError: onnxruntime failed.
        """
        sources = list(_checked(sources, TextSource, "sources"))
        if names is not None and len(names) != len(sources):
            raise UsageError(f"names must give one name per source: {len(names)} names for {len(sources)} sources")
        sink: list[Issue] = [] if issues is None else issues
        given: list[str | None] = list(names) if names is not None else [None] * len(sources)
        predictions, found = self._predict(sources, given, _flag(explain))
        sink.extend(found)
        return predictions

    def predict_batch(
        self,
        inputs: Sequence[Sequence[TextSource]],
        *,
        names: Sequence[Sequence[str | None]] | None = None,
        explain: bool = False,
    ) -> list[tuple[list[Prediction], list[Issue]]]:
        """Predict several independent inputs in one model run (a server's micro-batch).

        Each input is held to the budget on its own, exactly as one :meth:`predict_sources` call would be; the
        texts admitted from all inputs are then tokenized and run together, so the model sees full batches.

        Args:
            inputs: ``inputs[k]`` is the texts of the k-th input (one request, say).
            names: ``names[k][i]`` is how issues name the input ``inputs[k][i]`` came from.
            explain: per-sentence contributions in each prediction's details (see :meth:`predict`).

        Returns:
            Per input, in order: its predictions (in source order) and its issues.

        Raises:
            UsageError: ``inputs`` is not a sequence of sequences of TextSource, or ``names`` does not match it.
            ProviderError: onnxruntime failed.
        """
        explain = _flag(explain)
        groups = [list(_checked(group, TextSource, f"inputs[{k}]")) for k, group in enumerate(inputs)]
        labels: list[list[str | None]] = (
            [list(n) for n in names] if names is not None else [[None] * len(g) for g in groups]
        )
        if len(labels) != len(groups) or any(len(n) != len(g) for n, g in zip(labels, groups, strict=False)):
            raise UsageError("names must give one name per source of each input")
        found: list[list[Issue]] = []
        chosen: list[TextSource] = []
        texts: list[str] = []
        owner: dict[int, int] = {}  # id(TextSource) → input index: predictions carry their source
        spent: list[list[int]] = []  # per input, the windows of its admitted texts (occlusion counts too)
        for k, (group, group_names) in enumerate(zip(groups, labels, strict=True)):
            spent.append([])
            admitted, prepared, issues = self._prepare_admit(group, group_names, spent[k])
            found.append(issues)
            for i in admitted:
                chosen.append(group[i])
                texts.append(prepared[i])
                owner[id(group[i])] = k
        out: list[tuple[list[Prediction], list[Issue]]] = [([], issues) for issues in found]
        if not chosen:
            return out
        try:
            predictions, notices = self._interpret(chosen, texts)
        except (UsageError, ProviderError):
            raise
        except Exception:  # one input at a time, so the failing text is reported in its own input alone
            return [self._predict(g, n, explain) for g, n in zip(groups, labels, strict=True)]
        for prediction in predictions:
            out[owner[id(prediction.source)]][0].append(prediction)
        for source, notice in notices:
            out[owner[id(source)]][1].append(notice)
        text_of = {id(source): text for source, text in zip(chosen, texts, strict=True)}
        left = [self.budget.max_input_windows - sum(n) for n in spent]
        explained = self._explained([(ps, text_of, left[k]) for k, (ps, _) in enumerate(out)], explain)
        return [(ps, issues) for ps, (_, issues) in zip(explained, out, strict=True)]

    def _prepare_admit(
        self, sources: list[TextSource], names: list[str | None], spent: list[int] | None = None
    ) -> tuple[list[int], list[str], list[Issue]]:
        """The indices of the sources within the budget, every prepared text, and the issues of the others.

        ``spent``, when given, receives the window count of each admitted text.
        """
        issues: list[Issue] = []
        texts: list[str] = []
        unprepared: set[int] = set()
        for i, (source, name) in enumerate(zip(sources, names, strict=True)):
            try:
                (text,) = self.task.prepare([source])
                if not isinstance(text, str):
                    raise TypeError(f"{type(self.task).__name__}.prepare gave a {type(text).__name__}, not a str")
            except Exception as exc:  # a task's own code failing on one text
                issues.append(_failed(source, name, "preparing the text", exc))
                unprepared.add(i)
                text = ""
            texts.append(text)
        labels = [(f"{s.reference} {s.element}", n) for s, n in zip(sources, names, strict=True)]
        admitted, refused = self._admit(texts, labels, skip=unprepared, locations=[s.location for s in sources])
        issues.extend(refused)
        if spent is not None:
            spent.extend(n for _, n in admitted)
        return [i for i, _ in admitted], texts, issues

    def predict_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated scores for plain texts (text-classification: ``[n_texts, n_labels]`` probabilities;
        token-classification: per text its ``[tokens, tags]`` probabilities, in an object array).

        A text over the budget, or one the tokenizer cannot read, gets no scores: a row of NaN
        (text-classification), an empty ``[0, 0]`` array (token-classification). ``[]`` gives ``[0, n_labels]``.

        Raises:
            UsageError: ``texts`` is a string or holds something that is not one.
            ProviderError: onnxruntime failed.
        """
        if isinstance(texts, str):
            raise UsageError("predict_texts takes a sequence of texts, not one string: predict_texts([text])")
        texts = list(_checked(texts, str, "texts"))
        admitted, _ = self._admit(texts, [(f"texts[{i}]", None) for i in range(len(texts))])
        try:
            windows, outputs = self._run([texts[i] for i, _ in admitted], [i for i, _ in admitted])
        except (UsageError, ProviderError):
            raise
        except Exception:  # one text at a time, so the failing one alone goes without scores
            windows, outputs = [], []
            for i, _ in admitted:
                try:
                    got = self._run([texts[i]], [i])
                except (UsageError, ProviderError):
                    raise
                except Exception:
                    continue
                windows.extend(got[0])
                outputs.extend(got[1])
        return self.task.scores(len(texts), windows, outputs)

    def predict(
        self,
        data: bytes | str | Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        source_name: str = "input",
        explain: bool = False,
    ) -> PredictionResult:
        """Read FHIR R4 input and predict.

        A text-classification prediction's evidence is the sentence whose removal lowers the code's probability
        most, found by occlusion through the model (:mod:`fhirplug._explain`: a note is cut into at most 8
        segments; longer notes, one-sentence notes and work over the budget keep the window evidence, and
        ``details["evidence"]``/``details["evidence_reason"]`` say which and why).

        Args:
            data: one resource, a Bundle (any type), a list of resources, or NDJSON — as JSON text, bytes or
                already-decoded objects.
            source_name: how issues name this input (a file name, say).
            explain: cut each note into up to 32 segments and list them all in ``details["explanation"]`` as
                ``{"start", "end", "text", "contribution"}`` (offsets into the original; contribution = the
                code's probability minus its probability with that segment removed), highest first.

        Returns:
            A :class:`PredictionResult`. Input problems do not raise: each bad resource or element, each text
            over the budget and each text the model failed on becomes an OperationOutcome issue in
            ``result.issues``, and every good one is still predicted.

        Raises:
            ProviderError: onnxruntime failed (nothing about the input raises).
        """
        return self.predict_many([(source_name, data)], explain=explain)

    def predict_many(self, inputs: Iterable[tuple[str, FhirInput]], *, explain: bool = False) -> PredictionResult:
        """Read several named FHIR inputs (``(name, data)``: data as :meth:`predict` takes it) and predict them as
        one run: one Device and one Provenance for all; each input's issues are named by its name. The budget
        holds for the run as a whole (one CDS request). ``explain`` as for :meth:`predict`.

        Raises:
            UsageError: ``inputs`` is not an iterable of ``(name, data)`` pairs.
            ProviderError: onnxruntime failed.
        """
        explain = _flag(explain)
        started = time.perf_counter()
        read: list[tuple[TextSource, str | None]] = []
        issues: list[Issue] = []
        unsent: dict[str, dict[str, Any]] = {}
        requests: dict[str, dict[str, Any]] = {}
        left: int | None = self.budget.max_input_chars
        for name, data in _pairs(inputs):
            left = self._read(data, str(name), read, issues, unsent, requests, left)
        return self._predict_read(read, issues, started, unsent, requests, explain)

    def predict_files(self, paths: Iterable[str | os.PathLike[str]], *, explain: bool = False) -> PredictionResult:
        """Read and predict several FHIR files (JSON or NDJSON) as one run with one Provenance.

        A file that cannot be read is an ``error``/``not-found`` issue; the budget holds for the run as a whole.
        ``explain`` as for :meth:`predict`.

        Raises:
            UsageError: ``paths`` holds something that is not a path.
            ProviderError: onnxruntime failed.
        """
        explain = _flag(explain)
        started = time.perf_counter()
        read: list[tuple[TextSource, str | None]] = []
        issues: list[Issue] = []
        unsent: dict[str, dict[str, Any]] = {}
        requests: dict[str, dict[str, Any]] = {}
        left: int | None = self.budget.max_input_chars
        for path in _checked(paths, (str, os.PathLike), "paths"):
            raw, problem = read_input_file(path, self.budget.max_request_bytes)
            if raw is None:
                if problem is not None:
                    issues.append(problem)
                continue
            left = self._read(raw, str(path), read, issues, unsent, requests, left)
        return self._predict_read(read, issues, started, unsent, requests, explain)

    # --- the one pipeline every public method runs -------------------------------------------------------------

    def _read(
        self,
        data: Any,
        name: str,
        into: list[tuple[TextSource, str | None]],
        issues: list[Issue],
        unsent: dict[str, dict[str, Any]] | None = None,
        requests: dict[str, dict[str, Any]] | None = None,
        left: int | None = None,
    ) -> int | None:
        """Read one input into ``into``; ``left``: characters its texts may take (None: the whole budget).

        Returns what is left for the next input of the run: 0 once a text was refused, since the first text over
        ``max_input_chars`` and every later one are refused (and the reader decodes none of them).
        """
        if left is None:
            left = self.budget.max_input_chars
        try:
            result = read_fhir(
                data,
                resource_types=self.manifest.inputs.resource_types,
                max_chars=self.max_chars,
                source_name=name,
                max_total_chars=left,
            )
        except FhirplugError as exc:
            issues.extend(getattr(exc, "issues", None) or [Issue("error", "invalid", str(exc), source=name)])
            return left
        except Exception as exc:  # the reader reports problems as issues; should one escape, it stays one input's
            issues.append(Issue("error", "exception", f"the input could not be read: {_describe(exc)}", source=name))
            return left
        into.extend((source, name) for source in result.sources)
        issues.extend(result.issues)
        if unsent is not None:
            for url, resource in result.unsent.items():
                unsent.setdefault(url, resource)
        if requests is not None:
            for url, request in result.unsent_requests.items():
                requests.setdefault(url, request)
        return 0 if result.chars_spent else left - sum(len(s.text) for s in result.sources)

    def _predict_read(
        self,
        read: list[tuple[TextSource, str | None]],
        issues: list[Issue],
        started: float,
        unsent: dict[str, dict[str, Any]] | None = None,
        requests: dict[str, dict[str, Any]] | None = None,
        explain: bool = False,
    ) -> PredictionResult:
        read_done = time.perf_counter()
        sources = [s for s, _ in read]
        predictions, found = self._predict(sources, [n for _, n in read], explain)
        issues.extend(found)
        done = time.perf_counter()
        return PredictionResult(
            predictions=predictions,
            sources=sources,
            issues=issues,
            model=self.model_info,
            recorded=datetime.now(UTC).replace(microsecond=0),
            timings={"read_s": read_done - started, "predict_s": done - read_done, "total_s": done - started},
            inputs=unsent or {},
            input_requests=requests or {},
        )

    def _predict(
        self, sources: list[TextSource], names: list[str | None], explain: bool = False
    ) -> tuple[list[Prediction], list[Issue]]:
        """Budget, then stream: the admitted sources are predicted; every other one gets its issue."""
        spent: list[int] = []
        admitted, texts, issues = self._prepare_admit(sources, names, spent)
        if not admitted:
            return [], issues
        text_of = {id(source): text for source, text in zip(sources, texts, strict=True)}
        left = self.budget.max_input_windows - sum(spent)
        try:
            predictions, notices = self._interpret([sources[i] for i in admitted], [texts[i] for i in admitted])
            (predictions,) = self._explained([(predictions, text_of, left)], explain)
            return predictions, issues + _named(notices, sources, names)
        except (UsageError, ProviderError):
            raise
        except Exception:  # one source at a time, so the failing one alone is reported
            predictions = []
            for i in admitted:
                try:
                    got, notices = self._interpret([sources[i]], [texts[i]])
                except (UsageError, ProviderError):
                    raise
                except Exception as exc:
                    issues.append(_failed(sources[i], names[i], "predicting", exc))
                    continue
                predictions.extend(got)
                issues.extend(_named(notices, sources, names))
            (predictions,) = self._explained([(predictions, text_of, left)], explain)
            return predictions, issues

    def _explained(self, groups: list[ExplainGroup], explain: bool) -> list[list[Prediction]]:
        """Text-classification: occlusion evidence, and with ``explain`` per-sentence contributions
        (:mod:`fhirplug._explain`). Other tasks' evidence (a mention's span) is already the smallest span.

        A failure here costs the explanation, never the prediction: the window evidence is kept, and says why.
        """
        if self.manifest.task != "text-classification" or not any(ps for ps, _, _ in groups):
            return [list(ps) for ps, _, _ in groups]
        labels = [spec.label for spec in self.manifest.outputs.labels]
        try:
            return explain_groups(
                groups,
                self._occlusion_scores,
                self.session.count_windows,
                labels,
                explain=explain,
                segments=self.evidence_segments,
            )
        except (UsageError, ProviderError):
            raise
        except Exception as exc:
            reason = f"the explanation failed ({_describe(exc)})"
            return [[_unexplained(p, reason, explain) for p in ps] for ps, _, _ in groups]

    def _occlusion_scores(self, texts: list[str]) -> np.ndarray:
        """Probabilities of the occluded copies: the plugin's own model path, under the window gate."""
        windows, outputs = self._run(texts, range(len(texts)))
        return self.task.scores(len(texts), windows, outputs)

    def _interpret(
        self, sources: list[TextSource], texts: list[str]
    ) -> tuple[list[Prediction], list[tuple[TextSource, Issue]]]:
        """The task's predictions and its notices (e.g. an abstention), each notice with the source it is about."""
        windows, outputs = self._run(texts, range(len(texts)))
        return self.task.interpret(sources, windows, outputs), self.task.notices(sources, windows, outputs)

    def _admit(
        self,
        texts: Sequence[str],
        labels: Sequence[tuple[str, str | None]],
        skip: set[int] | None = None,
        locations: Sequence[str | None] | None = None,
    ) -> tuple[list[tuple[int, int]], list[Issue]]:
        """``(index, windows)`` of the texts within the budget, in order, and an issue for each other text.

        Checked before the work: characters first (free), then windows (a tokenizer pass that keeps no token).
        The first text over an input limit and every later one are refused: an input is predicted up to its
        budget, in order.
        """
        budget = self.budget
        admitted: list[tuple[int, int]] = []
        issues: list[Issue] = []
        chars = windows = 0
        spent: str | None = None  # the input limit that ran out
        for i, (text, (label, name)) in enumerate(zip(texts, labels, strict=True)):
            if skip and i in skip:
                continue
            # The FHIRPath of the element in its input (Bundle.entry[3].resource.content[0].attachment) when the
            # reader gave one, else the element path within the resource.
            location = locations[i] if locations is not None else None
            where = (location or label.split(" ", 1)[-1],)
            if spent is not None:
                what = f"{label}: the input's budget was spent on the texts before this one"
                issues.append(over_budget(spent, budget, what, where, name))
                continue
            if len(text) > budget.max_chars:
                what = f"{label}: the text is {len(text):,} characters"
                issues.append(over_budget("max_chars", budget, what, where, name))
                continue
            if chars + len(text) > budget.max_input_chars:
                spent = "max_input_chars"
                what = f"{label}: this text ({len(text):,} characters) brings the input to {chars + len(text):,}"
                issues.append(over_budget(spent, budget, what, where, name))
                continue
            try:
                count = self.session.count_windows(text)
            except Exception as exc:  # the tokenizer refused the text (a lone surrogate, say)
                issues.append(_failed_label(label, where, name, "tokenizing", exc))
                continue
            if windows + count > budget.max_input_windows:
                spent = "max_input_windows"
                what = f"{label}: this text ({count:,} windows) brings the input to {windows + count:,} windows"
                issues.append(over_budget(spent, budget, what, where, name))
                continue
            chars += len(text)
            windows += count
            admitted.append((i, count))
        return admitted, issues

    def _run(self, texts: Sequence[str], indices: Iterable[int]) -> tuple[list[Window], list[np.ndarray]]:
        """Stream the texts' windows through the model, a chunk at a time under the process-wide gate.

        Only one chunk of each call is tokenized at a time; each window kept for ``interpret`` is a few KB.
        """
        stream = self.session.iter_windows(texts, list(indices))
        windows: list[Window] = []
        outputs: list[np.ndarray] = []
        chunk = self.budget.chunk
        while True:
            self.gate.acquire(chunk)
            try:
                batch = list(itertools.islice(stream, chunk))
                if batch:
                    outputs.extend(self.session.run(batch))
            finally:
                self.gate.release(chunk)
            if not batch:
                return windows, outputs
            windows.extend(batch)


def _budget(budget: Budget | None, max_chars: int | None) -> Budget:
    if budget is not None and not isinstance(budget, Budget):
        raise UsageError(f"budget must be a fhirplug Budget, got {type(budget).__name__}")
    chosen = budget or DEFAULT_BUDGET
    if max_chars is None:
        return chosen
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise UsageError(f"max_chars must be an integer ≥ 1, got {max_chars!r}")
    return replace(chosen, max_chars=max_chars)


def _checked(items: Any, kind: type | tuple[type, ...], what: str) -> Iterable[Any]:
    if isinstance(items, str | bytes) and kind is not str:
        raise UsageError(f"{what} must be a sequence, not a single {type(items).__name__}")
    try:
        iterator = iter(items)
    except TypeError as exc:
        raise UsageError(f"{what} must be iterable, got {type(items).__name__}") from exc
    values = list(iterator)  # an error raised by the caller's own generator is the caller's, and passes through
    for i, value in enumerate(values):
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise UsageError(f"{what}[{i}] must be a {names}, got {type(value).__name__}")
    return values


def _pairs(inputs: Iterable[tuple[str, FhirInput]]) -> list[tuple[str, FhirInput]]:
    try:
        iterator = iter(inputs)
    except TypeError as exc:
        raise UsageError(f"inputs must be an iterable of (name, data) pairs, got {type(inputs).__name__}") from exc
    pairs = list(iterator)  # an error raised by the caller's own generator passes through
    for i, pair in enumerate(pairs):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise UsageError(f"inputs[{i}] must be a (name, data) pair, got {type(pair).__name__}")
    return pairs


def _flag(explain: object) -> bool:
    if not isinstance(explain, bool):
        raise UsageError(f"explain must be True or False, got {explain!r}")
    return explain


def _unexplained(prediction: Prediction, reason: str, explain: bool) -> Prediction:
    details = {**prediction.details, "evidence": "window", "evidence_reason": reason}
    if explain:
        details.setdefault("explanation", [])
    return replace(prediction, details=details)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _failed_label(label: str, where: tuple[str, ...], name: str | None, step: str, exc: BaseException) -> Issue:
    return Issue(
        "error",
        "exception",
        f"{label}: {step} failed ({_describe(exc)}); this text was not predicted, the others were. "
        "Report it with the input if it is not the input's fault",
        where,
        name,
    )


def _named(notices: list[tuple[TextSource, Issue]], sources: list[TextSource], names: list[str | None]) -> list[Issue]:
    """Notices with the input name of the source they are about (``Issue.source``), when it has one."""
    name_of = {id(s): n for s, n in zip(sources, names, strict=True)}
    return [replace(issue, source=issue.source or name_of.get(id(source))) for source, issue in notices]


def _failed(source: TextSource, name: str | None, step: str, exc: BaseException) -> Issue:
    where = (source.location or source.element,)
    return _failed_label(f"{source.reference} {source.element}", where, name, step, exc)


def _check_segments(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise UsageError(f"evidence_segments must be an integer ≥ 0 or None, got {value!r}")


def load_plugin(
    path: str | os.PathLike[str],
    *,
    trusted_keys: Iterable[str | os.PathLike[str]] = (),
    allow_unsigned: bool = False,
    provider: str = "auto",
    variant: str = "auto",
    threads: int | None = None,
    batch_size: int = 16,
    max_chars: int | None = None,
    budget: Budget | None = None,
    evidence_segments: int | None = None,
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
        max_chars: longest text read from one element; longer ones are reported as too costly (the same as
            ``budget=Budget(max_chars=N)``; given with ``budget``, it replaces that one field).
        budget: the limits every call is held to (:class:`Budget`; default ``Budget()``).
        evidence_segments: text classification: the most sentences occluded per predicted note to find its
            evidence (:attr:`Plugin.evidence_segments`; default 8); 0 or 1: the evidence is the model window.

    Raises:
        PluginNotFoundError, ManifestError, IntegrityError, SignatureError, ProviderError, PluginError;
        UsageError for an argument that cannot be used (``batch_size=0``, a bad ``budget``).
    """
    _budget(budget, max_chars)  # misuse fails before minutes of hashing, not after
    _check_segments(evidence_segments)
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
        budget=budget,
        evidence_segments=evidence_segments,
    )
