#!/usr/bin/env bash
# One GPU call of the evaluation, protocol v1 (bench/eval_methods_v1.md; v2: gpu_run2.sh), resumable:  bash bench/eval/gpu_run.sh BUDGET_S [WORKERS]
#
# BUDGET_S: wall seconds this script may take in all (the call's limit minus a margin). It
#   1. builds /tmp/eval17/smol (float32 HF folder) once: joins /tmp/eval17/aa (left by the staging
#      call) with the carried .gguf_part/ab, installs the carried gguf wheel (.whl17/) into
#      /tmp/eval17/site and converts (bench/eval/convert_gguf.py);
#   2. restores carried results (.eval17/results.tgz) when /tmp/eval17/results is absent (a fresh machine);
#   3. runs the jobs until the deadline (finished jobs of an earlier call are skipped);
#   4. writes eval_methods.{json,md,png}, results.tgz, log.txt and gpu_util.txt under $OUT.
#
# The calls (one H200; first `bash bench/eval/gpu_prep.sh` in the root of the checkout that travels):
#   staging (seconds)   carry [".gguf_part/aa"]            mkdir -p /tmp/eval17 && cp .gguf_part/aa /tmp/eval17/aa
#   compute 1 (9 min)   carry [".gguf_part/ab", ".whl17"]  bash bench/eval/gpu_run.sh 540 8          (timeout_s 600)
#   compute 2 (9 min)   the same command; it resumes from /tmp/eval17/results
# Each call must follow the last within the machine's 30 s warm window (/tmp is lost with the machine). On a
# fresh machine: the staging call again, then compute with the returned results.tgz copied to .eval17/ and
# ".eval17" added to carry.
# To finish the 2026-12-02 H200 run (bench/eval_methods_v1.md lists what did not run): cp bench/eval/results_h200.tgz
# .eval17/results.tgz, then the staging call and the compute calls above with ".eval17" in carry.
# Local dry runs: EVAL17_DIR (default /tmp/eval17), EVAL17_DEVICE (cuda), EVAL17_MODEL (skip the conversion and use
# this folder), EVAL17_ARGS (more arguments for the runner's first invocation, e.g. a small protocol),
# EVAL17_CONVERT_ONLY=1 (stop after building the model).
set -u
BUDGET=${1:?budget seconds}
WORKERS=${2:-8}
D=${EVAL17_DIR:-/tmp/eval17}
DEV=${EVAL17_DEVICE:-cuda}
OUTD=${OUT:-$D/out}
mkdir -p "$D" "$OUTD"
T0=$(date +%s)
LOG="$D/log.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "=== call at $(date -u +%FT%TZ), budget ${BUDGET}s, ${WORKERS} workers" >>"$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader >>"$LOG" 2>&1

MODEL=${EVAL17_MODEL:-$D/smol}
if [ ! -f "$MODEL/model.safetensors" ] && [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  if [ ! -f "$D/aa" ] || [ ! -f .gguf_part/ab ]; then
    echo "no model: need $D/aa (the staging call) and the carried .gguf_part/ab" | tee -a "$LOG"; exit 3
  fi
  cat "$D/aa" .gguf_part/ab >"$D/smol.gguf" || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$D/site" .whl17/gguf-*.whl >>"$LOG" 2>&1 || exit 3
  PYTHONPATH="$D/site" python3 bench/eval/convert_gguf.py "$D/smol.gguf" "$MODEL" 2>&1 | grep -v Loading | tee -a "$LOG"
  [ -f "$MODEL/model.safetensors" ] || { echo "conversion failed" | tee -a "$LOG"; exit 4; }
  rm -f "$D/smol.gguf"
fi
[ -n "${EVAL17_CONVERT_ONLY:-}" ] && { ls -la "$MODEL" | tee -a "$LOG"; exit 0; }
if [ ! -d "$D/results" ] && [ -f .eval17/results.tgz ]; then
  tar xzf .eval17/results.tgz -C "$D" && echo "restored carried results" | tee -a "$LOG"
fi

nvidia-smi dmon -s um -d 5 >"$D/gpu_util.txt" 2>&1 &
DMON=$!
export PYTHONPATH="$PWD:$PWD/plugins/surgeon-train"
DEADLINE=$((BUDGET - ($(date +%s) - T0) - 45))  # 45 s: in-flight grace, report, packing
# shellcheck disable=SC2086
timeout -s INT $((DEADLINE + 30)) python3 bench/eval_methods.py --device "$DEV" --model "$MODEL" --workers "$WORKERS" --threads 1 \
  --deadline "$DEADLINE" --retry-failed --results "$D/results" --work "$D/work" --out "$D/out/eval_methods" ${EVAL17_ARGS:-} 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
if [ "$RC" != 0 ]; then
  echo "runner exit $RC: reporting the finished jobs" | tee -a "$LOG"
  python3 bench/eval_methods.py --report-only --results "$D/results" --out "$D/out/eval_methods" 2>&1 | tail -3 | tee -a "$LOG"
fi
kill "$DMON" 2>/dev/null
cp "$D"/out/eval_methods.json "$D"/out/eval_methods.md "$D"/out/eval_methods.png "$OUTD"/ 2>/dev/null
tar czf "$OUTD/results.tgz" -C "$D" results
cp "$LOG" "$D/gpu_util.txt" "$OUTD"/
echo "=== done in $(($(date +%s) - T0)) s" | tee -a "$LOG"
