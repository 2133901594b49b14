#!/usr/bin/env bash
# llm.c's train_gpt2cu (github.com/karpathy/llm.c) at crystal's `gpt2` preset shapes, for a tokens/s and
# MFU comparison with bench/bench_gpu.py --preset gpt2 --precision bf16. No llm.c code is committed: it
# lives in the ignored folder .llmc/ (made by `prepare`), which travels to the GPU machine with `carry`.
#
#   bash bench/bench_llmc.sh prepare LLMC_GIT_DIR   # dev machine (no GPU needed): make .llmc/
#   bash bench/bench_llmc.sh [run] [SECONDS]        # GPU machine, repository root: one JSON line
#
# prepare: LLMC_GIT_DIR is a git directory of llm.c (the session tool `fetch github:karpathy/llm.c`
# gives one without a work tree). It extracts what train_gpt2cu needs into .llmc/src (~0.4 MB: Makefile,
# train_gpt2.cu, llmc/, LICENSE, dev/data/data_common.py), patches one line for CUDA 13 (cudaMemAdvise takes
# a cudaMemLocation since CUDA 13; guarded by CUDART_VERSION), copies the headers a build needs into
# .llmc/include (cuBLAS 13.0, cuDNN 9.12, NVRTC 13.0, cudnn-frontend 1.32: ~4 MB), and builds two sm_90
# binaries with nvcc into .llmc/bin: train_gpt2cu_cudnn (USE_CUDNN=1: cuDNN flash attention, as crystal's
# bf16 run uses) and train_gpt2cu_nocudnn (llm.c's own attention kernels). Both are bf16 (llm.c's default),
# single GPU (no NCCL, no MPI), and link only against libraries that torch's nvidia-* wheels bring
# (libcublasLt.so.13; the cudnn one also libcudnn.so.9 and libnvrtc.so.13, which the cudnn-frontend 1.32
# headers pull in) plus glibc/libstdc++; the CUDA runtime is static. The nvcc lines are exactly what
# `make train_gpt2cu GPU_COMPUTE_CAPABILITY=90 USE_CUDNN=0|1 NO_MULTI_GPU=1 NO_USE_MPI=1` runs (without
# -lnvidia-ml: there is no nvml.h here, so llmc/mfu.h compiles without NVML), with the include and library
# folders of pip wheels (downloaded into LLMC_DEPS, default /tmp/llmc-deps, not carried). .llmc/BUILD.txt
# records the commands. Needs nvcc 13 and pip (PyPI); about 2 minutes on 2 cores.
#
# run (GPU machine): puts the lib folders of torch's nvidia-* wheels on LD_LIBRARY_PATH (NO_LIBPATH=1:
# leave it), takes the first prebuilt binary of LLMC_VARIANT (default "cudnn nocudnn") whose libraries
# all resolve (ldd), else builds one from .llmc/src when nvcc is there (a CUDA toolkit under
# /usr/local/cuda* counts), writes the data (bench/llmc_data.py write: crystal's embedded Tiny Shakespeare,
# byte tokens, crystal's 90/10 split, llm.c's .bin format), runs
#   train_gpt2cu -e d12 -b 16 -t 1024 -d 524288 -x STEPS (+ llm.c's GPT-2 124M recipe flags, no eval,
#   no sampling, no checkpoints)
# i.e. GPT-2 124M from scratch (no checkpoint download) with crystal's gpt2 preset batch: 32 micro-batches
# of 16 x 1024 (0.5M tokens) a step, and prints one JSON line (bench/llmc_data.py summarize): tokens/s and
# ms/step over the steps after the warm-up, llm.c's own tok/s and MFU printouts, the MFU of llm.c's 124.5M
# parameters (vocabulary 50257, padded 50304) over the bf16 matmul peak measured like bench_gpu.py, and
# the FLOPs per token of both sides (crystal's gpt2 has the byte vocabulary: 86.0M parameters, 1/1.37 of
# llm.c's FLOPs per token). ms/step is llm.c's own timing (CUDA events around one optimizer step: the 32
# forward/backward passes with their data loading, the gradient norm and AdamW). A variant that runs no
# step (e.g. a cuDNN graph the installed cuDNN rejects) hands over to the next one. A missing piece ends it with one "llmc: FAILED ..." line, a JSON line with
# "error", and exit status 1. Everything it writes goes under LLMC_WORK (default /tmp/llmc-run); the JSON
# also to LLMC_JSON when set.
# Environment: LLMC_STEPS (24), LLMC_WARMUP (3 steps not timed), LLMC_B (16), LLMC_T (1024),
# LLMC_TOTAL_BATCH (524288), LLMC_VARIANT, LLMC_EXTRA (more train_gpt2cu flags, e.g. "-r 1 -ge 2"),
# LLMC_PEAK (measure | spec | TFLOP/s), LLMC_BUILD_SECONDS (300), LLMC_DIR (.llmc).
# Time, SECONDS=180 (default): data ~3 s, startup ~10 s, ~1.2 s a step on an H200 (guess), peak ~10 s.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
LLMC=${LLMC_DIR:-$ROOT/.llmc}
MODE=run
case "${1:-}" in prepare|run) MODE=$1; shift ;; esac

