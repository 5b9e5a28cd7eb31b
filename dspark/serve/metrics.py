"""Serving metrics: the per-response `metrics.speculative_decoding` block, the Prometheus
registry behind `/metrics`, and the periodic log line.

Vocabulary (as in vLLM, so its dashboards and PromQL work after renaming `vllm:` to `dspark:`):
a *spec step* (a "draft") is one round of one request that verified at least one drafted
token; *draft tokens* are the drafted tokens the target verified (dspark's schedulers verify a
per-request prefix of the block, so this is sum(verify_lens), not steps x gamma); *accepted
tokens* are the drafted tokens that survived. Rounds that verified nothing are plain decode
steps and count in none of these. Hence

    mean acceptance length = 1 + accepted / spec steps      (tokens per spec step, bonus included)
    draft acceptance rate  = accepted / draft tokens
    acceptance_histogram[i] = spec steps that accepted exactly i drafted tokens (i = 0..gamma)
    ...accepted_tokens_per_pos_total{position=k} = spec steps whose draft k (0-based) was accepted

A request's rounds are added to the counters when it finishes, so the sum of the responses'
`metrics.speculative_decoding` equals the counters' increase (a request whose client went
away before it finished is in neither).
"""
import logging
import time
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("dspark.serve")

# Latency buckets (seconds): from a fast accelerator's few milliseconds to a CPU's minutes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# How a request ends: the engine's reasons, plus "abort" for a client that went away.
FINISH_REASONS = ("stop", "length", "abort", "error")
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def spec_decode_metrics(stats: Iterable[dict], gamma: int) -> dict:
    """`metrics.speculative_decoding` of a response from its choices' engine stats
    (GenerationOutput.stats: per-round `accepted` and `verify_lens`)."""
    histogram = [0] * (gamma + 1)
    steps = draft_tokens = accepted_tokens = 0
    for stat in stats:
        for accepted, verified in zip(stat.get("accepted", ()), stat.get("verify_lens", ())):
            if verified > 0:
                steps += 1
                draft_tokens += verified
                accepted_tokens += accepted
                histogram[accepted] += 1
    return {
        "mean_acceptance_length": 1 + accepted_tokens / steps if steps else None,
        "draft_acceptance_rate": accepted_tokens / draft_tokens if draft_tokens else None,
        "acceptance_histogram": histogram,
        "num_spec_steps": steps,
        "num_draft_tokens": draft_tokens,
        "num_accepted_draft_tokens": accepted_tokens,
        "num_spec_tokens": gamma,
    }


class ServeMetrics:
    """The counters, gauges and histograms of one server, in a registry of its own (so several
    servers in one process, e.g. in tests, never share counts)."""

    def __init__(self, model_name: str, gamma: int, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = registry = CollectorRegistry()
        self.model_name, self.gamma = model_name, gamma
        labels = ["model_name"]

        def counter(name, text, extra=()):
            return Counter(f"dspark:{name}", text, labels + list(extra), registry=registry)

        def histogram(name, text, buckets):
            return Histogram(f"dspark:{name}", text, labels, buckets=buckets, registry=registry)

        self.num_drafts = counter("spec_decode_num_drafts", "Spec steps: rounds of a request that verified >= 1 "
                                                            "drafted token")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Drafted tokens verified by the target")
        self.num_accepted = counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Spec steps whose drafted token at this position (0-based) was accepted",
                                        ["position"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated (including requests aborted later)")
        self.request_success = counter("request_success", "Finished requests by reason (stop, length, abort, error)",
                                       ["finished_reason"])
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between generated tokens (a round's interval "
                                                            "is shared by the tokens it emitted)", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", E2E_BUCKETS)
        Gauge("dspark:num_requests_running", "Requests in the running batch", labels,
              registry=registry).labels(model_name).set_function(running)
        Gauge("dspark:num_requests_waiting", "Requests waiting for a batch slot", labels,
              registry=registry).labels(model_name).set_function(waiting)
        # Every series exists from the start, at 0, so dashboards and rate() see it before traffic.
        for metric in (self.num_drafts, self.num_draft_tokens, self.num_accepted, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.itl, self.e2e):
            metric.labels(model_name)
        for position in range(gamma):
            self.accepted_per_pos.labels(model_name, str(position))
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name, reason)
        # Totals for the periodic log line.
        self._totals = dict(steps=0, draft_tokens=0, accepted=0, generated=0, prompt=0)
        self._per_position = [0] * gamma
        self._last_log = (time.monotonic(), dict(self._totals))
        self.running, self.waiting = running, waiting

    # ------------------------------------------------------------------ recording
    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self._totals["prompt"] += prompt_tokens

    def tokens(self, count: int, now: float, first_at: Optional[float], previous_at: float, arrived: float) -> None:
        """`count` tokens of one request arrived at `now`; the previous delivery was at `previous_at`."""
        if count <= 0:
            return
        self.generation_tokens.labels(self.model_name).inc(count)
        self._totals["generated"] += count
        if first_at is None:                    # this delivery holds the first token
            self.ttft.labels(self.model_name).observe(now - arrived)
            count -= 1
            previous_at = now
        for _ in range(count):                  # the round's interval, shared by its tokens
            self.itl.labels(self.model_name).observe((now - previous_at) / (count or 1))

    def finished(self, reason: str, arrived: float, now: float, stats: Optional[dict]) -> None:
        self.request_success.labels(self.model_name, reason).inc()
        if reason == "abort":
            return
        self.e2e.labels(self.model_name).observe(now - arrived)
        if not stats:
            return
        for accepted, verified in zip(stats.get("accepted", ()), stats.get("verify_lens", ())):
            if verified <= 0:
                continue
            self._totals["steps"] += 1
            self._totals["draft_tokens"] += verified
            self._totals["accepted"] += accepted
            for position in range(accepted):
                self._per_position[position] += 1
                self.accepted_per_pos.labels(self.model_name, str(position)).inc()
        summary = spec_decode_metrics([stats], self.gamma)
        self.num_drafts.labels(self.model_name).inc(summary["num_spec_steps"])
        self.num_draft_tokens.labels(self.model_name).inc(summary["num_draft_tokens"])
        self.num_accepted.labels(self.model_name).inc(summary["num_accepted_draft_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ the periodic log line
    def log_line(self) -> Optional[str]:
        """Throughput and acceptance since the last line; None when nothing happened."""
        now = time.monotonic()
        since, before = self._last_log
        totals = dict(self._totals)
        delta = {k: totals[k] - before[k] for k in totals}
        running, waiting = self.running(), self.waiting()
        if not any(delta.values()) and not running and not waiting:
            return None
        self._last_log = (now, totals)
        elapsed = max(now - since, 1e-9)
        line = (f"throughput: prompt {delta['prompt'] / elapsed:.1f} tokens/s, generation "
                f"{delta['generated'] / elapsed:.1f} tokens/s; running {running}, waiting {waiting}")
        if self.gamma:
            steps = totals["steps"]
            if steps:
                mean, rate = 1 + totals["accepted"] / steps, totals["accepted"] / totals["draft_tokens"]
                per_position = ", ".join(f"{n / steps:.2f}" for n in self._per_position)
                line += (f"; spec decode: mean acceptance length {mean:.2f}, draft acceptance rate {rate:.1%}, "
                         f"{steps} drafts, {totals['draft_tokens']} draft tokens, {totals['accepted']} accepted, "
                         f"per-position acceptance [{per_position}]")
            else:
                line += "; spec decode: no drafts verified yet"
        return line


__all__ = ["ServeMetrics", "spec_decode_metrics"]
