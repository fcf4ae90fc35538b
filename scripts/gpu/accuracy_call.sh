#!/bin/bash
# One accuracy GPU call (issue 13): runs `examples/accuracy_sweep.py run --call N` on one GPU and packs what
# comes back into $OUT (at most 8 files of at most 15 MiB; see `accuracy_sweep.py pack`).
# Usage, from the repository root:
#   bash scripts/gpu/accuracy_call.sh 1            # on the GPU host; carry wheels, gpu_data
#   bash scripts/gpu/accuracy_call.sh 2            # carry wheels, gpu_data/fashion-mnist, gpu_data/kjv.txt.gz,
#                                                  #   outputs/gpt2-base, outputs/vit-base (call 1's, collected)
#   bash scripts/gpu/accuracy_call.sh 3            # ViT: carry wheels, gpu_data/fashion-mnist, outputs/vit-base
#   bash scripts/gpu/accuracy_call.sh 4            # GPT2: carry wheels, gpu_data/kjv.txt.gz, outputs/gpt2-base
#                                                  #   (+ gpu_data/english.jsonl.gz, outputs/gpt2-english-base)
#   bash scripts/gpu/accuracy_call.sh 5..19        # later calls: each call's carry list is in its docstring in
#                                                  #   examples/accuracy_sweep.py (9, 10, 12, 14, 16, 17, 18: ViT; 11, 13, 15, 19: GPT2)
#   bash scripts/gpu/accuracy_call.sh 1 --smoke    # here, on the CPU: tiny models, a few steps, same code paths
#   (the 64 MiB a call carries, working tree included, hold Fashion-MNIST + vit-base or the GPT2 inputs, not both)
# Environment: OUT (default /tmp/astra-call-out), ASTRA_CALL_SECONDS (whole call, default 520),
#   ASTRA_JOBS (concurrent trainings, default 16; 3 with --smoke), ASTRA_WORK (default outputs; with --smoke
#   /tmp/astra-smoke-work, holding links to the bases in outputs/),
#   ASTRA_ONLY (regular expressions on job names, e.g. '(gpt2|llama|english)-.*' when the 64 MiB a call may
#   carry leave out a task's base and data).
set -uo pipefail
call=${1:?usage: accuracy_call.sh 1|2|3|4 [--smoke]}
smoke=${2:-}
start=$(date +%s)
budget=${ASTRA_CALL_SECONDS:-520}
out=${OUT:-/tmp/astra-call-out}
work=${ASTRA_WORK:-outputs}
jobs=${ASTRA_JOBS:-16}
mkdir -p "$out"
if [ "$smoke" = "--smoke" ]; then  # a smoke run's results must not land among the real ones (collect reads $work/sweep)
    jobs=${ASTRA_JOBS:-3}
    work=${ASTRA_WORK:-/tmp/astra-smoke-work}
    mkdir -p "$work" && for base in outputs/*-base; do [ -d "$base" ] && ln -sfn "$PWD/$base" "$work/"; done
fi
mkdir -p "$work"
if ! python3 -c "import datasets, evaluate" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
if [ -d gpu_data/fashion-mnist ]; then
    mkdir -p /tmp/fashion-mnist
    for f in gpu_data/fashion-mnist/*.xz; do
        [ -s "/tmp/fashion-mnist/$(basename "$f" .xz)" ] || xz -dc "$f" > "/tmp/fashion-mnist/$(basename "$f" .xz)"
    done
    export ASTRA_FASHION_MNIST_DIR=/tmp/fashion-mnist
fi
[ -f gpu_data/kjv.txt.gz ] && export ASTRA_KJV_TEXT=$PWD/gpu_data/kjv.txt.gz
[ -f gpu_data/english.jsonl.gz ] && export ASTRA_ENGLISH_CORPUS=$PWD/gpu_data/english.jsonl.gz
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'cuda', torch.cuda.is_available())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; nproc
# Leave 40 s for packing; base trainings get at most 2.5 minutes (3 on an idle GPU would not finish later runs).
deadline=$((start + budget - 40))
python3 examples/accuracy_sweep.py run --call "$call" --out "$work" --jobs "$jobs" --workers 1 \
    --deadline-at "$deadline" --base-minutes "${ASTRA_BASE_MINUTES:-2.5}" $smoke ${ASTRA_ONLY:+--only $ASTRA_ONLY}
python3 examples/accuracy_sweep.py pack --call "$call" --out "$work" --dest "$out"
echo "call $call took $(( $(date +%s) - start )) s"
