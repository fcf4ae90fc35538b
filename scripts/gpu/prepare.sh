#!/bin/bash
# Makes what the accuracy GPU calls carry (both folders are git-ignored), on the development machine:
#   wheels/    the Python packages the GPU host lacks (datasets, evaluate and the needs its image does not
#              have: dill, multiprocess), for its Python 3.12
#   gpu_data/  the Debian data: Fashion-MNIST IDX (xz), the KJV text dump (gzip), the English corpus (gzip)
# Usage, from the repository root: bash scripts/gpu/prepare.sh   (installs the Debian data packages if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}  # a Python with datasets (e.g. PYTHON=.venv/bin/python)
bash scripts/install-data.sh
english="dict-gcide dict-foldoc dict-jargon fortunes dict-devil doc-debian"  # examples/astra_examples/english.py
dpkg-query -W $english > /dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $english
mkdir -p wheels gpu_data/fashion-mnist
# Versions as in the development venv; the host already has pyarrow, pandas, xxhash, fsspec, huggingface-hub,
# requests, tqdm, pyyaml (the device notes' package list of its image).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
    datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
for f in /usr/share/datasets/fashion-mnist/*-ubyte.gz; do
    name=$(basename "$f" .gz)
    [ -s "gpu_data/fashion-mnist/$name.xz" ] || zcat "$f" | xz -9 -T0 > "gpu_data/fashion-mnist/$name.xz"
done
bible -f gen1:1-rev22:21 | gzip -9 > gpu_data/kjv.txt.gz
PYTHONPATH=$PWD/src:$PWD/examples "$python" -m astra_examples.english export gpu_data/english.jsonl.gz > /dev/null
du -sh wheels gpu_data gpu_data/*
