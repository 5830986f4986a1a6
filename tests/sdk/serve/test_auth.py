"""CDS Hooks 2.0 client authentication: every refusal the spec and issue 13 name, against real keys and a real
loopback JWKS server (keys are generated here, never committed)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

jwt = pytest.importorskip("jwt")
httpx = pytest.importorskip("httpx")
pytest.importorskip("anyio")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from jwt.algorithms import ECAlgorithm, RSAAlgorithm  # noqa: E402

from fhirplug.errors import FhirplugError, UsageError  # noqa: E402
from fhirplug.serve._auth import (  # noqa: E402
    ALGORITHMS,
    JWKS_MAX_BYTES,
    JWKS_MAX_STALE_S,
    AuthConfig,
    Authenticator,
    AuthError,
    InsecureAuthWarning,
    Principal,
    endpoint_url,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "serve"
ISS = "https://ehr.example.com/"
AUD = "https://cds.example.org/cds-services/fhirplug-ner"

# Generated once per run: RSA generation is the only slow part (~0.1 s each).
EC384 = ec.generate_private_key(ec.SECP384R1())
EC384_OTHER = ec.generate_private_key(ec.SECP384R1())
EC256 = ec.generate_private_key(ec.SECP256R1())
EC521 = ec.generate_private_key(ec.SECP521R1())
RSA2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
PRIVATE_FOR_CURVE = {"P-256": EC256, "P-384": EC384, "P-521": EC521}


def public_jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    algo = ECAlgorithm if isinstance(public, ec.EllipticCurvePublicKey) else RSAAlgorithm
    return {**algo.to_jwk(public, as_dict=True), "kid": kid, "use": "sig", **extra}


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def make_token(
    key: Any,
    alg: str = "ES384",
    *,
    kid: str | None = "ehr-1",
    now: float | None = None,
    headers: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    now = time.time() if now is None else now
    payload = {"iss": ISS, "aud": AUD, "iat": int(now), "exp": int(now) + 300, "jti": str(uuid.uuid4())}
    payload.update(sub="ehr-client-7", tenant="org-42")
    payload.update(claims)
    for name in drop:
        payload.pop(name)
    header = {"kid": kid, **(headers or {})} if kid is not None else dict(headers or {})
    return jwt.encode(payload, key, algorithm=alg, headers=header)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None = None) -> str:
    """A token PyJWT refuses to produce (alg none, HMAC over a PEM): built by hand, as an attacker would."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = sign(signing_input.encode()) if sign else b""
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def claims(now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {"iss": ISS, "aud": AUD, "iat": int(now), "exp": int(now) + 300, "jti": str(uuid.uuid4())}


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "ehr-jwks.json"
    path.write_text(json.dumps(jwks(public_jwk(EC384, "ehr-1"), public_jwk(RSA2048, "ehr-rsa"))))
    return path


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def check(config: AuthConfig, authorization: str | None, audience: str = AUD, **kwargs: Any) -> Principal:
    async with Authenticator(config, **kwargs) as auth:
        return await auth.authenticate(authorization, audience)


def refused(config: AuthConfig, authorization: str | None, audience: str = AUD, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        run(check(config, authorization, audience, **kwargs))
    assert isinstance(info.value, FhirplugError)
    return info.value


# --- the loopback JWKS server -------------------------------------------------------------------------------


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay_s: float = 0.0  # before the status line
    drip_s: float = 0.0  # between body bytes (a slow drip keeps each read under the read timeout)
    length: bool = True  # send Content-Length (else the body ends with the connection)


@dataclass
class JwksServer:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def serve(self, path: str, document: dict[str, Any] | bytes, **route: Any) -> str:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.routes[path] = Route(body=body, **route)
        return self.base + path


@pytest.fixture(scope="module")
def loopback() -> Iterator[JwksServer]:
    state = JwksServer(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            route = state.routes.get(self.path, Route(body=b"{}", status=404))
            try:
                time.sleep(route.delay_s)
                self.send_response(route.status)
                self.send_header("Content-Type", "application/json")
                if route.length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                if route.drip_s:
                    for byte in route.body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(route.drip_s)
                else:
                    self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should have

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(loopback: JwksServer) -> JwksServer:
    loopback.routes.clear()
    loopback.hits.clear()
    return loopback


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


# --- tokens that pass ---------------------------------------------------------------------------------------


def test_valid_es384_token_passes_and_names_the_client(jwks_file: Path) -> None:
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,))
    principal = run(check(config, "Bearer " + make_token(EC384)))
    assert principal == Principal(
        issuer=ISS, subject="ehr-client-7", client="ehr-client-7", kind="jwt", tenant="org-42"
    )


def test_valid_rs384_token_passes_and_a_self_issued_token_is_named_by_iss(jwks_file: Path) -> None:
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,))
    token = make_token(RSA2048, "RS384", kid="ehr-rsa", drop=("sub", "tenant"))
    principal = run(check(config, "bearer " + token))  # the auth scheme is case-insensitive (RFC 7235)
    assert (principal.kind, principal.subject, principal.client, principal.tenant) == ("jwt", None, ISS, None)


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_every_allowed_alg_verifies_with_its_key_type(tmp_path: Path, alg: str) -> None:
    kty, crv = ALGORITHMS[alg]
    key = RSA2048 if kty == "RSA" else PRIVATE_FOR_CURVE[str(crv)]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(public_jwk(key, "k", alg=alg))))
    principal = run(check(AuthConfig(jwks=(str(path),), issuers=(ISS,)), "Bearer " + make_token(key, alg, kid="k")))
    assert principal.issuer == ISS


