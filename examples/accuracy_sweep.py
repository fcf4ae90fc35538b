"""The accuracy tables of docs/results.md: train the base models, run every ASTRA fine-tuning, write the report.

    python examples/accuracy_sweep.py plan   --call 1                       # the runs of a GPU call, in order
    python examples/accuracy_sweep.py run    --call 1 --out outputs --jobs 16 --deadline-at EPOCH
    python examples/accuracy_sweep.py pack   --call 1 --out outputs --dest $OUT   # what comes back from the call
    python examples/accuracy_sweep.py collect --from FILES_AT --out outputs       # unpack it here
    python examples/accuracy_sweep.py report                                    # docs/results.md + accuracy.json

A call's plan is a list of jobs (base trainings and finetune_astra.py runs, each with the seeds it needs);
``run`` starts them as concurrent processes as soon as the base they start from exists (several small
trainings share one GPU), in plan order (most important first), skips those that already have a result
(here under --out, or committed under docs/results/runs/), and kills what still runs at the deadline.
``scripts/gpu/accuracy_call.sh N`` runs call N on a GPU host.

The report groups the per-run results (docs/results/runs/*.json, one per run and seed) by run name without
the seed: ``value`` is the mean over seeds, ``std`` their sample standard deviation; every row records its
commands, hardware and dates.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = Path("examples")
DOCS = REPO / "docs"
RUNS_DIR = DOCS / "results" / "runs"

SEEDS = (0, 1, 2)
EVAL_LAYOUTS = ["--eval-num-devices", "2", "3", "6", "8", "--eval-shard-sizes", "1,2,3,4", "4,1,1,2"]
BASES = {  # base name -> train_base.py arguments (besides --output-dir and --max-minutes)
    "gpt2-base": ["--task", "gpt2", "--layers", "6", "--width", "256", "--epochs", "12", "--save-dtype", "float16"],
    "vit-base": ["--task", "vit", "--layers", "6", "--width", "192", "--epochs", "20", "--save-dtype", "float16"],
    "gpt2-english-base": ["--task", "gpt2", "--dataset", "english", "--extra-eval", "english-ood", "kjv", "--layers",
                          "6", "--width", "256", "--epochs", "12", "--save-dtype", "float16"],
}
LATER_BASES = {  # trained by later calls (call 1 trains BASES)
    # Issue 13 item 3: the Llama-shaped base on the same English mix, the same size as GPT2's (call 5).
    "llama-english-base": ["--task", "llama", "--dataset", "english", "--extra-eval", "english-ood", "kjv", "--layers",
                           "6", "--width", "256", "--epochs", "12", "--save-dtype", "float16"],
}
FINETUNE = {  # family -> (task, base, epochs, extra finetune_astra.py flags)
    "gpt2": ("gpt2", "gpt2-base", "3", []),
    "vit": ("vit", "vit-base", "1", []),
    "english": ("gpt2", "gpt2-english-base", "1", ["--dataset", "english", "--extra-eval", "english-ood", "kjv"]),
    "llama": ("llama", "llama-base", "3", []),
    "llama-english": ("llama", "llama-english-base", "1", ["--dataset", "english", "--extra-eval", "english-ood", "kjv"]),
}
# Issue 10 item 5: the Llama-shaped base is trained like the GPT2 one (same KJV data and tokenizer, same size).
LLAMA_BASE = ["--task", "llama", "--layers", "6", "--width", "256", "--epochs", "12", "--save-dtype", "float16"]
ABLATIONS = {  # run-name suffix -> finetune_astra.py flags; on top of G=1, hidden, lambda=1, beta=1e-4, DCT
    "naq0": ["--noise-scale", "0"],
    "naq0.3": ["--noise-scale", "0.3"],
    "nodct": ["--no-distributed-cls"],
    "beta0": ["--commitment-weight", "0"],
    "beta0.25": ["--commitment-weight", "0.25"],
}
VIT_RECIPES = {  # the ViT G=1 hidden target: longer fine-tuning, less NAQ noise, more codewords
    "ep3": ["--epochs", "3"],
    "ep3-naq0.3": ["--epochs", "3", "--noise-scale", "0.3"],
    "ep3-k4096": ["--epochs", "3", "--codebook-size", "4096"],
}
ENGLISH_VARIANTS = {"naq0.3": ["--noise-scale", "0.3"], "nodcr": ["--no-dead-code-reset"],
                    "beta0.25": ["--commitment-weight", "0.25"]}
DEMO_FLAGS = ["--groups", "32", "--quantize", "hidden", "--codebook-size", "512", "--save",
              "--save-dtype", "float16"]
RANDOM_SHARDS = ["--random-shards", "2,3,4,6,8"]


@dataclass
class Job:
    name: str  # run name with its seed (``gpt2-g32-hidden-s1``) or a base name
    script: str  # train_base.py / finetune_astra.py
    args: list[str]  # paths relative to --out; ``{out}`` is replaced
    needs: list[str] = field(default_factory=list)
    estimate: float = 0.0  # expected wall seconds with ~16 runs sharing one GPU (0: unknown); see call3



def finetune_job(family: str, name: str, seed: int, flags: list[str], num_devices: str = "4") -> Job:
    task, base, epochs, extra = FINETUNE[family]
    budget = [] if "--epochs" in flags else ["--epochs", epochs]  # a recipe's own budget replaces the default one
    args = ["--task", task, "--base", "{out}/" + base, *budget, "--num-devices", num_devices, *extra, *flags,
            "--seed", str(seed)]
    return Job(f"{name}-s{seed}", "finetune_astra.py", args, [base])


def main_runs(family: str, groups: str, mode: str, seeds=SEEDS) -> list[Job]:
    return [finetune_job(family, f"{family}-g{groups}-{mode}", seed,
                         ["--groups", groups, "--quantize", mode, *EVAL_LAYOUTS]) for seed in seeds]


def controls(family: str, seeds=SEEDS) -> list[Job]:
    return [finetune_job(family, f"{family}-control", seed, ["--control"]) for seed in seeds]


def call1() -> list[Job]:
    """Bases, demo checkpoints (issue 9), main rows with 3 seeds (evaluated at N = 2, 3, 6, 8 and uneven shards),
    the broad-English rows. Most important first."""
    jobs = [Job(name, "train_base.py", [*flags]) for name, flags in BASES.items()]
    jobs += [finetune_job(family, f"{family}-demo-n2-g32-hidden-k512", 0, DEMO_FLAGS, num_devices="2")
             for family in ("gpt2", "vit")]
    first = [0]
    for family in ("english",):
        jobs += main_runs(family, "32", "hidden", first) + main_runs(family, "32", "kv", first) + controls(family, first)
    for seeds in (first, (1, 2)):
        for family in ("gpt2", "vit"):
            jobs += main_runs(family, "32", "hidden", seeds) + main_runs(family, "32", "kv", seeds)
            jobs += main_runs(family, "1", "hidden", seeds) + controls(family, seeds)
        if seeds != first:
            jobs += main_runs("english", "32", "hidden", seeds) + main_runs("english", "32", "kv", seeds)
            jobs += controls("english", seeds)
    for family in ("gpt2", "vit"):
        jobs += main_runs(family, "1", "kv") + main_runs(family, "8", "hidden") + main_runs(family, "8", "kv")
    for suffix, flags in ENGLISH_VARIANTS.items():  # what might move the out-of-domain perplexity (one seed)
        jobs.append(finetune_job("english", f"english-g32-hidden-{suffix}", 0, ["--groups", "32", "--quantize", "hidden",
                                                                               *flags]))
    return jobs


def call2(leftovers: bool = True) -> list[Job]:
    """Most important first (one call holds about 40 runs): the Llama base and its rows (issue 10), the G = 8
    rows the speed goals need (issue 12), the broad-English G = 32 rows (out-of-domain goal), N-agnostic
    fine-tuning at G = 1 (where accuracy falls with N), the ablations with 3 seeds, the per-N references,
    the ViT G = 1 recipes, then whatever call 1 left (skipped where a result exists)."""
    g1 = ["--groups", "1", "--quantize", "hidden"]
    llama = llama_jobs()
    jobs = llama[:1]
    jobs += main_runs("gpt2", "8", "kv") + main_runs("vit", "8", "kv") + main_runs("vit", "8", "hidden")
    jobs += main_runs("vit", "32", "kv")
    jobs += main_runs("english", "32", "hidden") + main_runs("english", "32", "kv")
    jobs += llama[1:]
    for family in ("gpt2", "vit"):
        jobs += [finetune_job(family, f"{family}-g1-hidden-nagnostic", seed,
                              ["--groups", "1", "--quantize", "hidden", *RANDOM_SHARDS, *EVAL_LAYOUTS])
                 for seed in SEEDS]
    for suffix in ("naq0", "nodct", "beta0.25", "naq0.3", "beta0"):
        for seed in SEEDS:
            for family in ("vit", "gpt2"):
                if suffix == "nodct" and family != "vit":
                    continue  # GPT2 has no class token
                jobs.append(finetune_job(family, f"{family}-g1-hidden-{suffix}", seed, [*g1, *ABLATIONS[suffix]]))
    for num_devices in ("8", "2", "3", "6"):  # per-N references for the N-agnostic comparison (one seed)
        for family in ("gpt2", "vit"):
            jobs.append(finetune_job(family, f"{family}-g1-hidden-n{num_devices}", 0, g1, num_devices=num_devices))
    jobs += [finetune_job("vit", f"vit-g1-hidden-{recipe}", seed, [*g1, *VIT_RECIPES[recipe]])
             for recipe in ("ep3", "ep3-naq0.3") for seed in SEEDS]
    for groups in ("32",):
        for family in ("gpt2", "vit"):
            jobs += [finetune_job(family, f"{family}-g{groups}-hidden-nagnostic", seed,
                                  ["--groups", groups, "--quantize", "hidden", *RANDOM_SHARDS, *EVAL_LAYOUTS])
                     for seed in SEEDS]
    if leftovers:
        jobs += [job for job in call1() if job.script == "finetune_astra.py" and "-demo-" not in job.name]
    unique: dict[str, Job] = {}
    for job in jobs:  # each once, at its first place
        unique.setdefault(job.name, job)
    return list(unique.values())


def llama_supported() -> bool:
    """Whether this transformers_astra patches LlamaForCausalLM (issue 10's adapter)."""
    from transformers_astra.models import ADAPTERS

    return "llama" in ADAPTERS


def llama_jobs() -> list[Job]:
    """The Llama-shaped base (KJV, like GPT2's), its control and G in {1, 8, 32} x both modes (issue 10 item 5,
    one seed), where the adapter exists."""
    if not llama_supported():
        print("no Llama adapter in this transformers_astra: the llama rows are left out", file=sys.stderr)
        return []
    jobs = [Job("llama-base", "train_base.py", list(LLAMA_BASE))]
    for groups in ("32", "8", "1"):
        jobs += main_runs("llama", groups, "hidden", (0,)) + main_runs("llama", groups, "kv", (0,))
    return jobs + controls("llama", (0,))


def estimated(jobs: list[Job], seconds: float) -> list[Job]:
    for job in jobs:
        job.estimate = seconds
    return jobs


def call3() -> list[Job]:
    """ViT only (what call 2 could not carry besides the GPT2 and Llama inputs), most important first.

    Carry: wheels, gpu_data/fashion-mnist, outputs/vit-base (the working tree itself is about 26 MB, 22 MB of it
    the demo checkpoints; Fashion-MNIST is 26.5 MB, vit-base 5.4 MB: about 58 MiB in all). The GPT2 base
    (14.7 MB) and the KJV text do not fit beside them, so the GPT2 runs are call 4.
    Wall seconds of each run with ~16 sharing one H200 and 16 cores, from accuracy-call1-2026-11-27.log
    (the main rows evaluate at 6 layouts, about 40 s of a ViT run): vit-g32-kv 251, vit-g32-hidden 185-212,
    vit-g1-hidden 132-161, vit-control 42-49; estimated for runs never timed: vit-g8-kv 215, vit-g8-hidden 175
    (GPT2's G = 8 runs took ~40 s less than its G = 32 ones), vit-g1-kv 155 (GPT2's G = 1 kv ~ G = 1 hidden),
    ViT ablations without the extra layouts 115, 3-epoch recipes 280, per-N references 110. About 6 500
    run-seconds over 16 slots: ~400 s of the ~450 s a call of ASTRA_CALL_SECONDS=500 leaves to runs; a run
    whose estimate no longer fits before the deadline is not started (so it cannot slow the others).
      a. the main rows: ViT G = 32 kv seeds 1-2, G = 8 kv and hidden, G = 1 kv (3 seeds each);
      c. the ablations at ViT's main setting (G = 1 hidden): NAQ lambda = 0, DCT off, beta = 0.25, then the rest
         of GPT2's call 2 ablations (lambda = 0.3, beta = 0), 3 seeds each;
      then, while time lasts (call 2's ViT rows): N-agnostic G = 1, the per-N references, the G = 1 hidden
      recipes (3 epochs: these fit only when the rest ran faster than estimated).
    (b, the GPT2 codebook sizes, and GPT2 G = 8 hidden seeds 1-2 are call 4; d, Llama seeds 1-2, would need its
    base retrained: left.)"""
    g1 = ["--groups", "1", "--quantize", "hidden"]
    jobs = estimated(main_runs("vit", "32", "kv", (1, 2)), 251)
    jobs += estimated(main_runs("vit", "8", "kv"), 215) + estimated(main_runs("vit", "8", "hidden"), 175)
    jobs += estimated(main_runs("vit", "1", "kv"), 155)
    for suffix in ("naq0", "nodct", "beta0.25", "naq0.3", "beta0"):
        jobs += estimated([finetune_job("vit", f"vit-g1-hidden-{suffix}", seed, [*g1, *ABLATIONS[suffix]])
                           for seed in SEEDS], 115)
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-nagnostic", seed,
                                    [*g1, *RANDOM_SHARDS, *EVAL_LAYOUTS]) for seed in SEEDS], 160)
    jobs += estimated([finetune_job("vit", f"vit-g1-hidden-n{n}", 0, g1, num_devices=n) for n in ("8", "2", "3", "6")],
                      110)
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-ep3", seed, [*g1, *VIT_RECIPES["ep3"]])
                       for seed in SEEDS], 280)
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-ep3-naq0.3", seed, [*g1, *VIT_RECIPES["ep3-naq0.3"]])
                       for seed in SEEDS], 280)
    return jobs


