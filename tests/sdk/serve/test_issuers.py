"""Keys bound to issuers: with two EHRs configured, EHR B's correctly signed token claiming EHR A's iss is refused,
whatever the kid, the key source (file, URL, jku) or the cache; each EHR still gets in with its own keys."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

jwt = pytest.importorskip("jwt")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from jwt.algorithms import ECAlgorithm  # noqa: E402

from fhirplug.cli import main  # noqa: E402
from fhirplug.errors import UsageError  # noqa: E402
from fhirplug.serve import AuthConfig, Authenticator, AuthError, IssuerKeys, ServeConfig  # noqa: E402
from tests.conftest import TINY_PLUGIN  # noqa: E402

ISS_A = "https://ehr-a.example.org"
ISS_B = "https://ehr-b.example.org"
AUD = "https://cds.example.org/cds-services/tiny-notes"
KEY_A = ec.generate_private_key(ec.SECP384R1())
KEY_B = ec.generate_private_key(ec.SECP384R1())


def public_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig", "alg": "ES384"}


def token(key: ec.EllipticCurvePrivateKey, iss: str, kid: str, aud: str = AUD, **headers: Any) -> str:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4()), "sub": "client"}
    return str(jwt.encode(claims, key, algorithm="ES384", headers={"kid": kid, **headers}))


def outcome(config: AuthConfig, *tokens: str, http: Any = None) -> list[str]:
    """Each token's result through one authenticator: the principal's issuer, or the refusal's reason."""

    async def go() -> list[str]:
        async with Authenticator(config) as auth:
            results = []
            for t in tokens:
                try:
                    results.append(str((await auth.authenticate("Bearer " + t, AUD)).issuer))
                except AuthError as exc:
                    results.append(exc.reason)
            return results

    return asyncio.run(go())


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "ehr-a-jwks.json", tmp_path / "ehr-b-jwks.json"
    a.write_text(json.dumps({"keys": [public_jwk(KEY_A, "a-1")]}))
    b.write_text(json.dumps({"keys": [public_jwk(KEY_B, "b-1")]}))
    return a, b


def two_ehrs(a: Path | str, b: Path | str) -> AuthConfig:
    return AuthConfig(issuer_keys={ISS_A: IssuerKeys(jwks=(str(a),)), ISS_B: IssuerKeys(jwks=(str(b),))})


# --- a small loopback JWKS host -------------------------------------------------------------------------------


class Host:
    def __init__(self) -> None:
        self.documents: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        self.base = ""


@pytest.fixture
def host() -> Iterator[Host]:
    state = Host()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            body = state.documents.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def publish(host: Host, path: str, *keys: dict[str, Any]) -> str:
    host.documents[path] = json.dumps({"keys": list(keys)}).encode()
    return host.base + path


# --- files ------------------------------------------------------------------------------------------------------


def test_ehr_b_cannot_sign_as_ehr_a_and_each_ehr_gets_in_with_its_own_keys(key_files: tuple[Path, Path]) -> None:
    config = two_ehrs(*key_files)
    assert outcome(
        config,
        token(KEY_A, ISS_A, "a-1"),
        token(KEY_B, ISS_B, "b-1"),
        token(KEY_B, ISS_A, "b-1"),  # B's own key and kid, claiming A: A's set has no such kid
        token(KEY_B, ISS_A, "a-1"),  # B's key under A's kid: the kid is found, the signature is not A's
        token(KEY_A, ISS_B, "a-1"),  # and the other way round
    ) == [ISS_A, ISS_B, "unknown_kid", "bad_signature", "unknown_kid"]


def test_a_kid_both_issuers_use_selects_each_issuers_own_key(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"keys": [public_jwk(KEY_A, "key-1")]}))
    b.write_text(json.dumps({"keys": [public_jwk(KEY_B, "key-1")]}))
    assert outcome(
        two_ehrs(a, b),
        token(KEY_A, ISS_A, "key-1"),
        token(KEY_B, ISS_B, "key-1"),
        token(KEY_B, ISS_A, "key-1"),
        token(KEY_A, ISS_B, "key-1"),
    ) == [ISS_A, ISS_B, "bad_signature", "bad_signature"]


def test_one_file_bound_to_two_issuers_is_trusted_for_both(key_files: tuple[Path, Path]) -> None:
    # The operator's explicit choice (one EHR vendor, two iss values): allowed, and said by the config itself.
    shared = key_files[0]
    config = AuthConfig(issuer_keys={ISS_A: IssuerKeys(jwks=(str(shared),)), ISS_B: IssuerKeys(jwks=(str(shared),))})
    assert outcome(config, token(KEY_A, ISS_A, "a-1"), token(KEY_A, ISS_B, "a-1")) == [ISS_A, ISS_B]


