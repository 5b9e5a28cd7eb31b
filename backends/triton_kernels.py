"""Optional Triton kernels for the CUDA backend: lossless verification and the draft's sequential
(Markov) sampling step, each one fused kernel per request row instead of a chain of torch ops.

This module imports triton at its top, so nothing imports it eagerly: the CUDA backend imports it
lazily, only when triton is installed and its device is CUDA (`CUDABackend.triton_kernels`).
Every kernel computes what its reference in `dspark.ops` computes, and the conformance suite and
tests/test_triton_kernels.py check it against that reference (the tests run the kernels on CPU
tensors under TRITON_INTERPRET=1):

- `verify`: integer outputs (tokens, accepted counts) equal `ops.verify`'s. Acceptance is the same
  float32 product and comparison; the final token is the same inverse-CDF draw (float64 running
  sum, count of CDF steps <= u * total) over the same residual or target row. Only the float64
  summation order differs, which moves a CDF step by ~1e-16: a uniform landing there is the only
  way the token could differ.
- `sample_draft_block` (temperature sampling, no top-k / top-p): per block position, the
  transition bias is added by torch exactly as in `ops.sample_draft_block`, then one kernel takes
  the greedy argmax or the temperature softmax (float32) and draws the token by inverse CDF.
  Probabilities agree within float32 rounding; tokens agree except at such a boundary.
"""
import torch
import triton
import triton.language as tl

PLACEHOLDER_TOKEN_ID = -1      # = dspark.ops.PLACEHOLDER_TOKEN_ID
RESIDUAL_EPS = 1e-12           # = dspark.ops.verify.RESIDUAL_EPS
BLOCK = 1024                   # vocabulary entries per kernel step


def _block(vocab: int) -> int:
    return min(BLOCK, triton.next_power_of_2(max(vocab, 16)))


