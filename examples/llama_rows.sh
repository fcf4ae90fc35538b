#!/usr/bin/env bash
# The Llama accuracy rows (issue 10, item 5) on one GPU host, in about 8 minutes of wall clock:
# a Llama-shaped base trained like the GPT2 one (KJV, BPE tokenizer trained here, 6 layers, width 256,
# 4 heads with 2 K/V heads), its control, and NAQ fine-tuning at N=4, K=1024 for G in {1, 8, 32} in both
# quantize modes, 7 fine-tunings side by side on the one GPU.
#
#   OUT=/path/to/out bash examples/llama_rows.sh           # GPU: base <= 2.5 min, fine-tunings <= 4.5 min
#   OUT=/tmp/llama-smoke bash examples/llama_rows.sh --smoke  # CPU check of the pipeline, tiny settings
#
# $OUT receives llama-base/base_result.json, sweep/llama-*/result.json and logs/. Copy $OUT/sweep/* and
# $OUT/llama-base next to the other runs' folders and run
# `python examples/accuracy_sweep.py report --out <that folder>` to write docs/results.md and
# docs/results/accuracy.json with the Llama rows next to GPT2's and ViT's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT/logs"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--smoke" ]]; then
  # Two layers of width 64, 2000 training rows, two fine-tunings (kv G=8 and the control): minutes on CPU.
  tiny=(--max-train-samples 2000 --max-eval-samples 64 --workers 0 --batch-size 16)
  "$PYTHON" examples/train_base.py --task llama --output-dir "$OUT/llama-base" --layers 2 --width 64 \
    --block-size 64 --vocab-size 512 --epochs 1 "${tiny[@]}" > "$OUT/logs/llama-base.log" 2>&1
  for run in "llama-g8-kv --groups 8 --quantize kv" "llama-control --control"; do
    set -- $run
    name=$1; shift
    "$PYTHON" examples/finetune_astra.py --task llama --base "$OUT/llama-base" --output-dir "$OUT/sweep/$name" \
      --num-devices 4 --codebook-size 64 --epochs 0.2 --calibration-batches 2 "${tiny[@]}" "$@" \
      > "$OUT/logs/$name.log" 2>&1
  done
else
  "$PYTHON" examples/accuracy_sweep.py bases --out "$OUT" --tasks llama --max-minutes 2.5
  "$PYTHON" examples/accuracy_sweep.py run --out "$OUT" --tasks llama --jobs 7 --workers 2 --deadline 270
fi
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
base = json.loads((out / "llama-base" / "base_result.json").read_text())
print(f"base: {base['metric']} {base['value']:.2f} ({base['parameters']:,} parameters, {base['train_seconds']} s)")
for path in sorted((out / "sweep").glob("llama-*/result.json")):
    row = json.loads(path.read_text())
    print(f"{path.parent.name:18s} {row['metric']} {row['value']:.2f} (before fine-tuning: {row['value_before_finetune']}, "
          f"base {row['base_value']:.2f}) {row['finetune_seconds']} s")
PY
