"""Serving engine: a request queue and continuous batching, depth-wise or sequence-wise, with early exit.

Modes (one engine, one measurement):
- "cdb": continuous depth-wise batching. One step runs the shared block once over every row; rows
  may be at different loops (each request at its own depth) and each gets its own loop's LoRA.
  A row that finishes its last loop, or exits early, emits a token and starts its next token at
  loop 0 in the next step; a finished request's slot is refilled at once.
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


@dataclass
class KVFill:
    """The previous token exited at loop first - 1: its K/V at loops first..B-1 are still to be written
    (block's module docstring), from its exit hidden state."""
    hidden: torch.Tensor  # (h,)
    pos: int
    first: int


@dataclass
class Row:
    req: Request
    slot: int
    tokens: torch.Tensor  # (n,)
    pos: torch.Tensor  # (n,)
    loop: int = 0
    hidden: torch.Tensor | None = None  # (n, h), carried between loops
    prefill: bool = False
    fill: KVFill | None = None  # done by the row's next block call


@dataclass
class Stats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    exits_per_loop: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class Engine:
    def __init__(self, weights: EngineWeights, mode: str = "cdb", max_batch: int = 8, max_len: int = 512,
                 exit_policy: ExitPolicy | None = None, record_loop_predictions: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.w, self.mode, self.max_batch, self.max_len = weights, mode, max_batch, max_len
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
                n = len(req.prompt)
                pos = torch.arange(n, device=self.device)
                rows.append(Row(req, self.cache.allocate(), self._ids(req.prompt), pos, prefill=True))
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
            self._block(rows)
            if self.record and b < self.B - 1:
                self._record_predictions(rows, self._greedy(rows))
        tokens = self._greedy(rows)
        if self.record:
            self._record_predictions(rows, tokens)
        return self._emit(rows, tokens, stats, t0, on_token)

    def _depthwise_step(self, rows: list[Row], stats: Stats, t0: float, on_token) -> list[Row]:
        """One block call; rows at their last loop or exiting emit a token, the rest go one loop deeper.
        One LM-head call per step serves both the exit decisions and the emitted tokens."""
        self._block(rows)
        final = [r for r in rows if r.loop == self.B - 1]
        early = [r for r in rows if r.loop < self.B - 1 and not r.prefill]
        kind = self.exit.kind
        if kind in ("maxprob", "margin") and early:
            decide = self._ids([False] * len(final) + [True] * len(early))
            tokens, exits = self.head.exits(self._last_hidden(final + early), kind, self.exit.threshold, decide)
            taken = [(r, t) for r, t, e in zip(early, tokens[len(final):], exits[len(final):]) if e]
            exited, tokens = [r for r, _ in taken], tokens[:len(final)] + [t for _, t in taken]
        else:
            exited = [r for r in early if kind == "oracle" and self._oracle_exit(r)]
            tokens = self._greedy(final + exited)
        done = {id(r) for r in final + exited}
        carry = [r for r in rows if id(r) not in done]
        for r in carry:
            r.loop += 1
        return carry + self._emit(final + exited, tokens, stats, t0, on_token)

    def _oracle_exit(self, r: Row) -> bool:
        trace, i = r.req.exit_trace, len(r.req.output)
        return trace is not None and i < len(trace) and trace[i] <= r.loop

    def _block(self, rows: list[Row]) -> None:
        """The shared block once over all rows, each at its own loop, plus the K/V-only tokens of the
        rows' pending fills."""
        w = self.w
        for r in rows:
            if r.hidden is None:
                h = w.embed[r.tokens]
                r.hidden = h * torch.tensor(self.multiplier, dtype=h.dtype) if self.multiplier != 1.0 else h
        rows = sorted(rows, key=lambda r: r.loop)  # each loop's tokens contiguous (block.project)
        sizes = [r.tokens.numel() for r in rows]
        fills = sorted(((r, b) for r in rows if r.fill is not None for b in range(r.fill.first, self.B)),
                       key=lambda f: f[1])
        hidden = torch.cat([r.hidden for r in rows])
        tb = self._token_batch(rows, fills)
        kv_only = torch.stack([r.fill.hidden for r, _ in fills]) if fills else None
        for k in range(self.K):
            hidden = layer_forward(hidden, w, k, tb, self.cache, self.act, kv_only)
        for r, h in zip(rows, hidden.split(sizes)):
            r.hidden, r.fill = h, None

    def _token_batch(self, rows: list[Row], fills: list[tuple[Row, int]]) -> TokenBatch:
        slot = [r.slot for r in rows for _ in range(r.tokens.numel())] + [r.slot for r, _ in fills]
        loop = [r.loop for r in rows for _ in range(r.tokens.numel())] + [b for _, b in fills]
        pos = torch.cat([r.pos for r in rows] + ([self._ids([r.fill.pos for r, _ in fills])] if fills else []))
        return TokenBatch.build(self._ids(slot), self._ids(loop), pos, self.w.inv_freq, self.B,
                                rows=len(slot) - len(fills))

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
        requests continue at loop 0, with the K/V fill of the loops an early exit skipped."""
        if not finished:
            return []
        carry = []
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
                p = int(r.pos[-1])
                fill = KVFill(r.hidden[-1], p, r.loop + 1) if r.loop < self.B - 1 else None
                carry.append(Row(req, r.slot, self._ids([tok]), self._ids([p + 1]), fill=fill))
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
