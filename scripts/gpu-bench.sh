#!/usr/bin/env bash
# One command for a machine with NVIDIA GPUs and no package registry: the quickstart federation
# (configs/quickstart.toml, f32 weights) on CUDA, with the clients sharing one device through the
# forward-worker pool (1 and 2 workers per device, and 1 worker without request merging), and on
# two devices when nvidia-smi lists two. About 5 minutes on one H100 (each run is capped).
#
#   FEDBPT_BIN=target-cuda/release/fedbpt FEDBPT_HOME=/path/to/assets scripts/gpu-bench.sh
#
# Everything it uses travels with the tree or is named here; nothing is downloaded:
#   FEDBPT_BIN         the binary built by scripts/check-cuda-build.sh (default
#                      <repo>/target-cuda/release/fedbpt)
#   FEDBPT_HOME        the asset cache with models/smollm2, models/minilm and data/mr fetched
#                      (`fedbpt fetch smollm2 minilm mr` on a machine that reaches the registry); default
#                      ~/.cache/fedbpt
#   FEDBPT_CUDA_LIBS   directories with libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
#                      libcurand.so.10, libnvrtc.so.13 (colon-separated) when the machine has no
#                      CUDA 13 installed; default: <venv>/cuda/lib of check-cuda-build.sh if there.
#                      libcuda.so.1 comes from the driver (R580 or later for CUDA 13.0).
#   OUT                where the results go (default ./gpu-bench-out)
#   FEDBPT_RUN_TIMEOUT seconds one run may take (default 120)
#   FEDBPT_BENCH_BUDGET_S  no new run starts after this many seconds (default 420)
#
# First `fedbpt bench --device cuda:0 --weights f32` (forward throughput at BBT's shapes of
# SmolLM2, MiniLM and a roberta-large with random weights, which the bench writes itself).
#
# $OUT gets: bench-cuda0.jsonl, bench.log, nvidia-smi.txt, smi-samples.csv (utilization and memory every 500 ms),
# env.txt, runs/<name>/ (summary.json, metrics.jsonl, the run's log), results.tsv.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${FEDBPT_BIN:-$repo/target-cuda/release/fedbpt}
out=${OUT:-./gpu-bench-out}
run_timeout=${FEDBPT_RUN_TIMEOUT:-120}
budget=${FEDBPT_BENCH_BUDGET_S:-420}
config=$repo/configs/quickstart.toml
export FEDBPT_HOME=${FEDBPT_HOME:-$HOME/.cache/fedbpt}

die() {
    echo "gpu-bench: error: $*" >&2
    exit 1
}

[[ -x $bin ]] || die "no binary at $bin (set FEDBPT_BIN; build it with scripts/check-cuda-build.sh)"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here"
[[ -f $config ]] || die "$config is missing"
for asset in models/smollm2 models/minilm data/mr; do
    [[ -f $FEDBPT_HOME/$asset/.fedbpt-complete ]] ||
        die "$FEDBPT_HOME/$asset is not fetched (set FEDBPT_HOME; this machine cannot download it)"
done

# The CUDA libraries: given ones first, never the build's stub libcuda (lib/stubs).
libs=${FEDBPT_CUDA_LIBS:-}
if [[ -z $libs ]]; then
    venv_lib=${FEDBPT_CUDA_VENV:-$HOME/.cache/fedbpt/cuda-venv}/cuda/lib
    [[ -d $venv_lib ]] && libs=$venv_lib
fi
[[ -n $libs ]] && export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
missing=$(ldd "$bin" | grep 'not found' || true)
[[ -z $missing ]] || die "the binary's libraries are not all found (set FEDBPT_CUDA_LIBS):
$missing"

mkdir -p "$out/runs"
out=$(cd "$out" && pwd)
nvidia-smi | tee "$out/nvidia-smi.txt"
nvidia-smi -L | tee -a "$out/nvidia-smi.txt"
gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
if [[ ${driver%%.*} =~ ^[0-9]+$ ]] && ((${driver%%.*} < 580)); then
    echo "gpu-bench: warning: driver $driver is older than R580; CUDA 13.0 kernels may not load" >&2
