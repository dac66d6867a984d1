"""surgeon train (plugins/surgeon-train): only the factors learn, the base is never rewritten.

    pip install -e plugins/surgeon-train && python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from surgeon_train import (
    DataError,
    TrainOptions,
    evaluate,
    load_jsonl,
    pack,
    tokenize,
    train_files,
)
from surgeon_train.data import IGNORE, load_packed
from typer.testing import CliRunner

from surgeon.cli import build_app
from surgeon.commands.absorb import SplitDir
from surgeon.commands.split import SplitOptions, split
from surgeon.engine.outdir import FILES
from surgeon.methods import names
from surgeon.runtime import load_residual_model, load_split

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
FAST = dict(lr=1e-2, seq_len=64, batch_size=4, warmup_steps=1)
# every registered method (nothing in the trainer is method-specific), plus Conv1D and bf16/tied bases
CASES = [("tiny-llama", m) for m in names()] + [("tiny-gpt2", "milora"), ("tiny-qwen2", "milora")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads that spin on a shared, loaded
    CPU made a step 10× slower in this sandbox."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def splits(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-splits")
    out = {}
    for model, method in CASES:
        out[f"{model}/{method}"] = root / f"{model}-{method}"
        split(str(tiny[model]), out[f"{model}/{method}"], SplitOptions(method=method, rank=4))
    return out


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "llama-milora"
    train_files(splits["tiny-llama/milora"], DATA, out, TrainOptions(steps=12, **FAST))
    return out


def _train_loss(split_dir: Path) -> float:
    from transformers import AutoTokenizer

    packed = load_packed(DATA, AutoTokenizer.from_pretrained(split_dir), 64)
    return evaluate(load_split(split_dir).model, packed)[0]


def _trainable_factor_keys(split_dir: Path) -> dict[str, bool]:
    """Factor-file key -> whether the runtime trains it (NuSA-like methods store frozen bases too)."""
    sm = load_split(split_dir)
    out = {}
    for module, rt in sm.modules.items():
        for fname in rt.factors():
            p = getattr(rt, fname, None)
            out[sm.split.factor_key(module, fname)] = isinstance(p, torch.nn.Parameter) and p.requires_grad
    for block, mod in sm.blocks.items():  # per-block tensors (moe routers): parameters, all trained
        params = dict(mod.named_parameters())
        for fname in mod.factors():
            out[f"{block}.{fname}"] = params[fname.removeprefix("router.")].requires_grad
    return out


@pytest.mark.parametrize("key", [f"{m}/{meth}" for m, meth in CASES])
def test_loss_drops_and_only_factors_change(splits, tmp_path, key):
    src = splits[key]
    before = {f.name: _sha(f) for f in src.iterdir()}
    loss0 = _train_loss(src)
    out = tmp_path / "trained"
    s = train_files(src, DATA, out, TrainOptions(steps=12, **FAST), eval_data=DATA)
    loss1 = _train_loss(out)
    assert loss1 < loss0, (loss0, loss1)
    assert s["eval_loss"] == pytest.approx(loss1, rel=1e-5)

    assert {f.name: _sha(f) for f in src.iterdir()} == before  # the source split is untouched
    shards = [f for f in src.iterdir() if f.name.startswith("model") and f.suffix == ".safetensors"]
    assert shards
    for f in shards:  # every base shard: the same bytes, the same inode (hard link, not a copy)
        assert _sha(out / f.name) == before[f.name]
        assert os.path.samefile(out / f.name, f) and os.stat(f).st_nlink >= 2
    factors = SplitDir(src).factors_file.name
    for f in src.iterdir():  # every other file as split, except the current factors and the split's file listing
        if f.name not in (factors, FILES):
            assert _sha(out / f.name) == before[f.name], f.name
    old, new = _tensors(src / factors), _tensors(out / factors)
    trainable = _trainable_factor_keys(src)
    assert old.keys() == new.keys() == trainable.keys() and any(trainable.values())
    for k in old:  # every trainable factor moved, a frozen one did not
        assert old[k].shape == new[k].shape and torch.equal(old[k], new[k]) != trainable[k], k

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "event" not in x] == list(range(1, 13))
    assert lines[-1]["event"] == "eval" and all(x["tokens_per_s"] > 0 for x in lines[:-1])
    assert (out / "train_state" / "state.pt").exists() and json.loads((out / "surgeon.train.json").read_text())["steps_done"] == 12


def test_trained_dir_loads_in_peft_absorbs_and_exports(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgeon.commands.absorb import AbsorbOptions, absorb, export_lora
    from surgeon.format.splitdir import MANIFEST

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_split(trained).model(ids).logits
        peft = PeftModel.from_pretrained(load_residual_model(trained), trained).eval()
        torch.testing.assert_close(peft(ids).logits, ref, atol=1e-5, rtol=1e-5)
        for base in ("residual", "original"):
            absorb(trained, tmp_path / base, AbsorbOptions(base=base))
            merged = AutoModelForCausalLM.from_pretrained(tmp_path / base, dtype=torch.float32).eval()
            torch.testing.assert_close(merged(ids).logits, ref, atol=1e-4, rtol=1e-4)
        export_lora(trained, tmp_path / "lora")
        src = Path(json.loads((trained / MANIFEST).read_text())["source"]["files"][0]["path"]).parent
        orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        lora = PeftModel.from_pretrained(orig, tmp_path / "lora").eval()
        torch.testing.assert_close(lora(ids).logits, ref, atol=1e-4, rtol=1e-4)


class _Stop(Exception):
    pass


def test_resume_continues_from_last_save(splits, tmp_path):
    src = splits["tiny-llama/milora"]
    opts = dict(steps=6, save_every=3, **FAST)
    train_files(src, DATA, tmp_path / "a", TrainOptions(**opts))

    def stop_after_3(event, info):
        if event == "step" and info["step"] == 4:
            raise _Stop  # step 4 ran but was never saved: the resume redoes it

    with pytest.raises(_Stop):
        train_files(src, DATA, tmp_path / "b", TrainOptions(**opts), callback=stop_after_3)
    assert torch.load(tmp_path / "b" / "train_state" / "state.pt", weights_only=True)["step"] == 3
    load_split(tmp_path / "b")  # a valid split folder at every save

    seen = []
    train_files(src, DATA, tmp_path / "b", TrainOptions(**opts, resume=True), callback=lambda e, i: e in ("start", "step") and seen.append((e, i["step"])))
    assert seen[0] == ("start", 3) and [s for e, s in seen if e == "step"] == [4, 5, 6]
    a, b = _tensors(tmp_path / "a" / "adapter_model.safetensors"), _tensors(tmp_path / "b" / "adapter_model.safetensors")
    for k in a:  # optimizer, schedule, data position and RNG restored: the same numbers bit for bit
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    from surgeon.errors import OutputExistsError, UsageError

    with pytest.raises(UsageError, match=r"lr 0\.01 → 0\.02"):
        train_files(src, DATA, tmp_path / "b", TrainOptions(**(opts | {"lr": 2e-2}), resume=True))
    with pytest.raises(UsageError, match="no saved training state"):
        train_files(src, DATA, tmp_path / "c", TrainOptions(**opts, resume=True))
    with pytest.raises(OutputExistsError, match="--resume"):
        train_files(src, DATA, tmp_path / "a", TrainOptions(**opts))


def test_grad_checkpointing_gives_the_same_step(splits, tmp_path):
    src = splits["tiny-llama/pissa"]
    train_files(src, DATA, tmp_path / "plain", TrainOptions(steps=2, **FAST))
    train_files(src, DATA, tmp_path / "ckpt", TrainOptions(steps=2, grad_checkpointing=True, **FAST))
    a, b = _tensors(tmp_path / "plain" / "adapter_model.safetensors"), _tensors(tmp_path / "ckpt" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


def test_prompt_is_masked_and_rows_are_packed(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tiny-llama"])
    recs = [(1, {"prompt": "two plus two?", "completion": " four."}), (2, {"text": "The quick brown fox."})]
    (ids0, lab0), (ids1, lab1) = tokenize(recs, tok)
    n_p = len(tok("two plus two?")["input_ids"])
    assert lab0[:n_p] == [IGNORE] * n_p and lab0[n_p:] == ids0[n_p:] and ids0[-1] == tok.eos_token_id
    assert lab1[0] == IGNORE and lab1[1:] == ids1[1:] and ids1[-1] == tok.eos_token_id

    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    (ids2, lab2), _ = tokenize(recs, tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "two plus two?"}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids2[: len(prompt)] == list(prompt) and lab2[: len(prompt)] == [IGNORE] * len(prompt)
    assert tok.decode(ids2[len(prompt) :]) == " four."

    p = pack([(ids0, lab0), (ids1, lab1)], 8, tok.pad_token_id)
    n = len(ids0) + len(ids1)
    assert p.input_ids.shape == (-(-n // 8), 8) and p.input_ids.flatten()[:n].tolist() == ids0 + ids1
    assert (p.labels.flatten()[n:] == IGNORE).all() and (p.input_ids.flatten()[n:] == tok.pad_token_id).all()
    flat = lab0 + lab1  # a row's first label has nothing before it in the row: no loss there
    assert int(p.loss_tokens().sum()) == sum(flat[j] != IGNORE for j in range(n) if j % 8)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        ("", "holds no examples"),
        ("\n  \n", "holds no examples"),
        ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', "line 3: not valid JSON"),
        ('{"prompt": "p", "completion": "c"}\n{"question": "q"}\n', r"line 2: keys \['question'\]"),
        ('{"text": 5}\n', "line 1: 'text' must be a string"),
        ('{"prompt": "p", "completion": ""}\n', "line 1: 'completion' is empty"),
        ("[1, 2]\n", "line 1: a JSON list"),
    ],
)
def test_bad_data_is_named(tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_jsonl(f)


def test_cli_train_is_a_plugin_command(splits, tmp_path):
    runner = CliRunner()
    app = build_app()
    assert "train" in runner.invoke(app, ["--help"]).output
    args = ["train", str(splits["tiny-llama/milora"]), "--data", str(DATA), "--out", str(tmp_path / "o"), "--epochs", "0.25", "--seq-len", "32"]
    r = runner.invoke(app, args + ["-q", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    plan = summary["plan"]  # a quarter of the packed rows, 4 rows per step
    assert summary["steps_done"] == plan["steps"] == -(-plan["rows"] // 16) and plan["seq_len"] == 32
    assert len((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) == plan["steps"]
    r = runner.invoke(app, args + ["-q"])
    assert r.exit_code == 2 and "--resume" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": }\n')
    r = runner.invoke(app, args[:3] + [str(bad), "--out", str(tmp_path / "o2"), "-q"])
    assert r.exit_code == 1 and "line 2" in r.output and not (tmp_path / "o2").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_grad_accum(splits, tmp_path):
    """2 gloo processes × batch 2 take the same steps as 1 process × batch 2 × accum 2."""
    src = splits["tiny-llama/milora"]
    common = ["--data", str(DATA), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "-q"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "surgeon", "train", str(src), "--out", str(tmp_path / "ddp")] + common
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    train_files(src, DATA, tmp_path / "one", TrainOptions(steps=3, seq_len=32, batch_size=2, grad_accum=2, lr=1e-2))
    a, b = _tensors(tmp_path / "ddp" / "adapter_model.safetensors"), _tensors(tmp_path / "one" / "adapter_model.safetensors")
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
        moved += not torch.equal(a[k], _tensors(src / "adapter_model.safetensors")[k])
    assert moved == len(a)
    plan = json.loads((tmp_path / "ddp" / "surgeon.train.json").read_text())["plan"]
    assert plan["world_size"] == 2


def test_method_extra_loss_enters_the_objective(splits, tmp_path, monkeypatch):
    """A method's regularizer (KaSA's orthogonality terms, a router's balance loss) is trained
    against: here a strong L2 pull on lora_B, given to milora for the test, shrinks B and shows in
    metrics.jsonl, where a run without it does not shrink B as much."""
    from surgeon.methods.milora import MiLoRA

    src = splits["tiny-llama/milora"]
    train_files(src, DATA, tmp_path / "plain", TrainOptions(steps=4, **FAST))
    monkeypatch.setattr(MiLoRA, "regularizer", lambda self, mods: 10.0 * sum((m.lora_B**2).sum() for m in mods))
    train_files(src, DATA, tmp_path / "reg", TrainOptions(steps=4, **FAST))
    norm = lambda d: sum(float((t**2).sum()) for k, t in _tensors(d / "adapter_model.safetensors").items() if "lora_B" in k)  # noqa: E731
    assert norm(tmp_path / "reg") < 0.9 * norm(tmp_path / "plain")
    lines = [json.loads(x) for x in (tmp_path / "reg" / "metrics.jsonl").read_text().splitlines()]
    b0 = sum(float((t**2).sum()) for k, t in _tensors(src / "adapter_model.safetensors").items() if "lora_B" in k)
    assert lines[0]["extra_loss"] == pytest.approx(10.0 * b0, rel=1e-4)  # logged before the first update
