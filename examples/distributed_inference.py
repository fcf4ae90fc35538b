"""Distributed ASTRA inference: one process per device, each holding only its shard of the tokens.

    accelerate launch --multi_gpu --num_processes 2 examples/distributed_inference.py --task gpt2   # CPU too
    torchrun --nproc_per_node 2 examples/distributed_inference.py --task vit --json result.json
    python examples/distributed_inference.py --task gpt2 --num-processes 3     # starts 3 local processes

With no other argument it runs offline on an embedded default: a tiny random (seeded) GPT2 or ViT,
patched with ASTRA and calibrated on generated data, and a seeded input. ``--model PATH`` loads a patched
checkpoint saved with ``astra.save_pretrained``. Rank 0 prints the prediction, the latency with and
without overlap, the difference to the single-process simulation, and the bytes every rank sent
against what full-precision sequence parallelism would have sent; ``--json PATH`` writes all of it.
See docs/distributed.md for several machines and gloo vs NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

import transformers_astra as astra
from transformers_astra.distributed import DistributedRuntime, expected_code_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["gpt2", "vit"], default="gpt2", help="model family of the embedded default")
    parser.add_argument("--model", type=Path, help="a patched checkpoint (astra.save_pretrained) instead of the embedded default")
    parser.add_argument("--tokens", type=int, default=128, help="GPT2 prompt length of the default input")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--groups", type=int, default=32, help="G of the embedded default")
    parser.add_argument("--codebook-size", type=int, default=1024, help="K of the embedded default")
    parser.add_argument("--quantize", choices=["hidden", "kv"], default="hidden", help="what the embedded default sends")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="GPT2: tokens to generate on the last rank")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per mode (median reported)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a dead or stalled rank is an error")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU (gloo) even when CUDA is available")
    parser.add_argument("--num-processes", type=int, help="processes to start when not launched by accelerate/torchrun")
    parser.add_argument("--json", type=Path, help="write the machine-readable result here (rank 0)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ launch
def launched_world_size() -> int | None:
    """WORLD_SIZE when torchrun, `accelerate launch` (torchrun-based) or mpirun started us, else None."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def started_by_accelerate_alone() -> bool:
    """True when `accelerate launch` ran this script as a single process with no process group.

    Without a config file, ``accelerate launch --cpu --num_processes N`` (and ``--num_processes N`` on a
    machine with no GPU) starts the script once: accelerate's CPU multi-process launcher needs mpirun.
    ``accelerate launch --multi_gpu --num_processes N`` uses torchrun and works on CPU (gloo) as well.
    """
    return any(name.startswith("ACCELERATE_") for name in os.environ)


