"""CDS Hooks 2.0 client authentication: signed JWTs, and static bearer tokens for `$predict` clients.

A CDS client (an EHR) signs a short JWT for every call (CDS Hooks 2.0, "Trusting CDS Clients") and sends it
as ``Authorization: Bearer <JWT>``. :class:`Authenticator` checks it in this order, cheapest and least
trusting first, so that a stranger's token costs no key fetch:

1. the header: ``alg`` in :data:`ALGORITHMS` (asymmetric only: never ``none``, never HMAC), ``kid`` present,
   ``typ`` absent or ``JWT``, no ``crit`` (we implement no JWS extension, so RFC 7515 4.1.11 says refuse);
2. the unverified ``iss``, which must be a configured issuer (:attr:`AuthConfig.issuers` or a key of
   :attr:`AuthConfig.issuer_keys`);
3. the key: by ``kid`` from *that issuer's* JWKS files and URLs, or from the token's ``jku`` when that URL is
   under one of *that issuer's* allowed prefixes (:class:`IssuerKeys`); its type must fit ``alg`` (EC on the
   alg's curve, RSA of at least 2048 bits). Keys are bound to issuers so that one EHR cannot sign a token
   claiming to be another; the cache of fetched sets is keyed by (issuer, URL) for the same reason;
4. the signature, then the claims: ``aud`` is the exact URL called, ``exp``/``iat`` with leeway and a
   bounded lifetime, ``jti`` present and never seen before (:class:`_ReplayCache` in one process,
   :class:`SharedReplayCache` across the worker processes of ``fhirplug serve --workers N``).

Integration engines that are not CDS clients may instead present a static bearer token
(:attr:`AuthConfig.bearer_tokens`); a JWT-shaped credential never falls back to that comparison.

Every refusal raises :class:`AuthError`, whose message is for the server log (it never holds the token; at
most the ``kid``, ``iss`` and a ``jti`` prefix) and whose ``reason`` is a short label for metrics. The
client gets a bare 401.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import anyio.to_thread
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fhirplug.errors import FhirplugError, UsageError

__all__ = [
    "ALGORITHMS",
    "AuthConfig",
    "AuthError",
    "Authenticator",
    "InsecureAuthWarning",
    "IssuerKeys",
    "Principal",
    "SharedReplayCache",
    "endpoint_url",
]

logger = logging.getLogger("fhirplug.serve.auth")

#: Signature algorithms accepted, each bound to the key it needs: (JWK ``kty``, ``crv`` or None for RSA).
#: CDS Hooks 2.0 recommends ES384 and RS384; the other asymmetric JWA algorithms are as safe once the key
#: type is pinned to the alg, and EHRs in the field sign with RS256 too. Symmetric (HS*) and ``none`` are
#: forbidden by the spec; EdDSA is left out because CDS clients do not use it and PyJWT's JWK support for
#: it is optional.
ALGORITHMS: Mapping[str, tuple[str, str | None]] = MappingProxyType(
    {
        "ES256": ("EC", "P-256"),
        "ES384": ("EC", "P-384"),
        "ES512": ("EC", "P-521"),
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
    }
)
MIN_RSA_BITS = 2048
MAX_TOKEN_CHARS = 8192  # a CDS Hooks JWT is a few hundred characters; this bounds parsing work
MAX_FIELD_CHARS = 256  # kid, jti, iss, sub: bounds the replay cache and keeps log lines sane
JWKS_MAX_BYTES = 64 * 1024
JWKS_MAX_KEYS = 100
JWKS_TIMEOUT_S = 3.0  # per connect / read; the whole fetch gets twice this (a slow drip is a timeout too)
JWKS_TTL_S = 300.0  # a removed (revoked) key stops being trusted this long after the client drops it
JWKS_MAX_STALE_S = 3600.0  # keep using a set this long when refreshing it fails, then refuse
JWKS_REFRESH_INTERVAL_S = 60.0  # at most one fetch per URL per minute, whatever tokens arrive
# Fetches of jku URLs that never yet verified a token, per issuer and minute: a forged token naming an allow-listed
# issuer and a fresh path under its jku prefix costs a fetch, so many such tokens must not mean many fetches; per
# issuer, so tokens claiming one EHR cannot spend another's budget. A configured JWKS URL (a fixed set, each fetched
# at most once a minute) and a jku URL that has verified a token refresh outside this budget.
JWKS_FETCHES_PER_MINUTE = 30
JWKS_MAX_URLS = 64
REPLAY_CACHE_MAX = 200_000  # ~40 MB; a full cache refuses (fails closed) rather than forgetting a jti

_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_HOST = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_ENCODED_SEPARATOR = re.compile(r"%(?:2e|2f|5c)", re.IGNORECASE)


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON allows lone surrogates, which UTF-8 and SQLite do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class AuthError(FhirplugError):
    """A request's credentials are refused. The message is for the log; the client gets a bare 401.

    Attributes:
        reason: a short stable label (``expired``, ``replay``, ``bad_signature``, ...) for metrics.
    """

    def __init__(self, message: str, *, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class InsecureAuthWarning(UserWarning):
    """Authentication is switched off (``AuthConfig.insecure``): anyone who can reach the port is served."""


@dataclass(frozen=True)
class IssuerKeys:
    """The keys one CDS client (issuer) signs with: only these verify a token claiming its ``iss``.

    Attributes:
        jwks: JWKS files (JSON) or https URLs of this issuer's public keys.
        jku_allow: URL prefixes a token of this issuer may point its ``jku`` header to (same origin, then a
            path boundary).
    """

    jwks: tuple[str, ...] = ()
    jku_allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("jwks", "jku_allow"):
            value = getattr(self, name)
            if not isinstance(value, tuple | list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"IssuerKeys.{name} must be a tuple of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for source in self.jwks:
            if _looks_like_url(source):
                _checked_url(source, "IssuerKeys.jwks")
        for prefix in self.jku_allow:
            _checked_url(prefix, "IssuerKeys.jku_allow")
        if not self.jwks and not self.jku_allow:
            raise UsageError("IssuerKeys needs jwks (files or URLs) or jku_allow prefixes; it has neither")


@dataclass(frozen=True)
class AuthConfig:
    """Who may call the service.

    An issuer's keys are given with :attr:`issuer_keys`, which binds them to it: a token claiming ``iss`` A
    verifies with A's keys only. The unbound :attr:`jwks` and :attr:`jku_allow` belong to the one issuer
    configured, and are refused when there are two or more (any of their keys could then sign as any issuer).

    Attributes:
        issuer_keys: allowed ``iss`` value → its keys (:class:`IssuerKeys`); each key is an allowed issuer.
        jwks: JWKS files (JSON) or https URLs, trusted for the single configured issuer.
        issuers: allowed ``iss`` values, compared exactly (required for JWT clients unless insecure); those
            without an ``issuer_keys`` entry use the unbound ``jwks`` and ``jku_allow``.
        jku_allow: URL prefixes a token's ``jku`` header may point to (same origin, then a path boundary), for
            the single configured issuer.
        public_url: the service's public base URL (behind a proxy); ``aud`` must equal it plus the request
            path, else the request's own URL (see :func:`endpoint_url`).
        leeway_s: clock skew tolerated on ``exp``, ``iat`` and ``nbf``.
        max_lifetime_s: refuse tokens whose ``exp - iat`` exceeds this.
        bearer_tokens: static bearer tokens for `$predict` clients that are not CDS clients (at least 32
            characters each; compared as sha256 digests in constant time).
        insecure: no authentication at all (local development only; warns at construction).
    """

    jwks: tuple[str, ...] = ()
    issuers: tuple[str, ...] = ()
    jku_allow: tuple[str, ...] = ()
    public_url: str | None = None
    leeway_s: int = 30
    max_lifetime_s: int = 3600
    bearer_tokens: tuple[str, ...] = ()
    insecure: bool = False
    issuer_keys: Mapping[str, IssuerKeys] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A misconfigured authenticator must fail at start-up, naming the setting, not at the first request.
        if isinstance(self.leeway_s, bool) or not isinstance(self.leeway_s, int) or self.leeway_s < 0:
            raise UsageError(f"AuthConfig.leeway_s must be a non-negative integer (seconds), got {self.leeway_s!r}")
        lifetime = self.max_lifetime_s
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime < 1:
            raise UsageError(f"AuthConfig.max_lifetime_s must be a positive integer (seconds), got {lifetime!r}")
        for issuer in self.issuers:
            if not isinstance(issuer, str) or not issuer.strip():
                raise UsageError(f"AuthConfig.issuers holds {issuer!r}; give each allowed iss value as a string")
        if not isinstance(self.issuer_keys, Mapping):
            raise UsageError(f"AuthConfig.issuer_keys must map iss → IssuerKeys, got {self.issuer_keys!r}")
        for issuer, keys in self.issuer_keys.items():
            if not isinstance(issuer, str) or not issuer.strip():
                raise UsageError(f"AuthConfig.issuer_keys has the key {issuer!r}; key it by the exact iss value")
            if not isinstance(keys, IssuerKeys):
                raise UsageError(f"AuthConfig.issuer_keys[{issuer!r}] is {keys!r}, expected IssuerKeys(jwks=...)")
        # A private copy: the caller's dict changing later must not change who is trusted.
        object.__setattr__(self, "issuer_keys", dict(self.issuer_keys))
        for source in self.jwks:
            if _looks_like_url(source):
                _checked_url(source, "AuthConfig.jwks")
        for prefix in self.jku_allow:
            _checked_url(prefix, "AuthConfig.jku_allow")
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or "@" in parts.netloc
                or (parts.query or parts.fragment)
            ):
                raise UsageError(
                    f"AuthConfig.public_url must be an http(s) base URL without user, query or fragment, "
                    f"such as https://cds.example.org, got {self.public_url!r}"
                )
        for token in self.bearer_tokens:
            if len(token) < 32 or not _TOKEN68.fullmatch(token) or _JWT_SHAPE.fullmatch(token):
                raise UsageError(
                    "AuthConfig.bearer_tokens: each token must be at least 32 characters of the RFC 6750 "
                    "token alphabet and not shaped like a JWT (a.b.c); make one with "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        if self.insecure:
            return
        issuers = self.trusted_issuers
        for name in ("jwks", "jku_allow"):
            if getattr(self, name) and len(issuers) > 1:
                raise UsageError(
                    f"AuthConfig.{name} is not bound to an issuer, but {len(issuers)} issuers are configured "
                    f"({', '.join(map(repr, issuers))}): any of its keys would verify a token claiming any of "
                    "them; give each issuer its own keys with AuthConfig.issuer_keys "
                    "(CLI: --jwks ISS=FILE_OR_URL, --jku-allow ISS=PREFIX)"
                )
        unbound = bool(self.jwks or self.jku_allow)
        for issuer in self.issuers:
            if issuer not in self.issuer_keys and not unbound:
                raise UsageError(
                    f"AuthConfig.issuers: {issuer!r} has no keys: give jwks (files or URLs) or jku_allow "
                    "prefixes, or its IssuerKeys in issuer_keys"
                )

    @property
    def trusted_issuers(self) -> tuple[str, ...]:
        """Every allowed ``iss``: :attr:`issuers`, then the keys of :attr:`issuer_keys` not among them."""
        return tuple(dict.fromkeys([*self.issuers, *self.issuer_keys]))

    def keys_of(self, issuer: str) -> IssuerKeys | None:
        """The keys that verify tokens of ``issuer`` (the unbound ones count for the single issuer)."""
        bound = self.issuer_keys.get(issuer)
        if issuer not in self.trusted_issuers or len(self.trusted_issuers) > 1 or not (self.jwks or self.jku_allow):
            return bound
        return IssuerKeys(
            jwks=tuple(dict.fromkeys([*(bound.jwks if bound else ()), *self.jwks])),
            jku_allow=tuple(dict.fromkeys([*(bound.jku_allow if bound else ()), *self.jku_allow])),
        )


@dataclass(frozen=True)
class Principal:
    """Who made an authenticated request.

    Attributes:
        issuer: the JWT ``iss`` (None for bearer and insecure).
        subject: the JWT ``sub``, if the token has one.
        client: the client's identity for logs: ``sub`` (CDS Hooks 1.0 drafts defined it as the client_id),
            else ``iss`` for a self-issued token; ``bearer:<sha256 prefix>`` for a static token.
        kind: ``"jwt"``, ``"bearer"`` or ``"insecure"``.
        tenant: the JWT ``tenant`` (CDS Hooks: the healthcare organization calling), if present.
    """

    issuer: str | None
    subject: str | None
    client: str | None
    kind: str
    tenant: str | None = None


def endpoint_url(public_url: str | None, scheme: str, host: str, path: str) -> str:
    """The URL a CDS client must have put in ``aud`` to call ``path`` on this service.

    Args:
        public_url: :attr:`AuthConfig.public_url`; when set it replaces scheme and host (behind a proxy the
            request's own scheme and Host are the proxy's, not what the client called).
        scheme: the request's scheme (Starlette: ``request.url.scheme``).
        host: the request's host and port (Starlette: ``request.url.netloc``, from the Host header).
        path: the request path without query (Starlette: ``request.url.path``), starting with ``/``.

    Returns:
        The endpoint URL, e.g. ``https://cds.example.org/cds-services/some-service``; default ports dropped
        and host lowercased, since a client writes the URL as it would type it.

    Raises:
        AuthError: ``host`` is not a host name or address (a forged Host header).
        UsageError: ``path`` does not start with ``/``.
    """
    if not path.startswith("/"):
        raise UsageError(f"endpoint_url needs the request path starting with '/', got {path!r}")
    if public_url is not None:
        return public_url.rstrip("/") + path
    scheme = scheme.lower()
    name, sep, port = host.lower().rpartition(":")
    if not sep or name.endswith(":") or not port.isdigit():
        # No port, or an unbracketed IPv6 address whose last group only looks like one.
        name, port = host.lower(), ""
    if not _HOST.fullmatch(name) or len(host) > 255:
        raise AuthError(f"the Host header {_show(host)} is not a host name", reason="bad_host")
    if port and (scheme, port) not in (("http", "80"), ("https", "443")):
        name = f"{name}:{int(port)}"
    return f"{scheme}://{name}{path}"


@dataclass(frozen=True)
class _Key:
    """One JWK of a set: a usable public key, or the reason it cannot be used."""

    kid: str
    kty: str
    crv: str | None
    alg: str | None
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None
    problem: str | None


@dataclass
class _RemoteSet:
    """The cached keys of one JWKS URL."""

    keys: tuple[_Key, ...] = ()
    fetched_at: float = -math.inf  # last successful fetch
    attempted_at: float = -math.inf  # last fetch, successful or not: what the rate limit counts
    error: str | None = None
    proven: bool = False  # a key it served has verified a token's signature


@dataclass(frozen=True)
class _Trust:
    """The keys of one issuer: loaded file keys, JWKS URLs, parsed jku prefixes."""

    file_keys: tuple[_Key, ...]
    urls: tuple[str, ...]
    jku_allow: tuple[tuple[str, str, int, str], ...]


class _ReplayCache:
    """Every accepted (iss, jti) until its token expires; thread safe, bounded, failing closed when full."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._lock = threading.Lock()  # no await inside: guards both threads and tasks
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, key: tuple[str, str], expires_at: float, now: float) -> None:
        """Record ``key`` until ``expires_at``; raise AuthError if it is already there or the cache is full."""
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, old = heapq.heappop(self._heap)
                self._expiry.pop(old, None)
            if key in self._expiry:
                raise _replayed(key)
            if len(self._expiry) >= self._max:
                raise AuthError(f"the replay cache is full ({self._max} live jti values)", reason="replay_cache_full")
            self._expiry[key] = expires_at
            heapq.heappush(self._heap, (expires_at, key))

    async def remember(self, key: tuple[str, str], expires_at: float, now: float) -> None:
        """:meth:`add`, from async code (no I/O: it runs on the event loop)."""
        self.add(key, expires_at, now)


