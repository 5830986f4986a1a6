"""`fhirplug serve --workers N`: one replay cache for every worker (SQLite, first writer wins), across real
processes; a dead worker is restarted; SIGTERM stops them all; a worker whose supervisor is killed stops too."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from fhirplug.serve import AuthConfig, Authenticator, AuthError, ServeConfig  # noqa: E402
from fhirplug.serve._auth import SharedReplayCache  # noqa: E402
from tests.conftest import TINY_PLUGIN  # noqa: E402
from tests.sdk.serve.conftest import ISSUER  # noqa: E402

LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
CLI = "import sys; from fhirplug.cli import main; sys.exit(main())"
FEEDBACK = {"feedback": [{"card": "7d1e1b23-2d0e-4c0e-9c43-2f5c3d1a9b10", "outcome": "accepted"}]}


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "replay.sqlite3")
    SharedReplayCache.create(path)
    return path


# --- the shared cache, across real processes ----------------------------------------------------------------------

ADD_KEYS = """
import json, sys, time
from fhirplug.serve._auth import AuthError, SharedReplayCache
path, start, keys = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
cache = SharedReplayCache(path, 100_000)
while time.time() < start:
    time.sleep(0.001)
won, refused = [], []
for jti in keys:
    try:
        cache.add(("https://ehr.example.org", jti), time.time() + 300, time.time())
        won.append(jti)
    except AuthError as exc:
        refused.append(exc.reason)
print(json.dumps({"won": won, "refused": sorted(set(refused))}))
"""


def add_in_processes(db: str, orders: list[list[str]], start_in_s: float = 0.0) -> list[dict[str, Any]]:
    """Each list of jti values added by its own interpreter, all starting at one moment; what each won."""
    start = time.time() + start_in_s
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ADD_KEYS, db, str(start), json.dumps(keys)], stdout=subprocess.PIPE, text=True
        )
        for keys in orders
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results.append(json.loads(out))
    return results


def test_a_jti_one_process_used_is_refused_in_another(db: str) -> None:
    first, second = (add_in_processes(db, [keys])[0] for keys in (["jti-1", "jti-2"], ["jti-2", "jti-3"]))
    assert first == {"won": ["jti-1", "jti-2"], "refused": []}
    assert second == {"won": ["jti-3"], "refused": ["replay"]}


def test_concurrent_processes_adding_the_same_jtis_let_exactly_one_win_each(db: str) -> None:
    keys = [f"jti-{i}" for i in range(300)]
    orders = [random.Random(seed).sample(keys, len(keys)) for seed in range(3)]
    results = add_in_processes(db, orders, start_in_s=3.0)  # interpreters start, then race from one moment
    wins = Counter(jti for r in results for jti in r["won"])
    assert wins == Counter(dict.fromkeys(keys, 1))
    assert all(r["refused"] in ([], ["replay"]) for r in results)  # no busy or SQLite error under contention
    assert len(SharedReplayCache(db)) == len(keys)


# --- the shared cache, in one process -------------------------------------------------------------------------


def reason(call: Callable[[], Any]) -> str | None:
    try:
        call()
    except AuthError as exc:
        return exc.reason
    return None


def test_a_full_shared_cache_fails_closed_and_expired_rows_are_pruned(db: str) -> None:
    cache = SharedReplayCache(db, max_entries=2)
    now = time.time()
    assert reason(lambda: cache.add(("iss", "a"), now + 10, now)) is None
    assert reason(lambda: cache.add(("iss", "b"), now + 20, now)) is None
    assert reason(lambda: cache.add(("iss", "c"), now + 10, now)) == "replay_cache_full"
    assert reason(lambda: cache.add(("iss", "a"), now + 10, now)) == "replay"  # a replay is still called one
    assert len(cache) == 2
    # At now + 15, a has expired: pruned in the same transaction, which makes room for c.
    assert reason(lambda: cache.add(("iss", "c"), now + 30, now + 15)) is None
    assert len(cache) == 2
    assert reason(lambda: cache.add(("iss", "a"), now + 40, now + 15)) == "replay_cache_full"
    assert reason(lambda: cache.add(("iss", "b"), now + 40, now + 15)) == "replay"
    assert reason(lambda: cache.add(("other-iss", "b"), now + 40, now + 25)) is None  # keyed by (iss, jti)


def test_sqlite_failures_fail_closed(tmp_path: Path, db: str) -> None:
    missing = tmp_path / "gone.sqlite3"
    assert reason(lambda: SharedReplayCache(str(missing)).add(("iss", "a"), time.time() + 60, time.time())) == (
        "replay_cache_error"
    )
    assert not missing.exists()  # never created afresh: an empty cache would have forgotten every jti
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database" * 100)
    assert reason(lambda: SharedReplayCache(str(garbage)).add(("iss", "a"), time.time() + 60, time.time())) == (
        "replay_cache_error"
    )
    # Another process holding the write lock past the busy timeout: refused, and the jti is not burned.
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    cache = SharedReplayCache(db, busy_timeout_s=0.2)
    started = time.monotonic()
    assert reason(lambda: cache.add(("iss", "a"), time.time() + 60, time.time())) == "replay_cache_error"
    assert time.monotonic() - started >= 0.2
    holder.execute("ROLLBACK")
    holder.close()
    assert reason(lambda: cache.add(("iss", "a"), time.time() + 60, time.time())) is None


def test_two_authenticators_on_one_database_refuse_each_others_jtis(db: str, jwks_file: Path, sign: Any) -> None:
    config = AuthConfig(jwks=(str(jwks_file),), issuers=(ISSUER,))
    aud = "https://cds.example.org/fhir/$predict"

    async def go() -> list[str]:
        async with Authenticator(config, replay_db=db) as one, Authenticator(config, replay_db=db) as two:
            first, second = sign(aud), sign(aud)
            outcomes = []
            for auth, token in ((one, first), (two, first), (two, second), (one, second), (one, first)):
                try:
                    outcomes.append((await auth.authenticate(f"Bearer {token}", aud)).kind)
                except AuthError as exc:
                    outcomes.append(exc.reason)
            return outcomes

    assert asyncio.run(go()) == ["jwt", "replay", "jwt", "replay", "replay"]


def test_two_apps_sharing_replay_db_answer_a_replay_with_401(
    serve: Any, tiny_plugin: Any, jwks_file: Path, sign: Any, db: str
) -> None:
    config = ServeConfig(auth=AuthConfig(jwks=(str(jwks_file),), issuers=(ISSUER,)), replay_db=db)
    one, two = serve([tiny_plugin], config), serve([tiny_plugin], config)
    path = "/cds-services/tiny-notes/feedback"
    # Both listen on 127.0.0.1; the token names one URL (aud), so send it to each with that Host.
    token = sign(one.url + path)
    host = one.url.removeprefix("http://")
    statuses = [
        httpx.post(s.url + path, json=FEEDBACK, headers={"Authorization": f"Bearer {token}", "Host": host}).status_code
        for s in (one, two)
    ]
    assert statuses == [200, 401]


# --- fhirplug serve --workers 2, a real supervisor and real workers ----------------------------------------------


def _state(pid: int) -> str | None:
    """The process's state letter, or None when it is gone (a zombie counts as gone: it runs nothing)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    letter = text.rsplit(")", 1)[1].split()[0]
    return None if letter in ("Z", "X") else letter


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = {p for p in pids if _state(p) is not None}
        if not alive:
            return set()
        time.sleep(0.1)
    return {p for p in pids if _state(p) is not None}


