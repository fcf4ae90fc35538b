"""Does ASTRA pay here, and at which setting? A cost model of one inference split over N devices.

    import transformers_astra as astra
    profile = astra.calibrate_device(model, num_tokens=1024)    # seconds (GPT2-small: ~20 s on one core)
    plan = astra.plan(model, num_tokens=1024, num_devices=4, bandwidth_mbps=10, profile=profile)
    print(plan.summary())                                        # recommendation and every prediction
    plan.recommended                                             # the chosen `Prediction` (or one device)

`calibrate_device` times, on this device and this model: the unmodified model's forward at three
sequence lengths (fitting a fixed cost and a per-token cost once the attention is subtracted) and, for causal
models, at the planned length itself (what one device runs; see `DeviceProfile.forward_s`), scaled
dot-product attention (causal and explicitly masked), and ASTRA's per-token work: encoding (+ bit
packing) at each G, and on the receiver unpacking + decoding + projecting K/V (hidden mode), gathering
from the runtime's codeword-projection tables (hidden mode, where they fit) or decoding keys and values
(kv mode). A `DeviceProfile` holds these rates; it is JSON, so one profile per device type can be kept.
With ``rank_probes=True`` it also times real ranks per setting (`loopback_rank_forward`: the runtime's forward
of one rank with no network, `transport.LoopbackTransport`; ranks 0 and N-1 at N=4 and N=8, and rank 4 of 8) and
fits what the components miss of them: per layer, an overhead for sending and one for receiving, each a fixed
part plus a part per peer, and one that every rank with a peer pays (`fit_rank_overheads`; the runtime's hooks, masks, partial attentions and merge, pack/unpack calls and
small ops, some of them once per source), so that one profile predicts N=8 as well as N=4. Opt-in: it makes
calibration about 5 times longer (docs/design.md: GPT2-small at 1024 tokens on one thread, 89 s against 17 s). Profiles of versions 1 (without them) and 2 (one N) still load.

`plan` predicts the latency of: one device; ASTRA at every G in (1, 8, 16, 32) that divides the width,
in hidden and kv mode; full-precision sequence parallelism (fp32 and fp16 all-gathers) and Megatron tensor
parallelism. Per rank and layer it adds the calibrated compute of that rank's shard (its tokens, the keys
it attends to, what it encodes and what it receives) and replays the exchanges layer by layer over links
of the given bandwidth: causal models send each shard's codes point-to-point to the later ranks (a
sender's uplink and a receiver's downlink each carry one transfer at a time), bidirectional models and the
baselines run synchronous ring collectives. Optional one-way ``latency_ms`` adds to every message and
``loss_percent`` adds the expected retransmission delay of TCP (see `LinkModel`).

Accuracy constraints: give ``accuracy_rows`` (rows of docs/results/accuracy.json: N, G, quantize, K,
metric, value) and a bound (``max_perplexity_increase_percent`` or ``max_accuracy_drop_points`` against
``reference_value``): only ASTRA settings with a measured row inside the bound are recommended.

The model is a model, not a measurement: `benchmarks/validate_planner.py` compares it with the measured
rows of docs/results/latency.json and reports the error per row (docs/planner.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .balance import ShardCosts, balanced_sizes
from .config import BALANCED, QUANTIZE_MODES, AstraConfig
from .kernels import fused_tables, projected_from_fused
from .packing import pack, packed_size, unpack
from .patch import astra_state, is_patched
from .quantizer import GroupedVQ
from .sharding import ShardLayout
from .transport import code_receivers, code_sources

GROUPS = (1, 8, 16, 32)
BASELINES = ("single", "sp-fp32", "sp-fp16", "tp")
# 2: + rank_overhead_s, probe_tokens, probe_devices (version-1 profiles load without them). 3: probe_devices is the list
# of N probed, and rank_overhead_s may hold per-peer terms (probes at several N); version-2 profiles load as before.
PROFILE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
PROBE_DEVICES = (4, 8)  # calibrate_device's default N of the rank probes: two, so that overheads that grow with N are fitted
MSS_BYTES = 1448  # TCP payload of one 1500-byte Ethernet frame
TLP_MIN_S = 0.01  # Linux's shortest tail loss probe timeout


# ------------------------------------------------------------------------------------- profile
@dataclass
class DeviceProfile:
    """Measured costs of one model on one device (seconds). Made by `calibrate_device`."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    causal: bool
    threads: int
    fixed_s: float  # per forward, independent of the tokens (embeddings' fixed part, head, per-layer overheads)
    per_token_s: float  # per token and forward, attention excluded (all layers)
    attention_causal_s: float  # per (query, key) pair and layer that a causal SDPA computes (about half of q*k)
    attention_masked_s: float  # per (query, key) pair and layer, SDPA with an explicit mask (all q*k pairs)
    attention_full_s: float  # per (query, key) pair and layer, SDPA without a mask
    project_kv_s: float  # K/V projection of one received token, per layer (the adapter's project_kv)
    encode_s: dict[str, float]  # "G/quantize" -> encoding + packing of one token, per layer
    decode_s: dict[str, float]  # "G/quantize" -> unpacking + decoding one received token, per layer (no projection)
    table_s: dict[str, float]  # "G/hidden" -> unpack + gather-sum from projection tables, one token, per layer
    codebook_size: int = 1024
    # "G/quantize" -> [send, receive] or [send, receive, send per receiver, receive per source, common]: per layer,
    # what a real rank's forward takes beyond the components above when it sends codes / receives codes (the
    # runtime's per-layer fixed work: hooks, masks, partial attentions and merge, pack/unpack calls, small ops),
    # fitted by `fit_rank_overheads` to measured rank forwards (may be < 0 where the components overstate a rank). A
    # rank that sends to r receivers adds send + r * (send per receiver); one that receives from s sources, receive
    # + s * (receive per source); every rank with a peer, common. The per-peer parts exist where probes at several
    # N told them apart, common where a probed rank that sends and receives did (version 3; else 0).
    # Empty: not measured (version-1 profiles), the components alone.
    rank_overhead_s: dict[str, list[float]] = field(default_factory=dict)
    probe_tokens: int = 0  # the sequence length of those rank forwards (0: none)
    probe_devices: list[int] = field(default_factory=list)  # the N they ran at (version 2: one int, read as [N])
    measured_tokens: list[int] = field(default_factory=list)
    measured_forward_s: list[float] = field(default_factory=list)
    # The whole model's forward at the planned length (causal models: beyond the fitted lengths; 0: not timed, as
    # in profiles before 2026-11-28). On the GPU hosts the fit at 128-512 tokens, extrapolated to 1024, read one
    # device 0.97 s where it took 1.35-1.74 s in the rows (docs/planner.md): the per-token cost grows with length.
    full_tokens: int = 0
    full_forward_s: float = 0.0
    machine: str = ""
    date: str = ""
    torch_version: str = ""
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.probe_devices, int):  # version 2's one N (0: none)
            self.probe_devices = [self.probe_devices] if self.probe_devices else []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DeviceProfile":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)  # fmt: skip
        if missing:
            raise ValueError(f"DeviceProfile is missing field(s) {missing}")
        if values.get("version", PROFILE_VERSION) not in READABLE_VERSIONS:
            raise ValueError(f"DeviceProfile version {values.get('version')!r} is not one of {READABLE_VERSIONS} that this "
                             f"transformers_astra reads: calibrate again (calibrate_device)")  # fmt: skip
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def fitted_forward_s(self, tokens: int) -> float:
        """The fitted components' whole forward on ``tokens`` tokens (what a rank's shard is predicted from)."""
        pairs = causal_pairs(tokens) if self.causal else tokens * tokens
        rate = self.attention_causal_s if self.causal else self.attention_full_s
        return self.fixed_s + self.per_token_s * tokens + self.num_layers * rate * pairs

    def forward_s(self, tokens: int) -> float:
        """One device, the whole model on ``tokens`` tokens: the fit, corrected beyond the fitted lengths by what
        the forward at ``full_tokens`` measured against the fit (linearly from the longest fitted length to
        ``full_tokens``, the whole ratio from there on)."""
        fitted = self.fitted_forward_s(tokens)
        top = max(self.measured_tokens, default=0)
        if not self.full_tokens or not self.full_forward_s or tokens <= top or self.full_tokens <= top:
            return fitted
        ratio = self.full_forward_s / self.fitted_forward_s(self.full_tokens)
        weight = min(1.0, (tokens - top) / (self.full_tokens - top))
        return fitted * (1.0 + weight * (ratio - 1.0))