N_AGNOSTIC_RECIPES = {  # issue 13 item 2: what might bring one G = 1 checkpoint within 1 % / 0.3 pts of each per-N one
    # more steps (each N gets a fifth of them), and only even shards (the layouts the per-N references use)
    "ep6": ["--epochs", "6"],
    "ep6-even": ["--epochs", "6", "--uneven-probability", "0"],
    "ep3": ["--epochs", "3"],
    "ep3-even": ["--epochs", "3", "--uneven-probability", "0"],
    "ep2-even": ["--epochs", "2", "--uneven-probability", "0"],
    # the two N the 6-epoch recipes missed (N = 2: +2.4 %, N = 8: +1.8 %, call 7) drawn twice as often as the others
    "ep6-ends": ["--epochs", "6", "--random-shards", "2,2,3,4,6,8,8"],
    "ep2": ["--epochs", "2"],
    # twice the 6-epoch budget: does the gap to the per-N checkpoints shrink with the budget? (call 11)
    "ep12": ["--epochs", "12"],
    # ViT at four times its per-N budget, as GPT2's 12 epochs are (call 12)
    "ep4": ["--epochs", "4"],
    # ViT's two misses at 4 epochs (N = 2 -0.75, N = 8 -0.48 points, call 12): drawn twice as often, or twice the steps
    "ep4-ends": ["--epochs", "4", "--random-shards", "2,2,3,4,6,8,8"],
    "ep8": ["--epochs", "8"],
}


def n_agnostic_recipe(family: str, recipe: str, seeds=SEEDS) -> list[Job]:
    return [finetune_job(family, f"{family}-g1-hidden-nagnostic-{recipe}", seed,
                         ["--groups", "1", "--quantize", "hidden", *RANDOM_SHARDS, *N_AGNOSTIC_RECIPES[recipe],
                          *EVAL_LAYOUTS]) for seed in seeds]


def call5() -> list[Job]:
    """Language models (carry: wheels, gpu_data/kjv.txt.gz, gpu_data/english.jsonl.gz, outputs/gpt2-base; ~45 MB).

    a. Issue 13 item 3 for the Llama-shaped model: its base trained on the broad English mix (capped at 2.5 minutes
       like GPT2's), then G = 32 hidden and kv and the control, 3 seeds, evaluated in and out of domain (~300 s each
       under sharing, like the English GPT2 runs);
    b. item 2, GPT2 G = 1 N-agnostic with twice the steps (6 epochs), with the default half-uneven draws and with
       even shards only, 3 seeds each (~210 s: 3-epoch runs took 106 s), started while the base trains.
    About 16 runs in one wave: ~150 s base + ~300 s fine-tuning (estimated).
    Measured (2026-11-27, H200): the base took 198 s and the controls ~90 s, but the Llama G = 32 runs had done only
    0.36 (kv) to 0.73 (hidden) of their epoch after ~480 s, even with 6 runs alone on the GPU (a second call,
    ``ASTRA_ONLY='llama-english-g32-.*'`` on the warm host): 3-5x slower a step than the Llama KJV runs of call 2
    (324 steps in 112-165 s) and GPT2's English runs (549 steps in ~215-240 s). On the dev VM's CPU a step costs the
    same on English and KJV data, so the cause is on the GPU host. Likely cause, found afterwards: training mode
    encoded with the exact encoder, whose recheck of near-ties synchronises with the host and loops over groups on a
    GPU (`benchmarks/train_encode_speed.py`, H200: the quantizer's step 7.4x slower at G = 32 than the plain argmin
    that training mode uses on GPUs since); not confirmed on these runs. They need a call of their own (the base is
    not packed back: it must be trained again)."""
    jobs = [Job("llama-english-base", "train_base.py", list(LATER_BASES["llama-english-base"]))]
    jobs += estimated(n_agnostic_recipe("gpt2", "ep6-even") + n_agnostic_recipe("gpt2", "ep6"), 210)
    for seeds in ((0,), (1, 2)):
        jobs += estimated(main_runs("llama-english", "32", "hidden", seeds) + main_runs("llama-english", "32", "kv", seeds)
                          + controls("llama-english", seeds), 300)
    return jobs


