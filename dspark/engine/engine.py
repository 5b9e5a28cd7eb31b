"""The engine: continuous batching of requests through the draft -> plan -> verify -> commit round.

One round for the R active requests (paper Fig. 1):

    1. plan      load-aware modes: from finished rounds only, draft or not, and the budget K
    2. draft     the draft proposes gamma tokens per request from its anchor (one parallel pass
                 + the sequential Markov stage), with confidence logits
    3. schedule  verify lengths l_r in [0, gamma] (fixed / threshold / causal / budget)
    4. verify    ONE target forward over the flattened [anchor, d_1..d_l] of every request,
                 then lossless acceptance: accepted prefix + one recovered / bonus token
    5. commit    one device->host copy of the emitted tokens; advance each request's cache
                 length by accepted + 1 (rejected positions are simply not advanced over),
                 and queue the verified positions' target features for the draft's context
                 (appended at the start of the next drafted round, or every 4096 rows)

With no draft, gamma = 0 and the same loop is plain target decoding: our baseline.
Learning while serving: every round is timed (the backend's step timer: host timestamps on the
CPU, device events elsewhere, read after the round's own sync) and feeds the online cost model
(`engine.cost_model`, dspark.scheduling.online_cost) the planner prices rounds with; for a draft
without a confidence head the load-aware schedules take confidences from a margin estimator
(`engine.estimator`, dspark.scheduling.acceptance) refitted from verified rounds, and the
planner compares the tokens each drafted round emitted with what it had planned (its realized
ratio, `RoundPlanner.observe_round`). All of them change only between rounds, from finished ones.
Synchronisation: the host must know the *total* number of verify tokens to lay out the
step; where each request's share lives is computed on the device. "fixed" and "budget"
know it on the host in advance, so their only device->host copy is the commit; "threshold"
and "causal" decide from the current confidences and pay one more copy. `Engine.round_log`
records every round. Randomness: each request owns a torch.Generator and draws the same
number of uniforms every round (2 * gamma + 1), so its output never depends on its batch-mates.

Concurrency: one loop owns the caches. `generate` and `stream` may be called from any number
of threads at once; each call submits its requests to a queue and reads its own events back,
and all of them run in the same continuous batch. There is no engine thread: a caller waiting
for its next event runs the next round itself when no other caller is running one, so a single
caller does all its work in its own thread. (On the CPU that matters: every thread that runs
torch ops keeps its own OpenMP team, and once more team threads exist than cores, OpenMP stops
spinning between parallel regions; a round in a second thread then ran 1.7x slower than in the
thread that loaded the model.) Streams advance while some caller waits. A request's output is
what it would be alone (greedy: token-identical;
seeded sampling under `fixed` / `threshold`: the same sample). A call that goes away (a stream
that is closed, garbage-collected or whose consumer raised; a KeyboardInterrupt in generate)
has its unfinished requests dropped at the next round boundary, freeing their slots.
"""
import json
import logging
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ..backends import Backend, get_backend
from ..errors import ConfigError, DataError
from ..models import load_draft, load_target, resolve_model
from ..models.batch import StepBatch, consecutive_range
from ..models.layers import prepare_for_inference
from ..params import DTYPES, EngineConfig, GenerationOutput, SamplingParams, StreamEvent
from ..prompts import chat_ids, check_messages, is_chat
from ..scheduling.acceptance import MAX_MARGIN, MarginEstimator, logit_margin, top2_margin
from ..scheduling.calibration import OnlineCalibration, StsTemperatures
from ..scheduling.online_cost import OnlineCostModel
from ..scheduling.planner import RoundPlanner, cost_model_for
from .request import Call, Event, Request
from .step import VerifyStep

Prompt = Union[str, Sequence[int], Sequence[dict]]
log = logging.getLogger("dspark.engine")


ABORTED = object()        # put on a call's event queue by Stream.abort: the consumer stops


