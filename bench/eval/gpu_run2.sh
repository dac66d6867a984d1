#!/usr/bin/env bash
# One GPU call of protocol v2 (issue 25), resumable:  bash bench/eval/gpu_run2.sh BUDGET_S [WORKERS]
#
#   1. builds /tmp/eval25/smol (float32 HF folder) once, from /tmp/eval25/aa (left by the staging call) and the
#      carried .gguf_part/ab, with the carried gguf wheel (bench/eval/convert_gguf.py);
#   2. installs the carried wheels (.whl25/: surgeon's core dependencies the machine lacks) into /tmp/eval25/site;
#   3. `python bench/eval_methods.py run`: prints the cost estimate, skips every job that bench/eval/archive_v2.jsonl
#      (this checkout's) or /tmp/eval25/results holds, runs the most valuable jobs that fit before the deadline;
#   4. leaves under $OUT: new_runs.jsonl (this call's finished jobs: fold it into the archive), results.tgz (the whole
#      results folder, also foldable), eval_methods.{md,png,json} (the report with them), log.txt, gpu_util.txt.
#
# The calls (first `bash bench/eval/gpu_prep2.sh` in the root of the checkout that travels; GPU_RUN.md):
#   staging (seconds)   carry [".gguf_part/aa"]             mkdir -p /tmp/eval25 && cp .gguf_part/aa /tmp/eval25/aa
#   compute (9 min)     carry [".gguf_part/ab", ".whl25"]   bash bench/eval/gpu_run2.sh 540 8        (timeout_s 600)
# The compute call must follow the staging call on the same warm machine. Local dry run (CPU, tiny model):
#   EVAL25_NO_WHEELS=1 EVAL25_MODEL=fixtures/tiny-llama EVAL25_DEVICE=cpu EVAL25_ARGS=--tiny bash bench/eval/gpu_run2.sh 120 2
set -u
BUDGET=${1:?budget seconds}
WORKERS=${2:-8}
D=${EVAL25_DIR:-/tmp/eval25}
DEV=${EVAL25_DEVICE:-cuda}
OUTD=${OUT:-$D/out}
mkdir -p "$D" "$OUTD" "$D/out"
T0=$(date +%s)
LOG="$D/log.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "=== call at $(date -u +%FT%TZ), budget ${BUDGET}s, ${WORKERS} workers" >>"$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader >>"$LOG" 2>&1
if [ -z "${EVAL25_NO_WHEELS:-}" ] && ls .whl25/*.whl >/dev/null 2>&1 && [ ! -d "$D/site" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$D/site" .whl25/*.whl >>"$LOG" 2>&1 || { echo "wheels failed" | tee -a "$LOG"; exit 3; }
fi
MODEL=${EVAL25_MODEL:-$D/smol}
if [ ! -f "$MODEL/model.safetensors" ] && [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  if [ ! -f "$D/aa" ] || [ ! -f .gguf_part/ab ]; then
    echo "no model: need $D/aa (the staging call) and the carried .gguf_part/ab" | tee -a "$LOG"; exit 3
  fi
  cat "$D/aa" .gguf_part/ab >"$D/smol.gguf" || exit 3
  PYTHONPATH="$D/site" python3 bench/eval/convert_gguf.py "$D/smol.gguf" "$MODEL" 2>&1 | grep -v Loading | tee -a "$LOG"
  [ -f "$MODEL/model.safetensors" ] || { echo "conversion failed" | tee -a "$LOG"; exit 4; }
  rm -f "$D/smol.gguf"
fi
export PYTHONPATH="$PWD:$PWD/plugins/surgeon-train:$D/site"
python3 -c "import surgeon, surgeon_train, xxhash, filelock, torch, transformers, peft; print('imports ok: torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
python3 -m surgeon split --help >/dev/null 2>>"$LOG" && echo "surgeon CLI ok" | tee -a "$LOG"
if [ "$DEV" = cuda ] && [ ! -s "$D/forced_probe.txt" ]; then  # once: the teacher-forced pass against generating, on this card (~60 s)
  timeout 120 python3 bench/eval/bench_forced.py --model "$MODEL" --device cuda --n 256 --train 100 --tasks lookup,reverse >"$D/forced_probe.txt" 2>>"$LOG"
  grep '^task' "$D/forced_probe.txt" | tee -a "$LOG"
fi
FORCED=""  # the pass settles only what greedy decoding writes; if this card's probe ever disagrees, generate everything
if grep -q 'bits equal: False\|answers equal: False' "$D/forced_probe.txt" 2>/dev/null; then FORCED="--no-forced"; echo "forced pass off: $FORCED" | tee -a "$LOG"; fi
nvidia-smi dmon -s um -d 5 >"$D/gpu_util.txt" 2>&1 &
DMON=$!
DEADLINE=$((BUDGET - ($(date +%s) - T0) - 40))  # 40 s: in-flight grace, export, report, packing
# shellcheck disable=SC2086
timeout -s INT $((DEADLINE + 25)) python3 bench/eval_methods.py run --device "$DEV" --model "$MODEL" --workers "$WORKERS" --budget "$DEADLINE" \
  --results "$D/results" --work "$D/work" --export "$OUTD/new_runs.jsonl" --out "$D/out/eval_methods" $FORCED ${EVAL25_ARGS:-} 2>&1 | tee -a "$LOG"
echo "runner exit ${PIPESTATUS[0]}" | tee -a "$LOG"
kill "$DMON" 2>/dev/null
cp "$D"/out/eval_methods.md "$D"/out/eval_methods.png "$D"/out/eval_methods.json "$OUTD"/ 2>/dev/null
tar czf "$OUTD/results.tgz" -C "$D" results
cp "$LOG" "$D/gpu_util.txt" "$D/forced_probe.txt" "$OUTD"/ 2>/dev/null
echo "=== done in $(($(date +%s) - T0)) s" | tee -a "$LOG"