_REPLAY_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    iss TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (iss, jti)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_expiry ON seen (expires);
CREATE TABLE IF NOT EXISTS live (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO live VALUES (0, 0);
"""


class SharedReplayCache:
    """The replay cache of processes that serve together: one SQLite database, in WAL mode.

    ``add`` runs one ``BEGIN IMMEDIATE`` transaction: prune expired rows, then ``INSERT`` the (iss, jti)
    primary key, so of two processes adding one key the first writer wins and the other sees the row. The
    live count is kept in the same transaction, so the bound holds across processes; a full cache refuses,
    as the in-memory one does. Every SQLite failure (locked past the busy timeout, the file gone, disk
    full) refuses the token too: fail closed. Each process opens its own connection on first use (again
    after a fork, as SQLite requires); the file is never created here, only by :meth:`create`.

    Args:
        path: the database :meth:`create` made, in a folder only this service's user can reach.
        max_entries: live (iss, jti) rows at most, all processes together.
        busy_timeout_s: how long an ``add`` waits for another process's transaction before refusing.
    """

    def __init__(self, path: str, max_entries: int = REPLAY_CACHE_MAX, *, busy_timeout_s: float = 2.0) -> None:
        self.path = path
        self._max = max_entries
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()  # one connection per process, used by one thread at a time
        self._connection: sqlite3.Connection | None = None
        self._pid = -1

    @staticmethod
    def create(path: str) -> None:
        """Create the database at ``path`` (WAL mode, the tables); the parent does this once, before workers start.

        Raises:
            UsageError: it cannot be created.
        """
        try:
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.executescript(_REPLAY_SCHEMA)
        except sqlite3.Error as exc:
            raise UsageError(f"the shared replay cache {path} cannot be created: {exc}") from exc

    def __len__(self) -> int:
        with self._lock:
            row = self._connect().execute("SELECT n FROM live WHERE id = 0").fetchone()
        return int(row[0])

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            # mode=rw: a missing file is an error (fail closed), not a new empty cache that forgot every jti.
            uri = "file:" + quote(self.path) + "?mode=rw"
            connection = sqlite3.connect(
                uri, uri=True, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per commit; the file is scratch
            self._connection, self._pid = connection, os.getpid()
        return self._connection

    def add(self, key: tuple[str, str], expires_at: float, now: float) -> None:
        """Record ``key`` until ``expires_at``; raise AuthError if any process has it, the cache is full, or fails."""
        try:
            with self._lock:
                self._add(self._connect(), key, expires_at, now)
        except sqlite3.Error as exc:
            raise AuthError(
                f"the shared replay cache failed ({type(exc).__name__}: {exc}); refusing the token",
                reason="replay_cache_error",
            ) from None

    def _add(self, connection: sqlite3.Connection, key: tuple[str, str], expires_at: float, now: float) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            pruned = connection.execute("DELETE FROM seen WHERE expires <= ?", (now,)).rowcount
            if pruned > 0:
                connection.execute("UPDATE live SET n = max(0, n - ?) WHERE id = 0", (pruned,))
            (live,) = connection.execute("SELECT n FROM live WHERE id = 0").fetchone()
            if live >= self._max:
                seen = connection.execute("SELECT 1 FROM seen WHERE iss = ? AND jti = ?", key).fetchone()
                connection.execute("COMMIT")  # keep the pruning
                if seen is None:
                    raise AuthError(
                        f"the shared replay cache is full ({self._max} live jti values)", reason="replay_cache_full"
                    )
                raise _replayed(key)
            try:
                connection.execute("INSERT INTO seen (iss, jti, expires) VALUES (?, ?, ?)", (*key, expires_at))
            except sqlite3.IntegrityError:
                connection.execute("COMMIT")
                raise _replayed(key) from None
            connection.execute("UPDATE live SET n = n + 1 WHERE id = 0")
            connection.execute("COMMIT")
        finally:
            if connection.in_transaction:  # an error above: leave nothing half-done
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")

    async def remember(self, key: tuple[str, str], expires_at: float, now: float) -> None:
        """:meth:`add`, off the event loop: waiting on another process's lock must not stall other requests."""
        await anyio.to_thread.run_sync(self.add, key, expires_at, now)

    def close(self) -> None:
        """Close this process's connection (a later ``add`` opens a new one)."""
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None


def _replayed(key: tuple[str, str]) -> AuthError:
    return AuthError(f"jti {_show(key[1][:8])}... from iss {_show(key[0])} was already used (replay)", reason="replay")


class Authenticator:
    """Checks the ``Authorization`` header of a request against an :class:`AuthConfig`.

    Use one per server (it holds the key cache and the replay cache) and close it with :meth:`aclose` or
    ``async with``. Safe to share between concurrent requests.

    Args:
        config: who may call.
        http: client for JWKS URLs; by default one of our own (no redirects followed either way).
        clock: seconds since the epoch; injectable so tests can move time.
        fetch_timeout_s: per-operation timeout of a JWKS fetch; the whole fetch gets twice this.
        replay_db: a SQLite database (:meth:`SharedReplayCache.create`) that processes serving together share
            as their replay cache; None (the default) keeps it in this process's memory.

    Raises:
        UsageError: a JWKS file is missing, unreadable, or holds no usable public key.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        fetch_timeout_s: float = JWKS_TIMEOUT_S,
        replay_db: str | None = None,
    ) -> None:
        self.config = config
        self._http = http
        self._owns_http = http is None
        self._clock = clock
        self._fetch_timeout_s = fetch_timeout_s
        self._bearer_digests = tuple(hashlib.sha256(t.encode()).digest() for t in config.bearer_tokens)
        files: dict[str, tuple[_Key, ...]] = {}  # a file two issuers share is read once
        self._trust: dict[str, _Trust] = {}
        for issuer in config.trusted_issuers:
            keys = config.keys_of(issuer)
            if keys is None:  # insecure, or (refused by AuthConfig) an issuer without keys
                continue
            for source in keys.jwks:
                if not _looks_like_url(source) and source not in files:
                    files[source] = _load_jwks_file(source)
            self._trust[issuer] = _Trust(
                file_keys=tuple(k for s in keys.jwks if not _looks_like_url(s) for k in files[s]),
                urls=tuple(s for s in keys.jwks if _looks_like_url(s)),
                jku_allow=tuple(_checked_url(p, "AuthConfig.jku_allow") for p in keys.jku_allow),
            )
        self._issuers = frozenset(self._trust)
        # Fetched sets are keyed by (issuer, URL): what one issuer's URL served never verifies another's token.
        self._sets: dict[tuple[str, str], _RemoteSet] = {}
        self._locks: dict[tuple[str, str], anyio.Lock] = {}
        self._fetches: dict[str, deque[float]] = {}  # issuer → when its unproven jku URLs were fetched
        self._replay: _ReplayCache | SharedReplayCache = (
            SharedReplayCache(replay_db, REPLAY_CACHE_MAX) if replay_db is not None else _ReplayCache(REPLAY_CACHE_MAX)
        )
        if not config.insecure and not self._issuers and not config.bearer_tokens:
            # Fail closed, but say so: an empty AuthConfig is the server's safe default, not a useful setup.
            logger.warning(
                "authentication accepts nobody: give AuthConfig issuers (with jwks or jku_allow) for CDS "
                "clients, bearer_tokens for other clients, or insecure=True for local development"
            )
        if config.insecure:
            message = (
                "fhirplug serve runs WITHOUT authentication (insecure=True): anyone who can reach the port can "
                "call every service. Use this on a developer machine only."
            )
            logger.warning(message)
            warnings.warn(message, InsecureAuthWarning, stacklevel=2)

    async def __aenter__(self) -> Authenticator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this authenticator made it, and the shared replay cache's connection."""
        if isinstance(self._replay, SharedReplayCache):
            self._replay.close()
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def authenticate(self, authorization: str | None, audience: str) -> Principal:
        """Check one request's credentials.

        Args:
            authorization: the request's ``Authorization`` header, or None when absent.
            audience: the exact URL the client called (:func:`endpoint_url`); a JWT's ``aud`` must hold it.

        Returns:
            Who is calling.

        Raises:
            AuthError: the credentials are missing or refused; the message says why, for the log.
        """
        if self.config.insecure:
            return Principal(issuer=None, subject=None, client=None, kind="insecure")
        token = _bearer_credential(authorization)
        if _JWT_SHAPE.fullmatch(token):
            return await self._check_jwt(token, audience)
        return self._check_static(token)

    def _check_static(self, token: str) -> Principal:
        if not self._bearer_digests:
            raise AuthError(
                "the bearer credential is not a JWT and no static bearer tokens are configured", reason="not_jwt"
            )
        digest = hashlib.sha256(token.encode()).digest()
        matched = False
        for known in self._bearer_digests:
            # No early exit: the time taken must not tell which (or whether an earlier) token matched.
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise AuthError("the static bearer token matches none configured", reason="bad_bearer")
        return Principal(issuer=None, subject=None, client=f"bearer:{digest.hex()[:8]}", kind="bearer")

    async def _check_jwt(self, token: str, audience: str) -> Principal:
        if not self._issuers:
            raise AuthError("a JWT came but no issuers are configured (static bearer tokens only)", reason="no_jwt")
        header_segment, payload_segment, _ = token.split(".")
        header = _json_segment(header_segment, "header")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise AuthError(
                f"JWT alg {_show(alg)} is not allowed; expected one of {', '.join(ALGORITHMS)}", reason="bad_alg"
            )
        if not isinstance(kid, str) or not kid or len(kid) > MAX_FIELD_CHARS:
            raise AuthError(
                f"JWT header kid is missing or invalid (got {_show(kid)}); CDS Hooks requires it", reason="bad_kid"
            )
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthError(f"JWT header typ is {_show(typ)}, expected JWT", reason="bad_typ")
        if "crit" in header:
            raise AuthError(
                f"JWT header has crit {_show(header['crit'])}; no JWS extension is supported", reason="crit"
            )
        jku = header.get("jku")
        if jku is not None and not isinstance(jku, str):
            raise AuthError(f"JWT header jku is {_show(jku)}, expected a URL", reason="bad_jku")
        claims = _json_segment(payload_segment, "payload")
        iss = claims.get("iss")
        # Before any key lookup, so a token naming a foreign issuer cannot make us fetch anything.
        if not isinstance(iss, str) or iss not in self._issuers:
            raise AuthError(f"JWT iss {_show(iss)} is not an allowed issuer (kid {_show(kid)})", reason="bad_iss")

        keys = await self._keys_for(iss, kid, alg, jku)
        verifier = jwt.PyJWS()
        for key, served_by in keys:
            assert key.public is not None  # _keys_for returns usable keys only
            try:
                verifier.decode_complete(
                    token, key=key.public, algorithms=[alg], options={"enforce_minimum_key_length": True}
                )
                if served_by is not None:
                    served_by.proven = True
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise AuthError(
                    f"JWT kid {_show(kid)} from iss {_show(iss)} cannot be verified: {exc}", reason="bad_token"
                ) from exc
        else:
            raise AuthError(
                f"JWT signature does not verify with key kid {_show(kid)} of iss {_show(iss)}", reason="bad_signature"
            )
        return await self._accept_claims(claims, iss, kid, audience)

    async def _accept_claims(self, claims: dict[str, Any], iss: str, kid: str, audience: str) -> Principal:
        now = self._clock()
        leeway = self.config.leeway_s
        where = f"(iss {_show(iss)}, kid {_show(kid)})"
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
        if auds is None or audience not in auds:
            raise AuthError(
                f"JWT aud {_show(aud)} does not name the endpoint called, {audience!r} {where}", reason="bad_aud"
            )
        times: dict[str, float] = {}
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if value is None and name == "nbf":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise AuthError(
                    f"JWT {name} is {_show(value)}, expected seconds since the epoch {where}", reason=f"bad_{name}"
                )
            times[name] = float(value)
        exp, iat = times["exp"], times["iat"]
        if now >= exp + leeway:
            raise AuthError(f"JWT expired {now - exp:.0f} s ago {where}", reason="expired")
        if iat > now + leeway or times.get("nbf", -math.inf) > now + leeway:
            raise AuthError(
                f"JWT iat/nbf is {max(iat, times.get('nbf', iat)) - now:.0f} s in the future {where}", reason="future"
            )
        if exp - iat > self.config.max_lifetime_s or exp < iat:
            raise AuthError(
                f"JWT lifetime exp - iat = {exp - iat:.0f} s is outside 0..{self.config.max_lifetime_s} s {where}",
                reason="lifetime",
            )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_FIELD_CHARS or not _encodable(jti):
            raise AuthError(f"JWT jti is missing or invalid {where}; CDS Hooks requires a nonce", reason="bad_jti")
        sub, tenant = claims.get("sub"), claims.get("tenant")
        if sub is not None and not isinstance(sub, str):
            raise AuthError(f"JWT sub is {_show(sub)}, expected a string {where}", reason="bad_sub")
        # Last, after everything else passed: a refused token must not burn its jti.
        await self._replay.remember((iss, jti), exp + leeway, now)
        return Principal(
            issuer=iss,
            subject=sub,
            client=sub or iss,
            kind="jwt",
            tenant=tenant if isinstance(tenant, str) else None,
        )

    async def _keys_for(self, iss: str, kid: str, alg: str, jku: str | None) -> list[tuple[_Key, _RemoteSet | None]]:
        """The keys of issuer ``iss`` that may verify this token (matching ``kid``, of the type ``alg`` needs), each
        with the fetched set that served it (None: a file key)."""
        trust = self._trust[iss]
        if jku is not None:
            try:
                parts = _split_url(jku)
            except ValueError as exc:
                raise AuthError(f"JWT jku {_show(jku)} {exc} (kid {_show(kid)})", reason="bad_jku") from None
            if not any(_under(parts, allowed) for allowed in trust.jku_allow):
                raise AuthError(
                    f"JWT jku {_show(jku)} is not under a prefix allowed for iss {_show(iss)} (kid {_show(kid)})",
                    reason="bad_jku",
                )
            local: tuple[_Key, ...] = ()
            urls: tuple[str, ...] = (jku,)
        else:
            local, urls = trust.file_keys, trust.urls
        candidates: list[tuple[_Key, _RemoteSet | None]] = [(k, None) for k in local if k.kid == kid]
        errors = []
        for url in urls:
            remote = await self._remote_keys(iss, url, kid, budgeted=jku is not None)
            candidates += [(k, remote) for k in remote.keys if k.kid == kid]
            if remote.error:
                errors.append(f"{url}: {remote.error}")
        if not candidates:
            why = f"; fetching keys failed: {'; '.join(errors)}" if errors else ""
            raise AuthError(
                f"no key with kid {_show(kid)} in the key sets of iss {_show(iss)}{why}", reason="unknown_kid"
            )
        kty, crv = ALGORITHMS[alg]
        usable, refused = [], []
        for key, served_by in candidates:
            if key.problem is not None:
                refused.append(key.problem)
            elif key.kty != kty or key.crv != crv:
                refused.append(
                    f"it is {key.kty} {key.crv or ''}".rstrip() + f", {alg} needs {kty} {crv or ''}".rstrip()
                )
            elif key.alg is not None and key.alg != alg:
                refused.append(f"it is for alg {key.alg}, the token says {alg}")
            else:
                usable.append((key, served_by))
        if not usable:
            raise AuthError(
                f"the key with kid {_show(kid)} cannot verify this token: {'; '.join(refused)}", reason="bad_key"
            )
        return usable

    async def _remote_keys(self, iss: str, url: str, kid: str, *, budgeted: bool) -> _RemoteSet:
        """The cached set of ``url`` for ``iss``, fetched first when missing, old, or lacking ``kid`` (rate limited;
        ``budgeted``: a token's jku, held to the issuer's budget until it has verified a token)."""
        slot = (iss, url)
        entry = self._sets.get(slot)
        if entry is None or self._wants_fetch(entry, kid):
            try:
                async with self._locks.setdefault(slot, anyio.Lock()):
                    # Whoever waited on the lock finds the set the first one fetched.
                    entry = self._sets.get(slot)
                    if entry is None or self._wants_fetch(entry, kid):
                        entry = await self._refresh(slot, entry, budgeted=budgeted)
            finally:
                # Refused by the budget (or cancelled): no lock is kept for a URL with no cached set, or tokens
                # naming ever new paths would grow this dict without bound.
                if slot not in self._sets:
                    self._locks.pop(slot, None)
        if entry.keys and self._clock() - entry.fetched_at > JWKS_MAX_STALE_S:
            return _RemoteSet(error=f"keys are older than {JWKS_MAX_STALE_S:.0f} s and refreshing fails")
        return entry

    def _wants_fetch(self, entry: _RemoteSet, kid: str) -> bool:
        now = self._clock()
        if now - entry.attempted_at < JWKS_REFRESH_INTERVAL_S:
            return False
        return now - entry.fetched_at >= JWKS_TTL_S or all(k.kid != kid for k in entry.keys)

    async def _refresh(self, slot: tuple[str, str], entry: _RemoteSet | None, *, budgeted: bool) -> _RemoteSet:
        url = slot[1]
        now = self._clock()
        if budgeted and not (entry is not None and entry.proven):
            fetches = self._fetches.setdefault(slot[0], deque())
            while fetches and fetches[0] <= now - 60.0:
                fetches.popleft()
            if len(fetches) >= JWKS_FETCHES_PER_MINUTE:
                # Leave attempted_at alone: the URL gets its fetch once the budget allows.
                why = f"the jku fetch budget of iss {_show(slot[0])} for this minute is spent"
                return entry if entry is not None else _RemoteSet(error=why)
            fetches.append(now)
        if entry is None:
            if len(self._sets) >= JWKS_MAX_URLS:
                # Evict a set that never verified a token first: forged jku paths must not push out real ones.
                unproven = [u for u in self._sets if not self._sets[u].proven]
                oldest = min(unproven or self._sets, key=lambda u: self._sets[u].attempted_at)
                del self._sets[oldest]
                self._locks.pop(oldest, None)
            entry = self._sets[slot] = _RemoteSet()
        entry.attempted_at = now
        try:
            body = await self._fetch(url)
            entry.keys = _parse_jwks(body, url)
        except (httpx.HTTPError, TimeoutError, OSError, ValueError) as exc:
            entry.error = str(exc) or type(exc).__name__
            logger.warning(
                "JWKS %s of iss %s could not be refreshed, keeping %d cached keys: %s",
                url,
                _show(slot[0]),
                len(entry.keys),
                entry.error,
            )
            return entry
        entry.fetched_at, entry.error = now, None
        logger.info("JWKS %s of iss %s fetched: %d keys", url, _show(slot[0]), len(entry.keys))
        return entry

    async def _fetch(self, url: str) -> bytes:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        body = bytearray()
        with anyio.fail_after(2 * self._fetch_timeout_s):
            async with self._http.stream(
                "GET",
                url,
                timeout=httpx.Timeout(self._fetch_timeout_s),
                follow_redirects=False,  # a redirect could lead off the allow-listed origin
                # identity: the size cap must bound what we hold, not what a gzip bomb expands to.
                headers={"Accept": "application/jwk-set+json, application/json", "Accept-Encoding": "identity"},
            ) as response:
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}, expected 200")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > JWKS_MAX_BYTES:
                    raise ValueError(f"body of {declared} bytes exceeds the {JWKS_MAX_BYTES} byte cap")
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise ValueError(f"body is {encoding}-encoded; we asked for identity")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError(f"body exceeds the {JWKS_MAX_BYTES} byte cap")
        return bytes(body)


