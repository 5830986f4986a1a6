"""The ``fhirplug`` command line.

Expected failures never print a traceback: a :class:`~fhirplug.errors.FhirplugError` becomes a one-line message
and the error family's exit code.

Exit codes: 0 ok · 1 other fhirplug error · 2 usage error (click) · 3 plugin not found, invalid, tampered or
untrusted · 4 FHIR input with errors (good input is still predicted and written) · 5 provider or variant not
available · 6 a missing extra · 7 convert failed (bad recipe or data, fp32 parity, a ``parity.require``
variant) · 8 convert wrote a bundle without some variants (they failed the parity gate; see parity.json).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from fhirplug import __version__
from fhirplug.errors import FhirplugError, InputError, MissingExtraError

F = TypeVar("F", bound=Callable[..., Any])


class FhirplugClickError(click.ClickException):
    """A ClickException whose exit code is the FhirplugError family's."""

    def __init__(self, error: FhirplugError) -> None:
        super().__init__(str(error))
        # click declares exit_code a ClassVar; one instance per error family is simpler than a class each.
        self.exit_code = error.exit_code  # type: ignore[misc]


def _translate(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FhirplugError as exc:
            raise FhirplugClickError(exc) from exc

    return cast(F, wrapper)


def _load_options(func: F) -> F:
    options = [
        click.option(
            "--trusted-key",
            "trusted_keys",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False),
            help="PEM ed25519 public key the plugin must be signed with (repeatable). Given any, an unsigned "
            "plugin or one signed by another key is refused.",
        ),
        click.option(
            "--allow-unsigned",
            is_flag=True,
            help="Accept an unsigned plugin from a source you trust (its file hashes are still checked). "
            "First-party plugins need no flag: fhirplug ships their pins. Cannot weaken --trusted-key.",
        ),
        click.option(
            "--provider",
            type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
            default="auto",
            show_default=True,
            help="Execution provider; auto tries TensorRT, CUDA, then CPU.",
        ),
        click.option(
            "--variant",
            type=click.Choice(["auto", "fp32", "int8", "fp16"]),
            default="auto",
            show_default=True,
            help="Model variant; auto is fp16 on a GPU and int8 on the CPU.",
        ),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads."),
    ]
    func = _trust_policy(func)
    for option in reversed(options):
        func = option(func)
    return func


#: No longer read. An environment variable that downgrades trust does so silently, for every process that
#: inherits it (CI jobs, containers, shells): the choice to load an unsigned plugin belongs on the command line.
_ALLOW_UNSIGNED_ENV = "FHIRPLUG_ALLOW_UNSIGNED"


