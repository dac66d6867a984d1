"""Issue 22's matrix: every architecture of tests/archmodels.py, split with milora and pissa under the
default options, loaded on every path against the original's float32 logits; absorb bit-exact; a train step.

    PYTHONPATH=.:plugins/surgeon-train python -m pytest -q tests/test_architectures.py

Paths, per (architecture, method):
  A  README.md's documented load line (`documented_load` below: the ONE place that mirrors it), and no
     PEFT/transformers warning about adapters or missing/unexpected keys on it
  B  the Auto class's from_pretrained(OUT) alone (transformers 5 attaches an adapter found beside the weights)
  C  vanilla PEFT: the Auto class on a copy of OUT without the adapter files, then PeftModel.from_pretrained
  D  surgeon.runtime.load_split(OUT)
  E  `surgeon absorb OUT --out MERGED` equals the source checkpoint bit for bit, tensor by tensor
  F  one `surgeon train` step (a few architectures)
  G  the layers that carry factors (as vanilla PEFT binds them) are what PEFT's `all-linear` takes on the
     loaded model, less layers whose smaller side is not above the rank (those stay dense by default)
Tolerance: max |Δ| ≤ rtol × the original's max |logit|, rtol = 1e-4 (archmodels.TABLE: 2e-2 for the bf16 checkpoint).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from archmodels import ARCHS, TABLE, Zoo, forward
from cliutil import run
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from surgeon.runtime import load_split

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
METHODS = ["milora", "pissa"]
NAMES = [a.name for a in TABLE]
TRAIN = ["llama", "gpt2", "mixtral", "deepseek_v3", "gemma3"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# warnings that mean the adapter did not bind as written (PEFT's "multiple adapters", missing/unexpected keys, ...)
BAD_WARNING = re.compile(r"adapter|missing|unexpected|not initiali[sz]ed|newly initiali[sz]ed|not used|twice|mismatch", re.I)

# README.md's load line, as the README writes it; `documented_load` is the same line for any Auto class.
# (until 69712de: "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('split-dir'), 'split-dir')")
README_LOAD_LINE = "AutoModelForCausalLM.from_pretrained('split-dir')"


def documented_load(out: Path, auto: str):
    """README_LOAD_LINE with the architecture's Auto class (edit both together when README's line changes)."""
    return getattr(transformers, auto).from_pretrained(out, dtype=torch.float32)


# ---------------------------------------------------------------- shared, session-scoped state


class Matrix:
    """Sources, original outputs and splits, each made once per session on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.zoo = Zoo(root / "src")
        self._orig: dict[str, torch.Tensor] = {}
        self._splits: dict[tuple[str, str], object] = {}

    def src(self, name: str) -> Path:
        return self.zoo.path(name)

    def original(self, name: str) -> torch.Tensor:
        if name not in self._orig:
            arch = ARCHS[name]
            m = getattr(transformers, arch.auto).from_pretrained(self.src(name), dtype=torch.float32)
            self._orig[name] = forward(m, arch, m.config)
        return self._orig[name]

    def split(self, name: str, method: str) -> Path:
        key = (name, method)
        if key not in self._splits:
            out = self.root / "splits" / f"{name}-{method}"
            res = run("split", "--method", method, self.src(name), "--rank", "4", "--out", out, "--quiet")
            self._splits[key] = out if res.exit_code == 0 else f"split exit {res.exit_code}: {tail(res)}"
        got = self._splits[key]
        if isinstance(got, str):
            pytest.fail(f"{name}/{method}: {got}")
        return got


@pytest.fixture(scope="session")
def mx(tmp_path_factory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("arch-matrix"))


