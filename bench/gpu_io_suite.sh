#!/usr/bin/env bash
# One GPU call for issue 29 (the 7B split against the disk's floor), from a folder holding
#   new/ (this tree), base/ (the tree to compare with) and wheels/ (surgeon's core dependencies the
#   machine lacks: filelock 4.3, huggingface_hub 2.4, httpx2, httpcore2, truststore, typer, click):
#   cd .gpu29 && [CALIB_TOKENS=65536] bash new/bench/gpu_io_suite.sh [methods] [roots...]     # results under $OUT
# Builds the Llama-2-7B-shaped checkpoint (bench_gpu_7b.build), then bench_io_floor.py: floors
# (cold read, write + fsync, both at once) and the cold CLI splits of every tree, each with its digest.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
METHODS=${1:-milora,pissa}
shift || true
ROOTS=("$@")
[ ${#ROOTS[@]} -eq 0 ] && ROOTS=(../base . .,SURGEON_EARLY_READ=0:milora .,SURGEON_WRITEBACK=0:milora .,SURGEON_SYNC_BYTES=4000000000:milora)
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
python3 -V; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; free -g | head -2; df -h /tmp | tail -1
python3 -c "import typer, filelock, xxhash, regex, huggingface_hub, httpx2; print('deps ok', filelock.__version__, huggingface_hub.__version__)" || exit 1
cd new || exit 1
timeout 150 python3 -c "
import sys, time; sys.path[:0] = ['.', 'bench']; from pathlib import Path; t = time.time()
import bench_gpu_7b as b; b.build(Path('/tmp/b7/model'), 32); print('build_s', round(time.time() - t, 1))" || exit 1
args=(); for r in "${ROOTS[@]}"; do args+=(--root "$r"); done
timeout 420 python3 bench/bench_io_floor.py --model /tmp/b7/model --scratch /tmp/b7 --methods "$METHODS" "${args[@]}" >"$OUT/floor.log" 2>&1
echo "floor rc=$?"; grep -v '^ ' "$OUT/floor.log" | grep -v '^[{}]' | cut -c1-900
# Issue 24 in the same call (CALIB_TOKENS=N): the calibrated KaSA split of a 7B-shaped checkpoint of
# CALIB_LAYERS blocks (default 8: memory is per block, time scales with the blocks) beside the plain one.
# On the CPU every calibrated 7B-shaped weight took the float64 SVD fallback before the qr-inverse route
# (bench/RESULTS.md); the route itself is timed on this GPU first (bench_inverse_route.py, ~1 min; INVERSE_PROBE=0 skips it).
if [ -n "${CALIB_TOKENS:-}" ]; then
  [ "${INVERSE_PROBE:-1}" = 1 ] && timeout 150 python3 bench/bench_inverse_route.py --device cuda 2>&1 | tee "$OUT/inverse_route.log"
  rm -rf /tmp/b7/out  # the last split output above (14.8 GB): disk for this one
  timeout "${CALIB_TIMEOUT:-240}" python3 bench/bench_gpu_7b_calibrate.py --dir /tmp/b7cal --layers "${CALIB_LAYERS:-8}" \
    --tokens "$CALIB_TOKENS" >"$OUT/calib.json" 2>"$OUT/calib.err"
  echo "calib rc=$?"; grep -v '^  *"[a-z_]*_busy\|wait_' "$OUT/calib.json" | head -70; tail -3 "$OUT/calib.err"
fi
