"""Serving engine: a request queue and continuous batching, depth-wise or sequence-wise, with early exit.

Modes (one engine, one measurement):
- "cdb": continuous depth-wise batching. One step runs the shared block once over the rows of the
  loops it chooses (schedule.choose_loops; schedule="all" runs every row); rows may be at different
  loops (each request at its own depth) and each gets its own loop's LoRA. A row that finishes its
  last loop, or exits early, emits a token and starts its next token at loop 0 in the next step; a
  finished request's slot is refilled at once.
- "seq": sequence-wise continuous batching. One step runs all loops over every row (one token per
  row per step); requests join as slots free. Exits cannot shorten a step, so none are taken.
- "static": like "seq", but a new batch is admitted only when the whole previous batch is done.
Requests are prefilled as one row (all prompt tokens) that goes through every loop; exits apply to
decoded tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.activations import ACT2FN

from .block import TokenBatch, layer_forward
from .head import LMHead
from .kv_cache import KVCache
from .schedule import SCHEDULES, step_loops, weight_bytes
from .weights import EngineWeights

MODES = ("cdb", "seq", "static")


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    eos_token_id: int | None = None
    arrival_step: int = 0  # the engine step from which the request may join
    exit_trace: list[int] | None = None  # oracle: loop at which each generated token exits
    id: int = 0
    output: list[int] = field(default_factory=list)
    loops_used: list[int] = field(default_factory=list)  # per generated token, 1..B
    loop_predictions: list[list[int]] = field(default_factory=list)  # per token, argmax after each loop
    t_arrival: float = 0.0
    t_first_token: float = 0.0
    t_done: float = 0.0

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens or (
            self.eos_token_id is not None and bool(self.output) and self.output[-1] == self.eos_token_id)


@dataclass
class ExitPolicy:
    kind: str = "none"  # none | maxprob | margin | oracle
    threshold: float = 0.9

    def __post_init__(self):
        if self.kind not in ("none", "maxprob", "margin", "oracle"):
            raise ValueError(f"exit policy must be none, maxprob, margin or oracle, got {self.kind!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"exit threshold {self.threshold}: a confidence lies in [0, 1]")


@dataclass
class KVFill:
    """A token that exited early: its K/V at `loops` (those it skipped) are still to be written from its
    exit hidden state, each in the first step that runs that loop (block's module docstring); the
    request's later tokens read them only at those loops, and not at all once it is done."""
    hidden: torch.Tensor  # (h,)
    pos: int
    loops: list[int]


@dataclass
class Row:
    req: Request
    slot: int
    tokens: torch.Tensor  # (n,), on the device
    pos: list[int]  # (n,) positions, on the host
    loop: int = 0
    hidden: torch.Tensor | None = None  # (n, h), carried between loops
    prefill: bool = False
    fills: list[KVFill] = field(default_factory=list)  # the request's pending K/V fills
    waited: int = 0  # steps in a row this row was left out (schedule.choose_loops)


@dataclass
class Stats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    head_calls: int = 0  # steps that ran the LM head (to emit or to decide exits)
    exits_per_loop: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class Engine:
    def __init__(self, weights: EngineWeights, mode: str = "cdb", max_batch: int = 8, max_len: int = 512,
                 exit_policy: ExitPolicy | None = None, record_loop_predictions: bool = False,
                 schedule: str = "bytes"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.w, self.mode, self.max_batch, self.max_len = weights, mode, max_batch, max_len
        self.schedule = schedule
        self.exit = exit_policy or ExitPolicy()
        self.record = record_loop_predictions
        cfg = weights.config
        if weights.num_loops > 1 and cfg.recursion_strategy != "cycle":
            raise ValueError("the engine runs the shared block once per loop, which is the CYCLE order; serve a "
                             f"{cfg.recursion_strategy!r} model unrolled (inference.weights.unrolled_weights)")
        self.act = ACT2FN[cfg.hidden_act]
        self.B, self.K = weights.num_loops, weights.num_shared
        self.cache = KVCache(max_batch, self.B, self.K, max_len, cfg.num_key_value_heads, cfg.head_dim,
                             dtype=weights.embed.dtype, device=weights.embed.device)
        self.multiplier = float(cfg.embedding_multiplier)
        self.head = LMHead(weights, max_batch)
        self.device = weights.embed.device
        self.cost = weight_bytes(weights)

    # -- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, requests: list[Request], on_token=None) -> Stats:
        """Serves the requests (in arrival order) to completion; `on_token(request, token)` streams."""
        waiting = sorted(requests, key=lambda r: (r.arrival_step, r.id))
        for r in waiting:
            if len(r.prompt) + r.max_new_tokens > self.max_len:
                raise ValueError(f"request {r.id}: prompt {len(r.prompt)} + {r.max_new_tokens} new tokens exceeds "
                                 f"max_len {self.max_len}")
        rows: list[Row] = []
        stats = Stats(exits_per_loop=[0] * self.B)
        t0 = time.perf_counter()
        step, step_start = 0, []
        while waiting or rows:
            step_start.append(time.perf_counter() - t0)
            admit = self.mode != "static" or not rows
            while admit and waiting and waiting[0].arrival_step <= step and self.cache.free:
                req = waiting.pop(0)
                req.t_arrival = step_start[req.arrival_step]  # latency counts queueing time too
                rows.append(Row(req, self.cache.allocate(), self._ids(req.prompt), list(range(len(req.prompt))),
                                prefill=True))
            if rows:
                rows = self._step(rows, stats, t0, on_token)
            step += 1
        stats.steps, stats.seconds = step, time.perf_counter() - t0
        return stats

    # -- one engine step ------------------------------------------------------------------------
    def _step(self, rows: list[Row], stats: Stats, t0: float, on_token) -> list[Row]:
        if self.mode == "cdb":
            return self._depthwise_step(rows, stats, t0, on_token)
        for b in range(self.B):
            for r in rows:
                r.loop = b
            self._block(rows, rows)
            if self.record and b < self.B - 1:
                self._record_predictions(rows, self._greedy(rows))
        tokens = self._greedy(rows)
        stats.head_calls += 1
        if self.record:
            self._record_predictions(rows, tokens)
        return self._emit(rows, tokens, stats, t0, on_token)

    def _depthwise_step(self, rows: list[Row], stats: Stats, t0: float, on_token) -> list[Row]:
        """One block call over the rows of the chosen loops; those at their last loop or exiting emit a
        token, the others go one loop deeper. One LM-head call per step serves both the exit decisions
        and the emitted tokens."""
        run = self._loops_to_run(rows)
        active = [r for r in rows if r.loop in run]
        for r in rows:
            r.waited = 0 if r.loop in run else r.waited + 1
        self._block(active, rows)
        final = [r for r in active if r.loop == self.B - 1]
        early = [r for r in active if r.loop < self.B - 1 and not r.prefill]
        kind = self.exit.kind
        if kind in ("maxprob", "margin") and early:
            stats.head_calls += 1
            decide = self._ids([False] * len(final) + [True] * len(early))
            tokens, exits = self.head.exits(self._last_hidden(final + early), kind, self.exit.threshold, decide)
            taken = [(r, t) for r, t, e in zip(early, tokens[len(final):], exits[len(final):]) if e]
            exited, tokens = [r for r, _ in taken], tokens[:len(final)] + [t for _, t in taken]
        else:
            exited = [r for r in early if kind == "oracle" and self._oracle_exit(r)]
            tokens = self._greedy(final + exited)
            stats.head_calls += bool(final + exited)
        done = {id(r) for r in final + exited}
        carry = [r for r in rows if id(r) not in done]
        for r in carry:
            if r.waited == 0:  # it ran this step
                r.loop += 1
        return carry + self._emit(final + exited, tokens, stats, t0, on_token)

    def _loops_to_run(self, rows: list[Row]) -> set[int]:
        """schedule.step_loops: a row calls the LM head if it is at the last loop or, not a prefill, may
        exit here (any row under a confidence exit, the trace's exits under the oracle)."""
        kind = self.exit.kind
        may_exit = lambda r: kind in ("maxprob", "margin") or (kind == "oracle" and self._oracle_exit(r))
        head = lambda r: r.loop == self.B - 1 or (not r.prefill and may_exit(r))
        return step_loops([(r.loop, head(r), r.waited) for r in rows], self.B, self.cost, self.schedule)

    def _oracle_exit(self, r: Row) -> bool:
        trace, i = r.req.exit_trace, len(r.req.output)
        return trace is not None and i < len(trace) and trace[i] <= r.loop

    def _block(self, rows: list[Row], everyone: list[Row]) -> None:
        """The shared block once over `rows`, each at its own loop, plus the K/V-only tokens of the
        fills pending (among `everyone`'s) at the loops those rows are at."""
        w = self.w
        for r in rows:
            if r.hidden is None:
                h = w.embed[r.tokens]
                r.hidden = h * torch.tensor(self.multiplier, dtype=h.dtype) if self.multiplier != 1.0 else h
        rows = sorted(rows, key=lambda r: r.loop)  # each loop's tokens contiguous (block.project)
        sizes = [len(r.pos) for r in rows]
        fills = self._take_fills(everyone, {r.loop for r in rows})
        hidden = torch.cat([r.hidden for r in rows])
        tb = self._token_batch(rows, fills)
        kv_only = torch.stack([f.hidden for _, f, _ in fills]) if fills else None
        for k in range(self.K):
            hidden = layer_forward(hidden, w, k, tb, self.cache, self.act, kv_only)
        for r, h in zip(rows, hidden.split(sizes)):
            r.hidden = h

    @staticmethod
    def _take_fills(rows: list[Row], loops: set[int]) -> list[tuple[int, KVFill, int]]:
        """(slot, fill, loop) of each pending fill at `loops`, sorted by loop; they leave the pending lists."""
        taken = []
        for r in rows:
            for f in r.fills:
                taken += [(r.slot, f, b) for b in f.loops if b in loops]
                f.loops = [b for b in f.loops if b not in loops]
            r.fills = [f for f in r.fills if f.loops]
        return sorted(taken, key=lambda t: t[2])

    def _token_batch(self, rows: list[Row], fills: list[tuple[int, KVFill, int]]) -> TokenBatch:
        slot = [r.slot for r in rows for _ in r.pos] + [s for s, _, _ in fills]
        loop = [r.loop for r in rows for _ in r.pos] + [b for _, _, b in fills]
        pos = [p for r in rows for p in r.pos] + [f.pos for _, f, _ in fills]
        return TokenBatch.build(slot, loop, pos, self.w.inv_freq, self.B, rows=len(slot) - len(fills))

    def _ids(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=self.device)

    @staticmethod
    def _last_hidden(rows: list[Row]) -> torch.Tensor:
        return torch.stack([r.hidden[-1] for r in rows])

    def _greedy(self, rows: list[Row]) -> list[int]:
        return self.head.argmax(self._last_hidden(rows)) if rows else []

    def _record_predictions(self, rows: list[Row], tokens: list[int]) -> None:
        for r, p in zip(rows, tokens):
            if not r.prefill:
                if r.loop == 0:
                    r.req.loop_predictions.append([])
                r.req.loop_predictions[-1].append(p)

    def _emit(self, finished: list[Row], tokens: list[int], stats: Stats, t0: float, on_token) -> list[Row]:
        """Finished rows emit their next token (`tokens`, their greedy tokens in order); unfinished
        requests continue at loop 0, owing the K/V fills of the loops an early exit skipped."""
        if not finished:
            return []
        carry, next_tokens = [], []
        now = time.perf_counter() - t0
        for r, tok in zip(finished, tokens):
            req = r.req
            req.output.append(tok)
            req.loops_used.append(r.loop + 1)
            stats.tokens += 1
            if not r.prefill:
                stats.exits_per_loop[r.loop] += 1
            if len(req.output) == 1:
                req.t_first_token = now
            if on_token is not None:
                on_token(req, tok)
            if req.done:
                req.t_done = now
                self.cache.release(r.slot)
            else:
                p = r.pos[-1]
                skipped = list(range(r.loop + 1, self.B))
                fills = r.fills + ([KVFill(r.hidden[-1], p, skipped)] if skipped else [])
                carry.append(Row(req, r.slot, None, [p + 1], fills=fills))
                next_tokens.append(tok)
        if carry:  # one upload for every row's next token
            for r, ids in zip(carry, self._ids(next_tokens).split(1)):
                r.tokens = ids
        return carry


def mean_loops_per_token(requests: list[Request], skip_first: bool = True) -> float:
    """Decoded tokens only by default (the first token comes from the prefill, which runs every loop)."""
    loops = [n for r in requests for n in (r.loops_used[1:] if skip_first else r.loops_used)]
    return sum(loops) / max(len(loops), 1)


def oracle_exit_trace(req: Request) -> list[int]:
    """The paper's oracle: each token exits at the earliest loop whose prediction equals the final one.
    Needs a run with record_loop_predictions in "seq" mode (every loop's prediction of every token)."""
    trace = [0]  # token 0 comes from the prefill, which runs every loop: never consulted
    for preds in req.loop_predictions:
        final = preds[-1]
        trace.append(next(b for b, p in enumerate(preds) if p == final))
    return trace