def probed_at(profile: DeviceProfile) -> str:
    """The N of a profile's rank probes, as text: "4", "4 and 8"."""
    counts = [str(n) for n in profile.probe_devices]
    return " and ".join([", ".join(counts[:-1]), counts[-1]] if len(counts) > 1 else counts)


def setting_key(groups: int, quantize: str) -> str:
    return f"{groups}/{quantize}"


def causal_pairs(tokens: int) -> int:
    return tokens * (tokens + 1) // 2


# ---------------------------------------------------------------------------------- calibration
def _bind(model: nn.Module, inputs: dict[str, Any]):
    return lambda: model(**inputs)


def _interleaved_best(calls: list, repeats: int, device: torch.device | None = None, bar=None) -> list[float]:
    """Fastest time of each call over ``repeats`` rounds that time every call once, in turn: a burst of load
    from other processes then slows one round of all calls instead of all rounds of one call."""
    best = [math.inf] * len(calls)
    for call in calls:
        call()  # warm-up
    if bar is not None:
        bar.update(1)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            best[i] = min(best[i], _time_once(call, device))
        if bar is not None:
            bar.update(1)
    return best


def _bind_attention(q, k, v, mask, causal: bool):
    if causal:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _bind_encode(quantizer: GroupedVQ, x: torch.Tensor, bits: int):
    return lambda: pack(quantizer.encode(x), bits)


def _bind_decode(quantizer: GroupedVQ, packed: torch.Tensor, bits: int, shape):
    count = math.prod(shape)
    return lambda: quantizer.decode(unpack(packed, bits, count).reshape(shape))


def _bind_table(key_table, value_table, packed, bits: int, shape, codebook_size: int):
    """Unpack and gather from a pair of codeword-projection tables fused as the runtime's receiver uses them
    (`kernels.fused_tables`, `kernels.projected_from_fused`: one gather for K and V)."""
    count = math.prod(shape)
    tables = (key_table, value_table, key_table.new_zeros(key_table.shape[-1]), value_table.new_zeros(value_table.shape[-1]))
    fused = fused_tables(tables, shape[-1])

    def gather():
        return projected_from_fused(fused, unpack(packed, bits, count).reshape(shape), codebook_size)

    return gather


def _time_once(call, device: torch.device | None) -> float:
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


def _model_inputs(model: nn.Module, tokens: int, generator: torch.Generator) -> dict[str, Any]:
    """Inputs of ``tokens`` tokens for the model's main input (token ids, or an image of that many patches)."""
    config = model.config
    reference = next(model.parameters())
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        ids = torch.randint(0, config.vocab_size, (1, tokens), generator=generator).to(reference.device)
        return {"input_ids": ids, "use_cache": False, "logits_to_keep": 1}
    if name == "pixel_values":
        patch, channels = config.patch_size, getattr(config, "num_channels", 3)
        side = max(1, round(math.sqrt(max(tokens - 1, 1))))
        extra = {} if side * patch == config.image_size else {"interpolate_pos_encoding": True}
        pixels = torch.randn(1, channels, side * patch, side * patch, generator=generator).to(reference.device, reference.dtype)
        return {"pixel_values": pixels, **extra}
    raise ValueError(f"calibrate_device supports models whose main input is input_ids or pixel_values, got {name!r}")


def _tokens_of(model: nn.Module, tokens: int) -> int:
    """Tokens the model really sees for a requested length (images: whole rows of patches plus CLS)."""
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return round(math.sqrt(max(tokens - 1, 1))) ** 2 + 1
    return tokens


def _model_dims(model: nn.Module) -> tuple[int, int, int]:
    config = model.config
    return config.hidden_size, config.num_hidden_layers, config.num_attention_heads


