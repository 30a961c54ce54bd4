"""Uptraining on CPU (gloo, fp32, tiny models): DeepSpeed ZeRO vs DP=1, pipeline + TP, bf16,
crash-safe checkpoints, non-finite steps, stops agreed by every rank. Resuming a stopped run with
the losses of an uninterrupted one: test_launch, through torchrun."""


import json
import shutil
from pathlib import Path

import pytest
import torch
from megatron_jobs import train_job
from tiny import cache_repo, save_run_config, save_token_corpus

from relaxrec_megatron.model.steps import latest_checkpoint
from relaxrec_megatron.parallel.local_world import run_world


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_token_corpus(root / "data")
    save_run_config(root, tiny_dirs["llama"])
    return root


def run(root: Path, name: str, world: int, overrides=(), fresh=True, **kw) -> list[dict]:
    out = root / name
    if fresh:
        shutil.rmtree(root / f"run-{name}", ignore_errors=True)
    overrides = [f"run.output_dir={root}/run-{name}", *overrides]
    run_world(train_job, world, str(root / "c.yaml"), overrides, str(out), kw.get("nan_steps", ()),
              kw.get("crash_in_save_at"), kw.get("sigterm_at"), kw.get("grad_probe", False), kw.get("delays", ()),
              timeout=600)
    return torch.load(f"{out}.rank0.pt", weights_only=False)


def planned_bytes_match(root: Path, name: str, world: int, overrides=()) -> None:
    """relaxrec plan's parameter and optimizer-state bytes on every rank equal what that rank allocated."""
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.planning import plan

    cfg = load_config(root / "c.yaml", list(overrides))
    stages = plan(cfg, world)["stages"]
    for rank in range(world):
        planned = stages[rank // (world // cfg.parallel.pp)]  # ranks: TP, then DP, then PP
        measured = torch.load(root / f"{name}.alloc.rank{rank}.pt")
        assert {k: planned[k] for k in measured} == measured, (rank, planned, measured)


def planned_traffic_matches(root: Path, name: str, world: int, overrides=()) -> None:
    """relaxrec plan's data-parallel bytes per step are what every rank handed DeepSpeed's collectives in
    each step (a skipped step sends no update)."""
    from relaxrec_megatron.training.config import load_config
    from relaxrec_megatron.training.planning import plan

    planned = plan(load_config(root / "c.yaml", list(overrides)), world)["dp_traffic"]
    steps = torch.load(root / f"{name}.steps.rank0.pt", weights_only=False)
    for rank in range(world):
        traffic = torch.load(root / f"{name}.traffic.rank{rank}.pt")
        assert len(traffic) == len(steps) > 0
        for step, ops in zip(steps, traffic):
            ops = {k: v for k, v in ops.items() if not k.endswith("(scalars)")}  # norms and flags
            if step["finite"]:
                assert sum(op["bytes"] for op in ops.values()) == planned["bytes"], (rank, step["step"], ops, planned)
                assert sum(op["wire"] for op in ops.values()) == pytest.approx(planned["wire"], rel=1e-12)


def losses(records):
    return torch.tensor([r["loss"] for r in records], dtype=torch.float64)


@pytest.fixture(scope="module")
def baseline(setup):
    return run(setup, "dp1", 1)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_over_two_ranks_matches_one_rank(setup, baseline, stage):
    got = run(setup, f"dp2z{stage}", 2, [f"parallel.zero_stage={stage}"])
    planned_bytes_match(setup, f"dp2z{stage}", 2, [f"parallel.zero_stage={stage}"])
    planned_traffic_matches(setup, f"dp2z{stage}", 2, [f"parallel.zero_stage={stage}"])
    rel = ((losses(got) - losses(baseline)).abs() / losses(baseline).abs()).max().item()
    assert rel <= 1e-5, rel
    # optimizer state bytes per rank fall as 1/DP
    assert got[-1]["optimizer_state_bytes"] == pytest.approx(baseline[-1]["optimizer_state_bytes"] / 2, rel=0.02)
    assert losses(baseline)[-3:].mean() < losses(baseline)[:3].mean()  # it learns


@pytest.mark.slow
def test_planned_bytes_without_zero(setup, baseline):
    # ZeRO-0 keeps no fp32 copy of fp32 weights and its moments are whole on every rank (at any DP);
    # ZeRO-1/2 at DP=2, TP, PP and bf16 are checked in their own tests, ZeRO-1 at DP=1 here
    planned_bytes_match(setup, "dp1", 1)
    run(setup, "z0-dp2", 2, ["parallel.zero_stage=0", "optim.train_steps=1"])
    planned_bytes_match(setup, "z0-dp2", 2, ["parallel.zero_stage=0"])
    planned_traffic_matches(setup, "z0-dp2", 2, ["parallel.zero_stage=0"])


@pytest.mark.slow
def test_exit_training_with_zero_earlier_weights_is_the_trainer_without_exits(setup, baseline):
    # the exit path runs (both loops' exits, distilled from the final loop) but adds 0 x each earlier loss
    got = run(setup, "exit0", 1, ["exit.enabled=true", "exit.weights=[0, 1]"])
    assert [r["loss"] for r in got] == [r["loss"] for r in baseline]
    assert [r["loop2_loss"] for r in got] == [r["lm_loss"] for r in baseline]
    assert all(r["loop1_loss"] != r["loop2_loss"] for r in got)


@pytest.mark.slow
def test_pipeline_and_tensor_parallel_match_one_rank(setup, baseline):
    got = run(setup, "pp2", 2, ["parallel.pp=2"])
    assert ((losses(got) - losses(baseline)).abs() / losses(baseline)).max() <= 1e-5
    planned_bytes_match(setup, "pp2", 2, ["parallel.pp=2"])
    got = run(setup, "tp2", 2, ["parallel.tp=2"])
    planned_bytes_match(setup, "tp2", 2, ["parallel.tp=2"])
    assert ((losses(got) - losses(baseline)).abs() / losses(baseline)).max() <= 1e-5
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in baseline], rel=1e-5)