def _trust_policy(func: F) -> F:
    """Refuse --allow-unsigned beside --trusted-key, and say so when the retired env var is still set."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("trusted_keys") and kwargs.get("allow_unsigned"):
            raise click.UsageError(
                "--allow-unsigned cannot be combined with --trusted-key: a trust list requires a signature by one "
                "of its keys, and an unsigned plugin is refused whatever else is set; drop one of the two"
            )
        if os.environ.get(_ALLOW_UNSIGNED_ENV):
            click.echo(
                f"warning: {_ALLOW_UNSIGNED_ENV} is set but no longer read (it would downgrade trust for every "
                "process); pass --allow-unsigned on the command line for an unsigned plugin you trust",
                err=True,
            )
        return func(*args, **kwargs)

    return cast(F, wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fhirplug")
def main() -> None:
    """fhirplug: clinical NLP plugins that read FHIR R4 and answer with coded FHIR.

    A plugin is a verified bundle (manifest, ONNX model variants, tokenizer, label→code map, hashes, optional
    signature). Give a plugin as a bundle directory or by the name `fhirplug plugins` lists.
    """


@main.command()
@click.argument("plugin")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and bundle facts as JSON.")
@_translate
def inspect(plugin: str, as_json: bool) -> None:
    """Describe PLUGIN: task, codes, variants, calibration, metrics (reads the manifest only)."""
    from fhirplug._describe import describe_bundle

    click.echo(describe_bundle(plugin, as_json=as_json))


@main.command()
@click.argument("plugin")
@_load_options
@_translate
def verify(
    plugin: str,
    trusted_keys: Sequence[str],
    allow_unsigned: bool,
    provider: str,
    variant: str,
    threads: int | None,
) -> None:
    """Check every file's sha256, how the plugin is trusted, and that the model loads and matches its manifest.

    Trust is a signature by a --trusted-key, the pin fhirplug ships for a first-party plugin, or --allow-unsigned;
    the output says which.
    """
    from fhirplug.bundle import verify_bundle
    from fhirplug.plugin import Plugin
    from fhirplug.registry import resolve_plugin

    bundle = verify_bundle(resolve_plugin(plugin), trusted_keys=trusted_keys, allow_unsigned=allow_unsigned)
    loaded = Plugin(bundle, provider=provider, variant=variant, threads=threads)
    files = len(loaded.manifest.files) + len(loaded.manifest.variants)
    click.echo(
        f"OK {loaded.name} {loaded.manifest.version}: {files} files match their sha256; trusted: {bundle.trust}; "
        f"loads {loaded.variant} on {loaded.provider}; manifest sha256 {loaded.manifest_sha256}"
    )


def _read_inputs(inputs: Sequence[str], limit: int) -> tuple[list[tuple[str, bytes]], list[Any]]:
    """Each input's bytes (at most ``limit``), and an issue for each input that cannot be read: one missing file,
    a FIFO or an endless stdin never costs the others (they are still predicted and written)."""
    from fhirplug._inputs import read_input_file, read_input_stream

    out: list[tuple[str, bytes]] = []
    issues: list[Any] = []
    for name in inputs:
        if name == "-":
            data, problem = read_input_stream(sys.stdin.buffer, limit)
            name = "<stdin>"
        else:
            data, problem = read_input_file(name, limit)
        if data is not None:
            out.append((name, data))
        elif problem is not None:
            issues.append(problem)
    return out, issues


def _write(path: str, text: str) -> None:
    """Write an output file, or stop with a one-line message (exit 1) when it cannot be written."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise FhirplugClickError(FhirplugError(f"{path}: cannot write ({exc.strerror or exc})")) from exc


def _budget_options(func: F) -> F:
    """The :class:`~fhirplug.Budget` flags ``predict`` and ``serve`` share (defaults: ``Budget()``'s)."""
    from fhirplug._budget import DEFAULT_BUDGET as D

    options = [
        click.option(
            "--max-chars",
            type=click.IntRange(min=1),
            default=None,
            help=f"Longest text read from one element (default {D.max_chars:,} characters); longer ones are "
            "reported as too-costly.",
        ),
        click.option(
            "--max-input-chars",
            type=click.IntRange(min=1),
            default=None,
            help=f"Total characters of the texts of one input or request (default {D.max_input_chars:,}); "
            "texts past it are reported, the ones before predicted.",
        ),
        click.option(
            "--max-input-windows",
            type=click.IntRange(min=1),
            default=None,
            help=f"Total model windows of one input or request (default {D.max_input_windows:,}).",
        ),
        click.option(
            "--max-windows-in-flight",
            type=click.IntRange(min=1),
            default=None,
            help=f"Tokenized windows all requests together hold at once (default {D.max_windows_in_flight:,}).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


#: ``serve`` and ``score``: ``load_plugin(evidence_segments=)``.
_evidence_option = click.option(
    "--evidence-segments",
    type=click.IntRange(min=0),
    default=None,
    help="Text classification: sentences occluded per predicted note to find its evidence (default 8: up to 8 "
    "more copies of the note through the model); 0: the evidence is the model window, one model pass a note.",
)


def _budget_from(**given: int | None) -> Any:
    """A Budget from the flags given (the rest keep their defaults)."""
    from fhirplug._budget import Budget

    return Budget(**{name: value for name, value in given.items() if value is not None})


@main.command()
@click.argument("plugin")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["bundle", "transaction", "ndjson"]),
    default="bundle",
    show_default=True,
    help="collection Bundle, transaction Bundle (POST-ready), or NDJSON.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Write here, not stdout.")
