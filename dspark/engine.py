"""The engine: continuous batching of requests through the draft -> schedule -> verify round.

One round for the R active requests (paper Fig. 1):

    1. draft     the draft proposes gamma tokens per request from its anchor   (one parallel pass
                 + the sequential Markov stage), with confidences c_k
    2. schedule  choose verify lengths l_r in [0, gamma] (fixed / threshold / load-aware)
    3. verify    ONE target forward over the flattened [anchor, d_1..d_l] of every request
    4. accept    rejection sampling -> accepted prefix + one recovered/bonus token per request
    5. commit    one device->host copy of the emitted tokens; advance each request's cache
                 length by accepted + 1 (rejected positions are simply not advanced over),
                 append the verified positions' target features to the draft's context

With no draft, gamma = 0 and the same loop is plain target decoding: our baseline.
Synchronisation: the host must know the *total* number of verify tokens B to lay out the
step; where each request's share lives is computed on the device. "fixed" and "budget"
know B on the host in advance (budget: B = R + K, K from confidences already on the host),
so their only device->host copy is the commit; "threshold" and "causal" decide from the
current confidences and pay one more copy. `Engine.round_log` records every round.
Randomness: each request owns a torch.Generator and draws the same number of
uniforms every round (2 * gamma + 1), so its output never depends on its batch-mates.
"""
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from . import ops
from .backends import Backend, get_backend
from .calibration import OnlineSTS
from .errors import NumericalError
from .models import StepBatch, load_draft, load_target
from .models.batch import consecutive_range
from .models.layers import prepare_for_inference
from .params import DTYPES, EngineConfig, GenerationOutput, SamplingParams, StreamEvent
from .scheduler import RoundPlanner, cost_model_for

Prompt = Union[str, Sequence[int]]


@dataclass
class _Request:
    index: int
    prompt_ids: list
    params: SamplingParams
    stop_ids: list
    generator: torch.Generator
    slot: int = -1
    num_cached: int = 0          # tokens whose K/V are in the target cache (= position of the anchor)
    anchor: int = -1             # last emitted token; not yet through the target
    output_ids: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    accepted: list = field(default_factory=list)
    verify_lens: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def room(self, max_model_len: int) -> int:
        """Tokens this request may still emit: prompt + output never exceed the context."""
        return min(self.params.max_new_tokens, max_model_len - len(self.prompt_ids)) - len(self.output_ids)

    def stats(self, gamma: int) -> dict:
        rounds = len(self.accepted)
        by_position = []
        for k in range(1, gamma + 1):
            reached = sum(1 for a, l in zip(self.accepted, self.verify_lens) if l >= k and a >= k - 1)
            hits = sum(1 for a in self.accepted if a >= k)
            by_position.append(hits / reached if reached else None)
        return {
            "rounds": rounds,
            "accepted": list(self.accepted),
            "verify_lens": list(self.verify_lens),
            "tau": (sum(self.accepted) + rounds) / rounds if rounds else None,
            "acceptance_by_position": by_position,
        }


