"""Where an ASTRA rank's time goes, on one CPU thread, without a network.

Each rank r of N is emulated in one process: the collectives run locally (`links` compute mode) and
torch.distributed reports rank r of N, so `DistributedRuntime` does exactly rank r's work. Measured:

- per-rank compute of the whole GPT2 prefill (1024 tokens) with the runtime's overlapped attention
  (two partial attentions merged by log-sum-exp) and without (one SDPA over [own | received] keys);
- per layer: encoding this rank's tokens (G=1 vs G=32), decoding + projecting the received tokens
  (hidden mode), and the rest of the layer's local work (one GPT2 block on the shard);
- a proposed encoder (one bmm against codebooks augmented with -|c|^2/2, argmax, in cache-sized
  chunks) against `GroupedVQ.encode`, checked to give the same codes;
- hidden mode, G=1: decoding through a precomputed table of every codeword's K/V projection (exact:
  the projection is linear) against decode + projection, checked to give the same keys/values.

    python -m benchmarks.profile_astra --out docs/results/astra_profile.json

``--balanced``: per-rank compute (runtime defaults) with even shards against the shard sizes of
`transformers_astra.balanced_shard_sizes` (from a device profile calibrated here first), with the
planner's prediction of both; written to ``--balanced-out``:

    python -m benchmarks.profile_astra --balanced --n 4 --groups 1 --tokens 512 --balanced-out docs/results/balanced_shards.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

from . import links

links.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import transformers_astra as astra  # noqa: E402
from transformers_astra.distributed import DistributedRuntime  # noqa: E402

from .workloads import build  # noqa: E402

# Scores of one chunk of the proposed encoder: about 2 MiB, so argmax reads them from cache.
CHUNK_SCORE_BYTES = 2 << 20


def cpu_timed_runs(fn, repeats: int, prepare=None) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds of this process) of ``repeats`` calls of ``fn`` after one untimed warm-up call;
    with ``prepare``, each call is ``fn(prepare())`` and only ``fn`` is timed (e.g. `ceiling.rank_call`'s KV cache,
    built afresh per call). On a shared machine the CPU time leaves out the moments other processes took the cores
    (the wall time does not), so a small change shows through their load."""
    walls, cpus = [], []
    for index in range(repeats + 1):
        arguments = () if prepare is None else (prepare(),)
        wall, cpu = time.perf_counter(), time.process_time()
        fn(*arguments)
        if index:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return walls, cpus


def timed_runs(fn, repeats: int, prepare=None) -> list[float]:
    """The wall seconds of `cpu_timed_runs`."""
    return cpu_timed_runs(fn, repeats, prepare)[0]


def best_time(fn, repeats: int = 5) -> float:
    return statistics.median(timed_runs(fn, repeats))


@contextlib.contextmanager
def as_rank(rank: int, world: int):
    """torch.distributed reports rank ``rank`` of ``world`` (the collectives are local in compute mode)."""
    saved = dist.get_rank, dist.get_world_size
    dist.get_rank, dist.get_world_size = (lambda group=None: rank), (lambda group=None: world)
    try:
        yield
    finally:
        dist.get_rank, dist.get_world_size = saved


def rank_compute(world: int, groups: int, quantize: str, overlap: bool, repeats: int, table: bool = False,
                 tokens: int | None = None, shard_sizes: list[int] | None = None) -> list[float]:  # fmt: skip
    times = []
    for rank in range(world):
        workload = build("gpt2", tokens=tokens)
        astra.patch(workload.model, astra.AstraConfig(num_devices=world, groups=groups, quantize=quantize, shard_sizes=shard_sizes))
        with as_rank(rank, world), torch.inference_mode():
            runtime = DistributedRuntime(workload.model, overlap=overlap, check_inputs=False, projection_table=table)
            times.append(best_time(lambda: runtime(**workload.inputs, logits_to_keep=1), repeats))
            runtime.close()
    return times


def augmented_codebook(codebook: torch.Tensor) -> torch.Tensor:
    """(G, d+1, K): codewords and -|c|^2/2 as one extra row, so that x.c - |c|^2/2 is one bmm."""
    half_norms = -0.5 * codebook.pow(2).sum(-1, keepdim=True)  # (G, K, 1)
    return torch.cat([codebook, half_norms], dim=-1).transpose(1, 2).contiguous()