def call6() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base): issue 13 item 2 at G = 1 with three times the
    per-N budget (3 epochs), half-uneven and even-only draws, 3 seeds each, and the references with the same budget:
    the N = 4 row at 3 epochs (3 seeds) and per-N checkpoints at 3 epochs for N = 2, 3, 6, 8 (one seed, like the
    1-epoch per-N references). One wave of 13 runs, ~290 s each (call 3's 3-epoch estimate, never measured).
    Measured (2026-11-27, H200, 13 runs sharing): every run had done 2.34 of its 3 epochs at ~480 s, so a 3-epoch ViT
    run needs ~620 s plus its evaluations: more than one call can give. Not rerun (device time)."""
    g1 = ["--groups", "1", "--quantize", "hidden"]
    jobs = estimated(n_agnostic_recipe("vit", "ep3-even") + n_agnostic_recipe("vit", "ep3"), 290)
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-ep3", seed, [*g1, *VIT_RECIPES["ep3"], *EVAL_LAYOUTS])
                       for seed in SEEDS], 290)
    jobs += estimated([finetune_job("vit", f"vit-g1-hidden-ep3-n{n}", 0, [*g1, *VIT_RECIPES["ep3"]], num_devices=n)
                       for n in ("2", "8", "3", "6")], 280)
    return jobs


def call7() -> list[Job]:
    """GPT2 (carry: wheels, gpu_data/kjv.txt.gz, outputs/gpt2-base): the references for call 5's 6-epoch N-agnostic
    checkpoints, fine-tuned with the same budget: G = 1 hidden at N = 4 for 6 epochs (3 seeds, evaluated at the
    other layouts too) and at N = 2, 3, 6, 8 (one seed, like the 3-epoch per-N references). ~390 s each (call 5's
    6-epoch runs took 382-389 s with 15 runs sharing the GPU)."""
    g1 = ["--groups", "1", "--quantize", "hidden", "--epochs", "6"]
    jobs = estimated([finetune_job("gpt2", "gpt2-g1-hidden-ep6", seed, [*g1, *EVAL_LAYOUTS]) for seed in SEEDS], 390)
    jobs += estimated([finetune_job("gpt2", f"gpt2-g1-hidden-ep6-n{n}", 0, g1, num_devices=n)
                       for n in ("2", "8", "3", "6")], 390)
    return jobs


def call8() -> list[Job]:
    """Language models (carry: wheels, gpu_data/kjv.txt.gz, gpu_data/english.jsonl.gz, outputs/gpt2-base; ~45 MB).

    a. Issue 13 item 3 for the Llama-shaped model, again (call 5's G = 32 runs did not finish and its base was not
       packed back): the base trained on the broad English mix, then the control and G = 32 hidden and kv, 3 seeds,
       now with training mode's plain argmin on the GPU. The controls run again: the base is new (its training is
       capped by wall time), so call 5's controls no longer share its base. The base comes back with the results,
       so a second call on a cold host can carry it. Call it twice on a warm host if the first ends before the runs.
    b. Item 2, GPT2 G = 1 N-agnostic for 6 epochs with N = 2 and 8 drawn twice as often (`ep6-ends`), 3 seeds, started
       while the base trains (~390 s with 15 sharing, call 5).
    Measured (2026-11-27, H200): base 194 s, GPT2 runs 84 s, controls 67-74 s; the G = 32 runs trained their epoch in
    69-95 s (call 5: 0.36-0.73 epoch in ~480 s) but were killed at the deadline in their evaluations: an evaluation
    pass took 10-55 s with 9 runs sharing the GPU (why so long is not established), and each run had 9 of them (the six other
    layouts besides English, out-of-domain and KJV). The G = 32 rows now evaluate in and out of domain only (item 3
    asks for those), run again in a call of their own: ``ASTRA_ONLY='llama-english-g32-.*'``, carrying the base that
    came back (outputs/llama-english-base) instead of outputs/gpt2-base."""
    jobs = [Job("llama-english-base", "train_base.py", list(LATER_BASES["llama-english-base"]))]
    jobs += estimated(n_agnostic_recipe("gpt2", "ep6-ends"), 300)
    for seeds in ((0,), (1, 2)):
        jobs += estimated(controls("llama-english", seeds), 75)
        jobs += estimated([finetune_job("llama-english", f"llama-english-g32-{mode}", seed, ["--groups", "32", "--quantize", mode])
                           for mode in ("hidden", "kv") for seed in seeds], 250)
    return jobs


def call9() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base): the lever issue 12's goal 2 needs, a 4x cheaper
    encoder and 20 % fewer bits, K = 256 at the kv settings that keep the accuracy at K = 1024 (G = 8 kv -0.41
    points, G = 32 kv -0.00), 3 seeds each, evaluated at N = 4 (~110-160 s each, call 3's 1-epoch ViT runs)."""
    return estimated([finetune_job("vit", f"vit-g{groups}-kv-k256", seed, ["--groups", groups, "--quantize", "kv",
                                                                            "--codebook-size", "256"])
                      for groups in ("8", "32") for seed in SEEDS], 160)


def call10() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base): issue 13 item 2 at G = 1 with twice the per-N
    budget (2 epochs; call 6's 3-epoch wave of 13 did not fit a call): the N-agnostic recipe, 3 seeds, against
    per-N checkpoints of the same budget at N = 2, 3, 6, 8 (one seed, like the other per-N references) and at
    N = 4 (3 seeds). 10 runs, ~2 x 205 s each (call 6: 2.34 epochs in ~480 s with 13 sharing), plus evaluations."""
    g1 = ["--groups", "1", "--quantize", "hidden", "--epochs", "2"]
    jobs = estimated(n_agnostic_recipe("vit", "ep2"), 420)
    jobs += estimated([finetune_job("vit", f"vit-g1-hidden-ep2-n{n}", 0, g1, num_devices=n) for n in ("2", "8", "3", "6")], 400)
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-ep2", seed, g1) for seed in SEEDS], 400)
    return jobs


def call11() -> list[Job]:
    """GPT2 (carry: wheels, gpu_data/kjv.txt.gz, outputs/gpt2-base): issue 13 item 2 at G = 1, what budget one
    N-agnostic checkpoint needs. At 6 epochs it misses the per-N checkpoints of the same budget by +2.3 % (N = 2) and
    +1.7 % (N = 8) whatever the draws (calls 5, 7, 8). Here, most important first: the N-agnostic recipe at 12 epochs
    (3 seeds); per-N references at 12 epochs for N = 2, 8 and 4 (one seed, like the others), so the gap is read at
    one budget; the 6-epoch per-N references at N = 2 and 8 with two more seeds (they have one). 10 runs: ~170-400 s for
    the 12-epoch ones (call 8: 6 epochs in 84 s with few runs sharing; call 7: ~390 s with 7-15), estimated."""
    jobs = estimated(n_agnostic_recipe("gpt2", "ep12"), 400)
    g1 = ["--groups", "1", "--quantize", "hidden"]
    jobs += estimated([finetune_job("gpt2", f"gpt2-g1-hidden-ep12-n{n}", 0, [*g1, "--epochs", "12"], num_devices=n)
                       for n in ("2", "8")], 400)
    jobs += estimated([finetune_job("gpt2", "gpt2-g1-hidden-ep12", 0, [*g1, "--epochs", "12"])], 400)
    jobs += estimated([finetune_job("gpt2", f"gpt2-g1-hidden-ep6-n{n}", seed, [*g1, "--epochs", "6"], num_devices=n)
                       for n in ("2", "8") for seed in (1, 2)], 250)
    return jobs


def call12() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base): issue 13 item 2 at G = 1 with four times the
    per-N budget (4 epochs), the budget at which GPT2's N-agnostic checkpoint came within 1 % of every per-N one
    (call 11: 12 epochs against the 3-epoch recipe). At 1 and 2 epochs ViT's misses by 0.5-0.9 points at N = 2, 3
    and 8 (calls 3, 10). The N-agnostic recipe (3 seeds) against per-N checkpoints of the same budget: two seeds at
    N = 2, 3, 8 (the per-N references of calls 3 and 10 have one, and their spread is ~0.2-0.4 points), one at
    N = 4 and 6. 11 runs, ~300-400 s each (call 10: 2 epochs in 131-174 s with 10 sharing), estimated."""
    g1 = ["--groups", "1", "--quantize", "hidden", "--epochs", "4"]
    jobs = estimated(n_agnostic_recipe("vit", "ep4"), 400)
    jobs += estimated([finetune_job("vit", f"vit-g1-hidden-ep4-n{n}", seed, g1, num_devices=n)
                       for seed in (0, 1) for n in ("2", "8", "3")], 380)
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-ep4-n6", 0, g1, num_devices="6"),
                       finetune_job("vit", "vit-g1-hidden-ep4", 0, g1)], 380)
    return jobs


def call13() -> list[Job]:
    """GPT2 (carry: wheels, gpu_data/kjv.txt.gz, outputs/gpt2-base): the 12-epoch per-N references call 11 left out
    (N = 3 and 6, one seed) and a second seed for N = 2 and 8, where the N-agnostic checkpoint came closest to the
    1 % limit (+0.4 %, +0.8 % against one seed). 4 runs, ~250 s (call 11: 238-283 s with 10 sharing)."""
    g1 = ["--groups", "1", "--quantize", "hidden", "--epochs", "12"]
    return estimated([finetune_job("gpt2", f"gpt2-g1-hidden-ep12-n{n}", seed, g1, num_devices=n)
                      for n, seed in (("3", 0), ("6", 0), ("2", 1), ("8", 1))], 280)


def call14() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base): issue 13 item 2, ViT G = 1's two misses at
    4 epochs (call 12: N = 2 -0.75, N = 8 -0.48 points; N = 3, 4, 6 within 0.3). Two recipes, 3 seeds each: N = 2
    and 8 drawn twice as often at 4 epochs (against call 12's per-N references), and 8 epochs with per-N
    references of the same budget at N = 2 and 8 (one seed). 8 runs: ~260 s for 4 epochs (call 12, 11 sharing),
    ~450 s for 8 (estimated)."""
    jobs = estimated(n_agnostic_recipe("vit", "ep8"), 450)
    jobs += estimated([finetune_job("vit", f"vit-g1-hidden-ep8-n{n}", 0, ["--groups", "1", "--quantize", "hidden",
                                                                          "--epochs", "8"], num_devices=n)
                       for n in ("2", "8")], 450)
    jobs += estimated(n_agnostic_recipe("vit", "ep4-ends"), 260)
    return jobs


def call15() -> list[Job]:
    """GPT2 (carry: wheels, gpu_data/kjv.txt.gz, outputs/gpt2-base), run 2026-11-28 (H200, 212 s): issue 12 goal 1's
    fewer-bit candidates and issue 13 item 2's G = 32 references. At 10 Mbps the link of G = 32 kv K = 256 (512 bits
    a token) is as large as a rank's compute (docs/benchmarks.md, 23:35 UTC), so: G = 16 kv at K = 1024 and K = 256
    (320 and 256 bits a token), 3 seeds each; then G = 32 hidden and kv fine-tuned at N = 2 and 8 (one seed, like the
    other per-N references), the references the N = 4 and N-agnostic G = 32 checkpoints lacked. Measured with 16
    sharing one H200: G = 16 kv 160-204 s, the per-N G = 32 runs 164-201 s, the 6-epoch runs added below 87-192 s."""
    jobs = estimated([finetune_job("gpt2", f"gpt2-g16-kv{suffix}", seed, ["--groups", "16", "--quantize", "kv", *extra,
                                                                          *EVAL_LAYOUTS])
                      for suffix, extra in (("", []), ("-k256", ["--codebook-size", "256"])) for seed in SEEDS], 140)
    jobs += estimated([finetune_job("gpt2", f"gpt2-g32-{mode}-n{n}", 0, ["--groups", "32", "--quantize", mode],
                                    num_devices=n) for mode in ("hidden", "kv") for n in ("2", "8")], 140)
    # Added 2026-11-28 for goal 3 (N = 8, within +8 %): the cheapest encoder (G = 1 hidden, K = 256: 8 bits a token)
    # fine-tuned at N = 8 for 6 epochs (G = 1 hidden K = 1024 needs 6 to come near the control: +2.6 % at N = 4),
    # and the control at the same 6 epochs (a row of its own: the "vs control" column compares with the 3-epoch one).
    jobs += estimated([finetune_job("gpt2", "gpt2-g1-hidden-k256-ep6-n8", seed,
                                    ["--groups", "1", "--quantize", "hidden", "--codebook-size", "256", "--epochs", "6",
                                     "--eval-num-devices", "4"], num_devices="8") for seed in SEEDS], 250)
    jobs += estimated([finetune_job("gpt2", "gpt2-control-ep6", seed, ["--control", "--epochs", "6"])
                       for seed in SEEDS], 150)
    return jobs


def call16() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base), run 2026-11-28 (H200, 179 s): issue 13 item 2's G = 32
    references, ViT's side of call 15: G = 32 hidden and kv fine-tuned at N = 2 and 8 (one seed, like the other
    per-N references), against which the N = 4 G = 32 checkpoints evaluated at N = 2 and 8 are read. 4 runs,
    ~100-160 s each (call 3's 1-epoch ViT runs), estimated."""
    return estimated([finetune_job("vit", f"vit-g32-{mode}-n{n}", 0, ["--groups", "32", "--quantize", mode], num_devices=n)
                      for mode in ("hidden", "kv") for n in ("2", "8")], 160)