class Engine:
    def __init__(self, target, tokenizer, draft, backend: Backend, config: EngineConfig):
        self.target, self.tokenizer, self.draft = target, tokenizer, draft
        self.backend, self.config = backend, config
        for model in (target, draft):
            if model is not None:
                prepare_for_inference(model, backend)
        tcfg = target.config
        self.dtype = next(target.parameters()).dtype
        self.max_model_len = config.max_model_len or min(tcfg.max_position_embeddings, 4096)
        self.gamma = draft.gamma if draft is not None else 0
        self.hidden_layer_ids = list(draft.config.target_layer_ids) if draft is not None else []
        eos = set(tcfg.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = sorted(eos)
        if config.schedule != "fixed" and (draft is None or draft.confidence_head is None):
            raise ValueError(f"schedule={config.schedule!r} needs a draft with a confidence head (a DSpark draft); "
                             "use schedule='fixed' with this draft")
        self.cost_model = cost_model_for(backend, tcfg, draft.config if draft else None, config.cost_profile)
        self.planner = RoundPlanner(self.cost_model, self.gamma, backend.device, lag=config.budget_lag)
        self.online_sts = None
        if config.calibration == "online" and draft is not None and draft.confidence_head is not None:
            self.online_sts = OnlineSTS(self.gamma, initial=draft.config.confidence_temperatures)
        # Graphs need a target whose step has no data-dependent host work (Gemma MoE routing has).
        graphable = getattr(target, "supports_graphs", True)
        self.use_graphs = (backend.supports_graphs and graphable) if config.graphs is None else config.graphs
        if self.use_graphs and not graphable:
            raise ValueError("this target cannot run as a captured graph (its step reads data-dependent sizes on "
                             "the host, e.g. mixture-of-experts routing); use graphs=False")
        self.static = config.static_shapes or self.use_graphs
        self._graphs: dict = {}          # token bucket -> (static StepBatch buffers, handle, outputs)
        # A fixed-shape step parks its filler tokens in one extra, never-used cache slot.
        slots, device = config.max_batch_size + (1 if self.static else 0), backend.device
        self.scratch_slot = config.max_batch_size
        self.buckets = backend.token_buckets(config.max_batch_size * (self.gamma + 1))
        # Query tokens one request carries in a verify step (anchor + drafts), within the backend's limit.
        self.query_width = backend.max_verify_len(self.gamma) + 1
        self.target_cache = target.make_cache(slots, self.max_model_len, self.dtype, device)
        self.draft_cache = draft.make_cache(slots, self.max_model_len, self.dtype, device) if draft else None
        # One record per round of the last run: requests, verify tokens, host syncs, timings,
        # and (with a confidence head) the raw confidence logits, verify lengths and accepted counts.
        self.round_log: list[dict] = []

    @property
    def round_host_syncs(self) -> list:
        """Device -> host copies made by each round of the last run."""
        return [record["host_syncs"] for record in self.round_log]

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, target, draft=None, backend: Union[str, Backend, None] = None, **config) -> "Engine":
        """Load a target checkpoint directory and, optionally, a draft directory.

        backend: "cpu" | "cuda" | "ascend" | "auto" | a Backend; None reads $DSPARK_BACKEND.
        config: EngineConfig fields (dtype, max_batch_size, max_model_len, schedule, ...).
        """
        engine_config = EngineConfig.from_kwargs(**config)
        backend = get_backend(backend)
        dtype = backend.default_dtype if engine_config.dtype == "auto" else DTYPES[engine_config.dtype]
        target_model, tokenizer = load_target(target, backend.device, dtype)
        draft_model = None
        if draft is not None:
            draft_model = load_draft(draft, target_model.config, target_model)
            draft_model.to(device=backend.device, dtype=dtype).eval()
        return cls(target_model, tokenizer, draft_model, backend, engine_config)

    # ----------------------------------------------------------------------------- public API
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[GenerationOutput]:
        """Generate for a batch of prompts (strings or token-id lists); one output per prompt, in order."""
        requests = self._make_requests(prompts, params)
        for _ in self._run(requests):
            pass
        return [self._output(r) for r in requests]

    def stream(self, prompts: Union[Prompt, Sequence[Prompt]],
               params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> Iterator[StreamEvent]:
        """Yield tokens as they are accepted: one StreamEvent per request per step."""
        requests = self._make_requests(prompts, params)
        decoded = {r.index: "" for r in requests}
        for request, new_ids in self._run(requests):
            text = None
            if self.tokenizer is not None:
                full = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
                # Hold back text that ends inside a multi-byte character until it is complete.
                if full.endswith("\ufffd") and not request.finished:
                    text = ""
                else:
                    previous = decoded[request.index]
                    common = len(previous) if full.startswith(previous) else 0
                    text, decoded[request.index] = full[common:], full
            yield StreamEvent(request.index, new_ids, text, request.finished, request.finish_reason)

    # ----------------------------------------------------------------------------- requests
    def _make_requests(self, prompts, params) -> list[_Request]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        vocab = self.target.config.vocab_size
        requests = []
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params[{index}] must be a dspark.SamplingParams, got {type(p).__name__}")
            ids = self._tokenize(prompt, index)
            if not ids:
                raise ValueError(f"prompt {index} is empty")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt {index} has {len(ids)} tokens but the context holds {self.max_model_len} "
                                 "(prompt + output); shorten it or raise max_model_len")
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
            stops = [] if p.ignore_eos else list(self.eos_token_ids)
            stops += [t for t in (p.stop_token_ids or []) if t not in stops]
            requests.append(_Request(index, ids, p, stops, generator))
        return requests

    def _tokenize(self, prompt, index) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer, and the target directory has none; "
                                 "pass token-id lists instead")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompt {index} must be a string or a list of token ids")
        return list(prompt)

    def _output(self, r: _Request) -> GenerationOutput:
        text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True) if self.tokenizer else None
        return GenerationOutput(r.index, r.prompt_ids, list(r.output_ids), text, r.finish_reason or "length",
                                r.stats(self.gamma))

    # ----------------------------------------------------------------------------- the loop
    def _run(self, requests: list[_Request]) -> Iterator[tuple[_Request, list]]:
        """Continuous batching: admit queued requests into free cache slots, run rounds,
        retire finished requests. Yields (request, newly emitted token ids)."""
        pending, active = deque(requests), []
        free_slots = list(range(self.config.max_batch_size))
        self.round_log = []
        while pending or active:
            admitted = []
            while pending and free_slots:
                request = pending.popleft()
                request.slot = free_slots.pop(0)
                admitted.append(request)
            if admitted:
                yield from self._prefill(admitted)
                active += admitted
            active_now = [r for r in active if not r.finished]
            if active_now:
                yield from self._round(active_now)
            for r in active:
                if r.finished:
                    free_slots.append(r.slot)
                    self.planner.forget(id(r))
            free_slots.sort()        # lowest slots first: active slots stay one compact span
            active = [r for r in active if not r.finished]

    @staticmethod
    def _sampling_hints(requests) -> dict:
        """What the host already knows about the batch's sampling, so no op has to ask the device."""
        return {"all_greedy": all(r.params.greedy for r in requests),
                "filtered": any(r.params.top_k > 0 or r.params.top_p < 1 for r in requests)}

    def _sampling_tensors(self, requests):
        device = self.backend.device
        temperature = torch.tensor([r.params.temperature for r in requests], dtype=torch.float32, device=device)
        top_k = torch.tensor([r.params.top_k for r in requests], dtype=torch.long, device=device)
        top_p = torch.tensor([r.params.top_p for r in requests], dtype=torch.float32, device=device)
        return temperature, top_k, top_p

    def _prefill(self, requests: list[_Request]):
        """Run the prompts through the target, sample each request's first token (its first anchor)."""
        backend = self.backend
        batch = StepBatch.build([r.prompt_ids for r in requests], [0] * len(requests),
                                [r.slot for r in requests], backend.device)
        out = self.target(batch, self.target_cache, backend, logits_indices=batch.last_token_indices(),
                          hidden_layer_ids=self.hidden_layer_ids)
        if self.draft is not None:
            self.draft.append_context(self.draft_cache, batch.token_slots, batch.positions, out.hidden,
                                      batch.input_ids)
        probs = backend.sampling_probs(out.logits, *self._sampling_tensors(requests), **self._sampling_hints(requests))
        uniforms = torch.stack([torch.rand(1, generator=r.generator) for r in requests]).to(backend.device)
        tokens = backend.sample(probs, uniforms[:, 0])
        tokens, finite = backend.to_host(tokens, torch.isfinite(out.logits).all())
        self._check_finite(finite)
        for r, token in zip(requests, tokens.tolist()):
            r.num_cached = len(r.prompt_ids)
            yield r, self._emit(r, [token])

    def _round(self, requests: list[_Request]):
        backend, gamma, device = self.backend, self.gamma, self.backend.device
        num = len(requests)
        started, syncs_before = time.perf_counter(), backend.host_syncs
        sampling, hints = self._sampling_tensors(requests), self._sampling_hints(requests)
        anchors = torch.tensor([r.anchor for r in requests], dtype=torch.long, device=device)
        uniforms = torch.stack([torch.rand(2 * gamma + 1, generator=r.generator) for r in requests]).to(device)
        starts, slots = [r.num_cached for r in requests], [r.slot for r in requests]
        # Never verify more than the backend allows or the request may still emit (a round emits l + 1).
        caps = [min(backend.max_verify_len(gamma), r.room(self.max_model_len) - 1) for r in requests]

        # 1-2. draft and schedule (load-aware modes first ask history whether drafting pays)
        proposal, schedule_s, budget = None, 0.0, None
        drafting = self.draft is not None
        if drafting and self.config.schedule in ("causal", "budget"):
            schedule_started = time.perf_counter()
            budget = self.planner.plan([id(r) for r in requests], caps, max(starts),
                                       early_break=self.config.schedule == "causal")
            drafting = budget is not None
            schedule_s = time.perf_counter() - schedule_started
        if drafting:
            proposal = self._propose(anchors, starts, slots, uniforms[:, :gamma], sampling, hints)
            draft_tokens, draft_probs = proposal.tokens, proposal.probs
            schedule_started = time.perf_counter()
            verify_lens, num_verify = self._schedule(requests, proposal.confidence, caps, max(starts), budget)
            schedule_s += time.perf_counter() - schedule_started
        else:
            vocab = self.target.config.vocab_size
            draft_tokens = torch.zeros(num, 0, dtype=torch.long, device=device)
            draft_probs = torch.zeros(num, 0, vocab, device=device)
            verify_lens, num_verify = torch.zeros(num, dtype=torch.long, device=device), 0
        width = draft_tokens.shape[1]

        # 3. one target forward over the flattened [anchor, d_1 .. d_l] of every request
        num_tokens = num + num_verify
        if self.static:
            bucket = next(b for b in self.buckets if b >= num_tokens)
            batch = self._static_batch(verify_lens + 1, starts, slots, num_tokens, bucket)
        else:
            batch = StepBatch.from_lengths(verify_lens + 1, starts, slots, num_tokens, self.query_width)
        block = torch.cat([anchors.unsqueeze(1), draft_tokens], dim=1)            # [R, gamma + 1]
        block = torch.cat([block, block.new_zeros(batch.num_requests - num, block.shape[1])])
        batch.input_ids = block[batch.token_rows, batch.token_offsets.clamp(max=block.shape[1] - 1)]
        if self.use_graphs:
            out = self._replay(batch, bucket)
        else:
            out = self.target(batch, self.target_cache, backend, hidden_layer_ids=self.hidden_layer_ids)
        if self.static:                      # the real tokens come first; drop the filler
            out.logits = out.logits[:num_tokens]
            out.hidden = out.hidden[:num_tokens] if out.hidden is not None else None
            batch.token_rows, batch.token_offsets = batch.token_rows[:num_tokens], batch.token_offsets[:num_tokens]
        logits = out.logits.new_zeros(num, width + 1, out.logits.shape[-1])
        logits[batch.token_rows, batch.token_offsets] = out.logits               # [R, width + 1, V]
        target_probs = backend.sampling_probs(logits, *sampling, **hints)

        # 4. lossless acceptance
        result = backend.verify(draft_tokens, draft_probs, target_probs, verify_lens,
                                uniforms[:, gamma:gamma + width], uniforms[:, 2 * gamma])

        # 5. commit: the round's one device -> host copy (tokens, counts, lengths, confidences)
        extra = () if proposal is None or proposal.confidence is None else \
            (proposal.confidence, proposal.confidence_logits)
        tokens, num_emitted, lens_host, finite, *confidences = backend.to_host(
            result.output_tokens, result.num_emitted, verify_lens, torch.isfinite(out.logits).all(), *extra)
        self._check_finite(finite)
        cu = [0] + torch.cumsum(lens_host + 1, 0).tolist()
        context_rows, context_slots, context_positions = [], [], []
        for row, r in enumerate(requests):
            accepted = int(num_emitted[row]) - 1
            # The anchor and the accepted drafts are now verified context.
            context_rows += range(cu[row], cu[row] + accepted + 1)
            context_slots += [r.slot] * (accepted + 1)
            context_positions += range(r.num_cached, r.num_cached + accepted + 1)
            r.num_cached += accepted + 1
            r.accepted.append(accepted)
            r.verify_lens.append(int(lens_host[row]))
        if self.draft is not None:
            as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
            rows = as_tensor(context_rows)
            self.draft.append_context(self.draft_cache, as_tensor(context_slots), as_tensor(context_positions),
                                      out.hidden[rows], batch.input_ids[rows])
        record = {"requests": num, "verify_tokens": num + num_verify, "drafted": drafting, "schedule_s": schedule_s,
                  "verify_lens": lens_host, "accepted": num_emitted - 1}
        if confidences:
            self._observe_confidences(requests, confidences[0], confidences[1], lens_host, num_emitted - 1, record)
        for row, r in enumerate(requests):
            yield r, self._emit(r, tokens[row, :int(num_emitted[row])].tolist())
        record["host_syncs"] = backend.host_syncs - syncs_before
        record["round_s"] = time.perf_counter() - started
        self.round_log.append(record)

    def _static_batch(self, query_lens, starts, slots, num_tokens: int, bucket: int) -> StepBatch:
        """The fixed-shape verify step of `bucket` tokens (the layout every graph of that bucket has)."""
        rows = StepBatch.static_rows(bucket, self.config.max_batch_size, self.query_width)
        return StepBatch.static(query_lens, starts, slots, num_tokens, bucket, rows, self.scratch_slot,
                                self.max_model_len, self.query_width)

    def _replay(self, batch: StepBatch, bucket: int):
        """Run the verify step of this bucket as a graph: capture it once (with a step whose
        tokens all go to the scratch slot, so capturing touches no request), then copy this
        round's batch into its buffers and replay. Returns copies of the outputs."""
        if bucket not in self._graphs:
            empty = torch.zeros(0, dtype=torch.long, device=self.backend.device)
            buffers = self._static_batch(empty, [], [], 0, bucket)
            handle, outputs = self.backend.graph_capture(lambda: self.target(
                buffers, self.target_cache, self.backend, hidden_layer_ids=self.hidden_layer_ids))
            self._graphs[bucket] = (buffers, handle, outputs)
        buffers, handle, outputs = self._graphs[bucket]
        for name in ("input_ids", "positions", "token_rows", "token_offsets", "token_slots", "slots",
                     "start_positions", "query_lens", "cu_query_lens"):
            getattr(buffers, name).copy_(getattr(batch, name))
        buffers.kv_lens[:] = batch.kv_lens           # the host-side buffer, in place: the graph reads this list
        self.backend.graph_replay(handle)
        return type(outputs)(logits=outputs.logits.clone(),
                             hidden=None if outputs.hidden is None else outputs.hidden.clone())

    def _propose(self, anchors, starts, slots, uniforms, sampling, hints):
        """The draft round; with fixed shapes, padded to every request row (extra rows read the
        scratch slot) and the full context, then cut back to the real requests."""
        device, num = self.backend.device, anchors.shape[0]
        if not (self.static and getattr(self.draft, "supports_static", False)):
            return self.draft.propose(anchors, torch.tensor(starts, device=device), torch.tensor(slots, device=device),
                                      self.draft_cache, self.backend, uniforms, *sampling,
                                      slot_range=consecutive_range(slots), **hints)
        pad = self.config.max_batch_size + 1 - num

        def padded(values, fill):
            return torch.cat([values, values.new_full((pad,) + tuple(values.shape[1:]), fill)])

        temperature, top_k, top_p = sampling
        proposal = self.draft.propose(
            padded(anchors, 0), torch.tensor(starts + [0] * pad, device=device),
            torch.tensor(slots + [self.scratch_slot] * pad, device=device), self.draft_cache, self.backend,
            padded(uniforms, 0.0), padded(temperature, 0.0), padded(top_k, 0), padded(top_p, 1.0),
            ctx_len=self.max_model_len, all_greedy=hints["all_greedy"], filtered=hints["filtered"])
        for name in ("tokens", "probs", "confidence", "confidence_logits"):
            value = getattr(proposal, name)
            if value is not None:
                setattr(proposal, name, value[:num])
        return proposal

    def _schedule(self, requests, confidence, caps: list, context_len: int, budget: Optional[int]):
        """Verify lengths on the device, and the number of drafted tokens verified in total,
        which the host must know to lay out the step."""
        cfg, backend, num = self.config, self.backend, len(requests)
        device = backend.device
        caps_tensor = torch.tensor(caps, dtype=torch.long, device=device)
        if cfg.schedule == "fixed":
            length = self.gamma if cfg.verify_len is None else cfg.verify_len
            lens = [max(0, min(length, cap)) for cap in caps]
            return torch.tensor(lens, dtype=torch.long, device=device), sum(lens)
        if cfg.schedule == "budget":
            lens = backend.schedule("budget", self.gamma, confidence, num, budget=budget, caps=caps_tensor)
            return lens, min(budget, sum(max(cap, 0) for cap in caps))
        lens = backend.schedule(cfg.schedule, self.gamma, confidence, num, threshold=cfg.threshold,
                                sps=self.planner.sps(num, context_len), caps=caps_tensor)
        return lens, int(backend.to_host(lens)[0].sum())

    def _observe_confidences(self, requests, confidence, logits, verify_lens, accepted, record) -> None:
        """Feed finished-round confidences to the budget planner and the online calibrator."""
        self.planner.record([id(r) for r in requests], confidence)
        record["confidence_logits"] = logits
        if self.online_sts is not None and self.online_sts.observe(logits, verify_lens, accepted):
            self.draft.config.confidence_temperatures = list(self.online_sts.temperatures)

    def _emit(self, r: _Request, tokens: list) -> list:
        """Append emitted tokens, cut at a stop token / max_new_tokens / the context end."""
        tokens = tokens[:r.room(self.max_model_len)]
        stops = torch.tensor([r.stop_ids or [ops.PLACEHOLDER_TOKEN_ID]])
        kept, stopped = ops.truncate_at_stop(torch.tensor([tokens]), torch.tensor([len(tokens)]), stops)
        tokens = tokens[:int(kept[0])]
        r.output_ids += tokens
        r.anchor = tokens[-1]
        if bool(stopped[0]):
            r.finish_reason = "stop"
        elif r.room(self.max_model_len) <= 0:
            r.finish_reason = "length"
        return tokens

    @staticmethod
    def _check_finite(finite) -> None:
        if not bool(finite):
            raise NumericalError("the target produced NaN or infinite logits; the weights may be corrupt or the "
                                 "dtype may overflow (try dtype='float32')")
