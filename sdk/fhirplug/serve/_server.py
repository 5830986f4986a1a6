"""Run the app on uvicorn: on a socket we bind ourselves (so "cannot listen" is ours to word, and port 0 is known
before the first request), HTTP/1.1 with keep-alive, uvicorn's access log off (the app writes its own).

``fhirplug serve --workers N`` (:func:`serve_workers`): the process that bound the socket supervises N worker
processes that all accept on it; each verifies and loads the plugins itself, and all share one replay cache
(:class:`~fhirplug.serve._auth.SharedReplayCache`), so a jti used on one worker is refused on every other.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette

from fhirplug.errors import FhirplugError, UsageError
from fhirplug.serve._auth import SharedReplayCache
from fhirplug.serve._metrics import MULTIPROCESS_ENV, mark_process_dead
from fhirplug.serve.app import ServeConfig, create_app

if TYPE_CHECKING:
    from fhirplug.plugin import Plugin

__all__ = ["AppSpec", "RunningServer", "bind", "log_to_stderr", "run_in_thread", "serve_workers", "uvicorn_server"]

#: Pending connections the kernel keeps for us (the stdlib server's 5 refused bursts).
BACKLOG = 1024


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one).

    Raises:
        FhirplugError: the address cannot be bound (in use, not ours).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise FhirplugError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Starlette, *, keep_alive_s: int = 5) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        access_log=False,
        log_config=None,  # the embedding program's logging config stands
        lifespan="on",
        server_header=False,
        date_header=True,
        timeout_keep_alive=keep_alive_s,
        timeout_graceful_shutdown=10,
        backlog=BACKLOG,
        http="h11",
        ws="none",
    )
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """A server running in a thread (tests, notebooks, benchmarks); :meth:`stop` ends it."""

    app: Starlette
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    url: str

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def run_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0) -> RunningServer:
    """Serve ``app`` from a daemon thread; returns once it accepts requests.

    Raises:
        FhirplugError: it cannot listen, or did not start within ``start_timeout`` seconds.
    """
    sock = bind(host, port)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fhirplug-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise FhirplugError(f"the server did not start within {start_timeout:g} s")
        time.sleep(0.01)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return RunningServer(app, server, thread, sock, f"http://{shown}:{bound_port}")


# --- worker processes ---------------------------------------------------------------------------------------------

#: Seconds a worker is given to finish its requests after SIGTERM (uvicorn's graceful shutdown), then a margin.
STOP_GRACE_S = 15.0
#: Restart delays after a worker dies: doubling from the first to the last; reset once a worker has run a minute.
RESTART_BACKOFF_S = (1.0, 30.0)
RESTART_RESET_S = 60.0


@dataclass(frozen=True)
class AppSpec:
    """How a process builds the app: the plugins to verify and load, with which options, and how to serve them.

    Picklable, so ``fhirplug serve --workers N`` can hand it to each worker, which verifies and loads the plugins
    itself (an onnxruntime session is not shared across processes).

    Attributes:
        plugins: bundle directories or discovered plugin names, as ``load_plugin`` takes them.
        config: how to serve.
        load_options: the other keyword arguments of :func:`fhirplug.plugin.load_plugin` (trust, provider,
            variant, threads, budget, evidence_segments).
    """

    plugins: tuple[str, ...]
    config: ServeConfig
    load_options: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> list[Plugin]:
        """Verify and load every plugin.

        Raises:
            FhirplugError: a plugin cannot be loaded (the ``load_plugin`` errors).
        """
        from fhirplug.plugin import load_plugin

        return [load_plugin(name, **self.load_options) for name in self.plugins]

    def build(self) -> Starlette:
        """Verify and load every plugin, then make the app.

        Raises:
            FhirplugError: a plugin cannot be loaded (the ``load_plugin`` errors), or the config is bad.
        """
        return create_app(self.load(), self.config)


def log_to_stderr() -> None:
    """One line per event of the ``fhirplug.serve`` loggers on stderr, unless the program set logging up."""
    access = logging.getLogger("fhirplug.serve")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)


def serve_workers(
    spec: AppSpec,
    sock: socket.socket,
    workers: int,
    *,
    announce: Callable[[list[str]], None] | None = None,
) -> None:
    """Serve from ``workers`` processes that share ``sock`` and one replay cache, until SIGTERM or SIGINT.

    The calling process is the supervisor: it creates the shared replay cache (a SQLite database in a private
    0700 folder it removes at the end), starts the workers (``spawn``: a fresh interpreter each, no onnxruntime
    threads inherited through ``fork``), and restarts one that dies, with backoff. SIGTERM or SIGINT stops every
    worker gracefully (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`); a second signal kills them at once.
    A worker whose supervisor is gone (even killed with SIGKILL) stops by itself: it watches its pipe.

    Args:
        spec: what each worker serves (its config's ``replay_db`` is set here).
        sock: the listening socket (:func:`bind`), accepted on by every worker.
        workers: how many worker processes, at least 2 (one process needs no supervisor).
        announce: called once with the CDS service ids when every worker is ready.

    Raises:
        UsageError: ``workers`` is below 2, or this is not the main thread (signal handlers live there).
        FhirplugError: a worker failed before every worker was ready (with that worker's error and exit code).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
        raise UsageError(f"serve_workers needs workers ≥ 2, got {workers!r}; serve one process with uvicorn_server")
    if threading.current_thread() is not threading.main_thread():
        raise UsageError("serve_workers must run in the main thread: it handles SIGTERM and SIGINT")
    folder = tempfile.mkdtemp(prefix="fhirplug-replay-")  # mode 0700: only this user reaches the jti database
    previous = os.environ.get(MULTIPROCESS_ENV)
    try:
        db = os.path.join(folder, "replay.sqlite3")
        SharedReplayCache.create(db)
        shared = replace(spec, config=replace(spec.config, replay_db=db))
        # One Prometheus multiprocess folder for every worker (spawn: each inherits this environment and reads it
        # when it imports prometheus_client), so /metrics reports the whole server whichever worker answers.
        metrics = os.path.join(folder, "metrics")
        os.mkdir(metrics, 0o700)
        os.environ[MULTIPROCESS_ENV] = metrics
        _Supervisor(shared, sock, workers, announce, metrics).run()
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started_at: float
    ready: bool = False
    failure: tuple[int, str] | None = None  # (exit code, message) the worker reported before dying
    eof: bool = False  # its end of the pipe is closed: it is gone


class _Supervisor:
    def __init__(
        self,
        spec: AppSpec,
        sock: socket.socket,
        count: int,
        announce: Callable[[list[str]], None] | None,
        metrics_dir: str,
    ) -> None:
        self.spec = spec
        self.metrics_dir = metrics_dir
        self.sock = sock
        self.count = count
        self.announce = announce
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.restart_at: dict[int, float] = {}  # index → monotonic time a dead worker is started again
        self.backoff: dict[int, float] = {}
        self.stopping = False
        self.force = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.force = self.stopping  # a second signal: no more grace
        self.stopping = True

    def run(self) -> None:
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            for index in range(self.count):
                self._start(index)
            names = self._wait_until_ready()
            if names is None:
                return  # stopped while starting
            _event("ready", workers=self.count, pids=[w.process.pid for w in self.workers.values()])
            if self.announce is not None:
                self.announce(names)
            while not self.stopping:
                self._step(timeout=0.25)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self, index: int) -> None:
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(
            target=_worker_main, args=(self.spec, self.sock, index, child_end), name=f"fhirplug-worker-{index}"
        )
        # SIGINT ignored across the exec: a Ctrl-C reaches the whole process group, and a worker still
        # importing would print a KeyboardInterrupt traceback; the supervisor stops workers with SIGTERM.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, interrupt)
            child_end.close()
        self.workers[index] = _Worker(index, process, parent_end, time.monotonic())
        _event("started", worker=index, pid=process.pid)

    def _wait_until_ready(self) -> list[str] | None:
        names: list[str] = []
        while not self.stopping:
            for worker in self._readable(timeout=0.25):
                got = self._receive(worker)
                if got is not None:
                    names = got
            for worker in self.workers.values():
                if not worker.ready and not worker.process.is_alive():
                    while worker.failure is None and not worker.eof:
                        self._receive(worker)  # what it said before it died; never blocks: its end is closed
                    code = worker.process.exitcode
                    exit_code, message = worker.failure or (
                        1,
                        f"worker {worker.index} (pid {worker.process.pid}) exited with code {code} while starting",
                    )
                    error = FhirplugError(message)
                    error.exit_code = exit_code
                    raise error
            if all(w.ready for w in self.workers.values()):
                return names
        return None

    def _readable(self, timeout: float) -> list[_Worker]:
        waiting = {w.conn: w for w in self.workers.values() if not w.eof}
        sentinels = [w.process.sentinel for w in self.workers.values()]
        ready = wait([*waiting, *sentinels], timeout)
        return [waiting[c] for c in ready if isinstance(c, Connection) and c in waiting]

    def _receive(self, worker: _Worker) -> list[str] | None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            worker.eof = True
            return None
        if message[0] == "ready":
            worker.ready = True
            _event("worker-ready", worker=worker.index, pid=worker.process.pid)
            return list(message[1])
        if message[0] == "failed":
            worker.failure = (int(message[1]), str(message[2]))
        return None

    def _step(self, timeout: float) -> None:
        for worker in self._readable(timeout):
            self._receive(worker)
        now = time.monotonic()
        for index, worker in list(self.workers.items()):
            if worker.process.is_alive() or self.stopping:
                continue
            worker.process.join()
            worker.conn.close()
            if worker.process.pid is not None:
                mark_process_dead(worker.process.pid, self.metrics_dir)
            del self.workers[index]
            ran = now - worker.started_at
            delay = RESTART_BACKOFF_S[0] if ran >= RESTART_RESET_S else self.backoff.get(index, RESTART_BACKOFF_S[0])
            self.backoff[index] = min(delay * 2, RESTART_BACKOFF_S[1])
            self.restart_at[index] = now + delay
            _event(
                "worker-died",
                level=logging.WARNING,
                worker=index,
                pid=worker.process.pid,
                exit_code=worker.process.exitcode,
                ran_s=round(ran, 1),
                restart_in_s=delay,
                reason=worker.failure[1][:300] if worker.failure else None,
            )
        for index, when in list(self.restart_at.items()):
            if when <= now and not self.stopping:
                del self.restart_at[index]
                self._start(index)

    def _stop_all(self) -> None:
        alive = [w for w in self.workers.values() if w.process.is_alive()]
        for worker in alive:
            worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in alive:
            while worker.process.is_alive() and time.monotonic() < deadline and not self.force:
                worker.process.join(0.1)
            if worker.process.is_alive():
                _event("worker-killed", level=logging.WARNING, worker=worker.index, pid=worker.process.pid)
                worker.process.kill()
            worker.process.join()
        for worker in self.workers.values():
            worker.conn.close()
        if alive:
            _event("stopped", workers=len(alive))
        self.workers.clear()


def _event(name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    logging.getLogger("fhirplug.serve").log(level, json.dumps({"event": name, **fields}))


def _worker_main(spec: AppSpec, sock: socket.socket, index: int, conn: Connection) -> None:
    """A worker process: verify and load the plugins, say so, serve ``sock`` until SIGTERM or the supervisor is gone."""
    # SIGTERM while loading: leave at once (there is nothing to drain yet); uvicorn takes it over once serving.
    signal.signal(signal.SIGTERM, _exit_quietly)
    log_to_stderr()
    try:
        app = spec.build()
    except FhirplugError as exc:
        conn.send(("failed", exc.exit_code, str(exc)))
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:
        # The supervisor prints this one line and exits 1; a traceback on the shared stderr would say no more.
        conn.send(("failed", 1, f"worker {index} failed while loading: {type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    server = uvicorn_server(app)
    names = list(app.state.fhirplug.services)
    threading.Thread(target=_report_then_watch, args=(server, conn, names), name="fhirplug-watch", daemon=True).start()
    server.run(sockets=[sock])


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _report_then_watch(server: uvicorn.Server, conn: Connection, names: list[str]) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.02)
    try:
        conn.send(("ready", names))
        conn.recv()  # blocks until the supervisor writes or, gone, its end closes
    except (EOFError, OSError):
        pass
    server.should_exit = True