@pytest.mark.slow
@pytest.mark.oldest
def test_training_checkpoint_exports_to_hf_with_the_same_logits(setup, tmp_path, capsys):
    from megatron_jobs import load_job
    from transformers import AutoModelForCausalLM

    from relaxrec_megatron import register
    from relaxrec_megatron.model.convert_megatron import megatron_to_relaxed

    register()

    run(setup, "export", 2, ["checkpoint.save_every=10"])
    model_ckpt = latest_checkpoint(setup / "run-export" / "checkpoints") / "model"
    for states in (model_ckpt.parent / "optimizer").rglob("*model_states.pt"):  # the weights are stored once
        assert torch.load(states, weights_only=False)["module"] == {}
    megatron_to_relaxed(model_ckpt, tmp_path / "hf")
    tokens = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    run_world(load_job, 2, str(tmp_path / "hf"), 1, 2, str(model_ckpt), tokens, str(tmp_path / "mcore.pt"),
              timeout=600)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(tokens).logits - torch.load(tmp_path / "mcore.pt")).abs().max() <= 1e-4
    # export takes the run by any of its names, as eval does, and refuses other folders in one line
    from safetensors.torch import load_file

    from relaxrec_megatron.cli.main import main
    from relaxrec_megatron.model.reference import ACCEPTED

    weights = lambda folder: {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    expected = weights(tmp_path / "hf")
    run_dir = setup / "run-export"
    for i, ref in enumerate([run_dir, run_dir / "checkpoints", model_ckpt.parent, model_ckpt]):
        assert main(["export", "hf-relaxed", str(ref), str(tmp_path / f"r{i}"), "--quiet"]) == 0
        got = weights(tmp_path / f"r{i}")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert main(["export", "hf-unrolled", str(run_dir / "checkpoints"), str(tmp_path / "unrolled"), "--quiet"]) == 0
    assert (tmp_path / "unrolled" / "config.json").is_file()
    capsys.readouterr()
    assert main(["export", "hf-unrolled", str(run_dir / "init"), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"relaxrec export: error: {run_dir / 'init'}: not a checkpoint; pass {ACCEPTED}"]
    assert not (tmp_path / "bad").exists()
    # a new run trains on from this one: model.relaxed takes the run, exported once into RUN/init/student
    records = run(setup, "from-run", 1, [f"model.relaxed={run_dir / 'checkpoints'}", "optim.train_steps=2"])
    got = weights(setup / "run-from-run" / "init" / "student")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert [r["step"] for r in records if "loss" in r][-1] == 2


@pytest.mark.slow
def test_a_hub_id_as_model_relaxed_is_fetched_by_rank_0_alone_and_copied_into_the_run(setup, tiny_dirs, tmp_path):
    """Rank 0 fetches the relaxed model into RUN/init/student; the other rank, whose hub cache is empty
    and offline (a node of its own), trains from that copy without asking the hub."""
    from megatron_jobs import hub_train_job
    from safetensors.torch import load_file

    from relaxrec_megatron.hf.convert import RecursionSpec, convert_to_relaxed

    convert_to_relaxed(str(tiny_dirs["llama"]), tmp_path / "relaxed", RecursionSpec(loops=2, rank=4), progress=False)
    cache_repo(tmp_path / "hub", "org/tiny-relaxed", tmp_path / "relaxed")
    (tmp_path / "empty").mkdir()
    run_dir = setup / "run-hub"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_world(hub_train_job, 2, str(setup / "c.yaml"),
              [f"run.output_dir={run_dir}", "model.relaxed=org/tiny-relaxed", "optim.train_steps=2"],
              str(setup / "hub"), str(tmp_path / "hub"), str(tmp_path / "empty"), timeout=600)
    assert [r["step"] for r in torch.load(setup / "hub.rank1.pt", weights_only=False) if "loss" in r][-1] == 2
    student = run_dir / "init" / "student"
    weights = lambda folder: {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    want, got = weights(tmp_path / "relaxed"), weights(student)
    assert want and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((run_dir / "init" / "recipe.json").read_text())["student"] == {"relaxed": "org/tiny-relaxed"}
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.slow
def test_a_crash_mid_save_leaves_the_previous_checkpoint(setup):
    with pytest.raises(RuntimeError, match="exited with codes"):
        run(setup, "crash", 1, ["checkpoint.save_every=3"], crash_in_save_at=6)
    ckpt = setup / "run-crash" / "checkpoints"
    assert latest_checkpoint(ckpt).name == "step_00000003"
    resumed = run(setup, "crash", 1, ["checkpoint.save_every=3"], fresh=False)
    assert resumed[0]["step"] == 4 and resumed[-1]["step"] == 10


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(setup):
    # the last rank gets SIGTERM after step 4; the flag is reduced over the world at the end of step 5
    got = run(setup, "sigterm", 2, ["checkpoint.save_every=100"], sigterm_at=4)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(setup / "run-sigterm" / "checkpoints").name == "step_00000005"


@pytest.mark.slow
def test_once_training_runs_a_collective_gives_up_after_the_step_limit_and_a_save_after_its_own(setup):
    # 3 s for the collectives of a step once the first one is done; the stall watch kept out of it
    limits = ["parallel.collective_timeout_min=0.05", "parallel.stall_floor_s=1000", "optim.train_steps=4",
              "checkpoint.save_every=2"]
    # the first step (start-up's limit) and a save (checkpoint.save_timeout_min) may take longer
    got = run(setup, "limits", 2, limits, delays=[("backward", 1, 1, 5), ("saved", 2, 1, 5)])
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    t0 = __import__("time").time()
    with pytest.raises(RuntimeError, match="(?i)timed? ?out"):  # gloo: "Timed out waiting 3000ms ..."
        run(setup, "limits-step", 2, limits, delays=[("backward", 3, 1, 20)])
    assert __import__("time").time() - t0 < 60


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [(1, []), (2, ["parallel.zero_stage=2", "model.dtype=bf16"])],
                         ids=["dp1", "dp2-zero2-bf16"])
def test_non_finite_steps_are_skipped_and_then_stop(setup, world, layout):
    # two in a row are skipped and training goes on; the third in a row stops the run. ZeRO-2 keeps
    # its reduced gradients outside .grad: a skipped step must not hand them to the next one
    name = f"nan-{world}"
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        run(setup, name, world, ["optim.max_nonfinite_in_a_row=3", *layout], nan_steps=(3, 4, 6, 7, 8))
    got = torch.load(setup / f"{name}.steps.rank0.pt", weights_only=False)
    planned_traffic_matches(setup, name, world, ["optim.max_nonfinite_in_a_row=3", *layout])
    assert [r["finite"] for r in got] == [True, True, False, False, True, False, False]
    assert got[-1]["skipped"] == 4 and got[4]["loss"] == got[4]["loss"]  # step 5 finite again



def test_micro_batches_land_on_the_requested_device():
    from relaxrec_megatron.training.data import micro_batches

    samples = [{k: torch.full((4,), i) for k in ("tokens", "labels", "loss_mask")} for i in range(8)]
    got = micro_batches(samples, 0, 8, 2, dp_rank=1, dp_size=2, device="meta")
    assert len(got) == 2 and all(t.device.type == "meta" for b in got for t in b.values())
    cpu = micro_batches(samples, 0, 8, 2, dp_rank=1, dp_size=2)
    assert cpu[0]["tokens"][:, 0].tolist() == [4, 5] and cpu[1]["tokens"][:, 0].tolist() == [6, 7]


@pytest.mark.slow
def test_a_failed_conversion_on_rank_0_fails_every_rank_at_once(setup, tiny_dirs, tmp_path):
    # the other ranks wait for rank 0's conversion on a group of their own (long timeout): they must
    # hear of its failure instead of waiting that timeout out
    (tmp_path / "weightless").mkdir()  # a config.json passes the checks before the conversion; no weights
    shutil.copy(tiny_dirs["llama"] / "config.json", tmp_path / "weightless")
    t0 = __import__("time").time()
    with pytest.raises(RuntimeError, match="no \\*.safetensors or \\*.bin weights found"):
        run(setup, "badsource", 2, [f"model.source={tmp_path}/weightless"])
    assert __import__("time").time() - t0 < 120


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.pp=2"], ["parallel.tp=2"], [],
                                    ["parallel.zero_stage=2", "parallel.grad_reduce_dtype=fp32"]],
                         ids=["pp2", "tp2", "dp2", "dp2-zero2-fp32-reduce"])
