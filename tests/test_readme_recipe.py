"""README.md's "transformers Trainer + PEFT" recipe runs as written, on a tiny split (issue 23).

    python -m pytest -q tests/test_readme_recipe.py

The Python block and the shell line after it are taken from README.md, run in a folder where
`split-dir` is a split of fixtures' tiny-llama; the only change is max_steps (200 → 3), for time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from surgeon.commands.split import SplitOptions, split

ROOT = Path(__file__).resolve().parents[1]


def recipe() -> tuple[str, str]:
    """(python, shell) of the recipe: the first ```python block after its heading and the ```bash block after that."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("transformers Trainer + PEFT")
    py = re.search(r"```python\n(.*?)```", text[start:], re.S)
    sh = re.search(r"```bash\n(.*?)```", text[start + py.end():], re.S)
    return py.group(1), sh.group(1)


def test_readme_trainer_recipe_runs_as_written(tiny, tmp_path):
    py, sh = recipe()
    assert "ds = " in py and "max_steps=200" in py and "cp -r split-dir trained-split" in sh
    split(str(tiny["tiny-llama"]), tmp_path / "split-dir", SplitOptions(method="milora", rank=4))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins" / "surgeon-train"), os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "recipe.py"
    script.write_text(py.replace("max_steps=200", "max_steps=3"))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sh = sh.replace("surgeon absorb", f"{sys.executable} -m surgeon absorb")  # the console script of this checkout
    r = subprocess.run(["bash", "-c", sh], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    before = load_file(tmp_path / "split-dir" / "adapter_model.safetensors")
    after = load_file(tmp_path / "trained-split" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not (before[k] == after[k]).all() for k in before)  # trained
    assert list((tmp_path / "merged").glob("*.safetensors"))
