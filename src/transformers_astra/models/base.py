"""What `astra.patch` needs to know about one model family."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AstraConfig


class ModelAdapter:
    model_type: str = ""

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention modules, in layer order (each calls transformers' attention interface)."""
        raise NotImplementedError

    def hidden_size(self, model: nn.Module) -> int:
        return model.config.hidden_size

    def quantized_width(self, model: nn.Module, config: AstraConfig) -> int:
        """Width of the vector the quantizer sees: hidden states, or keys and values side by side."""
        return self.hidden_size(model) * (2 if config.quantize == "kv" else 1)

    def validate(self, model: nn.Module, config: AstraConfig) -> None:
        width = self.hidden_size(model)
        if width % config.groups:
            divisors = [g for g in range(1, width + 1) if width % g == 0]
            raise ValueError(
                f"AstraConfig.groups={config.groups} must divide the model width {width}; allowed: {divisors}"
            )

    def project_kv(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V, (B, H, T, d) each, of decoded hidden states, as the receiving device computes them."""
        raise NotImplementedError

    def cls_per_shard(self, config: AstraConfig) -> int:
        """Class tokens every shard holds in addition to its share of the sequence."""
        return 0

    def max_positions(self, model: nn.Module) -> int | None:
        """The longest sequence the model can take (learned position embeddings); None: no hard limit."""
        return None

    def check_sequence_length(self, model: nn.Module, num_tokens: int) -> None:
        """ValueError when ``num_tokens`` positions (prompt plus new tokens) exceed `max_positions`.

        Every rank holds the whole input, so every rank raises the same error before any exchange.
        """
        limit = self.max_positions(model)
        if limit is not None and num_tokens > limit:
            raise ValueError(
                f"the sequence needs {num_tokens} positions but this {self.model_type} model has {limit} "
                f"(config.max_position_embeddings); shorten the input or generate fewer tokens"
            )

    def install(self, model: nn.Module, state) -> list:
        """Extra hooks of this family (e.g. ViT's distributed class tokens); returns their handles."""
        return []
