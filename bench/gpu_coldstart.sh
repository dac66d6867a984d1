#!/usr/bin/env bash
# Usage (GPU machine, as root, from a folder holding the surgeon tree): bash bench/gpu_coldstart.sh [TREE] > $OUT/coldstart.txt
# Each "cold" line drops the page cache first; the last lines are -X importtime's 12 slowest imports of the split command.
# Cold-start breakdown: what a cold process start costs before the split's pipeline can begin.
cd "${1:-.}"
export PYTHONPATH=/tmp/site:$PWD
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; local e=$(date +%s.%N); python3 -c "print(round($e-$s,2))"; }
for i in 1 2; do
drop; echo "cold python3 -c pass: $(t python3 -c pass)"
drop; echo "cold import torch: $(t python3 -c 'import torch')"
echo "warm import torch: $(t python3 -c 'import torch')"
drop; echo "cold import torch + cuda init: $(t python3 -c 'import torch; torch.zeros(1, device="cuda"); torch.cuda.synchronize()')"
echo "warm import torch + cuda init: $(t python3 -c 'import torch; torch.zeros(1, device="cuda"); torch.cuda.synchronize()')"
drop; echo "cold import transformers+torch+cuda: $(t python3 -c 'import torch, transformers; torch.zeros(1, device="cuda"); from transformers import LlamaForCausalLM')"
drop; echo "cold surgeon split --help: $(t python3 -m surgeon split --help)"
echo "warm surgeon split --help: $(t python3 -m surgeon split --help)"
done
drop; python3 -X importtime -c 'import surgeon.commands.split, torch; torch.zeros(1, device="cuda")' 2>&1 | sort -t'|' -k2 -n | tail -12
