#!/usr/bin/env bash
# Stage a folder for the device machine (carry it with the `run` tool, carry: [".gpuNN"]):
#   bash bench/gpu_stage.sh .gpu31      # .gpu31/new = this tree at HEAD, .gpu31/wheels = what the GPU image lacks
# The image (Python 3.12, torch 2.11+cu130) has transformers 5.17, which refuses huggingface_hub 2.x (surgeon's
# core needs it), and a typer whose --help crashes; these wheels, installed with
#   pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl; export PYTHONPATH=/tmp/site
# (gpu_io_suite.sh does it), fix both. Not the `kernels` wheel: with it, transformers fetches Hub kernels on
# CUDA forwards (set USE_HUB_KERNELS=NO for any forward there).
set -euo pipefail
D=${1:?usage: bash bench/gpu_stage.sh .gpuNN}
cd "$(git rev-parse --show-toplevel)"
rm -rf "$D"; mkdir -p "$D/new" "$D/wheels"
git archive HEAD | tar -x -C "$D/new"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$D/wheels" transformers==5.25.0 peft==0.21.2 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 \
  truststore==0.10.5 filelock==4.3.2 xxhash==4.1.0 regex typer==0.16.1 click==8.2.1 shellingham
grep -qx "/$D/" .git/info/exclude || echo "/$D/" >> .git/info/exclude
du -sh "$D" "$D/wheels"
