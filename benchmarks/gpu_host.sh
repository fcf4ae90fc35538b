#!/bin/bash
# The latency benchmark on a GPU host's 16 CPU cores (the GPU is not used): 2 cores and 2 threads per device,
# real tbf links, every row with its one-device baseline interleaved, ASTRA at the runtime's defaults.
# The host has no ip/tc/iptables and no package registry: carry wheels/bench/ (ignored by git), made on the
# development machine by   bash benchmarks/get_net_tools.sh wheels/bench   (.debs in wheels/bench/net)
# Usage, from the repository root, as root:   bash benchmarks/gpu_host.sh OUT_DIR [--smoke]
# Steps run in order of importance under one wall-clock budget (BUDGET_S, default 500 s): a step that would
# start after it is skipped and says so. The GPT2/ViT steps (estimated from the 2026-11-27 run's ~35 s per GPT2
# row, not measured): gpt2-n4-accurate to gpt2-n8-kv ~300 s, all of them to gpt2-n4-g1 ~420 s; e.g.
#   BUDGET_S=480 LLAMA_BUDGET_S=180 bash benchmarks/gpu_host.sh OUT     (Llama's share included)
# or without the Llama block:   STEPS='shaping|gpt2|vit' BUDGET_S=330 bash benchmarks/gpu_host.sh OUT
# or where ranks wait and compute (below):   STEPS=timeline BUDGET_S=440 bash benchmarks/gpu_host.sh OUT
# Rows go to OUT_DIR/latency-gpu-host.jsonl as they are measured,
# device profiles (planner calibration) to OUT_DIR/device_profiles/, logs to OUT_DIR/logs/.
# --smoke: a tiny version (short prefill, 1 run per row, few variants) to check the script end to end.
set -uo pipefail
out=${1:?usage: gpu_host.sh OUT_DIR [--smoke]}
smoke=${2:-}
start=$(date +%s)
budget=${BUDGET_S:-500}
mkdir -p "$out/logs" "$out/device_profiles"

