"""Work done inside the spawned ranks of the Megatron tests (one process per rank)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _setup(relaxed_dir: Path, tp: int, pp: int, sp: bool = False, recompute: bool = False, loop_exits: int = 0):
    from relaxrec_megatron.hf.checkpoint import CheckpointReader
    from relaxrec_megatron.model.build import build_model
    from relaxrec_megatron.model.settings import ParallelLayout, RelaxedSettings
    from relaxrec_megatron.parallel.distributed import init_distributed

    init_distributed(tp, pp)
    reader = CheckpointReader(relaxed_dir)
    settings = RelaxedSettings(reader.config, ParallelLayout(tp=tp, pp=pp, sequence_parallel=sp, recompute=recompute))
    return reader, settings, build_model(settings, loop_exits=loop_exits)


def _logits(model, tokens):
    from pipeline import batch_from_tokens, forward_backward

    model.eval()
    out = forward_backward(model, [batch_from_tokens(tokens)], collect_logits=True)
    return out[0]["logits"] if out else None


def _save_if_writer(obj, path: Path) -> None:
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(obj, path)


def _canonical_grads(model, settings) -> dict:
    """{canonical name: (TP axis, TP rank, this rank's shard of the gradient)} of the parameters this
    rank owns (a replica's main stage; TP rank 0 for unsplit ones)."""
    from megatron.core import parallel_state as ps

    from relaxrec_megatron.model.state_adapter import local_shard, pieces

    params, grads = dict(model.named_parameters()), {}
    for piece in pieces(model, settings):
        if not piece.main_stage or (piece.tp_axis is None and ps.get_tensor_model_parallel_rank() > 0):
            continue
        grads[piece.canon] = (piece.tp_axis, ps.get_tensor_model_parallel_rank(),
                              local_shard(piece, params[piece.param].grad))
    return grads


def parity_job(cases: list[tuple[str, str]], tokens: torch.Tensor, layout: dict, out_dir: str,
               exit_cases: list[dict] = ()) -> None:
    """For each (name, relaxed_dir): logits, and canonical gradients after one backward of the summed CE.
    Then each exit case: the trainer's objective and step on one micro-batch (exit_job)."""
    from pipeline import batch_from_tokens, forward_backward

    from relaxrec_megatron.model.state_adapter import load_canonical
    from relaxrec_megatron.training.grads import finalize_grads, shared_layer_groups

    out = Path(out_dir)
    for name, relaxed_dir in cases:
        reader, settings, model = _setup(Path(relaxed_dir), **layout)
        load_canonical(model, settings, reader.get)
        _save_if_writer(_logits(model, tokens), out / f"{name}.logits.pt")
        model.train()
        model.zero_grad()
        forward_backward(model, [batch_from_tokens(tokens)])
        torch.save(_canonical_grads(model, settings), out / f"{name}.rawgrads.rank{dist.get_rank()}.pt")
        finalize_grads(model, settings, shared_layer_groups(settings))
        torch.save(_canonical_grads(model, settings), out / f"{name}.grads.rank{dist.get_rank()}.pt")
    for case in exit_cases:
        exit_job(case, tokens, layout, out)


def exit_job(case: dict, tokens: torch.Tensor, layout: dict, out: Path) -> None:
    """The training objective with early exits (training.objective) through the trainer's step
    (training.step) on one micro-batch: its reports on the last stage, and the canonical gradients
    after the gradient contracts. case: name, student, teacher (or None), kd and exit config fields."""
    from pipeline import batch_from_tokens

    from relaxrec_megatron.model.state_adapter import load_canonical
    from relaxrec_megatron.training.config import ExitConfig, KDConfig
    from relaxrec_megatron.training.grads import finalize_grads, shared_layer_groups
    from relaxrec_megatron.training.objective import Objective
    from relaxrec_megatron.training.step import forward_backward

    reader, settings, student = _setup(Path(case["student"]), **layout, loop_exits=1)  # the cases' 2 loops
    load_canonical(student, settings, reader.get)
    teacher = None
    if case["teacher"]:  # in the same groups as the student
        from relaxrec_megatron.hf.checkpoint import CheckpointReader
        from relaxrec_megatron.model.build import build_model
        from relaxrec_megatron.model.settings import RelaxedSettings

        t_reader = CheckpointReader(case["teacher"])
        t_settings = RelaxedSettings(t_reader.config, settings.layout)
        teacher = build_model(t_settings)
        load_canonical(teacher, t_settings, t_reader.get)
    objective = Objective(student, teacher, KDConfig(**case["kd"]), ExitConfig(enabled=True, **case["exit"]))
    student.train()
    stored = forward_backward(objective, [batch_from_tokens(tokens)], layout["pp"])
    report = {"loss": stored[0].loss, "loops": torch.stack(stored[0].loops)} if stored else None
    _save_if_writer(report, out / f"{case['name']}.reports.pt")
    finalize_grads(student, settings, shared_layer_groups(settings))
    torch.save(_canonical_grads(student, settings), out / f"{case['name']}.grads.rank{dist.get_rank()}.pt")


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


def kd_job(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cases: list[tuple],
           tp: int, out_dir: str) -> None:
    """Vocab-parallel KD loss on this rank's vocabulary shard, for each case (alpha, temperature, chunk
    tokens); saves each case's loss and the logits' gradient shard."""
    from megatron.core import parallel_state as ps

    from relaxrec_megatron.parallel.distributed import init_distributed
    from relaxrec_megatron.training.kd import distillation_loss

    init_distributed(tp, 1)
    rank = ps.get_tensor_model_parallel_rank()
    for i, (alpha, temperature, chunk_tokens) in enumerate(cases):
        s = student.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
        t = teacher.chunk(tp, dim=-1)[rank]
        loss, ce, kl = distillation_loss(s, t, labels, alpha, temperature, ps.get_tensor_model_parallel_group(),
                                         chunk_bytes=chunk_tokens * 4 * s.shape[-1])
        (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()  # per-token upstream grads
        torch.save({"loss": loss.detach(), "ce": ce, "kl": kl, "grad": s.grad}, Path(out_dir) / f"kd{i}.{rank}.pt")


def train_job(config_path: str, overrides: list[str], out_path: str, nan_steps=(),
              crash_in_save_at=None, sigterm_at=None, grad_probe=False, delays=()) -> None:
    """Runs `relaxrec train` in this world through the trainer's hooks; saves the per-step records and
    optimizer-state bytes. nan_steps: poison the gradients at these steps (1-based, like the records);
    crash_in_save_at: die half-way through that step's save; sigterm_at: SIGTERM to the last rank
    after that step; grad_probe: record where the gradients are when the gradient contracts run;
    delays: (hook, step, rank, seconds), that rank sleeps in that hook ("backward" or "saved") of that
    step. Every step's DeepSpeed collectives are saved too (training.comms)."""
    import os
    import signal
    import time

    import torch.distributed as dist

    from relaxrec_megatron.training import grads
    from relaxrec_megatron.training.comms import CollectiveCounter
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.run import Preempted, train, train_entry
    from relaxrec_megatron.training.trainer import Hooks

    seen = []

    def delay(hook, step):
        for where, at, rank, seconds in delays:
            if (where, at, rank) == (hook, step, dist.get_rank()):
                time.sleep(seconds)

    def after_backward(trainer):
        delay("backward", trainer.step + 1)
        if trainer.step + 1 in nan_steps:
            for g in trainer.gradients():
                g.fill_(float("nan"))
        if grad_probe:
            params = [p for p in trainer.student.parameters() if p.requires_grad]
            seen.append({"params": len(params), "in_grad": sum(p.grad is not None for p in params),
                         "in_fp32_buffer": sum(getattr(p, "_hp_grad", None) is not None
                                               and grads.accumulated_grad(p) is p._hp_grad
                                               and p._hp_grad.dtype == torch.float32 for p in params)})
            torch.save(seen, f"{out_path}.grads.rank{dist.get_rank()}.pt")

    def after_step(trainer, rec):
        traffic.append(counter.stop())
        torch.save(traffic, f"{out_path}.traffic.rank{dist.get_rank()}.pt")
        torch.save(trainer.history, f"{out_path}.steps.rank{dist.get_rank()}.pt")  # kept if the run then fails
        if trainer.step == 1:
            torch.save(allocations(trainer), f"{out_path}.alloc.rank{dist.get_rank()}.pt")
        if trainer.step == sigterm_at and dist.get_rank() == dist.get_world_size() - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to one rank only: every rank must still stop with it

    def after_model_saved(trainer, folder):
        delay("saved", trainer.step)
        if trainer.step == crash_in_save_at:
            os._exit(17)  # killed mid-save: model written, optimizer state and `latest` not

    traffic = []  # DeepSpeed's collectives in each step (training.comms)
    with CollectiveCounter() as counter:
        hooks = Hooks(after_backward=after_backward, after_step=after_step, after_model_saved=after_model_saved,
                      before_step=lambda trainer: counter.start())
        if sigterm_at is None:
            return train_entry(config_path, overrides, out_path, hooks)
        try:
            records = train(load_config(config_path, overrides), hooks)
        except Preempted as stopped:
            records = stopped.records
    torch.save(records, f"{out_path}.rank{dist.get_rank()}.pt")


def hub_train_job(config_path: str, overrides: list[str], out_path: str, hub_cache: str, empty_cache: str) -> None:
    """train_entry with the hub offline and its cache on rank 0 only, as on nodes with caches of their
    own: a rank but 0 that asked the hub would fail."""
    import os

    import huggingface_hub.constants as hub

    from relaxrec_megatron.training.run import train_entry

    hub.HF_HUB_OFFLINE = True
    hub.HF_HUB_CACHE = hub_cache if os.environ["RANK"] == "0" else empty_cache
    train_entry(config_path, overrides, out_path)


def allocations(trainer) -> dict:
    """Bytes this rank holds, read off the tensors: the student's and teacher's parameters, the fp32
    copies the inner optimizer steps on (not the model's own tensors) and their Adam moments."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    own = {p.data_ptr() for p in trainer.student.parameters()}
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    stepped = [p for g in inner.param_groups for p in g["params"]]
    teacher = trainer.model.teacher[0] if trainer.model.teacher else None
    return {"student weights": size(trainer.student.parameters()),
            "teacher weights": size(teacher.parameters()) if teacher is not None else 0,
            "fp32 master weights": size(p for p in stepped if p.data_ptr() not in own),
            "Adam moments": size(t for st in inner.state.values() for t in st.values()
                                 if torch.is_tensor(t) and t.dim() > 0)}


def fp8_context_job(relaxed_dir: str, tokens: torch.Tensor, out_path: str) -> None:
    """Records the layer numbers the decoder asks megatron's FP8 context for, in a forward and
    backward with recompute (which runs each layer's forward again inside backward)."""
    from pipeline import batch_from_tokens, forward_backward

    from relaxrec_megatron.model import decoder

    asked = []
    real = decoder.get_fp8_context

    def recording(config, layer_no=-1, is_init=False):
        asked.append(layer_no)
        return real(config, layer_no, is_init)

    decoder.get_fp8_context = recording
    _, settings, model = _setup(Path(relaxed_dir), 1, 1, recompute=True)
    model.train()
    forward_backward(model, [batch_from_tokens(tokens)])
    torch.save({"asked": asked, "layers": settings.plan.num_layers}, out_path)


def te_parity_job(cases: list[tuple[str, str]], tokens: torch.Tensor, layout: dict, out_dir: str) -> None:
    """Each case built twice in one world, with megatron's local linears and with the Transformer
    Engine ones (tests/te_standin.py in place of TE): logits and canonical gradients of both."""
    import te_standin
    from pipeline import batch_from_tokens, forward_backward

    from relaxrec_megatron.model import decoder
    from relaxrec_megatron.model.build import build_model
    from relaxrec_megatron.model.state_adapter import load_canonical
    from relaxrec_megatron.training.grads import finalize_grads, shared_layer_groups

    decoder.get_fp8_context = te_standin.install()
    for name, relaxed_dir in cases:
        reader, settings, _ = _setup(Path(relaxed_dir), **layout)
        for kind in ("local", "te"):
            model = build_model(settings, use_te=kind == "te")
            load_canonical(model, settings, reader.get)
            logits = _logits(model, tokens)
            model.train()
            forward_backward(model, [batch_from_tokens(tokens)])
            finalize_grads(model, settings, shared_layer_groups(settings))
            _save_if_writer(logits, Path(out_dir) / f"{name}.{kind}.logits.pt")
            torch.save(_canonical_grads(model, settings), Path(out_dir) / f"{name}.{kind}.grads.rank{dist.get_rank()}.pt")


def te_fp8_job(relaxed_dir: str, tokens: torch.Tensor, layout: dict, out_path: str) -> None:
    """Three optimizer-like steps of an FP8 model with the first and last unrolled layers in bf16
    (the stand-in TE linears record, per call, whether FP8 was on and whether they recast their FP8
    weight copy), each step of two micro-batches after `set_is_first_microbatch`, as the trainer does;
    the weights jump between steps. Saves each shared linear's calls per step, and each step's logits
    next to those of a model built afresh with that step's weights (no FP8 cache to go stale)."""
    import te_standin
    from pipeline import batch_from_tokens, forward_backward

    from relaxrec_megatron.model import decoder
    from relaxrec_megatron.model.build import build_model
    from relaxrec_megatron.model.state_adapter import load_canonical
    from relaxrec_megatron.training.config import ModelConfig
    from relaxrec_megatron.training.precision import fp8_settings

    decoder.get_fp8_context = te_standin.install()
    reader, settings, _ = _setup(Path(relaxed_dir), **layout)
    fp8 = fp8_settings(ModelConfig(fp8=True, fp8_recipe="tensorwise", fp8_first_last_bf16=True))
    model = build_model(settings, use_te=True, fp8=fp8)
    load_canonical(model, settings, reader.get)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, te_standin.TELinear)}
    batches = [batch_from_tokens(tokens[i:i + 1]) for i in range(tokens.shape[0])]
    g = torch.Generator().manual_seed(3)
    out = {"calls": [], "logits": [], "fresh": []}
    for _ in range(3):
        for m in linears.values():
            m.calls.clear()
        model.train()
        model.set_is_first_microbatch()
        forward_backward(model, batches)
        out["calls"].append({n: list(m.calls) for n, m in linears.items()})
        model.set_is_first_microbatch()
        out["logits"].append(_logits(model, tokens))
        fresh = build_model(settings, use_te=True, fp8=fp8)
        fresh.load_state_dict(model.state_dict())
        out["fresh"].append(_logits(fresh, tokens))
        with torch.no_grad():  # an update large enough that a stale FP8 copy shows in the logits
            for m in linears.values():
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.5)
    torch.save(out.pop("calls"), f"{out_path}.calls.rank{dist.get_rank()}")
    _save_if_writer(out, Path(out_path))


def te_row_lora_job(out_path: str) -> None:
    """The TE row-parallel LoRA linear under TP=2 with sequence parallelism (tests/te_standin.py in
    place of TE), next to the local LoRA linear with the same weights. Saves both linears' LoRA
    gradients after the TP sums of training.grads, gathered to full tensors."""
    import te_standin
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig

    from relaxrec_megatron.parallel.distributed import init_distributed

    init_distributed(2, 1)
    te_standin.install()
    from relaxrec_megatron.model.lora_linear import LoraRowParallelLinear, te_linear_classes

    _, te_row = te_linear_classes()
    config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, params_dtype=torch.float32,
                                 use_cpu_initialization=True)
    tp, rank = 2, ps.get_tensor_model_parallel_rank()
    kw = dict(config=config, init_method=torch.nn.init.zeros_, lora_modules=("down",), lora_ranks={"down": 3},
              loops=(0,), bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False)
    g = torch.Generator().manual_seed(0)
    weight, A, B = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
    x = torch.randn(4, 1, 8, generator=g)  # (sequence, batch, hidden): full sequence, hidden split over TP
    probe = torch.randn(4, 1, 6, generator=g)  # d loss / d output
    cols = slice(rank * 4, (rank + 1) * 4)
    rows = slice(rank * 2, (rank + 1) * 2)  # this rank's slice of the sequence after the reduce-scatter
    grads = {}
    for name, cls in (("local", LoraRowParallelLinear), ("te", te_row)):
        lin = cls(8, 6, **kw)
        with torch.no_grad():
            lin.weight.copy_(weight[:, cols])
            lin.lora.lora_A["down_0"].copy_(A[:, cols])
            lin.lora.lora_B["down_0"].copy_(B)
        out, _ = lin(x[..., cols].clone().requires_grad_())
        (out * probe[rows]).sum().backward()
        a, b = lin.lora.lora_A["down_0"], lin.lora.lora_B["down_0"]
        for p in lin.tp_summed_grads:
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        full_a = [torch.empty_like(a.grad) for _ in range(tp)]
        dist.all_gather(full_a, a.grad.contiguous(), group=ps.get_tensor_model_parallel_group())
        grads[name] = {"A": torch.cat(full_a, dim=1), "B": b.grad.clone()}
    expected_A = (probe.reshape(4, 6) @ B).t() @ x.reshape(4, 8)  # plain torch, one process
    expected_B = probe.reshape(4, 6).t() @ (x.reshape(4, 8) @ A.t())
    if rank == 0:
        torch.save({**grads, "expected": {"A": expected_A, "B": expected_B}}, out_path)


def sync_job(config_path: str, overrides: list[str], out_path: str) -> None:
    """`relaxrec train` with each step's host synchronisations recorded (tests/syncs.py): saves, per
    step, the code sites that asked for a device value."""
    import os

    from syncs import recording_syncs

    from relaxrec_megatron.training.run import train_entry
    from relaxrec_megatron.training.trainer import Trainer

    per_step = []
    real = Trainer.train_step

    def recorded(self):
        with recording_syncs() as sites:
            rec = real(self)
        per_step.append(sites)
        return rec

    Trainer.train_step = recorded
    rank = int(os.environ["RANK"])  # train_entry leaves the process group when it is done
    train_entry(config_path, overrides)
    torch.save(per_step, f"{out_path}.rank{rank}.pt")