def test_bf16_training_accumulates_in_fp32_and_tracks_fp32(setup, baseline, layout):
    # bf16 weights, fp32 master weights and gradient accumulation. ZeRO-1 is DeepSpeed's
    # BF16_Optimizer: every gradient goes into its fp32 buffer as it arrives (whichever schedule runs
    # backward), and the gradient contracts run on those buffers. ZeRO-2 accumulates its partitions in
    # fp32. Over DP, the gradients are reduced in bf16 (half the bytes) or in fp32
    name = f"bf16-{'-'.join(layout) or 'dp2'}"
    got = run(setup, name, 2, ["model.dtype=bf16", *layout], grad_probe=True)
    planned_bytes_match(setup, name, 2, ["model.dtype=bf16", *layout])
    planned_traffic_matches(setup, name, 2, ["model.dtype=bf16", *layout])
    for rank in range(2):
        for probe in torch.load(setup / f"{name}.grads.rank{rank}.pt"):
            if "parallel.zero_stage=2" not in layout:
                assert probe["in_grad"] == 0 and probe["in_fp32_buffer"] == probe["params"], probe
    rel = ((losses(got) - losses(baseline)).abs() / losses(baseline)).max().item()
    assert rel <= 5e-3, rel  # bf16 rounding of weights and activations; measured 4e-4 to 8e-4
    assert all(r["finite"] for r in got) and losses(got)[-3:].mean() < losses(got)[:3].mean()