@triton.jit
def _verify_kernel(draft_tokens_ptr, draft_probs_ptr, target_probs_ptr, verify_lens_ptr, accept_u_ptr,
                   sample_u_ptr, out_tokens_ptr, num_accepted_ptr, gamma, vocab, residual_eps,
                   BLOCK_V: tl.constexpr, BLOCK_G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    length = tl.load(verify_lens_ptr + row)
    alive = tl.full([], 1, tl.int64)
    accepted = tl.full([], 0, tl.int64)
    for k in range(0, gamma):
        token = tl.maximum(tl.load(draft_tokens_ptr + row * gamma + k), 0)
        p_target = tl.load(target_probs_ptr + (row * (gamma + 1) + k) * vocab + token)
        p_draft = tl.load(draft_probs_ptr + (row * gamma + k) * vocab + token)
        u = tl.load(accept_u_ptr + row * gamma + k)
        ok = (u * p_draft < p_target) & (k < length)
        alive = alive * ok.to(tl.int64)
        accepted += alive

    # The final token's distribution: the residual at a rejection, else the target (bonus).
    draft_limit = tl.where(accepted < gamma, vocab, 0)      # no draft distribution after the last draft
    target_row = target_probs_ptr + (row * (gamma + 1) + accepted) * vocab
    draft_row = draft_probs_ptr + (row * gamma + accepted) * vocab
    residual_mass = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        inside = offsets < vocab
        p_t = tl.load(target_row + offsets, mask=inside, other=0.0)
        p_d = tl.load(draft_row + offsets, mask=offsets < draft_limit, other=0.0)
        residual_mass += tl.sum(tl.maximum(p_t - p_d, 0.0), axis=0)
    use_residual = (accepted < length) & (residual_mass > residual_eps)
    draft_weight = tl.where(use_residual, 1.0, 0.0)

    total = tl.full([], 0.0, tl.float64)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        inside = offsets < vocab
        p_t = tl.load(target_row + offsets, mask=inside, other=0.0)
        p_d = tl.load(draft_row + offsets, mask=offsets < draft_limit, other=0.0)
        dist = tl.where(use_residual, tl.maximum(p_t - p_d * draft_weight, 0.0), p_t)
        total += tl.sum(dist.to(tl.float64), axis=0)
    threshold = tl.load(sample_u_ptr + row).to(tl.float64) * total
    below = tl.full([], 0, tl.int64)
    running = tl.full([], 0.0, tl.float64)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        inside = offsets < vocab
        p_t = tl.load(target_row + offsets, mask=inside, other=0.0)
        p_d = tl.load(draft_row + offsets, mask=offsets < draft_limit, other=0.0)
        dist = tl.where(use_residual, tl.maximum(p_t - p_d * draft_weight, 0.0), p_t).to(tl.float64)
        cdf = running + tl.cumsum(dist, axis=0)
        below += tl.sum(((cdf <= threshold) & inside).to(tl.int64), axis=0)
        running += tl.sum(dist, axis=0)
    final = tl.minimum(below, vocab - 1)

    slots = tl.arange(0, BLOCK_G)
    drafted = tl.load(draft_tokens_ptr + row * gamma + slots, mask=slots < accepted, other=PLACEHOLDER_TOKEN_ID)
    tokens = tl.where(slots == accepted, final, drafted)
    tl.store(out_tokens_ptr + row * (gamma + 1) + slots, tokens, mask=slots < gamma + 1)
    tl.store(num_accepted_ptr + row, accepted)


def verify(draft_tokens, draft_probs, target_probs, verify_lens, accept_uniforms, sample_uniforms):
    """`ops.verify` as one kernel per row; returns (output_tokens [R, gamma + 1], num_accepted [R])."""
    rows, gamma = draft_tokens.shape
    vocab = target_probs.shape[-1]
    draft_tokens = draft_tokens.long().contiguous()
    draft_probs = draft_probs.float().contiguous()
    target_probs = target_probs.float().contiguous()
    out = torch.empty(rows, gamma + 1, dtype=torch.long, device=draft_tokens.device)
    accepted = torch.empty(rows, dtype=torch.long, device=draft_tokens.device)
    if rows:
        _verify_kernel[(rows,)](draft_tokens, draft_probs, target_probs, verify_lens.long().contiguous(),
                                accept_uniforms.contiguous(), sample_uniforms.contiguous(), out, accepted,
                                gamma, vocab, RESIDUAL_EPS, BLOCK_V=_block(vocab),
                                BLOCK_G=triton.next_power_of_2(gamma + 1))
    return out, accepted


@triton.jit
def _sample_step_kernel(logits_ptr, temperature_ptr, uniforms_ptr, probs_ptr, tokens_ptr, logits_stride,
                        uniforms_stride, probs_stride, tokens_stride, vocab, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    probs_row = probs_ptr + row * probs_stride
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature <= 0
    scale = tl.where(greedy, 1.0, temperature)
    best = tl.full([], float("-inf"), tl.float32)
    best_index = tl.full([], 0, tl.int64)
    top = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + offsets, mask=offsets < vocab, other=float("-inf"))
        block_best = tl.max(x, axis=0)
        block_index = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64) + start
        better = block_best > best                      # strict: the first maximum wins, as torch.argmax
        best_index = tl.where(better, block_index, best_index)
        best = tl.maximum(best, block_best)
        top = tl.maximum(top, tl.max(x / scale, axis=0))
    denominator = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + offsets, mask=offsets < vocab, other=float("-inf"))
        denominator += tl.sum(tl.exp(x / scale - top), axis=0)
    total = tl.full([], 0.0, tl.float64)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        inside = offsets < vocab
        x = tl.load(logits_row + offsets, mask=inside, other=float("-inf"))
        p = tl.where(greedy, tl.where(offsets == best_index, 1.0, 0.0), tl.exp(x / scale - top) / denominator)
        p = tl.where(inside, p, 0.0)
        tl.store(probs_row + offsets, p, mask=inside)
        total += tl.sum(p.to(tl.float64), axis=0)
    threshold = tl.load(uniforms_ptr + row * uniforms_stride).to(tl.float64) * total
    below = tl.full([], 0, tl.int64)
    running = tl.full([], 0.0, tl.float64)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        inside = offsets < vocab
        p = tl.load(probs_row + offsets, mask=inside, other=0.0).to(tl.float64)
        cdf = running + tl.cumsum(p, axis=0)
        below += tl.sum(((cdf <= threshold) & inside).to(tl.int64), axis=0)
        running += tl.sum(p, axis=0)
    tl.store(tokens_ptr + row * tokens_stride, tl.minimum(below, vocab - 1))


def sample_draft_block(base_logits, anchor_ids, uniforms, temperature, transition=None, token_ids=None):
    """`ops.sample_draft_block` for unfiltered sampling (no top-k / top-p): returns
    (tokens [R, gamma] token ids, probs [R, gamma, V] float32 in column order, prev_ids [R, gamma])."""
    rows, gamma, vocab = base_logits.shape
    device = base_logits.device
    tokens = torch.empty(rows, gamma, dtype=torch.long, device=device)
    probs = torch.empty(rows, gamma, vocab, dtype=torch.float32, device=device)
    temperature = temperature.float().contiguous()
    uniforms = uniforms.contiguous()
    prev, state, prevs = anchor_ids.long(), None, []
    for k in range(gamma):
        logits = base_logits[:, k]
        if transition is not None:
            bias, state = transition(k, prev, state)
            logits = logits + bias.to(base_logits.dtype)
        logits = logits.float().contiguous()
        if rows:
            _sample_step_kernel[(rows,)](logits, temperature, uniforms[:, k:], probs[:, k], tokens[:, k:],
                                         logits.stride(0), uniforms.stride(0), probs.stride(0), tokens.stride(0),
                                         vocab, BLOCK_V=_block(vocab))
        if token_ids is not None:               # the kernel wrote columns of a reduced vocabulary
            tokens[:, k] = token_ids[tokens[:, k]]
        prevs.append(prev)
        prev = tokens[:, k]
    prev_ids = torch.stack(prevs, dim=1) if prevs else anchor_ids.new_zeros(rows, 0)
    return tokens, probs, prev_ids
