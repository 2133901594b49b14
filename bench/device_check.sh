#!/usr/bin/env bash
# Every GPU check of one lent-device session, in one command, cheapest first, each under its own
# timeout so that a crash or a hang in one never blocks the later ones:
#   env (+ the bf16 libraries) -> bench_reduce_kernels.py (the parameter-gradient column sums, old vs
#   two-stage, at GPT-2 124M shapes) -> smoke runs (tiny: fp32, bf16, fp32 with CUDA graphs)
#   -> bench_generate.py --device cuda (KV-cache decode at GPT-2 124M shapes, then SmolLM2-135M's (llama), fp32
#   and bf16, batch 1 and 8, decode steps eager and as CUDA graphs)
#   -> `pytest -m cuda` (with the Llama ops of tests/test_cuda.py: grouped-query attention fp32/bf16 (cuDNN where
#   installed) run twice for the same bits, RMSNorm/RoPE/SwiGLU, nn.Linear products through cuBLAS and cuBLASLt
#   (BIAS only with a bias, BGRADB bias gradient, dw=None), the encoder without position embeddings; alone:
#   `pytest -m cuda -k llama tests/test_cuda.py`)
#   -> bench_bf16_check.py (bf16 vs fp32, 1 vs 4 spheres bitwise)
#   -> bench_gpu_llama.py (a Llama step at SmolLM2-135M shapes, fp32 and bf16, vs transformers + SDPA)
#   -> bench_gpu.py shakespeare-char bf16
#   (+ torch.compile, + graphs) -> CPU sphere scaling (bench_scaling.py, all cores) -> bench_gpu.py gpt2 bf16
#   -> bench_quality.py shakespeare-char bf16 to val <= 1.47 with whatever time is left
#   -> only when .llmc/ was carried (bench/bench_llmc.sh prepare): llm.c's train_gpt2cu at the gpt2 preset's
#   shapes (bench/bench_llmc.sh), LLMC_SECONDS (120) taken from the quality run; SKIP_LLMC=1 skips it.
# Usage (repository root, on the GPU machine): [SKIP_BENCH=1] [NO_LIBPATH=1] bash bench/device_check.sh TOTAL_SECONDS
#
# Time plan for TOTAL=540 (the caps; a step gets min(cap, max(its minimum, time left - the
# minimums of the steps after it - 5 s)), and is skipped when less than its minimum is left):
#   install+env 45 | reduce kernels 60 | smoke fp32 60 | smoke bf16 60 | smoke graphs 60 | generate 120 | pytest 120
#   | bf16 check 75 | bench llama 120 | bench shakespeare 100 | CPU scaling 60 | bench gpt2 90
#   | quality: the rest (at least 40)
# Expected (not capped) about 20+15+25+20+40+110+45+70+45+60 = 450 s before bench llama (~90 s, not yet
# measured on a GPU): at TOTAL=540 the quality run is skipped (under 40 s left); pass TOTAL=600 for
# it, or SKIP_BENCH=1 to skip every bench row, llama's included.
#
# $OUT (default /tmp/device-out) gets at most 8 files (the device tool brings back 8):
#   log.txt summary.txt reduce_kernels.json bf16_check.json bench_gpu_shakespeare.json bench_gpu_gpt2.json
#   scaling_cpu.json quality.json
# (the env report is the first section of log.txt: no env.txt of its own, so the eight still fit; the
# generate step's JSON lines, {"bench": "generate", ...}, go to log.txt and one line to summary.txt)
# Making .whl/ again (it is ignored), on the development machine, before the device call:
#   for w in nvmath-python==1.0.0 cuda-bindings==13.5.0 cuda-core==1.2.2 cuda-pathfinder==1.9.1 \
#            nvidia-cudnn-frontend==1.32.0 mpi4py==4.1.2 mpich==5.0.2; do
#     pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .whl \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 "$w"; done
# Wheels in .whl/ (nvmath-python, cuda-bindings/-core/-pathfinder, nvidia-cudnn-frontend; mpi4py +
# mpich for mpiexec) are installed under the prefix /tmp/site first when present (a prefix, not
# --target: --target drops mpich's lib/libmpi.so.12; --ignore-installed: never uninstall the image's
# own copies, /tmp/site comes first on PYTHONPATH), and mpi4py is pointed at that mpich.
set -u
TOTAL=${1:-540}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
left() { echo $((TOTAL - SECONDS)); }
SUMMARY=()

