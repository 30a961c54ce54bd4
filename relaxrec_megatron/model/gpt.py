"""RelaxedRecursiveGPTModel: embedding (with the source's scale), recursive decoder, output layer."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel import ColumnParallelLinear, gather_from_tensor_model_parallel_region
from megatron.core.transformer.enums import ModelType
from torch import nn

from ..errors import UserError
from .decoder import RecursiveDecoder
from .settings import RelaxedSettings


class RopeFreqs(nn.Module):
    """megatron's rotary input (s, 1, 1, rot_dim), from the same inv_freq as the HF reference."""

    def __init__(self, settings: RelaxedSettings):
        super().__init__()
        inv_freq, scaling = settings.rope()
        if scaling != 1.0:
            raise UserError(f"rope with attention scaling {scaling} is not supported by the Megatron model")
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    def forward(self, seq_len: int) -> torch.Tensor:
        pos = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


class RelaxedRecursiveGPTModel(LanguageModule):
    def __init__(self, config, settings: RelaxedSettings, pre_process: bool = True, post_process: bool = True,
                 use_te: bool = False, loop_exits: int = 0):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.settings = settings
        # Early exits: the hidden states at the ends of the first `loop_exits` loops travel with the
        # activations, concatenated on the sequence axis, so the last pipeline stage can apply the final
        # norm and LM head to them: (1 + loop_exits) (s, b, h) tensors between stages instead of one
        self.loop_exits = loop_exits
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = settings.tie_word_embeddings
        self.embedding_multiplier = settings.embedding_multiplier
        vocab = settings.vocab_size
        if pre_process:
            self.embedding = LanguageModelEmbedding(config, vocab, settings.max_position_embeddings,
                                                    position_embedding_type="rope")
        self.rope = RopeFreqs(settings)
        self.decoder = RecursiveDecoder(config, settings, ps.get_pipeline_model_parallel_rank(), post_process,
                                        use_te=use_te)
        if post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, vocab, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self._carried = None
        if input_tensor is not None and self.loop_exits:
            input_tensor, *self._carried = input_tensor.chunk(1 + self.loop_exits, dim=0)
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                gather_logits: bool = False, sequence_first: bool = False):
        """input_ids (b, s) -> per-token loss (b, s) with labels (megatron's cross entropy), else logits
        (b, s, vocab[/TP]), or with sequence_first this rank's (s, b, vocab / TP) shard as the LM head
        makes it (no copy); with loop_exits on the last stage, a list of every loop's logits (s, b,
        vocab / TP)."""
        b, s = input_ids.shape
        hidden = None
        if self.pre_process:
            if position_ids is None:
                position_ids = torch.arange(s, device=input_ids.device)[None].expand(b, -1)
            hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)  # (s, b, h)
            if self.embedding_multiplier != 1.0:
                hidden = hidden * torch.tensor(self.embedding_multiplier, dtype=hidden.dtype)
        if attention_mask is None:
            attention_mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=input_ids.device), 1)[None, None]
        carried = None
        if self.loop_exits:
            carried = list(getattr(self, "_carried", None) or [torch.zeros_like(hidden)] * self.loop_exits)
        hidden = self.decoder(hidden, attention_mask, self.rope(s), carried)
        if not self.post_process:
            return hidden if carried is None else torch.cat([hidden, *carried])
        if carried is not None:  # every loop's (s, b, vocab / TP) logits, the last loop's last
            return [self._output(self.decoder.final_norm(h)) for h in carried] + [self._output(hidden)]
        logits = self._output(hidden)
        if sequence_first:
            return logits
        if labels is not None:
            return self.compute_language_model_loss(labels, logits)
        if gather_logits:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits.transpose(0, 1).contiguous()

    def _output(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        return self.output_layer(hidden, weight=weight)[0]
