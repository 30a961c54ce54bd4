"""The versions relaxrec runs on, checked when the package is imported.

pyproject.toml declares the supported range of each package whose API or numerics the code depends on
(tested at both ends: tools/constraints/). pip enforces those ranges on install; this check catches what
pip did not see: a `--no-deps` or `--target` install, a container's preinstalled packages, a checkout
on PYTHONPATH beside an installed copy. Outside a range the code can be silently wrong (transformers
5.12 loads a registered model's weights and then re-initialises them), so it refuses. The ranges are
read from the package's own metadata, so pyproject.toml stays their one source. Standard library and
`packaging` only: it runs before the imports that take seconds.
"""

from __future__ import annotations

import sys
from importlib import metadata

from .startup import is_cli

DIST = "relaxrec-megatron"
CHECKED = ("torch", "transformers", "megatron-core", "deepspeed")


def declared_ranges() -> dict[str, str]:
    """{package: specifier} for CHECKED, from this package's installed metadata ({} without it)."""
    from packaging.requirements import Requirement

    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for line in requires:
        req = Requirement(line)
        if req.name in CHECKED and req.marker is None:
            ranges[req.name] = str(req.specifier)
    return ranges


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None  # a missing package fails at its own import, with its own message


def unsupported(ranges: dict[str, str], versions: dict[str, str | None]) -> str | None:
    """The first package whose version is outside its range, as a line that says how to fix it."""
    from packaging.specifiers import SpecifierSet

    for name, spec in ranges.items():
        have = versions.get(name)
        if have is not None and not SpecifierSet(spec).contains(have, prereleases=True):
            return (f"{name} {have} is outside the range relaxrec supports ({spec}); install one inside it: "
                    f"pip install '{name}{spec}'")
    return None


def check_stack() -> None:
    ranges = declared_ranges()
    problem = unsupported(ranges, {name: installed(name) for name in ranges})
    if problem is None:
        return
    if is_cli(getattr(sys, "orig_argv", [])):
        print(f"relaxrec: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(f"relaxrec_megatron: {problem}")
