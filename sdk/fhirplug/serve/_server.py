"""Run the app on uvicorn: on a socket we bind ourselves (so "cannot listen" is ours to word, and port 0 is known
before the first request), HTTP/1.1 with keep-alive, uvicorn's access log off (the app writes its own)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette

from fhirplug.errors import FhirplugError

__all__ = ["RunningServer", "bind", "run_in_thread", "uvicorn_server"]

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
