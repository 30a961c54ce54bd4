"""Argument groups shared by several commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..recursion import InitMethod, RecursionSpec, Strategy
from ..recursion.linears import LINEARS
from ..recursion.lora import LoraInit


def parse_rank(text: str) -> int:
    if text in ("full", "-1"):
        return -1
    try:
        r = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an integer >= 0 or 'full', got {text!r}") from None
    if r < 0:
        raise argparse.ArgumentTypeError(f"rank must be >= 0 or 'full', got {r}")
    return r


def parse_module_rank(text: str) -> tuple[str, int]:
    module, sep, rank = text.partition("=")
    if not sep or module not in LINEARS:
        raise argparse.ArgumentTypeError(f"expected MODULE=RANK with MODULE in {','.join(LINEARS)}, got {text!r}")
    return module, parse_rank(rank)


def parse_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t for t in text.split(",") if t)
    bad = [t for t in targets if t not in LINEARS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown LoRA target {bad[0]!r}; choose from {','.join(LINEARS)}")
    return targets


def add_recursion_args(p: argparse.ArgumentParser, rank_help: str = "LoRA rank for every target (0: pure recursive; 'full')") -> None:
    g = p.add_argument_group("recursion")
    g.add_argument("--loops", type=int, default=2, help="B: times the shared block runs (must divide the layer count)")
    g.add_argument("--strategy", choices=[s.value for s in Strategy], default="cycle")
    g.add_argument("--init", choices=[m.value for m in InitMethod], default="average", help="shared-layer init")
    g.add_argument("--module-rank", type=parse_module_rank, action="append", default=[], metavar="MODULE=RANK",
                   help="per-module rank override, repeatable (e.g. --module-rank down=128)")
    g.add_argument("--lora-init", choices=[m.value for m in LoraInit], default="svd")
    g.add_argument("--targets", type=parse_targets, default=None, help=f"comma list of LoRA targets (default: all of {','.join(LINEARS)} the model has)")
    g.add_argument("--per-layer-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="keep every unrolled layer's own norm weights (default: with --rank full, so that it is "
                        "the source exactly; shared otherwise)")
    g.add_argument("--per-layer-biases", action=argparse.BooleanOptionalAction, default=None,
                   help="keep every unrolled layer's own linear biases (default: as --per-layer-norms)")


def recursion_spec(args: argparse.Namespace, rank: int) -> RecursionSpec:
    if args.loops < 1:
        raise UserError(f"--loops must be >= 1, got {args.loops}")
    # full rank on every linear is the source exactly only with each layer's own norms and biases
    full = rank == -1 and not args.module_rank and args.targets is None
    norms = full if args.per_layer_norms is None else args.per_layer_norms
    biases = full if args.per_layer_biases is None else args.per_layer_biases
    if full and (args.per_layer_norms is None or args.per_layer_biases is None) and args.command == "convert" \
            and not getattr(args, "quiet", False):
        print("[convert] --rank full: every unrolled layer keeps its own norms and biases, so the result is the "
              "source exactly (--no-per-layer-norms --no-per-layer-biases share them)", file=sys.stderr)
    return RecursionSpec(
        loops=args.loops, strategy=args.strategy, init=args.init, rank=rank, module_ranks=dict(args.module_rank),
        lora_init=args.lora_init, targets=args.targets, share_norms=not norms, share_biases=not biases,
    )


def served_model(name: str, workdir: Path, tokenizer: str | None = None):
    """The serving engine's input (evaluation.models.resolve: a relaxed HF folder, or a Megatron
    checkpoint exported under `workdir`); an original model is refused in one line."""
    from ..evaluation.models import resolve

    return resolve(name, workdir, tokenizer, use="serve")


def resolve_device(device: str | None) -> str:
    """cpu or a CUDA device this machine has (default: cuda when present, else cpu). Asks CUDA itself:
    a probe tensor would not fail where the CPU mode of megatron-core maps cuda to the CPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    fix = "; pass cpu or a CUDA device this machine has"
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device}: {str(e).splitlines()[0]}{fix}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA devices{fix}")
    elif parsed.type != "cpu":
        try:
            torch.empty(0, device=parsed)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"--device {device}: {str(e).splitlines()[0]}{fix}") from None
    return device


def exit_threshold(text: str, model: str | None, criterion: str) -> float:
    """A confidence threshold in [0, 1], or `auto`: the one `relaxrec eval exits` stored in the model."""
    if text == "auto":
        if criterion not in ("maxprob", "margin"):
            raise UserError("--threshold auto needs an exit rule: pass --exit maxprob or --exit margin")
        if model is None:
            raise UserError("--threshold auto reads the calibration stored in --model; pass --model")
        from ..evaluation.exits import stored_threshold

        return stored_threshold(model, criterion)
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--threshold {text!r}: a number in [0, 1] or auto") from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--threshold {value:g}: a confidence (max-prob or top-2 margin) lies in [0, 1]")
    return value


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'relaxrec-megatron[plot]' (or matplotlib)") from None


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the matrix work (default: the cores this process may run on); fewer "
                        "where other work shares them, since spinning threads then wait on each other")


def apply_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads: `threads`, or the cores in this process's affinity mask."""
    import torch

    allowed = len(os.sched_getaffinity(0))
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads or allowed)
    return torch.get_num_threads()