def test_the_cds_hooks_specification_example_token_verifies() -> None:
    # The spec's own ES384 example (raw r||s signature, jku header), served at its jku through an httpx
    # transport since example.com is not reachable; the clock is set inside its validity.
    example = json.loads((FIXTURES / "cds-hooks-spec-example.json").read_text())

    def serve(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == example["jku"]
        return httpx.Response(200, json=example["jwks"])

    async def go() -> Principal:
        async with httpx.AsyncClient(transport=httpx.MockTransport(serve)) as http:
            config = AuthConfig(
                issuers=("https://fhir-ehr.example.com/",),
                jku_allow=("https://fhir-ehr.example.com/",),
                max_lifetime_s=10**9,
            )
            auth = Authenticator(config, http=http, clock=lambda: 1422568000.0)
            return await auth.authenticate(
                f"Bearer {example['token']}", "https://cds.example.org/cds-services/some-service"
            )

    principal = run(go())
    assert principal.tenant == "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"
    assert principal.client == "https://fhir-ehr.example.com/"


# --- signature, alg and key ---------------------------------------------------------------------------------


def test_forged_token_signed_by_another_key_with_the_same_kid_is_refused(jwks_file: Path) -> None:
    token = make_token(EC384_OTHER)
    error = refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), "Bearer " + token)
    assert error.reason == "bad_signature"
    # The log line names the kid and iss, never the token or its signature.
    assert "'ehr-1'" in str(error) and token not in str(error) and token.split(".")[2] not in str(error)


def test_alg_none_is_refused(jwks_file: Path) -> None:
    token = handmade({"alg": "none", "kid": "ehr-1", "typ": "JWT"}, claims())
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), f"Bearer {token}").reason == "bad_alg"


def test_hs256_signed_with_the_public_pem_is_refused(jwks_file: Path) -> None:
    # The classic key-confusion attack: the verifier's own public key used as an HMAC secret.
    pem = EC384.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    token = handmade({"alg": "HS256", "kid": "ehr-1", "typ": "JWT"}, claims(), lambda m: hmac.digest(pem, m, "sha256"))
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), f"Bearer {token}").reason == "bad_alg"


@pytest.mark.parametrize(("kid", "reason"), [("unknown-kid", "unknown_kid"), (None, "bad_kid"), ("", "bad_kid")])
def test_unknown_or_missing_kid_is_refused(jwks_file: Path, kid: str | None, reason: str) -> None:
    token = make_token(EC384, kid=kid)
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), "Bearer " + token).reason == reason