# run_step NAME CAP MIN AFTER -- command...: runs under timeout min(CAP, max(MIN, left - AFTER - 5)),
# where AFTER is the sum of the minimums of the steps after it (so a hang leaves them their
# minimums); skipped when less than MIN is left at all. Output goes to
# log.txt (all of it) and to stdout (the device tool keeps the last 12,000 characters).
run_step() {
    local name=$1 cap=$2 min=$3 after=$4
    shift 5
    local total=$(( $(left) - 5 ))
    if [ "$total" -lt "$min" ]; then
        echo "=== $name: skipped (only ${total}s left, needs ${min}s)" | tee -a "$LOG"
        SUMMARY+=("$(printf '%-22s skipped (%ss left)' "$name" "$total")")
        return
    fi
    local avail=$(( total - after ))
    [ "$avail" -lt "$min" ] && avail=$min  # at least its own minimum, even from the later steps' share
    local t=$(( cap < avail ? cap : avail ))
    echo "=== $name (t=${SECONDS}s, limit ${t}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG" | tail -n "${TAIL_LINES:-25}"
    local rc=${PIPESTATUS[0]}
    local why=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (timed out)"
    echo "=== $name: rc=$rc$why in $((SECONDS - t0))s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-22s rc=%-3s %4ss%s' "$name" "$rc" "$((SECONDS - t0))" "$why")")
}

# --- wheels and library paths (a brace group with a redirection, not a pipe: its exports stay) ---
{
    echo "=== install (t=${SECONDS}s)"
    if ls .whl/*.whl >/dev/null 2>&1; then
        ls -l .whl/
        if timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
                --prefix /tmp/site .whl/*.whl; then
            SITE=$(ls -d /tmp/site/lib/python3*/site-packages)
            export PYTHONPATH=$PWD:$SITE PATH=/tmp/site/bin:$PATH MPI4PY_LIBMPI=/tmp/site/lib/libmpi.so.12
            echo "installed under $SITE"
        else
            echo "wheel install FAILED: going on with the image's packages"
        fi
    else
        echo "no .whl/ wheels: the image's packages only"
    fi
    # cuDNN and cuBLASLt from the nvidia-* wheels that torch brings: their lib folders first on
    # LD_LIBRARY_PATH (the cuDNN frontend dlopens libcudnn.so.9 from there first; nvmath finds
    # cuBLASLt through cuda-pathfinder). NO_LIBPATH=1 leaves LD_LIBRARY_PATH alone.
    if [ -z "${NO_LIBPATH:-}" ]; then
        LIBDIRS=$(timeout 30 python3 -c '
import glob, os, sys
dirs = []
for base in sys.path:
    nv = os.path.join(base or ".", "nvidia")
    if os.path.isdir(nv):
        for pat in ("libcudnn.so.[0-9]*", "libcublasLt.so.[0-9]*"):
            for f in sorted(glob.glob(os.path.join(nv, "**", pat), recursive=True)):
                d = os.path.dirname(os.path.realpath(f))
                if d not in dirs:
                    dirs.append(d)
print(":".join(dirs))')
        [ -n "$LIBDIRS" ] && export LD_LIBRARY_PATH=$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    fi
    echo "=== install done (t=${SECONDS}s)"
} >>"$LOG" 2>&1
tail -n 4 "$LOG"

