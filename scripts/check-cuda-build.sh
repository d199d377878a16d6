#!/usr/bin/env bash
# Compiles the `fedbpt` binary with `--features cuda` on a Linux x86_64 machine that has no CUDA
# toolkit and no GPU: the toolkit comes from hash-pinned PyPI wheels (scripts/cuda-requirements.txt,
# CUDA 13.0) in a venv. Not run by CI. Needs python3 (venv, pip), gcc/g++ (nvcc's host
# compiler; CUDA 13.0 takes gcc up to 14, gcc 12 was used) and cargo. Downloads about 680 MB
# of wheels once (1.2 GB installed); the first build took 39 min on 2 shared cores.
#
#   scripts/check-cuda-build.sh
#
# Environment (all optional):
#   FEDBPT_CUDA_VENV   the venv (default ~/.cache/fedbpt/cuda-venv); the assembled CUDA root is
#                      $FEDBPT_CUDA_VENV/cuda
#   CUDA_COMPUTE_CAP   the GPU generation the kernels are compiled for (default 90: H100/H200;
#                      80 for A100, 89 for L4/L40/RTX 40xx, 100 for B200); nothing here can query it
#   CARGO_TARGET_DIR   default <repo>/target-cuda, apart from the CPU build's target/
#   FEDBPT_CARGO_LOCK  a file: when set, cargo runs under `flock` on it (one build at a time)
#   PYTHON             the interpreter that makes the venv (default python3)
#
# At the end it prints where the binary is and what it needs at run time on the GPU machine.
set -euo pipefail

step="start"
trap 'echo "check-cuda-build: FAILED during: $step (exit $?)" >&2' ERR
die() {
    echo "check-cuda-build: error: $*" >&2
    exit 1
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FEDBPT_CUDA_VENV:-$HOME/.cache/fedbpt/cuda-venv}
cap=${CUDA_COMPUTE_CAP:-90}
target_dir=${CARGO_TARGET_DIR:-$repo/target-cuda}
python=${PYTHON:-python3}
requirements=$repo/scripts/cuda-requirements.txt

step="checking the machine"
[[ $(uname -s) == Linux && $(uname -m) == x86_64 ]] ||
    die "the pinned wheels are for Linux x86_64; this is $(uname -s) $(uname -m)"
[[ $cap =~ ^[0-9]+$ ]] || die "CUDA_COMPUTE_CAP must be a number such as 90, not \`$cap\`"
command -v "$python" >/dev/null || die "$python not found (set PYTHON)"
{ command -v gcc && command -v g++; } >/dev/null ||
    die "nvcc needs gcc and g++ as its host compiler (apt-get install g++)"
command -v cargo >/dev/null || die "cargo not found"
[[ -f $requirements ]] || die "$requirements is missing"

step="creating the venv $venv"
if [[ ! -x $venv/bin/python ]]; then
    echo "check-cuda-build: creating the venv $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" || die "could not create a venv with $python (apt-get install python3-venv)"
fi

step="installing the CUDA wheels (pip, --require-hashes)"
echo "check-cuda-build: installing the pinned CUDA wheels into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes --only-binary=:all: -r "$requirements" ||
    die "pip could not install $requirements (a registry is needed the first time)"

step="assembling the CUDA root"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
wheels=$site/nvidia/cu13
for f in bin/nvcc bin/cudafe++ nvvm/bin/cicc include/cuda.h include/cuda_fp16.h \
    include/cuda_bf16.h include/cccl/thrust/scan.h lib/libcudart.so.13; do
    [[ -e $wheels/$f ]] || die "the wheels lack $f under $wheels"