def test_key_of_the_wrong_type_or_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps(
            jwks(
                public_jwk(EC384, "ok"),
                public_jwk(EC256, "p256"),  # ES384 needs P-384
                public_jwk(RSA1024, "short"),  # RSA under 2048 bits
                public_jwk(EC384, "enc", use="enc"),
                public_jwk(EC384, "ops", key_ops=["encrypt"]),
                public_jwk(EC384, "es512", alg="ES512"),  # the JWK pins another alg
            )
        )
    )
    config = AuthConfig(jwks=(str(path),), issuers=(ISS,))
    cases = {
        "p256": (EC256, "ES384", "P-256"),
        "short": (RSA1024, "RS384", "1024 bits"),
        "enc": (EC384, "ES384", "use 'enc'"),
        "ops": (EC384, "ES384", "without verify"),
        "es512": (EC384, "ES384", "alg ES512"),
    }
    for kid, (key, alg, why) in cases.items():
        if key is EC256:  # jwt.encode refuses ES384 over P-256 (and warns on short RSA); an attacker would not
            token = handmade({"alg": alg, "kid": kid}, claims(), lambda m: _es384(m, EC256))
        elif key is RSA1024:
            token = handmade(
                {"alg": alg, "kid": kid}, claims(), lambda m: RSAAlgorithm(RSAAlgorithm.SHA384).sign(m, RSA1024)
            )
        else:
            token = make_token(key, alg, kid=kid)
        error = refused(config, "Bearer " + token)
        assert error.reason == "bad_key" and why in str(error), (kid, str(error))
    assert run(check(config, "Bearer " + make_token(EC384, kid="ok"))).kind == "jwt"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [({"crit": ["exp"]}, "crit"), ({"typ": "at+jwt"}, "bad_typ"), ({"jku": 7}, "bad_jku")],
)
def test_header_crit_wrong_typ_and_bad_jku_type_are_refused(
    jwks_file: Path, headers: dict[str, Any], reason: str
) -> None:
    token = make_token(EC384, headers=headers)
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), "Bearer " + token).reason == reason


def test_typ_may_be_absent(jwks_file: Path) -> None:
    token = handmade({"alg": "ES384", "kid": "ehr-1"}, claims(), lambda m: _es384(m))
    assert run(check(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), f"Bearer {token}")).kind == "jwt"


def _es384(message: bytes, key: Any = EC384) -> bytes:
    # No curve check here, unlike jwt.encode: an attacker's signer need not be careful.
    return ECAlgorithm(ECAlgorithm.SHA384).sign(message, key)


def test_duplicate_header_members_are_refused(jwks_file: Path) -> None:
    # Parsers disagree on which duplicate wins; a token that depends on it is refused outright.
    token = make_token(EC384)
    header = base64.urlsafe_b64encode(b'{"alg":"ES384","kid":"ehr-1","alg":"HS256"}').rstrip(b"=").decode()
    forged = header + token[token.index(".") :]
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), f"Bearer {forged}").reason == "malformed"


# --- claims -------------------------------------------------------------------------------------------------


def test_expiry_is_checked_with_leeway(jwks_file: Path) -> None:
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,), leeway_s=30)
    now = time.time()
    assert run(check(config, "Bearer " + make_token(EC384, iat=int(now) - 100, exp=int(now) - 10))).kind == "jwt"
    error = refused(config, "Bearer " + make_token(EC384, iat=int(now) - 100, exp=int(now) - 40))
    assert error.reason == "expired"


def test_iat_in_the_future_beyond_leeway_is_refused(jwks_file: Path) -> None:
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,), leeway_s=30)
    now = int(time.time())
    assert run(check(config, "Bearer " + make_token(EC384, iat=now + 10, exp=now + 100))).kind == "jwt"
    assert refused(config, "Bearer " + make_token(EC384, iat=now + 120, exp=now + 200)).reason == "future"
    assert refused(config, "Bearer " + make_token(EC384, nbf=now + 120)).reason == "future"


def test_lifetime_over_the_maximum_is_refused(jwks_file: Path) -> None:
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,), max_lifetime_s=300)
    now = int(time.time())
    assert run(check(config, "Bearer " + make_token(EC384, iat=now, exp=now + 300))).kind == "jwt"
    assert refused(config, "Bearer " + make_token(EC384, iat=now, exp=now + 301)).reason == "lifetime"


@pytest.mark.parametrize(("claim", "reason"), [("jti", "bad_jti"), ("exp", "bad_exp"), ("iat", "bad_iat")])
def test_missing_required_claim_is_refused(jwks_file: Path, claim: str, reason: str) -> None:
    token = make_token(EC384, drop=(claim,))
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), "Bearer " + token).reason == reason


