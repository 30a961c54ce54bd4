"""relaxrec_megatron: pretrained LLM -> Relaxed Recursive Transformer, uptrained with megatron-core.

Importing the package registers the relaxed recursive model with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .hf.configuration_relaxrec import RelaxedRecursiveConfig
from .hf.modeling_relaxrec import RelaxedRecursiveForCausalLM

__version__ = "0.1.0"

AutoConfig.register(RelaxedRecursiveConfig.model_type, RelaxedRecursiveConfig, exist_ok=True)
AutoModelForCausalLM.register(RelaxedRecursiveConfig, RelaxedRecursiveForCausalLM, exist_ok=True)

__all__ = ["RelaxedRecursiveConfig", "RelaxedRecursiveForCausalLM", "__version__"]