# where DeepSpeed's step itself reads a device value (deepspeed 0.19: runtime/utils.py and its
# optimizers): whether the gradient norm is finite, and, in BF16_Optimizer, whether to clip; torch's
# AdamW reads its step counters, which stay on the host on GPUs too
DEEPSPEED_READS = {"deepspeed/runtime/utils.py is_invalid_grad_norm", "deepspeed/runtime/utils.py clip_tensors_by_global_norm",
                   "deepspeed/runtime/bf16_optimizer.py step", "deepspeed/runtime/zero/stage_1_and_2.py _optimizer_step"}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["parallel.tp=2", "exit.enabled=true"], ["model.dtype=bf16"]],
                         ids=["tp2-exits-fp32", "dp2-bf16"])
def test_a_step_waits_for_the_device_once_besides_deepspeed(setup, overrides):
    """Every host read of a device value during a training step (tests/syncs.py: .item, bool/float
    of a tensor, boolean-mask indexing, tolist): the trainer's one agree all-reduce, then only
    DeepSpeed's own; with KD and with early exits."""
    from megatron_jobs import sync_job

    out = setup / f"syncs-{overrides[0]}"
    run_world(sync_job, 2, str(setup / "c.yaml"), [f"run.output_dir={out}-run", "optim.train_steps=3", *overrides],
              str(out), timeout=600)
    for rank in range(2):
        for step, sites in enumerate(torch.load(f"{out}.rank{rank}.pt")):
            ours = [s for s in sites if s.startswith("relaxrec_megatron/")]
            assert len(ours) == 1 and ours[0].endswith("_agree tolist"), (rank, step, sites)
            theirs = {s.split(":")[0] + " " + s.split(" ")[1] for s in sites if s not in ours}
            assert theirs and theirs <= DEEPSPEED_READS, (rank, step, sites)


@pytest.mark.slow
def test_resuming_on_another_data_parallel_size_is_refused_before_loading(setup):
    run(setup, "dp-change", 2, ["optim.train_steps=2", "checkpoint.save_every=2"])
    with pytest.raises(RuntimeError, match=r"was saved with tp=1 pp=1 dp=2 zero_stage=1 and this run has tp=1 pp=1 "
                                           r"dp=1 zero_stage=1: its optimizer state is partitioned"):
        run(setup, "dp-change", 1, ["optim.train_steps=4"], fresh=False)