def test_a_jti_with_a_lone_surrogate_is_refused_as_invalid(jwks_file: Path) -> None:
    """JSON allows "\\udc80"; UTF-8 (and the shared SQLite replay cache) does not: a 401, never a 500."""
    token = make_token(EC384, jti="abc\udc80")
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), "Bearer " + token).reason == "bad_jti"


def test_replayed_jti_is_refused_but_a_fresh_one_passes(jwks_file: Path) -> None:
    async def go() -> list[str]:
        async with Authenticator(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,))) as auth:
            token = make_token(EC384)
            outcomes = []
            for attempt in (token, token, make_token(EC384)):
                try:
                    outcomes.append((await auth.authenticate("Bearer " + attempt, AUD)).kind)
                except AuthError as exc:
                    outcomes.append(exc.reason)
            return outcomes

    assert run(go()) == ["jwt", "replay", "jwt"]


def test_a_refused_token_does_not_burn_its_jti(jwks_file: Path) -> None:
    # Otherwise anyone who sees a jti (a log line) could deny the real token by sending a bad one first.
    async def go() -> str:
        async with Authenticator(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,))) as auth:
            jti = str(uuid.uuid4())
            with pytest.raises(AuthError):
                await auth.authenticate("Bearer " + make_token(EC384_OTHER, jti=jti), AUD)
            return (await auth.authenticate("Bearer " + make_token(EC384, jti=jti), AUD)).kind

    assert run(go()) == "jwt"


def test_concurrent_uses_of_one_jti_let_exactly_one_through(jwks_file: Path, server: JwksServer) -> None:
    # Tasks: the JWKS comes from a URL, so every request awaits the (locked) first fetch together.
    url = server.serve("/jwks", json.loads(jwks_file.read_text()))
    token = make_token(EC384)

    async def tasks() -> list[Any]:
        async with Authenticator(AuthConfig(jwks=(url,), issuers=(ISS,))) as auth:
            return await asyncio.gather(
                *(auth.authenticate("Bearer " + token, AUD) for _ in range(10)), return_exceptions=True
            )

    results = run(tasks())
    assert sum(isinstance(r, Principal) for r in results) == 1
    assert sorted(r.reason for r in results if isinstance(r, AuthError)) == ["replay"] * 9
    assert server.hits["/jwks"] == 1

    # Threads: one authenticator shared by eight event loops at once.
    auth = Authenticator(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)))
    token = make_token(EC384)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait()
        try:
            outcomes.append(run(auth.authenticate("Bearer " + token, AUD)).kind)
        except AuthError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["jwt"] + ["replay"] * 7


@pytest.mark.parametrize(
    "aud",
    [
        "https://cds.example.org/cds-services/other-service",  # other path
        "https://cds.example.org/cds-services",  # the discovery endpoint
        "https://cds.example.net/cds-services/fhirplug-ner",  # other host
        AUD + "/",  # trailing slash
        "http://cds.example.org/cds-services/fhirplug-ner",  # other scheme
        ["https://cds.example.org/cds-services/other-service"],  # an array without it
        [],
    ],
)
def test_wrong_audience_is_refused(jwks_file: Path, aud: Any) -> None:
    error = refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), "Bearer " + make_token(EC384, aud=aud))
    assert error.reason == "bad_aud"


def test_audience_array_containing_the_endpoint_passes(jwks_file: Path) -> None:
    token = make_token(EC384, aud=["https://other.example/x", AUD])
    assert run(check(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), "Bearer " + token)).kind == "jwt"


def test_issuer_not_allowed_is_refused_before_any_key_fetch(server: JwksServer) -> None:
    url = server.serve("/jwks", jwks(public_jwk(EC384, "ehr-1")))
    config = AuthConfig(jwks=(url,), issuers=(ISS,))
    for iss in ("https://evil.example.com/", ISS.rstrip("/"), None, ["https://ehr.example.com/"]):
        token = handmade({"alg": "ES384", "kid": "ehr-1"}, {**claims(), "iss": iss}, _es384)
        assert refused(config, "Bearer " + token).reason == "bad_iss"
    assert server.hits["/jwks"] == 0


