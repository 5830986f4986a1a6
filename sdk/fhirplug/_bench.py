"""``fhirplug bench``: latency, throughput, cold start and memory of a plugin, per provider × variant × shape.

Numbers are measured, never assumed: each shape is warmed up, then run for a fixed wall-clock duration and
every call is timed. The cold start runs in a fresh interpreter (import + load + first prediction) so nothing
this process has cached can flatter it.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fhirplug.bundle import verify_bundle
from fhirplug.errors import FhirplugError, MissingExtraError, ProviderError
from fhirplug.plugin import Plugin, load_plugin
from fhirplug.registry import resolve_plugin
from fhirplug.runtime import PROVIDERS, available_providers, provider_name
from fhirplug.session import Window

Progress = Callable[[str], None]


def summarize(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min in milliseconds of per-call wall times given in seconds."""
    if not samples_s:
        raise ValueError("no samples to summarize")
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "calls": len(ms),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        gpu = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        gpu = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers_available": available_providers(),
    }


@dataclass
class ShapeResult:
    provider: str
    variant: str
    batch: int
    tokens: int
    stats: dict[str, float]
    sequences_per_s: float
    tokens_per_s: float


@dataclass
class CorpusResult:
    provider: str
    variant: str
    notes: int
    windows: int
    seconds: float
    notes_per_s: float
    sequences_per_s: float
    stats: dict[str, float] = field(default_factory=dict)


