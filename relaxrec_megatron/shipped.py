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