# --- jku ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "jku",
    [
        "https://allowed.example.com.evil.com/jwks",
        "https://allowed.example.com@evil.com/",
        "https://allowed.example.com@evil.com/jwks",
        "https://allowed.example.com\\@evil.com/jwks",
        "https://evil.com/jwks",
        "https://allowed.example.com/jwks-evil",  # no path boundary after the prefix
        "https://allowed.example.com/other/jwks",
        "http://allowed.example.com/jwks",  # plain http
        "https://allowed.example.com:8443/jwks",  # other port
        "https://allowed.example.com/jwks/../evil",
        "https://allowed.example.com/jwks/%2e%2e/evil",
        "https://allowed.example.com/jwks?cache-buster=1",
        "https://allowed.example.com/jwks#x",
        "https://ALLOWED.example.com /jwks",
        "file:///etc/passwd",
    ],
)
def test_jku_outside_the_allow_list_is_refused_without_a_fetch(jku: str) -> None:
    # bad_jku, not unknown_kid: a fetch attempt (these hosts do not resolve) would have said unknown_kid.
    config = AuthConfig(issuers=(ISS,), jku_allow=("https://allowed.example.com/jwks",))
    token = make_token(EC384, headers={"jku": jku})
    assert refused(config, "Bearer " + token).reason == "bad_jku"


def test_allow_listed_jku_below_the_prefix_passes(server: JwksServer) -> None:
    url = server.serve("/ehr/tenant-1/jwks", jwks(public_jwk(EC384, "ehr-1")))
    config = AuthConfig(issuers=(ISS,), jku_allow=(server.base + "/ehr",))
    assert run(check(config, "Bearer " + make_token(EC384, headers={"jku": url}))).kind == "jwt"
    assert server.hits["/ehr/tenant-1/jwks"] == 1


def test_allow_listed_jku_serving_a_key_of_another_type_is_refused(server: JwksServer) -> None:
    url = server.serve("/ehr/jwks", jwks(public_jwk(RSA2048, "ehr-1")))
    config = AuthConfig(issuers=(ISS,), jku_allow=(server.base + "/ehr/",))
    error = refused(config, "Bearer " + make_token(EC384, headers={"jku": url}))
    assert error.reason == "bad_key" and "RSA" in str(error)


def test_jku_keys_are_not_mixed_with_the_configured_ones(jwks_file: Path, server: JwksServer) -> None:
    # A token naming a jku is verified by that set alone, even if its kid is in a configured file.
    url = server.serve("/ehr/jwks", jwks(public_jwk(EC384_OTHER, "other")))
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,), jku_allow=(server.base + "/ehr",))
    assert refused(config, "Bearer " + make_token(EC384, headers={"jku": url})).reason == "unknown_kid"


# --- fetching ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "streamed"])
def test_a_huge_jwks_is_cut_at_the_cap(server: JwksServer, length: bool) -> None:
    body = b'{"keys": [' + b" " * (10 * 1024 * 1024) + b"]}"
    url = server.serve("/huge", body, length=length)
    started = time.perf_counter()
    error = refused(AuthConfig(jwks=(url,), issuers=(ISS,)), "Bearer " + make_token(EC384))
    assert error.reason == "unknown_kid" and f"{JWKS_MAX_BYTES} byte cap" in str(error)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("route", [{"delay_s": 3.0}, {"drip_s": 0.05}], ids=["slow", "drip"])
def test_a_slow_jwks_server_times_out(server: JwksServer, route: dict[str, float]) -> None:
    url = server.serve("/slow", jwks(public_jwk(EC384, "ehr-1")), **route)
    started = time.perf_counter()
    error = refused(AuthConfig(jwks=(url,), issuers=(ISS,)), "Bearer " + make_token(EC384), fetch_timeout_s=0.2)
    elapsed = time.perf_counter() - started
    assert error.reason == "unknown_kid" and "fetching keys failed" in str(error)
    assert elapsed < 1.5, elapsed  # the whole fetch is bounded (2 x 0.2 s), not each byte


def test_a_redirect_is_not_followed(server: JwksServer) -> None:
    server.serve("/real", jwks(public_jwk(EC384, "ehr-1")))
    url = server.serve("/moved", b"", status=302)
    error = refused(AuthConfig(jwks=(url,), issuers=(ISS,)), "Bearer " + make_token(EC384))
    assert "HTTP 302" in str(error) and server.hits["/real"] == 0


