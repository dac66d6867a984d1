"""surgeon train's CUDA speed defaults, through their CPU twins: compiled blocks (torch.compile with the
aot_eager / eager backends: the same code path as inductor's, without code generation), the chunked
loss, no liger kernels by default, and the bench's summary lines (bench/bench_gpu_train.py).

    PYTHONPATH=.:plugins/surgeon-train python -m pytest -q tests/test_train_speed.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from surgeon_train import TrainOptions, loss, speed, train_files
from typer.testing import CliRunner

from surgeon.cli import build_app
from surgeon.commands.split import SplitOptions, split

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "tiny_instruct.jsonl"
FAST = dict(lr=1e-2, seq_len=64, batch_size=4, warmup_steps=1, steps=4)
CUDA, CPU = torch.device("cuda"), torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_split(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speed") / "llama-milora"
    split(str(tiny["tiny-llama"]), out, SplitOptions(method="milora", rank=4))
    return out


def _losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "event" not in x]


def _run(split_dir: Path, out: Path, **kw) -> tuple[list[float], dict]:
    s = train_files(split_dir, DATA, out, TrainOptions(**(FAST | kw)))
    return _losses(out), s


@pytest.fixture(scope="module")
def eager(llama_split, tmp_path_factory) -> list[float]:
    """The losses of the pre-issue-28 CPU configuration, spelled out: no compile, chunked loss, no kernels."""
    return _run(llama_split, tmp_path_factory.mktemp("eager") / "o", compile=False, loss="chunked", kernels="none")[0]


def test_compile_is_on_by_default_only_on_cuda_for_long_runs():
    n = speed.COMPILE_MIN_TOKENS
    assert speed.use_compile(None, CUDA, n) and not speed.use_compile(None, CUDA, n - 1)
    assert not speed.use_compile(None, CPU, 10 * n)  # inductor's C++ build costs more than it saves on the CPU
    assert speed.use_compile(True, CPU, 1) and not speed.use_compile(False, CUDA, 10 * n)  # --compile / --no-compile win


def test_auto_picks_the_chunked_loss_and_no_kernels_even_with_liger_installed(monkeypatch, tiny):
    """Measured on the GPU (bench/RESULTS.md): the chunked torch loss beat liger's, and liger's kernels
    were no faster than none; before issue 28 auto picked liger for both when it was installed."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(loss, "available", lambda name: True)
    monkeypatch.setattr(speed, "liger_supported", lambda model: True)
    model = AutoModelForCausalLM.from_pretrained(tiny["tiny-llama"])
    assert loss.resolve("auto", CUDA) == "chunked" and loss.resolve("auto", CPU) == "chunked"
    assert speed.resolve("auto", model, CUDA) == "none"
    assert speed.resolve("liger", model, CUDA) == "liger"  # still there when asked


