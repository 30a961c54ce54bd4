"""relaxrec_megatron: pretrained LLM -> Relaxed Recursive Transformer, uptrained with megatron-core.

Importing the package registers the relaxed recursive config with transformers' AutoConfig (so that
configs and tokenizers of relaxed checkpoints load); `relaxrec_megatron.register()` also registers
the model with AutoModelForCausalLM (reading `relaxrec_megatron.RelaxedRecursiveForCausalLM` does
too). The model's code is imported only then: the CLI and every training process start without
transformers' modeling code. Relaxed checkpoints also carry the model as remote code, which
`trust_remote_code=True` loads without this package.
"""

from .startup import hold_stop_signals_if_training

hold_stop_signals_if_training()  # before the imports that take seconds

from .stack import check_stack  # noqa: E402

check_stack()  # torch, transformers, megatron-core and DeepSpeed inside their supported ranges

from transformers import AutoConfig  # noqa: E402

from .hf.configuration_relaxrec import RelaxedRecursiveConfig  # noqa: E402

__version__ = "0.1.0"

AutoConfig.register(RelaxedRecursiveConfig.model_type, RelaxedRecursiveConfig, exist_ok=True)

__all__ = ["RelaxedRecursiveConfig", "RelaxedRecursiveForCausalLM", "register", "__version__"]


def register() -> None:
    """Registers the relaxed recursive model with AutoModelForCausalLM (idempotent)."""
    from transformers import AutoModelForCausalLM

    from .hf.modeling_relaxrec import RelaxedRecursiveForCausalLM

    AutoModelForCausalLM.register(RelaxedRecursiveConfig, RelaxedRecursiveForCausalLM, exist_ok=True)


def __getattr__(name: str):
    if name == "RelaxedRecursiveForCausalLM":
        register()
        from .hf.modeling_relaxrec import RelaxedRecursiveForCausalLM

        return RelaxedRecursiveForCausalLM
    raise AttributeError(f"module 'relaxrec_megatron' has no attribute {name!r}")