def _synthetic_windows(plugin: Plugin, batch: int, tokens: int, seed: int = 0) -> list[Window]:
    """``batch`` windows of exactly ``tokens`` tokens ([CLS] … [SEP]), from random non-special vocabulary."""
    tok = plugin.session.tokenizer
    vocab = tok.get_vocab_size()
    special = {i for i in (tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")) if i is not None}
    cls_id = tok.token_to_id("[CLS]") or 0
    sep_id = tok.token_to_id("[SEP]") or 0
    rng = random.Random(seed)
    pool = [i for i in range(min(vocab, 30000)) if i not in special]
    windows = []
    for _ in range(batch):
        ids = [cls_id, *(rng.choice(pool) for _ in range(tokens - 2)), sep_id]
        windows.append(Window(0, ids, [0] * tokens, [(0, 0)] * tokens, 0, 0))
    return windows


def _timed(call: Callable[[], object], warmup: int, duration: float) -> list[float]:
    for _ in range(warmup):
        call()
    samples: list[float] = []
    deadline = time.perf_counter() + duration
    while True:
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
        if started >= deadline and len(samples) >= 5:
            return samples


def bench_shapes(
    plugin: Plugin,
    batches: Sequence[int],
    tokens: Sequence[int],
    warmup: int,
    duration: float,
    progress: Progress,
) -> list[ShapeResult]:
    results = []
    session = plugin.session
    for t in tokens:
        for b in batches:
            windows = _synthetic_windows(plugin, b, t)
            saved = session.batch_size
            session.batch_size = b  # one onnxruntime call per measured batch
            try:
                samples = _timed(partial(session.run, windows), warmup, duration)
            finally:
                session.batch_size = saved
            stats = summarize(samples)
            seq_s = b / (stats["mean_ms"] / 1000.0)
            progress(
                f"  {plugin.provider.removesuffix('ExecutionProvider'):<8} {plugin.variant:<5} "
                f"batch {b:>3} × {t:>4} tokens: p50 {stats['p50_ms']:8.2f} ms  p95 {stats['p95_ms']:8.2f} ms  "
                f"{seq_s:9.1f} seq/s"
            )
            results.append(ShapeResult(plugin.provider, plugin.variant, b, t, stats, seq_s, seq_s * t))
    return results


def read_corpus(path: Path) -> list[str]:
    """Texts to score: one per line (.txt), a ``text`` field per line (.jsonl), or FHIR (JSON/NDJSON)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FhirplugError(f"{path}: cannot read the corpus ({exc.strerror})") from exc
    if path.suffix == ".txt":
        texts = [line for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        try:
            texts = [str(json.loads(line)["text"]) for line in raw.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as exc:
            raise FhirplugError(f'{path}: each JSONL line needs a "text" field ({exc})') from exc
    else:
        from fhirplug.fhir.reader import read_fhir
        from fhirplug.manifest import READABLE_TYPES

        texts = [s.text for s in read_fhir(raw, resource_types=READABLE_TYPES, source_name=str(path)).sources]
    if not texts:
        raise FhirplugError(f"{path}: the corpus holds no text (expected .txt lines, .jsonl with text, or FHIR)")
    return texts


def bench_corpus(
    plugin: Plugin, texts: Sequence[str], batch: int, warmup: int, duration: float, progress: Progress
) -> CorpusResult:
    """End-to-end text throughput: tokenize + window + bucket + run + aggregate, ``batch`` notes per call."""
    chunks = [list(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    plugin.predict_texts(chunks[0])
    for _ in range(max(0, warmup - 1)):
        plugin.predict_texts(chunks[0])
    samples: list[float] = []
    notes = windows = 0
    started = time.perf_counter()
    while True:
        for chunk in chunks:
            t0 = time.perf_counter()
            plugin.predict_texts(chunk)
            samples.append(time.perf_counter() - t0)
            notes += len(chunk)
            windows += len(plugin.session.windows(chunk)) if notes <= len(texts) else 0
        if time.perf_counter() - started >= duration:
            break
    seconds = sum(samples)
    passes = notes / len(texts)
    result = CorpusResult(
        plugin.provider,
        plugin.variant,
        notes,
        windows,
        seconds,
        notes / seconds,
        windows * passes / seconds,
        summarize(samples),
    )
    progress(
        f"  {plugin.variant:<5} corpus of {len(texts)} notes ({windows} windows), batch {batch}: "
        f"{result.notes_per_s:.1f} notes/s, {result.sequences_per_s:.1f} seq/s"
    )
    return result


_COLD = """
import json, resource, sys, time
t0 = time.perf_counter()
import fhirplug
t1 = time.perf_counter()
p = fhirplug.load_plugin(sys.argv[1], allow_unsigned=True, provider=sys.argv[2], variant=sys.argv[3])
t2 = time.perf_counter()
p.predict({"resourceType": "Observation", "status": "final", "code": {"text": "note"},
           "valueString": "Patient seen in clinic; history reviewed and plan discussed."})
t3 = time.perf_counter()
def peak_rss_mb():
    # VmHWM is this process's own peak; ru_maxrss on Linux can carry the parent's peak over a fork.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_prediction_s": t3 - t2, "total_s": t3 - t0,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def cold_start(path: Path, provider: str, variant: str, runs: int = 3) -> dict[str, Any]:
    """Median over ``runs`` fresh interpreters of import + load (verify included) + first prediction."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", _COLD, str(path), provider, variant],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        wall = time.perf_counter() - started
        if out.returncode != 0:
            raise FhirplugError(f"cold-start process failed: {out.stderr.strip().splitlines()[-1:]}")
        sample = json.loads(out.stdout.strip().splitlines()[-1])
        sample["process_wall_s"] = wall
        samples.append(sample)
    return {key: float(np.median([s[key] for s in samples])) for key in samples[0]} | {"runs": runs}


def plan(plugin_path: Path, provider: str, variant: str) -> list[tuple[str, str]]:
    """(provider, variant) pairs to run; errors clearly when a GPU provider or a variant is not there."""
    manifest = verify_bundle(plugin_path, allow_unsigned=True).manifest
    offered = [v.precision for v in manifest.variants]
    variants = offered if variant == "all" else [variant]
    for v in variants:
        if v not in offered:
            raise ProviderError(f"plugin {manifest.name!r} has no {v!r} variant; it offers {', '.join(offered)}")
    have = available_providers()
    if provider == "auto":
        providers = [p for p in PROVIDERS.values() if p in have]
    else:
        wanted = provider_name(provider)
        if wanted not in have:
            raise ProviderError(
                f"execution provider {wanted} is not available on this machine (onnxruntime offers "
                f"{', '.join(have)}); GPU benchmarks need a GPU and fhirplug[gpu]"
            )
        providers = [wanted]
    pairs = []
    for prov in providers:
        for v in variants:
            spec = manifest.variant(v)
            if prov in spec.providers:
                pairs.append((prov, v))
    if not pairs:
        raise ProviderError(
            f"no variant among {variants} runs on {', '.join(providers)}; "
            f"variants: {', '.join(f'{s.precision}→{list(s.providers)}' for s in manifest.variants)}"
        )
    return pairs


def run_bench(
    plugin: str,
    *,
    provider: str,
    variant: str,
    batches: Sequence[int],
    tokens: Sequence[int] | None,
    corpus: Path | None,
    warmup: int,
    duration: float,
    threads: int | None,
    cold: bool,
    progress: Progress,
) -> dict[str, Any]:
    path = resolve_plugin(plugin)
    report: dict[str, Any] = {
        "plugin": str(path),
        "machine": machine(),
        "settings": {
            "batches": list(batches),
            "tokens": list(tokens or []),
            "corpus": str(corpus) if corpus else None,
            "warmup": warmup,
            "duration_s": duration,
            "threads": threads,
        },
        "shapes": [],
        "corpus": [],
        "cold_start": [],
    }
    texts = read_corpus(corpus) if corpus else None
    for prov, var in plan(path, provider, variant):
        short = next(k for k, v in PROVIDERS.items() if v == prov)
        loaded = load_plugin(path, allow_unsigned=True, provider=short, variant=var, threads=threads)
        progress(f"{loaded.name}: {var} on {loaded.provider}")
        if tokens:
            too_long = [t for t in tokens if t > loaded.manifest.tokenizer.max_tokens]
            if too_long:
                raise FhirplugError(
                    f"--tokens {too_long} exceed the plugin's window of {loaded.manifest.tokenizer.max_tokens} "
                    "tokens (longer notes are windowed; bench a corpus to measure them)"
                )
            report["shapes"] += [asdict(r) for r in bench_shapes(loaded, batches, tokens, warmup, duration, progress)]
        if texts:
            for b in batches:
                report["corpus"].append(asdict(bench_corpus(loaded, texts, b, warmup, duration, progress)))
        if cold:
            result = cold_start(path, short, var)
            progress(
                f"  cold start ({var}): {result['total_s'] * 1000:.0f} ms import+load+first prediction, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB"
            )
            report["cold_start"].append({"provider": prov, "variant": var, **result})
    return report


def plot(report: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("bench", "fhirplug bench --plot") from exc
    shapes = report["shapes"]
    if not shapes:
        raise FhirplugError("--plot needs shape results (--tokens), not only a corpus")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted({(s["provider"], s["variant"]) for s in shapes})
    labels = sorted({(s["batch"], s["tokens"]) for s in shapes}, key=lambda x: (x[1], x[0]))
    width = 0.8 / len(keys)
    for k, (prov, var) in enumerate(keys):
        values = []
        for batch, tok in labels:
            hit = [
                s for s in shapes if (s["provider"], s["variant"], s["batch"], s["tokens"]) == (prov, var, batch, tok)
            ]
            values.append(hit[0]["stats"]["p50_ms"] if hit else 0.0)
        ax.bar(
            [i + k * width for i in range(len(labels))],
            values,
            width,
            label=f"{var} ({prov.removesuffix('ExecutionProvider')})",
        )
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{b}×{t}" for b, t in labels])
    ax.set_xlabel("batch × tokens")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"fhirplug bench: {Path(report['plugin']).name} on {report['machine']['cpu']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