def call17() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base): issue 13 item 2's one miss, ViT G = 1's shared
    checkpoint at N = 2 and 8 (-0.5 to -0.9 points against per-N checkpoints at 1-8 epochs; drawing N = 2 and 8 twice
    as often changed nothing). Two hypotheses at the 2-epoch budget (per-N references of calls 3 and 10, one seed):
    a. the layouts: the per-N references train on even shards only, the shared recipe half the steps on uneven
       ones (GPT2 showed no difference, ViT's patches are an image's rows): `--uneven-probability 0`, 3 seeds;
    b. the distributed class tokens: N of them are pooled, so the head sees an average over 2 to 8 tokens whose
       mix of exact and quantized keys depends on N: the shared recipe and per-N references at N = 2 and 8 with one
       class token (`--no-distributed-cls`), 3 seeds and one.
    8 runs at 2 epochs: ~130-175 s each with 10 sharing (call 10)."""
    g1 = ["--groups", "1", "--quantize", "hidden"]
    jobs = estimated(n_agnostic_recipe("vit", "ep2-even"), 175)
    nodct = [*g1, "--no-distributed-cls", "--epochs", "2"]
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-nodct-nagnostic-ep2", seed, [*nodct, *RANDOM_SHARDS,
                                                                                       *EVAL_LAYOUTS])
                       for seed in SEEDS], 175)
    jobs += estimated([finetune_job("vit", f"vit-g1-hidden-nodct-ep2-n{n}", 0, nodct, num_devices=n)
                       for n in ("2", "8")], 175)
    return jobs


def call18() -> list[Job]:
    """ViT (carry: wheels, gpu_data/fashion-mnist, outputs/vit-base), run 2026-11-28 (H200, 234 s, its 12 runs 148-218 s
    each, all at once): issue 13 item 2's one miss, ViT G = 1 at N = 2.
    Call 17 found that without distributed class tokens (one class token) the shared checkpoint matches the per-N one
    at N = 8 (+0.05 points) and misses by 0.40 at N = 2, but against per-N references of one seed each (ViT G = 1's
    seed spread is ~0.1-0.3 points) and with no reference at N = 3, 4, 6. So:
    a. the references without DCT to three seeds at N = 2 and 8, one seed at N = 3 and 6, three at N = 4 (with the
       other layouts evaluated: the N = 4 checkpoint at every N, as for the other stems);
    b. the shared recipe without DCT with N = 2 drawn three times as often (2,2,2,3,4,6,8; N = 8 had 0.35 points
       of margin), 3 seeds.
    12 runs at 2 epochs (estimated beforehand at ~130-175 s each from calls 10 and 17)."""
    nodct = ["--groups", "1", "--quantize", "hidden", "--no-distributed-cls", "--epochs", "2"]
    jobs = estimated([finetune_job("vit", "vit-g1-hidden-nodct-nagnostic-ep2-twos", seed,
                                   [*nodct, "--random-shards", "2,2,2,3,4,6,8", *EVAL_LAYOUTS]) for seed in SEEDS], 190)
    jobs += estimated([finetune_job("vit", f"vit-g1-hidden-nodct-ep2-n{n}", seed, nodct, num_devices=n)
                       for n, seed in (("2", 1), ("2", 2), ("8", 1), ("8", 2), ("3", 0), ("6", 0))], 190)
    jobs += estimated([finetune_job("vit", "vit-g1-hidden-nodct-ep2", seed, [*nodct, *EVAL_LAYOUTS])
                       for seed in SEEDS], 190)
    return jobs


def call19() -> list[Job]:
    """GPT2 (carry: wheels, gpu_data/kjv.txt.gz, outputs/gpt2-base), 2026-11-28: issue 12 goal 1,
    fewer codewords for a cheaper encoder. On the GPU host the senders of G = 16 kv K = 256 (+0.85 %) spend ~60 ms a
    forward encoding, ~15 % of a rank (docs/benchmarks.md, 05:50 UTC); the encoder's score product halves with K
    (`python -m benchmarks.encoder_forms`, dev VM, 2 threads, 256 tokens, 2026-11-28 06:47 UTC: encode 2.30 / 1.97 /
    1.54 ms a layer at K = 256 / 128 / 64, docs/results/encoder_forms.json). So kv at K = 128
    (G = 16 and 32) and K = 64 (G = 16), 3 seeds each, evaluated at every layout. 9 runs at the default 3 epochs.
    Ran 07:10 UTC on GPU 1 of a 2x H200 host, pinned to cores 16-31 (`CUDA_VISIBLE_DEVICES=1 taskset -c 16-31`), beside
    the latency benchmark on cores 0-15: 95-102 s a run, 113 s the call. After fine-tuning at N = 4 against the
    control's 36.36: G = 16 K = 128 +1.1 %, G = 32 K = 128 +0.4 %, G = 16 K = 64 +1.5 % (docs/results.md)."""
    kv = ["--quantize", "kv", *EVAL_LAYOUTS]
    return estimated([finetune_job("gpt2", f"gpt2-g{groups}-kv-k{size}", seed,
                                   ["--groups", groups, "--codebook-size", size, *kv])
                      for groups, size in (("16", "128"), ("32", "128"), ("16", "64")) for seed in SEEDS], 200)


K_SIZES = ("256", "512")


def call4() -> list[Job]:
    """GPT2 (KJV) and broad English: what call 3 cannot carry beside Fashion-MNIST, most important first.

    Carry: wheels, gpu_data/kjv.txt.gz, outputs/gpt2-base (about 45 MB with the tree); with
    gpu_data/english.jsonl.gz and outputs/gpt2-english-base too, about 65 MB (under 64 MiB = 67.1 MB).
    Wall seconds with ~16 sharing one H200 (accuracy-call1/2 logs): gpt2-g8-hidden 116, gpt2-g32-hidden 156-163,
    gpt2-g32-kv 171-176 (6 layouts included; they cost GPT2 ~10 s), english-g32-hidden ~300.
      a. GPT2 G = 8 hidden seeds 1-2;
      b. codebook size for the speed issue: GPT2 G = 32 hidden and kv with K = 256 and 512, 3 seeds each
         (also at the other layouts: cheap for GPT2);
      then, while time lasts: the English G = 32 variants (one seed; skipped unless their base and corpus are
      carried), GPT2 G = 32 N-agnostic (killed in call 2).
    About 3 300 run-seconds: one wave of 16 plus a short second one, ~330 s."""
    jobs = estimated(main_runs("gpt2", "8", "hidden", (1, 2)), 116)
    for size in K_SIZES:
        for mode, seconds in (("hidden", 160), ("kv", 175)):
            jobs += estimated([finetune_job("gpt2", f"gpt2-g32-{mode}-k{size}", seed,
                                            ["--groups", "32", "--quantize", mode, "--codebook-size", size,
                                             *EVAL_LAYOUTS]) for seed in SEEDS], seconds)
    for suffix, flags in ENGLISH_VARIANTS.items():  # long: early, or they would not fit
        jobs.append(finetune_job("english", f"english-g32-hidden-{suffix}", 0, ["--groups", "32", "--quantize",
                                                                               "hidden", *flags]))
        jobs[-1].estimate = 300
    jobs += estimated([finetune_job("gpt2", "gpt2-g32-hidden-nagnostic", seed,
                                    ["--groups", "32", "--quantize", "hidden", *RANDOM_SHARDS, *EVAL_LAYOUTS])
                       for seed in SEEDS], 180)
    return jobs


CALLS = {"1": call1, "2": call2, "3": call3, "4": call4, "5": call5, "6": call6, "7": call7, "8": call8,
         "9": call9, "10": call10, "11": call11, "12": call12,
         "13": call13, "14": call14, "15": call15,
         "16": call16, "17": call17, "18": call18, "19": call19}


def smoke(jobs: list[Job]) -> list[Job]:
    """Tiny versions of one job of each kind (bases, and each task with each set of flags): CPU, seconds each,
    to catch typos before GPU time is spent."""
    kinds, selected = set(), []
    for job in jobs:
        task = job.args[job.args.index("--task") + 1]
        flags = frozenset(a for a in job.args if a.startswith("--"))
        kind = (job.script, job.name if job.script == "train_base.py" else task, flags, "-demo-" in job.name)
        if kind not in kinds:
            kinds.add(kind)
            selected.append(job)
    jobs = selected
    tiny_base = ["--layers", "1", "--width", "32", "--epochs", "1", "--max-train-samples", "256", "--max-eval-samples",
                 "16", "--vocab-size", "300", "--block-size", "64", "--batch-size", "16"]
    tiny_ft = ["--max-train-samples", "32", "--max-eval-samples", "8", "--batch-size", "16", "--calibration-batches",
               "1", "--epochs", "1"]
    out = []
    for job in jobs:
        args = list(job.args)
        if job.script == "train_base.py":
            args = drop_flag(args, "--epochs") + tiny_base
            if "--task" in args and args[args.index("--task") + 1] == "vit":
                args = drop_flag(args, "--vocab-size", "--block-size")
        else:
            args = drop_flag(args, "--epochs") + tiny_ft
            if "--codebook-size" not in args:
                args += ["--codebook-size", "16"]
            else:
                args[args.index("--codebook-size") + 1] = "16"
        out.append(Job(job.name, job.script, args, job.needs))
    return out


def drop_flag(args: list[str], *flags: str) -> list[str]:
    """``args`` without the given flags and their single values (``--epochs 3``)."""
    out, skip = [], False
    for index, value in enumerate(args):
        if skip:
            skip = False
            continue
        if value in flags:
            skip = index + 1 < len(args) and not args[index + 1].startswith("--")
            continue
        out.append(value)
    return out


