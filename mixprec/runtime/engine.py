"""Continuous batching: many requests share one KV cache and one decode step.

Engine slot i is row i of one KVCache [L, max_batch, kv_heads, max_len, D]; slot j of a row holds
position j of its request (right padding, as in generate.py). A request holds its slot from
admission to finish. A background thread loops, one decode step per iteration:

  1. finish cancelled requests and free their slots (only here, between steps),
  2. admit queued requests into free slots: a right-padded prefill of several new requests
     that sit in contiguous rows (a row view of the cache; a CUDA graph when small, prefill.py),
     first token sampled on the device,
  3. one decode step over rows [:bucket], bucket = 1, 2, 4, .. max_batch just above the highest
     slot in use, so each step has a fixed shape and is a CUDA graph on GPU. Idle rows in the
     bucket are padding: they keep position 0 (`live` = 0) and touch only slot 0 of their own row,
  4. read the previous step's tokens on the host while this one runs (lag by one): deliver,
     detokenize, stop on eos / stop ids, stop strings, max_tokens or a full context.

Prefix reuse: a row keeps its K/V after its request finished, and the engine remembers which
tokens they belong to (prompt and fed output; a running request's row: its prompt). A new request
whose prompt starts with 16 or more of those tokens (a multi-turn chat's history, a shared system
prompt) takes them: into that row if it is free, else copied into a free row (a device copy, a
small fraction of the prefill it saves), and only the rest of the prompt runs through the model.
The rest is a CUDA graph of its length bucket up to the prefill graphs' tokens (Prefill.tail:
one graph serves any row and prefix), an eager forward above. A queued prompt that shares
SHARE_WAIT or more tokens with one being prefilled (more than with any row) waits until that
prefill ran, then takes them from its row: a burst of requests with one long system prompt
computes it once. `Request.cached_tokens` says how many prompt tokens were taken.

Sampling is per row (temperature, top-k, top-p, presence / frequency penalties on device
tensors; a row's generated-token counts for the penalties; log-probabilities on request, copied
to the host with the tokens) with `counter_noise` keyed by the
request's seed and its own step count, so a request's tokens do not depend on what else is
batched with it (up to the batch-invariance of the kernels; exact on CPU).

Tensor / expert parallel models (`model.parallel`, one process per rank): every rank runs an
Engine, and their loops run in lockstep, because each prefill and decode step holds collectives
that all ranks must enter together. Rank 0's engine takes the requests; before each iteration it
sends the other ranks what it decided (requests admitted, with prompt, params and seed; running
requests cancelled; stop), as JSON over a gloo group of their own, and they apply exactly that.
Every rank gets the same full logits, so it samples the same tokens and finishes the same
requests at the same step without further messages. Idle, rank 0 sends an empty message every
HEARTBEAT_S so the others' receive does not time out.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import operator
import random
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import AsyncIterator, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import RequestError
from .generate import check_vocab, decode_tail, first_token, sampling_modes, to_host
from .prefill import GRAPH_TOKENS, Prefill, buckets, eager_shapes
from .sampling import MAX_LOGPROBS, SamplingParams, bias_rows, count_tokens, logprob_stats

RATE_WINDOW_S = 10.0      # tokens/s in metrics() is measured over this recent window
PREFIX_MIN = 16           # shortest prompt prefix whose K/V an admission takes from a cache row
# a queued prompt sharing this many more tokens with one being prefilled than with any row waits
# for that prefill to take them (a rest as a graph costs ~10 ms on the 30B, ~34 µs per token of a
# batched prefill: ~300 tokens; twice that, for the step it waits)
SHARE_WAIT = 512
MIN_LEN_BUCKET = 256      # smallest number of cache slots a step attends over
HEARTBEAT_S = 10.0        # an idle rank 0 tells the other ranks it is alive this often


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by slice compares (C speed) of windows that double
    until one differs, then halving that window: O(prefix) elements copied, not O(n log n) as a
    bisection from the start (32000 tokens sharing 20000: 1.9 ms per pair that way)."""
    n = min(len(a), len(b))
    lo, size = 0, 64
    while lo < n:
        hi = min(n, lo + size)
        if a[lo:hi] != b[lo:hi]:
            break
        lo, size = hi, 2 * size
    else:
        return n
    while hi - lo > 1:                        # a[:lo] == b[:lo], a mismatch in [lo, hi)
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class QueueFull(RuntimeError):
    """The engine's waiting queue holds max_queue requests: retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """submit() after shutdown(), or after the engine loop failed (the failure is in the message)."""


@dataclass(frozen=True)
class Delta:
    """What one step added to a request: new token ids, the text they completed (may be "" while
    a multi-byte character or a possible stop string is pending), and the finish reason on the
    last delta: "stop" (eos / stop id / stop string), "length" (max_tokens or context full),
    "cancelled", "abort" (engine shut down) or "error"."""
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    # per token, with SamplingParams.logprobs: (its log-probability, ((id, log-probability), ...)
    # of the `logprobs` most likely tokens)
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None


def stop_prefix_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string (text that
    may still grow into one). Only prefixes ending in text's last character are tried, longest
    first: a few checks per stop string and token instead of len(stop) slices."""
    best, c = 0, text[-1:]
    for s in stops:
        i = s.rfind(c, 0, min(len(s) - 1, len(text))) if c else -1
        while i >= best:                      # a tail of length i + 1 ends with c
            if text.endswith(s[:i + 1]):
                best = i + 1
                break
            i = s.rfind(c, 0, i)
    return best


