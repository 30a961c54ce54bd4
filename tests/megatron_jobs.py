"""Work done inside the spawned ranks of the Megatron tests (one process per rank)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _setup(relaxed_dir: Path, tp: int, pp: int, sp: bool = False, recompute: bool = False):
    from relaxrec_megatron.hf.checkpoint import CheckpointReader
    from relaxrec_megatron.model.settings import ParallelLayout, RelaxedSettings
    from relaxrec_megatron.parallel.distributed import build_model, init_distributed

    init_distributed(tp, pp)
    reader = CheckpointReader(relaxed_dir)
    settings = RelaxedSettings(reader.config, ParallelLayout(tp=tp, pp=pp, sequence_parallel=sp, recompute=recompute))
    return reader, settings, build_model(settings)


def _logits(model, tokens):
    from relaxrec_megatron.parallel.schedule import batch_from_tokens, forward_backward

    model.eval()
    out = forward_backward(model, [batch_from_tokens(tokens)], collect_logits=True)
    return out[0]["logits"] if out else None


def _save_if_writer(obj, path: Path) -> None:
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(obj, path)


def parity_job(cases: list[tuple[str, str]], tokens: torch.Tensor, layout: dict, out_dir: str) -> None:
    """For each (name, relaxed_dir): logits, and canonical gradients after one backward of the summed CE."""
    from megatron.core import parallel_state as ps

    from relaxrec_megatron.model.state_adapter import load_canonical, local_shard, pieces
    from relaxrec_megatron.parallel.grads import finalize_grads, shared_layer_groups
    from relaxrec_megatron.parallel.schedule import batch_from_tokens, forward_backward

    out = Path(out_dir)
    for name, relaxed_dir in cases:
        reader, settings, model = _setup(Path(relaxed_dir), **layout)
        load_canonical(model, settings, reader.get)
        _save_if_writer(_logits(model, tokens), out / f"{name}.logits.pt")
        model.train()
        model.zero_grad()
        forward_backward(model, [batch_from_tokens(tokens)])
        params = dict(model.named_parameters())

        def canonical_grads():
            grads = {}
            for piece in pieces(model, settings):
                if not piece.main_stage or (piece.tp_axis is None and ps.get_tensor_model_parallel_rank() > 0):
                    continue
                g = params[piece.param].grad
                grads[piece.canon] = (piece.tp_axis, ps.get_tensor_model_parallel_rank(), local_shard(piece, g))
            return grads

        torch.save(canonical_grads(), out / f"{name}.rawgrads.rank{dist.get_rank()}.pt")
        finalize_grads(model, settings, shared_layer_groups(settings))
        torch.save(canonical_grads(), out / f"{name}.grads.rank{dist.get_rank()}.pt")


def save_job(relaxed_dir: str, tp: int, pp: int, ckpt_dir: str) -> None:
    from relaxrec_megatron.model import checkpoint
    from relaxrec_megatron.model.state_adapter import load_canonical

    reader, settings, model = _setup(Path(relaxed_dir), tp, pp)
    load_canonical(model, settings, reader.get)
    checkpoint.save(model, settings, ckpt_dir)


def load_job(relaxed_dir: str, tp: int, pp: int, ckpt_dir: str, tokens: torch.Tensor, out_path: str) -> None:
    """Build from the relaxed config only (random init), load the dist checkpoint, save logits."""
    from relaxrec_megatron.model import checkpoint

    _, settings, model = _setup(Path(relaxed_dir), tp, pp)
    checkpoint.load(model, settings, ckpt_dir)
    _save_if_writer(_logits(model, tokens), Path(out_path))


def kd_job(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float,
           tp: int, out_dir: str) -> None:
    """Vocab-parallel KD loss on this rank's vocabulary shard; saves loss and the logits' gradient shard."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from relaxrec_megatron.parallel.distributed import init_distributed
    from relaxrec_megatron.training.kd import distillation_loss

    init_distributed(tp, 1)
    rank = ps.get_tensor_model_parallel_rank()
    s = student.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    t = teacher.chunk(tp, dim=-1)[rank]
    ce = vocab_parallel_cross_entropy(s.clone(), labels)  # megatron shifts its input in place
    loss, kl = distillation_loss(s, t, ce, alpha, temperature, ps.get_tensor_model_parallel_group())
    loss.sum().backward()
    torch.save({"loss": loss.detach(), "kl": kl.detach(), "grad": s.grad}, Path(out_dir) / f"kd{rank}.pt")


def train_job(config_path: str, overrides: list[str], out_path: str, stop_after=None, nan_steps=(),
              crash_in_save_at=None, sigterm_at=None) -> None:
    """Runs `relaxrec train` in this world; saves the per-step records and optimizer-state bytes.
    nan_steps: poison the gradients at these steps; crash_in_save_at: die half-way through that step's save."""
    import os

    from relaxrec_megatron.training import trainer as trainer_mod
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.run import train, train_entry

    original_loss_step, original_save = trainer_mod.Trainer._loss_step, trainer_mod.Trainer.save

    def poisoned(self, batches, forward_only=False):
        out = original_loss_step(self, batches, forward_only)
        if not forward_only and self.step + 1 in nan_steps:  # 1-based, like the records
            for p in self.student.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return out

    def crashing_save(self, root):
        if self.step == crash_in_save_at:
            from relaxrec_megatron.model import checkpoint as mckpt

            mckpt.save(self.student, self.settings, Path(root) / f"step_{self.step:08d}" / "model")
            os._exit(17)  # killed mid-save: model written, optimizer state and `latest` not
        return original_save(self, root)

    original_step = trainer_mod.Trainer.train_step

    def step_then_signal(self):
        rec = original_step(self)
        if self.step == sigterm_at:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # as slurm does before preempting
        return rec

    trainer_mod.Trainer._loss_step, trainer_mod.Trainer.save = poisoned, crashing_save
    trainer_mod.Trainer.train_step = step_then_signal
    if stop_after is None:
        return train_entry(config_path, overrides, out_path)

    records = train(load_config(config_path, overrides), stop_after=stop_after)
    import torch.distributed as dist

    torch.save(records, f"{out_path}.rank{dist.get_rank()}.pt")