def _bearer_credential(authorization: str | None) -> str:
    if authorization is None or not authorization.strip():
        raise AuthError("no Authorization header", reason="missing")
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError(f"Authorization scheme {_show(scheme[:16])} is not Bearer", reason="not_bearer")
    credential = credential.strip()
    if not credential:
        raise AuthError("Authorization: Bearer carries no token", reason="missing")
    if len(credential) > MAX_TOKEN_CHARS or not _TOKEN68.fullmatch(credential):
        raise AuthError(f"the bearer token ({len(credential)} chars) is not an RFC 6750 token", reason="malformed")
    return credential


def _json_segment(segment: str, name: str) -> dict[str, Any]:
    """Decode one base64url JWT segment into a JSON object, refusing duplicate members.

    Duplicates are refused because parsers disagree on which one wins (a differential between our check
    and PyJWT's could let one ``alg`` be checked and another used).
    """
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (binascii.Error, ValueError) as exc:
        raise AuthError(f"JWT {name} is not base64url JSON: {exc}", reason="malformed") from None
    if not isinstance(value, dict):
        raise AuthError(f"JWT {name} is {type(value).__name__}, expected a JSON object", reason="malformed")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member names")
    return result


def _load_jwks_file(path: str) -> tuple[_Key, ...]:
    try:
        data = Path(path).read_bytes()
        if len(data) > JWKS_MAX_BYTES:
            raise ValueError(f"{len(data)} bytes exceeds the {JWKS_MAX_BYTES} byte cap")
        keys = _parse_jwks(data, path, private_is_error=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"AuthConfig.jwks: {path} cannot be used: {exc}") from exc
    if not any(k.problem is None for k in keys):
        problems = "; ".join(k.problem or "" for k in keys) or "no keys with a kid"
        raise UsageError(f"AuthConfig.jwks: {path} holds no usable public signing key ({problems})")
    return keys


