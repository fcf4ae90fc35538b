"""Distributed ASTRA inference: one process per device, each holding only its shard of the tokens.

    accelerate launch --multi_gpu --num_processes 2 examples/distributed_inference.py --task gpt2   # CPU too
    torchrun --nproc_per_node 2 examples/distributed_inference.py --task vit --json result.json
    python examples/distributed_inference.py --task gpt2 --num-processes 3     # starts 3 local processes

By default it runs the trained ASTRA checkpoint shipped in checkpoints/ (GPT2 on the King James Bible,
ViT on Fashion-MNIST; see each folder's COMMAND.md): GPT2 generates text from ``--prompt``, ViT classifies
the Fashion-MNIST test images shipped with its checkpoint. ``--model PATH`` runs another patched
checkpoint; ``--random`` the tiny random (seeded) model calibrated on generated data that the tests use
(also the fallback, with a warning, where the shipped checkpoint is missing). Every rank loads the model
itself: nothing but tensors of known sizes crosses the network (no pickled objects).

Rank 0 prints the prediction, its agreement with the single-process simulation, the latency with and
without overlap, time to first token (GPT2) or accuracy against the unpatched model (ViT), and the bytes
every rank sent against what full-precision sequence parallelism would have sent; ``--json PATH`` writes
all of it. ``--interface`` and ``--secret-file`` (or ``ASTRA_SECRET``) are for shared networks: see
docs/distributed.md ("Several machines", "Faults and trust").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    TextStreamer,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import transformers_astra as astra
from transformers_astra.distributed import TRAFFIC_KINDS, DistributedRuntime, expected_code_bytes
from transformers_astra.patch import astra_state
from transformers_astra import rendezvous
from transformers_astra.trust import bind_interface

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
# The trained checkpoints `make demo` runs (made by the commands in each folder's COMMAND.md).
SHIPPED = {"gpt2": CHECKPOINTS / "gpt2-kjv-astra-n2", "vit": CHECKPOINTS / "vit-fashion-mnist-astra-n2"}
# Fashion-MNIST test images shipped next to the ViT checkpoint (uint8 "images" (n, 28, 28), int64 "labels"):
# the demo runs before `make test` installs the Debian dataset, and needs no root or network.
DEMO_IMAGES = "demo_images.safetensors"
CAUSAL_LM_CLASSES = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())  # architectures AutoModelForCausalLM builds
DEFAULT_PROMPT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
                  "and darkness was upon the face of the deep. And God said,")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["gpt2", "vit"], default="gpt2", help="which shipped checkpoint (or random model)")
    parser.add_argument("--model", type=Path, help="another patched checkpoint instead of the shipped one")
    parser.add_argument("--random", action="store_true", help="the tiny random (seeded) model instead of a trained one")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="GPT2 checkpoint: the text to continue")
    parser.add_argument("--images", type=int, default=None, help="ViT checkpoint: classify this many shipped images (default all)")
    parser.add_argument("--tokens", type=int, default=128, help="--random GPT2: prompt length")
    parser.add_argument("--batch-size", type=int, default=1, help="--random: rows of the input")
    parser.add_argument("--groups", type=int, default=32, help="--random: G")
    parser.add_argument("--codebook-size", type=int, default=1024, help="--random: K")
    parser.add_argument("--quantize", choices=["hidden", "kv"], default="hidden", help="--random: what is sent")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="GPT2: tokens to generate (default 48, --random 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per mode (median reported)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds of silence from a dead or frozen rank; a busy rank is waited for")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU (gloo) even when CUDA is available")
    parser.add_argument("--num-processes", type=int, help="processes to start when not launched by accelerate/torchrun")
    parser.add_argument("--interface", help="network interface gloo/NCCL use (e.g. eth1): GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME")
    parser.add_argument("--secret-file", type=Path, help="file holding the shared secret every rank must prove "
                        "(default: the ASTRA_SECRET environment variable, if set)")
    parser.add_argument("--plan", action="store_true", help="rank 0 also prints astra.plan's prediction for this "
                        "model, N and a 10 Mbit/s link (calibrates the device first, timing this N's ranks "
                        "without a network: seconds for the tiny models, ~50 s for GPT2-small at 1024 tokens on one CPU thread)")
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
    """Start the processes here. The rendezvous is a file (torch's FileStore), not a TCP port, and gloo uses
    the loopback interface unless --interface names another: nothing listens on the machine's network."""
    with tempfile.TemporaryDirectory(prefix="astra-rendezvous-") as folder:
        args.init_method = f"file://{Path(folder) / 'store'}"
        args.interface = args.interface or "lo"
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
    if args.interface:  # before the process group exists: gloo binds its sockets to this interface's address
        address = bind_interface(args.interface)
        print(f"rank {os.environ.get('RANK', '?')}: gloo/NCCL use interface {args.interface} ({address})", flush=True)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if getattr(args, "init_method", None):  # spawn_locally's file rendezvous (no TCP store to bound)
            # --timeout is the runtime's liveness timeout; one collective may take as long as a busy rank needs.
            operation_timeout = timedelta(seconds=max(rendezvous.DEFAULT_OPERATION_TIMEOUT_S, args.timeout))
            dist.init_process_group(backend, init_method=args.init_method, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=operation_timeout)
        else:  # torchrun / accelerate: MASTER_ADDR, MASTER_PORT; start-up waits bounded by --timeout
            rendezvous.init_process_group(backend, timeout=args.timeout)
    return device


# ------------------------------------------------------------------------------ model and input
def load_checkpoint(path: Path, num_devices: int):
    """A saved ASTRA checkpoint in float32, through transformers' Auto classes (``import transformers_astra``
    registers the quantizer that patches the model while it loads). For another number of processes than
    the checkpoint was saved with, `astra.from_pretrained` overrides ``num_devices`` (with a warning unless the
    checkpoint's ``fine_tuned_num_devices`` records that N)."""
    config = AutoConfig.from_pretrained(path)
    auto_class = AutoModelForCausalLM if set(config.architectures or ()) & CAUSAL_LM_CLASSES else AutoModelForImageClassification
    saved = config.quantization_config if isinstance(config.quantization_config, dict) else config.quantization_config.to_dict()
    if saved.get("num_devices") == num_devices:
        return auto_class.from_pretrained(path, dtype=torch.float32)
    return astra.from_pretrained(path, model_class=auto_class, num_devices=num_devices, dtype=torch.float32)


def model_source(args: argparse.Namespace, rank: int) -> Path | None:
    """The checkpoint to run, or None for the tiny random model (asked for, or the shipped one is missing)."""
    if args.random:
        return None
    if args.model is not None:
        if not (args.model / "config.json").is_file():
            sys.exit(f"--model {args.model}: no config.json there (expected a folder written by save_pretrained)")
        return args.model
    shipped = SHIPPED[args.task]
    if (shipped / "config.json").is_file():
        return shipped
    if rank == 0:
        print(f"WARNING: no trained {args.task} checkpoint in {shipped} (not made yet; {CHECKPOINTS / 'README.md'} says "
              "how it is made): running the tiny RANDOM model instead (--random), whose predictions mean nothing",
              file=sys.stderr, flush=True)
    return None


def embedded_model(task: str, num_devices: int, args: argparse.Namespace):
    """A tiny random GPT2 or ViT, patched and calibrated on generated data, all seeded: every rank builds
    the same model bit for bit (on one machine; the runtime's handshake checks it on any)."""
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
    # A few k-means iterations on max(K, 1024) vectors per layer: enough for a demo, seconds on a CPU.
    astra.calibrate(model, calibration, max_samples=max(args.codebook_size, 1024), kmeans_iters=4, progress=False, seed=0)
    return model


def random_inputs(task: str, model, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(2)
    if task == "gpt2":
        return {"input_ids": torch.randint(3, model.config.vocab_size, (args.batch_size, args.tokens), generator=generator)}
    size = model.config.image_size
    return {"pixel_values": torch.randn(args.batch_size, 3, size, size, generator=generator)}


def demo_images(checkpoint: Path, model, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, labels) of the test images shipped with a ViT checkpoint, preprocessed as in training."""
    from safetensors.torch import load_file

    import tasks  # examples/tasks.py: the training's image preprocessing

    if count is not None and count < 1:
        sys.exit(f"--images must be >= 1, got {count}")
    path = checkpoint / DEMO_IMAGES
    if not path.is_file():
        sys.exit(f"{path} is missing: the ViT demo classifies the test images shipped there; make it with "
                 f"`python examples/export_demo_images.py --output {path}`")
    stored = load_file(path)
    images, labels = stored["images"][:count], stored["labels"][:count]
    rows = [{"image": image.unsqueeze(0), "label": label} for image, label in zip(images, labels)]
    return tasks.ImageCollator(model.config)(rows)["pixel_values"], labels


class Demo:
    """What this run shows: the model, the input of the timed forwards, and the task's own data."""

    def __init__(self, args: argparse.Namespace, world_size: int, device: torch.device):
        source = model_source(args, dist.get_rank())
        if args.max_new_tokens is None:
            args.max_new_tokens = 8 if source is None else 48
        self.checkpoint, self.tokenizer, self.images, self.labels = source, None, None, None
        if source is None:
            self.model = embedded_model(args.task, world_size, args)
            self.inputs = random_inputs(args.task, self.model, args)
        else:
            self.model = load_checkpoint(source, world_size)
            args.task = self.model.config.model_type
            if args.task == "gpt2":
                self.tokenizer = AutoTokenizer.from_pretrained(source)
                self.inputs = {"input_ids": self.tokenizer(args.prompt, return_tensors="pt").input_ids}
                if self.inputs["input_ids"].shape[1] < world_size:
                    sys.exit(f"--prompt {args.prompt!r} has {self.inputs['input_ids'].shape[1]} tokens: give at least "
                             f"one per process ({world_size})")
            else:
                self.images, self.labels = demo_images(source, self.model, args.images)
                self.inputs = {"pixel_values": self.images[: args.batch_size]}
        self.model = self.model.eval().to(device)
        self.inputs = {name: value.to(device) for name, value in self.inputs.items()}
        if source is None:
            self.description = "tiny random model (seeded; predictions mean nothing)"
        else:  # relative to the working directory where it is inside it (checkpoints/...)
            inside = source.resolve().is_relative_to(Path.cwd())
            self.description = str(source.resolve().relative_to(Path.cwd()) if inside else source.resolve())


# ------------------------------------------------------------------------------------- the run
def timed(runtime: DistributedRuntime, action, device: torch.device):
    """(result, seconds until the slowest rank has it); ranks start together after a barrier."""
    dist.barrier()
    started = time.perf_counter()
    result = action()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=runtime.comm_device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return result, elapsed.item()


def shard_difference(runtime: DistributedRuntime, got, simulated) -> float:
    if runtime.causal:
        start, end = runtime.layout.bounds(runtime.rank)
        simulated = simulated[:, start:end]
    return (got.float() - simulated.float()).abs().max().item()


def generate(runtime: DistributedRuntime, demo: Demo, args: argparse.Namespace, device: torch.device) -> dict:
    """Greedy continuation of the prompt on every rank (streamed on the last rank), time to first token, and
    the simulation's tokens."""
    prompt = demo.inputs["input_ids"]
    # The same settings for the distributed run and the simulation's model.generate.
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=demo.model.generation_config.eos_token_id)
    streamer = {}
    if demo.tokenizer is not None and runtime.is_last:  # transformers' streamer: the last rank prints as it decodes
        streamer["streamer"] = TextStreamer(demo.tokenizer, skip_prompt=True, skip_special_tokens=True)
    runtime.generate(prompt, max_new_tokens=1)  # warm-up
    # Time to first token: the parallel prefill plus the first decoded token, until every rank has it.
    _, first_token_s = timed(runtime, lambda: runtime.generate(prompt, max_new_tokens=1), device)
    generated, total_s = timed(runtime, lambda: runtime.generate(prompt, **settings, **streamer), device)
    stats = runtime.generation_stats  # of the streamed call, measured on the last rank
    generated = generated[:, prompt.shape[1]:]
    with torch.no_grad():
        wanted = demo.model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    result = {"new_tokens": generated.tolist(), "matches_simulation": torch.equal(generated, wanted[:, prompt.shape[1]:]),
              "time_to_first_token_s": first_token_s, "generate_s": total_s,
              "decode_tokens_per_s": (generated.shape[1] - 1) / (total_s - first_token_s) if total_s > first_token_s and generated.shape[1] > 1 else None,
              "generation_stats": stats.to_dict()}
    if demo.tokenizer is not None:
        result["prompt"] = args.prompt
        result["text"] = demo.tokenizer.decode(generated[0], skip_special_tokens=True)
    return result


@torch.no_grad()
def classify(runtime: DistributedRuntime, demo: Demo, batch_size: int = 100) -> dict:
    """Accuracy on the shipped test images: distributed, the single-process simulation, the unpatched model."""
    # The same weights through plain transformers (a second copy: the runtime holds the first).
    unpatched = astra.unpatch(load_checkpoint(demo.checkpoint, runtime.world_size)).eval().to(demo.model.device)
    predictions = {"distributed": [], "simulation": [], "unpatched": []}
    for chunk in demo.images.split(batch_size):
        chunk = chunk.to(demo.inputs["pixel_values"].device)
        predictions["distributed"].append(runtime(pixel_values=chunk).logits.argmax(-1).cpu())
        predictions["simulation"].append(demo.model(pixel_values=chunk).logits.argmax(-1).cpu())
        predictions["unpatched"].append(unpatched(pixel_values=chunk).logits.argmax(-1).cpu())
    predictions = {name: torch.cat(values) for name, values in predictions.items()}
    result = {"images": len(demo.labels)}
    for name, predicted in predictions.items():
        result[f"accuracy_{name}"] = 100.0 * (predicted == demo.labels).float().mean().item()
    result["same_class_as_simulation"] = 100.0 * (predictions["distributed"] == predictions["simulation"]).float().mean().item()
    return result


# Per rank, one float64 vector of fixed layout (byte counts are integers far below 2**53: exact).
def rank_numbers(traffic, timings, expected: int, difference: float, num_layers: int) -> torch.Tensor:
    if len(traffic.code_bytes_per_layer) != num_layers:
        raise RuntimeError(f"traffic lists {len(traffic.code_bytes_per_layer)} layers, the model has {num_layers}")
    values = [*(traffic.sent[k] for k in TRAFFIC_KINDS), *(traffic.received[k] for k in TRAFFIC_KINDS),
              traffic.full_precision_bytes, expected, difference, timings.total_s, timings.waited_s,
              *traffic.code_bytes_per_layer]
    return torch.tensor(values, dtype=torch.float64)


def from_rank_numbers(values: torch.Tensor) -> dict:
    kinds = len(TRAFFIC_KINDS)
    sent = {k: int(v) for k, v in zip(TRAFFIC_KINDS, values[:kinds].tolist())}
    received = {k: int(v) for k, v in zip(TRAFFIC_KINDS, values[kinds : 2 * kinds].tolist())}
    full, expected, difference, total_s, waited_s = values[2 * kinds : 2 * kinds + 5].tolist()
    traffic = {"sent": sent, "received": received, "total_sent": sum(sent.values()), "total_received": sum(received.values()),
               "code_bytes_per_layer": [int(v) for v in values[2 * kinds + 5 :].tolist()], "full_precision_bytes": int(full)}
    return {"traffic": traffic, "expected_code_bytes": int(expected), "diff": difference, "total_s": total_s,
            "waited_s": waited_s}


def gather_rank_numbers(runtime: DistributedRuntime, mine: torch.Tensor) -> list[dict]:
    """Every rank's numbers on every rank: one all_gather of same-sized float64 tensors (no pickling)."""
    mine = mine.to(runtime.comm_device)
    everyone = [torch.zeros_like(mine) for _ in range(runtime.world_size)]
    dist.all_gather(everyone, mine)
    return [from_rank_numbers(values.cpu()) for values in everyone]


def read_secret(path: Path | None) -> str | None:
    """The secret in ``path`` (surrounding whitespace dropped); None: the runtime reads ASTRA_SECRET, if set."""
    if path is None:
        return None
    if not path.is_file():
        sys.exit(f"--secret-file {path}: no such file")
    secret = path.read_text().strip()
    if not secret:
        sys.exit(f"--secret-file {path} is empty")
    return secret


def run(args: argparse.Namespace) -> None:
    secret = read_secret(args.secret_file)
    device = init_process_group(args)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    demo = Demo(args, world_size, device)  # every rank loads or builds the model itself: nothing exchanged yet
    runtime = DistributedRuntime(demo.model, timeout=args.timeout, secret=secret)  # first exchange: trust, handshake
    model, inputs = demo.model, demo.inputs
    with torch.no_grad():
        simulated = model(**inputs).logits  # the single-process simulation of the same patched model

    latencies = {}
    for overlap in (False, True):
        runtime.overlap = overlap
        runtime(**inputs)  # warm-up
        latencies[overlap] = statistics.median(timed(runtime, lambda: runtime(**inputs), device)[1] for _ in range(args.repeats))
    output = runtime(**inputs)
    traffic, difference = runtime.traffic, shard_difference(runtime, output.logits, simulated)
    layout, batch = runtime.layout, next(iter(inputs.values())).shape[0]
    config = astra_state(model).config
    expected = expected_code_bytes(config, layout, rank, batch, runtime.num_layers, runtime.causal)
    everyone = gather_rank_numbers(runtime, rank_numbers(traffic, runtime.timings, expected, difference, runtime.num_layers))

    if args.task == "gpt2":
        prediction = generate(runtime, demo, args, device)
    else:
        prediction = {"classes": output.logits.argmax(-1).tolist(),
                      "matches_simulation": torch.equal(output.logits.argmax(-1), simulated.argmax(-1))}
        if demo.images is not None:
            prediction["classification"] = classify(runtime, demo)
    if rank == 0:
        result = {
            "task": args.task, "N": world_size, "G": config.groups, "K": config.codebook_size, "quantize": config.quantize,
            "backend": dist.get_backend(), "device": device.type, "batch_size": batch, "tokens": layout.total,
            "shard_sizes": list(layout.sizes), "model": demo.description, "prediction": prediction,
            "max_abs_diff_vs_simulation": max(r["diff"] for r in everyone),
            "bytes_sent_per_rank": [r["traffic"]["total_sent"] for r in everyone],
            "bytes_received_per_rank": [r["traffic"]["total_received"] for r in everyone],
            "code_bytes_sent_per_rank": [r["traffic"]["sent"]["codes"] for r in everyone],
            "expected_code_bytes": [r["expected_code_bytes"] for r in everyone],
            "full_precision_sp_bytes_per_rank": [r["traffic"]["full_precision_bytes"] for r in everyone],
            "traffic_per_rank": [r["traffic"] for r in everyone],
            "latency_s": latencies[True], "latency_no_overlap_s": latencies[False], "repeats": args.repeats,
            # the last forward's `runtime.timings`: seconds each rank waited for its peers, and the rest (its own work)
            "waited_s_per_rank": [r["waited_s"] for r in everyone],
            "compute_s_per_rank": [max(r["total_s"] - r["waited_s"], 0.0) for r in everyone],
        }
        report(result)
        if args.plan:  # what the planner predicts for this model and N on a 10 Mbit/s link
            tokens = layout.total if runtime.causal else None
            # rank_probes: also time this model's ranks at this N with no network (the runtime's per-layer overheads)
            profile = astra.calibrate_device(model, num_tokens=tokens, rank_probes=True, probe_devices=max(world_size, 2),
                                             probe_tokens=max(layout.total, 2 * max(world_size, 2)) if runtime.causal else None)
            print(astra.plan(model, num_tokens=tokens, num_devices=world_size, bandwidth_mbps=10, profile=profile).summary())
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
    print(f"model: {result['model']}")
    print(f"input: {result['batch_size']} x {result['tokens']} tokens, shards {result['shard_sizes']}")
    waited, compute = result["waited_s_per_rank"], result["compute_s_per_rank"]
    slowest = max(range(len(waited)), key=lambda r: waited[r] + compute[r])
    bound = "the link or a slower peer" if waited[slowest] > compute[slowest] else "its own compute"
    print("one forward, per rank: waited for peers " + " / ".join(f"{w * 1e3:.1f}" for w in waited) + " ms, computed "
          + " / ".join(f"{c * 1e3:.1f}" for c in compute) + f" ms; the slowest rank ({slowest}) is held by {bound}")
    prediction = result["prediction"]
    if "text" in prediction:
        print(f"prompt:    {prediction['prompt']!r}\ngenerated: {prediction['text']!r}")
    if "new_tokens" in prediction:
        tokens = f"{len(prediction['new_tokens'][0])} greedy tokens" if "text" in prediction else f"greedy tokens {prediction['new_tokens']}"
        print(f"{tokens}; the same as the single-process simulation's: {prediction['matches_simulation']}")
        speed = prediction["decode_tokens_per_s"]
        print(f"time to first token: {prediction['time_to_first_token_s'] * 1e3:.1f} ms (parallel prefill + first token, "
              f"on every rank); {len(prediction['new_tokens'][0])} tokens in {prediction['generate_s']:.2f} s"
              + (f", {speed:.1f} tokens/s decoding" if speed else ""))
        if (stats := prediction.get("generation_stats")) and stats["time_to_first_token_s"] is not None:
            rate = f"{stats['decode_tokens_per_s']:.1f}" if stats["decode_tokens_per_s"] is not None else "n/a"
            print(f"on the last rank (generation_stats): time to first token {stats['time_to_first_token_s'] * 1e3:.1f} ms "
                  f"(parallel prefill {stats['prefill_s'] * 1e3:.1f} ms), then {rate} tokens/s per sequence")
    else:
        print(f"classes: {prediction['classes']}; same as the single-process simulation: {prediction['matches_simulation']}")
    if "classification" in prediction:
        c = prediction["classification"]
        print(f"accuracy on {c['images']} Fashion-MNIST test images: distributed {c['accuracy_distributed']:.1f}%, "
              f"single-process simulation {c['accuracy_simulation']:.1f}%, unpatched model (same weights, no ASTRA) "
              f"{c['accuracy_unpatched']:.1f}%; same class as the simulation on {c['same_class_as_simulation']:.1f}%")
    print(f"max |distributed - single-process simulation| logits = {result['max_abs_diff_vs_simulation']:.2e}")
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
