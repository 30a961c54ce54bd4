"""The supported range of torch, transformers, megatron-core and DeepSpeed: pyproject's pins admit both
tested ends (tools/constraints/) and the torch of NVIDIA's container, the installed metadata carries
them, and a package outside its range stops the import in one line before anything runs."""

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from relaxrec_megatron.stack import CHECKED, declared_ranges, unsupported

ROOT = Path(__file__).parents[1]
NGC_25_12_TORCH = "2.10.0a0+b4e4ee81d3"  # the build in NVIDIA's PyTorch container 25.12


def pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: str(r.specifier) for r in map(Requirement, deps) if r.name in CHECKED}


def constrained(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if "==" in line)


def test_the_pins_admit_both_tested_ends_and_the_containers_torch():
    ranges = pins()
    assert set(ranges) == set(CHECKED)
    ends = sorted((ROOT / "tools" / "constraints").glob("*.txt"))
    assert [p.name for p in ends] == ["newest.txt", "ngc-25.12.txt"]
    torches = []
    for path in ends:
        versions = constrained(path)
        torches.append(versions["torch"])
        assert unsupported(ranges, versions) is None, path.name
    assert sorted(torches) == ["2.10.0", "2.15.0"]
    assert unsupported(ranges, {"torch": NGC_25_12_TORCH}) is None
    for outside in ({"torch": "2.9.1"}, {"torch": "2.16.0"}, {"torch": "2.16.0a0"}, {"transformers": "5.12.0"}):
        assert unsupported(ranges, outside) is not None, outside


def test_the_installed_metadata_carries_the_pyprojects_ranges():
    assert declared_ranges() == pins()


def test_an_unsupported_transformers_stops_the_import_in_one_line(tmp_path):
    dist = tmp_path / "transformers-5.12.0.dist-info"  # what an older install leaves first on the path
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.12.0\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    spec = pins()["transformers"]
    cli = subprocess.run([sys.executable, "-m", "relaxrec_megatron.cli.main", "params", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr.splitlines() == [f"relaxrec: error: transformers 5.12.0 is outside the range relaxrec supports "
                                       f"({spec}); install one inside it: pip install 'transformers{spec}'"]
    lib = subprocess.run([sys.executable, "-c", "import relaxrec_megatron"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert lib.returncode == 1
    assert lib.stderr.splitlines()[-1].startswith("ImportError: relaxrec_megatron: transformers 5.12.0 is outside")
