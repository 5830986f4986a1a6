"""Fixtures for the server tests: a real uvicorn server on 127.0.0.1, an ES384 signing key and its JWKS."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
jwt = pytest.importorskip("jwt")

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

ISSUER = "https://ehr.test.example"
KID = "ehr-key-1"


@pytest.fixture(scope="session")
def ehr_key() -> ec.EllipticCurvePrivateKey:
    """The CDS client's (EHR's) ES384 signing key."""
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="session")
def jwks_file(ehr_key: ec.EllipticCurvePrivateKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ehr_key.public_key()))
    jwk.update({"kid": KID, "alg": "ES384", "use": "sig"})
    path = tmp_path_factory.mktemp("jwks") / "ehr-jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return path


@pytest.fixture(scope="session")
def sign(ehr_key: ec.EllipticCurvePrivateKey) -> Callable[[str], str]:
    """``sign(url)``: a fresh CDS Hooks 2.0 JWT for a call to ``url`` (aud), as the EHR would make it."""

    def make(audience: str, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "sub": "ehr-client", "aud": audience, "iat": now, "exp": now + 300}
        payload["jti"] = str(uuid.uuid4())
        payload.update(claims)
        return str(jwt.encode(payload, ehr_key, algorithm="ES384", headers={"kid": KID, "typ": "JWT"}))

    return make


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    """``serve(plugins, config)`` → a running server (``.url``, ``.app``); every one is stopped afterwards."""
    from fhirplug.serve import create_app, run_in_thread

    running: list[Any] = []

    def start(plugins: list[Any], config: Any) -> Any:
        server = run_in_thread(create_app(plugins, config))
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()