class Served:
    """A `fhirplug serve --workers 2` subprocess; its stderr goes to a file that is read as it grows."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log_path = tmp_path / "serve.log"
        env = {**os.environ, "TMPDIR": str(tmp_path)}  # the private replay folder is made here
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLI, "serve", *args], stdout=subprocess.DEVNULL, stderr=log, env=env
            )
        self.base = ""

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 180.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"fhirplug serve exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in the serve log within {timeout:g} s:\n{self.text()[-3000:]}")

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.text().splitlines() if line.startswith('{"event": '))
        return [e for e in lines if e["event"] == name]

    def line_of(self, request_id: str) -> dict[str, Any]:
        """The access-log line of a request (written just after its response, so wait for it)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for event in self.events("request"):
                if event["id"] == request_id:
                    return event
            time.sleep(0.02)
        pytest.fail(f"request {request_id} is not in the serve log")

    def wait_ready(self) -> None:
        """Until every worker is ready (the CLI then prints the URLs); sets ``base``."""
        self.base = self.wait_for(r"discovery: GET (http://127\.0\.0\.1:\d+)/cds-services")[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def served(tmp_path: Path, jwks_file: Path) -> Iterator[Served]:
    server = Served(
        tmp_path,
        *(str(TINY_PLUGIN), "--allow-unsigned", "--port", "0", "--workers", "2"),
        *("--jwks", str(jwks_file), "--issuer", ISSUER),
    )
    server.wait_ready()
    yield server
    server.stop()


def _call(served: Served, client: Any, method: str, path: str, **kw: Any) -> tuple[int, int, dict[str, Any]]:
    """(status, pid of the worker that answered, its access-log line)."""
    request_id = uuid.uuid4().hex
    headers = {"X-Request-Id": request_id, **kw.pop("headers", {})}
    response = client.request(method, served.base + path, headers=headers, **kw)
    line = served.line_of(request_id)
    return response.status_code, line["pid"], line


def _sample(exposition: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (labels in any order); 0 when absent."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in exposition.splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric == name and set(rest.rstrip("}").split(",")) == wanted:
            return float(value)
    return 0.0


@LINUX_PROC
def test_workers_share_one_replay_cache_restart_when_killed_and_all_stop_on_sigterm(
    served: Served, tmp_path: Path, sign: Any
) -> None:
    ready = served.events("ready")[0]
    assert ready["workers"] == 2 and len(set(ready["pids"])) == 2
    assert _children(served.proc.pid) >= set(ready["pids"])
    folders = list(tmp_path.glob("fhirplug-replay-*"))
    assert len(folders) == 1 and stat.S_IMODE(folders[0].stat().st_mode) == 0o700
    assert (folders[0] / "replay.sqlite3").is_file()

    # One kept-alive connection to each worker: new connections until both workers have answered one. The
    # server drops a connection idle for 5 s (and httpx would quietly reconnect, maybe to the other worker), so
    # the one pinned first is checked again after the second is found.
    by_pid: dict[int, Any] = {}
    for _ in range(60):
        client = httpx.Client(timeout=30)
        _, pid, _ = _call(served, client, "GET", "/healthz")
        if pid in by_pid:
            client.close()
            continue
        by_pid[pid] = client
        if len(by_pid) == 2:
            checked = {_call(served, c, "GET", "/healthz")[1]: c for c in by_pid.values()}
            if len(checked) == 2:
                by_pid = checked
                break
            for extra in [c for c in by_pid.values() if c not in checked.values()]:
                extra.close()
            by_pid = checked
    assert set(by_pid) == set(ready["pids"]), "60 connections never reached both workers"
    (x, to_x), (y, to_y) = by_pid.items()
    path = "/cds-services/tiny-notes/feedback"

    def post(client: Any, token: str) -> tuple[int, int, dict[str, Any]]:
        return _call(served, client, "POST", path, json=FEEDBACK, headers={"Authorization": f"Bearer {token}"})

    try:
        first, second = sign(served.base + path), sign(served.base + path)
        results = [post(to_x, first), post(to_y, first), post(to_x, first), post(to_y, second), post(to_x, second)]
        assert [(status, pid) for status, pid, _ in results] == [(200, x), (401, y), (401, x), (200, y), (401, x)]
        assert "already used (replay)" in results[1][2]["auth"] and "already used (replay)" in results[4][2]["auth"]
        # /metrics is the whole server's, whichever worker answers: 2 accepted feedbacks, 3 refused, in total.
        assert (folders[0] / "metrics").is_dir()
        for client in (to_x, to_y):
            text = client.get(served.base + "/metrics").text
            assert _sample(text, "fhirplug_feedback_total", outcome="accepted", service="tiny-notes") == 2
            assert _sample(text, "fhirplug_requests_total", route="feedback", status="401") == 3
            assert _sample(text, "fhirplug_requests_total", route="feedback", status="200") == 2
    finally:
        to_x.close()
        to_y.close()

    # A worker killed outright is logged and replaced; the new one shares the cache.
    os.kill(x, signal.SIGKILL)
    served.wait_for(rf'"event": "worker-died", "worker": \d, "pid": {x}, "exit_code": -9')
    served.wait_for(rf'"event": "worker-ready", "worker": \d, "pid": (?!({x}|{y})\b)\d+')
    workers = {e["pid"] for e in served.events("worker-ready")} - {x}
    assert len(workers) == 2 and y in workers
    answered = set()
    for _ in range(6):  # new connections, so either worker may take each: the old token stays refused
        with httpx.Client(timeout=30) as client:
            status, pid, _ = post(client, first)
        assert status == 401
        answered.add(pid)
    assert answered <= workers
    with httpx.Client(timeout=30) as client:
        assert post(client, sign(served.base + path))[0] == 200
        # The killed worker's counts stay in the sums (a Prometheus counter never goes down).
        text = client.get(served.base + "/metrics").text
        assert _sample(text, "fhirplug_requests_total", route="feedback", status="401") == 3 + 6
        assert _sample(text, "fhirplug_feedback_total", outcome="accepted", service="tiny-notes") == 3

    # SIGTERM: the supervisor stops every worker gracefully, exits 0, and removes the replay folder.
    everyone = _children(served.proc.pid) | workers
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0
    assert _wait_gone(everyone, 10) == set()
    assert served.events("stopped")[0]["workers"] == 2
    assert not served.events("worker-killed")  # they stopped within the grace period
    assert not folders[0].exists()
    assert "Traceback" not in served.text()


@LINUX_PROC
def test_workers_stop_by_themselves_when_the_supervisor_is_killed(served: Served) -> None:
    workers = set(served.events("ready")[0]["pids"])
    everyone = _children(served.proc.pid)
    assert workers <= everyone
    served.proc.kill()  # SIGKILL: the supervisor cannot stop anyone, so each worker must notice
    served.proc.wait(30)
    assert _wait_gone(everyone, 30) == set()


@LINUX_PROC
def test_a_worker_that_keeps_failing_is_restarted_with_growing_delays(tmp_path: Path, tiny_bundle: Path) -> None:
    server = Served(tmp_path, str(tiny_bundle), "--allow-unsigned", "--insecure", "--port", "0", "--workers", "2")
    try:
        server.wait_ready()
        x, y = server.events("ready")[0]["pids"]
        tokenizer = tiny_bundle / "tokenizer.json"
        tokenizer.write_bytes(tokenizer.read_bytes() + b" ")  # tampered: every new worker now fails to load
        os.kill(x, signal.SIGKILL)
        server.wait_for(r'"event": "worker-died"(.*\n)*.*"event": "worker-died"(.*\n)*.*"event": "worker-died"')
        died = server.events("worker-died")
        assert [(d["exit_code"], d["restart_in_s"]) for d in died[:3]] == [(-9, 1.0), (3, 2.0), (3, 4.0)]
        assert died[0]["pid"] == x and died[0]["reason"] is None
        assert "tokenizer.json" in died[1]["reason"]
        assert _state(y) is not None  # the healthy worker serves on meanwhile
        with httpx.Client(timeout=30) as client:
            assert _call(server, client, "GET", "/healthz")[:2] == (200, y)
        # Stopped while its sibling waits for a restart: still a clean exit.
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.text()


@LINUX_PROC
def test_sigterm_while_the_workers_load_stops_them_cleanly(tmp_path: Path) -> None:
    server = Served(tmp_path, str(TINY_PLUGIN), "--allow-unsigned", "--insecure", "--port", "0", "--workers", "2")
    try:
        server.wait_for(r'"event": "started", "worker": 1')
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    started = {e["pid"] for e in server.events("started")}
    assert len(started) == 2 and _wait_gone(started, 10) == set()
    assert not list(tmp_path.glob("fhirplug-replay-*"))
    assert "Traceback" not in server.text()


@LINUX_PROC
def test_a_worker_that_cannot_load_stops_the_start_in_one_line(tmp_path: Path) -> None:
    server = Served(tmp_path, "no-such-plugin", "--insecure", "--port", "0", "--workers", "2")
    try:
        assert server.proc.wait(timeout=120) == 3  # the plugin-not-found exit code, from inside the worker
    finally:
        server.stop()
    text = server.text()
    assert "Error: no-such-plugin: no such bundle directory" in text and "Traceback" not in text
    started = {e["pid"] for e in server.events("started")}
    assert len(started) == 2 and _wait_gone(started, 10) == set()
    assert not list(tmp_path.glob("fhirplug-replay-*"))


def test_serve_help_names_workers() -> None:
    from click.testing import CliRunner

    from fhirplug.cli import main

    text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--workers" in text and "ISS=" in text


def test_the_app_spec_sets_every_plugins_evidence_segments() -> None:
    """``fhirplug serve --evidence-segments 0``: each worker's plugins keep window evidence (one model pass a note)."""
    from fhirplug._explain import EVIDENCE_SEGMENTS
    from fhirplug.serve._server import AppSpec
    from tests.conftest import TINY_PLUGIN
    from tests.sdk.test_bulk import _note

    options = {"allow_unsigned": True}
    (default,) = AppSpec((str(TINY_PLUGIN),), ServeConfig(), options).load()
    (window,) = AppSpec((str(TINY_PLUGIN),), ServeConfig(), {**options, "evidence_segments": 0}).load()
    assert (default.evidence_segments, window.evidence_segments) == (EVIDENCE_SEGMENTS, 0)
    note = "Patient seen in clinic today. Type 2 diabetes, elevated HbA1c on metformin. Vitals normal."
    (occluded,), (whole,) = default.predict(_note(0, note)).predictions, window.predict(_note(0, note)).predictions
    assert (occluded.evidence.start, occluded.evidence.end) == (30, 75)
    assert (whole.evidence.start, whole.evidence.end) == (0, len(note))
    from fhirplug import load_plugin
    from fhirplug.errors import UsageError

    with pytest.raises(UsageError, match="evidence_segments must be an integer ≥ 0"):
        load_plugin(TINY_PLUGIN, allow_unsigned=True, evidence_segments=-1)