@click.option(
    "--outcome",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the OperationOutcome (all issues) as JSON here.",
)
@click.option(
    "--max-request-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Largest input file or standard input (default 50 MiB); a larger one is reported as too-costly unread.",
)
@click.option(
    "--explain",
    is_flag=True,
    help="Text classification: score each sentence of a note by occlusion (up to 32 segments), print every "
    "prediction's contributions on stderr and write its top spans, with contributions, into the output.",
)
@_budget_options
@_load_options
@_translate
def predict(
    plugin: str,
    inputs: Sequence[str],
    fmt: str,
    output: str | None,
    outcome: str | None,
    max_request_bytes: int | None,
    explain: bool,
    max_chars: int | None,
    max_input_chars: int | None,
    max_input_windows: int | None,
    max_windows_in_flight: int | None,
    trusted_keys: Sequence[str],
    allow_unsigned: bool,
    provider: str,
    variant: str,
    threads: int | None,
) -> None:
    """Predict codes for FHIR INPUTS (JSON resources, Bundles or NDJSON files; - for stdin).

    Writes the generated resources (RiskAssessment or Condition per prediction, a Device and one Provenance).
    Problems in the input are reported on stderr as OperationOutcome issues and give exit code 4; every good
    resource is still predicted and written. The budget (--max-*) holds for all INPUTS together: texts past it
    are reported as too-costly and the ones before are predicted.
    """
    from fhirplug.fhir.outcome import Issue
    from fhirplug.plugin import load_plugin

    budget = _budget_from(
        max_request_bytes=max_request_bytes,
        max_chars=max_chars,
        max_input_chars=max_input_chars,
        max_input_windows=max_input_windows,
        max_windows_in_flight=max_windows_in_flight,
    )

    loaded = load_plugin(
        plugin,
        trusted_keys=trusted_keys,
        allow_unsigned=allow_unsigned,
        provider=provider,
        variant=variant,
        threads=threads,
        budget=budget,
    )
    readable, unreadable = _read_inputs(inputs, budget.max_request_bytes)
    result = loaded.predict_many(readable, explain=explain)
    result.issues[:0] = unreadable
    if fmt == "ndjson":
        text = result.to_ndjson()
    else:
        text = json.dumps(result.to_fhir("transaction" if fmt == "transaction" else "collection"), indent=2) + "\n"
    if output:
        _write(output, text)
    else:
        click.echo(text, nl=False)
    if outcome:
        _write(outcome, json.dumps(result.outcome(), indent=2) + "\n")
    if explain:
        for line in _explanation_lines(result.predictions):
            click.echo(line, err=True)
    problems: list[Issue] = [i for i in result.issues if i.severity != "information"]
    for issue in problems:
        where = f" at {', '.join(issue.expression)}" if issue.expression else ""
        origin = f"{issue.source}: " if issue.source else ""
        click.echo(f"{issue.severity} [{issue.code}] {origin}{issue.diagnostics}{where}", err=True)
    click.echo(
        f"{len(result.predictions)} prediction(s) from {len(result.sources)} text(s); "
        f"{sum(i.is_error for i in result.issues)} error(s); {loaded.variant} on {loaded.provider}",
        err=True,
    )
    if result.has_errors:
        sys.exit(InputError.exit_code)


def _explanation_lines(predictions: Sequence[Any]) -> list[str]:
    """``predict --explain`` on stderr: per prediction, its segments by contribution (original offsets)."""
    lines: list[str] = []
    for p in predictions:
        if "explanation" not in p.details:
            continue
        how = p.details.get("evidence", "window")
        why = f": {p.details['evidence_reason']}" if p.details.get("evidence_reason") else ""
        lines.append(
            f"explain {p.evidence.reference} {p.code} {p.display} (p={p.probability:.3f}; evidence: {how}{why})"
        )
        for part in p.details["explanation"]:
            text = " ".join(str(part["text"]).split())
            text = text if len(text) <= 100 else text[:99].rstrip() + "…"
            lines.append(f"  {part['contribution']:+.4f} [{part['start']}:{part['end']}] {text}")
    return lines