def spawn_locally(args: argparse.Namespace, num_processes: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    mp.start_processes(spawned_rank, args=(num_processes, args), nprocs=num_processes, start_method="spawn")


def spawned_rank(rank: int, world_size: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    run(args)


def init_process_group(args: argparse.Namespace) -> torch.device:
    """gloo on CPU, NCCL on GPU; one device per process (LOCAL_RANK picks the GPU)."""
    use_cuda = torch.cuda.is_available() and not args.cpu and os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda and local_rank >= torch.cuda.device_count():
        sys.exit(f"process LOCAL_RANK={local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                 "start at most one process per GPU, or pass --cpu to run on the CPU over gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    return device


# ------------------------------------------------------------------------------ model and input
def embedded_model(task: str, num_devices: int, args: argparse.Namespace, calibrate: bool):
    """A tiny random GPT2 or ViT (seeded), patched; calibrated on generated data where ``calibrate``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if task == "gpt2":
        positions = max(512, args.tokens + args.max_new_tokens)  # room for any --tokens
        config = GPT2Config(n_embd=256, n_layer=4, n_head=8, vocab_size=1024, n_positions=positions, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
        calibration = [{"input_ids": torch.randint(3, config.vocab_size, (8, args.tokens), generator=generator)}]
    else:
        config = ViTConfig(image_size=32, patch_size=4, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                           intermediate_size=512, num_labels=10)
        model = ViTForImageClassification(config)
        calibration = [{"pixel_values": torch.randn(16, 3, 32, 32, generator=generator)}]
    astra.patch(model.eval(), num_devices=num_devices, groups=args.groups, codebook_size=args.codebook_size, quantize=args.quantize)
    if calibrate:
        # A few k-means iterations on max(K, 1024) vectors per layer: enough for a demo, seconds on a CPU.
        astra.calibrate(model, calibration, max_samples=max(args.codebook_size, 1024), kmeans_iters=4, progress=False)
    return model


def default_inputs(task: str, model, args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(2)
    if task == "gpt2":
        inputs = {"input_ids": torch.randint(3, model.config.vocab_size, (args.batch_size, args.tokens), generator=generator)}
    else:
        size = model.config.image_size
        inputs = {"pixel_values": torch.randn(args.batch_size, 3, size, size, generator=generator)}
    return {name: value.to(device) for name, value in inputs.items()}


def load_model(args: argparse.Namespace, world_size: int, device: torch.device):
    """``--model`` on every rank, or the embedded default: calibrated on rank 0 and broadcast to the others,
    so that every rank holds bit-identical weights and codebooks even across machines (the runtime's
    handshake checks it either way)."""
    if args.model is not None:
        model = astra.from_pretrained(args.model, num_devices=world_size)
        args.task = model.config.model_type
        return model.eval().to(device)
    model = embedded_model(args.task, world_size, args, calibrate=dist.get_rank() == 0)
    state = [model.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(state, src=0, device=device if device.type == "cuda" else None)
    model.load_state_dict(state[0])
    return model.eval().to(device)


# ------------------------------------------------------------------------------------- the run
def timed_forward(runtime: DistributedRuntime, inputs: dict, device: torch.device) -> float:
    """Seconds until the slowest rank has its output (ranks start together after a barrier)."""
    dist.barrier()
    started = time.perf_counter()
    runtime(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=runtime.comm_device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def shard_difference(runtime: DistributedRuntime, got, simulated) -> float:
    if runtime.causal:
        start, end = runtime.layout.bounds(runtime.rank)
        simulated = simulated[:, start:end]
    return (got.float() - simulated.float()).abs().max().item()


def run(args: argparse.Namespace) -> None:
    device = init_process_group(args)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = load_model(args, world_size, device)
    inputs = default_inputs(args.task, model, args, device)
    runtime = DistributedRuntime(model, timeout=args.timeout)
    with torch.no_grad():
        simulated = model(**inputs).logits  # the single-process simulation of the same patched model

    latencies = {}
    for overlap in (False, True):
        runtime.overlap = overlap
        runtime(**inputs)  # warm-up
        latencies[overlap] = statistics.median(timed_forward(runtime, inputs, device) for _ in range(args.repeats))
    output = runtime(**inputs)
    traffic, difference = runtime.traffic, shard_difference(runtime, output.logits, simulated)
    layout, batch = runtime.layout, next(iter(inputs.values())).shape[0]
    expected = expected_code_bytes(model._astra_state.config, layout, rank, batch, runtime.num_layers, runtime.causal)

    if args.task == "gpt2":
        prompt = inputs["input_ids"]
        generated = runtime.generate(prompt, max_new_tokens=args.max_new_tokens)[:, prompt.shape[1]:]
        with torch.no_grad():
            wanted = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens, do_sample=False)
        prediction = {"next_tokens": generated.tolist(), "matches_simulation": torch.equal(generated, wanted[:, prompt.shape[1]:])}
        prediction["generation_stats"] = runtime.generation_stats.to_dict()  # time to first token, decode tokens/s
    else:
        prediction = {"classes": output.logits.argmax(-1).tolist(), "matches_simulation": torch.equal(output.logits.argmax(-1), simulated.argmax(-1))}

    mine = {"traffic": traffic.to_dict(), "diff": difference, "expected_code_bytes": expected}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        config = model._astra_state.config
        result = {
            "task": args.task, "N": world_size, "G": config.groups, "K": config.codebook_size, "quantize": config.quantize,
            "backend": dist.get_backend(), "device": device.type, "batch_size": batch, "tokens": layout.total,
            "shard_sizes": list(layout.sizes), "model": str(args.model) if args.model else "embedded default",
            "prediction": prediction,
            "max_abs_diff_vs_simulation": max(r["diff"] for r in everyone),
            "bytes_sent_per_rank": [r["traffic"]["total_sent"] for r in everyone],
            "bytes_received_per_rank": [r["traffic"]["total_received"] for r in everyone],
            "code_bytes_sent_per_rank": [r["traffic"]["sent"]["codes"] for r in everyone],
            "expected_code_bytes": [r["expected_code_bytes"] for r in everyone],
            "full_precision_sp_bytes_per_rank": [r["traffic"]["full_precision_bytes"] for r in everyone],
            "traffic_per_rank": [r["traffic"] for r in everyone],
            "latency_s": latencies[True], "latency_no_overlap_s": latencies[False], "repeats": args.repeats,
        }
        report(result)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
    dist.barrier()
    runtime.close()
    dist.destroy_process_group()


def report(result: dict) -> None:
    bits = (result["K"] - 1).bit_length()
    print(f"ASTRA distributed inference: task={result['task']}, N={result['N']} processes ({result['backend']}, "
          f"{result['device']}), G={result['G']}, K={result['K']} ({bits}-bit codes), quantize={result['quantize']}")
    print(f"input: {result['batch_size']} x {result['tokens']} tokens, shards {result['shard_sizes']}; model: {result['model']}")
    prediction = result["prediction"]
    what = "greedy next tokens" if "next_tokens" in prediction else "classes"
    predicted = prediction.get("next_tokens", prediction.get("classes"))
    print(f"prediction ({what}): {predicted}; same as the single-process simulation: {prediction['matches_simulation']}")
    if (stats := prediction.get("generation_stats")) and stats["time_to_first_token_s"] is not None:
        rate = f"{stats['decode_tokens_per_s']:.1f}" if stats["decode_tokens_per_s"] is not None else "n/a"
        print(f"generate: time to first token {stats['time_to_first_token_s'] * 1e3:.1f} ms (parallel prefill "
              f"{stats['prefill_s'] * 1e3:.1f} ms), then {rate} tokens/s per sequence on the last rank")
    print(f"max |distributed - single-process simulation| = {result['max_abs_diff_vs_simulation']:.2e}")
    print(f"latency per forward: {result['latency_s'] * 1e3:.1f} ms with overlap, "
          f"{result['latency_no_overlap_s'] * 1e3:.1f} ms without (median of {result['repeats']})")
    print("bytes sent per forward:   rank  total     codes     full-precision sequence parallelism")
    for rank, (total, codes, full) in enumerate(zip(result["bytes_sent_per_rank"], result["code_bytes_sent_per_rank"],
                                                  result["full_precision_sp_bytes_per_rank"])):
        print(f"{'':26}{rank:<6}{total:<10}{codes:<10}{full}")
    sent, full = sum(result["bytes_sent_per_rank"]), sum(result["full_precision_sp_bytes_per_rank"])
    print(f"{'':26}all   {sent:<10}{sum(result['code_bytes_sent_per_rank']):<10}{full}  ({full / max(sent, 1):.1f}x fewer bytes than full precision)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if launched_world_size() is not None:
        run(args)
        return
    if started_by_accelerate_alone() and args.num_processes is None:
        sys.exit(
            "accelerate launch started a single process with no process group (without a config file, "
            "`--cpu --num_processes N` does not start N processes). Use\n"
            "  accelerate launch --multi_gpu --num_processes N examples/distributed_inference.py ...   (gloo on CPU)\n"
            "  torchrun --nproc_per_node N examples/distributed_inference.py ...\n"
            "or run it with python and --num-processes N to start N local processes."
        )
    spawn_locally(args, args.num_processes or 2)


if __name__ == "__main__":
    sys.exit(main())
