"""Fetch missing prefetch from the CDS client's FHIR server (``fhirServer`` + ``fhirAuthorization``).

The token is the EHR's, lent for this one call: it goes to ``fhirServer`` alone (no redirects are followed,
``next`` links only on the same origin) and is never logged or echoed in a message. Only ``http(s)`` URLs;
plain ``http`` only to a loopback host unless an allow-list names the server (``--fhir-server-allow``), so a
caller cannot point the service at an internal address with a TLS-less URL. Every page is read under a time
and size bound.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

import httpx

from fhirplug.serve._cards import problem

__all__ = ["check_server", "fetch_prefetch"]

#: Pages of a search followed at most (``next`` links): a patient with more notes is predicted on the first ones.
MAX_PAGES = 10


def _loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server(url: str, allow: tuple[str, ...]) -> None:
    """Raise ``HookProblem`` (400, 403) unless the service may send the client's token to ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise problem(400, "value", "fhirServer must be an http(s) URL", "fhirServer")
    if allow:
        if not any(url.rstrip("/") == a.rstrip("/") or url.startswith(a.rstrip("/") + "/") for a in allow):
            raise problem(
                403, "forbidden", "fhirServer is not on this service's allow-list (--fhir-server-allow)", "fhirServer"
            )
    elif parts.scheme == "http" and not _loopback(parts.hostname):
        raise problem(
            400,
            "security",
            "fhirServer uses plain http to a non-loopback host; use https, or list it with --fhir-server-allow",
            "fhirServer",
        )


async def fetch_prefetch(
    client: httpx.AsyncClient,
    server: str,
    token: str,
    queries: dict[str, str],
    *,
    limit_bytes: int,
) -> dict[str, list[dict[str, Any]]]:
    """Prefetch key → the searchset pages the server answered for its query.

    Raises:
        HookProblem: 412 when the server cannot be read (unreachable, an error status, not JSON, too big).
    """
    base = server.rstrip("/")
    origin = urlsplit(base)
    headers = {"Accept": "application/fhir+json", "Authorization": f"Bearer {token}"}
    out: dict[str, list[dict[str, Any]]] = {}
    spent = 0
    for key, query in queries.items():
        url: str | None = f"{base}/{query}"
        pages: list[dict[str, Any]] = []
        while url is not None and len(pages) < MAX_PAGES:
            try:
                async with client.stream("GET", url, headers=headers) as response:
                    if response.status_code != 200:
                        raise problem(
                            412,
                            "not-found",
                            f"fhirServer answered {response.status_code} to the {key} prefetch query; send the "
                            "prefetch, or a token that can read it",
                            f"prefetch.{key}",
                        )
                    chunks: list[bytes] = []
                    async for chunk in response.aiter_bytes():
                        spent += len(chunk)
                        if spent > limit_bytes:
                            raise problem(
                                412,
                                "too-costly",
                                f"the prefetch fetched from fhirServer is over {limit_bytes:,} bytes "
                                "(max_request_bytes); send a smaller prefetch",
                                f"prefetch.{key}",
                            )
                        chunks.append(chunk)
            except httpx.HTTPError as exc:
                # The exception's text can hold the URL, never the token (a header); its type says enough.
                raise problem(
                    412, "transient", f"fhirServer could not be read for {key} ({type(exc).__name__})", "fhirServer"
                ) from None
            try:
                page = json.loads(b"".join(chunks))
            except (ValueError, RecursionError):  # bad UTF-8, bad JSON, an int past 4,300 digits
                raise problem(
                    412, "structure", f"fhirServer's answer to {key} is not JSON", f"prefetch.{key}"
                ) from None
            if not isinstance(page, dict):
                raise problem(412, "structure", f"fhirServer's answer to {key} is not a resource", f"prefetch.{key}")
            pages.append(page)
            url = _next(page, origin)
        out[key] = pages
    return out


def _next(page: dict[str, Any], origin: Any) -> str | None:
    for link in page.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            parts = urlsplit(link["url"])
            # Same scheme and host only: the token must not follow a link elsewhere.
            if (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc):
                return str(link["url"])
    return None
