"""HF checkpoint -> relaxed recursive HF checkpoint, streamed one weight matrix at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..files import atomic_output_dir
from ..recursion import SharingPlan, init_shared, shared_init_sources
from ..recursion.lora import SvdMethod, lora_factors
from ..recursion.params import LayerShapes
from ..recursion.spec import RecursionSpec
from .arch import ArchAdapter, adapter_for
from .checkpoint import CheckpointError, CheckpointReader, ShardedWriter
from .configuration_relaxrec import RelaxedRecursiveConfig
from .folder import write_hf_folder_files
from .layout import GLOBAL_PATHS, is_linear_weight, is_per_layer, layer_path, lora_paths

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
REPORT_FILE = "relaxation_report.json"


class ConvertError(UserError):
    pass


def _shapes(adapter: ArchAdapter) -> LayerShapes:
    return LayerShapes(
        linears=adapter.linear_shapes(), linear_bias={m: adapter.linear_has_bias(m) for m in adapter.linears()},
        hidden=adapter.hidden, norm_has_bias=adapter.norm_has_bias(), vocab=adapter.vocab, tied_embeddings=adapter.tied,
    )


def layer_shapes(cfg: dict) -> tuple[ArchAdapter, LayerShapes]:
    adapter = adapter_for(cfg)
    return adapter, _shapes(adapter)


def relaxed_config(adapter: ArchAdapter, plan: SharingPlan, spec: RecursionSpec, ranks: dict[str, int],
                   source: str, dtype: torch.dtype) -> RelaxedRecursiveConfig:
    config = RelaxedRecursiveConfig(
        **adapter.arch_fields(),
        num_hidden_layers=plan.num_layers, num_shared_layers=plan.num_shared, num_loops=plan.num_loops,
        recursion_strategy=plan.strategy.value, layer_plan=[list(p) for p in plan.layout()],
        shared_init=spec.init.value, lora_ranks=ranks, lora_init=spec.lora_init.value,
        share_norms=spec.share_norms, share_biases=spec.share_biases,
        source_model=source, source_model_type=adapter.cfg["model_type"], source_config=adapter.cfg,
        dtype=dtype,
    )
    config.auto_map = {"AutoConfig": "configuration_relaxrec.RelaxedRecursiveConfig",
                       "AutoModelForCausalLM": "modeling_relaxrec.RelaxedRecursiveForCausalLM"}
    return config


def check_source(reader: CheckpointReader, adapter: ArchAdapter) -> None:
    """Fails before any work if a tensor is missing or has a shape config.json does not imply."""
    expected = adapter.expected_hf_shapes()
    missing = [n for n in expected if n not in reader]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.root}: missing tensor {missing[0]!r}{more}; the weights do not match config.json")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise CheckpointError(f"{reader.root}: {name} has shape {reader.shape(name)} but config.json implies {shape}")


def resolve_dtype(name: str, reader: CheckpointReader, adapter: ArchAdapter) -> torch.dtype:
    if name == "auto":
        return reader.dtype(adapter.global_names()["embed.weight"])
    if name not in DTYPES:
        raise ConvertError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def convert_to_relaxed(source: str, output: str | Path, spec: RecursionSpec, dtype: str = "auto",
                       overwrite: bool = False, progress: bool = True, svd: SvdMethod | str = SvdMethod.EXACT,
                       device: str | None = None) -> dict:
    """Writes the relaxed recursive checkpoint; returns its reconstruction report. svd and device: how
    and where the LoRA factors are computed (recursion.lora.lora_factors)."""
    svd = SvdMethod(svd)
    reader = CheckpointReader(source)
    adapter = adapter_for(reader.config)
    plan = SharingPlan(adapter.num_layers, spec.loops, spec.strategy)
    ranks = spec.ranks(adapter)
    out_dtype = resolve_dtype(dtype, reader, adapter)
    check_source(reader, adapter)
    config = relaxed_config(adapter, plan, spec, ranks, str(source), out_dtype)
    sources = shared_init_sources(plan, spec.init)
    rows: list[dict] = []
    cast = lambda d: {k: v.to(out_dtype) for k, v in d.items()}

    with atomic_output_dir(output, overwrite) as tmp:
        writer = ShardedWriter(tmp)
        glob = {}
        for canon, hf_name in adapter.global_names().items():
            glob[GLOBAL_PATHS[canon]] = reader.get(hf_name)
        writer.write("model-globals.safetensors", cast(glob))
        del glob
        bar = tqdm(total=plan.num_layers * len(adapter.linear_shapes()), unit="matrix", desc="convert",
                   disable=not progress, dynamic_ncols=True)
        for k in range(plan.num_shared):  # one shared layer and its B tied layers at a time
            group, srcs = plan.tied_layers(k), sources[k]
            needed = sorted(set(group) | set(srcs))
            out: dict[str, torch.Tensor] = {}
            for u in range(len(adapter.layer_units(0))):
                canon_by_layer = {}
                for l in needed:
                    unit = adapter.layer_units(l)[u]
                    canon_by_layer[l] = unit.to_canonical([reader.get(n) for n in unit.hf_names])
                for canon in canon_by_layer[needed[0]]:
                    per_layer = {l: canon_by_layer[l][canon] for l in needed}
                    shared = init_shared([per_layer[s] for s in srcs])
                    if is_per_layer(canon, spec.share_norms, spec.share_biases):
                        for l in group:
                            out[layer_path(canon, k, l, spec.share_norms, spec.share_biases)] = per_layer[l]
                    else:
                        out[layer_path(canon, k, group[0], spec.share_norms, spec.share_biases)] = shared
                    if is_linear_weight(canon):
                        module = canon.split(".")[0]
                        for l in group:
                            rows.append(_relax_one(out, per_layer[l], shared, module, k, l, plan, ranks, spec,
                                                   svd, device))
                            bar.update()
                del canon_by_layer
            writer.write(f"model-layer-{k:05d}.safetensors", cast(out))
        bar.close()
        writer.finish()
        write_hf_folder_files(tmp, json.loads(config.to_json_string()), reader.root)
        report = {
            "metric": "||W - (W' + BA)||_F / ||W||_F per unrolled layer and module (fp32, before the cast to the output dtype)",
            "source": str(source), "loops": plan.num_loops, "strategy": plan.strategy.value, "init": spec.init.value,
            "lora_init": spec.lora_init.value, "svd": svd.value, "ranks": ranks, "rows": rows,
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def _relax_one(out, W, shared, module, k, l, plan, ranks, spec, svd, device) -> dict:
    r = ranks.get(module, 0)
    row = {"layer": l, "shared": k, "loop": plan.loop_index(l), "module": module, "rank": r}
    if r == 0:
        row["rel_error"] = float(torch.linalg.matrix_norm(W.float() - shared) / torch.linalg.matrix_norm(W.float()).clamp_min(1e-30))
        return row
    gen = torch.Generator().manual_seed(7919 * l + sum(map(ord, module)))
    f = lora_factors(W, shared, r, spec.lora_init, gen, svd=svd, device=device)
    a_path, b_path = lora_paths(l, module)
    out[a_path], out[b_path] = f.A, f.B
    row["rel_error"] = f.rel_error
    return row


def format_report(report: dict) -> str:
    """One line per unrolled layer, one column per module."""
    modules = list(dict.fromkeys(r["module"] for r in report["rows"]))
    by_layer: dict[int, dict] = {}
    for r in report["rows"]:
        by_layer.setdefault(r["layer"], {"shared": r["shared"], "loop": r["loop"]})[r["module"]] = r["rel_error"]
    ranks = report["ranks"]
    lines = ["relative reconstruction error ||W - (W' + BA)||_F / ||W||_F  (ranks: "
             + ", ".join(f"{m}={ranks.get(m, 0)}" for m in modules) + ")",
             f"{'layer':>5} {'shared':>6} {'loop':>4} " + " ".join(f"{m:>8}" for m in modules) + f" {'mean':>8}"]
    for l in sorted(by_layer):
        e = by_layer[l]
        errs = [e[m] for m in modules]
        lines.append(f"{l:>5} {e['shared']:>6} {e['loop']:>4} " + " ".join(f"{x:>8.4f}" for x in errs)
                     + f" {sum(errs) / len(errs):>8.4f}")
    return "\n".join(lines)