def adapter_dir(out: Path) -> Path:
    """Where the split's PEFT adapter lies: beside the weights, or in one subfolder."""
    if (out / "adapter_config.json").exists():
        return out
    found = [p.parent for p in out.glob("*/adapter_config.json")]
    assert len(found) == 1, f"no single adapter folder in {out}: {found}"
    return found[0]


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float) -> str | None:
    """None if got matches want within rtol of want's max |value|, else a line with the numbers."""
    if got.shape != want.shape:
        return f"{what}: output shape {tuple(got.shape)} != {tuple(want.shape)}"
    d, ref = float((got - want).abs().max()), float(want.abs().max())
    return None if d <= rtol * ref else f"{what}: max|Δlogit| {d:.3e} > {rtol:g} × {ref:.3f} (rel {d / ref:.2e})"


def check(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float) -> None:
    msg = close(got, want, what, rtol)
    assert msg is None, msg


@contextmanager
def captured():
    """Every Python warning and every transformers/peft log record at WARNING or above, as strings."""
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(f"[{record.name}] {record.getMessage()}")

    h = Grab(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    for lg in loggers:
        lg.addHandler(h)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            yield seen
        seen.extend(f"[{x.category.__name__}] {x.message}" for x in w)
    finally:
        for lg in loggers:
            lg.removeHandler(h)


def case_params():
    return [pytest.param(n, m, id=f"{n}-{m}") for n in NAMES for m in METHODS]


# ---------------------------------------------------------------- the documentation and the fixtures themselves


def test_readme_documents_the_load_line_mirrored_here():
    flat = re.sub(r"\\\s*\n\s*", "", (ROOT / "README.md").read_text())
    assert README_LOAD_LINE in flat, "README.md's load line changed: update README_LOAD_LINE and documented_load"


def test_the_matrix_is_wide_enough():
    assert len({a.model_cls for a in TABLE}) >= 25
    assert {"dense", "encoder", "seq2seq", "speech", "moe", "multimodal", "hub-names"} == {a.family for a in TABLE}


@pytest.mark.parametrize("name", ["gemma3-hub", "llava-hub"])
def test_renamed_checkpoints_load_as_the_same_model(mx, name):
    torch.testing.assert_close(mx.original(name), mx.original(name.removesuffix("-hub")), rtol=0, atol=0)


# ---------------------------------------------------------------- the load paths


@pytest.mark.parametrize("name,method", case_params())
def test_A_documented_line(mx, name, method):
    out, arch = mx.split(name, method), ARCHS[name]
    with captured() as seen:
        model = documented_load(out, arch.auto)
    problems = [close(forward(model, arch, model.config), mx.original(name), "A", arch.rtol)]
    problems += [f"A warns: {s[:200]}" for s in seen if BAD_WARNING.search(s)]
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name,method", case_params())
def test_B_auto_class_alone(mx, name, method):
    out, arch = mx.split(name, method), ARCHS[name]
    model = getattr(transformers, arch.auto).from_pretrained(out, dtype=torch.float32)
    check(forward(model, arch, model.config), mx.original(name), "B", arch.rtol)


@pytest.mark.parametrize("name,method", case_params())
def test_C_vanilla_peft_on_a_copy_without_the_adapter(mx, name, method, tmp_path):
    out, arch = mx.split(name, method), ARCHS[name]
    adapter = adapter_dir(out)
    base_dir = tmp_path / "base"
    shutil.copytree(out, base_dir, ignore=lambda d, names: [n for n in names if n in ADAPTER_FILES or
                                                            (Path(d) / n / "adapter_config.json").exists()])
    base = getattr(transformers, arch.auto).from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    check(forward(model, arch, model.config), mx.original(name), "C", arch.rtol)


@pytest.mark.parametrize("name,method", case_params())
def test_D_surgeon_runtime(mx, name, method):
    out, arch = mx.split(name, method), ARCHS[name]
    model = load_split(out).model
    check(forward(model, arch, model.config), mx.original(name), "D", arch.rtol)


@pytest.mark.parametrize("name,method", case_params())
def test_E_absorb_is_bit_exact(mx, name, method, tmp_path):
    out = mx.split(name, method)
    res = run("absorb", out, "--out", tmp_path / "merged", "--quiet")
    assert res.exit_code == 0, f"absorb exit {res.exit_code}: {tail(res)}"
    want, got = tensors(mx.src(name)), tensors(tmp_path / "merged")
    assert sorted(got) == sorted(want), f"names differ: {sorted(set(got) ^ set(want))[:8]}"
    differ = [k for k in want if got[k].dtype != want[k].dtype or
              not torch.equal(got[k].contiguous().view(torch.uint8), want[k].contiguous().view(torch.uint8))]
    assert not differ, f"{len(differ)} tensors differ from the source, first {differ[:4]}"


@pytest.mark.parametrize("name", TRAIN)
def test_F_one_train_step(mx, name, tmp_path):
    out = mx.split(name, "milora")
    res = run("train", out, "--data", DATA, "--out", tmp_path / "trained", "--steps", "1", "--seq-len", "32")
    assert res.exit_code == 0, f"train exit {res.exit_code}: {tail(res)}"


@pytest.mark.parametrize("name", NAMES)
def test_G_all_linear_is_what_peft_takes(mx, name, tmp_path):
    out, arch = mx.split(name, "milora"), ARCHS[name]
    auto = getattr(transformers, arch.auto)
    want = peft_all_linear(auto.from_pretrained(mx.src(name), dtype=torch.float32), rank=4)
    base_dir = tmp_path / "base"
    shutil.copytree(out, base_dir, ignore=lambda d, names: [n for n in names if n in ADAPTER_FILES or
                                                            (Path(d) / n / "adapter_config.json").exists()])
    got = lora_modules(PeftModel.from_pretrained(auto.from_pretrained(base_dir, dtype=torch.float32), adapter_dir(out)))
    routers = {n for n in want if ROUTER.search(n)}  # issue 22: MoE routers stay dense (listed in surgeon.json)
    model = auto.from_pretrained(mx.src(name), dtype=torch.float32)
    # nn.MultiheadAttention reads its out_proj's weight without calling it (SigLIP's pooling head): a LoRA
    # there never runs, in PEFT either; surgeon leaves it dense and lists it (surgeon.json "dense")
    direct = {n for n in want if isinstance(model.get_submodule(n.rpartition(".")[0]), torch.nn.MultiheadAttention)}
    if direct:
        assert all(d in json.loads((out / "surgeon.json").read_text())["dense"] for d in direct)
    want = want - routers - direct
    if arch.family == "moe":  # the experts' fused parameters, and the dense MLPs PEFT 0.21's MoE conversion would drop, are split too
        extra = got - want
        assert all(n.endswith((".experts", ".experts.base_layer")) or ".mlp." in n for n in extra), sorted(extra)
        got = got - extra
    assert got == want, f"factors on {len(got)} layers, PEFT's all-linear takes {len(want)}: " \
                        f"missing {sorted(want - got)[:6]}, extra {sorted(got - want)[:6]}"


ROUTER = re.compile(r"\.(mlp\.gate|block_sparse_moe\.gate|shared_expert_gate)$")


def peft_all_linear(model, rank: int) -> set[str]:
    """The layers PEFT's `all-linear` wraps on `model`, whose smaller side is above `rank`."""
    wrapped = get_peft_model(model, LoraConfig(r=rank, target_modules="all-linear"))
    return {n for n, m in wrapped.base_model.model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A and min(m.in_features, m.out_features) > rank}


def lora_modules(model) -> set[str]:
    """The layers of a PeftModel whose LoRA factors were loaded (B != 0: PEFT's own init of an unloaded B is 0)."""
    return {n for n, m in model.base_model.model.named_modules()
            if hasattr(m, "lora_B") and any(bool(b.weight.abs().sum() > 0) for b in m.lora_B.values())}


def tail(res) -> str:
    """The CLI's last output lines that are not progress bars, and the exception if it was not an exit."""
    lines = [ln for ln in res.output.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    exc = "" if isinstance(res.exception, SystemExit) or res.exception is None else f" {res.exception!r}"
    return " | ".join(lines[-3:])[-600:] + exc


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(f))
    return out
