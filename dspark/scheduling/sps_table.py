"""A measured cost profile as a plain, engine-neutral SPS table (JSON).

Neither vLLM nor SGLang documents a file format for a step-cost table that it reads: vLLM's
DSpark adaptive verification (`enable_adaptive_verification`) times its own draft and verify
curves at engine start, as lists of (count, seconds) points, and SGLang's DSPARK planner keeps
its SPS table internal. So `dspark export --cost-profile` writes this documented table instead;
its curves have the same (count, seconds) shape, so they can be fed to such a planner by hand.

    {
      "format": "dspark.sps_table/1",
      "device": "h100", "source": "measured",
      "verify": [                       # one curve per context-length bucket
        {"context_len": 512,
         "points": [[1, 0.0112], [2, 0.0113], ...],      # [verify tokens B, seconds per target forward]
         "steps_per_second": [[1, 89.3], [2, 88.5], ...]} # [B, 1 / seconds]: SPS(B), the paper's table
      ],
      "draft": [[1, 0.0021], [8, 0.0024], ...],          # [requests R, seconds per draft round]
      "graph_buckets": [1, 2, 4, 8, ...],                # verify-token counts captured as graphs
      "max_query_tokens_per_request": null,
      "meta": {...}                                       # as measured (calibrate settings, versions)
    }

Times are seconds of wall clock per forward, monotone in B (the profile is made monotone when
it is built). `read_sps_table` turns the file back into a `CostModel`.
"""
import json
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text_atomic
from .cost_model import CostModel

FORMAT = "dspark.sps_table/1"


def sps_table(cost: CostModel) -> dict:
    """The table for a cost profile (see the module docstring)."""
    verify = []
    for context_len, row in zip(cost.context_lens, cost.verify_seconds):
        verify.append({"context_len": context_len,
                       "points": [[b, float(s)] for b, s in zip(cost.verify_tokens, row)],
                       "steps_per_second": [[b, 1.0 / float(s) if s > 0 else None]
                                            for b, s in zip(cost.verify_tokens, row)]})
    return {"format": FORMAT, "device": cost.device, "source": cost.source, "verify": verify,
            "draft": [[r, float(s)] for r, s in zip(cost.draft_requests, cost.draft_seconds)],
            "graph_buckets": list(cost.graph_buckets),
            "max_query_tokens_per_request": cost.max_query_tokens_per_request, "meta": dict(cost.meta)}


def write_sps_table(cost: CostModel, path) -> Path:
    return write_text_atomic(Path(path), json.dumps(sps_table(cost), indent=2) + "\n")


def read_sps_table(path) -> CostModel:
    """A CostModel from a table written by `write_sps_table`; a malformed file is a ConfigError
    that says what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"SPS table {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"SPS table {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a dspark SPS table (its 'format' must be {FORMAT!r})")
    try:
        curves = data["verify"]
        tokens = [int(b) for b, _ in curves[0]["points"]]
        if any([int(b) for b, _ in c["points"]] != tokens for c in curves):
            raise ConfigError(f"{path}: every verify curve must use the same token counts")
        return CostModel(device=data["device"], source=data["source"], verify_tokens=tokens,
                         context_lens=[int(c["context_len"]) for c in curves],
                         verify_seconds=[[float(s) for _, s in c["points"]] for c in curves],
                         draft_requests=[int(r) for r, _ in data["draft"]],
                         draft_seconds=[float(s) for _, s in data["draft"]],
                         graph_buckets=list(data.get("graph_buckets") or []),
                         max_query_tokens_per_request=data.get("max_query_tokens_per_request"),
                         meta=dict(data.get("meta") or {}))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: malformed SPS table ({type(exc).__name__}: {exc})") from None


__all__ = ["FORMAT", "read_sps_table", "sps_table", "write_sps_table"]
