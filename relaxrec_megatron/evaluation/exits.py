"""Early exits on held-out text: what each loop's exit predicts, and what a confidence threshold buys.

A loop's exit is the final norm and LM head applied to the hidden state at the end of that loop
(CYCLE models). The relaxed HF model runs every loop on every token (teacher forcing); for each
scored token this records, per loop, the target's log-probability, the greedy token and two
confidences: the max probability and the margin between the top two probabilities. A threshold t
then sends each token out at the first loop whose confidence reaches t (the last loop otherwise),
as the serving engine's max-prob and margin exits do, and is scored by
- the fraction of tokens leaving at each loop and the mean loops per token,
- agreement: how often the exit's greedy token equals the full-depth greedy token,
- the perplexity when every token takes its exit loop's distribution.
Every token's context here ran at full depth; in serving, later tokens attend to the K/V the engine
fills from an exited token's hidden state, so `relaxrec bench serve` measures the served agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..hf.checkpoint import EXIT_CALIBRATION_FILE
from ..recursion.plan import SharingPlan
from .ppl import windows

CRITERIA = ("maxprob", "margin")
TABLE_THRESHOLDS = {"maxprob": (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
                    "margin": (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)}


@dataclass
class LoopStats:
    """Per loop b and scored token n (tensors of shape (loops, tokens))."""

    nll: torch.Tensor  # float64
    greedy: torch.Tensor  # int64
    confidence: dict  # criterion -> float32 (loops, tokens)

    @property
    def loops(self) -> int:
        return self.nll.shape[0]

    @property
    def tokens(self) -> int:
        return self.nll.shape[1]


def loop_end_indices(config) -> list[int]:
    """Indices into the HF model's hidden_states (the embeddings first) where each loop ends."""
    plan = SharingPlan(config.num_hidden_layers, config.num_loops, config.recursion_strategy)
    return [l + 1 for l in plan.exit_layers()]