CUBLAS_VER=13.0.0.19 CUDNN_VER=9.12.0.46 NVRTC_VER=13.0.48 FRONTEND_VER=1.32.0

find_nvcc() {
    command -v nvcc 2>/dev/null && return 0
    local c
    for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
        [ -x "$c" ] && { echo "$c"; return 0; }
    done
    return 1
}

# build_llmc OUT CUDNN(0|1) ARCH "INCLUDE DIRS" "LIB DIRS": the Makefile's nvcc lines, in a scratch copy
build_llmc() {
    local out=$1 cudnn=$2 arch=$3 incs=$4 libdirs=$5 nvcc work d
    nvcc=$(find_nvcc) || { echo "no nvcc"; return 1; }
    work=$(mktemp -d /tmp/llmc-build.XXXXXX) || return 1
    cp -r "$LLMC/src/." "$work/" || return 1
    local I=() L=() flags=(--threads=0 -t=0 --use_fast_math -std=c++17 -O3
        --generate-code "arch=compute_$arch,code=[compute_$arch,sm_$arch]")
    for d in $incs; do I+=("-I$d"); done
    for d in $libdirs; do L+=("-L$d"); done
    local libs=(-l:libcublas.so.13 -l:libcublasLt.so.13)
    (
        cd "$work" || exit 1
        set -x
        if [ "$cudnn" = 1 ]; then
            "$nvcc" -c "${flags[@]}" -DENABLE_CUDNN -DENABLE_BF16 llmc/cudnn_att.cpp "${I[@]}" -o cudnn_att.o || exit 1
            "$nvcc" "${flags[@]}" -DENABLE_CUDNN -DENABLE_BF16 train_gpt2.cu cudnn_att.o "${L[@]}" "${libs[@]}" \
                -l:libcudnn.so.9 -l:libnvrtc.so.13 "${I[@]}" -o train_gpt2cu || exit 1
        else
            "$nvcc" "${flags[@]}" -DENABLE_BF16 train_gpt2.cu "${L[@]}" "${libs[@]}" "${I[@]}" -o train_gpt2cu || exit 1
        fi
    ) 2>&1 | grep -v -E '^\s*$|deprecated|declared here|^\s+[0-9]+ \||^\s+\||~~~|^In file included|^\s+from '
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] && mkdir -p "$(dirname "$out")" && cp "$work/train_gpt2cu" "$out"
    rm -rf "$work"
    return "$rc"
}

# ------------------------------------------------------------------------------------------------
if [ "$MODE" = prepare ]; then
    GITDIR=${1:?usage: bash bench/bench_llmc.sh prepare LLMC_GIT_DIR}
    DEPS=${LLMC_DEPS:-/tmp/llmc-deps}
    set -e
    mkdir -p "$DEPS" "$LLMC"
    COMMIT=$(git --git-dir="$GITDIR" rev-parse HEAD)
    rm -rf "${LLMC:?}/src" "${LLMC:?}/include" "${LLMC:?}/bin"
    mkdir -p "$LLMC/src" "$LLMC/include" "$LLMC/bin"
    git --git-dir="$GITDIR" archive HEAD Makefile train_gpt2.cu llmc/ LICENSE dev/data/data_common.py \
        | tar -x -C "$LLMC/src"
    echo "$COMMIT" >"$LLMC/src/LLMC_COMMIT"
    python3 - "$LLMC/src/llmc/cuda_utils.cuh" <<'EOF'
import sys
p = sys.argv[1]; s = open(p).read()
old = "        cudaCheck_(cudaMemAdvise(*out, bytes, cudaMemAdviseSetPreferredLocation, cudaCpuDeviceId), file, line);\n"
new = ("#if CUDART_VERSION >= 13000  // crystal bench patch: CUDA 13 takes a cudaMemLocation\n"
       "        cudaMemLocation host_loc = {}; host_loc.type = cudaMemLocationTypeHost; host_loc.id = 0;\n"
       "        cudaCheck_(cudaMemAdvise(*out, bytes, cudaMemAdviseSetPreferredLocation, host_loc), file, line);\n"
       "#else\n" + old + "#endif\n")
