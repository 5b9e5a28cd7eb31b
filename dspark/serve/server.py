"""Running the app: `serve` (blocking, for `dspark serve`) and `start_server` (in a thread of
this process, for tests and notebooks), both on uvicorn.

Shutdown (SIGTERM, SIGINT, or `ServerHandle.stop`): the server stops admitting (new requests get
503, the listening socket closes), lets running requests finish for up to `drain_timeout`
seconds, aborts what is left, and returns. uvicorn re-raises a caught signal after its shutdown
(the process would die of SIGTERM); `_DrainingServer` does not, so `dspark serve` exits 0.
"""
import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import uvicorn

from ..errors import ConfigError
from .app import create_app
from .config import ServeConfig

log = logging.getLogger("dspark.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self.signals: list = []

    def handle_exit(self, sig, frame) -> None:
        self.state.draining = True            # the app answers 503 from now on
        if not self.signals:
            log.info("shutting down: draining running requests (up to %.0f s)", self.state.config.drain_timeout)
        self.signals.append(sig)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield                             # signals reach the main thread only
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """Begin the same drain as SIGTERM (from any thread)."""
        self.state.draining = True
        self.should_exit = True


def model_name_for(target) -> str:
    """What clients call the model by default: the target's directory or file name, or its known name."""
    name = Path(str(target)).name
    return name[:-5] if name.lower().endswith(".gguf") else name or str(target)


def listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so port 0 resolves to a real port before uvicorn starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port "
                          "(0 = any free port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def _uvicorn_server(engine, config: ServeConfig, model_name: Optional[str]):
    app = create_app(engine, config, model_name)
    uv_config = uvicorn.Config(app, log_level="info", access_log=config.access_log, lifespan="on",
                               timeout_graceful_shutdown=config.drain_timeout, log_config=None)
    return _DrainingServer(uv_config, app.state.dspark)


def serve(engine, config: Optional[ServeConfig] = None, model_name: Optional[str] = None, on_ready=None,
          sock: Optional[socket.socket] = None) -> int:
    """Serve until SIGTERM / SIGINT; return 0 after a SIGTERM drain, 130 after SIGINT.
    on_ready(url) is called once the server accepts connections. `sock`: a socket from `listen`
    (bound before a slow model load, so a busy port fails at once); default: bind config's."""
    config = config or ServeConfig()
    sock = sock or listen(config.host, config.port)
    server = _uvicorn_server(engine, config, model_name)
    engine.backend.release_host_threads()     # this thread loaded the model; the engine's driver runs it now

    async def run():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started and on_ready is not None:
            on_ready(_url(sock))
        await task

    try:
        asyncio.run(run())
    finally:
        sock.close()
    return 130 if signal.SIGINT in server.signals else 0


class ServerHandle:
    """A server running in a thread of this process (see `start_server`).

        with start_server(engine) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    """

    def __init__(self, server: _DrainingServer, thread: threading.Thread, url: str, engine):
        self._server, self._thread = server, thread
        self.url, self.base_url, self.engine = url, url + "/v1", engine
        self.model = server.state.model_name

    @property
    def state(self):
        """The app's ServerState (metrics, in-flight count, draining flag)."""
        return self._server.state

    def stop(self, timeout: Optional[float] = None) -> None:
        """Drain and stop; wait up to `timeout` seconds (default: the drain timeout + 10 s)."""
        self._server.stop()
        self._thread.join(timeout if timeout is not None else self._server.state.config.drain_timeout + 10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(engine_or_target, draft=None, *, host: str = "127.0.0.1", port: int = 0,
                 ready_timeout: float = 60.0, backend=None, config: Optional[ServeConfig] = None,
                 **engine_options) -> ServerHandle:
    """Start the OpenAI-compatible server in a background thread and return once /health answers.

    engine_or_target: an `Engine`, or a target for `Engine.from_pretrained` (then `draft`, `backend`
    and `engine_options` go to it). port 0 picks a free port; `handle.base_url` is what an OpenAI
    client needs. `config` overrides host / port and sets the other ServeConfig fields.
    """
    from ..engine import Engine

    if isinstance(engine_or_target, Engine):
        if draft is not None or engine_options or backend is not None:
            raise ConfigError("draft, backend and engine options apply when start_server loads a target; "
                              "an Engine is already built")
        engine, model_name = engine_or_target, "dspark"
    else:
        engine = Engine.from_pretrained(engine_or_target, draft=draft, backend=backend, **engine_options)
        model_name = model_name_for(engine_or_target)
    if config is None:
        config = ServeConfig(host=host, port=port, log_interval=0, access_log=False)
    sock = listen(config.host, config.port)
    server = _uvicorn_server(engine, config, model_name)
    engine.backend.release_host_threads()     # (rebuilt if this thread runs torch ops again)
    failure: list = []

    def run():
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:          # reported to the caller of start_server
            failure.append(exc)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name="dspark-serve", daemon=True)
    thread.start()
    url = _url(sock)
    deadline = time.monotonic() + ready_timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy
    while True:
        if failure or not thread.is_alive():
            raise RuntimeError(f"the server failed to start: {failure[0] if failure else 'it exited'}")
        try:
            with opener.open(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return ServerHandle(server, thread, url, engine)
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"the server at {url} was not ready within {ready_timeout} s")
        time.sleep(0.05)


__all__ = ["ServerHandle", "listen", "model_name_for", "serve", "start_server"]
