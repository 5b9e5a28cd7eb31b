"""ServeConfig: the server's own settings (the engine's are EngineConfig). The `dspark serve`
flags are generated from both dataclasses."""
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError


@dataclass
class ServeConfig:
    """How the server listens and admits requests.

    host, port: where to listen (port 0 = any free port; the ready line names it).
    served_model_name: the `model` clients must send; None = the target's directory or model name.
    max_waiting_requests: prompts that may wait for a batch slot beyond the engine's
        max_batch_size; past that, requests get 429 with Retry-After.
    drain_timeout: seconds a SIGTERM waits for running requests before aborting them.
    log_interval: seconds between the throughput / acceptance log lines (0 = never).
    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>`.
    access_log: log one line per HTTP request.
    """
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: Optional[str] = None
    max_waiting_requests: int = 128
    drain_timeout: float = 30.0
    log_interval: float = 10.0
    api_key: Optional[str] = None
    access_log: bool = True

    def __post_init__(self):
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if isinstance(self.max_waiting_requests, bool) or not isinstance(self.max_waiting_requests, int) \
                or self.max_waiting_requests < 0:
            raise ConfigError(f"max_waiting_requests must be an integer >= 0, got {self.max_waiting_requests!r}")
        for name in ("drain_timeout", "log_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("served_model_name must not be empty")


__all__ = ["ServeConfig"]
