#!/usr/bin/env bash
# Every GPU check of one lent-device session, in one command, cheapest first:
#   environment -> a 20-step smoke run -> `pytest -m cuda` -> bench_gpu.py (two batch splits)
#   -> bench_quality.py on shakespeare-char with whatever wall time is left.
# Usage (repository root, on the GPU machine): [SKIP_BENCH=1] bash bench/device_check.sh TOTAL_SECONDS
# Logs and JSON land in $OUT (default /tmp/device-out). Wheels in .whl/ (mpi4py + mpich, for
# mpiexec) are installed under the prefix /tmp/site first when present (a prefix, not --target:
# --target drops mpich's lib/libmpi.so.12), and mpi4py is pointed at that mpich, not at a
# system Open MPI.
set -u
TOTAL=${1:-480}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PWD:$(ls -d /tmp/site/lib/python3*/site-packages) PATH=/tmp/site/bin:$PATH \
                  MPI4PY_LIBMPI=/tmp/site/lib/libmpi.so.12
fi
left() { echo $((TOTAL - SECONDS)); }
step() { echo "=== $* (t=${SECONDS}s)"; }

{ step env; date -u; nvidia-smi -L; nproc
  python3 -c "import cupy, numba, numpy, torch; print('cupy', cupy.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
  echo "mpiexec: $(command -v mpiexec)"
  timeout 60 python3 -m crystal.cli info; } 2>&1 | tee "$OUT/env.txt"

{ step smoke; timeout 120 python3 -m crystal.cli train --preset tiny --device cuda --steps 20 --spheres 4 \
      --out /tmp/run-smoke --overwrite; echo "rc=$?"; } 2>&1 | tail -25 | tee "$OUT/smoke.txt"

{ step pytest; timeout 240 python3 -m pytest -m cuda -p no:cacheprovider -q; echo "rc=$?"; } 2>&1 \
    | tee "$OUT/pytest_cuda.txt" | tail -40

[ -z "${SKIP_BENCH:-}" ] && { step bench_gpu preset split; timeout 150 python3 bench/bench_gpu.py --steps 20 --rounds 2 --json "$OUT/bench_gpu.json"
  step bench_gpu 16x4 split; timeout 150 python3 bench/bench_gpu.py --steps 20 --rounds 2 --batch-size 16 --micro-batches 4 \
      --json "$OUT/bench_gpu_16x4.json"; } 2>&1 | tee "$OUT/bench_gpu.txt" | tail -60

Q=$(( $(left) - 25 ))
if [ "$Q" -gt 30 ]; then
    { step quality "$Q"s; timeout "$Q" python3 bench/bench_quality.py --preset shakespeare-char --device cuda \
          --precision tf32 --spheres 2 --batch-size 32 --micro-batches 2 --target 1.47 --max-seconds $((Q - 20)) \
          --json "$OUT/quality.json"; echo "rc=$?"; } 2>&1 | tee "$OUT/quality.txt" | tail -30
fi
step done