def command_for(job: Job, out: Path, workers: int, max_minutes: float) -> list[str]:
    args = [value.replace("{out}", str(out)) for value in job.args]
    if job.script == "train_base.py":
        return [sys.executable, str(EXAMPLES / job.script), *args, "--output-dir", str(out / job.name),
                "--workers", str(max(workers, 4)), "--max-minutes", str(max_minutes)]
    return [sys.executable, str(EXAMPLES / job.script), *args, "--output-dir", str(out / "sweep" / job.name),
            "--workers", str(workers)]


def result_path(job: Job, out: Path) -> Path:
    if job.script == "train_base.py":
        return out / job.name / "base_result.json"
    return out / "sweep" / job.name / "result.json"


def is_done(job: Job, out: Path) -> bool:
    return result_path(job, out).is_file() or (RUNS_DIR / f"{job.name}.json").is_file()


def run_jobs(jobs: list[Job], out: Path, jobs_at_once: int, workers: int, deadline_at: float,
             base_minutes: float) -> dict[str, str]:
    """Start every job whose bases exist, ``jobs_at_once`` at a time, in order; kill what runs at the deadline."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status = {job.name: "done before" for job in jobs if is_done(job, out)}
    pending = [job for job in jobs if job.name not in status]
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    planned = {job.name for job in jobs}

    def ready(job: Job) -> bool | None:
        """True: its bases exist; None: a base failed or is missing (never ready); False: wait."""
        states = []
        for need in job.needs:
            if (out / need / "base_result.json").is_file():
                states.append("ok")
            elif need not in planned:
                return None
            else:
                states.append(status.get(need))
        if any(s is not None and s not in ("ok", "done before") for s in states):
            return None
        return all(s in ("ok", "done before") for s in states)

    while pending or running:
        for job in list(pending):
            if len(running) >= jobs_at_once:
                break
            state = ready(job)
            if state and job.estimate and time.time() + job.estimate > deadline_at:
                status[job.name] = f"not started (estimated {job.estimate:.0f} s, past the deadline)"
                pending.remove(job)
                continue
            if state is None:
                status[job.name] = "skipped: its base failed or is missing"
                pending.remove(job)
            elif state:
                pending.remove(job)
                log = open(logs / f"{job.name}.log", "w")
                command = command_for(job, out, workers, base_minutes)
                running[job.name] = (job, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                                           env=env), time.time())
                log.close()
                print(f"[{time.time() - start:6.0f}s] start {job.name}", flush=True)
        for name, (job, process, began) in list(running.items()):
            if process.poll() is not None:
                ok = process.returncode == 0 and result_path(job, out).is_file()
                status[name] = "ok" if ok else f"failed rc={process.returncode}"
                del running[name]
                print(f"[{time.time() - start:6.0f}s] {status[name]:>8} {name} ({time.time() - began:.0f}s)", flush=True)
        if time.time() > deadline_at:
            for name, (job, process, _) in running.items():
                process.kill()
                status[name] = "killed at the deadline"
            status.update({job.name: "not started (deadline)" for job in pending})
            print(f"deadline: killed {len(running)}, not started {len(pending)}", flush=True)
            break
        time.sleep(1)
    return status


def plan_jobs(call: str, smoke_test: bool) -> list[Job]:
    if smoke_test:  # call 2's leftovers are call 1's kinds, smoke-tested there
        jobs = call2(leftovers=False) if call == "2" else CALLS[call]()
        planned = {job.name for job in jobs}
        # Calls 3 and 4 start from carried bases: the smoke test trains tiny ones first.
        bases = dict.fromkeys(need for job in jobs for need in job.needs if need not in planned)
        return smoke([Job(name, "train_base.py", list({**BASES, **LATER_BASES}[name])) for name in bases] + jobs)
    return CALLS[call]()


def cmd_plan(args) -> None:
    jobs = plan_jobs(args.call, args.smoke)
    for job in jobs:
        print(job.name, job.script, shlex.join(job.args))
    print(f"{len(jobs)} jobs", file=sys.stderr)


def cmd_run(args) -> None:
    out = Path(args.out)
    jobs = plan_jobs(args.call, args.smoke)
    if args.only:
        jobs = [job for job in jobs if any(re.fullmatch(pattern, job.name) for pattern in args.only)]
    deadline = args.deadline_at or time.time() + args.deadline
    status = run_jobs(jobs, out, args.jobs, args.workers, deadline, args.base_minutes)
    summary = {"call": args.call, "smoke": args.smoke, "status": status, "hardware": hardware_line(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / f"call{args.call}-summary.json").write_text(json.dumps(summary, indent=1))
    counts: dict[str, int] = {}
    for value in status.values():
        counts[value.split(":")[0].split(" rc=")[0]] = counts.get(value.split(":")[0].split(" rc=")[0], 0) + 1
    print(json.dumps(counts))


def hardware_line() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "no GPU"
    except (OSError, subprocess.SubprocessError):
        return "no GPU"


# --- moving results between the GPU host and here ------------------------------------------------------------

PART_BYTES = 15 * 1024 * 1024  # under the 16 MiB a returned file may have
DEMO_NAMES = {"gpt2-demo-n2-g32-hidden-k512-s0": "gpt2-kjv-astra", "vit-demo-n2-g32-hidden-k512-s0": "vit-fashion-mnist-astra"}
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json", "command.txt",
                    "base_result.json", "result.json")


def add_folder(archive: tarfile.TarFile, folder: Path, name: str) -> None:
    for file_name in CHECKPOINT_FILES:
        if (folder / file_name).is_file():
            archive.add(folder / file_name, arcname=f"{name}/{file_name}")


def write_parts(source: Path, dest: Path, stem: str) -> list[Path]:
    """``source`` cut into ``stem.part00``, ``.part01``, ... of at most PART_BYTES each."""
    parts = []
    with open(source, "rb") as handle:
        while chunk := handle.read(PART_BYTES):
            parts.append(dest / f"{stem}.part{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    return parts


def cmd_pack(args) -> None:
    """Results (JSON, log tails) in one archive; demo checkpoints (call 1) and trained bases in 15 MiB parts."""
    out, dest = Path(args.out), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / f"call{args.call}-results.tar.gz", "w:gz") as archive:
        for path in sorted(out.glob("sweep/*/result.json")) + sorted(out.glob("*-base/base_result.json")):
            archive.add(path, arcname=str(path.relative_to(out)))
        for path in sorted(out.glob("call*-summary.json")):
            archive.add(path, arcname=path.name)
        for path in sorted(out.glob("logs/*.log")):
            tail = path.read_bytes()[-4000:]
            info = tarfile.TarInfo(f"logs/{path.name}")
            info.size = len(tail)
            archive.addfile(info, io.BytesIO(tail))
    written = [dest / f"call{args.call}-results.tar.gz"]
    # Call 1's demo checkpoints, and the bases a call trains (a later call on a fresh host carries them).
    trained = {job.name for job in CALLS[args.call]() if job.script == "train_base.py"}
    demos = sorted(out.glob("sweep/*-demo-*")) if args.call == "1" else []
    bases = sorted(p for p in out.glob("*-base") if p.name in trained and (p / "model.safetensors").is_file())
    for stem, folders in (("checkpoints", demos), ("bases", bases)):
        if not folders:
            continue
        staging = out / f"{stem}.tar"
        with tarfile.open(staging, "w") as archive:
            for folder in folders:
                add_folder(archive, folder, DEMO_NAMES.get(folder.name, folder.name))
        written += write_parts(staging, dest, f"{stem}.tar")
        staging.unlink()
    for path in written:
        print(f"{path} {path.stat().st_size / 1e6:.1f} MB")


def cmd_collect(args) -> None:
    """Unpack what a call brought back: results -> --out and docs/results/runs/; checkpoints -> checkpoints/;
    bases -> --out (carried into call 2)."""
    source, out = Path(args.source), Path(args.out)
    runs_dir, docs = Path(args.runs_dir), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    for archive_path in sorted(source.glob("call*-results.tar.gz")):
        with tarfile.open(archive_path) as archive:
            archive.extractall(out, filter="data")
    for stem, target in (("checkpoints", Path(args.checkpoints or out / "checkpoints")), ("bases", out)):
        parts = sorted(source.glob(f"{stem}.tar.part*"))
        if not parts:
            continue
        joined = out / f"{stem}.tar"
        with open(joined, "wb") as handle:
            for part in parts:
                handle.write(part.read_bytes())
        with tarfile.open(joined) as archive:
            archive.extractall(target, filter="data")
        joined.unlink()
        print(f"{stem}: {len(parts)} parts -> {target}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in sorted(out.glob("sweep/*/result.json")):
        shutil.copyfile(path, runs_dir / f"{path.parent.name}.json")
        copied += 1
    bases_dir = docs / "results" / "bases"
    bases_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(out.glob("*-base/base_result.json")):
        shutil.copyfile(path, bases_dir / f"{path.parent.name}.json")
    for path in sorted(out.glob("call*-summary.json")):
        shutil.copyfile(path, docs / "results" / f"accuracy-{path.name}")
    print(f"{copied} run results -> {runs_dir}")


# --- report -----------------------------------------------------------------------------------------------

# Two-sided 5 % critical values of Student's t for 1..30 degrees of freedom (a statistical table).
T_CRITICAL = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
              2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
              2.045, 2.042)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def group_name(run: str) -> str:
    return re.sub(r"-s\d+$", "", run)


def load_results(extra_dirs: list[Path]) -> list[dict]:
    """Per-run results: docs/results/runs/*.json and any ``sweep/*/result.json`` under ``extra_dirs``."""
    results = {}
    for path in sorted(RUNS_DIR.glob("*.json")):
        results[path.stem] = json.loads(path.read_text())
    for folder in extra_dirs:
        for path in sorted(folder.glob("sweep/*/result.json")):
            results[path.parent.name] = json.loads(path.read_text())
    for name, row in results.items():
        row["run"] = name
    return list(results.values())


def evaluations(result: dict) -> list[dict]:
    """Every measurement of one run: its main one, then ``evals`` (other N, uneven shards, other datasets)."""
    main = {"eval_dataset": result.get("eval_dataset") or f"{result['dataset']}:test",
            "eval_num_devices": result.get("eval_num_devices", result.get("N")), "eval_shard_sizes": None,
            "value": result["value"], "value_before_finetune": result.get("value_before_finetune"),
            "base_value": result["base_value"]}
    base_by_dataset = {e["eval_dataset"]: e["value"] for e in result.get("base_evals", [])}
    rows = [main]
    for entry in result.get("evals", []):
        rows.append({**entry, "value_before_finetune": None,
                     "base_value": base_by_dataset.get(entry["eval_dataset"], main["base_value"]
                                                        if entry["eval_dataset"] == main["eval_dataset"] else None)})
    return rows


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (campaign, run without seed, evaluation): mean and std over seeds, control_value attached."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for result in results:
        for evaluation in evaluations(result):
            key = (result.get("campaign", "current"), group_name(result["run"]), evaluation["eval_dataset"],
                   evaluation["eval_num_devices"], json.dumps(evaluation["eval_shard_sizes"]))
            groups.setdefault(key, []).append((result, evaluation))
    rows = []
    for (campaign, run, eval_dataset, eval_n, sizes), members in groups.items():
        members.sort(key=lambda m: m[0].get("seed", 0))
        first = members[0][0]
        values = [e["value"] for _, e in members]
        before = [e["value_before_finetune"] for _, e in members if e["value_before_finetune"] is not None]
        bases = [e["base_value"] for _, e in members if e["base_value"] is not None]
        rows.append({
            "run": run, "campaign": campaign, "model": first["model"], "task": first["task"],
            "dataset": first["dataset"], "N": first["N"], "G": first["G"], "K": first["K"],
            "codebook_size": None if first["quantize"].startswith("none") else first["K"],
            "quantize": first["quantize"], "noise_scale": first["noise_scale"],
            "noise_schedule": first.get("noise_schedule", "constant"), "random_shards": first.get("random_shards"),
            "distributed_cls": first["distributed_cls"], "commitment_weight": first["commitment_weight"],
            "metric": first["metric"], "eval_dataset": eval_dataset, "eval_num_devices": eval_n,
            "eval_shard_sizes": json.loads(sizes), "seeds": [r.get("seed", 0) for r, _ in members],
            "value": mean(values), "std": sample_std(values), "values": values,
            "base_value": mean(bases) if bases else None,
            "value_before_finetune": mean(before) if before else None, "control_value": None,
            "bits_per_token": first["bits_per_token"], "compression_ratio": first["compression_ratio"],
            "hidden_size": first["hidden_size"], "epochs": first["epochs"], "train_steps": first["train_steps"],
            "finetune_seconds": mean([r["finetune_seconds"] for r, _ in members]),
            "hardware": sorted({r["hardware"] for r, _ in members}), "dates": sorted({r["date"] for r, _ in members}),
            "code_stats": first.get("code_stats", {}), "commands": [r["command"] for r, _ in members],
            "command": members[0][0]["command"], "date": max(r["date"] for r, _ in members),
        })
    controls = {(r["campaign"], r["task"], r["dataset"], r["eval_dataset"]): r["value"]
                for r in rows if r["run"].endswith("-control")}
    for row in rows:
        row["control_value"] = controls.get((row["campaign"], row["task"], row["dataset"], row["eval_dataset"]))
    return rows


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def value_cell(row: dict) -> str:
    return fmt(row["value"]) + ("" if row["std"] is None else f" ± {row['std']:.2f}") + f" ({len(row['seeds'])})"


def change(value: float, reference: float | None, metric: str) -> str:
    if reference is None:
        return "n/a"
    if metric == "accuracy":
        return f"{value - reference:+.2f} pts"
    return f"{100 * (value / reference - 1):+.1f}%"


HEADER = ("| run | dataset | eval data | N (FT) | N (eval) | G | K | quantize | λ | DCT | β | metric | base | before FT "
          "| after FT: mean ± std (seeds) | vs base | control | vs control | bits/token | FT seconds |")


def table_row(row: dict) -> str:
    sizes = row["eval_shard_sizes"]
    n_eval = "n/a" if row["eval_num_devices"] is None else str(row["eval_num_devices"])
    if sizes:
        n_eval += " (" + ":".join(f"{s:g}" for s in sizes) + ")"
    n_ft = "random 2-8" if row["random_shards"] else str(row["N"])
    cells = [
        row["run"], row["dataset"], row["eval_dataset"], n_ft, n_eval, str(row["G"]),
        "n/a" if row.get("codebook_size") is None else str(row["codebook_size"]), row["quantize"],
        f"{row['noise_scale']:g}" + (" (warm-up)" if row["noise_schedule"] == "warmup" else ""),
        "on" if row["distributed_cls"] else "off" if row["task"] == "vit" else "n/a", f"{row['commitment_weight']:g}",
        row["metric"], fmt(row["base_value"]), fmt(row["value_before_finetune"]), value_cell(row),
        change(row["value"], row["base_value"], row["metric"]), fmt(row["control_value"]),
        change(row["value"], row["control_value"], row["metric"]),
        str(row["bits_per_token"]) if row["bits_per_token"] else "n/a", f"{row['finetune_seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> list[str]:
    return [HEADER, "|---" * 20 + "|", *map(table_row, rows)] if rows else ["(no rows yet)"]


def welch(a: dict, b: dict) -> tuple[float, float | None, bool | None]:
    """(difference a - b, t statistic, established at 5 %?) from two aggregated rows' seed values."""
    difference = a["value"] - b["value"]
    if len(a["values"]) < 2 or len(b["values"]) < 2:
        return difference, None, None
    va, vb = a["std"] ** 2 / len(a["values"]), b["std"] ** 2 / len(b["values"])
    if va + vb == 0:
        return difference, None, difference != 0
    t = difference / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va**2 / (len(a["values"]) - 1)) + (vb**2 / (len(b["values"]) - 1)))
    critical = T_CRITICAL[min(max(int(df), 1), len(T_CRITICAL)) - 1]
    return difference, t, abs(t) > critical


