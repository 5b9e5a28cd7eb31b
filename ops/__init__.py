"""Pure tensor operations of DSpark speculative decoding: the reference oracle.

What lives here: sampling filters (temperature / top-k / top-p), the draft
block sampler with the sequential Markov transition, lossless verification,
stop-token truncation and the verify-length schedulers. Every function takes
tensors and plain numbers and returns tensors; none of them knows about models,
configs or devices, and randomness always comes in as explicit uniforms, so a
result is a deterministic function of its inputs.

Who may import it: everything. It imports nothing of dspark's own. Device
backends (`dspark.backends`) call these functions or replace them with kernels,
and the conformance suite checks those kernels against the functions here.

Vocabulary used throughout (as in the DSpark paper, §2 and §3):
    anchor    the last token the target produced; it starts the next draft block
    draft     the gamma tokens the draft proposes after the anchor
    verify    the target forward over [anchor, d_1 .. d_l]; l = verify length
    accepted  the draft tokens that survive rejection sampling (a prefix)
    recovered the token sampled from the residual at the first rejection
    bonus     the token sampled from the target when all l drafts survive
    emitted   = accepted + (recovered or bonus): always at least one token
"""
from .sampling import sample_from_probs, sampling_probs
from .verify import PLACEHOLDER_TOKEN_ID, VerifyResult, truncate_at_stop, verify, verify_greedy
from .draft import markov_bias, sample_draft_block
from .schedule import (SCHEDULE_MODES, plan_budget, plan_budget_and_tokens, ranked_candidates, schedule_causal,
                       schedule_fixed, schedule_threshold, schedule_topk, survival, throughput_path)

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "SCHEDULE_MODES",
    "plan_budget",
    "plan_budget_and_tokens",
    "ranked_candidates",
    "schedule_causal",
    "schedule_topk",
    "throughput_path",
    "VerifyResult",
    "markov_bias",
    "sample_draft_block",
    "sample_from_probs",
    "sampling_probs",
    "schedule_fixed",
    "schedule_threshold",
    "survival",
    "truncate_at_stop",
    "verify",
    "verify_greedy",
]