# --- URLs and jku: the fetched sets are keyed by issuer ------------------------------------------------------------


def test_url_sets_with_colliding_kids_are_not_mixed_across_issuers(host: Host) -> None:
    url_a = publish(host, "/a/jwks", public_jwk(KEY_A, "k"))
    url_b = publish(host, "/b/jwks", public_jwk(KEY_B, "k"))
    config = two_ehrs(url_a, url_b)
    # B first, so B's set is cached before A's token arrives: a cache keyed by kid or URL alone would now mix.
    assert outcome(
        config,
        token(KEY_B, ISS_B, "k"),
        token(KEY_B, ISS_A, "k"),
        token(KEY_A, ISS_A, "k"),
        token(KEY_A, ISS_B, "k"),
    ) == [ISS_B, "bad_signature", ISS_A, "bad_signature"]
    assert host.hits == Counter({"/a/jwks": 1, "/b/jwks": 1})


def test_a_jku_under_another_issuers_prefix_is_refused_without_a_fetch(host: Host) -> None:
    url_b = publish(host, "/b/jwks", public_jwk(KEY_B, "b-1"))
    config = AuthConfig(
        issuer_keys={
            ISS_A: IssuerKeys(jku_allow=(host.base + "/a/",)),
            ISS_B: IssuerKeys(jku_allow=(host.base + "/b/",)),
        }
    )
    forged = token(KEY_B, ISS_A, "b-1", jku=url_b)
    assert outcome(config, forged) == ["bad_jku"]
    assert host.hits["/b/jwks"] == 0
    assert outcome(config, token(KEY_B, ISS_B, "b-1", jku=url_b)) == [ISS_B]


def test_a_jku_two_issuers_may_use_is_cached_per_issuer(host: Host) -> None:
    # Both issuers allow one vendor prefix: each fetches the set for itself; the keys are A's and B's alike
    # by configuration, but one issuer's cached copy is never read for the other.
    url = publish(host, "/vendor/jwks", public_jwk(KEY_A, "v-1"))
    prefix = (host.base + "/vendor/",)
    config = AuthConfig(issuer_keys={ISS_A: IssuerKeys(jku_allow=prefix), ISS_B: IssuerKeys(jku_allow=prefix)})
    assert outcome(config, token(KEY_A, ISS_A, "v-1", jku=url), token(KEY_A, ISS_B, "v-1", jku=url)) == [ISS_A, ISS_B]
    assert host.hits["/vendor/jwks"] == 2