def pooled_std(a: dict, b: dict) -> float | None:
    """The within-group standard deviation of two rows' seed values (None below two seeds each)."""
    na, nb = len(a["values"]), len(b["values"])
    if na < 2 or nb < 2:
        return None
    return math.sqrt(((na - 1) * a["std"] ** 2 + (nb - 1) * b["std"] ** 2) / (na + nb - 2))


def effect_lines(rows: list[dict]) -> list[str]:
    """NAQ, DCT and β: each variant against the G=1 hidden row it varies, with the verdict computed."""
    by_run = {r["run"]: r for r in rows if r["eval_num_devices"] == r["N"] and not r["eval_shard_sizes"]
              and r["eval_dataset"].startswith(r["dataset"])}
    lines = []
    factors = {"NAQ": ("naq0", "naq0.3"), "DCT": ("nodct",), "β": ("beta0", "beta0.25")}
    for factor, suffixes in factors.items():
        for task in ("vit", "gpt2"):
            reference = by_run.get(f"{task}-g1-hidden")
            for suffix in suffixes:
                variant = by_run.get(f"{task}-g1-hidden-{suffix}")
                if reference is None or variant is None:
                    continue
                difference, t, established = welch(variant, reference)
                unit = "points" if reference["metric"] == "accuracy" else "perplexity"
                pooled = pooled_std(variant, reference)
                verdict = ("not testable (one seed)" if established is None else
                           "**established**" if established else "not established")
                lines.append(
                    f"- {factor}, {task} {suffix}: {variant['value']:.2f} ({len(variant['seeds'])} seeds) against "
                    f"{reference['value']:.2f} ({len(reference['seeds'])}): {difference:+.2f} {unit}; pooled std "
                    f"{fmt(pooled)}; Welch t = {fmt(t)}: {verdict} at the 5 % level")
    return lines or ["- no ablation rows yet"]


K_RUN = re.compile(r"(gpt2|vit)-g\d+-(hidden|kv)-k\d+")
K_GOAL = 0.01  # issue 12: a smaller codebook is usable when perplexity stays within +1 % of the control's


def codebook_lines(rows: list[dict]) -> list[str]:
    """Each smaller-K row at its training layout against the control (goal: perplexity within +1 %) and against
    the same run with K = 1024."""
    at_layout = {r["run"]: r for r in rows if r["eval_num_devices"] == r["N"] and not r["eval_shard_sizes"]
                 and r["eval_dataset"].startswith(r["dataset"] + ":")}
    lines = []
    for run, row in sorted(at_layout.items(), key=lambda item: (re.sub(r"-k\d+$", "", item[0]),
                                                                item[1]["codebook_size"] or 0)):
        if not K_RUN.fullmatch(run):
            continue
        reference = at_layout.get(re.sub(r"-k\d+$", "", run))
        line = (f"- {run} (K = {row['codebook_size']}, {len(row['seeds'])} seeds): {row['value']:.2f} ± {fmt(row['std'])}"
                f"; control {fmt(row['control_value'])}: {change(row['value'], row['control_value'], row['metric'])}")
        if row["control_value"] is not None and row["metric"] != "accuracy":
            met = row["value"] <= row["control_value"] * (1 + K_GOAL)
            line += f" (goal within +{100 * K_GOAL:.0f} %: **{'met' if met else 'missed'}**)"
        if reference is not None:
            difference, t, established = welch(row, reference)
            line += (f"; against K = {reference['codebook_size']} ({reference['value']:.2f}, "
                     f"{len(reference['seeds'])} seeds): {difference:+.2f}, Welch t = {fmt(t)}"
                     + ("" if established is None else ", established" if established else ", not established"))
        lines.append(line)
    return lines or ["- no smaller-codebook rows yet"]


TARGETS = [  # (run, goal, allowed drop: accuracy points, or perplexity increase as a fraction)
    ("vit-g32-hidden", "within 0.5 points of base", 0.5), ("vit-g32-kv", "within 0.5 points of base", 0.5),
    ("vit-g1-hidden", "within 2.5 points of base", 2.5), ("vit-g1-kv", "within 2.5 points of base", 2.5),
    ("gpt2-g32-hidden", "perplexity within +8% of base", 0.08), ("gpt2-g32-kv", "perplexity within +8% of base", 0.08),
]


def shortfall(row: dict, allowed: float) -> float:
    if row["metric"] == "accuracy":
        return (row["base_value"] - row["value"]) - allowed
    return row["value"] / row["base_value"] - 1 - allowed


def target_lines(main: dict[str, dict]) -> list[str]:
    lines = []
    for run, goal, allowed in TARGETS:
        row = main.get(run)
        if row is None:
            continue
        gap = shortfall(row, allowed)
        unit = " points" if row["metric"] == "accuracy" else ""
        verdict = "met" if gap <= 0 else f"MISSED by {gap:.2f}{unit}" if unit else f"MISSED by {100 * gap:.1f}%"
        line = (f"- {run} ({len(row['seeds'])} seeds): {goal} -> {change(row['value'], row['base_value'], row['metric'])}"
                f" (std {fmt(row['std'])}): **{verdict}**; against the control: "
                f"{change(row['value'], row['control_value'], row['metric'])}")
        variants = [r for name, r in main.items() if name.startswith(run + "-") and r["N"] == row["N"]
                    and not r["random_shards"]]
        if gap > 0 and variants:
            best = min(variants, key=lambda r: shortfall(r, allowed))
            line += (f"; best variant: {best['run']} {change(best['value'], best['base_value'], best['metric'])} "
                     f"({len(best['seeds'])} seeds, std {fmt(best['std'])}): "
                     f"{'met' if shortfall(best, allowed) <= 0 else 'missed'}")
        lines.append(line)
    return lines or ["- no target rows yet"]


