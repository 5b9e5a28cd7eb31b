"""CLI command `serve`: the OpenAI-compatible server (dspark.serve) over one engine.
Registered by `dspark.cli.build_parser`; same error and output conventions (the ready line and
the server's logs go to stderr; bad flags exit 2 before any model is loaded)."""
import logging
import sys

from ..errors import ConfigError
from .args import add_backend, add_dataclass_flags, add_engine_flags, engine_config, progress

# Help text of each ServeConfig field (flags are generated from the dataclass, like the engine's).
SERVE_HELP = {
    "host": "address to listen on (0.0.0.0 = every interface)",
    "port": "port to listen on (0 = any free port; the ready line names it)",
    "served_model_name": "the `model` clients send (default: the target's directory or model name)",
    "max_waiting_requests": "requests that may wait for a batch slot beyond --max-batch-size; more get 429",
    "drain_timeout": "on SIGTERM, seconds to let running requests finish before aborting them",
    "log_interval": "seconds between throughput / acceptance log lines (0 = off)",
    "api_key": "require `Authorization: Bearer KEY` on /v1/* (default: no key)",
    "access_log": "log one line per HTTP request",
}


def _cmd_serve(args) -> int:
    from ..serve import ServeConfig, missing_packages

    missing = missing_packages()
    if missing:
        raise ConfigError(f"dspark serve needs {', '.join(missing)}: pip install 'dspark[serve]'")
    from ..backends import get_backend
    from ..engine import Engine
    from ..serve import listen, model_name_for, serve

    # Validate every option and take the port before loading anything, so mistakes fail in milliseconds.
    config = engine_config(args)
    serve_config = ServeConfig(**{name: getattr(args, name) for name in SERVE_HELP})
    backend = get_backend(args.backend)
    sock = listen(serve_config.host, serve_config.port)
    _configure_logging()
    progress(f"loading target {args.target} (backend {backend.name}) ..."
             + (f" and draft {args.draft}" if args.draft else " (no draft: plain target decoding)"))
    try:
        engine = Engine.from_pretrained(args.target, draft=args.draft, backend=backend, **config.to_dict())
    except BaseException:
        sock.close()
        raise
    name = serve_config.served_model_name or model_name_for(args.target)

    def ready(url: str) -> None:
        progress(f"dspark serve: {name!r} ready at {url} (OpenAI base URL {url}/v1; gamma {engine.gamma}, "
                 f"schedule {config.schedule}, max batch {config.max_batch_size})")

    return serve(engine, serve_config, name, on_ready=ready, sock=sock)


def _configure_logging() -> None:
    """The server's own lines (dspark.serve, dspark.engine) and uvicorn's, on stderr."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def add_commands(commands, formatter, para) -> None:
    from ..serve import ServeConfig

    serve = commands.add_parser(
        "serve", formatter_class=formatter, help="an OpenAI-compatible HTTP server with continuous batching",
        description=para("Serve a target (and optionally a draft) over the OpenAI API: /v1/completions, "
                         "/v1/chat/completions and /v1/models, with /health and Prometheus /metrics. Requests "
                         "from all clients share one continuously batched engine; each response carries "
                         "metrics.speculative_decoding. SIGTERM drains running requests and exits 0. Needs the "
                         "serve extra: pip install 'dspark[serve]'. See docs/SERVING.md."),
        epilog="examples:\n"
               "  dspark serve --target ./Qwen3-0.6B --draft ./draft --schedule budget --port 8000\n"
               "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"model\": \"Qwen3-0.6B\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'")
    serve.add_argument("--target", required=True, metavar="DIR",
                       help="target model: a directory (HF format), a .gguf file or a known model name")
    serve.add_argument("--draft", metavar="DIR", help="draft directory; omit for plain target decoding")
    add_backend(serve)
    add_dataclass_flags(serve.add_argument_group("server"), ServeConfig, SERVE_HELP)
    add_engine_flags(serve.add_argument_group("engine"))
    serve.set_defaults(run=_cmd_serve)