def test_unknown_kid_refetches_at_most_once_a_minute_and_ttl_drops_revoked_keys(server: JwksServer) -> None:
    url = server.serve("/jwks", jwks(public_jwk(EC384, "ehr-1")))
    clock = Clock()

    async def go() -> None:
        async with Authenticator(AuthConfig(jwks=(url,), issuers=(ISS,)), clock=clock) as auth:

            async def attempt(key: Any, kid: str) -> str:
                try:
                    return (await auth.authenticate("Bearer " + make_token(key, kid=kid, now=clock.now), AUD)).kind
                except AuthError as exc:
                    return exc.reason

            assert await attempt(EC384, "ehr-1") == "jwt"
            assert server.hits["/jwks"] == 1
            # An attacker's stream of unknown kids costs the EHR no more than one fetch a minute.
            assert [await attempt(EC384_OTHER, f"probe-{i}") for i in range(20)] == ["unknown_kid"] * 20
            assert server.hits["/jwks"] == 1
            # The EHR rotates in a new key: found by the first unknown-kid fetch after the interval.
            server.serve("/jwks", jwks(public_jwk(EC384, "ehr-1"), public_jwk(EC384_OTHER, "ehr-2")))
            assert await attempt(EC384_OTHER, "ehr-2") == "unknown_kid"
            clock.now += 61
            assert await attempt(EC384_OTHER, "ehr-2") == "jwt"
            assert server.hits["/jwks"] == 2
            # The EHR drops ehr-1 (revoked); a known kid does not refetch until the TTL has passed.
            server.serve("/jwks", jwks(public_jwk(EC384_OTHER, "ehr-2")))
            clock.now += 100
            assert await attempt(EC384, "ehr-1") == "jwt"
            assert server.hits["/jwks"] == 2
            clock.now += 300
            assert await attempt(EC384, "ehr-1") == "unknown_kid"
            assert server.hits["/jwks"] == 3
            # The JWKS server goes down: keys already fetched keep working (within the stale limit).
            server.serve("/jwks", b"", status=503)
            clock.now += 301
            assert await attempt(EC384_OTHER, "ehr-2") == "jwt"
            assert server.hits["/jwks"] == 4
            # ... but not forever: past the stale limit they are refused, also between rate-limited retries.
            clock.now += JWKS_MAX_STALE_S
            assert await attempt(EC384_OTHER, "ehr-2") == "unknown_kid"
            clock.now += 10
            assert await attempt(EC384_OTHER, "ehr-2") == "unknown_kid"
            assert server.hits["/jwks"] == 5

    run(go())


# --- the Authorization header and static bearer tokens ------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Bearer", "missing"),
        ("Bearer    ", "missing"),
        ("Basic x", "not_bearer"),
        ("Basic dXNlcjpwYXNz", "not_bearer"),
        ("Bearer a.b", "not_jwt"),
        ("Bearer a.b.c", "malformed"),  # JWT-shaped: a header that is not base64url JSON
        ("Bearer <script>", "malformed"),
        ("Bearer " + "a" * 9000, "malformed"),
    ],
)
def test_garbage_authorization_is_refused(jwks_file: Path, authorization: str | None, reason: str) -> None:
    assert refused(AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,)), authorization).reason == reason


def test_static_bearer_tokens(jwks_file: Path) -> None:
    engine = "integration-engine-token-0123456789abcdef"
    other = "second-integration-token-fedcba9876543210"
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISS,), bearer_tokens=(engine, other))
    principal = run(check(config, f"Bearer {other}"))
    assert principal == Principal(
        issuer=None, subject=None, client="bearer:" + hashlib.sha256(other.encode()).hexdigest()[:8], kind="bearer"
    )
    assert run(check(config, f"Bearer {engine}")).client != principal.client
    assert refused(config, f"Bearer {engine[:-1]}x").reason == "bad_bearer"
    assert refused(config, f"Bearer {engine}{engine}").reason == "bad_bearer"
    # A JWT-shaped credential is judged as a JWT, never compared with the static tokens.
    assert refused(config, f"Bearer {engine}.x.y").reason == "malformed"
    # JWTs still work next to static tokens.
    assert run(check(config, "Bearer " + make_token(EC384))).kind == "jwt"


def test_a_jwt_is_refused_when_only_static_tokens_are_configured() -> None:
    config = AuthConfig(bearer_tokens=("integration-engine-token-0123456789abcdef",))
    assert refused(config, "Bearer " + make_token(EC384)).reason == "no_jwt"


