"""``fhirplug serve``: CDS Hooks 2.0 and FHIR ``$predict`` on Starlette + uvicorn (the ``[serve]`` extra).

>>> from fhirplug.serve import AuthConfig, IssuerKeys, ServeConfig, create_app, run_in_thread
>>> app = create_app([plugin], ServeConfig(auth=AuthConfig(jwks=("ehr-jwks.json",), issuers=("https://ehr",))))
>>> two = AuthConfig(issuer_keys={"https://ehr-a": IssuerKeys(jwks=("a.json",)), "https://ehr-b": IssuerKeys(
...     jwks=("https://ehr-b.example/jwks",))})  # each issuer's tokens verify with its own keys only

Importing this package is free; the names load starlette, uvicorn and PyJWT on first use and raise
:class:`~fhirplug.errors.MissingExtraError` when the extra is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fhirplug.errors import MissingExtraError

if TYPE_CHECKING:
    from fhirplug.serve._auth import AuthConfig, Authenticator, AuthError, IssuerKeys, Principal
    from fhirplug.serve._server import AppSpec, RunningServer, run_in_thread, serve_workers
    from fhirplug.serve.app import ServeConfig, create_app

__all__ = [
    "AppSpec",
    "AuthConfig",
    "AuthError",
    "Authenticator",
    "IssuerKeys",
    "Principal",
    "RunningServer",
    "ServeConfig",
    "create_app",
    "run_in_thread",
    "serve_workers",
]

_WHERE = {
    "AuthConfig": "fhirplug.serve._auth",
    "AuthError": "fhirplug.serve._auth",
    "Authenticator": "fhirplug.serve._auth",
    "IssuerKeys": "fhirplug.serve._auth",
    "Principal": "fhirplug.serve._auth",
    "AppSpec": "fhirplug.serve._server",
    "RunningServer": "fhirplug.serve._server",
    "run_in_thread": "fhirplug.serve._server",
    "serve_workers": "fhirplug.serve._server",
    "ServeConfig": "fhirplug.serve.app",
    "create_app": "fhirplug.serve.app",
}
_EXTRA = ("starlette", "uvicorn", "jwt", "httpx", "prometheus_client")


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fhirplug.serve' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in _EXTRA:
            raise MissingExtraError("serve", "fhirplug serve") from exc
        raise
