"""What a run reports: every step's record on the console (rank 0), in run_dir/metrics.jsonl and in
wandb; evaluations likewise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainConfig, plain


class Logger:
    """Console on rank 0, run_dir/metrics.jsonl (every step's record, appended across resumes: the last
    line of a step wins), and wandb (offline without WANDB_API_KEY).

    Records are kept until `flush` (every logging.every steps, before a checkpoint and at the end):
    their device tensors (DeepSpeed's gradient norm) are then read in one transfer, so the host waits
    for the device once per logging interval, not once per step."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, recursion: dict):
        self.cfg, self.wandb = cfg, None
        self.metrics = run_dir / "metrics.jsonl"
        self.pending: list[dict] = []
        if dist.get_rank() != 0 or cfg.logging.wandb_mode == "disabled":
            return
        mode = cfg.logging.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        try:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name, group=cfg.logging.wandb_group,
                                    dir=str(run_dir), mode=mode, config={**plain(cfg), "recursion": recursion},
                                    resume="allow", id=cfg.run.name.replace("/", "-"))
        except Exception as e:  # logging must never stop a run; say so once
            print(f"[train] wandb disabled: {type(e).__name__}: {e}", flush=True)

    def record(self, rec: dict) -> None:
        self.pending.append(rec)

    def flush(self, bar=None) -> None:
        """Reads the pending records' tensors (in place: they are the records train() returns), writes
        them, and prints those of logging steps."""
        recs, self.pending = self.pending, []
        slots = [(rec, k) for rec in recs for k, v in rec.items() if torch.is_tensor(v)]
        if slots:
            values = torch.stack([rec[k].detach().reshape(()).double().cpu() for rec, k in slots]).tolist()
            for (rec, k), v in zip(slots, values):
                rec[k] = v
        if dist.get_rank() != 0 or not recs:
            return
        with self.metrics.open("a") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in recs)
        for rec in recs:
            if rec["step"] % self.cfg.logging.every == 0:
                self.log(rec, bar if bar is not None and bar.disable is False and self.cfg.logging.every == 1 else None)

    def log_eval(self, val: dict, step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(val, step=step)
        if dist.get_rank() == 0:
            loops = [v for k, v in val.items() if k.startswith("valid_loop") and k.endswith("_ppl")]
            by_loop = f" (by loop {' / '.join(f'{v:.2f}' for v in loops)})" if loops else ""
            print(f"[eval] step {step} valid loss {val['valid_loss']:.4f} ppl {val['valid_ppl']:.2f}{by_loop}",
                  flush=True)

    def log(self, rec: dict, bar=None) -> None:
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=rec["step"])
        loops = [rec[k] for k in sorted(rec) if k.startswith("loop") and k.endswith("_loss")]
        by_loop = f"loops {'/'.join(f'{v:.4f}' for v in loops)} " if loops else ""
        kd = f"kd {rec['kd_loss']:.4f} " if self.cfg.kd.enabled else ""
        line = (f"step {rec['step']:>6} loss {rec['loss']:.4f} lm {rec['lm_loss']:.4f} {kd}"
                f"{by_loop}lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.3f} {rec['tokens_per_s']:.0f} tok/s")
        if bar is not None:
            bar.set_postfix_str(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.flush()
        if self.wandb is not None:
            self.wandb.finish()
