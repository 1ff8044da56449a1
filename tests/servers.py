"""Run an ASGI app on a real loopback socket for a test (uvicorn in a background thread).

``serve(app)`` is a context manager yielding the base URL (``http://127.0.0.1:PORT``). The port is chosen
by the OS when the socket is bound (no free-port guessing, so no collisions between servers or with other
processes); the call returns as soon as uvicorn is listening (a few milliseconds) and raises, never hangs,
when the server cannot start (lifespan startup failure, bind error: ``ServerStartError`` within
``startup_timeout`` seconds). On exit the server stops accepting, closes idle keep-alive connections and
gives running requests ``graceful_timeout`` seconds before cancelling them (a hung handler cannot block
the test). ``closed_port()`` gives a base URL where nothing listens (connection refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

__all__ = ["ServerStartError", "closed_port", "serve"]

_LOGGERS = ("uvicorn.error", "uvicorn.asgi")
_names = itertools.count(1)


class ServerStartError(RuntimeError):
    """The server did not start: uvicorn exited (its logged errors are in the message) or timed out."""


class _Server(uvicorn.Server):
    """A uvicorn server that reports when it listens and stops as soon as it is asked (no 0.1 s polling)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while not await self.on_tick(0):  # tick 0: refresh the Date header (about once a second)
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                pass

    def stop(self) -> None:
        """Ask the server to exit (from any thread)."""
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to wake
                loop.call_soon_threadsafe(wake.set)


class _ThreadErrors(logging.Handler):
    """Collects the uvicorn errors logged from one thread (the reason a startup failed)."""

    def __init__(self, thread_name: str) -> None:
        super().__init__(logging.ERROR)
        self.thread_name = thread_name
        self.messages: list[str] = []
        self.exception: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName != self.thread_name:
            return
        self.messages.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None and self.exception is None:
            self.exception = record.exc_info[1]


@contextlib.contextmanager
def serve(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    lifespan: str = "on",
    name: str = "test-server",
    startup_timeout: float = 10.0,
    graceful_timeout: float = 1.0,
    **config: Any,
) -> Iterator[str]:
    """Serve the ASGI ``app`` on ``host`` in a daemon thread; yields ``http://HOST:PORT``.

    ``port=0`` lets the OS pick a free port. ``name`` prefixes the server thread's name (log filters can
    use it). Extra keyword arguments go to ``uvicorn.Config``. Raises ``ServerStartError`` if the server
    does not start within ``startup_timeout`` seconds.
    """
    thread_name = f"{name}-{next(_names)}"
    options: dict[str, Any] = {"log_level": "warning", "access_log": False, "log_config": None,
                               "timeout_graceful_shutdown": graceful_timeout, **config}
    server = _Server(uvicorn.Config(app, host=host, port=port, lifespan=lifespan, **options))
    errors = _ThreadErrors(thread_name)
    loggers = [logging.getLogger(logger) for logger in _LOGGERS]
    for logger in loggers:
        logger.addHandler(errors)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # noqa: BLE001 - uvicorn signals a failed startup with SystemExit
            failure.append(exc)
        finally:
            server.ready.set()

    thread = threading.Thread(target=run, name=thread_name, daemon=True)
    thread.start()
    try:
        if not server.ready.wait(startup_timeout):
            server.stop()
            raise ServerStartError(f"{thread_name}: not listening after {startup_timeout} s")
        if not server.started:
            detail = "; ".join(errors.messages) or (repr(failure[0]) if failure else "uvicorn exited")
            # uvicorn reports a failed startup as SystemExit(3) after logging why: the log is the cause
            raise ServerStartError(f"{thread_name} failed to start: {detail}") from errors.exception
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
    bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    try:
        yield f"http://{shown}:{bound_port}"
    finally:
        server.stop()
        thread.join(graceful_timeout + 5.0)


_closed: dict[str, socket.socket] = {}
_closed_lock = threading.Lock()


def closed_port(host: str = "127.0.0.1") -> str:
    """A base URL on ``host`` where nothing listens: connecting to it is refused at once.

    The port is held by a socket that is bound but never listens, kept open for the whole session, so no
    other server can take it in the meantime.
    """
    with _closed_lock:
        sock = _closed.get(host)
        if sock is None:
            sock = _closed[host] = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, 0))
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{sock.getsockname()[1]}"