def _parse_jwks(data: bytes, source: str, *, private_is_error: bool = False) -> tuple[_Key, ...]:
    """The keys of a JWK Set; raises ValueError when it is not one."""
    document = json.loads(data)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError('not a JWK Set (a JSON object with a "keys" array)')
    if len(keys) > JWKS_MAX_KEYS:
        raise ValueError(f"{len(keys)} keys, more than {JWKS_MAX_KEYS}")
    parsed = []
    for jwk_ in keys:
        if not isinstance(jwk_, dict) or not isinstance(jwk_.get("kid"), str):
            continue  # CDS Hooks selects by kid; a key without one can never be chosen
        if private_is_error and "d" in jwk_:
            raise ValueError(f"key {jwk_['kid']!r} holds private key material ('d'); give the public JWKS")
        parsed.append(_parse_jwk(jwk_))
    return tuple(parsed)


def _parse_jwk(jwk_: dict[str, Any]) -> _Key:
    kid, kty = jwk_["kid"], jwk_.get("kty")
    crv, alg = jwk_.get("crv"), jwk_.get("alg")
    shown = f"key {_show(kid)}"

    def refused(problem: str) -> _Key:
        return _Key(kid, str(kty), crv if isinstance(crv, str) else None, None, None, f"{shown} {problem}")

    if "use" in jwk_ and jwk_["use"] != "sig":
        return refused(f"has use {_show(jwk_['use'])}, not sig")
    key_ops = jwk_.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return refused(f"has key_ops {_show(key_ops)} without verify")
    if "d" in jwk_:
        return refused("holds private key material; a JWKS must publish public keys only")
    if alg is not None and alg not in ALGORITHMS:
        return refused(f"is for alg {_show(alg)}, which is not allowed")
    try:
        if kty == "EC":
            public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey = _ec_public(ECAlgorithm.from_jwk(jwk_))
        elif kty == "RSA":
            public = _rsa_public(RSAAlgorithm.from_jwk(jwk_))
            if public.key_size < MIN_RSA_BITS:
                return refused(f"is RSA {public.key_size} bits, fewer than {MIN_RSA_BITS}")
        else:
            return refused(f"has kty {_show(kty)}; only EC and RSA keys verify allowed algorithms")
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        return refused(f"is not a valid {kty} public key: {exc}")
    return _Key(kid, kty, crv if kty == "EC" else None, alg, public, None)