def encode_augmented(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest codeword per group: argmax of x.c - |c|^2/2, chunked so the scores stay in cache."""
    groups, width, size = table.shape[0], table.shape[1] - 1, table.shape[2]
    flat = x.reshape(-1, groups, width)
    ones = flat.new_ones(flat.shape[0], groups, 1)
    grouped = torch.cat([flat, ones], dim=-1).transpose(0, 1)  # (G, n, d+1)
    codes = torch.empty(groups, flat.shape[0], dtype=torch.long)
    chunk = max(1, CHUNK_SCORE_BYTES // (4 * groups * size))
    for start in range(0, flat.shape[0], chunk):
        scores = torch.bmm(grouped[:, start : start + chunk], table)
        codes[:, start : start + chunk] = scores.argmax(-1)
    return codes.T.reshape(*x.shape[:-1], groups)


def projected_table_parts(model, attention, quantizer, remote_codes, decode_project, repeats: int) -> dict:
    """G=1 hidden mode: K/V of every codeword computed once per layer, so a receiver only gathers rows."""
    adapter = model._astra_state.adapter
    table_key, table_value = adapter.project_kv(attention, quantizer.codebook.detach()[0][None])  # (1, H, K, d)

    def gather():
        index = remote_codes[0, :, 0]
        return table_key[:, :, index], table_value[:, :, index]

    exact_key, exact_value = decode_project()
    key, value = gather()
    return {
        "decode_project_table_s": best_time(gather, repeats),
        "table_matches": bool(torch.allclose(key, exact_key, atol=1e-4) and torch.allclose(value, exact_value, atol=1e-4)),
        "table_bytes_per_layer": 2 * table_key.numel() * table_key.element_size(),
    }


def layer_parts(world: int, groups: int, quantize: str, repeats: int) -> dict:
    """Per-layer costs of rank 0 (encodes) and the last rank (decodes and projects all earlier tokens)."""
    workload = build("gpt2")
    model = astra.patch(workload.model, astra.AstraConfig(num_devices=world, groups=groups, quantize=quantize))
    block, attention = model.transformer.h[0], model.transformer.h[0].attn
    quantizer = attention.astra_quantizer
    shard = workload.num_tokens // world
    width = quantizer.width
    sent = torch.randn(1, shard, width)
    remote_codes = torch.randint(0, quantizer.codebook_size, (1, workload.num_tokens - shard, quantizer.groups))
    hidden = torch.randn(1, shard, model.config.n_embd)
    table = augmented_codebook(quantizer.codebook.detach())
    same = torch.equal(quantizer.encode(sent), encode_augmented(sent, table))
    with torch.inference_mode():
        decode_project = (lambda: attention.astra_quantizer.decode(remote_codes)) if quantize == "kv" else (
            lambda: model._astra_state.adapter.project_kv(attention, quantizer.decode(remote_codes))
        )
        table_parts = {}
        if quantize == "hidden" and groups == 1:
            table_parts = projected_table_parts(model, attention, quantizer, remote_codes, decode_project, repeats)
        model.set_attn_implementation("sdpa")  # the plain block: the local work every scheme shares
        return {
            **table_parts,
            "encode_s": best_time(lambda: quantizer.encode(sent), repeats),
            "encode_proposed_s": best_time(lambda: encode_augmented(sent, table), repeats),
            "proposed_codes_identical": same,
            "decode_and_project_last_rank_s": best_time(decode_project, repeats),
            "block_on_shard_s": best_time(lambda: block(hidden), repeats),
            "tokens_encoded": shard,
            "tokens_decoded_last_rank": workload.num_tokens - shard,
        }


def balanced_rows(args) -> list[dict]:
    """Even shards against `balanced_shard_sizes`, measured (per-rank compute) and predicted."""
    from transformers_astra.planner import LinkModel, predict_astra

    workload = build("gpt2", tokens=args.tokens)
    profile = astra.calibrate_device(workload.model, num_tokens=workload.num_tokens, threads=1, repeats=args.repeats)
    unlimited = LinkModel(1e9, per_message_s=0.0)
    rows = []
    for world in args.n:
        for groups in args.groups:
            for quantize in args.quantize:
                config = astra.AstraConfig(num_devices=world, groups=groups, quantize=quantize)
                sizes = astra.balanced_shard_sizes(profile, workload.num_tokens, config)
                row = {"model": "gpt2", "tokens": workload.num_tokens, "N": world, "G": groups, "quantize": quantize,
                       "threads": 1, "balanced_sizes": sizes, "settings": "runtime defaults (overlap=True, projection_table=True)"}  # fmt: skip
                for name, shard_sizes in (("even", None), ("balanced", sizes)):
                    measured = rank_compute(world, groups, quantize, True, args.repeats, True, args.tokens, shard_sizes)
                    predicted = predict_astra(profile, config.replace(shard_sizes=shard_sizes), workload.num_tokens, unlimited)
                    row[f"rank_compute_s_{name}"] = measured
                    row[f"predicted_rank_compute_s_{name}"] = predicted.compute_s
                row["measured_gain"] = max(row["rank_compute_s_even"]) / max(row["rank_compute_s_balanced"])
                row["predicted_gain"] = max(row["predicted_rank_compute_s_even"]) / max(row["predicted_rank_compute_s_balanced"])
                row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                row["load_average_1m"] = __import__("os").getloadavg()[0]
                row["command"] = "python -m benchmarks.profile_astra " + " ".join(argv_of(args))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def argv_of(args) -> list[str]:
    return args.argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--quantize", nargs="+", default=["hidden"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/results/astra_profile.json")
    parser.add_argument("--balanced", action="store_true", help="only compare even and balanced shards (see the module doc)")
    parser.add_argument("--tokens", type=int, help="GPT2 prefill length (default 1024)")
    parser.add_argument("--balanced-out", default="docs/results/balanced_shards.json")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else __import__("sys").argv[1:])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29413", rank=0, world_size=1)
    links.set_mode("compute", None)
    if args.balanced:
        rows = balanced_rows(args)
        with open(args.balanced_out, "w") as f:
            json.dump(rows, f, indent=1)
        dist.destroy_process_group()
        return
    single = build("gpt2")
    with torch.inference_mode():
        single_s = best_time(lambda: single.model(**single.inputs, logits_to_keep=1, use_cache=False), args.repeats)
    rows = []
    for world in args.n:
        for groups in args.groups:
            for quantize in args.quantize:
                row = {"model": "gpt2", "tokens": 1024, "N": world, "G": groups, "quantize": quantize, "threads": 1,
                       "single_device_s": single_s, **layer_parts(world, groups, quantize, args.repeats)}  # fmt: skip
                for overlap in (False, True):
                    row[f"rank_compute_s_overlap_{overlap}".lower()] = rank_compute(world, groups, quantize, overlap, args.repeats)
                # The runtime's codeword-projection tables (hidden mode), overlap off.
                row["rank_compute_s_table"] = rank_compute(world, groups, quantize, False, args.repeats, table=True)
                row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                row["load_average_1m"] = __import__("os").getloadavg()[0]
                row["command"] = "python -m benchmarks.profile_astra " + " ".join(argv or __import__("sys").argv[1:])
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