class Stream(Iterator[StreamEvent]):
    """What `Engine.stream` returns: an iterator of StreamEvents that another thread can abort.

        stream = engine.stream(prompts, params)
        for event in stream: ...             # in one thread
        stream.abort()                       # in another: the loop above ends at its next step
    """

    def __init__(self, engine: "Engine", call: Call, events: Iterator[StreamEvent]):
        self._engine, self._call, self._events = engine, call, events

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop here (the consumer's thread): unfinished requests are dropped, slots freed."""
        self._events.close()

    def abort(self) -> None:
        """Drop this call's unfinished requests from any thread, without waiting for the consumer:
        requests still waiting for a slot are removed before their prefill, running ones leave at
        the end of their round, and a consumer blocked on the next event stops iterating."""
        self._engine._abort(self._call)


class RoundDriver:
    """What `Engine.start_driver` returns: the thread that runs the engine's rounds.

        driver = engine.start_driver()
        ...                                  # generate / stream from any threads
        driver.stop()                        # after the round in progress; callers drive again
    """

    def __init__(self, engine: "Engine"):
        self._engine, self.stopping = engine, False
        # Not a daemon (a daemon killed inside a torch kernel at interpreter exit aborts the
        # process); it ends by itself once the main thread has finished.
        self.thread = threading.Thread(target=engine._drive, args=(self,), name="dspark-engine")

    def stop(self, timeout: Optional[float] = None) -> None:
        with self._engine._lock:
            self.stopping = True
            self._engine._lock.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def __enter__(self) -> "RoundDriver":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Engine:
    def __init__(self, target, tokenizer, draft, backend: Backend, config: EngineConfig,
                 generation_defaults: Optional[dict] = None):
        self.target, self.tokenizer, self.draft = target, tokenizer, draft
        self.backend, self.config = backend, config
        for model in (target, draft):
            if model is not None:
                prepare_for_inference(model, backend)
        tcfg = target.config
        self.dtype = next(target.parameters()).dtype
        self.max_model_len = config.max_model_len or min(tcfg.max_position_embeddings, 4096)
        if self.max_model_len > tcfg.max_position_embeddings:
            raise ConfigError(f"max_model_len {self.max_model_len} is beyond the model's position limit "
                              f"{tcfg.max_position_embeddings} (max_position_embeddings in its config.json)")
        self.gamma = draft.gamma if draft is not None else 0
        self.hidden_layer_ids = list(draft.config.target_layer_ids) if draft is not None else []
        self.generation_defaults = dict(generation_defaults or {})
        self.eos_token_ids = self._stop_tokens(tcfg, tokenizer, self.generation_defaults)
        self._check_acceptance_source(config, draft)
        self.sts, self.calibration = None, None
        if draft is not None and draft.has_confidence:
            self.sts = StsTemperatures(self.gamma, draft.config.confidence_temperatures,
                                       draft.config.confidence_temperatures_greedy)
            if config.calibration == "online" and config.schedule != "fixed":
                self.calibration = OnlineCalibration(self.sts)
        # Graphs need a target whose step has no data-dependent host work (Gemma MoE routing has).
        graphable = getattr(target, "supports_graphs", True)
        self.use_graphs = (backend.supports_graphs and graphable) if config.graphs is None else config.graphs
        if self.use_graphs and not graphable:
            raise ConfigError("this target cannot run as a captured graph (its step reads data-dependent sizes on "
                              "the host, e.g. mixture-of-experts routing); use graphs=False")
        self.static = config.static_shapes or self.use_graphs
        # A fixed-shape step parks its filler tokens in one extra, never-used cache slot.
        slots, device = config.max_batch_size + (1 if self.static else 0), backend.device
        self._check_memory(slots)
        self.target_cache = target.make_cache(slots, self.max_model_len, self.dtype, device)
        self.draft_cache = draft.make_cache(slots, self.max_model_len, self.dtype, device) if draft else None
        self.verify_step = VerifyStep(target, backend, self.target_cache, self.hidden_layer_ids,
                                      config.max_batch_size, self.gamma, self.max_model_len, self.static,
                                      self.use_graphs)
        self.cost_model, self.estimator = self._scheduling_models(config)
        self.planner = RoundPlanner(config.schedule, self.cost_model, self.gamma, backend.device,
                                    lag=config.budget_lag, verify_len=config.verify_len, threshold=config.threshold,
                                    estimator=self.estimator)
        self._timings: deque = deque(maxlen=64)      # rounds whose times are not read yet
        # The draft's context from rounds that did not draft, appended in one call when it is next
        # needed (see _append_draft_context).
        self._pending_context: list = []
        self._pending_rows = 0
        # One record per round of the current (or last) busy period: requests, verify tokens, host
        # syncs, timings, and (with a confidence head) the raw confidence logits, verify lengths and
        # accepted counts.
        self.round_log: list[dict] = []
        # The loop's state, guarded by _lock: requests waiting for a slot, the active ones, and
        # which caller's thread is running a round (None: nobody).
        self._lock = threading.Condition()
        self._waiting: deque = deque()
        self._active: list = []
        self._free_slots = list(range(config.max_batch_size))
        self._driver: Optional[int] = None
        self._dedicated: Optional["RoundDriver"] = None     # while set, callers only wait (start_driver)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, target, draft=None, backend: Union[str, Backend, None] = None, **config) -> "Engine":
        """Load a target (a checkpoint directory, a .gguf file or a known model name such as
        "smollm2-135m-instruct") and, optionally, a draft directory.

        backend: "cpu" | "cuda" | "ascend" | "auto" | a Backend; None reads $DSPARK_BACKEND.
        config: EngineConfig fields (dtype, max_batch_size, max_model_len, schedule, ...).
        The target's generation_config.json, when it has one, adds its eos_token_id to the stop
        tokens and gives the sampling defaults used when a call passes no SamplingParams.
        """
        engine_config = EngineConfig.from_kwargs(**config)
        backend = get_backend(backend)
        dtype = backend.default_dtype if engine_config.dtype == "auto" else DTYPES[engine_config.dtype]
        directory = resolve_model(target)
        target_model, tokenizer = load_target(directory, backend.device, dtype)
        draft_model = None
        if draft is not None:
            draft_model = load_draft(draft, target_model.config, target_model)
            draft_model.to(device=backend.device, dtype=dtype).eval()
        return cls(target_model, tokenizer, draft_model, backend, engine_config,
                   generation_defaults=read_generation_config(directory))

    @staticmethod
    def _stop_tokens(target_cfg, tokenizer, generation: dict) -> list:
        eos = set(target_cfg.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        extra = generation.get("eos_token_id")
        eos.update(int(t) for t in (extra if isinstance(extra, list) else [extra] if extra is not None else []))
        return sorted(eos)

    @staticmethod
    def _check_acceptance_source(config: EngineConfig, draft) -> None:
        if config.schedule != "fixed" and draft is None:
            raise ConfigError(f"schedule={config.schedule!r} needs a draft: its confidence head or the margin "
                              "estimator gives the confidences it schedules by; without a draft use schedule='fixed'")
        if config.acceptance in ("head", "both") and draft is not None and not draft.has_confidence:
            raise ConfigError(f"acceptance={config.acceptance!r} needs a draft with a confidence head (a DSpark "
                              "draft); use acceptance='margin' (or 'auto') with this draft")

    def _scheduling_models(self, config: EngineConfig):
        """The cost model the planner prices rounds with (learning online unless frozen) and, when
        confidences come from the margin estimator, the estimator."""
        draft = self.draft
        prior = cost_model_for(self.backend, self.target.config, draft.config if draft else None,
                               config.cost_profile, dtype=self.dtype)
        cost = OnlineCostModel(prior, token_buckets=self.verify_step.buckets if self.static else None) \
            if config.online_costs else prior
        wanted = config.acceptance in ("margin", "both") or (
            config.acceptance == "auto" and config.schedule != "fixed" and not draft.has_confidence)
        estimator = MarginEstimator(self.gamma, num_features=2 if config.acceptance == "both" else 1) \
            if draft is not None and wanted else None
        return cost, estimator

    def _check_memory(self, slots: int) -> None:
        """Refuse a cache that cannot be allocated before the allocator is asked to try."""
        cfg = self.target.config
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.tensor([], dtype=self.dtype).element_size()
        if self.draft is not None:
            per_token += 2 * max(1, self.draft.config.num_layers) * cfg.num_kv_heads * cfg.head_dim * \
                torch.tensor([], dtype=self.dtype).element_size()
        needed, limit = per_token * slots * self.max_model_len, self.backend.memory_limit()
        if limit is not None and needed > limit:
            raise ConfigError(f"max_batch_size {self.config.max_batch_size} x max_model_len {self.max_model_len} needs "
                              f"{needed / 2 ** 30:.1f} GiB of KV cache, more than this device's {limit / 2 ** 30:.1f} "
                              "GiB; lower max_batch_size or max_model_len")

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the target's generation_config.json (greedy when it sets nothing)."""
        g = self.generation_defaults
        if not g.get("do_sample", g.get("temperature") not in (None, 0)):
            return SamplingParams()
        return SamplingParams(temperature=float(g.get("temperature") or 1.0), top_k=int(g.get("top_k") or 0),
                              top_p=float(g.get("top_p") or 1.0))

    # ----------------------------------------------------------------------------- public API
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[GenerationOutput]:
        """Generate for a batch of prompts: texts, token-id lists, or chats (lists of
        {"role", "content"} messages, through the tokenizer's chat template). One output per
        prompt, in order. Safe to call from several threads at once (see the module docstring).
        A request that fails alone (e.g. NaN logits) has finish_reason "error" and `error` set;
        the others are unaffected."""
        call = self._submit(prompts, params)
        try:
            remaining = len(call.requests)
            while remaining:
                remaining -= self._next_event(call).finished
        finally:
            self._close(call)
        return [self._output(r) for r in call.requests]

    def stream(self, prompts: Union[Prompt, Sequence[Prompt]],
               params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> "Stream":
        """Yield tokens as they are accepted: one StreamEvent per request per step. Safe to call
        from several threads at once; leaving the loop early (break, an exception, garbage
        collection of the iterator) drops this call's unfinished requests and frees their slots.
        `abort()` on the returned stream does the same from any thread, at once: requests still
        waiting for a slot never reach the device, and a consumer blocked on the next event
        stops iterating."""
        call = self._submit(prompts, params)
        return Stream(self, call, self._events(call))

    def _events(self, call: Call) -> Iterator[StreamEvent]:
        decoded = {r.index: "" for r in call.requests}
        try:
            remaining = len(call.requests)
            while remaining:
                event = self._next_event(call)
                if event is ABORTED or call.closed:         # aborted: events still queued are dropped
                    return
                remaining -= event.finished
                request = event.request
                yield StreamEvent(request.index, event.token_ids, self._text_delta(request, decoded),
                                  event.finished, request.finish_reason, request.error,
                                  request.stats(self.gamma) if event.finished else None)
        finally:
            self._close(call)

    def _text_delta(self, request: Request, decoded: dict) -> Optional[str]:
        """The text this event adds, holding back a piece that ends inside a multi-byte character."""
        if self.tokenizer is None:
            return None
        full = request.text if request.text is not None else \
            self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        if full.endswith("\ufffd") and not request.finished:
            return ""
        previous = decoded[request.index]
        common = len(previous) if full.startswith(previous) else 0
        decoded[request.index] = full
        return full[common:]

    def pending_requests(self) -> int:
        """Requests submitted and not yet finished (waiting for a slot or running)."""
        with self._lock:
            return len(self._waiting) + sum(not (r.finished or r.call.closed) for r in self._active)

    def start_driver(self) -> "RoundDriver":
        """Run every round from now on in one thread of the engine's own, until `stop()`.

        By default a waiting caller runs the rounds. A server, whose requests each wait in a thread
        of their own, wants one thread doing all the torch work instead (see the module docstring
        for why the CPU cares); `dspark serve` starts one. Callers then only wait for events."""
        with self._lock:
            if self._dedicated is not None:
                raise ConfigError("this engine already has a round driver; stop it first")
            self._dedicated = driver = RoundDriver(self)
            self._lock.notify_all()
        driver.thread.start()
        return driver

    def _drive(self, driver: "RoundDriver") -> None:
        """The driver thread: run rounds whenever there is work, until stopped or the interpreter exits."""
        main = threading.main_thread()
        try:
            while True:
                with self._lock:
                    while not driver.stopping and main.is_alive() and (
                            self._driver is not None or not (self._waiting or self._active)):
                        self._lock.wait(timeout=0.5)      # also notices the interpreter shutting down
                    if driver.stopping or not main.is_alive():
                        return
                    self._driver = threading.get_ident()
                self._run_once()
        finally:
            with self._lock:
                if self._dedicated is driver:
                    self._dedicated = None                 # waiting callers drive again
                self._lock.notify_all()

    # ----------------------------------------------------------------------------- requests
    def _submit(self, prompts, params) -> Call:
        """Validate and tokenize in the caller's thread (bad input raises here, nothing is queued),
        then hand the requests to the loop."""
        call = Call(self._lock)
        prompts = self._prompt_list(prompts)
        params = self._params_list(params, len(prompts))
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            ids = self._tokenize(prompt, index)
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            stops = [] if p.ignore_eos else list(self.eos_token_ids)
            stops += [t for t in (p.stop_token_ids or []) if t not in stops]
            call.requests.append(Request(index, ids, p, stops, torch.Generator().manual_seed(seed), call))
        with self._lock:
            if not self._waiting and all(r.finished for r in self._active):
                self.round_log = []          # the engine was idle: a new busy period starts its own log
            self._waiting.extend(call.requests)
            self._lock.notify_all()
        return call

    @staticmethod
    def _prompt_list(prompts) -> list:
        single = isinstance(prompts, str) or is_chat(prompts) or (
            isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts))
        prompts = [prompts] if single else list(prompts) if isinstance(prompts, Sequence) else None
        if not prompts:
            raise DataError("no prompts given" if prompts == [] else
                            f"prompts must be a string, a token-id list, a chat, or a list of those; got "
                            f"{type(prompts).__name__}")
        return prompts

    def _params_list(self, params, count: int) -> list:
        params = self.default_sampling_params() if params is None else params
        params = [params] * count if isinstance(params, SamplingParams) else list(params)
        if len(params) != count:
            raise ConfigError(f"got {len(params)} SamplingParams for {count} prompts")
        for index, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ConfigError(f"params[{index}] must be a dspark.SamplingParams, got {type(p).__name__}")
        return params

    def _tokenize(self, prompt, index) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise DataError("string prompts need a tokenizer, and the target directory has none; "
                                "pass token-id lists instead")
            ids = list(self.tokenizer.encode(prompt))
        elif is_chat(prompt):
            ids = chat_ids(check_messages(prompt, f"prompt {index}"), self.tokenizer)
        elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (Sequence, torch.Tensor)):
            raise DataError(f"prompt {index} must be a string, a list of token ids or a chat, "
                            f"got {type(prompt).__name__}")
        else:
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise DataError(f"prompt {index} must be a string, a list of token ids or a chat")
        if not ids:
            raise DataError(f"prompt {index} is empty")
        vocab = self.target.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise DataError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise DataError(f"prompt {index} has {len(ids)} tokens but the context holds {self.max_model_len} "
                            "(prompt + output); shorten it or raise max_model_len")
        return ids

    def _next_event(self, call: Call) -> Event:
        """The call's next event. While it has none, run rounds in this thread if no other caller
        is running one, else wait for an event or for that caller to finish its round."""
        while True:
            with self._lock:
                while not call.events and (self._driver is not None or self._dedicated is not None):
                    self._lock.wait()
                if call.events:
                    event = call.events.popleft()
                    break
                if not (self._waiting or self._active):
                    raise RuntimeError("dspark engine: a call is waiting for events but no request is queued "
                                       "or running (an engine bug; please report it)")
                self._driver = threading.get_ident()
            self._run_once()
        if event is not ABORTED and event.error is not None:
            raise event.error
        return event

    def _close(self, call: Call) -> None:
        """The caller is done with this call: unfinished requests are dropped by the loop (a
        waiting one here, before it takes a slot; a running one when its round ends)."""
        with self._lock:
            call.closed = True
            dropped = [r for r in self._waiting if r.call is call]
            for r in dropped:
                self._waiting.remove(r)
                r.finish_reason = "abort"

    def _abort(self, call: Call) -> None:
        """`Stream.abort`: close the call and wake its consumer, from any thread."""
        self._close(call)
        call.put(ABORTED, force=True)

    def _output(self, r: Request) -> GenerationOutput:
        text = r.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        return GenerationOutput(r.index, r.prompt_ids, list(r.output_ids), text, r.finish_reason or "length",
                                r.stats(self.gamma), r.error)

    # ----------------------------------------------------------------------------- the loop
    def _run_once(self) -> None:
        """One turn of the loop, in the thread that took the driver role (`_driver`, set under the
        lock), which it hands back at the end: retire finished requests, admit waiting ones into
        free slots (prefill), run one round for everything running."""
        try:
            with self._lock:
                active = self._retire()
                admitted = self._admit()
            try:
                with torch.no_grad():
                    if admitted:
                        self._prefill(admitted)
                    running = [r for r in active + admitted if not r.finished]
                    if running:
                        self._round(running)
            except BaseException as exc:        # a bug or an interrupt: fail the affected requests, keep serving
                log.exception("an engine round failed; its requests are aborted")
                self._fail_all(active + admitted, exc)
                if not isinstance(exc, Exception):      # KeyboardInterrupt, SystemExit: the caller sees it too
                    raise
        finally:
            with self._lock:
                self._driver = None
                self._lock.notify_all()

    def _retire(self) -> list:
        """Free the slots of finished and abandoned requests; return the ones still running."""
        keep = []
        for r in self._active:
            if r.finished or r.call.closed:
                self._free_slots.append(r.slot)
                self.planner.forget(id(r))
            else:
                keep.append(r)
        self._active = keep
        self._free_slots.sort()          # lowest slots first: active slots stay one compact span
        return list(keep)

    def _admit(self) -> list:
        admitted = []
        while self._waiting and self._free_slots:
            request = self._waiting.popleft()
            request.slot = self._free_slots.pop(0)
            admitted.append(request)
        self._active += admitted
        return admitted

    def _fail_all(self, requests: list, exc: BaseException) -> None:
        for r in requests:
            if not r.finished:
                r.fail(f"engine failure: {type(exc).__name__}: {exc}")
                r.call.put(Event(r, [], True, error=exc))

    def _deliver(self, r: Request, tokens: list) -> None:
        r.call.put(Event(r, tokens, r.finished))

    # ----------------------------------------------------------------------------- one round
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

    def _prefill(self, requests: list) -> None:
        """Run the prompts through the target, sample each request's first token (its first anchor)."""
        backend = self.backend
        batch = StepBatch.build([r.prompt_ids for r in requests], [0] * len(requests),
                                [r.slot for r in requests], backend.device)
        out = self.target(batch, self.target_cache, backend, logits_indices=batch.last_token_indices(),
                          hidden_layer_ids=self.hidden_layer_ids)
        if self.draft is not None:
            self._flush_draft_context()          # before these slots' new prompts: a freed slot may hold old rows
            self.draft.append_context(self.draft_cache, batch.token_slots, batch.positions, out.hidden,
                                      batch.input_ids)
        probs = backend.sampling_probs(out.logits, *self._sampling_tensors(requests), **self._sampling_hints(requests))
        uniforms = torch.stack([torch.rand(1, generator=r.generator) for r in requests]).to(backend.device)
        tokens = backend.sample(probs, uniforms[:, 0])
        tokens, finite = backend.to_host(tokens, torch.isfinite(out.logits).all(dim=-1))
        for r, token, ok in zip(requests, tokens.tolist(), finite.tolist()):
            r.num_cached = len(r.prompt_ids)
            if not ok:
                r.fail(NAN_MESSAGE)
                self._deliver(r, [])
            else:
                self._deliver(r, self._emit(r, [token]))

    def _round(self, requests: list) -> None:
        started, syncs_before = time.perf_counter(), self.backend.host_syncs
        timer = self.backend.step_timer()
        gamma, device = self.gamma, self.backend.device
        sampling, hints = self._sampling_tensors(requests), self._sampling_hints(requests)
        anchors = torch.tensor([r.anchor for r in requests], dtype=torch.long, device=device)
        uniforms = torch.stack([torch.rand(2 * gamma + 1, generator=r.generator) for r in requests]).to(device)
        starts, slots = [r.num_cached for r in requests], [r.slot for r in requests]
        # Never verify more than the backend allows or the request may still emit (a round emits l + 1).
        caps = [min(self.backend.max_verify_len(gamma), r.room(self.max_model_len) - 1) for r in requests]
        record = {"requests": len(requests)}

        drafts, verify_lens, num_verify, proposal = self._draft_and_schedule(
            requests, anchors, uniforms[:, :gamma], starts, slots, caps, sampling, hints, record, timer)
        query_lens = verify_lens + 1
        logits, hidden, batch = self.verify_step.run(torch.cat([anchors.unsqueeze(1), drafts[0]], dim=1), query_lens,
                                                     starts, slots, len(requests) + num_verify)
        if hints["all_greedy"]:                  # argmaxes decide: no one-hot [R, W + 1, V] distributions
            result = self.backend.verify_greedy(drafts[0], logits, verify_lens)
        else:
            width = drafts[0].shape[1]
            result = self.backend.verify(drafts[0], drafts[1], self.backend.sampling_probs(logits, *sampling, **hints),
                                         verify_lens, uniforms[:, gamma:gamma + width], uniforms[:, 2 * gamma])
        deliveries = self._commit(requests, result, verify_lens, logits, hidden, batch, proposal, record)
        ended = time.perf_counter()
        record.update(verify_tokens=len(requests) + num_verify, host_syncs=self.backend.host_syncs - syncs_before,
                      round_s=ended - started, ended=ended, emitted=sum(len(tokens) for _, tokens in deliveries))
        self._learn_costs(record, timer, max(starts))
        if self.draft is not None:               # what the round delivered, against its plan
            self.planner.observe_round(len(requests) + int(record["accepted"].sum()), record["round_s"])
        self.round_log.append(record)          # before any caller can see this round's tokens
        for r, tokens in deliveries:
            self._deliver(r, tokens)

    def _draft_and_schedule(self, requests, anchors, uniforms, starts, slots, caps, sampling, hints, record, timer):
        """Steps 1-3: the plan, the draft block (timed) and the verify lengths.
        Returns ((draft tokens [R, W], draft probs [R, W, V]), verify_lens [R], total verified drafts,
        the proposal or None)."""
        num, device = len(requests), self.backend.device
        scheduled = time.perf_counter()
        plan = self.planner.before_round([id(r) for r in requests], caps, max(starts)) \
            if self.draft is not None else None
        schedule_s = time.perf_counter() - scheduled
        record["drafted"] = bool(plan and plan.draft)
        record["probe"] = bool(plan and plan.probe)
        if plan is not None and plan.seconds is not None:
            record["planned"] = (plan.tokens, plan.seconds, plan.plain_seconds)
        if not record["drafted"]:
            record["schedule_s"] = schedule_s
            vocab = self.target.config.vocab_size
            empty = (torch.zeros(num, 0, dtype=torch.long, device=device), torch.zeros(num, 0, vocab, device=device))
            return empty, torch.zeros(num, dtype=torch.long, device=device), 0, None
        # The draft's share of the round, as the cost model learns it: everything a plain round
        # does not do (the proposal, its confidences and verify lengths). Left in the verify share,
        # it made plain rounds look as dear as drafted ones of the same size. The queued context
        # is timed apart: every verified position is appended sooner or later whether the planner
        # drafts or not, so only the last round's share of the flush (the call a plain round
        # would have saved) is the draft's; charged whole, a drafted round looked dearer the
        # longer the planner had waited (4 requests x 16 plain rounds: 64 rows through the
        # draft's feature projection in front of the proposal, 3 ms against 1 ms for one round's).
        timer.mark("context")
        record["_context_share"] = self._flush_draft_context()
        timer.mark("draft")
        rows = plan.rows                            # a probe: only these requests draft
        if rows is not None:
            index = torch.tensor(rows, dtype=torch.long, device=device)
            anchors, uniforms, sampling = anchors[index], uniforms[index], tuple(t[index] for t in sampling)
            starts, slots, caps = [starts[i] for i in rows], [slots[i] for i in rows], [caps[i] for i in rows]
            hints = self._sampling_hints([requests[i] for i in rows])
        proposal = self._propose(anchors, starts, slots, uniforms, sampling, hints)
        scheduled = time.perf_counter()
        confidence, features = self._confidences(proposal, sampling, hints)
        verify_lens, num_verify = self.planner.verify_lengths(self.backend, plan, confidence, caps, max(starts))
        if num_verify is None:                      # threshold / causal: the one extra device -> host copy
            num_verify = int(self.backend.to_host(verify_lens)[0].sum())
        # No request verifies more drafts than the whole round does: cut the block there (host-known),
        # so the target's per-request logits, their sampling distributions and the acceptance test
        # are as wide as the round, not the block (a probe of 2 drafts paid for 7 vocabulary rows).
        width = min(proposal.tokens.shape[1], num_verify)
        drafts = (proposal.tokens[:, :width], proposal.probs[:, :width])
        if rows is not None:                        # back to every request: the others verify nothing
            tokens = drafts[0].new_zeros(num, width)
            probs = drafts[1].new_zeros(num, width, drafts[1].shape[-1])
            tokens[index], probs[index] = drafts
            lens = verify_lens.new_zeros(num)
            lens[index] = verify_lens
            drafts, verify_lens = (tokens, probs), lens
        timer.mark("drafted")
        record["schedule_s"] = schedule_s + time.perf_counter() - scheduled
        record["_scores"] = (confidence, proposal.confidence_logits, features)
        record["draft_rows"] = rows
        return drafts, verify_lens, num_verify, proposal

    PENDING_CONTEXT_LIMIT = 4096         # rows of deferred draft context kept before they are appended

    def _append_draft_context(self, slots, positions, hidden, token_ids) -> None:
        """Queue verified positions for the draft's context. They are appended when the draft
        next needs them, at the start of the next drafted round (`_draft_and_schedule`, timed
        apart from the draft's share), or every PENDING_CONTEXT_LIMIT rows: while the planner
        chooses plain decoding (at load, every round) one batched call costs less than a call per
        round (2 % of a plain round at 8 requests on the CPU). The draft's cache ends up the
        same; `_prefill` flushes first, so rows of a freed slot land before its next prompt."""
        self._pending_context.append((slots, positions, hidden, token_ids))
        self._pending_rows += len(slots)
        if self._pending_rows >= self.PENDING_CONTEXT_LIMIT:
            self._flush_draft_context()

    def _flush_draft_context(self) -> float:
        """Append the queued rows; returns the share of them the latest round queued (0: none)."""
        if not self._pending_context:
            return 0.0
        share = len(self._pending_context[-1][0]) / max(self._pending_rows, 1)
        parts = [torch.cat(column) for column in zip(*self._pending_context)]
        self._pending_context, self._pending_rows = [], 0
        self.draft.append_context(self.draft_cache, *parts)
        return share

    def _confidences(self, proposal, sampling, hints):
        """This block's conditional confidences c_k [R, gamma] (device; None when nothing provides
        them) and the margin estimator's features [R, gamma, F] (None without an estimator)."""
        if self.estimator is None:
            if proposal.confidence_logits is None:
                return None, None
            calibrated = self.calibration or self.sts
            return calibrated.confidence(proposal.confidence_logits, sampling[0] == 0, hints["all_greedy"]), None
        if proposal.logits is not None:             # the draft's own certainty, at every temperature
            margin = logit_margin(proposal.logits)
        elif hints["all_greedy"]:                   # one-hot rows: every margin is the cap, skip the top-k
            margin = torch.full(proposal.tokens.shape, MAX_MARGIN, device=self.backend.device)
        else:
            margin = top2_margin(proposal.probs)
        features = margin.unsqueeze(-1) if self.estimator.num_features == 1 else \
            torch.stack([margin, proposal.confidence_logits.float()], dim=-1)
        return self.estimator.confidence(features), features

    def _propose(self, anchors, starts, slots, uniforms, sampling, hints):
        """The draft round; with fixed shapes, padded to every request row (extra rows read the
        scratch slot) and the full context, then cut back to the real requests."""
        device, num = self.backend.device, anchors.shape[0]
        if not (self.static and self.draft.supports_static):
            return self.draft.propose(anchors, torch.tensor(starts, device=device), torch.tensor(slots, device=device),
                                      self.draft_cache, self.backend, uniforms, *sampling,
                                      slot_range=consecutive_range(slots), **hints)
        pad = self.config.max_batch_size + 1 - num

        def padded(values, fill):
            return torch.cat([values, values.new_full((pad,) + tuple(values.shape[1:]), fill)])

        temperature, top_k, top_p = sampling
        proposal = self.draft.propose(
            padded(anchors, 0), torch.tensor(starts + [0] * pad, device=device),
            torch.tensor(slots + [self.verify_step.scratch_slot] * pad, device=device), self.draft_cache, self.backend,
            padded(uniforms, 0.0), padded(temperature, 0.0), padded(top_k, 0), padded(top_p, 1.0),
            ctx_len=self.max_model_len, all_greedy=hints["all_greedy"], filtered=hints["filtered"])
        return type(proposal)(**{name: None if value is None else value[:num]
                                 for name, value in vars(proposal).items()})

    def _commit(self, requests, result, verify_lens, logits, hidden, batch, proposal, record) -> list:
        """Step 5: the round's one device -> host copy, then advance every request. Returns the
        (request, new tokens) to deliver."""
        scores = record.pop("_scores", ())
        extra = [t for t in scores if t is not None]
        # A row fails only when a logit the emitted tokens came from is not finite (positions past
        # the accepted prefix are discarded anyway: a poisoned *draft* token must not fail a request).
        used = torch.arange(logits.shape[1], device=logits.device) <= result.num_accepted.unsqueeze(1)
        finite = (torch.isfinite(logits).all(dim=-1) | ~used).all(dim=-1)                    # [R]
        tokens, num_emitted, lens_host, finite, *extra = self.backend.to_host(
            result.output_tokens, result.num_emitted, verify_lens, finite, *extra)
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
            as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.backend.device)  # noqa: E731
            rows = as_tensor(context_rows)
            self._append_draft_context(as_tensor(context_slots), as_tensor(context_positions), hidden[rows],
                                       batch.input_ids[rows])
        record.update(verify_lens=lens_host, accepted=num_emitted - 1)
        if extra:                                   # back in (confidence, head logits, features) order
            host = iter(extra)
            rows = record.get("draft_rows")
            drafted = requests if rows is None else [requests[i] for i in rows]
            picked = slice(None) if rows is None else torch.tensor(rows, dtype=torch.long)
            self._observe_scores(drafted, *[None if t is None else next(host) for t in scores], lens_host[picked],
                                 (num_emitted - 1)[picked], record)
        deliveries = []
        for row, r in enumerate(requests):
            if not bool(finite[row]):
                r.fail(NAN_MESSAGE)
                deliveries.append((r, []))
            else:
                deliveries.append((r, self._emit(r, tokens[row, :int(num_emitted[row])].tolist())))
        return deliveries

    def _observe_scores(self, requests, confidence, logits, features, verify_lens, accepted, record) -> None:
        """Feed a finished round's confidences to the budget planner, its head logits to the online
        calibrator and its margin features to the estimator (host tensors; any may be None)."""
        started = time.perf_counter()
        if confidence is not None:
            self.planner.record([id(r) for r in requests], confidence, verify_lens, accepted)
        if features is not None:
            record["acceptance_features"] = features
            self.estimator.observe(features.numpy(), verify_lens.numpy(), accepted.numpy())
        record["estimate_s"] = time.perf_counter() - started
        if logits is None:
            return
        record["confidence_logits"] = logits
        if self.calibration is not None:
            started = time.perf_counter()
            self.calibration.observe(logits, torch.tensor([r.params.greedy for r in requests]), verify_lens, accepted)
            record["estimate_s"] += time.perf_counter() - started

    def _learn_costs(self, record: dict, timer, context_len: int) -> None:
        """Feed the online cost model the measured times of finished rounds: the draft's share
        from the step timer, the rest of the round (verify, sampling, commit, host bookkeeping)
        from the round's wall time, less the queued draft context appended in it (timed apart;
        the draft's share is the latest round's part of it, see `_draft_and_schedule`). Device
        events are read once complete; a round whose events are not yet done waits in
        `_timings` for a later round instead of forcing a sync."""
        share = record.pop("_context_share", 0.0)
        if not isinstance(self.cost_model, OnlineCostModel):
            return
        started = time.perf_counter()
        rows = record.get("draft_rows")
        self._timings.append((timer, record["requests"], record["verify_tokens"], context_len, record["round_s"],
                              record["drafted"], record["requests"] if rows is None else len(rows), share))
        while self._timings:
            timer, requests, tokens, context, round_s, drafted, drafting, share = self._timings[0]
            draft_s = timer.seconds("draft", "drafted") if drafted else None
            context_s = timer.seconds("context", "draft") if drafted else 0.0
            if drafted and (draft_s is None or context_s is None):
                break
            self._timings.popleft()
            verify_s = max(round_s - (draft_s or 0.0) - context_s, 0.0)
            if drafted:
                draft_s += share * context_s
            self.cost_model.observe(requests, tokens, context, verify_s, draft_s, draft_requests=drafting)
        record["learn_s"] = time.perf_counter() - started

    def _emit(self, r: Request, tokens: list) -> list:
        """Append emitted tokens, cut at a stop token / stop string / max_new_tokens / the context end."""
        tokens = tokens[:r.room(self.max_model_len)]
        # The first stop token ends the request; it is kept (ops.truncate_at_stop's rule, on the host
        # list: a few tokens per request and round, where tensor ops cost ~0.1 ms a request).
        stopped = next((i for i, token in enumerate(tokens) if token in r.stop_ids), None)
        if stopped is not None:
            tokens = tokens[:stopped + 1]
        before = len(r.output_ids)
        r.output_ids += tokens
        if tokens:
            r.anchor = tokens[-1]
        if stopped is not None or self._stop_string(r, len(tokens)):
            r.finish_reason = "stop"
        elif r.room(self.max_model_len) <= 0:
            r.finish_reason = "length"
        return r.output_ids[before:]

    def _stop_string(self, r: Request, added: int) -> bool:
        """Whether the output now contains one of the request's stop strings. If so, the output
        ends with the token that completed it and `r.text` is the text before it (the text never
        contains the stop string). Only the new tokens' neighbourhood is searched."""
        if not r.params.stop or self.tokenizer is None or not added:
            return False
        text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        longest = max(len(s) for s in r.params.stop)
        tail_start = max(0, len(self.tokenizer.decode(r.output_ids[:-added], skip_special_tokens=True)) - longest)
        hits = [(text.find(s, tail_start), s) for s in r.params.stop if text.find(s, tail_start) >= 0]
        if not hits:
            return False
        position = min(hits)[0]
        # Drop the tokens after the one that completed the match.
        for cut in range(len(r.output_ids) - added + 1, len(r.output_ids) + 1):
            if any(s in self.tokenizer.decode(r.output_ids[:cut], skip_special_tokens=True) for s in r.params.stop):
                del r.output_ids[cut:]
                break
        r.text = text[:position]
        return True

    # ----------------------------------------------------------------------------- introspection
    @property
    def round_host_syncs(self) -> list:
        """Device -> host copies made by each round of the last busy period."""
        return [record["host_syncs"] for record in self.round_log]

    @property
    def captured_graphs(self) -> dict:
        return self.verify_step.captured


NAN_MESSAGE = ("the target produced NaN or infinite logits for this request; the weights may be corrupt or the "
               "dtype may overflow (try dtype='float32')")


def read_generation_config(directory) -> dict:
    """The model directory's generation_config.json (empty when it has none or it is unreadable)."""
    path = Path(directory) / "generation_config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring %s: not valid JSON", path)
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["Engine", "Stream", "read_generation_config"]