carry=wheels/bench
if ! command -v ip >/dev/null || ! command -v iptables-legacy >/dev/null; then
    net=/tmp/astra-net
    mkdir -p "$net" && for f in "$carry"/net/*.deb; do dpkg -x "$f" "$net"; done
    export PATH=$net/bin:$net/sbin:$net/usr/bin:$net/usr/sbin:$PATH
    export LD_LIBRARY_PATH=$net/usr/lib/x86_64-linux-gnu:$net/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export XTABLES_LIBDIR=$net/usr/lib/x86_64-linux-gnu/xtables
fi
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
python3 -c "import transformers_astra" || { echo "transformers_astra does not import with this python (torch, transformers, safetensors, huggingface-hub needed)"; exit 1; }
cores=$(nproc)
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
machine="GPU host (nvidia-h100/h200 kind, CPU cores only): $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $cores cores"
# MACHINE_TAG (optional) ends the label, e.g. the call's date: the planner pairs profiles and rows by label, and hosts
# of one kind differ (the one device read 1.09-1.78 s across calls), so a profile predicts only its own host's rows.
[ -n "${MACHINE_TAG:-}" ] && machine="$machine; $MACHINE_TAG"
echo "$machine"

left() { echo $(( budget - ($(date +%s) - start) )); }
# step NAME MIN_SECONDS CMD...: runs CMD if at least MIN_SECONDS of the budget are left, bounded by what is left.
# STEPS (a bash regex, optional): only the steps whose names match run, e.g. STEPS=llama for the Llama block alone.
step() {
    local name=$1 need=$2; shift 2
    [[ -z ${STEPS:-} || $name =~ $STEPS ]] || return 0
    local remaining; remaining=$(left)
    if (( remaining < need )); then echo "SKIPPED $name: $remaining s of the budget left, needs ~$need s" | tee -a "$out/skipped.txt"; return; fi
    echo "=== $name ($remaining s left)"
    timeout --signal=INT --kill-after=20 "$remaining" bash -c '"$@"' _ "$@" > "$out/logs/$name.log" 2>&1
    local code=$?
    grep -v '^methods' "$out/logs/$name.log" | tr '\r' '\n' | grep -E 'Mbps|profile|Error|error' | tail -40
    (( code == 0 )) || echo "FAILED $name: exit $code" | tee -a "$out/failed.txt"
}
runs=${RUNS:-5}; tokens=(); bandwidths=(10 100); cpr=2; extra=""
if [ "$smoke" = "--smoke" ]; then runs=1; tokens=(--tokens 64); bandwidths=(10); cpr=1; extra=--oversubscribe; fi
bench() {
    python3 -m benchmarks.run_latency --cores-per-rank "$cpr" $extra --runs "$runs" --row-budget-s 12 --machine "$machine" \
        --out "$out/latency-gpu-host.jsonl" "$@"
}
calibrate() {
    taskset -c 0,$(( cpr - 1 )) python3 -m benchmarks.validate_planner calibrate --threads "$cpr" --machine "$machine" \
        --out "$out/device_profiles" --repeats 3 "$@"
}
export -f bench calibrate
export runs cpr extra machine out
# STEPS=timeline: where the ranks' time goes (issue 12). Every ASTRA row records each rank's median seconds waiting
# for its peers and computing, and the slowest rank's code waits per layer (docs/benchmarks.md "Waiting against
# computing"); this set of steps is the one to read them on: GPT2 1024 tokens, N=4, 10 Mbps, the runtime's defaults,
# G=32 hidden, G=32 kv K=256 and G=1 hidden, on the usual links and on paced ones (the default rows of the overlap
# A/B below, in that order), then ViT N=4 G=8 kv (10 Mbps, then compute only). Estimated from session 4's log (52 s
# of ranks and rows per GPT2 step), not measured: ~60 s per GPT2 step, ~45 s for ViT, ~15 s set-up, ~25 s report
# after the budget:   STEPS=timeline BUDGET_S=440 bash benchmarks/gpu_host.sh OUT   (~445 s; RUNS=3 saves ~35 s)
[ "${STEPS:-}" = timeline ] && STEPS='^(gpt2-n4-(overlap|paced)-g|vit-n4-g8-kv$)'

step shaping 20 python3 -m benchmarks.netns measure --seconds 1 --mbps 10 100 --loss 0 5 --machine "$machine" --json "$out/shaping-gpu-host.json"
# What no sequence-parallel method can beat on one rank's 2 cores (benchmarks/ceiling.py): GPT2 N=4/8, ViT N=4/8.
step ceiling 40 taskset -c 0,$(( cpr - 1 )) python3 -m benchmarks.ceiling --workloads gpt2 vit --n 4 8 --threads "$cpr" \
    --runs "$(( runs + 3 ))" ${tokens[@]:+--small} --machine "$machine" --out "$out/ceiling.json"
# Overlap (issue 12): the defaults (hidden mode sends from the attention's pre-hook, receives posted ahead on gloo)
# against --overlap off (codes waited for before any attention) for the settings of goal 1, first on the usual
# links, then on paced ones (a two-frame token bucket: bursts leave at the rate, docs/benchmarks.md "Links"),
# where the per-layer messages meet the 10 Mbps rate as on a real radio; then compute only.
for links in overlap paced; do
    pace=(); [ "$links" = paced ] && pace=(--paced)
    for setting in "32 hidden" "32 kv 256" "1 hidden"; do
        read -r g q k <<< "$setting"
        kflag=(); [ -n "$k" ] && kflag=(--codebook-size "$k")
        for off in "" -off; do  # the defaults' rows do not pin --overlap (their label says "defaults")
            ov=(); [ -n "$off" ] && ov=(--overlap off)
            step "gpt2-n4-$links$off-g$g-$q$k" 40 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups "$g" \
                --quantize "$q" "${kflag[@]}" "${ov[@]}" --links real --bandwidths 10 "${pace[@]}"
        done
    done
done
step gpt2-n4-overlap-compute 40 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 1 --quantize hidden \
    --links compute
step gpt2-n4-overlap-compute-k256 20 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 --quantize kv \
    --codebook-size 256 --links compute
# Goal 1: GPT2 1024-token prefill, N=4, 10 Mbps, at the runtime's defaults (even shards, projection tables):
# first the settings within +1 % of the control's perplexity (docs/results.md: G=32 hidden/kv, G=8 kv).
step gpt2-n4-accurate 90 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 --quantize hidden kv \
    --links real --bandwidths 10
# G=32 kv with K=256 (8-bit codes, a quarter of the encoder's work): +0.3 % against the control (docs/results.md).
step gpt2-n4-k256 30 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 --quantize kv --codebook-size 256 \
    --links real --bandwidths 10
# Fewer bits at K=256 (2026-11-28): G=16 kv K=256 (256 bits a token, half of G=32 kv K=256's; the same encoder work,
# which scales with width x K), and G=32 kv K=256 with the cost model's shard sizes.
step gpt2-n4-g16-kv256 30 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 16 --quantize kv \
    --codebook-size 256 --links real --bandwidths 10
# Goal 1's setting with the cost model's shard sizes (balance.py: 272 / 257 / 244 / 251 at G=16 kv K=256; the even
# shards' slowest rank, rank 2, modelled 4 % slower): at 0.30 MB a rank the links are not what limits these rows.
step gpt2-n4-g16-kv256-balanced 70 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 16 --quantize kv \
    --codebook-size 256 --shard-sizes balanced --links real --bandwidths 10
# Fewer codewords (accuracy_sweep call 19, 2026-11-28 07:10 UTC, docs/results.md): kv K=128 at G=16 (+1.1 %) and G=32
# (+0.4 %, 448 bits a token), K=64 at G=16 (+1.5 %): the encoder's product halves with K, the bits fall by 1 a code.
# Measured at RUNS=7 (2026-11-28, 1xH200 hosts, step starts in the logs): gpt2-n4-g16-kv256 58-68 s, its balanced
# twin ~60 s, gpt2-n4-kv128 (two rows) 117 s, gpt2-n4-g16-kv64 79 s.
step gpt2-n4-kv128 120 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 16 32 --quantize kv \
    --codebook-size 128 --links real --bandwidths 10
step gpt2-n4-g16-kv64 80 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 16 --quantize kv \
    --codebook-size 64 --links real --bandwidths 10
# The same rows with the one device also timed while the other ranks' cores run forwards (`--loaded-baseline`,
# run_latency.HostLoad; 2026-11-28): the N ranks of this emulation share one host (docs/benchmarks.md "Host
# sharing"), the one device alone does not. Goal 1's G=16 kv K=256 at N=4, goal 3's G=1 hidden at N=8, goal 2's ViT
# G=32 kv; a run costs the one device twice (alone, loaded) and the method once. Measured 2026-11-28 on 1xH200
# hosts (start of the ranks, the one device and the N-1 loads included): RUNS=7 N=4 127 s, N=8 207 s, ViT 113 s;
# RUNS=5 N=4 ~125-150 s.
step gpt2-n4-g16-kv256-loaded 130 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 16 --quantize kv \
    --codebook-size 256 --links real --bandwidths 10 --loaded-baseline
step gpt2-n8-g1-loaded 200 bench --workload gpt2 "${tokens[@]}" --n 8 --methods astra --groups 1 --quantize hidden \
    --links real --bandwidths 10 --loaded-baseline
step vit-n4-g32-kv-loaded 110 bench --workload vit --n 4 --methods astra --groups 32 --quantize kv --links real \
    --bandwidths 10 --loaded-baseline
step gpt2-n4-k256-balanced 30 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 --quantize kv \
    --codebook-size 256 --shard-sizes balanced --links real --bandwidths 10
# The encoder on this host's two cores (docs/benchmarks.md "Encoder"): the GPU host's encoder read 2.7x the dev
# VM's at G=32 kv K=256 (2026-11-27 23:35 UTC); this separates the host from the code.
step encoder-speed 60 taskset -c 0,1 python3 -m benchmarks.encoder_speed --out "$out/encoder_speed-gpu-host.json" \
    --machine "$machine" --budget-s 40 --no-receiver
# Why the encoder is ~2x slower here than on the dev VM at 2 threads (2026-11-28, docs/benchmarks.md "05:50 UTC"): its
# score product alone, the rest of the encode, other forms of the product and a reference GEMM, at 1 and 2 threads
# (benchmarks/encoder_forms.py; ~10 s on the dev VM; here 2026-11-28 07:13 and 07:20 UTC, docs/benchmarks.md "07:50 UTC").
step encoder-forms 30 taskset -c 0,1 python3 -m benchmarks.encoder_forms --out "$out/encoder_forms-gpu-host.json" --machine "$machine"
# There (07:13 UTC) the encode beyond its score product was 1.6x (2 threads) to 2.4x (1 thread) the product itself:
# the encoder's search in other forms with the same codes, and the operators' times (benchmarks/encoder_variants.py;
# 16 s on the dev VM).
step encoder-variants 40 taskset -c 0,1 python3 -m benchmarks.encoder_variants --out "$out/encoder_variants-gpu-host.json" \
    --machine "$machine"
step gpt2-n4-g8kv 30 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 8 --quantize kv --links real --bandwidths 10
# ----------------------------------------------------------------------------------------- Llama block (issue 10)
# The llama workload (245 M parameters, GQA, 1024-token prefill), N=4, real links at 10 and 100 Mbps, every row
# with its interleaved one device: ASTRA G=32/8/1 hidden and kv, sp-fp16, tp. Its own share of the budget,
# LLAMA_BUDGET_S (default 200 s; what it leaves unused goes to the later steps). One step per method, most
# important first; a step measures both bandwidths with one start of its ranks (a start of the 4 ranks and the
# one-device worker costs about three Llama rows), 100 Mbps first: that row predicts the 10 Mbps one, which then
# skips its warm-up when slow. Expected per step (runs=3; estimated, not measured): astra ~65 s, sp-fp16 ~80 s
# (~25 MB per rank per run), tp ~240 s (~200 MB per rank per run: ~160 s at 10 Mbps). A step is stopped at the
# budget's end, keeping the rows it has. The default covers the G=32 steps and G=8 hidden; all but tp in one call:
#   STEPS=llama LLAMA_BUDGET_S=540 BUDGET_S=550 bash benchmarks/gpu_host.sh OUT      (~470 s + setup and report)
# and tp in another:   STEPS=llama-n4-tp LLAMA_BUDGET_S=540 BUDGET_S=550 bash benchmarks/gpu_host.sh OUT2
llama_budget_s=${LLAMA_BUDGET_S:-200}
saved_budget=$budget
budget=$(( $(date +%s) - start + llama_budget_s )); (( budget > saved_budget )) && budget=$saved_budget
if python3 -c "from benchmarks.workloads import workload_available as a; raise SystemExit(0 if a('llama') else 1)"; then
    llama_runs=3; llama_groups=(32 8 1); llama_quantize=(hidden kv)
    if [ "$smoke" = "--smoke" ]; then llama_runs=1; llama_groups=(32); llama_quantize=(hidden); fi
    llama=(--workload llama "${tokens[@]}" --n 4 --links real --bandwidths "${bandwidths[@]}" --runs "$llama_runs")
    for g in "${llama_groups[@]}"; do
        for q in "${llama_quantize[@]}"; do
            step "llama-n4-g$g-$q" 70 bench "${llama[@]}" --methods astra --groups "$g" --quantize "$q"
        done
    done
    step llama-n4-sp16 80 bench "${llama[@]}" --methods sp-fp16
    step llama-n4-tp 90 bench "${llama[@]}" --methods tp
else
    echo "SKIPPED llama: astra.patch does not accept LlamaForCausalLM in this checkout" | tee -a "$out/skipped.txt"
fi
budget=$saved_budget
# ------------------------------------------------------------------------------------- end of the Llama block

# Goal 2: ViT-B/16, N=4, G=8 and 32, hidden and kv (G=8 kv, G=32 both: within 0.5 points of the base in
# docs/results.md): compute only and 10 Mbps (one step per setting, G=8 kv first; --smoke: G=8 only).
vit=(--workload vit --n 4 --methods astra --links real compute --bandwidths 10)  # the 10 Mbps row first
step vit-n4-g8-kv 20 bench "${vit[@]}" --groups 8 --quantize kv
step vit-n4-g8-hidden 20 bench "${vit[@]}" --groups 8 --quantize hidden
[ "$smoke" = "--smoke" ] || step vit-n4-g32 30 bench "${vit[@]}" --groups 32 --quantize kv hidden
# Goal 2's per-rank work (benchmarks/per_layer_costs.py): a ViT rank (rank 0 and 3 of N=4, no network) at 2 threads
# against the plain layers on its 50 tokens, G=8 kv, G=32 kv, G=32 hidden, the three at once on cores 0-5, with the
# wall time of the runtime's steps; with BEFORE_SRC (another tree's src/, e.g. main's before a merge:
#   mkdir -p wheels/before && git archive <commit> src | tar -x -C wheels/before   and carry wheels/before)
# that tree's rank alternating process by process. Its one try on a GPU host (2026-11-27, RUNS=3) had not finished
# after the 138 s it was given (exit 124): needs more, ~250 s assumed (not measured).
#   STEPS=vit-costs BEFORE_SRC=wheels/before/src BUDGET_S=300 bash benchmarks/gpu_host.sh OUT
vit_costs() {
    local before=() pids=() i=0 failed=0 n; n=$(nproc)
    [ -n "${BEFORE_SRC:-}" ] && before=(--before "$BEFORE_SRC")
    for case in vit-kv8 vit-kv32 vit-hidden32; do  # cores wrap around on a smaller machine (--smoke)
        taskset -c $(( 2 * i % n )),$(( (2 * i + 1) % n )) python3 -m benchmarks.per_layer_costs --case "$case" --threads 2 --runs "$runs" \
            --repeats 3 --steps "${before[@]}" --machine "$machine" --out "$out/per_layer_costs-$case.json" &
        pids+=($!); i=$(( i + 1 ))
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
}
export -f vit_costs
step vit-costs 250 vit_costs
# Goal 1's per-rank work (issue 12): a GPT2 kv rank at G=32 K=256 and G=8 K=1024 (N=4, 1024 tokens, no network, 2
# threads) against its exact work (`ceiling.rank_call`: plain layers on its shard, causal attention over its prefix),
# first alone on cores 0-1 (ranks 0, 1 and 3, with the runtime's steps; for G=32 K=256 with BEFORE_SRC as for
# vit-costs: that tree's rank alternating process by process), then G=32 K=256 four processes at once, rank r alone
# on cores 2r, 2r+1 (no --before; the processes start together and do the same sequence, so their forwards mostly
# overlap): if a rank computes much longer four at once than alone, the host's shared resources, not ASTRA's code,
# hold the latency rows' ranks (their compute 0.59-0.66 s against 0.27-0.35 s of exact work, 2026-11-27).
# Estimated, not measured on a GPU host: ~330 s with BEFORE_SRC and RUNS=3 (the dev VM's ~24 s per process at 2
# threads and --repeats 2, ~28 s at 3; its --smoke, one run, no BEFORE_SRC, ranks sharing 2 cores: 186 s).
#   STEPS=gpt2-kv-costs RUNS=3 BEFORE_SRC=wheels/before/src BUDGET_S=360 bash benchmarks/gpu_host.sh OUT
# at_once CASE N WORDS [RUNS]: ranks 0..N-1 of CASE, one per_layer_costs process each on its own 2 cores (they wrap
# around on a smaller machine: --smoke), all at once, RUNS processes per rank (default 3); fails if any of them fails.
at_once() {
    local case=$1 n=$2 words=$3 count=${4:-3} cores r pid pids=() failed=0; cores=$(nproc)
    for (( r = 0; r < n; r++ )); do
        taskset -c $(( 2 * r % cores )),$(( (2 * r + 1) % cores )) python3 -m benchmarks.per_layer_costs --case "$case" \
            --ranks $r --threads 2 --runs "$count" --repeats 3 --machine "$machine; $words ranks at once" \
            --out "$out/plc-$case-at-once-rank$r.json" & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
}
export -f at_once
gpt2_kv_costs() {
    local before=() failed=0 n; n=$(nproc)
    [ -n "${BEFORE_SRC:-}" ] && before=(--before "$BEFORE_SRC")
    taskset -c 0,$(( 1 % n )) python3 -m benchmarks.per_layer_costs --case gpt2-kv32 --threads 2 --runs "$runs" --repeats 3 \
        --steps "${before[@]}" --machine "$machine" --out "$out/per_layer_costs-gpt2-kv32.json" || failed=1
    taskset -c 0,$(( 1 % n )) python3 -m benchmarks.per_layer_costs --case gpt2-kv8 --threads 2 --runs "$runs" --repeats 3 \
        --steps --machine "$machine" --out "$out/per_layer_costs-gpt2-kv8.json" || failed=1
    at_once gpt2-kv32 4 four "$runs" || failed=1
    return $failed
}
export -f gpt2_kv_costs
step gpt2-kv-costs 330 gpt2_kv_costs
# Host sharing (2026-11-28, docs/benchmarks.md "02:17 UTC"): a rank and its exact work timed with the other ranks
# running at once (rank r on cores 2r, 2r+1: 8 at N=8, 4 at N=4), against ranks 0, 3 and 7 of N=8 timed alone on
# cores 0-1. On the dev VM a rank is its exact work + the encoder + ~2 %; on this host the runtime's ranks at N=8
# took ~0.1 s more than the ceiling's ranks timed alone. Measured 2026-11-28: the eight at once ~110 s; the rest did
# not finish in the ~100 s left, so give it ~300 s.
host_sharing() {
    lscpu -e > "$out/lscpu.txt"
    at_once gpt2-n8-g1 8 eight
    taskset -c 0,1 python3 -m benchmarks.per_layer_costs --case gpt2-n8-g1 --ranks 0 3 7 --threads 2 --runs 3 --repeats 3 \
        --machine "$machine; alone" --out "$out/plc-gpt2-n8-g1-alone.json"
    at_once gpt2-kv16-k256 4 four
}
export -f host_sharing
step host-sharing 300 host_sharing
# Goal 1's setting, G=16 kv K=256 at N=4, rank by rank on this host (2026-11-28): the four ranks at once, each
# beside its exact work, then ranks 0-3 alone on cores 0-1 with the runtime's steps (where a rank's time beyond its
# exact work goes). Measured 2026-11-28 on a 1xH200 host: 267 s (the estimate had been ~140 s).
gpt2_kv16_costs() {
    at_once gpt2-kv16-k256 4 four
    taskset -c 0,1 python3 -m benchmarks.per_layer_costs --case gpt2-kv16-k256 --ranks 0 1 2 3 --threads 2 --runs 2 \
        --repeats 3 --steps --machine "$machine; alone" --out "$out/plc-gpt2-kv16-k256-alone.json"
}
export -f gpt2_kv16_costs
step gpt2-kv16-costs 270 gpt2_kv16_costs
# Goal 3: GPT2, N=8 (16 cores), 10 Mbps: G=1 hidden (fastest), G=8 kv and G=32 kv (the accurate ones).
step gpt2-n8-g1 30 bench --workload gpt2 "${tokens[@]}" --n 8 --methods astra --groups 1 --quantize hidden --links real --bandwidths 10
step gpt2-n8-kv 50 bench --workload gpt2 "${tokens[@]}" --n 8 --methods astra --groups 8 32 --quantize kv --links real --bandwidths 10
# G=1 hidden with K=256 (8 bits a token; a quarter of K=1024's encoder work), N=8 (2026-11-28).
step gpt2-n8-g1-k256 30 bench --workload gpt2 "${tokens[@]}" --n 8 --methods astra --groups 1 --quantize hidden \
    --codebook-size 256 --links real --bandwidths 10
step gpt2-n8-k256 30 bench --workload gpt2 "${tokens[@]}" --n 8 --methods astra --groups 32 --quantize kv --codebook-size 256 \
    --links real --bandwidths 10
# G=32 hidden, K=1024 with its projection tables (201 MB a layer: over the default 64 MiB limit, so labelled).
step gpt2-n4-table 30 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 --quantize hidden --projection-table 256 \
    --links real --bandwidths 10
# The balance's gain: G=32 hidden with the cost model's shard sizes, beside gpt2-n4-accurate's (AstraConfig's
# default, even shards since 649ab66: balanced was slower on this host's real links).
step gpt2-n4-balanced 30 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 --quantize hidden --shard-sizes balanced \
    --links real --bandwidths 10
# The rest of goal 1's settings.
step gpt2-n4-more 60 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 16 --quantize hidden kv --links real --bandwidths 10
step gpt2-n4-g1 30 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 1 --quantize hidden --links real --bandwidths 10
# The planner's device profiles (one benchmark rank's 2 cores), if time is left: the components, then one real rank
# forward per setting (emulated ranks 0 and 3 of N=4, no network, at the profile's length) for the per-layer overheads
# the components miss (`fit_rank_overheads`). Estimated from the dev VM's 1 thread (GPT2 58 s, ViT 17 s with the
# probes, 16 s and 8 s without; 2026-11-27 23:34 UTC) and the GPU host's 2-thread forwards (0.5-0.8x the dev VM's):
# ~30-45 s and ~10-15 s, not measured there. Alone:   STEPS=calibrate BUDGET_S=150 bash benchmarks/gpu_host.sh OUT
# (~150 s + ~25 s of report; the profiles in OUT/device_profiles/, the validation in OUT/planner.md); with rows of
# the same call to validate against (ViT G=8 kv and hidden at 10 Mbps and compute only, GPT2 G=1/32 hidden compute
# only; ~45 s per ViT step and ~70 s for GPT2, estimated from the timeline comment above, not measured):
#   STEPS='^(vit-n4-g8-kv|vit-n4-g8-hidden|calibrate-.*|gpt2-n4-compute)$' BUDGET_S=330 bash benchmarks/gpu_host.sh OUT
step calibrate-gpt2 110 calibrate --workload gpt2 "${tokens[@]}"
step calibrate-vit 35 calibrate --workload vit
# GPT2 at K=256 (goal 1's G=32 kv K=256 rows), G=16 and 32 only: about half of calibrate-gpt2 (estimated).
step calibrate-gpt2-k256 65 calibrate --workload gpt2 "${tokens[@]}" --codebook-size 256 --groups 16 32
# The planner for this host as the emulation uses it (issue 12 goal 4): the rank probes with every rank of N=4 and 8
# at once, each on its own 2 cores (`calibrate --colocated 2`): ranks that share the host's memory and caches run
# slower than one rank alone (docs/benchmarks.md "Host sharing"), which the overheads then carry. The components are
# timed on cores 0-1 alone, as the one device runs. Measured 2026-11-28: K=1024 (G=1, 8, 16, 32) 162 s and 169 s on two
# hosts; K=256 at G=1, 16, 32 155 s (05:31-05:34 UTC, a 1xH200 host). With the rows to validate against, on one host
# (MACHINE_TAG pairs them; docs/benchmarks.md "04:05 UTC" has the calls that ran):
#   MACHINE_TAG="call $(date -u +%H%M)" STEPS='^(calibrate-colocated-.*|gpt2-n4-g16-kv256|gpt2-n4-g1|gpt2-n8-g1|gpt2-n8-g1-k256|gpt2-n4-accurate)$' \
#       BUDGET_S=520 bash benchmarks/gpu_host.sh OUT
step calibrate-colocated-gpt2 180 calibrate --workload gpt2 "${tokens[@]}" --colocated "$cpr"
step calibrate-colocated-gpt2-k256 160 calibrate --workload gpt2 "${tokens[@]}" --codebook-size 256 --groups 1 16 32 --colocated "$cpr"
# K=128 at G=16 and 32 (the rows of step gpt2-n4-kv128): ~115 s (2026-11-28 07:35 UTC, the call's budget less its other steps).
step calibrate-colocated-gpt2-k128 120 calibrate --workload gpt2 "${tokens[@]}" --codebook-size 128 --groups 16 32 --colocated "$cpr"
# Packet loss (issue 11 item 9) on this host's links, if time is left: the default setting and the fastest.
step gpt2-n4-loss 60 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 32 1 --quantize hidden --links real \
    --bandwidths 10 --loss 1 5
step gpt2-n4-compute 40 bench --workload gpt2 "${tokens[@]}" --n 4 --methods astra --groups 1 32 --quantize hidden --links compute
# Full-precision baselines at N=4 (for the planner's check), if time is left.
step gpt2-n4-sp16 60 bench --workload gpt2 "${tokens[@]}" --n 4 --methods sp-fp16 --links real --bandwidths 100 --no-interleave
python3 -m benchmarks.netns cleanup
# The planner against this run's rows and the recorded ones (this run's profiles override the recorded ones of its machine):
# OUT_DIR/planner.md, planner_validation.json, and the
# report's tables with this run's rows (OUT_DIR/docs/benchmarks.md, latency.json, pareto.json).
mkdir -p "$out/docs" && cp -r docs/. "$out/docs/" && rm -rf "$out/docs/distributed" "$out/docs/results/gpu-tests"*
cp "$out/latency-gpu-host.jsonl" "$out/docs/results/raw/latency-gpu-host-new.jsonl" 2>/dev/null
python3 -m benchmarks.report --raw "$out/docs/results/raw" --docs "$out/docs" 2>&1 | tail -2
python3 -m benchmarks.validate_planner validate --latency "$out/docs/results/latency.json" \
    --profiles docs/results/device_profiles "$out/device_profiles" --json "$out/planner_validation.json" \
    --markdown "$out/planner.md" 2>&1 | tail -2
echo "done in $(( $(date +%s) - start )) s; rows: $( (wc -l < "$out/latency-gpu-host.jsonl") 2>/dev/null || echo 0)"