@pytest.mark.parametrize("token", ["short", "a" * 40 + ".b.c", "has space in it 0123456789abcdef0123"])
def test_weak_or_jwt_shaped_static_tokens_are_a_usage_error(token: str) -> None:
    with pytest.raises(UsageError, match="bearer_tokens"):
        AuthConfig(bearer_tokens=(token,))


# --- configuration and insecure mode -----------------------------------------------------------------------


def test_insecure_warns_once_and_lets_everyone_in(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="fhirplug.serve.auth"),
        pytest.warns(InsecureAuthWarning, match="WITHOUT authentication"),
    ):
        auth = Authenticator(AuthConfig(insecure=True))
    assert "WITHOUT authentication" in caplog.text
    for header in (None, "Basic x", "Bearer " + make_token(EC384_OTHER)):
        assert run(auth.authenticate(header, AUD)) == Principal(None, None, None, "insecure")


def test_empty_config_refuses_everyone() -> None:
    # The server's default: authentication on, nobody trusted.
    assert refused(AuthConfig(), "Bearer " + make_token(EC384)).reason == "no_jwt"
    assert refused(AuthConfig(), "Bearer integration-engine-token-0123456789abcdef").reason == "not_jwt"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"issuers": (ISS,)}, "no keys"),
        ({"issuers": (ISS,), "jku_allow": ("http://ehr.example.com/",)}, "not https"),
        ({"issuers": (ISS,), "jku_allow": ("https://user@ehr.example.com/",)}, "user information"),
        ({"issuers": (ISS,), "jwks": ("http://ehr.example.com/jwks",)}, "not https"),
        ({"issuers": ("",), "jwks": ("k.json",)}, "issuers"),
        ({"leeway_s": -1}, "leeway_s"),
        ({"max_lifetime_s": 0}, "max_lifetime_s"),
        ({"public_url": "cds.example.org"}, "public_url"),
    ],
)
def test_bad_config_is_a_usage_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        AuthConfig(**kwargs)


def test_bad_jwks_files_fail_at_construction(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    private = tmp_path / "private.json"
    private.write_text(json.dumps(jwks({**public_jwk(EC384, "k"), "d": "secret"})))
    useless = tmp_path / "useless.json"
    useless.write_text(json.dumps(jwks(public_jwk(EC384, "k", use="enc"), {"kty": "oct", "kid": "h", "k": "c2VjcmV0"})))
    for path, match in ((missing, "cannot be used"), (private, "private key"), (useless, "no usable")):
        with pytest.raises(UsageError, match=match) as info:
            Authenticator(AuthConfig(jwks=(str(path),), issuers=(ISS,)))
        assert str(path) in str(info.value)


# --- endpoint_url -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("public_url", "scheme", "host", "expected"),
    [
        (None, "https", "cds.example.org", "https://cds.example.org/cds-services/x"),
        (None, "https", "CDS.Example.org:443", "https://cds.example.org/cds-services/x"),
        (None, "http", "127.0.0.1:80", "http://127.0.0.1/cds-services/x"),
        (None, "http", "127.0.0.1:8080", "http://127.0.0.1:8080/cds-services/x"),
        (None, "HTTPS", "[::1]:8443", "https://[::1]:8443/cds-services/x"),
        (
            "https://ehr-proxy.example.org/fhirplug",
            "http",
            "10.0.0.5:8080",
            "https://ehr-proxy.example.org/fhirplug/cds-services/x",
        ),
        (
            "https://ehr-proxy.example.org/fhirplug/",
            "http",
            "anything",
            "https://ehr-proxy.example.org/fhirplug/cds-services/x",
        ),
    ],
)
def test_endpoint_url(public_url: str | None, scheme: str, host: str, expected: str) -> None:
    assert endpoint_url(public_url, scheme, host, "/cds-services/x") == expected


@pytest.mark.parametrize("host", ["evil.com/x", "evil.com@cds.example.org", "", "a b", "::1"])
def test_endpoint_url_refuses_a_forged_host(host: str) -> None:
    with pytest.raises(AuthError) as info:
        endpoint_url(None, "https", host, "/cds-services/x")
    assert info.value.reason == "bad_host"


def test_endpoint_url_needs_an_absolute_path() -> None:
    with pytest.raises(UsageError):
        endpoint_url(None, "https", "cds.example.org", "cds-services")