def _ec_public(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not a public key")
    return key


def _rsa_public(key: object) -> rsa.RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not a public key")
    return key


def _looks_like_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def _checked_url(url: str, setting: str) -> tuple[str, str, int, str]:
    try:
        return _split_url(url)
    except ValueError as exc:
        raise UsageError(f"{setting}: {url!r} {exc}") from None


def _split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a URL keys may come from; ValueError saying why it may not.

    Strict on purpose: anything a URL parser and an HTTP client might read differently (user info,
    backslashes, encoded separators, dot segments) is refused rather than interpreted.
    """
    if len(url) > 2048 or any(not 0x21 <= ord(c) <= 0x7E for c in url) or "\\" in url:
        raise ValueError("holds whitespace, control, non-ASCII or backslash characters")
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if "@" in parts.netloc:
        raise ValueError("holds user information (user@host)")
    if not host or not _HOST.fullmatch(host if ":" not in host else f"[{host}]"):
        raise ValueError("has no valid host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if scheme != "https" and not (scheme == "http" and host in _LOOPBACK):
        raise ValueError("is not https (plain http only for 127.0.0.1, ::1 or localhost)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("has a query or fragment")
    path = parts.path or "/"
    if any(s in (".", "..") for s in path.split("/")) or _ENCODED_SEPARATOR.search(path):
        raise ValueError("has dot segments or encoded separators in its path")
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _under(url: tuple[str, str, int, str], prefix: tuple[str, str, int, str]) -> bool:
    """Whether ``url`` is ``prefix`` or below it: same origin, then the prefix path up to a ``/`` boundary."""
    if url[:3] != prefix[:3]:
        return False
    path, base = url[3], prefix[3]
    return path == base or path.startswith(base if base.endswith("/") else base + "/")


def _show(value: object) -> str:
    """A bounded repr for log messages (header and claim values are attacker-controlled)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