def confidences(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Max probability and top-2 margin per row of fp32 logits, as the serving engine decides."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return {"maxprob": top[..., 0], "margin": top[..., 0] - top[..., 1]}


@torch.no_grad()
def loop_stats(model, documents: list[torch.Tensor], context: int, stride: int, batch_size: int = 8,
               progress=None) -> LoopStats:
    """Every loop's exit on every scored token of the documents (sliding windows as in evaluation.ppl)."""
    ends = loop_end_indices(model.config)
    device = next(model.parameters()).device
    nll, greedy, conf = [], [], {c: [] for c in CRITERIA}
    for ids in documents:
        spans = list(windows(ids.numel(), context, stride)) if ids.numel() >= 2 else []
        for i in range(0, len(spans), batch_size):
            chunk = spans[i: i + batch_size]
            width = max(e - b for b, e, _ in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (b, e, _) in enumerate(chunk):
                batch[row, : e - b] = ids[b:e]
            hidden = model(batch.to(device), use_cache=False, output_hidden_states=True).hidden_states
            rows = [(row, first - 1 - b, e - b, ids[first: e + 1]) for row, (b, e, first) in enumerate(chunk)]
            targets = torch.cat([t for *_, t in rows]).to(device)
            per_loop = []
            for end in ends:  # one loop's logits at a time: (tokens, vocab) in fp32
                h = torch.cat([hidden[end][row, lo:hi] for row, lo, hi, _ in rows])
                logits = model.lm_head(model.model.norm(h)).float()
                logp = torch.log_softmax(logits, dim=-1)
                per_loop.append((-logp.gather(-1, targets[:, None])[:, 0].double().cpu(),
                                 logits.argmax(-1).cpu(), {k: v.cpu() for k, v in confidences(logits).items()}))
            nll.append(torch.stack([p[0] for p in per_loop]))
            greedy.append(torch.stack([p[1] for p in per_loop]))
            for c in CRITERIA:
                conf[c].append(torch.stack([p[2][c] for p in per_loop]))
            if progress is not None:
                progress(targets.numel())
    if not nll:
        raise UserError("no tokens to score: the documents are shorter than 2 tokens")
    return LoopStats(torch.cat(nll, 1), torch.cat(greedy, 1), {c: torch.cat(v, 1) for c, v in conf.items()})


def exit_loops(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(thresholds, tokens): the loop each token leaves at under each threshold, the first whose
    confidence reaches it, the last loop where none does."""
    loops = confidence.shape[0]
    reach = confidence[None, :-1] >= thresholds[:, None, None]  # (T, loops - 1, tokens)
    first = torch.where(reach.any(1), reach.float().argmax(1), torch.full_like(reach[:, 0], loops - 1, dtype=torch.long))
    return first.long()


def sweep(stats: LoopStats, criterion: str, thresholds) -> list[dict]:
    """One row per threshold: exit fractions per loop, mean loops per token, agreement, perplexity."""
    t = torch.as_tensor(list(thresholds), dtype=torch.float32)
    loops = exit_loops(stats.confidence[criterion], t)  # (T, N)
    n = stats.tokens
    final = stats.greedy[-1]
    rows = []
    for i, thr in enumerate(t.tolist()):
        e = loops[i]
        token_nll = stats.nll.gather(0, e[None])[0]
        agree = stats.greedy.gather(0, e[None])[0] == final
        rows.append({"criterion": criterion, "threshold": round(thr, 6),
                     "exit_fractions": (torch.bincount(e, minlength=stats.loops).double() / n).tolist(),
                     "mean_loops": float(e.double().mean() + 1), "agreement": float(agree.double().mean()),
                     "perplexity": math.exp(float(token_nll.mean()))})
    return rows


def calibrate(stats: LoopStats, criterion: str, agreement: float, resolution: int = 1000) -> dict | None:
    """The lowest threshold on a grid of `resolution` steps in [0, 1) whose agreement, and that of every
    higher grid threshold, is at least `agreement` (exits are then as frequent as that target allows);
    None where even the highest misses it."""
    grid = torch.arange(resolution, dtype=torch.float64).div(resolution).float()
    rows = sweep(stats, criterion, grid.tolist())
    best = None
    for row in reversed(rows):
        if row["agreement"] < agreement:
            break
        best = row
    return best


def per_loop_perplexity(stats: LoopStats) -> list[float]:
    return [math.exp(float(v)) for v in stats.nll.mean(1)]


def stored_threshold(folder, criterion: str) -> float:
    """The threshold `relaxrec eval exits` calibrated for `criterion` and stored in the checkpoint."""
    import json
    from pathlib import Path

    path = Path(folder) / EXIT_CALIBRATION_FILE
    if not path.is_file():
        raise UserError(f"--threshold auto: {folder} has no {EXIT_CALIBRATION_FILE}; run "
                        f"`relaxrec eval exits {folder} --data FILES` first, or give a number")
    row = json.loads(path.read_text()).get(criterion)
    if not row:
        raise UserError(f"--threshold auto: {path} has no {criterion} threshold that met its agreement target; "
                        "give a number, or recalibrate with a lower --agreement")
    return float(row["threshold"])


def format_exits(report: dict) -> str:
    ppl = report["per_loop_perplexity"]
    lines = ["perplexity by loop: " + "  ".join(f"loop {b + 1} {v:.3f}" for b, v in enumerate(ppl)),
             f"{report['tokens']} tokens; a token leaves at the first loop whose confidence reaches the threshold", "",
             f"{'criterion':<10}{'threshold':>10}{'exits by loop':>24}{'loops/token':>13}{'agreement':>11}"
             f"{'perplexity':>14}"]
    for r in report["rows"] + [dict(r, criterion=f"{c}*") for c in ("maxprob", "margin") if (r := report.get(c))]:
        fractions = " ".join(f"{100 * f:.1f}%" for f in r["exit_fractions"])
        lines.append(f"{r['criterion']:<10}{r['threshold']:>10.3f}{fractions:>24}{r['mean_loops']:>13.3f}"
                     f"{100 * r['agreement']:>10.2f}%{r['perplexity']:>14.6g}")
    target = f"{100 * report['agreement_target']:g}%"
    for c in ("maxprob", "margin"):
        r = report.get(c)
        lines.append(f"* {c}: the lowest threshold with agreement >= {target}: " +
                     (f"{r['threshold']:.3f} ({r['mean_loops']:.3f} loops/token)" if r else "none below 1.0"))
    return "\n".join(lines)


def store_calibration(name: str, report: dict) -> None:
    """The calibrated thresholds, beside the checkpoint's config (a Megatron checkpoint's export carries
    them to HF); `generate` and `bench serve` read them with --threshold auto."""
    path = Path(name).expanduser()
    if not path.is_dir():
        print(f"[eval] {name} is not a local folder: thresholds not stored (see --output)")
        return
    from ..files import write_json
    from ..hf.checkpoint import EXIT_CALIBRATION_FILE
    from ..model.reference import open_ref

    folder = open_ref(name).path
    keep = {k: report[k] for k in ("data", "tokens", "context", "stride", "agreement_target", "per_loop_perplexity",
                                   "maxprob", "margin")}
    write_json(str(folder / EXIT_CALIBRATION_FILE), keep)
    print(f"[eval] stored the calibrated thresholds in {folder / EXIT_CALIBRATION_FILE}")