def test_the_cpu_default_is_the_eager_chunked_run(llama_split, tmp_path, eager):
    got, s = _run(llama_split, tmp_path / "o")
    assert s["setup"]["compile"] is False and s["setup"]["loss"] == "chunked" and s["setup"]["kernels"] == "none"
    assert got == pytest.approx(eager, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_compiled_blocks_give_the_eager_losses_with_one_graph(llama_split, tmp_path, eager, backend):
    """--compile through speed.compile_blocks, as on CUDA: the same losses within 1e-4, and one graph for
    every block and every step (static shapes; block 0's input made to require grad like the others')."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    got, s = _run(llama_split, tmp_path / "o", compile=True, compile_backend=backend, compile_loss=False)
    assert s["setup"]["compile"] is True
    assert got == pytest.approx(eager, abs=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"]


def test_compile_with_checkpointing_and_micro_batches(llama_split, tmp_path, eager):
    """What the default can pick on CUDA when memory is short: compiled blocks under activation
    checkpointing, the step in two micro-batches (document masks on, as for packed data)."""
    torch._dynamo.reset()
    got, s = _run(llama_split, tmp_path / "o", compile=True, compile_backend="aot_eager", grad_checkpointing=True, micro_batch=2)
    assert s["grad_checkpointing"] and s["micro_batch"] == 2 and s["setup"]["document_mask"]
    assert got == pytest.approx(eager, abs=1e-4)


def test_cli_no_compile_and_a_bad_backend(llama_split, tmp_path):
    args = ["train", str(llama_split), "--data", str(DATA), "--steps", "1", "--seq-len", "32", "--batch-size", "2", "-q", "--json"]
    r = CliRunner().invoke(build_app(), args + ["--no-compile", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["setup"]["compile"] is False
    from surgeon.errors import UsageError

    with pytest.raises(UsageError, match="compile backend 'tvm'"):
        train_files(llama_split, DATA, tmp_path / "b", TrainOptions(compile=True, compile_backend="tvm", **FAST))


def test_bench_summary_prints_the_issue_lines():
    """bench/bench_gpu_train.py's summary, from parts as a GPU run records them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gpu_train import summarize
    from gpu_train_parts import timings

    t = timings([11.0, 11.5, 12.0, 12.5, 13.0, 13.6], 10.0, 8.0, 2, 8192)  # set-up 2 s, first step 1 s, then 0.5 s
    assert t["setup_s"] == 2.0 and t["step_s"] == 0.5 and t["tokens_per_s"] == 16384.0
    assert t["wall_300_extrapolated_s"] == pytest.approx(2 + 1.5 + 297 * 0.5 + 0.6)
    dev = "NVIDIA H100 80GB HBM3"
    rows = {"smollm2:peft": {"id": "smollm2:peft", "device": dev, "tokens_per_s": 40000.0, "peak_mem_gib": 11.0,
                             "wall_300_extrapolated_s": 70.0, "losses": [10.9, 10.8]},
            "smollm2:surgeon": {"id": "smollm2:surgeon", "device": dev, "tokens_per_s": 64000.0, "peak_mem_gib": 4.4,
                                "wall_300_extrapolated_s": 50.0, "losses": [10.9, 10.7]},
            "smollm2:peft-split": {"id": "smollm2:peft-split", "device": dev, "losses": [10.9, 10.75]}}
    out = summarize(rows, tiny=False)
    assert out["lines"][0] == "train, H100, SmolLM2-shaped, surgeon vs PEFT LoRA: 1.60x tokens/s, 0.40x memory"
    assert re.match(r"train, H100, SmolLM2-shaped, 300 steps wall \(compile included\), surgeon vs PEFT LoRA: 50\.0 s vs 70\.0 s", out["lines"][1])
    assert out["loss_agreement"]["smollm2"]["rel_diff_at_step"] == pytest.approx(0.05 / 10.75)


def test_evaluation_after_compiled_training_compiles_nothing_more(llama_split, tmp_path):
    """--eval-data after a compiled run: another batch size without grad would compile new graphs
    (seconds each on CUDA) for one pass; it runs the blocks' eager code instead, with the same loss."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    s = train_files(llama_split, DATA, tmp_path / "o", TrainOptions(compile=True, compile_backend="aot_eager", eval_batch_size=3, **FAST),
                    eval_data=DATA)
    assert counters["stats"]["unique_graphs"] <= 3 and not counters["recompiles"]  # the blocks' graph, the loss chunk's (two sizes)
    assert s["setup"]["compile_loss"] is True  # the default with compile
    s2 = train_files(llama_split, DATA, tmp_path / "p", TrainOptions(compile=False, eval_batch_size=3, **FAST), eval_data=DATA)
    assert s["eval_loss"] == pytest.approx(s2["eval_loss"], abs=1e-4)


@pytest.mark.parametrize("softcap, bias", [(None, False), (2.5, True)])
def test_compiled_chunk_gives_the_eager_loss_and_gradient(softcap, bias):
    """The chunked loss through compiled_chunk (aot_eager: the same graph inductor gets) against the eager
    loop, chunks of unequal size (the last one shorter), a frozen head: loss and ∂/∂h."""
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(23, 16, generator=g)
    w = torch.randn(50, 16, generator=g) * 0.5
    b = torch.randn(50, generator=g) if bias else None
    t = torch.randint(0, 50, (23,), generator=g)
    fused = loss.compiled_chunk("aot_eager")
    out = []
    for f in (None, fused):
        h = h0.clone().requires_grad_()
        v = loss.chunked_ce_sum(h, w, b, t, softcap, chunk=7, fused=f)
        v.backward(torch.tensor(0.5))
        out.append((v.detach(), h.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)


def test_compiled_loss_in_training_gives_the_eager_losses(llama_split, tmp_path, eager):
    torch._dynamo.reset()
    got, s = _run(llama_split, tmp_path / "o", compile=True, compile_loss=True, compile_backend="aot_eager")
    assert s["setup"]["compile_loss"] is True
    assert got == pytest.approx(eager, abs=1e-4)


def test_a_compile_error_falls_back_to_eager_and_says_so(llama_split, tmp_path, eager, monkeypatch):
    """The CUDA default compiles every model; one whose compile fails (here a backend that raises, as
    inductor would on an op it cannot lower) must still train: the step is redone eagerly, the run
    goes on without compile, and metrics.jsonl says why."""
    from torch._dynamo import register_backend

    def broken(gm, example_inputs):
        raise NotImplementedError("no lowering for this op")

    register_backend(broken, name="surgeon_test_broken")
    monkeypatch.setattr(speed, "COMPILE_BACKENDS", (*speed.COMPILE_BACKENDS, "surgeon_test_broken"))
    torch._dynamo.reset()
    got, s = _run(llama_split, tmp_path / "o", compile=True, compile_backend="surgeon_test_broken")
    assert got == pytest.approx(eager, abs=1e-5)
    events = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [(e["event"], e["step"]) for e in events] == [("compile_failed", 1)]
    assert "no lowering for this op" in events[0]["error"]


def _cases():
    from surgeon.methods import names

    return [("tiny-llama", m) for m in names()] + [("tiny-gpt2", "milora"), ("tiny-qwen2", "milora")]


@pytest.mark.parametrize("arch, method", _cases())
def test_every_method_and_architecture_trains_compiled_to_the_eager_losses(tiny, tmp_path, arch, method):
    """Nothing in the trainer is method-specific, and compile is the CUDA default for all of them:
    compiled (aot_eager) training gives eager's losses for every method (moe's routing included, with
    its graph breaks) and on Conv1D (gpt2) and Qwen2 blocks, with no fallback to eager."""
    sp = tmp_path / "split"
    split(str(tiny[arch]), sp, SplitOptions(method=method, rank=4))
    fast = FAST | {"steps": 3}
    ref = _run(sp, tmp_path / "e", compile=False, **fast)[0]
    torch._dynamo.reset()
    got, s = _run(sp, tmp_path / "c", compile=True, compile_backend="aot_eager", **fast)
    assert got == pytest.approx(ref, abs=1e-4)
    assert '"compile_failed"' not in (tmp_path / "c" / "metrics.jsonl").read_text()