def test_forged_jku_tokens_spend_only_their_issuers_budget_and_never_a_proven_urls(host: Host) -> None:
    # A stranger with no key sends tokens claiming EHR A, each naming a fresh path under A's jku prefix: each is a
    # fetch (a 404), up to A's budget for the minute and no further. EHR B's first jku fetch, A's configured JWKS
    # URL and A's own jku URL (it has verified a token before) are fetched all the same, and the sets that have
    # verified a token outlive the forged ones in the bounded cache.
    from fhirplug.serve._auth import JWKS_FETCHES_PER_MINUTE, JWKS_MAX_URLS, JWKS_REFRESH_INTERVAL_S

    stranger = ec.generate_private_key(ec.SECP384R1())
    own_jku = publish(host, "/a/jku/ehr-a", public_jwk(KEY_A, "a-1"))
    configured = publish(host, "/a/configured", public_jwk(KEY_A, "a-9"))
    b_jku = publish(host, "/b/jku/ehr-b", public_jwk(KEY_B, "b-1"))
    config = AuthConfig(
        issuer_keys={
            ISS_A: IssuerKeys(jwks=(configured,), jku_allow=(host.base + "/a/jku/",)),
            ISS_B: IssuerKeys(jku_allow=(host.base + "/b/jku/",)),
        }
    )
    now = [time.time()]

    def forged(round_: int, n: int) -> list[str]:
        return [token(stranger, ISS_A, "x", jku=f"{host.base}/a/jku/forged-{round_}-{i}") for i in range(n)]

    def hits(round_: int) -> int:
        return sum(n for path, n in host.hits.items() if path.startswith(f"/a/jku/forged-{round_}-"))

    async def go() -> None:
        async with Authenticator(config, clock=lambda: now[0]) as auth:

            async def result(t: str) -> str:
                try:
                    return str((await auth.authenticate("Bearer " + t, AUD)).issuer)
                except AuthError as exc:
                    return exc.reason

            # Minute 0: A's own jku URL verifies a token (its first fetch is one of A's budget), then the attack.
            assert await result(token(KEY_A, ISS_A, "a-1", jku=own_jku)) == ISS_A
            assert {await result(t) for t in forged(0, JWKS_FETCHES_PER_MINUTE + 10)} == {"unknown_kid"}
            assert hits(0) == JWKS_FETCHES_PER_MINUTE - 1  # the budget, spent, and not one fetch more
            assert await result(token(KEY_B, ISS_B, "b-1", jku=b_jku)) == ISS_B  # B's budget is B's own
            assert await result(token(KEY_A, ISS_A, "a-9")) == ISS_A  # a configured URL is outside any budget
            # Refused fetches keep no lock: the lock table never outgrows the cache of sets.
            assert len(auth._locks) <= len(auth._sets) <= JWKS_MAX_URLS

            # Minute 1: the attack spends A's new budget at once; A then rotates its key at its jku URL, which
            # is fetched again all the same (it has verified a token).
            now[0] += JWKS_REFRESH_INTERVAL_S + 1
            assert {await result(t) for t in forged(1, JWKS_FETCHES_PER_MINUTE + 5)} == {"unknown_kid"}
            assert hits(1) == JWKS_FETCHES_PER_MINUTE
            publish(host, "/a/jku/ehr-a", public_jwk(KEY_A, "a-2"))
            assert await result(token(KEY_A, ISS_A, "a-2", jku=own_jku)) == ISS_A

            # Minutes 2-3: more forged paths than the cache holds: the forged sets are evicted, not the three that
            # verified tokens (a token for each is answered from the cache, no fetch).
            for round_ in (2, 3):
                now[0] += 61
                await asyncio.gather(*(result(t) for t in forged(round_, JWKS_FETCHES_PER_MINUTE)))
            assert len(auth._sets) == JWKS_MAX_URLS and len(auth._locks) <= JWKS_MAX_URLS
            assert {(ISS_A, own_jku), (ISS_A, configured), (ISS_B, b_jku)} <= set(auth._sets)
            assert await result(token(KEY_A, ISS_A, "a-2", jku=own_jku)) == ISS_A
            assert await result(token(KEY_B, ISS_B, "b-1", jku=b_jku)) == ISS_B
            assert await result(token(KEY_A, ISS_A, "a-9")) == ISS_A

    asyncio.run(go())
    assert host.hits["/a/jku/ehr-a"] == 2 and host.hits["/b/jku/ehr-b"] == 1 and host.hits["/a/configured"] == 1


# --- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"jwks": ("k.json",), "issuers": (ISS_A, ISS_B)}, r"AuthConfig\.jwks is not bound to an issuer"),
        (
            {"jku_allow": ("https://ehr-a.example.org/jwks/",), "issuers": (ISS_A, ISS_B)},
            r"AuthConfig\.jku_allow is not bound to an issuer",
        ),
        (  # one issuer by name, one by issuer_keys: still two, so the unbound set is refused
            {"jwks": ("k.json",), "issuers": (ISS_A,), "issuer_keys": {ISS_B: IssuerKeys(jwks=("b.json",))}},
            r"AuthConfig\.jwks is not bound",
        ),
        (
            {"issuers": (ISS_A, ISS_B), "issuer_keys": {ISS_A: IssuerKeys(jwks=("a.json",))}},
            r"'https://ehr-b.example.org' has no keys",
        ),
        ({"issuer_keys": {ISS_A: ("a.json",)}}, r"expected IssuerKeys"),
        ({"issuer_keys": {"": IssuerKeys(jwks=("a.json",))}}, r"exact iss"),
    ],
)
def test_unbound_keys_with_two_issuers_and_issuers_without_keys_are_usage_errors(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        AuthConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "neither"),
        ({"jwks": "a.json"}, "tuple of strings"),
        ({"jku_allow": ("http://ehr.example.org/jwks",)}, "not https"),
        ({"jwks": ("https://user@ehr.example.org/jwks",)}, "user information"),
    ],
)
def test_bad_issuer_keys_are_usage_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        IssuerKeys(**kwargs)


def test_issuer_keys_alone_configure_the_issuers_and_are_copied(key_files: tuple[Path, Path]) -> None:
    mapping = {ISS_A: IssuerKeys(jwks=(str(key_files[0]),))}
    config = AuthConfig(issuer_keys=mapping)
    mapping[ISS_B] = IssuerKeys(jwks=(str(key_files[1]),))  # a later change to the caller's dict changes nothing
    assert config.trusted_issuers == (ISS_A,)
    assert outcome(config, token(KEY_A, ISS_A, "a-1"), token(KEY_B, ISS_B, "b-1")) == [ISS_A, "bad_iss"]