env_report() {
    date -u
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    echo "cores: $(nproc)"
    echo "PYTHONPATH=$PYTHONPATH"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "mpiexec: $(command -v mpiexec)"
    python3 - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
for d in ("cupy-cuda13x", "numba", "numpy", "torch", "nvmath-python", "cuda-bindings", "cuda-core", "cuda-pathfinder",
          "nvidia-cudnn-frontend", "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-nvrtc", "ml_dtypes",
          "mpi4py", "mpich", "pytest"):
    try:
        dist = md.distribution(d)
        print(f"  {d:24} {dist.version:14} {dist.locate_file('')}")
    except md.PackageNotFoundError:
        print(f"  {d:24} not installed")
def line(what, fn):
    try:
        print(f"{what}: {fn()}")
    except BaseException as e:
        print(f"{what}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
def cupy_info():
    import cupy
    return (f"{cupy.__version__}, driver {cupy.cuda.runtime.driverGetVersion()}, runtime "
            f"{cupy.cuda.runtime.runtimeGetVersion()}, nvrtc {cupy.cuda.nvrtc.getVersion()}, "
            f"cc {cupy.cuda.Device(0).compute_capability}")
line("cupy", cupy_info)
def torch_info():
    import torch
    return (f"{torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
            f"{torch.cuda.get_device_name(0)}")
line("torch", torch_info)
line("nvmath import", lambda: __import__("nvmath").__version__ + " from " + __import__("nvmath").__file__)
line("nvmath cuBLASLt version", lambda: __import__("nvmath.bindings.cublasLt", fromlist=["x"]).get_version())
line("cuda.bindings", lambda: importlib.import_module("cuda.bindings").__file__)
def cudnn_fe():
    import cudnn
    return f"frontend {cudnn.__version__}, backend {cudnn.backend_version()} from {cudnn.__file__}"
line("cudnn frontend", cudnn_fe)
def reason():
    from crystal.backends.cudnn_attention import unavailable_reason
    r = unavailable_reason()
    return f"None (cuDNN flash attention available)" if r is None else f"{r!r}"
line("crystal.backends.cudnn_attention.unavailable_reason()", reason)
def be():
    from crystal.backends.cuda import CudaBackend
    b = CudaBackend("bf16")
    return f"constructed, flash={b.flash}"
line("CudaBackend('bf16')", be)
EOF
    timeout 60 python3 -m crystal.cli info
    timeout 30 python3 -m crystal.cli train --preset gpt2 --device cuda --precision bf16 --dry-run
}
export -f env_report
export OUT
TAIL_LINES=60
run_step env 45 10 380 -- bash -c 'env_report 2>&1'

TAIL_LINES=12
run_step reduce_kernels 60 20 360 -- python3 bench/bench_reduce_kernels.py --json "$OUT/reduce_kernels.json"

TAIL_LINES=12
run_step smoke_fp32 60 20 340 -- python3 -m crystal.cli train --preset tiny --device cuda --steps 20 --spheres 4 \
    --out /tmp/run-smoke --overwrite
run_step smoke_bf16 60 20 320 -- python3 -m crystal.cli train --preset tiny --device cuda --precision bf16 --steps 20 \
    --spheres 4 --out /tmp/run-smoke-bf16 --overwrite
run_step smoke_graphs 60 20 300 -- python3 -m crystal.cli train --preset tiny --device cuda --cuda-graphs on \
    --steps 20 --spheres 4 --out /tmp/run-smoke-graphs --overwrite

# KV-cache generation (crystal/generate.py on kernels/kv_cache.cu): decode tokens/s and time to first
# token, GPT-2 124M shapes then SmolLM2-135M's (--arch llama: GQA 9 heads on 3, SwiGLU, rotary), a
# 128-token prompt and 32 new tokens, fp32 then bf16, batch 1 then 8, decode steps eager and replayed as
# CUDA graphs (alternating; same_tokens_as_eager: the replay's tokens are the eager ones); the llama run
# follows the gpt2 run in the same step (either one failing leaves the other's rows)
TAIL_LINES=14
GEN="--device cuda --precisions fp32,bf16 --batches 1,8 --graphs off,on --prompt-len 128 --new-tokens 32 --rounds 1"
run_step generate 120 35 265 -- bash -c "python3 bench/bench_generate.py --arch gpt2 $GEN; \
    python3 bench/bench_generate.py --arch llama $GEN"
while read -r GJ; do
    SUMMARY+=("$(python3 -c 'import json, sys; d = json.loads(sys.argv[1])
print("generate %-5s result  decode tok/s " % d.get("arch", "gpt2") + "; ".join("%s%s b%s %s%s" % (r["precision"],
      " graphs" if r["graphs"] else "", r["batch"], r["decode_tok_per_s"],
      "" if r.get("same_tokens_as_eager", True) else " (TOKENS DIFFER)") for r in d["rows"]))' "$GJ" 2>&1)")
done < <(grep '^{"bench": "generate", "device"' "$LOG")

TAIL_LINES=40
run_step pytest_cuda 120 40 225 -- python3 -m pytest -m cuda -p no:cacheprovider -q

TAIL_LINES=30
run_step bf16_check 75 30 195 -- python3 bench/bench_bf16_check.py --json "$OUT/bf16_check.json"

if [ -z "${SKIP_BENCH:-}" ]; then
    # Llama training step, crystal vs transformers' LlamaForCausalLM (SDPA; bf16: autocast), SmolLM2-135M
    # shapes at vocabulary 49152, 8 micro-batches of 2 x 2048 a step, fp32 then bf16: its JSON lines
    # ({"bench": "gpu_llama", ...}) go to log.txt and one line to summary.txt (no file of its own in $OUT)
    TAIL_LINES=8
    run_step bench_llama 120 45 150 -- python3 bench/bench_gpu_llama.py --preset smollm2-135m --precision fp32 bf16 \
        --seq-len 2048 --batch-size 2 --micro-batches 8 --spheres 2 --steps 6 --warmup-steps 2 --rounds 1
    LJ=$(grep '^{"bench": "gpu_llama", "precision"' "$LOG" | grep -v '"round"' || true)
    [ -n "$LJ" ] && SUMMARY+=("$(python3 -c 'import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines()]
print("llama result           tok/s crystal/transformers " + "; ".join("%s %s/%s (%sx)" % (r["precision"],
      r.get("crystal_tokens_per_s", r.get("crystal_error", "-")), r.get("transformers_tokens_per_s",
      r.get("transformers_error", "-")), r.get("ratio", "-")) for r in rows))' "$LJ" 2>&1)")
    TAIL_LINES=30
    run_step bench_shakespeare 100 40 110 -- python3 bench/bench_gpu.py --preset shakespeare-char --precision bf16 \
        --torch-compile --cuda-graphs --steps 20 --warmup-steps 5 --rounds 2 --json "$OUT/bench_gpu_shakespeare.json"
    run_step scaling_cpu 60 25 85 -- python3 bench/bench_scaling.py --preset small --micro-batches 48 \
        --spheres 1 2 4 8 12 16 --steps 30 --warmup-steps 5 --rounds 2 --breakdown-spheres 0 \
        --json "$OUT/scaling_cpu.json"
    run_step bench_gpt2 90 45 40 -- python3 bench/bench_gpu.py --preset gpt2 --precision bf16 --cuda-graphs --steps 6 \
        --warmup-steps 2 --rounds 1 --json "$OUT/bench_gpu_gpt2.json"
fi

# llm.c (bench/bench_llmc.sh) runs last, only when .llmc/ travelled (carry) and something can run it:
# a prebuilt binary there or an nvcc here; it keeps LLMC_SECONDS (default 120) back from the quality run.
LLMC_RESERVE=0
if [ -z "${SKIP_LLMC:-}" ] && [ -d .llmc/src ] && { ls .llmc/bin/train_gpt2cu_* >/dev/null 2>&1 \
        || command -v nvcc >/dev/null 2>&1 || ls /usr/local/cuda*/bin/nvcc >/dev/null 2>&1; }; then
    LLMC_RESERVE=${LLMC_SECONDS:-120}
fi

# quality: the rest; training stops at the first evaluation at or below 1.47, or 15 s before the cap
Q=$(( $(left) - 8 - LLMC_RESERVE ))
run_step quality "$Q" 40 0 -- python3 bench/bench_quality.py --preset shakespeare-char --device cuda --precision bf16 \
    --spheres 2 --batch-size 32 --micro-batches 2 --target 1.47 --stop-at-target --max-seconds $((Q > 45 ? Q - 15 : 30)) \
    --json "$OUT/quality.json"

# llm.c's train_gpt2cu at the gpt2 preset's shapes: its output and JSON line go to log.txt, one line to
# summary.txt; no file of its own in $OUT
if [ "$LLMC_RESERVE" -gt 0 ]; then
    TAIL_LINES=6
    LB=$(( $(left) - 15 )); [ "$LB" -gt $((LLMC_RESERVE - 10)) ] && LB=$((LLMC_RESERVE - 10))
    run_step llmc "$LLMC_RESERVE" 60 0 -- bash bench/bench_llmc.sh run "$LB"
    LJ=$(grep '^{"bench": "llmc"' "$LOG" | tail -n 1)
    [ -n "$LJ" ] && SUMMARY+=("$(python3 -c 'import json, sys; d = json.loads(sys.argv[1])
print("llmc result            " + (("error: " + d["error"])[:90] if "error" in d else "%s tok/s, %s ms/step, MFU %s (%s)"
      % (d.get("tokens_per_s"), d.get("ms_per_step"), d.get("mfu"), d.get("variant"))))' "$LJ" 2>&1)")
fi

{ echo "=== summary (t=${SECONDS}s of ${TOTAL}s)"; printf '%s\n' "${SUMMARY[@]}"; } | tee -a "$LOG" | tee "$OUT/summary.txt"
