"""What the serving tests share: the tiny served models, their prompts, and HF's greedy outputs."""

import torch

from relaxrec_megatron.hf.convert import RecursionSpec
from relaxrec_megatron.inference.engine import Request

NEW = 9
PROMPT_LENS = (3, 7, 5, 11, 4)
MODELS = [("llama", "relaxed", RecursionSpec(rank=4, share_norms=False)),
          ("llama", "recursive", RecursionSpec(rank=0)),
          ("gemma", "relaxed", RecursionSpec(rank=3, init="stepwise")),
          ("gpt_neox", "relaxed", RecursionSpec(rank=4, share_norms=False, share_biases=False)),
          ("gpt_neox", "recursive", RecursionSpec(rank=0, loops=4))]
NAMES = [f"{a}-{k}-{s.loops}" for a, k, s in MODELS]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return gen[0, len(prompt):].tolist()


def requests(prompts, eos, arrivals=None, traces=None):
    return [Request(p, NEW, eos_token_id=eos, arrival_step=(arrivals or [0] * len(prompts))[i], id=i,
                    exit_trace=None if traces is None else traces[i]) for i, p in enumerate(prompts)]
