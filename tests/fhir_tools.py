"""FHIR checks by implementations that are not fhirplug's: Medplum's R4 validator and FHIR server (tests/fhir_node).

Python side only: install the pinned npm packages when they are missing, run ``validate.mjs`` over resources,
start ``server.mjs`` on 127.0.0.1 and talk to it with ``urllib``. Stdlib only; every wait is bounded.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).parent / "fhir_node"
#: npm ci on a fresh clone downloads ~20 MB; a slow registry mirror can take minutes, never forever.
INSTALL_TIMEOUT_S = 600
#: Loading the R4 definitions takes about a second; validating a few hundred resources a few more.
VALIDATE_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 60
HTTP_TIMEOUT_S = 30

Issue = dict[str, Any]


def _node() -> str:
    """The node executable; skips the calling test when there is none (the only reason these checks skip)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the independent FHIR validator and server (tests/fhir_node) need Node 20+")
    return node


def ensure_installed() -> str:
    """Install tests/fhir_node's pinned packages (``npm ci``) when they are missing or older than the lockfile.

    Returns:
        The node executable.
    """
    node = _node()
    lock = NODE_DIR / "package-lock.json"
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    if installed.is_file() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return node
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("node is installed but npm is not: install npm, or run `npm ci --prefix tests/fhir_node` elsewhere")
    done = subprocess.run(
        [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"`npm ci --prefix tests/fhir_node` failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return node


def validate_resources(
    resources: Iterable[Mapping[str, Any]], extra_definitions: Sequence[Path | str] = ()
) -> list[list[Issue]]:
    """Validate FHIR R4 resources with Medplum's validator (one node process for all of them).

    Args:
        resources: the resources (a Bundle counts as one; its entries are validated inside it).
        extra_definitions: StructureDefinition files (or Bundles of them) to load besides R4 core: profiles named
            in ``meta.profile`` and extension definitions are then checked too.

    Returns:
        For each resource, in order, its OperationOutcome issues (every severity; empty when valid).
    """
    node = ensure_installed()
    items = list(resources)
    if not items:
        return []
    ndjson = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in items)
    done = subprocess.run(
        [node, str(NODE_DIR / "validate.mjs"), *(str(Path(p).resolve()) for p in extra_definitions)],
        input=ndjson,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=VALIDATE_TIMEOUT_S,
        cwd=NODE_DIR,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"validate.mjs failed ({done.returncode}): {done.stderr[-4000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if [line["index"] for line in lines] != list(range(len(items))):
        raise RuntimeError(f"validate.mjs answered {len(lines)} lines for {len(items)} resources")
    return [line["issues"] for line in lines]


def errors(issues: Iterable[Issue]) -> list[str]:
    """The error and fatal issues, each as ``expression: text`` (readable in an assertion message)."""
    return [
        f"{','.join(i.get('expression') or ['?'])}: {(i.get('details') or {}).get('text') or i.get('diagnostics')}"
        for i in issues
        if i.get("severity") in ("error", "fatal")
    ]


class FhirServer:
    """``server.mjs`` (Medplum FhirRouter + in-memory store) running on 127.0.0.1 until :meth:`stop`."""

    def __init__(self) -> None:
        node = ensure_installed()
        # stdin stays open for the server's life: when this process goes away, even killed, the server sees EOF
        # and exits, so no test run leaves a node process behind.
        self._process = subprocess.Popen(
            [node, str(NODE_DIR / "server.mjs")],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.base = f"http://127.0.0.1:{self._read_port()}"
        self._tenants = 0

    def _read_port(self) -> int:
        assert self._process.stdout is not None
        # select, not a bare readline: a server that never starts must fail the session, not hang it.
        ready, _, _ = select.select([self._process.stdout], [], [], SERVER_START_TIMEOUT_S)
        line = self._process.stdout.readline() if ready else ""
        words = line.split()
        if len(words) == 2 and words[0] == "listening" and words[1].isdigit():
            return int(words[1])
        self._process.kill()
        self._process.wait(timeout=10)
        stderr = self._process.stderr.read() if self._process.stderr else ""
        self.stop()
        raise RuntimeError(
            f"server.mjs did not print 'listening <port>' within {SERVER_START_TIMEOUT_S} s "
            f"(got {line!r}, exit {self._process.returncode}): {stderr[-4000:]}"
        )

    def new_base(self) -> str:
        """The base URL of a fresh, empty FHIR server in this process (tests do not see each other's data)."""
        self._tenants += 1
        return f"{self.base}/_t/test-{self._tenants}"

    def stop(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        for stream in (self._process.stdout, self._process.stderr):
            if stream:
                stream.close()


def fhir_request(base: str, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """One FHIR REST call to a loopback server: ``(HTTP status, JSON body)``; HTTP errors are returned, not raised.

    Args:
        base: a base URL on 127.0.0.1 (:class:`FhirServer`); anything else is refused.
        method: GET, POST, PUT or DELETE.
        path: relative to the base: ``""`` (batch/transaction), ``Patient/p1``, ``Condition?subject=Patient/p1``.
        body: JSON to send, or None.
    """
    if urllib.parse.urlsplit(base).hostname != "127.0.0.1":
        raise ValueError(f"fhir_request talks to 127.0.0.1 only, got {base!r}")
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        f"{base}/{path}" if path else f"{base}/",
        data=data,
        method=method,
        headers={"content-type": "application/fhir+json", "accept": "application/fhir+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}")


def search(base: str, query: str) -> list[dict[str, Any]]:
    """Every resource a search matches (``Condition?subject=Patient/p1``), following next links."""
    found: list[dict[str, Any]] = []
    path: str | None = query
    while path is not None:
        status, bundle = fhir_request(base, "GET", path)
        if status != 200 or bundle.get("resourceType") != "Bundle":
            raise AssertionError(f"GET {path} answered {status}: {json.dumps(bundle)[:500]}")
        found += [e["resource"] for e in bundle.get("entry", [])]
        nxt = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
        path = nxt[len(base) + 1 :] if nxt and nxt.startswith(base) else None
    return found


def references(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every ``reference`` string in a resource, as ``(FHIRPath-ish location, reference)``."""
    if isinstance(value, dict):
        for key, child in value.items():
            at = f"{path}.{key}" if path else key
            if key == "reference" and isinstance(child, str):
                yield path, child
            else:
                yield from references(child, at)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from references(child, f"{path}[{i}]")