done
# One directory in the toolkit's layout: the wheels' bin/, include/ and nvvm/ as they are, and
# a lib/ (lib64 beside it) with the link-time names the wheels leave out (libcudart.so for
# libcudart.so.13, ...) and a stub libcuda.so: the real one comes with the GPU driver.
cuda=$venv/cuda
rm -rf "$cuda"
mkdir -p "$cuda/lib/stubs"
for d in bin include nvvm; do ln -s "$wheels/$d" "$cuda/$d"; done
ln -s lib "$cuda/lib64"
for f in "$wheels"/lib/*.so*; do
    name=$(basename "$f")
    ln -s "$f" "$cuda/lib/$name"
    if [[ $name =~ ^(lib[A-Za-z]+)\.so\.[0-9]+$ ]]; then
        ln -sf "$name" "$cuda/lib/${BASH_REMATCH[1]}.so"
    fi
done

step="making the stub libcuda.so"
# Every cu* entry point that cuda.h declares (after its _v2/_v3 renames), each returning
# CUDA_ERROR_STUB_LIBRARY (34), in a library named libcuda.so.1 as the driver's is: the binary
# links against it and loads the driver's at run time. Never put lib/stubs on a GPU machine's
# LD_LIBRARY_PATH.
stub_src=$cuda/lib/stubs/libcuda-stub.c
gcc -E -P -x c -I"$cuda/include" "$cuda/include/cuda.h" |
    grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | tr -d ' \t(' | sort -u |
    sed 's/.*/int &(void) { return 34; }/' >"$stub_src"
symbols=$(wc -l <"$stub_src")
((symbols > 300)) || die "found only $symbols entry points in cuda.h for the stub libcuda"
gcc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$stub_src" ||
    die "could not compile the stub libcuda.so"
ln -s libcuda.so "$cuda/lib/stubs/libcuda.so.1"

step="testing nvcc"
export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda CUDA_TOOLKIT_ROOT_DIR=$cuda
export CUDA_COMPUTE_CAP=$cap
export PATH=$cuda/bin:$PATH
export LD_LIBRARY_PATH=$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')
[[ -n $nvcc_version ]] || die "nvcc --version printed no release line"
probe=$(mktemp -d)
cat >"$probe/probe.cu" <<'EOF'
#include "cuda_fp16.h"
#include "cuda_bf16.h"
#include "cuda_fp8.h"
#include <cuda.h>
#include <thrust/scan.h>
extern "C" __global__ void twice(float *x) { x[threadIdx.x] *= 2.0f; }
EOF
nvcc --gpu-architecture="sm_$cap" --ptx -std=c++17 -O3 -o "$probe/probe.ptx" "$probe/probe.cu" ||
    die "nvcc $nvcc_version could not compile a probe kernel for sm_$cap (host compiler: $(gcc --version | head -1))"
rm -rf "$probe"
echo "check-cuda-build: nvcc $nvcc_version, host compiler $(gcc -dumpfullversion), sm_$cap, CUDA root $cuda"

step="cargo build --release -p fedbpt-actors --features cuda"
export CARGO_TARGET_DIR=$target_dir
cargo=(cargo build --release --locked -p fedbpt-actors --features cuda)
if [[ -n ${FEDBPT_CARGO_LOCK:-} ]]; then cargo=(flock "$FEDBPT_CARGO_LOCK" "${cargo[@]}"); fi
echo "check-cuda-build: ${cargo[*]} (CARGO_TARGET_DIR=$target_dir)"
start=$(date +%s)
(cd "$repo" && "${cargo[@]}") || die "the cargo build failed (output above)"
seconds=$(($(date +%s) - start))

step="checking the binary"
bin=$target_dir/release/fedbpt
[[ -x $bin ]] || die "the build finished but $bin is missing"
# Loads it against the stub driver (no GPU here): its dynamic libraries resolve and the CLI runs.
if ! LD_LIBRARY_PATH=$cuda/lib:$cuda/lib/stubs "$bin" --version >/dev/null; then
    die "$bin does not start (missing libraries?): $(LD_LIBRARY_PATH=$cuda/lib:$cuda/lib/stubs ldd "$bin" | grep 'not found' || true)"
fi
needed=$(readelf -d "$bin" 2>/dev/null | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ' || true)

echo
echo "check-cuda-build: built in ${seconds} s (CUDA $nvcc_version, sm_$cap)"
echo "  binary:   $bin ($(du -h "$bin" | cut -f1); $(stat -c %s "$bin") bytes)"
echo "  needs:    $needed"
echo "  run time: libcuda.so.1 from the NVIDIA driver (R580 or later for CUDA 13.0), and"
echo "            LD_LIBRARY_PATH=$cuda/lib"
echo "            (on a machine without this venv: copy those libraries from $wheels/lib"
echo "            and point LD_LIBRARY_PATH, or gpu-bench.sh's FEDBPT_CUDA_LIBS, at the copy;"
echo "            never at $cuda/lib/stubs)"
echo "  stripped: strip -o fedbpt.stripped $bin (about 40 MB) for carrying it"