class Request:
    """One submitted generation. Read it from any thread (`for tok in req`, `req.deltas()`,
    `req.result()`) or from asyncio (`async for d in req.stream()`, `await req.wait()`).

    After it finished: `output_ids` (generated ids, the eos / stop id included when that ended
    it), `text` (decoded output with special tokens skipped and a matched stop string cut off),
    `finish_reason`, `error` (set with finish_reason "error"). With SamplingParams.prompt_logprobs,
    `prompt_logprobs` is set before the first delta: per prompt token, None for the first, then
    (log-probability, top tokens) as in Delta.logprobs."""

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, seed: int):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed                      # params.seed, or drawn at submit when None
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.prompt_logprobs: list | None = None
        self.cached_tokens = 0                # prompt tokens whose K/V came from a cache row (not computed)
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._deltas: list[Delta] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = False
        # engine-thread state
        self._slot: int | None = None
        self._launched = 0                    # tokens that launched device work will produce
        self._chunk_at = 0                    # a long prompt: tokens whose K/V its row holds so far
        self._read = (0, 0)                   # incremental detokenizer offsets (prefix, read)
        self._full_text = ""                  # everything decoded so far (before stop trimming)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # -- producer side (engine thread) ---------------------------------------------------------
    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._deltas.append(delta)
            self.output_ids.extend(delta.token_ids)
            self.text += delta.text
            if delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason
                self.finished_at = time.monotonic()
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:              # that event loop is closed: nobody is waiting there
                pass

    # -- consumer side -----------------------------------------------------------------------
    def deltas(self, timeout: float | None = None) -> Iterator[Delta]:
        """Blocking iterator over deltas until the request finished. TimeoutError when no delta
        came for `timeout` seconds."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._deltas) and not self.done:
                    if not self._cond.wait(timeout):
                        raise TimeoutError(f"request {self.id}: nothing generated for {timeout} s")
                new, done = self._deltas[i:], self.done
            i += len(new)
            yield from new
            if done:
                return

    def __iter__(self) -> Iterator[int]:
        """Generated token ids as they come (thread-safe, blocking)."""
        for d in self.deltas():
            yield from d.token_ids

    def result(self, timeout: float | None = None) -> "Request":
        """Block until finished; TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self

    async def stream(self) -> AsyncIterator[Delta]:
        """Deltas as they come, for asyncio code (the engine thread wakes this event loop)."""
        loop, ev = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ev))
        try:
            i = 0
            while True:
                ev.clear()                    # before the snapshot: a later push sets it again
                with self._cond:
                    new, done = self._deltas[i:], self.done
                i += len(new)
                for d in new:
                    yield d
                if done:
                    return
                await ev.wait()
        finally:
            with self._cond:
                self._waiters.remove((loop, ev))

    async def wait(self) -> "Request":
        async for _ in self.stream():
            pass
        return self


@dataclass
class _Rows:
    """Per-slot device state of the decode step (every field [max_batch, ...]: [N], [N, 1], or the
    extras' [N, V] counts / bias and [N, K] log-probabilities)."""
    tokens: Tensor        # [N, 1] int64: last sampled token = next decode input
    pos: Tensor           # [N, 1] int64: its position (= the cache slot it is written to)
    live: Tensor          # [N] int64: 1 while a request holds the row, 0 for idle padding
    temperature: Tensor   # [N] float32
    top_k: Tensor         # [N] int64
    top_p: Tensor         # [N] float32
    seed: Tensor          # [N] int64
    step: Tensor          # [N] int64: tokens the row's request has sampled so far
    presence: Tensor      # [N] float32: presence / frequency penalties
    frequency: Tensor     # [N] float32
    counts: Tensor        # [N, V] int32: the tokens a penalized request has generated so far
    lp: Tensor            # [N, 1 + MAX_LOGPROBS] float32: the last token's log-probability, the top ones'
    lp_ids: Tensor        # [N, MAX_LOGPROBS] int64: the top tokens
    bias: Tensor          # [N, V] float32: each row's logit bias (zeros without one)

    def view(self, rows: slice) -> "_Rows":
        """The state of rows `rows` (views: writes go to this state)."""
        return _Rows(**{k: v[rows] for k, v in vars(self).items()})


def _params(d: dict) -> SamplingParams:
    """SamplingParams from its asdict() sent as JSON (tuples came back as lists)."""
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class _Lockstep:
    """Rank 0's loop decisions, broadcast to the other ranks of a parallel model (see the module
    docstring): JSON bytes over a gloo group made for it (CPU tensors: no GPU stream involved)."""

    def __init__(self, rank: int):
        import torch.distributed as dist
        self.dist = dist
        self.leader = rank == 0
        self.last_send = time.monotonic()
        # collective: every rank's Engine makes it, in the same order
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=30 * HEARTBEAT_S))

    def agree(self, settings: dict) -> None:
        """Every rank must run the same loop: ValueError on a rank whose settings differ from
        rank 0's (e.g. another max_batch would admit requests into other rows)."""
        if self.leader:
            self.send(settings)
        elif (theirs := self.receive()) != settings:
            raise ValueError(f"this rank's Engine settings {settings} differ from rank 0's {theirs}: "
                             f"make the Engine with the same arguments on every rank")

    def send(self, msg: dict) -> None:
        self.last_send = time.monotonic()
        data = torch.tensor(list(json.dumps(msg).encode()), dtype=torch.uint8)
        self.dist.broadcast(torch.tensor([data.numel()]), 0, group=self.group)
        self.dist.broadcast(data, 0, group=self.group)

    def receive(self) -> dict:
        n = torch.zeros(1, dtype=torch.long)
        self.dist.broadcast(n, 0, group=self.group)
        data = torch.empty(int(n), dtype=torch.uint8)
        self.dist.broadcast(data, 0, group=self.group)
        return json.loads(bytes(data.tolist()))


