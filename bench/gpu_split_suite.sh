#!/usr/bin/env bash
# The split benchmarks of one GPU call (issues 13 and 14), each step guarded so one failure loses no other:
#   bash bench/gpu_split_suite.sh            # on the GPU machine, from the repo root; results under $OUT
# 1. the solver probe (bench/gpu_solver_probe.py: syevd vs the subspace routes, 4096² and 11008×4096)
# 2. the Llama-2-7B-shaped checkpoint (bench/bench_gpu_7b.py builds it once in /tmp/b7), then cold splits:
#    milora and pissa through the CLI (bench_gpu_7b --only-split), and the cost of hashing and of the
#    commit interval (bench/bench_safety_cost.py: today's pipeline vs no hashing + 30 s commits)
# Needs: filelock >= 4.3 (carried as a wheel in .carry/ when the machine has an older one).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/plugins/surgeon-train:/tmp/site"
if ls .carry/filelock-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/filelock-*.whl
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
timeout 95 python3 bench/gpu_solver_probe.py --out "$OUT" --budget 70 >"$OUT/probe.log" 2>&1
echo "probe rc=$?"
timeout 230 python3 bench/bench_gpu_7b.py --dir /tmp/b7 --only-split --skip-peft >"$OUT/b7_milora.json" 2>"$OUT/b7_milora.err"
echo "7B milora rc=$?"; tail -c 1500 "$OUT/b7_milora.json"
timeout 90 python3 bench/bench_gpu_7b.py --dir /tmp/b7 --only-split --skip-peft --split-args "--method pissa" >"$OUT/b7_pissa.json" 2>"$OUT/b7_pissa.err"
echo "7B pissa rc=$?"; tail -c 1500 "$OUT/b7_pissa.json"
timeout 120 python3 bench/bench_safety_cost.py --model /tmp/b7/model --device cuda --repeat 1 --variants default,nohash-commit30 --tmp /tmp/b7 \
  >"$OUT/safety.log" 2>&1
echo "safety rc=$?"; tail -c 1200 "$OUT/safety.log"