@main.command()
@click.argument("plugin_names", metavar="PLUGIN...", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option(
    "--jwks",
    multiple=True,
    metavar="[ISS=]FILE_OR_URL",
    help="JWKS (JSON file or https URL) of a CDS client's signing keys (repeatable). ISS=FILE_OR_URL binds it to "
    "the --issuer ISS: only that issuer's tokens verify with it. Required form with two or more --issuer.",
)
@click.option("--issuer", "issuers", multiple=True, metavar="ISS", help="An allowed JWT iss (repeatable).")
@click.option(
    "--jku-allow",
    multiple=True,
    metavar="[ISS=]URL",
    help="URL prefix a token's jku header may point to (repeatable); ISS=URL allows it for the --issuer ISS "
    "only (required form with two or more --issuer).",
)
@click.option(
    "--public-url",
    metavar="URL",
    help="This service's public base URL behind a proxy (https://cds.example.org): JWT aud is checked against it.",
)
@click.option(
    "--bearer-token-file",
    "bearer_token_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="File of static bearer tokens, one a line (≥ 32 characters), for $predict clients that are not CDS "
    "clients (repeatable).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="No authentication at all: anyone who reaches the port is served. Local development only.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Allow browser calls from this exact origin (repeatable; default: no CORS headers, no * ever).",
)
@click.option(
    "--fhir-server-allow",
    multiple=True,
    metavar="URL",
    help="fhirServer URL prefix the service may fetch prefetch from (repeatable; default: any https URL and "
    "http on loopback).",
)
@click.option("--hook", default="patient-view", show_default=True, help="The CDS Hooks hook every service answers.")
@click.option(
    "--min-probability",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Leave predictions below this probability off the cards and out of the record suggestion "
    "(the plugin's thresholds apply first).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Most texts of concurrent requests per model run (1: no micro-batching).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long a request waits for batch-mates.",
)
@click.option(
    "--queue",
    "queue_size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Requests waiting per plugin at most; beyond it, 503 with Retry-After.",
)
@click.option(
    "--max-request-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Largest request body (default 50 MiB); a larger one is answered 413 without being read.",
)
@_evidence_option
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes accepting on the one socket, each loading every plugin (memory × N) with "
    "cores/N onnxruntime threads unless --threads; they share one jti replay cache. A dead worker is restarted.",
)
@_budget_options
@_load_options
@_translate
def serve(
    plugin_names: Sequence[str],
    host: str,
    port: int,
    jwks: Sequence[str],
    issuers: Sequence[str],
    jku_allow: Sequence[str],
    public_url: str | None,
    bearer_token_files: Sequence[str],
    insecure: bool,
    cors_origins: Sequence[str],
    fhir_server_allow: Sequence[str],
    hook: str,
    min_probability: float,
    max_batch: int,
    max_wait_ms: float,
    queue_size: int,
    max_request_bytes: int | None,
    evidence_segments: int | None,
    workers: int,
    max_chars: int | None,
    max_input_chars: int | None,
    max_input_windows: int | None,
    max_windows_in_flight: int | None,
    trusted_keys: Sequence[str],
    allow_unsigned: bool,
    provider: str,
    variant: str,
    threads: int | None,
) -> None:
    """Serve PLUGINs over HTTP: CDS Hooks 2.0 (/cds-services) and FHIR $predict (/fhir/$predict).

    Every call needs a token: a JWT signed by a --jwks key with an --issuer iss and the called URL as aud (CDS
    Hooks 2.0), or a static bearer token (--bearer-token-file). With two or more --issuer, bind each one's keys
    (--jwks ISS=FILE_OR_URL, --jku-allow ISS=URL): a token verifies only with its own issuer's keys. --insecure
    turns authentication off, for local development. Each request is held to the budget (--max-*); concurrent
    requests are micro-batched (--max-batch, --max-wait-ms) and a full queue (--queue) is answered 503.
    --workers N serves from N supervised processes sharing one jti replay cache. Needs the [serve] extra.
    """
    if insecure and (jwks or issuers or jku_allow or bearer_token_files):
        raise click.UsageError("--insecure turns authentication off: drop it, or drop --jwks/--issuer/--bearer-*")
    if not insecure and not bearer_token_files and not (issuers and (jwks or jku_allow)):
        raise click.UsageError(
            "give --jwks FILE_OR_URL and --issuer ISS (CDS clients) or --bearer-token-file F, or --insecure for "
            "local development"
        )
    if "*" in cors_origins:
        raise click.UsageError("--cors-origin takes exact origins (https://ehr.example.org), not *")
    try:
        from fhirplug.serve import AuthConfig, ServeConfig, create_app
        from fhirplug.serve._auth import IssuerKeys
        from fhirplug.serve._server import AppSpec, bind, log_to_stderr, serve_workers, uvicorn_server
    except ImportError as exc:
        raise MissingExtraError("serve", "fhirplug serve") from exc

    def binding(option: str, value: str) -> tuple[str | None, str]:
        """(ISS, SOURCE) of ``ISS=SOURCE`` for the longest --issuer that prefixes it, else (None, value)."""
        matches = [iss for iss in issuers if value.startswith(iss + "=")]
        if matches:
            issuer = max(matches, key=len)
            return issuer, value[len(issuer) + 1 :]
        if "=" in value and not (option == "--jwks" and Path(value).is_file()):
            raise click.UsageError(
                f"{option} {value}: the part before '=' is not one of the --issuer values; write {option} ISS=..., "
                "with ISS exactly as given to --issuer"
            )
        return None, value

    # Keys bound to an issuer (ISS=SOURCE) verify that issuer's tokens only; unbound ones only with one issuer.
    bound: dict[str, dict[str, list[str]]] = {}
    unbound: dict[str, list[str]] = {"jwks": [], "jku_allow": []}
    for option, setting, values in (("--jwks", "jwks", jwks), ("--jku-allow", "jku_allow", jku_allow)):
        for value in values:
            issuer, source = binding(option, value)
            if issuer is None:
                unbound[setting].append(source)
            else:
                bound.setdefault(issuer, {"jwks": [], "jku_allow": []})[setting].append(source)
    if len(issuers) > 1:
        for option, setting in (("--jwks", "jwks"), ("--jku-allow", "jku_allow")):
            if unbound[setting]:
                raise click.UsageError(
                    f"{option} {unbound[setting][0]} is not bound to an issuer, but {len(issuers)} --issuer values "
                    f"are given: any of its keys would verify a token claiming any of them; write {option} "
                    f"ISS={'FILE_OR_URL' if setting == 'jwks' else 'URL'} for each issuer"
                )
        for issuer in issuers:
            if issuer not in bound:
                raise click.UsageError(
                    f"--issuer {issuer} has no keys: give --jwks {issuer}=FILE_OR_URL or --jku-allow {issuer}=URL"
                )
    tokens: list[str] = []
    for path in bearer_token_files:
        tokens += [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    auth = AuthConfig(
        jwks=tuple(unbound["jwks"]),
        issuers=tuple(issuers),
        jku_allow=tuple(unbound["jku_allow"]),
        issuer_keys={
            issuer: IssuerKeys(jwks=tuple(keys["jwks"]), jku_allow=tuple(keys["jku_allow"]))
            for issuer, keys in bound.items()
        },
        public_url=public_url,
        bearer_tokens=tuple(tokens),
        insecure=insecure,
    )
    budget = _budget_from(
        max_request_bytes=max_request_bytes,
        max_chars=max_chars,
        max_input_chars=max_input_chars,
        max_input_windows=max_input_windows,
        max_windows_in_flight=max_windows_in_flight,
    )
    if threads is None and workers > 1:
        # N sessions each using every core would oversubscribe the CPU N times over.
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        threads = max(1, cores // workers)
    config = ServeConfig(
        auth=auth,
        hook=hook,
        min_probability=min_probability,
        cors_origins=tuple(cors_origins),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        fhir_server_allow=tuple(fhir_server_allow),
    )
    spec = AppSpec(
        plugins=tuple(plugin_names),
        config=config,
        load_options={
            "trusted_keys": tuple(trusted_keys),
            "allow_unsigned": allow_unsigned,
            "provider": provider,
            "variant": variant,
            "threads": threads,
            "budget": budget,
            "evidence_segments": evidence_segments,
        },
    )

    def announce(sock: Any, names: Sequence[str]) -> None:
        bound_host, bound_port = sock.getsockname()[:2]
        base = f"http://{bound_host}:{bound_port}"
        for name in names:
            click.echo(f"CDS service {name} ({hook}): POST {base}/cds-services/{name}", err=True)
        click.echo(f"discovery: GET {base}/cds-services · FHIR: POST {base}/fhir/$predict — Ctrl-C stops", err=True)

    log_to_stderr()  # one JSON line per request on stderr, unless the embedding program set logging up
    if workers == 1:
        plugins = spec.load()  # loaded before listening, so no connection waits on a process still loading
        sock = bind(host, port)
        try:
            app = create_app(plugins, config)
            announce(sock, list(app.state.fhirplug.services))
            uvicorn_server(app).run(sockets=[sock])
        finally:
            sock.close()
        return
    # The supervisor binds once; each worker loads the plugins itself and accepts on this socket.
    sock = bind(host, port)
    try:
        click.echo(f"starting {workers} workers, {threads} onnxruntime threads each", err=True)
        serve_workers(spec, sock, workers, announce=lambda names: announce(sock, names))
    finally:
        sock.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print name → bundle path as JSON.")
@_translate
def plugins(as_json: bool) -> None:
    """List discovered plugins (entry points, FHIRPLUG_PLUGIN_PATH, this checkout's plugins/)."""
    from fhirplug._describe import list_plugins

    click.echo(list_plugins(as_json=as_json))


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the key pair.")
@click.option("--name", default="fhirplug", show_default=True, help="File name stem of the key pair.")
@_translate
def keygen(out_dir: str, name: str) -> None:
    """Make an ed25519 key pair for signing plugins (NAME.key private, NAME.pub public, PEM)."""
    from fhirplug.bundle import generate_keypair

    folder = Path(out_dir)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if private.exists():
            raise FhirplugClickError(FhirplugError(f"{private} exists; refusing to overwrite a private key"))
        generate_keypair(private, public)
    except OSError as exc:
        raise FhirplugClickError(FhirplugError(f"{folder}: cannot write the key pair ({exc.strerror or exc})")) from exc
    click.echo(f"private key: {private} (keep it secret)\npublic key:  {public} (give it to users: --trusted-key)")


class _LazyConvert(click.Command):
    """``fhirplug convert`` lives in fhirplug_convert (the [train] extra); import it only when called."""

    def __init__(self) -> None:
        super().__init__(
            "convert",
            help="Fine-tune, export, quantize, parity-check and package a plugin from a RECIPE "
            "(needs the [train] extra).",
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
            add_help_option=False,
        )

    def _real(self) -> click.Command:
        try:
            from fhirplug_convert.cli import convert as real
        except ImportError as exc:
            raise FhirplugClickError(MissingExtraError("train", "fhirplug convert")) from exc
        return cast(click.Command, real)

    def invoke(self, ctx: click.Context) -> Any:
        real = self._real()
        return real.main(ctx.args, prog_name=ctx.command_path, standalone_mode=False)

    def get_help(self, ctx: click.Context) -> str:
        try:
            return self._real().get_help(ctx)
        except click.ClickException as exc:
            return f"{self.help}\n\n{exc.format_message()}"


main.add_command(_LazyConvert())


@main.command()
@click.option("--train", is_flag=True, help="Rebuild the plugin from the default recipe first (needs [train]).")
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Training steps for --train (a short schedule).",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    default=".fhirplug-demo",
    show_default=True,
    help="Where --train writes its bundle.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default="fhirplug-demo-output.json",
    show_default=True,
    help="The output collection Bundle.",
)
@_translate
def demo(train: bool, max_steps: int, work_dir: str, output: str) -> None:
    """Run the default plugin over the shipped example FHIR inputs: table, output Bundle, latency."""
    from dataclasses import replace

    from fhirplug import _demo

    if train:
        plugin, load_s = _demo.train_default(click.echo, Path(work_dir), max_steps)
    else:
        plugin, load_s = _demo.load_default(click.echo)
    folder = _demo.plugin_dir()
    examples = sorted((folder / "examples").glob("*.json"))
    run = replace(_demo.run_examples(plugin, examples, Path(output)), load_s=load_s)
    click.echo(f"\n{len(examples)} example FHIR input(s) from {folder.relative_to(_demo.CHECKOUT)}/examples\n")
    click.echo(_demo.render(run, _demo.load_expected(folder)))
    click.echo(_demo.latency_line(run))
    click.echo(f"wrote the output Bundle (RiskAssessment per code, AIModelCard, AIDevice, AIProvenance) to {output}")


def _sizes(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers like 1,8,32, got {value!r}", param_hint=what
        ) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise click.BadParameter(f"sizes must be positive integers, got {value!r}", param_hint=what)
    return sizes


@main.command()
@click.argument("plugin")
@click.option(
    "--provider",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="auto",
    show_default=True,
    help="auto benchmarks every available provider the plugin has a variant for.",
)
@click.option("--variant", type=click.Choice(["fp32", "int8", "fp16", "all"]), default="all", show_default=True)
@click.option("--batch", "batch", default="1,8,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--tokens", default=None, help="Sequence lengths (default 32,128 and the plugin's window).")
@click.option(
    "--corpus",
    type=click.Path(dir_okay=False),
    default=None,
    help="Texts (.txt lines, .jsonl 'text', or FHIR JSON/NDJSON) for end-to-end throughput.",
)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed calls per shape.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    show_default=True,
    help="Seconds timed per shape.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option(
    "--cold-start/--no-cold-start",
    default=True,
    show_default=True,
    help="Measure import + load + first prediction in fresh processes.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG of latency by shape and variant (needs the [bench] extra).",
)
@_translate
def bench(
    plugin: str,
    provider: str,
    variant: str,
    batch: str,
    tokens: str | None,
    corpus: str | None,
    warmup: int,
    duration: float,
    threads: int | None,
    cold_start: bool,
    json_out: str | None,
    plot_out: str | None,
) -> None:
    """Latency (p50/p95/p99), throughput, cold start and peak RSS of PLUGIN, per provider × variant × shape."""
    from fhirplug import _bench
    from fhirplug.bundle import read_manifest
    from fhirplug.registry import resolve_plugin

    batches = _sizes(batch, "--batch") or [1]
    token_list = _sizes(tokens, "--tokens")
    if plot_out:  # fail before minutes of measuring, not after
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise FhirplugClickError(MissingExtraError("bench", "fhirplug bench --plot"))
    if corpus is not None and not Path(corpus).is_file():
        raise FhirplugClickError(FhirplugError(f"{corpus}: the corpus file does not exist or is not a file"))
    if token_list is None and corpus is None:
        window = read_manifest(resolve_plugin(plugin))[0].tokenizer.max_tokens
        token_list = sorted({t for t in (32, 128, window) if t <= window})
    report = _bench.run_bench(
        plugin,
        provider=provider,
        variant=variant,
        batches=batches,
        tokens=token_list,
        corpus=Path(corpus) if corpus else None,
        warmup=warmup,
        duration=duration,
        threads=threads,
        cold=cold_start,
        progress=lambda line: click.echo(line, err=True),
    )
    if json_out:
        _write(json_out, json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        _bench.plot(report, Path(plot_out))
        click.echo(f"wrote {plot_out}", err=True)
    if not json_out:
        click.echo(json.dumps(report, indent=2))


@main.command()
@click.argument("plugin")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder (new, empty, or this run's to resume).")
@click.option(
    "--engine",
    type=click.Choice(["local", "spark"]),
    default="local",
    show_default=True,
    help="local worker processes, or Apache Spark (needs the [spark] extra).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Local worker processes, each holding one verified plugin (Spark: local[N] unless --spark-master).",
)
@click.option("--spark-master", default=None, help="Spark master URL for --engine spark (default local[WORKERS]).")
@click.option(
    "--chunk-lines",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Input lines per chunk: the unit of work and of what a killed run redoes.",
)
@click.option(
    "--transaction-time",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
    default=None,
    help="The run's time in every resource and the manifest (default: when the run first started). Naive = UTC.",
)
@click.option("--restart", is_flag=True, help="Discard another (or a finished) run found in --out and start anew.")
@click.option(
    "--max-request-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Longest input line (default 50 MiB); a longer one is reported as too-costly unread.",
)
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: on a terminal).")
@_evidence_option
@_budget_options
@_load_options
@_translate
def score(
    plugin: str,
    inputs: Sequence[str],
    out_dir: str,
    engine: str,
    workers: int,
    spark_master: str | None,
    chunk_lines: int,
    transaction_time: Any,
    restart: bool,
    max_request_bytes: int | None,
    progress: bool | None,
    evidence_segments: int | None,
    max_chars: int | None,
    max_input_chars: int | None,
    max_input_windows: int | None,
    max_windows_in_flight: int | None,
    trusted_keys: Sequence[str],
    allow_unsigned: bool,
    provider: str,
    variant: str,
    threads: int | None,
) -> None:
    """Score FHIR Bulk Data NDJSON: INPUTS are .ndjson / .ndjson.gz files, folders, or Bulk Data export folders.

    Writes --out as an export is laid out: one NDJSON per generated type (RiskAssessment or Condition, Device,
    the model card's DocumentReference, Provenance), OperationOutcome.ndjson (every bad line, as file:line) and
    manifest.json (counts, plugin hash, input hashes, transactionTime). Resource types the plugin does not read
    are skipped with a count. Killed or interrupted, the same command resumes and ends with the same bytes.
    Exit 4 when some lines had errors (everything else is still scored and written).
    """
    from fhirplug.bulk import score as run_score

    budget = _budget_from(
        max_request_bytes=max_request_bytes,
        max_chars=max_chars,
        max_input_chars=max_input_chars,
        max_input_windows=max_input_windows,
        max_windows_in_flight=max_windows_in_flight,
    )
    result = run_score(
        plugin,
        list(inputs),
        out_dir,
        engine="spark" if engine == "spark" else "local",
        workers=workers,
        trusted_keys=trusted_keys,
        allow_unsigned=allow_unsigned,
        provider=provider,
        variant=variant,
        threads=threads,
        budget=budget,
        chunk_lines=chunk_lines,
        transaction_time=transaction_time,
        restart=restart,
        progress=progress,
        spark_master=spark_master,
        evidence_segments=evidence_segments,
    )
    skipped = ", ".join(f"{kind} ×{n:,}" for kind, n in result.skipped.items())
    written = ", ".join(f"{kind} {n:,}" for kind, n in sorted(result.counts.items()))
    how = (
        "already complete; nothing redone"
        if result.already_complete
        else (f"resumed after {result.resumed_chunks} finished chunk(s)" if result.resumed_chunks else "done")
    )
    click.echo(
        f"{result.lines:,} line(s), {result.notes:,} note(s), {result.predictions:,} prediction(s); "
        f"{result.error_lines:,} line(s) with errors; skipped: {skipped or 'none'}; wrote {written or 'nothing'} "
        f"to {result.out} ({how})",
        err=True,
    )
    if result.error_lines:
        sys.exit(InputError.exit_code)