fi
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(hostname)"
    echo "binary: $bin ($(stat -c %s "$bin") bytes)"
    echo "version: $("$bin" --version)"
    echo "git: $(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "driver: $driver, gpus: $gpus"
    echo "FEDBPT_HOME: $FEDBPT_HOME"
    echo "LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-}"
    echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "libraries:"
    ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc'
} | tee "$out/env.txt"

nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used,power.draw \
    --format=csv -lms 500 >"$out/smi-samples.csv" 2>/dev/null &
smi_pid=$!
trap 'kill "$smi_pid" 2>/dev/null || true' EXIT

printf 'name\tdevices\tworkers_per_device\tmax_batch_examples\trc\tprocess_s\twall_s\ttest_setup_s\tscore_requests\tscore_forwards\tzero_shot_test_acc\tfinal_test_acc\n' \
    >"$out/results.tsv"
field() { sed -n "s/^  \"$1\": \(.*\),\$/\1/p" "$2" | head -1; }

start=$(date +%s)
failures=0
# run NAME DEVICES WORKERS_PER_DEVICE MAX_BATCH_EXAMPLES
run() {
    local name=$1 devices=$2 wpd=$3 merge=$4
    local dir=$out/runs/$name
    if (($(date +%s) - start > budget)); then
        echo "gpu-bench: skipping $name: past the ${budget} s budget" >&2
        printf '%s\t%s\t%s\t%s\tskipped\n' "$name" "$devices" "$wpd" "$merge" >>"$out/results.tsv"
        return
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "gpu-bench: $name: devices=$devices workers_per_device=$wpd max_batch_examples=$merge"
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    timeout "$run_timeout" "$bin" run "$config" --out "$dir" \
        --set weights=f32 \
        --set "runtime.devices=$devices" \
        --set "runtime.workers_per_device=$wpd" \
        --set "runtime.max_batch_examples=$merge" \
        >"$dir/run.log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    tail -4 "$dir/run.log"
    local process_s s=$dir/summary.json
    process_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if ((rc != 0)) || [[ ! -f $s ]]; then
        failures=$((failures + 1))
        echo "gpu-bench: $name FAILED (exit $rc; 124 = past ${run_timeout} s); see $dir/run.log" >&2
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$devices" "$wpd" "$merge" "$rc" "$process_s" \
            >>"$out/results.tsv"
        return
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$devices" "$wpd" "$merge" \
        "$rc" "$process_s" "$(field wall_s "$s")" "$(field test_setup_s "$s")" \
        "$(field score_requests "$s")" "$(field score_forwards "$s")" \
        "$(field zero_shot_test_acc "$s")" "$(field final_test_acc "$s")" >>"$out/results.tsv"
}

# Forward throughput at BBT's shapes on the device (f32 weights): SmolLM2, MiniLM and
# roberta-large's shapes with random weights (the papers' model; 1.4 GB written to the temp dir).
echo "gpu-bench: fedbpt bench --device cuda:0"
if ! timeout "$((2 * run_timeout))" "$bin" bench --device cuda:0 --weights f32 --iters 5 \
    --models smollm2,minilm,roberta-large-random \
    --json "$out/bench-cuda0.jsonl" >"$out/bench.log" 2>&1; then
    failures=$((failures + 1))
    echo "gpu-bench: bench on cuda:0 FAILED; see $out/bench.log" >&2
fi

run cuda0-w1 '["cuda:0"]' 1 512
run cuda0-w2 '["cuda:0"]' 2 512
run cuda0-w1-nomerge '["cuda:0"]' 1 1
if ((gpus >= 2)); then
    run cuda01-w1 '["cuda:0","cuda:1"]' 1 512
else
    echo "gpu-bench: one GPU listed: no two-device run"
fi

echo
column -t -s $'\t' "$out/results.tsv" 2>/dev/null || cat "$out/results.tsv"
echo "gpu-bench: results in $out (total $(($(date +%s) - start)) s, $failures failed)"
((failures == 0))