def within(a: float, b: float, metric: str) -> bool:
    """Issue 13 item 2: ``a`` at most 0.3 points (accuracy) or 1 % (perplexity) worse than ``b``; better is fine."""
    return a >= b - 0.3 if metric == "accuracy" else a <= b * 1.01


def n_agnostic_lines(rows: list[dict]) -> list[str]:
    """For each N: the N=4 checkpoint and the N-agnostic ones, each against the checkpoint fine-tuned at that N with
    the same budget: ``-nagnostic`` against ``-nN`` (the default epochs), ``-nagnostic-epE...`` against ``-epE-nN``
    (``-epE`` at N = 4), where those exist (a longer fine-tuning also improves the model itself)."""
    lines = []
    even = {(r["run"], r["eval_num_devices"]): r for r in rows if not r["eval_shard_sizes"]
            and r["eval_dataset"].startswith(r["dataset"])}
    runs = sorted({r["run"] for r in rows})
    for task in ("gpt2", "vit"):
        for groups, mode in (("1", "hidden"), ("1", "hidden-nodct"), ("32", "hidden"), ("32", "kv")):
            stem = f"{task}-g{groups}-{mode}"
            agnostic_runs = [run for run in runs if re.fullmatch(re.escape(stem) + r"-nagnostic(-[\w.-]+)?", run)]
            budgets = [""] + sorted({m.group(1) for run in agnostic_runs
                                     if (m := re.fullmatch(re.escape(stem) + r"-nagnostic-(ep\d+).*", run))})
            for n in (2, 3, 4, 6, 8):
                for budget in budgets:
                    prefix = f"{stem}-{budget}" if budget else stem
                    reference = even.get((prefix, 4) if n == 4 else (f"{prefix}-n{n}", n))
                    fixed = None if n == 4 else even.get((prefix, n))
                    same_budget = [run for run in agnostic_runs
                                   if (run[len(stem) + len("-nagnostic"):].startswith(f"-{budget}") if budget
                                       else not re.search(r"-nagnostic-ep\d+", run))]
                    labelled = [("N=4 checkpoint", fixed)] + [
                        ("N-agnostic checkpoint" + run[len(stem) + len("-nagnostic"):].replace("-", " ", 1),
                         even.get((run, n))) for run in same_budget]
                    labelled = [(label, row) for label, row in labelled if row is not None]
                    if reference is None and not labelled:
                        continue
                    title = f"- {stem} at N={n}" + (f", {budget[2:]} epochs" if budget else "") + ":"
                    parts = [f"fine-tuned at N={n}: {value_cell(reference)}" if reference
                             else f"fine-tuned at N={n}: not run"]
                    for label, row in labelled:
                        text = f"{label}: {value_cell(row)}"
                        if reference:
                            ok = within(row["value"], reference["value"], row["metric"])
                            text += f" ({change(row['value'], reference['value'], row['metric'])}: " \
                                    f"{'met' if ok else 'missed'}: at most 0.3 pts / 1 % worse)"
                        parts.append(text)
                    if labelled:
                        lines.append(title + " " + "; ".join(parts))
    for row in rows:  # uneven shards against the same checkpoint with even shards at that N
        if not row["eval_shard_sizes"] or not row["eval_dataset"].startswith(row["dataset"]):
            continue
        evenly = even.get((row["run"], row["eval_num_devices"]))
        if evenly is not None:
            sizes = ":".join(f"{size:g}" for size in row["eval_shard_sizes"])
            lines.append(f"- {row['run']} with uneven shards {sizes}: {value_cell(row)} against {evenly['value']:.2f} "
                         f"with even shards ({change(row['value'], evenly['value'], row['metric'])})")
    return lines or ["- no N-agnostic rows yet"]


def ood_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if not re.match(r"(english|llama-english)-g", row["run"]) or row["eval_dataset"] != "english-ood:test":
            continue
        if row["control_value"] is None:
            continue
        gap = row["value"] / row["control_value"] - 1
        lines.append(f"- {row['run']}: out-of-domain perplexity {value_cell(row)} against the control's "
                     f"{row['control_value']:.2f} ({100 * gap:+.1f}%; goal +3 %: {'met' if gap <= 0.03 else 'MISSED'}); "
                     f"base {fmt(row['base_value'])}")
    return lines or ["- no broad-English rows yet"]


PREAMBLE = """# Accuracy of ASTRA after NAQ fine-tuning

Written by `examples/accuracy_sweep.py report` from the per-run JSON files of `examples/finetune_astra.py`
(docs/results/runs/, one per run and seed; the aggregated rows are in `docs/results/accuracy.json`, one per
run, evaluation dataset and evaluation layout, with `seeds`, `value` = their mean, `std`, `eval_num_devices`,
`eval_dataset`, `control_value` and `codebook_size` = K, null for controls).

Setup (no pretrained weights can be downloaded here, so the base models were trained here first):
- ViT: 6 layers, width 192, 3 heads, 4x4 patches on 28x28 Fashion-MNIST (49 patches + CLS), trained from scratch
  (`train_base.py`, 20 epochs or its time limit, AdamW 1e-3, cosine, flip/shift augmentation). Metric: test
  accuracy in percent (10 000 images).
- GPT2 (KJV): 6 layers, width 256, 4 heads, context 256, byte-level BPE of 8192 tokens trained here on the
  training split; the King James Bible split by chapter (every 20th chapter test, the one before it validation).
  Metric: perplexity = exp(mean token cross-entropy) on the test split's blocks of 256 tokens.
- GPT2 (English): the same shape, trained on a broader English mix of Debian packages (`examples/astra_examples/english.py`):
  the KJV training split, GCIDE (every 8th entry; GPL), FOLDOC (GNU FDL), the Jargon File (public domain) and
  the fortune files (BSD); test = the held-out entries of each. Out-of-domain evaluation (`english-ood`): The
  Devil's Dictionary (Bierce, 1911, public domain) and Debian's constitution, social contract, manifesto and
  bug-tracker guides (`doc-debian`): sources no model sees in training.
- ASTRA: K = 1024 codewords unless stated (column K; "-k256"/"-k512" runs), codebooks by k-means on 8 training batches, learned by gradient,
  dead-code reset each logging window (`AstraNAQCallback`), β = 1e-4, DCT on (ViT), AdamW 2e-4 cosine, no weight
  decay. Budget: ViT 1 epoch (235 steps of 256 images), GPT2-KJV 3 epochs (324 steps of 32 x 256 tokens),
  GPT2-English 1 epoch. All fine-tunings of one GPU call ran concurrently on one GPU, so "FT seconds" is wall
  time under sharing.
- Seeds: each row is the mean over the seeds listed (fine-tuning seed: data order, k-means, NAQ noise, resets);
  "± std" is the sample standard deviation over them. The base models are the same for every seed.
- Other layouts: every N = 4 checkpoint is also evaluated at N = 2, 3, 6, 8 (even shards) and with uneven shards
  (relative sizes 1:2:3:4 and 4:1:1:2); "-nagnostic" rows were fine-tuned with N and shard boundaries drawn per
  step from N in {2, 3, 4, 6, 8} (`RandomShardsCallback`), "-nN" rows were fine-tuned at that N (the per-N
  reference).
- Data: Debian's `dataset-fashion-mnist`, `bible-kjv-text` and the packages above. The GPU host has no apt: the
  runs there read copies made by `scripts/gpu/prepare.sh` (`ASTRA_FASHION_MNIST_DIR`, `ASTRA_KJV_TEXT`,
  `ASTRA_ENGLISH_CORPUS`).
- Reproduce: `bash scripts/gpu/prepare.sh` here; on a one-GPU host `bash scripts/gpu/accuracy_call.sh 1` (bases,
  demo checkpoints, main rows, broad English), here `python examples/accuracy_sweep.py collect --from <what came
  back>`, then `bash scripts/gpu/accuracy_call.sh 2` there (ablations, N-agnostic, recipes, what call 1 left),
  `collect` again, then calls 3 (ViT: what call 2 could not carry) and 4 (GPT2: smaller codebooks, the rest),
  each followed by `collect`; calls 5-19 likewise (each one's docstring in `examples/accuracy_sweep.py` says what it
  runs and carries; `python examples/accuracy_sweep.py plan --call N` lists its runs), and
  `python examples/accuracy_sweep.py report`. Each call stops its runs at a deadline
  (under 9 minutes); runs that did not finish are listed in its `callN-summary.json` and simply have no row.
"""


def migrate_legacy() -> int:
    """The first campaign's single-seed rows (accuracy.json and controls.json of 2026-11-26) as per-run files."""
    legacy = RUNS_DIR / "legacy-2026-11-26"
    sources = [DOCS / "results" / "accuracy.json", DOCS / "results" / "controls.json"]
    count = 0
    legacy.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if not source.is_file():
            continue
        for row in json.loads(source.read_text()):
            if "campaign" in row:
                continue  # already the new format
            command = shlex.split(row["command"])
            name = row.get("run") or Path(command[command.index("--output-dir") + 1]).name
            row = {**row, "run": name, "task": row.get("task") or ("vit" if row["metric"] == "accuracy" else "gpt2"),
                   "campaign": "2026-11-26 (first bases)", "seed": 0, "eval_dataset": f"{row['dataset']}:test",
                   "eval_num_devices": None if row["quantize"].startswith("none") else row["N"], "evals": [],
                   "base_evals": []}
            (legacy / f"{name}-s0.json").write_text(json.dumps(row, indent=1) + "\n")
            count += 1
    # The first campaign's bases, from the base table of the results.md it wrote.
    bases_dir = DOCS / "results" / "bases"
    bases_dir.mkdir(parents=True, exist_ok=True)
    old_report = DOCS / "results.md"
    pattern = re.compile(r"^\| (?P<model>(gpt2|vit) [^|]+) \| (?P<dataset>[^|]+) \| (?P<metric>\w+) (?P<value>[\d.]+) \| "
                         r"(?P<parameters>[\d,]+) \| (?P<seconds>[\d.]+) \| (?P<hardware>[^|]+) \| `(?P<command>[^`]+)` \|$")
    for line in old_report.read_text().splitlines() if old_report.is_file() else []:
        match = pattern.match(line)
        if match:
            task = match["model"].split()[0]
            base = {"model": match["model"], "task": task, "dataset": match["dataset"], "metric": match["metric"],
                    "value": float(match["value"]), "eval_dataset": f"{match['dataset']}:test", "evals": [],
                    "parameters": int(match["parameters"].replace(",", "")), "train_seconds": float(match["seconds"]),
                    "hardware": match["hardware"], "date": "2026-11-26", "command": match["command"]}
            (bases_dir / f"legacy-2026-11-26-{task}-base.json").write_text(json.dumps(base, indent=1) + "\n")
    return count


