"""What ships inside the package: the run configs (`configs/*.yaml`) and the public config.json of
the paper's models (`configs/models/*.json`), found by name wherever the package is installed. A
source checkout has the same folder at its top, as `configs/`."""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = CONFIGS / "models"


def run_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def run_config(name: str) -> Path | None:
    """The shipped run config called `name` (with or without .yaml), or None."""
    path = CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if "/" not in name and path.is_file() else None


def model_config(name: str) -> Path | None:
    """The shipped config.json of model `name` (gemma-2b, tinyllama-1.1b, ...), or None."""
    path = MODELS / f"{name}.json"
    return path if "/" not in name and path.is_file() else None


# hub ids of the shipped models: their config.json is read from the package, so planning and
# counting work offline
HUB_IDS = {"google/gemma-2b": "gemma-2b", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": "tinyllama-1.1b",
           "EleutherAI/pythia-1b": "pythia-1b", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
           "builtin:smollm2-135m": "smollm2-135m"}


def hf_config(model: str) -> dict:
    """config.json of a checkpoint folder, a config.json path, a shipped model (by name or hub id) or,
    with network, any hub repo."""
    import json

    from .errors import UserError

    path, shipped = Path(model).expanduser(), model_config(HUB_IDS.get(model, model))
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and shipped is not None:
        path = shipped
    elif not path.exists() and model.count("/") == 1 and not model.startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model, "config.json"))
        except Exception as e:
            raise UserError(f"cannot fetch config.json of {model!r} ({type(e).__name__}); pass a local config.json") from None
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in MODELS.glob("*.json")))
        raise UserError(f"{model}: no such config.json, folder or shipped model ({names})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