def test_the_unbound_form_still_serves_a_single_issuer(key_files: tuple[Path, Path]) -> None:
    config = AuthConfig(jwks=(str(key_files[0]),), issuers=(ISS_A,))
    assert outcome(config, token(KEY_A, ISS_A, "a-1"), token(KEY_B, ISS_A, "b-1")) == [ISS_A, "unknown_kid"]


# --- over HTTP, and from the CLI ------------------------------------------------------------------------------


def test_over_http_the_forged_token_is_401_and_both_ehrs_are_served(
    serve: Any, tiny_plugin: Any, key_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server = serve([tiny_plugin], ServeConfig(auth=two_ehrs(*key_files)))
    path = "/cds-services/tiny-notes/feedback"
    body = {"feedback": [{"card": "7d1e1b23-2d0e-4c0e-9c43-2f5c3d1a9b10", "outcome": "accepted"}]}

    def call(t: str) -> int:
        response = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {t}"}, timeout=30)
        return response.status_code

    aud = server.url + path
    why = "signature does not verify with key kid 'a-1' of iss 'https://ehr-a.example.org'"
    with caplog.at_level("INFO", logger="fhirplug.serve"):
        statuses = [
            call(token(KEY_A, ISS_A, "a-1", aud=aud)),
            call(token(KEY_B, ISS_B, "b-1", aud=aud)),
            call(token(KEY_B, ISS_A, "a-1", aud=aud)),
        ]
        deadline = time.monotonic() + 10
        while why not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)  # the access-log line is written just after the response is sent
    assert statuses == [200, 200, 401]
    assert why in caplog.text


def _start(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make `fhirplug serve` build its app and return instead of serving; the apps it built are collected."""
    import fhirplug.serve._server as server_module

    apps: list[Any] = []

    class NoServer:
        def __init__(self, app: Any) -> None:
            apps.append(app)

        def run(self, sockets: Any) -> None:
            pass

    monkeypatch.setattr(server_module, "uvicorn_server", NoServer)
    # Not the real handler: it would outlive the test, writing to the CliRunner's stream.
    monkeypatch.setattr(server_module, "log_to_stderr", lambda: None)
    return apps


def test_cli_binds_jwks_and_jku_to_issuers(monkeypatch: pytest.MonkeyPatch, key_files: tuple[Path, Path]) -> None:
    apps = _start(monkeypatch)
    a, b = key_files
    args = ["serve", str(TINY_PLUGIN), "--allow-unsigned", "--port", "0", "--issuer", ISS_A, "--issuer", ISS_B]
    args += ["--jwks", f"{ISS_A}={a}", "--jwks", f"{ISS_B}={b}", "--jku-allow", f"{ISS_B}=https://ehr-b.example.org/k/"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = apps[0].state.fhirplug.config.auth
    assert config.jwks == () and config.jku_allow == ()
    assert config.issuer_keys == {
        ISS_A: IssuerKeys(jwks=(str(a),)),
        ISS_B: IssuerKeys(jwks=(str(b),), jku_allow=("https://ehr-b.example.org/k/",)),
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--issuer", ISS_B, "--jwks", "{a}"], "--jwks {a} is not bound to an issuer, but 2 --issuer values"),
        (
            ["--issuer", ISS_B, "--jwks", f"{ISS_A}={{a}}", "--jku-allow", "https://ehr-b.example.org/k/"],
            "--jku-allow https://ehr-b.example.org/k/ is not bound",
        ),
        (["--issuer", ISS_B, "--jwks", f"{ISS_A}={{a}}"], f"--issuer {ISS_B} has no keys"),
        (["--jwks", "https://ehr-typo.example.org={a}"], "is not one of the --issuer values"),
    ],
)
def test_cli_refuses_unbound_or_mistyped_keys_in_one_line(
    monkeypatch: pytest.MonkeyPatch, key_files: tuple[Path, Path], extra: list[str], message: str
) -> None:
    apps = _start(monkeypatch)
    a = str(key_files[0])
    args = ["serve", str(TINY_PLUGIN), "--allow-unsigned", "--port", "0", "--issuer", ISS_A]
    result = CliRunner().invoke(main, args + [e.format(a=a) for e in extra])
    assert result.exit_code == 2
    assert message.format(a=a) in result.output and "Traceback" not in result.output
    assert apps == []  # refused before any plugin was loaded


def test_cli_keeps_the_unbound_form_for_one_issuer(
    monkeypatch: pytest.MonkeyPatch, key_files: tuple[Path, Path]
) -> None:
    apps = _start(monkeypatch)
    args = ["serve", str(TINY_PLUGIN), "--allow-unsigned", "--port", "0", "--issuer", ISS_A]
    args += ["--jwks", str(key_files[0])]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert apps[0].state.fhirplug.config.auth.keys_of(ISS_A) == IssuerKeys(jwks=(str(key_files[0]),))