def _native_tokens(model: nn.Module) -> int | None:
    config = model.config
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return (config.image_size // config.patch_size) ** 2 + 1
    return None


def _is_causal(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", "input_ids") == "input_ids"


@torch.inference_mode()
def calibrate_device(
    model: nn.Module,
    num_tokens: int | None = None,
    groups: tuple[int, ...] = GROUPS,
    codebook_size: int | None = None,
    threads: int | None = None,
    repeats: int = 3,
    progress: bool = True,
    machine: str = "",
    rank_probes: bool = False,
    rank_forward: Callable[[nn.Module, int, dict[str, Any]], Callable[[], Any]] | None = None,
    probe_tokens: int | None = None,
    probe_devices: int | tuple[int, ...] = PROBE_DEVICES,
    probe_repeats: int = 2,
) -> DeviceProfile:
    """Time this model's building blocks on this device (CPU threads as set, or ``threads``); see the module doc.

    ``num_tokens``: the sequence length to plan for (default: the model's own for images, else 1024); the
    forward is timed at 1/8, 1/4 and 1/2 of it (images: 1/4, 1/2 and all of it). A patched model is calibrated on an unpatched copy.
    Takes seconds (GPT2-small, 1024 tokens, one dev-VM thread: the `validate_planner calibrate --no-rank-probe`
    command 21.6 s, 2026-11-28, of which the forward at the full length takes about 9 s).

    ``rank_probes``: also time real ASTRA ranks, so that the profile holds what a rank's forward costs beyond
    the components (`fit_rank_overheads`; without them those overheads are taken as 0). Off by default: it
    makes calibration about 5 times longer (GPT2-small at 1024 tokens on one dev-VM thread, probes at N=4 and 8,
    whole command: 89 s against 17 s, and 52 s with probes at N=4 only; docs/design.md).
    For every setting and every N of ``probe_devices`` (default 4 and 8; one N or several) the model is patched
    (that N, even shards) and rank r's forward runs
    with no network through `loopback_rank_forward` (the runtime with a `LoopbackTransport`: its received
    codes are stand-ins, so only its time counts); ranks 0 and N-1, and at the largest N also rank N//2 (causal),
    or rank 0 (images), on
    ``probe_tokens`` tokens (default ``num_tokens``: on the dev VM, GPT2's overheads fitted at 256 tokens, +1-4 ms
    a layer, did not hold at 1024, -1 to +1 ms), best of ``probe_repeats`` after one warm-up. Probes at two or
    more N also fit how the overheads grow with the number of peers (`fit_rank_overheads`), so that a profile
    predicts other N than one it probed; with one N the overheads are that N's, whatever N is planned.
    ``rank_forward``: another way to run a rank (implies the probes): ``rank_forward(model, rank, inputs)``
    returns a callable that runs rank ``rank``'s forward on ``inputs`` with no network.
    """
    from .models import adapter_for
    from .patch import patch, unpatch

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    if is_patched(model):
        codebook_size = codebook_size or astra_state(model).config.codebook_size
        model = unpatch(copy.deepcopy(model))
    adapter = adapter_for(model)
    codebook_size = codebook_size or AstraConfig().codebook_size
    hidden, layers, heads = _model_dims(model)
    causal = _is_causal(model)
    total = num_tokens or _native_tokens(model) or 1024
    if isinstance(total, bool) or not isinstance(total, int) or total < 8:
        raise ValueError(f"num_tokens must be an integer >= 8, got {num_tokens!r}")
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    # Every timed call goes into one list, timed in interleaved rounds (`_interleaved_best`): on a shared machine a
    # burst of load then slows one round of all components alike instead of a few components in every round.
    calls: dict[str, Any] = {}
    per_unit: dict[str, float] = {}  # what to divide a call's seconds by (tokens, or (query, key) pairs)

    # 1. The whole model at three lengths; attention (timed below) is subtracted, then fixed + per-token fitted.
    # Causal prefills: 1/8, 1/4, 1/2 of the length (an ASTRA shard's range); images: 1/4, 1/2 and all of it.
    fractions = (8, 4, 2) if causal else (4, 2, 1)
    lengths = sorted({max(4, _tokens_of(model, total // d)) for d in fractions})
    for length in lengths:
        calls[f"forward {length}"] = _bind(model, _model_inputs(model, length, generator))
        per_unit[f"forward {length}"] = 1.0
    # ... and at the planned length, what one device runs (not fitted: the ranks' shards are 1/8 to 1/2 of it).
    full = _tokens_of(model, total)
    if full not in lengths:
        calls[f"forward {full}"] = _bind(model, _model_inputs(model, full, generator))
        per_unit[f"forward {full}"] = 1.0

    # 2. Attention kernels at the shapes the plan meets, per (query, key) pair and layer.
    head_dim = hidden // heads
    shard = max(1, total // 4)
    for name, queries, keys in (("causal", total, total), ("masked", shard, total), ("full", shard, total)):
        q, k, v = rand(1, heads, queries, head_dim), rand(1, heads, keys, head_dim), rand(1, heads, keys, head_dim)
        if name == "causal":
            calls["attention causal"] = _bind_attention(q, k, v, None, True)
            per_unit["attention causal"] = causal_pairs(queries)
        else:
            mask = torch.ones(1, 1, queries, keys, dtype=torch.bool, device=device).tril(keys - queries) if name == "masked" else None
            calls[f"attention {name}"] = _bind_attention(q, k, v, mask, False)
            per_unit[f"attention {name}"] = queries * keys

    # 3. ASTRA's own work per token and layer: encode + pack (senders), unpack + decode / project / table (receivers).
    module = adapter.attention_modules(model)[0]
    probe = max(64, shard)
    probe_hidden = rand(1, probe, hidden)
    calls["project"] = lambda: adapter.project_kv(module, probe_hidden)
    for g in groups:
        if hidden % g:
            continue
        for quantize in QUANTIZE_MODES:
            config = AstraConfig(groups=g, quantize=quantize, codebook_size=codebook_size)
            key = setting_key(g, quantize)
            quantizer = GroupedVQ(adapter.quantized_width(model, config), config.codes_per_token, codebook_size).to(device, dtype)
            codes = torch.randint(0, codebook_size, (1, probe, config.codes_per_token), generator=generator).to(device)
            calls[f"encode {key}"] = _bind_encode(quantizer, rand(1, probe, quantizer.width), config.bits_per_code)
            calls[f"decode {key}"] = _bind_decode(quantizer, pack(codes, config.bits_per_code), config.bits_per_code, codes.shape)
            if quantize == "hidden" and _table_fits(config, hidden):  # the runtime builds tables only where they fit
                rows = config.codes_per_token * codebook_size
                calls[f"table {key}"] = _bind_table(rand(rows, hidden), rand(rows, hidden), pack(codes, config.bits_per_code),
                                                    config.bits_per_code, codes.shape, codebook_size)  # fmt: skip
    for name in calls:
        per_unit.setdefault(name, probe)
    if not isinstance(rank_probes, bool):
        raise ValueError(f"rank_probes must be True or False, got {rank_probes!r}")
    if rank_probes and rank_forward is None:
        rank_forward = loopback_rank_forward
    probing = rank_forward is not None
    device_counts = list(probe_devices) if isinstance(probe_devices, (tuple, list)) else [probe_devices]
    if probing:
        if not device_counts:
            raise ValueError("probe_devices must name at least one N, got an empty sequence")
        for n in device_counts:
            _check_int("probe_devices", n, 2)
        device_counts = sorted(set(device_counts))
        probe_tokens = probe_tokens or total
        _check_int("probe_tokens", probe_tokens, 2 * max(device_counts))
        _check_int("probe_repeats", probe_repeats, 1)
    settings = [(g, q) for g in groups if not hidden % g for q in QUANTIZE_MODES]
    bar = _progress(repeats + 1 + (len(settings) * len(device_counts) * (probe_repeats + 1) if probing else 0), progress)
    seconds = dict(zip(calls, _interleaved_best(list(calls.values()), repeats, device, bar)))
    rate = {name: seconds[name] / per_unit[name] for name in calls}

    forward = [seconds[f"forward {length}"] for length in lengths]
    attention = rate["attention causal"] if causal else rate["attention full"]
    pairs = [causal_pairs(n) if causal else n * n for n in lengths]
    residual = [t - layers * attention * p for t, p in zip(forward, pairs)]
    per_token, fixed = _fit_line(lengths, residual)
    pick = lambda kind: {name.split(" ", 1)[1]: value for name, value in rate.items() if name.startswith(kind + " ")}  # noqa: E731
    encode, decode, table = pick("encode"), pick("decode"), pick("table")
    project = rate["project"]
    attention_causal, attention_masked, attention_full = rate["attention causal"], rate["attention masked"], rate["attention full"]
    profile = DeviceProfile(
        model_type=str(getattr(model.config, "model_type", "")), hidden_size=hidden, num_layers=layers, num_heads=heads,
        causal=causal, threads=torch.get_num_threads(), fixed_s=fixed, per_token_s=per_token,
        attention_causal_s=attention_causal, attention_masked_s=attention_masked, attention_full_s=attention_full,
        project_kv_s=project, encode_s=encode, decode_s=decode, table_s=table, codebook_size=codebook_size,
        measured_tokens=lengths, measured_forward_s=forward, full_tokens=full, full_forward_s=seconds[f"forward {full}"],
        machine=machine or os.uname().nodename,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch_version=torch.__version__,
    )  # fmt: skip
    if probing:  # 4. real ranks' forwards per setting, for the per-layer overheads the components miss
        probes = []
        inputs = {k: v for k, v in _model_inputs(model, probe_tokens, generator).items() if k != "use_cache"}
        for g, quantize in settings:
            for n in device_counts:
                ranks = probe_ranks(n, device_counts, causal)
                config = AstraConfig(num_devices=n, groups=g, quantize=quantize, codebook_size=codebook_size, shard_sizes=None)
                patch(model, config)
                try:
                    forwards = [rank_forward(model, rank, inputs) for rank in ranks]
                    timed = _interleaved_best(forwards, probe_repeats, device, bar)
                finally:
                    unpatch(model)
                probes += [RankProbe(g, quantize, n, rank, _tokens_of(model, probe_tokens), t) for rank, t in zip(ranks, timed)]
        profile.rank_overhead_s = fit_rank_overheads(profile, probes)
        profile.probe_tokens, profile.probe_devices = _tokens_of(model, probe_tokens), device_counts
    bar.close()
    return profile


def probe_ranks(num_devices: int, device_counts: list[int], causal: bool) -> list[int]:
    """The ranks `calibrate_device` times at N = ``num_devices`` when it probes at every N of ``device_counts``.
    Causal: ranks 0 (sends only) and N-1 (receives only), and at the largest N a middle rank (both); images: rank 0
    (every rank does both)."""
    if not causal:
        return [0]
    return sorted({0, num_devices - 1} | ({num_devices // 2} if num_devices == max(device_counts) else set()))


def loopback_rank_forward(model: nn.Module, rank: int, inputs: dict[str, Any]) -> Callable[[], Any]:
    """A callable that runs rank ``rank``'s forward of the patched ``model`` on ``inputs`` with no network.

    The runtime itself (`DistributedRuntime`, its defaults: overlap, projection tables) over a
    `transport.LoopbackTransport`: the rank's shard, hooks, encoding where later ranks need its codes,
    decoding or table gathers of what it receives. Received codes are stand-ins (valid codes spread over the
    codebook), so the outputs are not the real rank's: the timing, not the values, is what it is for
    (`calibrate_device`'s ``rank_probes``). ``inputs``: the whole sequence, as every rank gets it.
    """
    from .distributed import DistributedRuntime, LoopbackTransport

    config = astra_state(model).config
    device = next(model.parameters()).device
    runtime = DistributedRuntime(model, check_inputs=False, transport=LoopbackTransport(rank, config.num_devices, config, device))
    return lambda: runtime(**inputs)


def _fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept, both clamped at >= 0 (a cost is never negative)."""
    if len(xs) == 1:
        return max(ys[0], 0.0) / xs[0], 0.0
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    slope = max(slope, 0.0)
    return slope, max(mean_y - slope * mean_x, 0.0)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating the device", leave=False)


# ----------------------------------------------------------------------------------------- links
@dataclass(frozen=True)
class LinkModel:
    """One device's link: ``bandwidth_mbps`` each way, ``latency_ms`` one way, ``loss_percent`` per packet.

    ``bulk_efficiency``: the share of the rate a burst of megabytes gets through (TCP/IP headers, and
    TCP's recovery when a rate limiter's queue overflows); the dev VM's shaped links gave 0.66–0.71 for the
    full-precision baselines' per-layer bursts at 10 Mbps, 0.95–0.98 for one long stream
    (docs/benchmarks.md). Loss (per frame): a message whose last 3 packets lose one waits for Linux's tail
    loss probe, max(2 RTT, 10 ms), probability 1 - (1 - p)^3; each earlier lost packet costs one round
    trip (fast retransmit); and the rate is capped by TCP's loss-limited MSS·1.22 / (RTT·√p) (Mathis et
    al.). RTT: twice ``latency_ms`` plus two frames' serialisation. A retransmission timeout (200 ms or
    more, e.g. when a retransmission is lost too) is not modelled: the measured loss rows (dev VM, up to
    5 %) showed no such stalls in their medians.
    """

    bandwidth_mbps: float
    latency_ms: float = 0.0
    loss_percent: float = 0.0
    bulk_efficiency: float = 0.7
    small_efficiency: float = 0.95
    small_message_bytes: int = 64 * 1024
    per_message_s: float = 2e-4

    def __post_init__(self) -> None:
        _check_positive("bandwidth_mbps", self.bandwidth_mbps)
        _check_range("latency_ms", self.latency_ms, 0.0, math.inf)
        _check_range("loss_percent", self.loss_percent, 0.0, 100.0, high_open=True)
        _check_range("bulk_efficiency", self.bulk_efficiency, 0.0, 1.0, low_open=True)
        _check_range("small_efficiency", self.small_efficiency, 0.0, 1.0, low_open=True)
        _check_range("per_message_s", self.per_message_s, 0.0, math.inf)

    def transfer_s(self, num_bytes: float) -> float:
        """Seconds one message of ``num_bytes`` takes end to end (serialisation, latency, loss)."""
        if num_bytes <= 0:
            return 0.0
        efficiency = self.small_efficiency if num_bytes <= self.small_message_bytes else self.bulk_efficiency
        rate = self.bandwidth_mbps * 1e6 / 8 * efficiency
        p = self.loss_percent / 100
        # Round trip: the link's latency both ways plus two frames' serialisation (a lossy flow keeps the queue short).
        rtt = 2 * self.latency_ms / 1e3 + 2 * MSS_BYTES / (self.bandwidth_mbps * 1e6 / 8)
        if p:
            rate = min(rate, MSS_BYTES * 1.22 / (rtt * math.sqrt(p)))
        seconds = num_bytes / rate + self.latency_ms / 1e3 + self.per_message_s
        if not p:
            return seconds
        # A loss among a message's last 3 packets has too few duplicate acknowledgements behind it for a fast
        # retransmit: Linux's tail loss probe resends after max(2 RTT, 10 ms). Earlier losses cost a round trip each.
        packets = math.ceil(num_bytes / MSS_BYTES)
        tail = min(packets, 3)
        return seconds + (1 - (1 - p) ** tail) * max(2 * rtt, TLP_MIN_S) + (packets - tail) * p * rtt


# ------------------------------------------------------------------------------------ predictions
@dataclass
class Prediction:
    """Predicted latency of one way to run the inference."""

    method: str  # "single", "astra", "sp-fp32", "sp-fp16", "tp"
    latency_s: float
    groups: int | None = None
    quantize: str | None = None
    projection_table: bool | None = None
    compute_s: list[float] = field(default_factory=list)  # per rank, no network
    bytes_sent_per_rank: float = 0.0  # the busiest rank's payload per inference
    speedup_vs_single: float | None = None
    accuracy: dict | None = None  # the matching accuracy row's metric/value, when constraints were given
    allowed: bool = True  # False: excluded by the accuracy constraint
    reason: str = ""

    @property
    def label(self) -> str:
        if self.method != "astra":
            return self.method
        return f"astra G={self.groups} {self.quantize}" + ("" if self.projection_table in (None, True) else " projection_table=False")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "label": self.label}


@dataclass
class Plan:
    """Every prediction for one (model, tokens, N, link, device), and the recommendation."""

    num_tokens: int
    num_devices: int
    link: LinkModel
    predictions: list[Prediction]
    recommended: Prediction
    profile: DeviceProfile

    def prediction(self, method: str, groups: int | None = None, quantize: str | None = None) -> Prediction:
        for p in self.predictions:
            if p.method == method and p.groups == groups and p.quantize == quantize:
                return p
        raise ValueError(f"no prediction for method={method!r} groups={groups!r} quantize={quantize!r}")

    def summary(self) -> str:
        """A few lines a person can act on: the recommendation, then every prediction, fastest first."""
        single = self.prediction("single")
        rec = self.recommended
        link = self.link
        head = (f"ASTRA plan: {self.profile.model_type}, {self.num_tokens} tokens, N={self.num_devices}, "
                f"{link.bandwidth_mbps:g} Mbps" + (f", {link.latency_ms:g} ms" if link.latency_ms else "")
                + (f", {link.loss_percent:g} % loss" if link.loss_percent else "")
                + f"; device profile: {self.profile.threads} thread(s) on {self.profile.machine or 'this machine'}"
                + (f", rank overheads probed at N={probed_at(self.profile)}, {self.profile.probe_tokens} tokens"
                   if self.profile.rank_overhead_s else ", components only (no rank probes)"))  # fmt: skip
        if rec.method == "single":
            verdict = f"recommended: one device ({single.latency_s:.3g} s predicted); {rec.reason}"
        else:
            verdict = (f"recommended: {rec.label} ({rec.latency_s:.3g} s predicted, {rec.speedup_vs_single:.2f}x one device's "
                       f"{single.latency_s:.3g} s)" + (f"; {rec.reason}" if rec.reason else ""))  # fmt: skip
        faster_baselines = [p for p in self.predictions if p.method in ("sp-fp32", "sp-fp16", "tp") and p.latency_s < rec.latency_s]
        if faster_baselines:
            best = min(faster_baselines, key=lambda p: p.latency_s)
            verdict += f"; note: full-precision {best.label} is predicted faster still ({best.latency_s:.3g} s)"
        lines = [head, verdict, "predicted latency (s), speed-up over one device:"]
        for p in sorted(self.predictions, key=lambda p: p.latency_s):
            note = "" if p.allowed else f"  [excluded: {p.reason}]"
            accuracy = f"  {p.accuracy['metric']} {p.accuracy['value']:.4g}" if p.accuracy else ""
            lines.append(f"  {p.label:28s} {p.latency_s:9.3g}  {p.speedup_vs_single:5.2f}x{accuracy}{note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "num_devices": self.num_devices, "link": dataclasses.asdict(self.link),
                "recommended": self.recommended.to_dict(), "predictions": [p.to_dict() for p in self.predictions]}  # fmt: skip


# ------------------------------------------------------------------------------------ the model
def code_bytes_per_layer(config: AstraConfig, layout: ShardLayout, rank: int, batch_size: int = 1) -> int:
    """Packed code bytes of ``rank``'s shard for one layer (what the runtime sends to each receiver)."""
    return packed_size(batch_size * layout.sizes[rank] * config.codes_per_token, config.bits_per_code)


def expected_bytes_sent(config: AstraConfig, layout: ShardLayout, rank: int, num_layers: int, causal: bool, batch_size: int = 1) -> int:
    """Code bytes ``rank`` sends in one forward (as `transformers_astra.distributed.expected_code_bytes`)."""
    return num_layers * len(code_receivers(layout.num_devices, rank, causal)) * code_bytes_per_layer(config, layout, rank, batch_size)


def _table_fits(config: AstraConfig, hidden: int, element_size: int = 4) -> bool:
    from .distributed import PROJECTION_TABLE_MAX_BYTES

    return config.projection_table_bytes(hidden, element_size) <= PROJECTION_TABLE_MAX_BYTES


def _layer_split(profile: DeviceProfile) -> float:
    """Share of a layer's per-token work before its attention exchange (LayerNorm + Q/K/V of a 4x MLP block)."""
    return 3 / 12


def astra_rank_compute(profile: DeviceProfile, config: AstraConfig, layout: ShardLayout, rank: int,
                       projection_table: bool = True) -> tuple[float, float]:  # fmt: skip
    """(before the exchange, after it) seconds of one layer on ``rank``: its shard's per-token work, encoding
    if anyone needs its codes, rebuilding the received tokens' K/V, attention to its visible keys, and the
    profile's measured per-layer rank overheads (`fit_rank_overheads`) for sending and for receiving."""
    causal, n = profile.causal, layout.sizes[rank]
    key = setting_key(config.groups, config.quantize)
    if key not in profile.encode_s:
        raise ValueError(f"the device profile has no measurement for G={config.groups} {config.quantize}: calibrate with groups including {config.groups}")
    per_layer = profile.per_token_s / profile.num_layers
    before = _layer_split(profile) * per_layer * n
    receivers = len(code_receivers(layout.num_devices, rank, causal))
    sources = len(code_sources(layout.num_devices, rank, causal))
    send_overhead, receive_overhead = rank_overheads(profile, key, receivers, sources)
    before += send_overhead
    if receivers:
        before += profile.encode_s[key] * n
    start, end = layout.bounds(rank)
    received = start if causal else layout.total - n
    if config.quantize == "hidden" and projection_table and _table_fits(config, profile.hidden_size) and key in profile.table_s:
        rebuild = profile.table_s[key]  # (a profile calibrated under a smaller table limit lacks wider G: projected)
    elif config.quantize == "hidden":
        rebuild = profile.decode_s[key] + profile.project_kv_s
    else:
        rebuild = profile.decode_s[key]
    keys = end if causal else layout.total
    after = (1 - _layer_split(profile)) * per_layer * n + rebuild * received + profile.attention_masked_s * n * keys
    return before, after + receive_overhead


def rank_overheads(profile: DeviceProfile, key: str, receivers: int, sources: int) -> tuple[float, float]:
    """Per layer, the measured overheads of a rank that sends to ``receivers`` ranks and receives from ``sources``,
    before its exchange and after it (`DeviceProfile.rank_overhead_s`: send and receive parts, per-peer parts and
    the part common to every rank with a peer, where fitted; the common part is counted after the exchange)."""
    send, receive, per_receiver, per_source, common = (list(profile.rank_overhead_s.get(key, ())) + [0.0] * 5)[:5]
    before = send + per_receiver * receivers if receivers else 0.0
    after = (receive + per_source * sources if sources else 0.0) + (common if receivers or sources else 0.0)
    return before, after


def astra_layout(profile: DeviceProfile, config: AstraConfig, num_tokens: int) -> ShardLayout:
    """The runtime's shard layout of ``num_tokens`` tokens (images: ``num_tokens`` with one class token, which
    every rank holds a copy of when ``distributed_cls``)."""
    cls_per_shard = 0 if profile.causal or not config.distributed_cls else 1
    content = num_tokens - (1 if cls_per_shard else 0)
    return ShardLayout.for_sequence(content + cls_per_shard * config.num_devices, config.num_devices,
                                    runtime_shard_weights(profile, config, content), cls_per_shard=cls_per_shard)  # fmt: skip


def rank_compute_s(profile: DeviceProfile, config: AstraConfig, num_tokens: int, rank: int, projection_table: bool = True) -> float:
    """Seconds of ``rank``'s whole forward without a network (what `RankProbe` measures): the model's fixed cost
    plus every layer's `astra_rank_compute`."""
    before, after = astra_rank_compute(profile, config, astra_layout(profile, config, num_tokens), rank, projection_table)
    return profile.fixed_s + profile.num_layers * (before + after)


@dataclass(frozen=True)
class RankProbe:
    """One measured forward of a real ASTRA rank with no network (collectives local): rank ``rank`` of
    ``num_devices`` at ``groups``/``quantize``, on ``num_tokens`` tokens, took ``seconds``."""

    groups: int
    quantize: str
    num_devices: int
    rank: int
    num_tokens: int
    seconds: float
    projection_table: bool = True


def fit_rank_overheads(profile: DeviceProfile, probes: list[RankProbe]) -> dict[str, list[float]]:
    """The per-layer overheads that make `rank_compute_s` (components only) equal the probes' measured seconds, least
    squares over all probes: per setting [send, receive], or [send, receive, send per receiver, receive per source,
    common] where the probes tell those apart (see `DeviceProfile.rank_overhead_s`; a part they do not: 0).

    The fixed parts are each setting's own. The per-peer parts are one pair shared by every setting: what grows
    with the peers is per-message work (a receive's unpack call, the runtime's per-source bookkeeping), not per-token
    work, which the components hold; sharing them fits 2 numbers from every setting's probes instead of 2 from each
    setting's few, so the noise of a shared machine moves them less.

    Causal models: rank 0 only sends and the last rank only receives, so probing both separates send from receive;
    probing them at two N (rank 0 sends to N-1 ranks, the last rank receives from N-1) separates the per-peer
    parts from the fixed ones (probes at one N fit no per-peer part); a probed middle rank (sends and receives) separates what every rank with a peer
    pays (common: hooks, masks, merge), which would otherwise be counted twice for the ranks that do both.
    A probed rank that sends and receives where no probe tells them apart (bidirectional models: every rank) gives
    their sum only: it is split evenly (the least-norm solution), which predicts every rank that does both alike.
    """
    if not probes:
        raise ValueError("fit_rank_overheads needs at least one RankProbe")
    components = dataclasses.replace(profile, rank_overhead_s={})
    keys: list[str] = []
    rows, residuals = [], []  # per probe: (setting index, sends?, receives?, receivers, sources, N)
    for probe in probes:
        _check_positive("RankProbe.seconds", probe.seconds)
        key = setting_key(probe.groups, probe.quantize)
        if key not in keys:
            keys.append(key)
        config = AstraConfig(num_devices=probe.num_devices, groups=probe.groups, quantize=probe.quantize,
                             codebook_size=profile.codebook_size, shard_sizes=None)  # fmt: skip
        receivers = len(code_receivers(probe.num_devices, probe.rank, profile.causal))
        sources = len(code_sources(probe.num_devices, probe.rank, profile.causal))
        rows.append((keys.index(key), float(receivers > 0), float(sources > 0), float(receivers), float(sources), probe.num_devices))
        residuals.append(probe.seconds - rank_compute_s(components, config, probe.num_tokens, probe.rank, probe.projection_table))
    of = [[r for r in rows if r[0] == i] for i in range(len(keys))]
    # A per-peer part only where some setting's probes that send (receive) ran at several N (at one N, the peer
    # counts of its ranks differ too, but they are all of that N: per-peer and fixed parts would trade off), the
    # common part only where a setting has a probe that does both and one that does one: else they could not be
    # told apart from the fixed parts.
    per_peer = [side for side in (0, 1) if any(len({r[5] for r in group if r[1 + side]}) > 1 for group in of)]
    common = any(any(r[1] and r[2] for r in group) and any(r[1] != r[2] for r in group) for group in of)
    width = 2 + common
    design = torch.zeros(len(rows), width * len(keys) + len(per_peer), dtype=torch.float64)
    for j, (i, sends, receives, receivers, sources, _) in enumerate(rows):
        design[j, width * i : width * i + 2] = torch.tensor([sends, receives], dtype=torch.float64)
        if common:
            design[j, width * i + 2] = float(sends or receives)
        for c, side in enumerate(per_peer):
            design[j, width * len(keys) + c] = (receivers, sources)[side]
    solution = (torch.linalg.pinv(profile.num_layers * design) @ torch.tensor(residuals, dtype=torch.float64)).tolist()
    slopes = [0.0, 0.0]
    for c, side in enumerate(per_peer):
        slopes[side] = solution[width * len(keys) + c]
    out = {}
    for i, key in enumerate(keys):
        fixed = solution[width * i : width * i + width]
        out[key] = fixed[:2] + (slopes + fixed[2:] if per_peer or common else [])
    return out


def _simulate_point_to_point(before: list[float], after: list[float], payload: list[int], layers: int, link: LinkModel,
                             start: float) -> list[float]:  # fmt: skip
    """Per rank, when its last layer ends: causal exchange, rank r's codes to every later rank each layer.

    Each rank's uplink carries one transfer at a time (its sends to the later ranks, one after another),
    and so does each downlink (what arrives from the earlier ranks)."""
    world = len(before)
    clock = [start] * world
    uplink, downlink = [0.0] * world, [0.0] * world
    for _ in range(layers):
        arrivals = [[] for _ in range(world)]
        sent_at = [clock[r] + before[r] for r in range(world)]
        for r in range(world):
            for receiver in range(r + 1, world):
                seconds = link.transfer_s(payload[r])
                uplink[r] = max(uplink[r], sent_at[r]) + seconds
                downlink[receiver] = max(downlink[receiver], uplink[r] - seconds) + seconds
                arrivals[receiver].append(max(uplink[r], downlink[receiver]))
        clock = [max([sent_at[r], *arrivals[r]]) + after[r] for r in range(world)]
    return clock


def _ring_all_gather_s(link: LinkModel, chunk_bytes: float, world: int) -> float:
    """A ring all-gather: N-1 steps, each sending one rank's chunk."""
    return (world - 1) * link.transfer_s(chunk_bytes) if world > 1 else 0.0


def _ring_all_reduce_s(link: LinkModel, tensor_bytes: float, world: int) -> float:
    """A ring all-reduce: 2(N-1) steps of 1/N of the tensor."""
    return 2 * (world - 1) * link.transfer_s(tensor_bytes / world) if world > 1 else 0.0


def predict_astra(profile: DeviceProfile, config: AstraConfig, num_tokens: int, link: LinkModel,
                  projection_table: bool = True) -> Prediction:  # fmt: skip
    layers, world = profile.num_layers, config.num_devices
    layout = astra_layout(profile, config, num_tokens)
    parts = [astra_rank_compute(profile, config, layout, r, projection_table) for r in range(world)]
    before, after = [p[0] for p in parts], [p[1] for p in parts]
    fixed = profile.fixed_s
    compute = [fixed + layers * (b + a) for b, a in zip(before, after)]
    payload = [code_bytes_per_layer(config, layout, r) for r in range(world)]
    if profile.causal:
        ends = _simulate_point_to_point(before, after, payload, layers, link, 0.0)
        latency = max(ends) + fixed
    else:  # one all-gather of codes padded to the largest shard per layer, then the pooling all-gather
        exchange = _ring_all_gather_s(link, max(payload), world)
        latency = fixed + layers * (max(before) + exchange + max(after)) + _ring_all_gather_s(link, 4 * profile.hidden_size, world)
    sent = max(expected_bytes_sent(config, layout, r, layers, profile.causal) for r in range(world))
    if not profile.causal:  # all-gather payloads are padded to the largest shard
        sent = layers * (world - 1) * max(payload)
    return Prediction("astra", latency, config.groups, config.quantize, projection_table if config.quantize == "hidden" else None,
                      compute, sent)  # fmt: skip


def runtime_shard_weights(profile: DeviceProfile, config: AstraConfig, content_tokens: int) -> list[float] | None:
    """``config.shard_sizes`` as the runtime resolves it (`AstraState.shard_weights`): "balanced" -> `balance`."""
    if config.shard_sizes != BALANCED:
        return config.shard_sizes
    if not profile.causal:
        return None
    from .distributed import PROJECTION_TABLE_MAX_BYTES

    costs = ShardCosts.for_model(profile.hidden_size, profile.hidden_size, config, PROJECTION_TABLE_MAX_BYTES)
    return list(balanced_sizes(content_tokens, config.num_devices, costs))


def predict_baseline(profile: DeviceProfile, method: str, num_tokens: int, world: int, link: LinkModel) -> Prediction:
    layers, hidden = profile.num_layers, profile.hidden_size
    if method == "single":
        seconds = profile.forward_s(num_tokens)
        return Prediction("single", seconds, compute_s=[seconds])
    layout = ShardLayout.for_sequence(num_tokens, world)
    per_layer = profile.per_token_s / layers
    if method in ("sp-fp32", "sp-fp16"):
        element = 4 if method == "sp-fp32" else 2
        compute = []
        for r in range(world):
            start, end = layout.bounds(r)
            n = layout.sizes[r]
            received = start if profile.causal else num_tokens - n
            keys = end if profile.causal else num_tokens
            compute.append(per_layer * n + profile.project_kv_s * received + profile.attention_masked_s * n * keys)
        exchange = _ring_all_gather_s(link, max(layout.sizes) * hidden * element, world)
        latency = profile.fixed_s + layers * (max(compute) + exchange)
        sent = layers * (world - 1) * max(layout.sizes) * hidden * element
        return Prediction(method, latency, compute_s=[profile.fixed_s + layers * c for c in compute], bytes_sent_per_rank=sent)
    if method == "tp":
        if profile.num_heads % world:
            raise ValueError(f"tensor parallelism needs the {profile.num_heads} heads divisible by N={world}")
        single = profile.forward_s(num_tokens) - profile.fixed_s
        tensor = num_tokens * hidden * 4
        latency = profile.fixed_s + single / world + layers * 2 * _ring_all_reduce_s(link, tensor, world)
        sent = layers * 2 * 2 * (world - 1) * tensor / world
        return Prediction("tp", latency, compute_s=[profile.fixed_s + single / world] * world, bytes_sent_per_rank=sent)
    raise ValueError(f"method must be one of {BASELINES}, got {method!r}")


def _accuracy_row(rows: list[dict], world: int, groups: int, quantize: str, codebook_size: int) -> dict | None:
    matches = [r for r in rows if (r.get("N"), r.get("G"), r.get("quantize"), r.get("K", r.get("codebook_size"))) == (world, groups, quantize, codebook_size)
               and str(r.get("run", "")).count("-") <= 2]  # fmt: skip
    return matches[-1] if matches else None


def plan(
    model: nn.Module | None = None,
    num_tokens: int | None = None,
    num_devices: int = 2,
    bandwidth_mbps: float = 10.0,
    profile: DeviceProfile | None = None,
    latency_ms: float = 0.0,
    loss_percent: float = 0.0,
    groups: tuple[int, ...] = GROUPS,
    quantize: tuple[str, ...] = QUANTIZE_MODES,
    codebook_size: int | None = None,
    projection_table: bool = True,
    shard_sizes: list[float] | str | None = None,
    accuracy_rows: list[dict] | None = None,
    reference_value: float | None = None,
    max_perplexity_increase_percent: float | None = None,
    max_accuracy_drop_points: float | None = None,
    link: LinkModel | None = None,
    rank_probes: bool = False,
) -> Plan:
    """Predict one device, ASTRA at each setting and the full-precision baselines; recommend the fastest allowed.

    ``num_tokens``: the sequence length (None: an image model's own token count). ``profile``: from
    `calibrate_device` (calibrated now on ``model`` when omitted, seconds; with ``rank_probes`` it also
    times this N's ranks without a network, as `calibrate_device(..., rank_probes=True)`: slower, closer
    predictions; ignored when a profile is given). ``bandwidth_mbps``,
    ``latency_ms``, ``loss_percent``: each device's link (or pass a whole `LinkModel` as ``link``).
    Accuracy: with ``accuracy_rows`` and one bound, an ASTRA setting is allowed only if a row with the same
    N, G, quantize and K is within the bound of ``reference_value`` (e.g. the control's perplexity).
    ``shard_sizes``: as `AstraConfig.shard_sizes`; the default None (even) is what the runtime does by default.
    """
    if num_tokens is None:
        num_tokens = _native_tokens(model) if model is not None else None
        if num_tokens is None:
            raise ValueError("num_tokens is needed (the prompt length) unless the model is an image model with a fixed token count")
    _check_int("num_tokens", num_tokens, 2)
    _check_int("num_devices", num_devices, 1)
    if num_tokens < num_devices:
        raise ValueError(f"num_tokens={num_tokens} must be >= num_devices={num_devices} (every device needs a token)")
    for g in groups:
        _check_int("groups", g, 1)
    for mode in quantize:
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be among {list(QUANTIZE_MODES)}, got {mode!r}")
    bounds = [b for b in (max_perplexity_increase_percent, max_accuracy_drop_points) if b is not None]
    if len(bounds) > 1:
        raise ValueError("give one accuracy bound: max_perplexity_increase_percent or max_accuracy_drop_points")
    if bounds:
        _check_range("accuracy bound", bounds[0], 0.0, math.inf)
        if accuracy_rows is None or reference_value is None:
            raise ValueError("an accuracy bound needs accuracy_rows and reference_value (e.g. the control's perplexity)")
    link = link or LinkModel(bandwidth_mbps, latency_ms, loss_percent)
    if profile is None:
        if model is None:
            raise ValueError("plan needs a model or a DeviceProfile (profile=calibrate_device(model))")
        profile = calibrate_device(model, num_tokens=num_tokens, groups=tuple(groups), codebook_size=codebook_size,
                                   rank_probes=rank_probes, probe_devices=max(num_devices, 2))  # fmt: skip
    elif model is not None:
        hidden, layers, _ = _model_dims(model)
        if (hidden, layers) != (profile.hidden_size, profile.num_layers):
            raise ValueError(f"the profile was calibrated for width {profile.hidden_size} x {profile.num_layers} layers, "
                             f"the model has {hidden} x {layers}: calibrate_device(model) for this model")  # fmt: skip
    if codebook_size is None and model is not None and is_patched(model):
        codebook_size = astra_state(model).config.codebook_size  # a patched model: plan for its own K
    codebook_size = codebook_size or profile.codebook_size
    if codebook_size != profile.codebook_size:
        raise ValueError(f"codebook_size={codebook_size} but the profile timed K={profile.codebook_size}: "
                         f"calibrate_device(model, codebook_size={codebook_size})")  # fmt: skip
    single = predict_baseline(profile, "single", num_tokens, 1, link)
    predictions = [single]
    for method in ("sp-fp32", "sp-fp16", "tp"):
        if num_devices > 1 and not (method == "tp" and profile.num_heads % num_devices):
            predictions.append(predict_baseline(profile, method, num_tokens, num_devices, link))
    for g in groups:
        if profile.hidden_size % g:
            continue
        for mode in quantize:
            config = AstraConfig(num_devices=num_devices, groups=g, quantize=mode, codebook_size=codebook_size,
                                 shard_sizes=shard_sizes)  # fmt: skip
            predictions.append(predict_astra(profile, config, num_tokens, link, projection_table))
    for p in predictions:
        p.speedup_vs_single = single.latency_s / p.latency_s
        if p.method == "astra" and bounds:
            row = _accuracy_row(accuracy_rows, num_devices, p.groups, p.quantize, codebook_size)
            if row is None:
                p.allowed, p.reason = False, "no accuracy measurement for this N, G, quantize, K"
                continue
            p.accuracy = {"metric": row["metric"], "value": row["value"], "command": row.get("command")}
            if max_perplexity_increase_percent is not None:
                change = 100 * (row["value"] - reference_value) / reference_value
                p.allowed = change <= max_perplexity_increase_percent
                p.reason = f"{row['metric']} {change:+.2f} % vs {reference_value:.4g}"
            else:
                drop = reference_value - row["value"]
                p.allowed = drop <= max_accuracy_drop_points
                p.reason = f"{row['metric']} {-drop:+.2f} points vs {reference_value:.4g}"
    candidates = [p for p in predictions if p.method == "astra" and p.allowed]
    best = min(candidates, key=lambda p: p.latency_s) if candidates else None
    if best is None:
        single.reason = "no ASTRA setting " + ("meets the accuracy bound" if bounds else "applies")
        recommended = single
    elif best.latency_s >= single.latency_s:
        single.reason = f"the fastest ASTRA setting ({best.label}, {best.latency_s:.3g} s) would be slower than one device"
        recommended = single
    else:
        recommended = best
        if bounds:
            best.reason = "fastest setting within the accuracy bound (" + best.reason + ")"
    return Plan(num_tokens, num_devices, link, predictions, recommended, profile)


def balanced_shard_sizes(profile: DeviceProfile, num_tokens: int, config: AstraConfig, projection_table: bool = True) -> list[int]:
    """Shard sizes that equalise the predicted per-rank compute (causal models: later ranks get fewer tokens,
    since they attend to more keys and rebuild more received tokens' K/V), from a measured device profile.
    Pass as AstraConfig.shard_sizes; ``shard_sizes="balanced"`` uses `balance` instead (no profile needed)."""
    _check_int("num_tokens", num_tokens, config.num_devices)
    world = config.num_devices
    sizes = [num_tokens / world] * world
    for _ in range(50):  # fixed-point: shrink the slow ranks' shards in proportion to their predicted time
        layout = ShardLayout(tuple(_round_sizes(sizes, num_tokens)))
        times = [sum(astra_rank_compute(profile, config.replace(shard_sizes=None), layout, r, projection_table)) for r in range(world)]
        mean = statistics.fmean(times)
        sizes = [s * (mean / t) ** 0.5 for s, t in zip(sizes, times)]
        total = sum(sizes)
        sizes = [s * num_tokens / total for s in sizes]
    return _round_sizes(sizes, num_tokens)


def _round_sizes(sizes: list[float], total: int) -> list[int]:
    out = [max(1, int(s)) for s in sizes]
    for i in sorted(range(len(sizes)), key=lambda i: sizes[i] - int(sizes[i]), reverse=True)[: total - sum(out)]:
        out[i] += 1
    while sum(out) > total:
        out[out.index(max(out))] -= 1
    return out


# ------------------------------------------------------------------------------------- checks
def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_range(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok or (high == math.inf and not math.isfinite(value)):
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")
