"""OpenAI-compatible HTTP serving over `dspark.Engine` (`dspark serve`, docs/SERVING.md).

    config     ServeConfig: how the server listens and admits requests
    protocol   request validation, OpenAI response / chunk / error bodies
    bridge     the engine's blocking iterators -> asyncio (one pump thread per HTTP request)
    metrics    per-response speculative-decoding stats, Prometheus counters, the log line
    app        the FastAPI app: endpoints, admission (429 / 503), disconnects, errors
    server     uvicorn with a SIGTERM drain; `start_server` runs it in this process

Above the engine: it imports the engine and below, never the CLI. The web parts need the
`serve` extra (`pip install 'dspark[serve]'`: fastapi, uvicorn, prometheus_client); they load on
first use, so `ServeConfig` (and `dspark --help`) work without it.

    from dspark.serve import start_server
    with start_server("path/to/target", draft="path/to/draft", schedule="budget") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
"""
import importlib

from .config import ServeConfig

# name -> the submodule that defines it (imported on first access: they need the serve extra)
_LAZY = {"ServerState": "app", "create_app": "app", "ServeMetrics": "metrics", "spec_decode_metrics": "metrics",
         "ServerHandle": "server", "listen": "server", "model_name_for": "server", "serve": "server",
         "start_server": "server"}
SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client")


def missing_packages() -> list:
    """The serve extra's packages that are not installed."""
    missing = []
    for name in SERVE_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    missing = missing_packages()
    if missing:
        raise ImportError(f"dspark.serve needs {', '.join(missing)}: pip install 'dspark[serve]'")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    return value


__all__ = ["ServeConfig", "missing_packages", *_LAZY]