def load_all(extra_dirs: list[Path]) -> list[dict]:
    results = load_results(extra_dirs)
    for path in sorted((RUNS_DIR / "legacy-2026-11-26").glob("*.json")):
        row = json.loads(path.read_text())
        row["run"] = path.stem
        results.append(row)
    return results


def left_lines(results: list[dict]) -> list[str]:
    """The jobs of the recorded GPU calls that have no result, by what happened to them."""
    done = {row["run"] for row in results}
    left: dict[str, list[str]] = {}
    for path in sorted((DOCS / "results").glob("accuracy-call*-summary.json")):
        summary = json.loads(path.read_text())
        for name, state in summary["status"].items():
            if name not in done and not name.endswith("-base") and state not in ("ok", "done before"):
                left.setdefault(f"call {summary['call']} ({summary['date']}): {state}", []).append(name)
    return [f"- {reason}: {', '.join(names)}" for reason, names in left.items()] or ["- none recorded"]


def use_docs(docs: Path) -> None:
    """Read and write the report under ``docs`` (the repository's docs/ by default; smoke tests use a copy)."""
    global DOCS, RUNS_DIR
    DOCS, RUNS_DIR = docs, docs / "results" / "runs"


def cmd_report(args) -> None:
    extra = [Path(p) for p in args.out] if args.out else []
    if not any(RUNS_DIR.glob("legacy-2026-11-26/*.json")):
        migrate_legacy()
    rows = aggregate(load_all(extra))
    if not rows:
        raise SystemExit("no results")
    rows.sort(key=lambda r: (r["campaign"].startswith("2026-11-26"), r["run"], r["eval_dataset"],
                             r["eval_num_devices"] or 0, json.dumps(r["eval_shard_sizes"])))
    public = [{k: v for k, v in row.items() if k != "values"} | {"seed_values": row["values"]} for row in rows]
    (DOCS / "results" / "accuracy.json").write_text(json.dumps(public, indent=1) + "\n")
    current = [r for r in rows if not r["campaign"].startswith("2026-11-26")]
    legacy = [r for r in rows if r["campaign"].startswith("2026-11-26")]
    at_training_layout = [r for r in current if (r["eval_num_devices"] == r["N"] or r["eval_num_devices"] is None)
                          and not r["eval_shard_sizes"] and r["eval_dataset"].startswith(r["dataset"] + ":")]
    main = {r["run"]: r for r in at_training_layout if not r["random_shards"]}
    sections = {
        "Main rows (N = 4, K = 1024)": [r for r in at_training_layout
                                        if re.fullmatch(r"(gpt2|vit)-(g\d+-(hidden|kv)|control)", r["run"])],
        "Broad English (GPT2 trained on the English mix)": [r for r in current if r["run"].startswith("english-")],
        "Llama-shaped model on the KJV text (issue 10)": [r for r in current if r["run"].startswith("llama-")
                                                          and not r["run"].startswith("llama-english-")],
        "Llama-shaped model on broad English (issue 13 item 3)": [r for r in current
                                                                  if r["run"].startswith("llama-english-")],
        "Codebook size (G = 32, K < 1024; issue 12's encode cost grows with K)": [
            r for r in current if K_RUN.fullmatch(r["run"])
            or (re.fullmatch(r"(gpt2|vit)-g32-(hidden|kv)", r["run"]) and r in at_training_layout
                and any(K_RUN.fullmatch(o["run"]) and o["task"] == r["task"] for o in current))],
        "Ablations (G = 1, hidden; one change each)": [
            r for r in at_training_layout if re.fullmatch(r"(gpt2|vit)-g1-hidden(-(naq|beta|nodct).*)?", r["run"])],
        "ViT G = 1 hidden: recipes for the target": [r for r in at_training_layout
                                                     if r["run"].startswith("vit-g1-hidden-ep")],
        "One checkpoint for any N: other layouts at evaluation": [
            r for r in current if re.fullmatch(r"(gpt2|vit)-g\d+-(hidden|kv)(-ep\d+)?(-nagnostic(-[\w.-]+)?|-n\d+)?", r["run"])
            and (r["eval_num_devices"] != r["N"] or r["eval_shard_sizes"] or r["random_shards"] or "-n" in r["run"][-4:])],
        "Demo checkpoints (issue 9; N = 2, K = 512, saved in checkpoints/)": [
            r for r in current if "-demo-" in r["run"]],
    }
    bases = {path.stem: json.loads(path.read_text()) for path in sorted((DOCS / "results" / "bases").glob("*.json"))}
    lines = [PREAMBLE, "## Base models\n"]
    if bases:
        lines += ["| base | dataset | metric (test) | other evaluations | parameters | epochs done | training seconds "
                  "| hardware | date | command |", "|---" * 10 + "|"]
        for name, base in bases.items():
            others = "; ".join(f"{e['eval_dataset']} {e['value']:.2f}" for e in base.get("evals", [])) or "n/a"
            lines.append(f"| {name} | {base['dataset']} | {base['metric']} {base['value']:.2f} | {others} | "
                         f"{base['parameters']:,} | {base.get('epochs_done', 'n/a')} | {base['train_seconds']:.0f} | "
                         f"{base['hardware']} | {base.get('date', 'n/a')} | `{base['command']}` |")
    else:
        lines.append("(the bases of the current campaign have not been trained yet; see the earlier rows below)")
    for title, section_rows in sections.items():
        lines += ["", f"## {title}\n", *table(section_rows)]
    lines += ["", "## Targets (means over seeds)\n", *target_lines(main),
              "", "## Are the effects of NAQ, DCT and β established?\n",
              "Each variant against the G = 1 hidden row it varies; established when Welch's t exceeds the two-sided "
              "5 % critical value for its degrees of freedom (computed from the seeds' values).\n",
              *effect_lines(at_training_layout),
              "", "## Smaller codebooks: perplexity against the control\n", *codebook_lines(current),
              "", "## One checkpoint for any number of devices\n",
              "Goal: one checkpoint at most 0.3 points (accuracy) or 1 % (perplexity) worse than the checkpoint fine-tuned at "
              "each N.\n", *n_agnostic_lines(current),
              "", "## Out-of-domain perplexity (broad English, G = 32; GPT2 and the Llama-shaped model)\n",
              *ood_lines(current)]
    lines += ["", "## Runs left (planned, no result: killed at a call's deadline, not started, or failed)\n",
              *left_lines(load_all([]) + load_results(extra))]
    if legacy:
        lines += ["", "## Earlier rows (2026-11-26, first bases, one seed each)\n",
                  "Kept with the new keys (seeds [0], std n/a); their bases were trained by the same commands in an "
                  "earlier call, so they are not pooled with the rows above.\n", *table(legacy)]
        legacy_main = {r["run"]: r for r in legacy if r["eval_dataset"].startswith(r["dataset"] + ":")}
        lines += ["", "Targets and effects of these rows (one seed: no effect can be established):\n",
                  *target_lines(legacy_main), *effect_lines(list(legacy_main.values()))]
    commands = [c for r in rows for c in r["commands"]]
    lines += ["", "## Commands\n", "Every run above, in order (run from the repository root after the bases exist; "
              "`outputs/` paths as on the GPU host):", "", "```", *dict.fromkeys(commands), "```", ""]
    hardware = sorted({h for r in rows for h in r["hardware"]})
    dates = sorted({d for r in rows for d in r["dates"]})
    lines.append(f"Fine-tuning hardware: {', '.join(hardware)}; dates: {', '.join(dates)}. "
                 f"Written by `python examples/accuracy_sweep.py report`.")
    (DOCS / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'results.md'} and {DOCS / 'results' / 'accuracy.json'} ({len(rows)} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="print a call's jobs in order")
    run = commands.add_parser("run", help="run a call's jobs that have no result yet")
    pack = commands.add_parser("pack", help="put a call's results (and call 1's checkpoints) into --dest")
    for sub in (plan, run, pack):
        sub.add_argument("--call", choices=sorted(CALLS), required=True)
    for sub in (plan, run):
        sub.add_argument("--smoke", action="store_true", help="tiny models and data (CPU, seconds per job)")
    for sub in (run, pack):
        sub.add_argument("--out", default="outputs")
    run.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="concurrent processes")
    run.add_argument("--workers", type=int, default=1, help="dataloader workers per fine-tuning")
    run.add_argument("--deadline", type=float, default=float("inf"), help="seconds from now")
    run.add_argument("--deadline-at", type=float, help="Unix time; kill what still runs then (overrides --deadline)")
    run.add_argument("--base-minutes", type=float, default=2.5, help="time limit of each base training")
    run.add_argument("--only", nargs="*", help="regular expressions on job names")
    pack.add_argument("--dest", required=True)
    collect = commands.add_parser("collect", help="unpack what a GPU call brought back (files_at)")
    collect.add_argument("--from", dest="source", required=True)
    collect.add_argument("--out", default="outputs")
    collect.add_argument("--runs-dir", default=str(RUNS_DIR), help="where the per-run results are kept (committed)")
    collect.add_argument("--docs", default=str(DOCS), help="base results go to <docs>/results/bases")
    collect.add_argument("--checkpoints", help="where the demo checkpoints go (default <out>/checkpoints: ignored, so "
                         "they do not travel with call 2; copy them to checkpoints/ afterwards)")
    report = commands.add_parser("report", help="write docs/results.md and docs/results/accuracy.json")
    report.add_argument("--out", nargs="*", help="also read sweep/*/result.json under these folders")
    report.add_argument("--docs", default=str(DOCS), help="the docs folder to read runs from and write to")
    args = parser.parse_args()
    if args.command == "report":
        use_docs(Path(args.docs))
    {"plan": cmd_plan, "run": cmd_run, "pack": cmd_pack, "collect": cmd_collect, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