assert s.count(old) == 1, "llm.c changed: the CUDA 13 patch no longer applies"
open(p, "w").write(s.replace(old, new))
EOF
    # headers (carried) and link libraries (not carried) from the pip wheels
    want=("nvidia-cublas==$CUBLAS_VER" "nvidia-cudnn-cu13==$CUDNN_VER" "nvidia-cuda-nvrtc==$NVRTC_VER")
    ls "$ROOT"/.whl/nvidia_cudnn_frontend-"$FRONTEND_VER"-*.whl >/dev/null 2>&1 \
        || want+=("nvidia-cudnn-frontend==$FRONTEND_VER")
    for w in "${want[@]}"; do
        n=${w%%==*}; v=${w##*==}
        ls "$DEPS"/"${n//-/_}"-"$v"-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d "$DEPS" "$w"
    done
    python3 - "$DEPS" "$LLMC/include" "$ROOT/.whl" <<EOF
import glob, os, shutil, sys, zipfile
deps, inc, whl = sys.argv[1:4]
def wheel(name, ver):
    for d in (deps, whl):
        hits = sorted(glob.glob(os.path.join(d, f"{name}-{ver}-*.whl")))
        if hits:
            return zipfile.ZipFile(hits[0])
    raise SystemExit(f"no {name} {ver} wheel in {deps} or {whl}")
os.makedirs(os.path.join(deps, "lib"), exist_ok=True)
for name, ver, sub, libs in (("nvidia_cublas", "$CUBLAS_VER", "cublas", ("libcublas.so.13", "libcublasLt.so.13")),
                             ("nvidia_cudnn_cu13", "$CUDNN_VER", "cudnn", ("libcudnn.so.9",)),
                             ("nvidia_cuda_nvrtc", "$NVRTC_VER", "nvrtc", ("libnvrtc.so.13",)),
                             ("nvidia_cudnn_frontend", "$FRONTEND_VER", "cudnn_frontend", ())):
    z = wheel(name, ver)
    for n in z.namelist():
        parts = n.split("/")
        if n.endswith("/") or "include" not in parts:
            if os.path.basename(n) in libs and not os.path.exists(os.path.join(deps, "lib", os.path.basename(n))):
                with z.open(n) as src, open(os.path.join(deps, "lib", os.path.basename(n)), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            continue
        rel = "/".join(parts[parts.index("include") + 1:])
        dest = os.path.join(inc, sub, "include", rel)  # the frontend includes "../include/.."
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(n) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
print("headers in", inc, ":", sorted(os.listdir(inc)), "; libraries in", os.path.join(deps, "lib"))
EOF
    INCS="$LLMC/include/cudnn_frontend/include $LLMC/include/cudnn/include $LLMC/include/cublas/include $LLMC/include/nvrtc/include"
    set +e
    t0=$SECONDS
    build_llmc "$LLMC/bin/train_gpt2cu_nocudnn" 0 90 "$INCS" "$DEPS/lib" >"$DEPS/build_nocudnn.log" 2>&1 \
        || { cat "$DEPS/build_nocudnn.log"; echo "build (no cuDNN) FAILED"; exit 1; }
    build_llmc "$LLMC/bin/train_gpt2cu_cudnn" 1 90 "$INCS" "$DEPS/lib" >"$DEPS/build_cudnn.log" 2>&1 \
        || { cat "$DEPS/build_cudnn.log"; echo "build (cuDNN) FAILED"; exit 1; }
    {
        echo "llm.c $COMMIT (github.com/karpathy/llm.c), built $(date -u '+%F %T UTC') by bench/bench_llmc.sh prepare"
        echo "in $((SECONDS - t0)) s with $("$(find_nvcc)" --version | tail -n 2 | head -n 1), $(g++ --version | head -n 1)"
        echo "headers: cuBLAS $CUBLAS_VER, cuDNN $CUDNN_VER, NVRTC $NVRTC_VER, cudnn-frontend $FRONTEND_VER (pip wheels)"
        echo "patch: llmc/cuda_utils.cuh cudaMemAdvise(.., cudaMemLocation) under CUDART_VERSION >= 13000"
        echo "same as: make train_gpt2cu GPU_COMPUTE_CAPABILITY=90 USE_CUDNN=0|1 NO_MULTI_GPU=1 NO_USE_MPI=1 PRECISION=BF16 \\"
        echo "  NVCC_INCLUDES='-I<those include dirs>' NVCC_LDFLAGS='-L<lib dir> -l:libcublas.so.13 -l:libcublasLt.so.13 [-l:libcudnn.so.9 -l:libnvrtc.so.13]'"
        echo "  (USE_CUDNN=1 also needs cudnn-frontend/include in ./ or \$HOME for the Makefile's check)"
        for v in nocudnn cudnn; do
            echo "--- train_gpt2cu_$v: $(stat -c %s "$LLMC/bin/train_gpt2cu_$v") bytes, needs:" \
                "$(readelf -d "$LLMC/bin/train_gpt2cu_$v" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
            grep -E '^\+ ' "$DEPS/build_$v.log" | sed "s#$LLMC#.llmc#g; s#$DEPS#\$LLMC_DEPS#g"
        done
    } >"$LLMC/BUILD.txt"
    cat "$LLMC/BUILD.txt"
    du -sh "$LLMC"; for d in "$LLMC"/*; do du -sh "$d"; done
    exit 0
fi

# ------------------------------------------------------------------------------------------------
# run (GPU machine)
TOTAL=${1:-180}
STEPS=${LLMC_STEPS:-24} WARMUP=${LLMC_WARMUP:-3}
B=${LLMC_B:-16} T=${LLMC_T:-1024} D=${LLMC_TOTAL_BATCH:-524288}
WORK=${LLMC_WORK:-/tmp/llmc-run}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$WORK"

fail() {
    echo "llmc: FAILED $*"
    python3 -c 'import json, sys; print(json.dumps({"bench": "llmc", "error": sys.argv[1]}))' "$*" 2>/dev/null \
        || echo "{\"bench\": \"llmc\", \"error\": \"see the line above\"}"
    exit 1
}

echo "=== llmc (t=${SECONDS}s of ${TOTAL}s): $(date -u '+%F %T UTC'), $(hostname)"
[ -d "$LLMC/src" ] || fail "$LLMC/src is missing: run 'bash bench/bench_llmc.sh prepare GITDIR' and carry .llmc"
command -v python3 >/dev/null || fail "no python3"
timeout 20 nvidia-smi -L >/dev/null 2>&1 || fail "no GPU (nvidia-smi -L: $(timeout 20 nvidia-smi -L 2>&1 | head -n 1))"
GPU=$(timeout 20 nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>&1 | head -n 1)
echo "GPU: $GPU"
ARCH=$(echo "$GPU" | awk -F', ' '{print $2}' | tr -d '.')
[ -n "$ARCH" ] || ARCH=90

# lib folders of the nvidia-* wheels (torch's): cuBLAS(Lt), cuDNN, NVRTC
NVLIBS=$(timeout 30 python3 -c '
import glob, os, sys
dirs = []
for base in sys.path:
    nv = os.path.join(base or ".", "nvidia")
    if os.path.isdir(nv):
        for pat in ("libcublasLt.so.1[0-9]*", "libcublas.so.1[0-9]*", "libcudnn.so.9*", "libnvrtc.so.1[0-9]*"):
            for f in sorted(glob.glob(os.path.join(nv, "**", pat), recursive=True)):
                d = os.path.dirname(os.path.realpath(f))
                if d not in dirs:
                    dirs.append(d)
print(" ".join(dirs))')
echo "nvidia wheel lib dirs: ${NVLIBS:-none}"
if [ -z "${NO_LIBPATH:-}" ] && [ -n "$NVLIBS" ]; then
    export LD_LIBRARY_PATH=${NVLIBS// /:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

# binaries: prebuilt ones whose libraries resolve, else one built here
CANDS=()
for v in ${LLMC_VARIANT:-cudnn nocudnn}; do
    b=$LLMC/bin/train_gpt2cu_$v
    [ -x "$b" ] || { echo "no prebuilt $b"; continue; }
    missing=$(ldd "$b" 2>&1 | grep -E 'not found|not a dynamic' | tr -s ' \t\n' ' ')
    if [ -n "$missing" ]; then echo "prebuilt $v unusable here: $missing"; else CANDS+=("$v:$b"); fi
done
if [ ${#CANDS[@]} = 0 ]; then
    NVCC=$(find_nvcc) || fail "no prebuilt binary runs here (see above) and no nvcc to build one"
    echo "will build with $NVCC ($("$NVCC" --version | tail -n 2 | head -n 1)) for sm_$ARCH"
    INCS=""
    for d in "$LLMC"/include/*/include; do [ -d "$d" ] && INCS="$INCS $d"; done
    INCS="$INCS $(python3 -c '
import glob, os, sys
seen = []
for base in sys.path:
    for d in glob.glob(os.path.join(base or ".", "nvidia", "*", "include")) + [os.path.join(base or ".", "include")]:
        if os.path.isdir(d) and d not in seen:
            seen.append(d)
print(" ".join(seen))')"
    for v in ${LLMC_VARIANT:-cudnn nocudnn}; do CANDS+=("$v:BUILD"); done
    export -f build_llmc find_nvcc
    export LLMC
fi

DATA=$WORK/data
timeout 60 python3 bench/llmc_data.py write --out "$DATA" || fail "llmc_data.py write"

RESULT=""
for cand in "${CANDS[@]}"; do
    v=${cand%%:*} bin=${cand#*:}
    left=$((TOTAL - SECONDS - 35))  # leaves the summary (peak measurement) its time
    [ "$left" -ge 30 ] || { echo "only ${left}s left for train_gpt2cu"; break; }
    if [ "$bin" = BUILD ]; then  # built here only when no prebuilt binary runs: the next variant if it fails
        c=0; [ "$v" = cudnn ] && c=1
        bt=${LLMC_BUILD_SECONDS:-300}; [ "$bt" -gt $((left - 30)) ] && bt=$((left - 30))
        echo "--- build $v (limit ${bt}s)"
        if ! timeout -k 5 "$bt" bash -c 'build_llmc "$@"' _ "$WORK/train_gpt2cu_$v" "$c" "$ARCH" "$INCS" "$NVLIBS"; then
            echo "build $v FAILED"
            continue
        fi
        bin=$WORK/train_gpt2cu_$v
        left=$((TOTAL - SECONDS - 35))
        [ "$left" -ge 30 ] || { echo "only ${left}s left for train_gpt2cu"; break; }
    fi
    CMD=("$bin" -i "$DATA/tiny_shakespeare_train.bin" -j "$DATA/tiny_shakespeare_val.bin" -e d12
         -b "$B" -t "$T" -d "$D" -x "$STEPS" -r 0 -z 0 -c 0.1 -l 0.0006 -q 0.0 -u 700
         -v 1000000 -m 1 -s 0 -h 0 -n 0)
    # shellcheck disable=SC2206
    [ -n "${LLMC_EXTRA:-}" ] && CMD+=(${LLMC_EXTRA})
    LOGF=$WORK/train_$v.log
    echo "--- train_gpt2cu ($v, limit ${left}s): ${CMD[*]}"
    # line-buffered stdout (stdbuf), so that a run cut off by the timeout still leaves its step lines
    LB=(); command -v stdbuf >/dev/null && LB=(stdbuf -oL -eL)
    (cd "$WORK" && timeout -k 5 "$left" "${LB[@]}" "${CMD[@]}") >"$LOGF" 2>&1
    rc=$?
    grep -v -E '^\+-+\+$|^\| Parameter ' "$LOGF" | grep -v '^$' | tail -n 60
    why=""; [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (timed out)"
    echo "--- train_gpt2cu ($v): rc=$rc$why"
    nsteps=$(grep -c -E '^step +[0-9]+/' "$LOGF")
    if [ "$nsteps" -gt "$WARMUP" ]; then
        RESULT="$v:$bin:$LOGF" TRAIN_RC=$rc
        break
    fi
    echo "train_gpt2cu ($v): $nsteps step lines: trying the next variant, if any"
done
[ -n "$RESULT" ] || fail "train_gpt2cu ran no timed step (see the output above)"
v=${RESULT%%:*} rest=${RESULT#*:}; bin=${rest%%:*} LOGF=${rest#*:}

SUMARGS=(--log "$LOGF" --warmup-steps "$WARMUP" --binary "$bin" --variant "$v" --command "${CMD[*]}" --rc "$TRAIN_RC")
[ -n "${LLMC_JSON:-}" ] && SUMARGS+=(--json "$LLMC_JSON")
timeout -k 5 60 python3 bench/llmc_data.py summarize "${SUMARGS[@]}" --peak "${LLMC_PEAK:-measure}"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "summary with the measured peak timed out: again with the data-sheet peak"
    timeout -k 5 30 python3 bench/llmc_data.py summarize "${SUMARGS[@]}" --peak spec
    rc=$?
fi
exit "$rc"
