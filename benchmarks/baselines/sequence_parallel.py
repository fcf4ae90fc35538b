"""Full-precision sequence parallelism (the "Voltage" family): tokens split in N contiguous shards,
every layer all-gathers the attention inputs (pre-attention norm output) in fp32 or fp16, and every
rank rebuilds the keys/values of the other shards itself, through the library's one path from what is
sent to K/V (`transformers_astra.exchange.rebuild_keys_values`, ASTRA's hidden mode without the
quantizer): the family's projection, key norm (Qwen3) and positions (RoPE: the SENDER's global
positions), so the fp32 variant is exact for every family an adapter exists for.

The HF model runs unchanged on this rank's shard: a forward pre-hook on each attention module does the
all-gather, and a registered attention function attends the local queries to the keys/values of all
shards (causal models: only shards up to this one, within the layer's sliding window if it has one).
Causal models take this rank's inputs and positions as the ASTRA runtime does (the adapter's
``rank_inputs``/``rank_hooks``); ViT's embedding output is cut to this rank's shard (the class token
stays on rank 0, which makes the prediction).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from transformers_astra.exchange import rebuild_keys_values
from transformers_astra.models import adapter_for
from transformers_astra.models.base import RankView
from transformers_astra.sharding import ShardLayout

from ..workloads import Workload
from .single import last_logits, logits_kwargs

ATTENTION_NAME = "bench_sequence_parallel"


class SequenceParallel:
    def __init__(self, wire_dtype: torch.dtype = torch.float32):
        self.wire_dtype = wire_dtype
        self.name = "sp-fp16" if wire_dtype == torch.float16 else "sp-fp32"

    def setup(self, workload: Workload, rank: int, world: int) -> None:
        self.workload, self.rank, self.world = workload, rank, world
        self.layout = ShardLayout.for_sequence(workload.num_tokens, world)
        self.start, self.end = self.layout.bounds(rank)
        model = workload.model
        adapter = self.adapter = adapter_for(model)
        AttentionInterface.register(ATTENTION_NAME, sequence_parallel_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        for module in adapter.attention_modules(model):
            module._sp = self
            module.register_forward_pre_hook(_gather_attention_input, with_kwargs=True)
        model.set_attn_implementation(ATTENTION_NAME)
        # The positions of every token (None where keys carry none): each shard's keys get their sender's.
        positions = adapter.position_table(model, workload.inputs, self.layout)
        self.shard_positions = [
            adapter.select_positions(positions, torch.arange(*self.layout.bounds(shard))) for shard in range(world)
        ]
        if workload.causal:
            view = RankView(self.layout, rank, None, positions)
            self.inputs = adapter.rank_inputs(workload.inputs, view)
            adapter.rank_hooks(model, view)  # kept for the benchmark's life (Llama: this shard's rotary positions)
        else:
            self.inputs = workload.inputs
            model.base_model.embeddings.register_forward_hook(self._keep_own_shard)

    def _keep_own_shard(self, module, args, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, self.start : self.end]

    @torch.inference_mode()
    def forward(self) -> torch.Tensor | None:
        output = self.workload.model(**self.inputs, **logits_kwargs(self.workload))
        # The prediction lives with the last token (GPT2, last rank) or the class token (ViT, rank 0).
        predicting_rank = self.world - 1 if self.workload.causal else 0
        return last_logits(self.workload, output) if self.rank == predicting_rank else None


def _gather_attention_input(module, args, kwargs):
    sp: SequenceParallel = module._sp
    hidden = args[0] if args else kwargs["hidden_states"]
    sent = hidden.to(sp.wire_dtype).contiguous()
    shards = [torch.empty((*hidden.shape[:-2], size, hidden.shape[-1]), dtype=sp.wire_dtype) for size in sp.layout.sizes]
    if len(set(sp.layout.sizes)) == 1:
        dist.all_gather(shards, sent)
    else:  # gloo's all_gather needs equal sizes: pad to the largest shard
        shards = _all_gather_uneven(sent, sp.layout.sizes)
    module._sp_shards = shards
    return None


def _all_gather_uneven(sent: torch.Tensor, sizes) -> list[torch.Tensor]:
    longest = max(sizes)
    padded = torch.zeros((*sent.shape[:-2], longest, sent.shape[-1]), dtype=sent.dtype)
    padded[..., : sent.shape[-2], :] = sent
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [g[..., :size, :] for g, size in zip(gathered, sizes)]


def sequence_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Local queries against the local keys/values and those rebuilt from the gathered shards."""
    sp: SequenceParallel = module._sp
    shards, module._sp_shards = module._sp_shards, None
    visible = range(sp.rank + 1) if sp.workload.causal else range(sp.world)
    keys, values = [], []
    for shard in visible:
        if shard == sp.rank:
            keys.append(key), values.append(value)
        else:
            remote_key, remote_value = rebuild_keys_values(
                sp.adapter, module, "hidden", sp.shard_positions[shard], decoded=shards[shard].to(query.dtype)
            )
            keys.append(remote_key), values.append(remote_value)
    mask = None
    if sp.workload.causal:
        query_positions = torch.arange(sp.start, sp.end)[:, None]
        key_positions = torch.arange(sp.end)[None, :]
        mask = key_positions <= query_positions
        window = sp.adapter.sliding_window(module)
        if window is not None:  # transformers' rule: a query sees the keys after query - window
            mask = mask & (key_positions > query_positions - window)
    # Grouped-query attention: K/V have fewer heads than the queries; sdpa repeats them.
    output = F.scaled_dot_product_attention(
        query, torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=mask, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None