class Engine:
    """Continuous-batching generation over a finalized Qwen3ForCausalLM.

    >>> eng = Engine(model, max_batch=16)
    >>> req = eng.submit(prompt_ids, SamplingParams(max_new_tokens=64, stop_token_ids=(eos,)))
    >>> for tok in req: ...
    >>> eng.shutdown()

    tokenizer (default `model.tokenizer`) gives the text deltas and is needed for stop strings.
    prefill_tokens caps the padded tokens (requests x longest prompt) of one prefill forward and
    the prompt tokens admitted between two decode steps; a longer prompt (its part past a reused
    prefix) is prefilled in chunks of that many tokens, one between two decode steps, so running
    requests keep getting tokens meanwhile.
    prefill_graph_tokens: prefills of up to this many padded tokens replay CUDA graphs (with
    use_cuda_graphs; their staging KV cache holds this many tokens, prefill.py), and so do rests
    of a prompt after a reused prefix and prefill chunks of up to this many; 0: none.
    warmup: before the first request, capture every decode graph (batch bucket x length bucket x
    sampling mode) and every prefill graph the engine can need, so no request waits on a capture
    (a decode graph runs two eager warm-up steps first, a prefill graph one forward; Triton
    compiles on a cold cache). `ready` is set when that is done (at once without warmup);
    requests submitted before wait in the queue.
    prefix_reuse: take a new prompt's leading tokens' K/V from a row that holds them (see the
    module docstring); False: every prompt is prefilled whole.

    With a parallel model, make one Engine (same arguments) in every rank's process: rank 0's
    takes requests, the others follow it (`join()` until rank 0 shuts down).
    """

    def __init__(self, model, max_batch: int = 16, max_len: int | None = None, max_queue: int = 256,
                 tokenizer=None, use_cuda_graphs: bool | None = None, prefill_tokens: int = 4096,
                 prefill_graph_tokens: int = GRAPH_TOKENS, warmup: bool = False, prefix_reuse: bool = True):
        args = model.args
        if max_len is None:
            max_len = min(args.max_position_embeddings, 4096)
        if not 1 <= max_batch:
            raise ValueError(f"max_batch={max_batch}: expected >= 1")
        if not 2 <= max_len <= args.max_position_embeddings:
            raise ValueError(f"max_len={max_len}: expected 2..{args.max_position_embeddings} "
                             f"(the model's max_position_embeddings)")
        if max_queue < 1 or prefill_tokens < 1:
            raise ValueError(f"max_queue={max_queue}, prefill_tokens={prefill_tokens}: both must be >= 1")
        if prefill_graph_tokens < 0:
            raise ValueError(f"prefill_graph_tokens={prefill_graph_tokens}: expected >= 0 (0: no prefill graphs)")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.prefill_tokens = prefill_tokens
        self.prefix_reuse = prefix_reuse
        self.vocab = args.vocab_size
        self.device = next(model.buffers()).device
        self.use_graphs = (self.device.type == "cuda") if use_cuda_graphs is None else use_cuda_graphs
        self.buckets = buckets(max_batch)
        self.len_buckets = buckets(max_len, MIN_LEN_BUCKET)   # attention reads slots [:bucket] only

        dev, N = self.device, max_batch
        self.cache = model.make_cache(N, max_len, dev)
        self.cache.reset()
        z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=dev)   # noqa: E731
        f32 = torch.float32
        self._rows = _Rows(tokens=z(N, 1), pos=z(N, 1), live=z(N), temperature=z(N, dt=f32),
                           top_k=z(N), top_p=torch.ones(N, dtype=f32, device=dev), seed=z(N), step=z(N),
                           presence=z(N, dt=f32), frequency=z(N, dt=f32), counts=z(N, self.vocab, dt=torch.int32),
                           lp=z(N, 1 + min(MAX_LOGPROBS, self.vocab), dt=f32), lp_ids=z(N, min(MAX_LOGPROBS, self.vocab)),
                           bias=z(N, self.vocab, dt=f32))
        # (batch bucket, length bucket, sampling_modes) -> graph
        self._graphs: dict[tuple[int, int, tuple[bool, bool, bool]], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._prefill_fwd = Prefill(model, self.use_graphs, prefill_graph_tokens)
        self.warmup = warmup
        self.warmup_s = 0.0                   # time the warm-up took (0: none)
        self.ready = threading.Event()

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queue: collections.deque[Request] = collections.deque()
        self._slots: list[Request | None] = [None] * N
        # host mirrors of rows.pos / rows.live as of the last launched work (exact: every device
        # update is issued by this thread), so the slots a step may touch are known without a sync
        self._pos = [0] * N
        self._live = [False] * N
        # the tokens whose K/V row s holds at slots 0 .. len - 1 ([] while being prefilled; a free row's
        # stays [] without prefix_reuse); a free row's slot 0 is in _slot0 (idle decode steps rewrite it)
        self._kv: list[list[int]] = [[] for _ in range(N)]
        self._freed = [0] * N                 # when each row's request finished (a counter of finishes)
        self._chunking: collections.deque[Request] = collections.deque()   # long prompts being prefilled
        a = model.args
        self._slot0 = torch.zeros(N, 2, a.num_hidden_layers, self.cache.k.shape[2], a.head_dim,
                                  dtype=self.cache.k.dtype, device=dev)    # [rows, k / v, L, kvh, D]
        self._pending: collections.deque = collections.deque()   # launched, not yet read on the host
        self._stop = False
        self._cancels = False                 # some request was cancelled since the last scan
        self._failure: BaseException | None = None
        self._ids = itertools.count()
        self._rng = random.Random()
        # metrics
        self._started = time.monotonic()
        self._n_requests = self._n_finished = self._n_cancelled = 0
        self._n_prompt_tokens = self._n_generated = self._n_steps = self._n_cached = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        ctx = getattr(model, "parallel", None)
        self._lockstep = _Lockstep(ctx.rank) if ctx is not None and ctx.world > 1 else None
        self._farewell: threading.Thread | None = None     # rank 0 telling the others it failed
        if self._lockstep is not None:
            self._lockstep.agree({"max_batch": max_batch, "max_len": max_len, "prefill_tokens": prefill_tokens,
                                  "prefill_graph_tokens": prefill_graph_tokens, "warmup": warmup,
                                  "prefix_reuse": prefix_reuse,
                                  "graphs": self.use_graphs, "stop_strings": self.tokenizer is not None})
        self._thread = threading.Thread(target=self._run, name="mixprec-engine", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """Queue a request. RequestError (a ValueError naming the field) for bad input (empty
        prompt, token id outside the vocab, prompt + max_new_tokens > max_len, stop strings
        without a tokenizer), ValueError for invalid sampling parameters; QueueFull when
        max_queue requests wait already; EngineStopped after shutdown() or a failure."""
        if self._lockstep is not None and not self._lockstep.leader:
            raise RuntimeError("this rank's engine follows rank 0: submit requests on rank 0")
        params = params.plain().validate()      # numpy scalars too: the lockstep sends them as JSON
        ids = [operator.index(t) for t in prompt_ids]
        if not ids:
            raise RequestError("empty prompt: at least one token is needed", "prompt")
        check_vocab(ids, [params], self.vocab)
        if len(ids) + params.max_new_tokens > self.max_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) = "
                               f"{len(ids) + params.max_new_tokens} exceeds this engine's context of "
                               f"{self.max_len} tokens", "max_tokens")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (the checkpoint has no tokenizer.json)", "stop")
        with self._lock:
            if self._stop or self._failure is not None:
                raise EngineStopped("the engine is shut down" if self._failure is None else
                                    f"the engine loop failed: {self._failure!r}")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued (max_queue={self.max_queue})")
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            req = Request(f"req-{next(self._ids)}", ids, params, seed)
            self._n_requests += 1
            self._n_prompt_tokens += len(ids)
            if params.max_new_tokens == 0:
                req._push(Delta((), "", "length"))
                self._n_finished += 1
                return req
            self._queue.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop `req`: it finishes with "cancelled" and frees its slot at the next step boundary."""
        with self._lock:
            req._cancelled = True
            self._cancels = True
            self._cv.notify()

    def metrics(self) -> dict:
        now = time.monotonic()
        with self._lock:
            self._prune_recent(now)
            recent = sum(n for _, n in self._recent)
            span = min(RATE_WINDOW_S, now - self._started)
            m = {
                "requests_total": self._n_requests,
                "requests_active": sum(r is not None for r in self._slots),
                "requests_queued": len(self._queue),
                "requests_finished": self._n_finished,
                "requests_cancelled": self._n_cancelled,
                "prompt_tokens_total": self._n_prompt_tokens,
                "prompt_tokens_cached": self._n_cached,
                "tokens_generated": self._n_generated,
                "tokens_per_s": recent / span if span > 0 else 0.0,
                "decode_steps": self._n_steps,
                "max_batch": self.max_batch,
                "max_len": self.max_len,
                "kv_cache_bytes": 2 * self.cache.k.numel() * self.cache.k.element_size(),
                "cuda_graphs": len(self._graphs) + self._prefill_fwd.graphs,
                "warmup_s": self.warmup_s,
                "uptime_s": now - self._started,
                "healthy": self._failure is None and not self._stop,
            }
        cuda = self.device.type == "cuda"
        m["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.device) if cuda else 0
        m["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.device) if cuda else 0
        return m

    def _prune_recent(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    @property
    def healthy(self) -> bool:
        return self._failure is None and not self._stop and self._thread.is_alive()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; unfinished requests end with finish_reason "abort"."""
        with self._lock:
            self._stop = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the loop to end (a following rank: until rank 0's engine shuts down or
        fails); -> what ended it in failure (also a failure of rank 0's loop), else None. On rank
        0 after a failure, also waits (same timeout) until the other ranks were told."""
        self._thread.join(timeout)
        if self._farewell is not None:
            self._farewell.join(timeout)
        return self._failure

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        failure: BaseException | None = None
        try:
            if self.device.type == "cuda":
                with torch.cuda.device(self.device), torch.inference_mode():
                    self._loop()
            else:
                with torch.inference_mode():
                    self._loop()
        except BaseException as e:            # recorded for submit() / requests, then re-raised
            failure = e
            raise
        finally:
            self.ready.set()                  # also when the warm-up failed: `healthy` says so
            self._finish_all(failure)
            ls = self._lockstep
            if failure is not None and ls is not None and ls.leader:
                # the other ranks stop too where they wait for rank 0's next decision; sent from a
                # thread: a rank still inside a collective of the failed step would hold the send
                self._farewell = threading.Thread(target=ls.send, args=({"stop": True, "error": repr(failure)},),
                                                  daemon=True)
                self._farewell.start()

    def _loop(self) -> None:
        ls = self._lockstep
        if self.warmup and self.use_graphs:
            self._warm_up()
        self.ready.set()
        while True:
            admit = self._follow(ls.receive()) if ls is not None and not ls.leader else self._decide()
            if admit is None:
                return
            if admit:
                self._admit(admit)
                del admit                     # the loop's frame must not keep requests alive while idle
            if self._chunking:
                self._prefill_chunk()
            launched = self._launch_step()
            # lag by one: read everything but the step just launched, which runs meanwhile
            while len(self._pending) > (1 if launched else 0):
                self._process(self._pending.popleft())

    def _warm_up(self) -> None:
        """Capture every decode and prefill graph now (the same order on every rank: the
        forwards hold the parallel model's collectives). Idle rows decode at position 0, which
        every admission's prefill rewrites."""
        t0 = time.monotonic()
        for B in self.buckets:
            for L in self.len_buckets:
                for modes in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
                    self._graph(B, L, modes)
        self._prefill_fwd.warm_up(self.max_batch, self.max_len)
        self._prefill_fwd.warm_up_tails(self.cache, self.max_len)    # row 0: no request holds it yet
        # prefills above the graph buckets run eagerly: compile their kernels now too (into cache
        # rows that every admission's prefill rewrites)
        for n, T in eager_shapes(self.max_batch, self.max_len, self.prefill_tokens, self._prefill_fwd.graph_tokens):
            ids = torch.zeros(n, T, dtype=torch.long, device=self.device)
            self._prefill_fwd(ids, torch.full((n,), T - 1, device=self.device), self.cache.rows(0, n, T))
        self.warmup_s = time.monotonic() - t0

    def _decide(self) -> list[Request] | None:
        """Wait for work; finish cancelled requests; -> the requests to admit now (None: stop).
        A parallel model's rank 0 also sends each decision to the other ranks (see _follow); it
        sends outside the lock: a send waits for every rank, and submit() / metrics() must not."""
        ls = self._lockstep
        while True:
            with self._lock:
                if self._stop or self._queue or self._pending or any(self._slots):
                    stop = self._stop
                    cancelled = self._reap_cancelled() if self._cancels and not stop else []
                    admit = [] if stop else self._take_admissions()
                    break
                self._cv.wait(None if ls is None else HEARTBEAT_S)
            # idle: the other ranks' receive must not time out; timed from the last message, since
            # wake-ups that bring no work (a cancel of a finished request) restart the wait
            if ls is not None and time.monotonic() - ls.last_send >= HEARTBEAT_S:
                ls.send({})
        if stop:
            if ls is not None:
                ls.send({"stop": True})
            return None
        if ls is not None:
            try:
                ls.send({"cancel": [r.id for r in cancelled],
                         "admit": [{"id": r.id, "ids": r.prompt_ids, "params": asdict(r.params), "seed": r.seed}
                                   for r in admit]})
            except BaseException:             # back in the queue: the loop's exit finishes them
                with self._lock:
                    self._queue.extendleft(reversed(admit))
                raise
        return admit

    def _reap_cancelled(self) -> list[Request]:
        """Finish cancelled requests, running or queued (lock held); -> the running ones."""
        self._cancels = False
        running = [r for r in self._slots if r is not None and r._cancelled]
        for r in running:
            self._finish(r, "cancelled")
        for r in [r for r in self._queue if r._cancelled]:
            self._queue.remove(r)
            self._finish(r, "cancelled")
        return running

    def _follow(self, msg: dict) -> list[Request] | None:
        """Apply rank 0's decisions (a following rank): its cancellations; -> its admissions, in
        its order (None: stop)."""
        if msg.get("error"):
            raise EngineStopped(f"rank 0's engine loop failed: {msg['error']}")
        if msg.get("stop"):
            return None
        with self._lock:
            gone = set(msg.get("cancel", ()))
            for r in [r for r in self._slots if r is not None and r.id in gone]:
                self._finish(r, "cancelled")
        return [Request(a["id"], a["ids"], _params(a["params"]), a["seed"]) for a in msg.get("admit", ())]

    def _take_admissions(self) -> list[Request]:
        """Pop queued requests for the free slots, within the prefill token budget (lock held).
        With prefix reuse, a request that shares SHARE_WAIT or more tokens more with a prompt being
        admitted now, or being prefilled in chunks, than with any row's K/V stays queued (others
        behind it go on): once that prompt's prefill ran, its row offers them, and the request
        takes them instead of computing them beside it (a burst of requests with one long system
        prompt computes it once). At most 2 x the free rows are looked at per step (host time)."""
        free = sum(r is None for r in self._slots)
        out: list[Request] = []
        budget = self.prefill_tokens
        coming = [r.prompt_ids for r in self._chunking]
        for i, r in enumerate(list(self._queue)):
            if len(out) >= free or i >= 2 * free or (out and len(r.prompt_ids) > budget):
                break
            if self.prefix_reuse and self._share_coming(r.prompt_ids, coming + [o.prompt_ids for o in out]):
                continue
            self._queue.remove(r)
            budget -= len(r.prompt_ids)
            out.append(r)
        return out

    def _share_coming(self, ids: list[int], coming: list[list[int]]) -> bool:
        """Whether ids share SHARE_WAIT or more tokens more with a prompt in `coming` than with any
        row (rows not sharing its first SHARE_WAIT tokens count as sharing none: a cheap bound)."""
        head = ids[:SHARE_WAIT]
        best = max((_common_prefix(c, ids) for c in coming if c[:SHARE_WAIT] == head), default=0)
        return best >= SHARE_WAIT and best >= max(self._shared(ids, SHARE_WAIT).values(), default=0) + SHARE_WAIT

    def _shared(self, ids: list[int], head: int, skip: set[int] = frozenset()) -> dict[int, int]:
        """Row -> how many leading tokens of ids its K/V hold, for the rows outside `skip` whose
        record starts with ids' first `head` tokens (the others are not compared: host time)."""
        h = ids[:head]
        return {s: _common_prefix(kv, ids) for s, kv in enumerate(self._kv) if s not in skip and kv[:head] == h}

    def _admit(self, reqs: list[Request]) -> None:
        """Requests that reuse a row's prefix take that row (when it is free and no other request
        of this admission took it) or a free one to copy it into, and prefill alone; the others
        take the lowest free slots (longest prompts first; rows holding a reusable prefix last),
        and runs of contiguous slots prefill together while padding wastes at most half of the
        forward. Every copy is issued before any prefill, so a row taken in place still serves
        copies of its old K/V (a free row: many requests sharing one system prompt)."""
        reqs = sorted(reqs, key=lambda r: -len(r.prompt_ids))
        free = [i for i, r in enumerate(self._slots) if r is None]
        written: set[int] = set()                     # rows this admission fills: no one's slot again
        copied: set[int] = set()                      # of those, the copy destinations: no one's source
        reuse: dict[str, tuple[int, int, bool]] = {}  # request id -> (source row, tokens taken, source free)
        slot: dict[str, int] = {}

        def order(f: int) -> tuple[bool, int]:
            # rows in index order (contiguous rows prefill together), except rows whose K/V could
            # serve a later prompt: those last, the longest unused first
            return (True, self._freed[f]) if len(self._kv[f]) >= PREFIX_MIN else (False, f)

        for r in reqs:
            src, n = self._prefix_source(r.prompt_ids, copied) if self.prefix_reuse else (-1, 0)
            if n:
                in_place = src in free and src not in written
                dest = src if in_place else min((f for f in free if f not in written), key=order, default=None)
                if dest is not None:
                    reuse[r.id], slot[r.id] = (src, n, src in free), dest
                    written.add(dest)
                    if not in_place:
                        copied.add(dest)
        rest = iter(sorted((f for f in free if f not in written), key=order))
        with self._lock:
            for r in reqs:
                s = slot[r.id] if r.id in slot else next(rest)
                r._slot = s
                self._slots[s] = r
                self._kv[s] = []
        alone = set(reuse)
        taken = {r.id: self._take_prefix(r, *reuse[r.id]) for r in reqs if r.id in reuse}   # copies first
        for r in reqs:
            n = taken.get(r.id, 0)
            if len(r.prompt_ids) - n > self.prefill_tokens:         # chunks, from the next loop step on
                r._chunk_at = n
                self._chunking.append(r)
                alone.add(r.id)
            elif r.id in reuse:
                self._prefill_or_fail([r], n)
        group: list[Request] = []
        for r in (r for r in reqs if r.id not in alone):
            if group:
                n, T = len(group) + 1, len(group[0].prompt_ids)      # group[0] is the longest
                contiguous = r._slot == group[-1]._slot + 1
                pays = n * T <= self.prefill_tokens and n * T <= 2 * (sum(len(g.prompt_ids) for g in group)
                                                                       + len(r.prompt_ids))
                if not (contiguous and pays):
                    self._prefill_or_fail(group)
                    group = []
            group.append(r)
        if group:
            self._prefill_or_fail(group)

    def _prefix_source(self, ids: list[int], taken: set[int]) -> tuple[int, int]:
        """(row, n): the row outside `taken` whose K/V hold the longest prefix of ids, and how many
        of its tokens a prefill takes: at most len(ids) - 1 (the last token must run through the
        model for its logits), and so many that the rest is a multiple of 16 tokens (the kernels
        compile per class of token counts: 1, multiples of 16, others; this keeps the rest in one
        class that prefill graphs compile too); n = 0 when that leaves fewer than PREFIX_MIN."""
        if len(ids) <= PREFIX_MIN:
            return -1, 0
        shared = self._shared(ids, PREFIX_MIN, taken)
        # the longest shared prefix; among equals a free row (no copy), then the lowest
        row = max(shared, key=lambda s: (shared[s], self._slots[s] is None, -s), default=-1)
        best = shared.get(row, 0)
        n = len(ids) - -(-(len(ids) - min(best, len(ids) - 1)) // 16) * 16
        return (row, n) if n >= PREFIX_MIN else (-1, 0)

    def _prefill_chunk(self) -> None:
        """The next chunk of the oldest long prompt being prefilled (prefill_tokens of it, as the
        tail of its row's slots so far); its last chunk is a prefill that samples the first token."""
        while self._chunking and self._chunking[0].done:           # cancelled meanwhile
            self._chunking.popleft()
        if not self._chunking:
            return
        r = self._chunking[0]
        n = r._chunk_at
        if len(r.prompt_ids) - n <= self.prefill_tokens:
            self._chunking.popleft()
            self._prefill_or_fail([r], n)
            return
        r._chunk_at = n + self.prefill_tokens
        self._or_fail([r], lambda: self._tail_forward(r, n, r._chunk_at))

    def _prefill_or_fail(self, reqs: list[Request], start: int | None = None) -> None:
        self._or_fail(reqs, lambda: self._prefill(reqs, start))

    def _or_fail(self, reqs: list[Request], prefill) -> None:
        try:
            prefill()
        except torch.OutOfMemoryError as e:   # these prompts are too big now; the others go on
            if self._lockstep is not None:    # ...unless other ranks wait in this prefill's collectives
                raise
            with self._lock:
                for r in reqs:
                    self._finish(r, "error", error=e)

    def _prefill(self, reqs: list[Request], start: int | None = None) -> None:
        """Right-padded prefill of reqs into cache rows [s0, s0 + n) (their slots, contiguous),
        then the first token of each, sampled on the device with step 0. start (one request):
        its row holds the K/V of its first `start` prompt tokens (a reused prefix, earlier
        chunks): only the rest runs (_tail_forward)."""
        R = self._rows
        n, s0 = len(reqs), reqs[0]._slot
        lens = [len(r.prompt_ids) for r in reqs]
        T = max(lens)
        p = [r.params for r in reqs]
        host = {
            "temperature": torch.tensor([q.temperature for q in p], dtype=torch.float32),
            "top_k": torch.tensor([q.top_k for q in p], dtype=torch.long),
            "top_p": torch.tensor([q.top_p for q in p], dtype=torch.float32),
            "presence": torch.tensor([q.presence_penalty for q in p], dtype=torch.float32),
            "frequency": torch.tensor([q.frequency_penalty for q in p], dtype=torch.float32),
            "seed": torch.tensor([r.seed for r in reqs], dtype=torch.long),
            "last": torch.tensor(lens, dtype=torch.long) - 1,
        }
        d = {k: self._to_device(v) for k, v in host.items()}
        rows = slice(s0, s0 + n)
        for k in ("temperature", "top_k", "top_p", "seed", "presence", "frequency"):
            getattr(R, k)[rows].copy_(d[k])
        if start is None:
            ids = torch.zeros(n, T, dtype=torch.long)
            for i, r in enumerate(reqs):
                ids[i, : lens[i]] = torch.tensor(r.prompt_ids, dtype=torch.long)
            logits = self._prefill_fwd(self._to_device(ids), d["last"], self.cache.rows(s0, s0 + n, T))   # [n, V]
        else:
            logits = self._tail_forward(reqs[0], start, T)                                     # [1, V]
        R.step[rows].zero_()
        sampled, filtered, extras = sampling_modes(p)
        # every admission writes its rows' bias and counts: a later step with extras (another
        # request's) applies them to every row, so a previous occupant's must not stay
        bias_rows(R.bias[rows], p)
        R.counts[rows].zero_()
        raw = logits      # log-probabilities are the model's own
        if extras:        # the rows' bias (zeros without one) applies to the first token too
            logits = logits + R.bias[rows]
        first = first_token(logits, R.view(rows), R.step[rows], sampled, filtered)   # no penalty yet
        lps = None
        if extras:        # a row's counts start here; decode steps keep them while it has extras
            count_tokens(R.counts[rows], first)
            logprob_stats(raw, first, R.lp[rows], R.lp_ids[rows])
            if any(q.logprobs is not None for q in p):
                lps = (to_host(R.lp[rows]), to_host(R.lp_ids[rows]))
        R.tokens[rows].copy_(first[:, None])
        R.pos[rows].copy_(d["last"][:, None] + 1)
        R.step[rows].fill_(1)
        R.live[rows].fill_(1)
        for r in reqs:
            if r.params.prompt_logprobs is not None:
                r.prompt_logprobs = self._prompt_logprobs(r.prompt_ids, r.params.prompt_logprobs)
        for r, n_prompt in zip(reqs, lens):
            r._launched = 1
            self._pos[r._slot], self._live[r._slot] = n_prompt, True
            self._kv[r._slot] = r.prompt_ids
        self._pending.append((to_host(first), [(i, r) for i, r in enumerate(reqs)], lps))

    def _take_prefix(self, r: Request, src: int, n: int, idle: bool) -> int:
        """r's row gets the K/V of its first n prompt tokens from row src: there already when src
        is r's row (a free row; its slot 0 in _slot0), else copied from row src (idle: src was free,
        its slot 0 is in _slot0, the cache's is an idle decode step's). -> n"""
        s, c = r._slot, self.cache
        if src != s:
            c.k[:, s, :, :n].copy_(c.k[:, src, :, :n])
            c.v[:, s, :, :n].copy_(c.v[:, src, :, :n])
            if idle:
                self._slot0[s].copy_(self._slot0[src])
            else:
                self._save_slot0(s)
        r.cached_tokens = n
        with self._lock:
            self._n_cached += n
        return n

    def _tail_forward(self, r: Request, n: int, end: int) -> Tensor:
        """A forward of r's prompt tokens n .. end - 1 into its row, whose slots 0 .. n - 1 hold
        K/V already (Prefill.tail: a graph up to its tokens, else eager). Slot 0 comes back from
        _slot0 first where n > 0 (an idle row's decode step rewrites it), and is set aside after
        where n == 0. -> logits [1, V] of token end - 1."""
        s, c = r._slot, self.cache
        if n:
            c.k[:, s, :, 0].copy_(self._slot0[s, 0])
            c.v[:, s, :, 0].copy_(self._slot0[s, 1])
        out = self._prefill_fwd.tail(self._to_device(torch.tensor([r.prompt_ids[n:end]])), n, s, c)
        if not n:
            self._save_slot0(s)
        return out

    def _save_slot0(self, s: int) -> None:
        self._slot0[s, 0].copy_(self.cache.k[:, s, :, 0])
        self._slot0[s, 1].copy_(self.cache.v[:, s, :, 0])

    def _prompt_logprobs(self, ids: list[int], k: int, chunk: int = 512) -> list:
        """Each prompt token's log-probability given the ones before it, and the k most likely
        tokens there (None for the first): one more forward of the whole prompt, without the
        cache (every rank of a parallel model runs it: the lockstep admits on all). Reads the
        result on the host, so it waits for the GPU: a request that asks for it costs the batch
        one pipeline drain at its admission."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(x, float_logits=False)[0, :-1]                                 # [T-1, V]
        out: list = [None]
        for c0 in range(0, logits.shape[0], chunk):
            lp = torch.log_softmax(logits[c0:c0 + chunk].float(), -1)
            nxt = x[0, c0 + 1:c0 + 1 + lp.shape[0]]
            chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
            top = lp.topk(min(k, lp.shape[1]), dim=-1)
            for c, ti, tv in zip(chosen, top.indices.tolist(), top.values.tolist()):
                out.append((c, tuple(zip(ti, tv))))
        return out

    def _len_bucket(self, n: int) -> int:
        return next(b for b in self.len_buckets if b >= n)

    def _step(self, B: int, L: int, modes: tuple[bool, bool, bool]) -> None:
        """One decode step over rows [:B] attending over slots [:L]; no host sync (captured as a
        CUDA graph on GPU). modes: sampling_modes of the batch (a penalized batch's step also
        counts every live row's new token: a penalized request is in every step it runs)."""
        R, rows = self._rows, slice(0, B)
        logits = self.model(R.tokens[rows], positions=R.pos[rows], cache=self.cache.rows(0, B, L),
                            float_logits=False)[:, -1]                                    # [B, V]
        # idle rows (live 0) stay at position 0
        decode_tail(logits, R.tokens[rows, 0], R.pos[rows, 0], R.step[rows], R.live[rows], R.view(rows), modes)

    def _launch_step(self) -> bool:
        """Launch one decode step over the requests that still need tokens; False if none do."""
        rows = [(s, r) for s, r in enumerate(self._slots)    # (_launched 0: a long prompt's chunks still run)
                if r is not None and not r.done and 0 < r._launched < r.params.max_new_tokens]
        if not rows:
            return False
        B = next(b for b in self.buckets if b > rows[-1][0])
        # every row in [:B] writes its K/V at its position (idle ones at 0): all must be < L
        L = self._len_bucket(max(self._pos[:B]) + 1)
        for s in range(B):
            self._pos[s] += self._live[s]
        modes = sampling_modes([r.params for _, r in rows])
        if self.use_graphs:
            self._graph(B, L, modes).replay()
        else:
            self._step(B, L, modes)
        for _, r in rows:
            r._launched += 1
        lps = None      # the step computed them with the extras; copied only where a request reads them
        if any(r.params.logprobs is not None for _, r in rows):
            lps = (to_host(self._rows.lp[:B]), to_host(self._rows.lp_ids[:B]))
        self._pending.append((to_host(self._rows.tokens[:B, 0]), rows, lps))
        self._n_steps += 1
        return True

    def _graph(self, B: int, L: int, modes: tuple[bool, bool, bool]) -> "torch.cuda.CUDAGraph":
        """The captured step for (batch bucket, length bucket, sampling mode). The graph reads
        and writes the persistent row state directly; warm-up runs (Triton compiles) restore
        that state after, and write only K/V the real step rewrites identically. The graphs
        share one memory pool: nothing they allocate outlives a replay (outputs go to `_rows`)."""
        key = (B, L, modes)
        if key not in self._graphs:
            R = self._rows
            snap = {k: v.clone() for k, v in vars(R).items()}
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step(B, L, modes)
                    for k, v in snap.items():
                        getattr(R, k).copy_(v)
            torch.cuda.current_stream().wait_stream(s)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._step(B, L, modes)
            self._graphs[key] = g
        return self._graphs[key]

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)    # no wait on the running step


    # -- host side of a finished launch ----------------------------------------------------------
    def _process(self, item) -> None:
        (buf, ev), rows, lps = item
        if ev is not None:
            ev.synchronize()
        toks = buf.tolist()
        if lps is not None:       # the log-probabilities' own copies
            for _, e in lps:
                if e is not None:
                    e.synchronize()
            lp, ids = lps[0][0].tolist(), lps[1][0].tolist()
        now = time.monotonic()
        rows = [(i, r) for i, r in rows if not r.done]   # not finished / cancelled since the launch
        with self._lock:
            self._n_generated += len(rows)
            self._recent.append((now, len(rows)))
            self._prune_recent(now)
        for i, r in rows:
            k = r.params.logprobs
            self._deliver(r, toks[i], now, None if k is None else (lp[i][0], tuple(zip(ids[i][:k], lp[i][1:1 + k]))))

    def _deliver(self, r: Request, tok: int, now: float, logprob=None) -> None:
        if r.first_token_at is None:
            r.first_token_at = now
        produced = len(r.output_ids) + 1
        p = r.params
        reason = None
        if tok in p.stop_token_ids:
            reason = "stop"
        elif produced >= p.max_new_tokens or len(r.prompt_ids) + produced >= self.max_len:
            reason = "length"
        text = ""
        if self.tokenizer is not None:
            text, stop_hit = self._detokenize(r, tok, final=reason is not None)
            if stop_hit:
                reason = "stop"
        lps = None if logprob is None else (logprob,)
        if reason is None:
            r._push(Delta((tok,), text, None, lps))
        else:
            with self._lock:
                self._finish(r, reason, Delta((tok,), text, reason, lps))

    def _detokenize(self, r: Request, tok: int, final: bool) -> tuple[str, bool]:
        """New text for `tok` (incremental: decode a few trailing ids, hold back an incomplete
        UTF-8 character), minus anything that could still become a stop string.
        -> (text to emit, whether a stop string matched)."""
        prefix, read = r._read
        tail = r.output_ids[prefix:] + [tok]              # ids from `prefix` on, this one included
        before = self.tokenizer.decode(tail[:read - prefix])
        now = self.tokenizer.decode(tail)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            r._full_text += now[len(before):]
            r._read = (read, prefix + len(tail))
        elif final:
            r._full_text += now[len(before):]
        emitted = len(r.text)
        full = r._full_text
        stops = r.params.stop
        if stops:
            start = max(0, emitted - max(len(s) for s in stops) + 1)
            hits = [i for i in (full.find(s, start) for s in stops) if i >= 0]
            if hits:
                return full[emitted:max(min(hits), emitted)], True
            if not final:                     # hold back a tail that may grow into a stop string
                hold = stop_prefix_tail(full, stops)
                return full[emitted:max(len(full) - hold, emitted)], False
        return full[emitted:], False

    def _finish(self, r: Request, reason: str, delta: Delta | None = None,
                error: BaseException | None = None, idle_row: bool = True) -> None:
        """End `r` (lock held): last delta, free its slot. The freed row goes idle on the device
        after any step already launched (stream order), so that step cannot disturb it."""
        if r.done:
            return
        r.error = error
        r._push(delta or Delta((), "", reason))
        if r._slot is not None:
            s, r._slot = r._slot, None
            self._slots[s] = None
            # the K/V of the prompt and of every output token but the last (fed by the steps that
            # made the next one) stay in the row for a later prompt that starts with them; slot 0
            # aside (a device copy after the row's launched steps, before its idle ones)
            self._kv[s] = r.prompt_ids + r.output_ids[:-1] if r._launched and self.prefix_reuse else []
            self._freed[s] = self._n_finished + self._n_cancelled
            if len(self._kv[s]) >= PREFIX_MIN and idle_row:      # shorter: never a source
                self._save_slot0(s)
            if idle_row:
                self._rows.live[s] = 0
                self._rows.pos[s] = 0
                self._pos[s], self._live[s] = 0, False
        if reason == "cancelled":
            self._n_cancelled += 1
        else:
            self._n_finished += 1

    def _finish_all(self, failure: BaseException | None) -> None:
        """Loop exit: every queued / running request ends with "abort" or, after a failure, "error"."""
        with self._lock:
            self._failure = failure
            self._stop = True
            reason = "abort" if failure is None else "error"
            for r in list(self._queue) + [r for r in self._slots if r is not None]:
                self._finish(r, reason, error=failure, idle_row=False)
            self._queue.clear()
            self._pending.clear()
