"""Protocol v2 of bench/eval_methods.py (issue 25): harder tasks, the statistics, the value-ordered plan and
its cost arithmetic, the KaSA authors' variant, and the tiny end-to-end run resumed from the archive."""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "surgeon-train")]

from bench.eval import archive as A
from bench.eval import grid as G
from bench.eval import stats as S
from bench.eval import tasks as T

TINY = ROOT / "fixtures" / "tiny-llama"
pytestmark = pytest.mark.usefixtures("one_thread")


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.split("What is ")[1].split("?")[0].split(" + ")
    return int(a), int(b)


def test_v2_tasks_have_the_difficulty_asked_and_disjoint_splits():
    data = T.make_tasks(1200, 500, 1000, version="v2")
    for name, sp in data.items():
        assert [len(sp[s]) for s in ("train", "val", "test")] == [1200, 500, 1000]
        inputs = [{r["prompt"] for r in sp[s]} for s in ("train", "val", "test")]
        assert sum(map(len, inputs)) == 2700, name  # no duplicate inside a split
        assert not (inputs[0] & inputs[1]) and not (inputs[0] & inputs[2]) and not (inputs[1] & inputs[2]), name
    adds = [_operands(r["prompt"]) + (int(r["completion"]),) for s in data["add"].values() for r in s]
    assert all(a + b == c for a, b, c in adds)
    assert {len(str(x)) for a, b, _ in adds for x in (a, b)} == {4, 5}
    revs = [r for s in data["reverse"].values() for r in s]
    assert {len(r["completion"].split()) for r in revs} == {8, 9, 10}
    assert all(r["completion"].split() == r["prompt"].split(": ")[1].split()[::-1] for r in revs)
    for r in data["lookup"]["test"]:
        pairs = dict(p.split("=") for p in r["prompt"].split(". What")[0].split(", "))
        assert len(pairs) == 20 and pairs[r["prompt"].rsplit(" ", 1)[1].rstrip("?")] == r["completion"]
    v1 = T.make_tasks(5, 5, 5)  # v1 keeps its own stream and difficulty
    assert all(len(str(x)) == 3 for s in v1["add"].values() for r in s for x in _operands(r["prompt"]))
    assert v1 == T.make_tasks(5, 5, 5, version="v1") and T.make_tasks(5, 5, 5, version="v2") == T.make_tasks(5, 5, 5, version="v2")


def test_bootstrap_matches_the_known_answer():
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 1.0, (1, 4000))
    m, lo, hi = S.boot(x, reps=1000, seed=3)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert abs(m - x.mean()) < 1e-12 and lo < 0.5 < hi
    assert abs((hi - lo) / (2 * 1.96 * se) - 1) < 0.15  # the normal interval of a mean
    base = {s: rng.normal(0, 5, 300) for s in range(3)}  # a large shared effect cancels in the paired difference
    d = S.paired({s: v + 0.2 for s, v in base.items()}, base | {9: np.zeros(300)}, reps=200)
    assert d[3] == 3 and all(abs(v - 0.2) < 1e-12 for v in d[:3])
    assert S.verdict(d, "less", "more") == "more" and S.verdict((0.0, -0.1, 0.1), "less", "more").startswith("no difference")
    assert S.paired({0: [1.0]}, {1: [1.0]}) is None


def _curve(accs, forgets, seeds=2, items=200, windows=50) -> dict:
    acc = [np.array([[1.0] * round(a * items) + [0.0] * (items - round(a * items))] * seeds) for a in accs]
    return {"acc": acc, "forget": [np.full((seeds, windows), f) for f in forgets]}


def test_matched_accuracy_interpolates_along_each_curve():
    assert S.interp_at([0.2, 0.6, 0.9], [0.1, 0.5, 2.0], 0.75) == pytest.approx(1.25)
    assert S.interp_at([0.2, 0.6, 0.5], [0.1, 0.5, 9.0], 0.4) == pytest.approx(0.3)  # the first crossing, not the collapse
    assert S.interp_at([0.2, 0.6], [0.1, 0.5], 0.7) is None and S.interp_at([0.5, 0.6], [0.1, 0.5], 0.4) is None
    curves = {"lora": _curve([0.2, 0.5, 0.8], [0.2, 0.5, 0.8]), "milora": _curve([0.1, 0.4, 0.6, 0.7], [0.2, 0.8, 1.2, 1.4])}
    a = S.common_accuracy(curves)
    assert a == pytest.approx(0.7)
    m = S.matched(curves, 0.6, "lora", reps=200)
    assert m["lora"]["forget"] == pytest.approx(0.6) and m["milora"]["forget"] == pytest.approx(1.2)
    d = m["milora"]["diff"]
    assert d[0] == pytest.approx(0.6) and d[1] - 1e-9 <= 0.6 <= d[2] + 1e-9


def test_grid_order_and_the_chosen_point():
    assert len(G.GRID) == 8 and G.GRID[0] == 1e-5 and G.GRID[-1] == 3e-2
    assert all(abs(b / a - math.sqrt(10)) < 1e-9 for a, b in zip(G.GRID[:-2], G.GRID[1:-1]))
    s = {"tag": "v2", "arms": ["lora", "pissa", "milora", "nusa"], "grid": G.GRID, "select_seeds": [0, 1], "heldout_seeds": [2, 3, 4],
         "targets": ["all", "qv"], "seq_arms": ["nusa", "lora"], "seq_seeds": [0, 1, 2]}
    jobs = G.jobs(s, {})
    assert jobs[0]["id"] == "ref-v2"
    first = [j for j in jobs if j["kind"] == "train"][:18]
    assert {(j["method"], G.lr_tag(j["lr"])) for j in first} == {(a, G.lr_tag(lr)) for a in ("lora", "pissa", "milora") for lr in G.DECISIVE_LRS}
    assert all(j["targets"] == "all" and j["ready"] for j in first)
    assert not any(j["ready"] for j in jobs if j["kind"] in ("seq",) or not j.get("select", True))
    def rec(lr, seed, acc, loss=1.0, error=None):
        job = {"id": G.train_id("nusa", "all", lr, seed, "v2"), "kind": "train"}
        return {"job": job, "error": error} if error else {"job": job, "result": {"val": {"add": {"acc": acc, "loss": loss}}}}

    done = {}
    for lr in G.GRID:
        for seed in (0, 1):
            r = rec(lr, seed, 0.6 if lr == 10**-3.5 else 0.9 if lr == 1e-3 else 0.5)
            if lr == 1e-3 and seed == 1:
                r = rec(lr, seed, 0, error="NumericsError: the loss became nan")  # counts 0: mean 0.45
            done[r["job"]["id"]] = r
    assert G.chosen_lr(s, done, "nusa", "all") == 10**-3.5
    r = rec(1e-2, 0, 0.6, loss=0.5)  # the same mean accuracy, a lower validation loss: chosen
    done[r["job"]["id"]] = r
    done[rec(1e-2, 1, 0.6)["job"]["id"]] = rec(1e-2, 1, 0.6, loss=0.5)
    assert G.chosen_lr(s, done, "nusa", "all") == 1e-2
    assert G.chosen_lr(s, {k: v for k, v in done.items() if "s1" not in k}, "nusa", "all") is None  # a selection seed missing
    held = [j for j in G.jobs(s, done) if j.get("method") == "nusa" and not j.get("select", True) and j["targets"] == "all"]
    assert [j["ready"] for j in held] == [True] * 3 and {j["seed"] for j in held} == {2, 3, 4}


def test_cost_estimate_arithmetic(tmp_path):
    s = {"tag": "v2", "arms": ["lora", "milora"], "grid": [1e-4, 1e-3, 1e-2], "select_seeds": [0, 1], "heldout_seeds": [2, 3, 4],
         "targets": ["all"], "seq_arms": ["lora"], "seq_seeds": [0, 1, 2]}
    assert G.planned(s) == {"ref": 1, "train": 2 * (3 * 2 + 3), "seq": 3, "latency": 0}
    assert G.planned(s | {"heldout_by_arm": {"milora": [2, 3, 4, 5, 6]}})["train"] == 2 * 3 * 2 + 3 + 5
    done = {f"x{i}": {"job": {"kind": "train"}} for i in range(5)} | {"r": {"job": {"kind": "ref"}}}
    c = G.cost(s, done, {"ref": 100.0, "train": 200.0, "seq": 600.0}, 4)
    assert c["left"] == {"ref": 0, "train": 13, "seq": 3, "latency": 0}
    assert c["total_s"] == pytest.approx(13 * 200 / 4 + 3 * 600 / 4)
    c = G.cost(s | {"latency_batches": [1]}, done, {"ref": 100.0, "train": 200.0, "seq": 600.0, "latency": 120.0}, 4)
    assert c["total_s"] == pytest.approx(13 * 200 / 4 + 3 * 600 / 4 + 120)  # the latency job runs alone: not ÷ 4
    v1 = tmp_path / "v1.tgz"  # the last results: seconds a job and its training seconds
    with tarfile.open(v1, "w:gz") as t:
        for name, rec in {"train-a": {"seconds": 90.0, "result": {"train_s": 70.0, "val": {}}}, "train-b": {"seconds": 110.0, "result": {"train_s": 80.0, "val": {}}},
                          "train-c": {"seconds": 50.0, "result": {"train_s": 40.0}}, "ref": {"seconds": 20.0, "result": {}}}.items():
            data = json.dumps(rec | {"job": {"id": name, "kind": name.split("-")[0]}}).encode()
            info = tarfile.TarInfo(f"results/{name}.json")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    est = G.v1_scaled(v1)  # train (with a validation split): median training 75 s, median measuring 25 s
    assert est["train"] == pytest.approx(G.TRAIN_SCALE * 75 + G.MEASURE_SCALE * 25) and est["ref"] == pytest.approx(G.MEASURE_SCALE * 20)
    assert est["seq"] == pytest.approx(3 * (G.TRAIN_SCALE * 75 + G.MEASURE_SCALE * 25 * 2 / 3))
    assert G.v1_scaled(tmp_path / "absent.tgz") == G.DEFAULT_EST_V2
    per, src = G.per_job_seconds({"a-v2": {"job": {"id": "a-v2", "kind": "train"}, "seconds": 30.0},
                                  "b-v2": {"job": {"id": "b-v2", "kind": "train"}, "seconds": 50.0},
                                  "c-v1": {"job": {"id": "c-v1", "kind": "train"}, "seconds": 999.0}}, "v2")
    assert per["train"] == 40.0 and per["ref"] == pytest.approx(G.v1_scaled()["ref"]) and "median of 2" in src


def test_kasa_authors_keeps_the_weights_the_authors_do_not_truncate(tmp_path):
    from safetensors.torch import load_file

    from bench.eval import folders as F
    from bench.eval.jobs2 import kasa_authors

    class Ctx:
        device = "cpu"

    out = kasa_authors(Ctx(), TINY, tmp_path, 8, "all", 0)
    orig = {k: v for f in F.weight_files(TINY) for k, v in load_file(str(f)).items()}
    res = {k: v for f in F.weight_files(out) for k, v in load_file(str(f)).items()}
    mf = json.loads((out / "surgeon.json").read_text())
    assert "authors" in mf["eval_methods_note"]
    for mod, (o, i) in F.target_shapes(TINY, "all").items():
        same = bool((res[mod + ".weight"] == orig[mod + ".weight"]).all())
        assert same == (i > o), mod  # k, v, down (in > out: in − r ≥ out components kept) untouched; q, o, gate, up truncated


def test_tiny_run_resumes_from_the_archive_and_reports(tmp_path):
    from bench import eval_methods as em

    arch, out = tmp_path / "archive.jsonl", tmp_path / "report"
    base = ["--tiny", "--arms", "lora", "nusa", "--archive", str(arch), "--out", str(out)]
    run = ["run", *base, "--workers", "0", "--work", str(tmp_path / "work"), "--budget", "900"]
    first = em.main([*run, "--results", str(tmp_path / "r1"), "--export", str(tmp_path / "new1.jsonl")])
    n_all = sum(G.planned(_tiny(["lora", "nusa"])).values())
    assert len(first["new"]) == n_all == 1 + 2 * (2 * 2 + 1) + 2 + 1  # ref, 2 arms × (2 lrs × 2 seeds + 1 held out), 2 sequences, latency
    lat = A.load(tmp_path / "new1.jsonl")["latency-v2-tiny"]["result"]["batches"]
    assert set(lat) == {"1", "3"} and all(v["moe_per_token"]["best_s"] > 0 and v["same_tokens_cached_vs_per_step"] for v in lat.values())
    assert A.fold(arch, [tmp_path / "new1.jsonl"]) == (n_all, 0) and A.fold(arch, [tmp_path / "r1"]) == (0, n_all)
    again = em.main([*run, "--results", str(tmp_path / "r2")])  # a fresh machine: only the archive says what is done
    assert again["new"] == [] and again["invocation"]["started"] == 0
    recs = A.load(arch)
    drop = G.train_id("nusa", "qv", 1e-2, 1, "v2-tiny")
    arch.write_text("".join(json.dumps(r) + "\n" for k, r in recs.items() if k != drop))
    third = em.main([*run, "--results", str(tmp_path / "r3")])
    assert third["new"] == [drop]
    md = out.with_suffix(".md").read_text()
    assert "## The papers' claims" in md and "## Forgetting at matched accuracy" in md and "## Plan to finish" in md
    assert "| nusa | 1 |" in md and out.with_suffix(".png").stat().st_size > 10_000
    out.with_suffix(".md").unlink()
    A.fold(arch, [tmp_path / "r3"])
    em.main(["report", *base])  # from the archive alone
    assert out.with_suffix(".md").read_text().startswith("# Do the methods do what their papers claim? (protocol v2")


def _tiny(arms):
    from bench.eval.cli2 import settings2

    return settings2(True, arms, calibrate=False)


def test_an_empty_archive_reports_what_is_missing(tmp_path):
    from bench.eval.cli2 import settings2
    from bench.eval.report2 import write

    s = settings2(False, calibrate=False)
    md = write(s, {}, tmp_path / "r")["md"]
    need = 2 * len(s["grid"]) * len(s["select_seeds"]) + 1  # MiLoRA's and LoRA's grids, and the untrained reference
    assert f"**MiLoRA** (all-linear) — *adapting the minor singular components learns as well as LoRA while forgetting less*: " \
           f"**not yet measured: {need} runs missing**" in md
    assert "| lora | all-linear | 16 | 3 of 3 | – |" in md and "| moe | q/v | 16 | 5 of 5 | – |" in md and "Sequence runs missing: 9 of 9" in md
    assert f"Archive: 0 of {sum(G.planned(s).values())} planned jobs finished" in md


def test_the_forgetting_data_is_large_varied_and_self_consistent():
    from bench.eval.measure2 import general_docs, keyword_hit, probes

    ps = probes()
    assert len(ps) >= 200 and len({q for q, _, _ in ps}) == len(ps)
    assert all(keyword_hit(ans, keys) for _, keys, ans in ps)  # each reference answer passes its own keyword check
    assert not keyword_hit("I do not know.", ("paris",)) and keyword_hit("It is Paris, of course.", ("paris",))
    docs = general_docs()
    assert len({d["source"] for d in docs}) == 3 and len(docs) >= 40
    assert 200_000 < sum(len(d["text"]) for d in docs) < 400_000  # ≈ 61k SmolLM2 tokens; the file stays under 400 KB


def _synthetic(s: dict, curves: dict, heldout: dict, items=300, windows=60) -> dict:
    """Archive records with known numbers: CURVES {arm: [(val/test accuracy, forgetting) per grid lr]},
    HELDOUT {arm: (accuracy, forgetting)} at the arm's best lr; accuracy as exact shares of correct items."""
    rng = np.random.default_rng(0)
    tag, tasks = s["tag"], s["tasks"]

    def res(acc, fg, seed):
        k = round(acc * items)
        bits = "".join(rng.permutation(list("1" * k + "0" * (items - k))))
        test = {t: {"acc": acc, "loss": 1.0, "n": items, "bits": bits} for t in tasks}
        return {"test": test, "val": {t: {"acc": acc, "loss": 1.0 - acc} for t in tasks}, "final_train_loss": 0.5,
                "gen_nll": list(fg + 0.01 * rng.standard_normal(windows)), "chat_nll": [fg] * 4, "probe_bits": "1100"}

    done = {f"ref-{tag}": {"job": {"id": f"ref-{tag}", "kind": "ref"}, "result": res(0.0, 0.0, 0) | {"gen_nll": [0.0] * windows, "chat_nll": [0.0] * 4}}}
    for arm, pts in curves.items():
        for lr, (acc, fg) in zip(s["grid"], pts):
            for seed in s["select_seeds"]:
                j = {"id": G.train_id(arm, "all", lr, seed, tag), "kind": "train", "method": arm, "targets": "all", "lr": lr, "seed": seed, "select": True}
                done[j["id"]] = {"job": j, "result": res(acc, fg, seed), "seconds": 100.0}
        best = G.chosen_lr(s, done, arm, "all")
        for seed in G.heldout(s, arm):
            acc, fg = heldout[arm]
            j = {"id": G.train_id(arm, "all", best, seed, tag), "kind": "train", "method": arm, "targets": "all", "lr": best, "seed": seed, "select": False}
            done[j["id"]] = {"job": j, "result": res(acc, fg, seed), "seconds": 100.0}
    return done


def test_the_report_decides_the_claims_from_known_numbers(tmp_path):
    from bench.eval.cli2 import settings2
    from bench.eval.report2 import write

    s = settings2(False, ["lora", "pissa", "milora"], calibrate=False) | {"grid": [1e-4, 1e-3, 1e-2], "targets": ["all"], "tasks": ["add"]}
    curve = [(0.3, 0.2), (0.6, 0.6), (0.9, 1.2)]
    done = _synthetic(s, {"lora": curve, "pissa": [(a + 0.05, f * 1.5) for a, f in curve], "milora": [(a, f / 2) for a, f in curve]},
                      {"lora": (0.8, 1.0), "pissa": (0.9, 1.0), "milora": (0.8, 0.5)})
    md = write(s, done, tmp_path / "r")["md"]
    claim = next(line for line in md.splitlines() if line.startswith("- **MiLoRA** (all-linear)"))
    assert "**reproduced (less forgetting at matched accuracy)**" in claim
    level = float(claim.split("matched test accuracy ")[1].split(",")[0])  # the common level: the lowest top, 0.9
    diff = float(claim.split("Δ log-ppl MiLoRA − LoRA ")[1].split(" ")[0])
    assert level == pytest.approx(0.9) and diff == pytest.approx(-0.6, abs=0.01)  # 0.6 vs 1.2 at accuracy 0.9 (window noise 0.01)
    pissa = next(line for line in md.splitlines() if line.startswith("- **PiSSA** (all-linear)"))
    assert "**reproduced**" in pissa and "held-out test accuracy pissa − LoRA +0.100" in pissa
    assert "| pissa − lora | 1.0e-3 | +0.050" in md  # PiSSA's own setting: equal lr
    assert "| lora | all-linear | 1.0e-2 (grid edge) | 3 |" in md  # the best lr is the grid's last point: said
    assert "Archive: 1 + " not in md and "lora | all-linear | 0 | 0 of 3 | 1.0e-2" in md


def test_the_per_token_router_routes_every_token_and_restores_the_model(tmp_path):
    import torch

    from bench.eval import folders as F
    from bench.eval.per_token import PerToken, token_gates
    from surgeon.runtime import load_split

    sm = load_split(F.split_folder(TINY, tmp_path / "moe", "moe", 8, "all", 0, "cpu"), dtype=torch.float32, device="cpu", trainable=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in sm.modules.values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
    model, ids = sm.model.eval(), torch.randint(0, 100, (3, 7), generator=g)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with PerToken(model):
            per_token = model(input_ids=ids).logits
            router = next(iter(model.surgeon_routing.routers.values()))
            gates = router.gates  # (B, T, E): this forward's last routing of that block
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and not torch.allclose(before, per_token)
    assert gates.shape == (3, 7, router.n_experts) and bool(((gates > 0).sum(-1) == router.k).all())
    h = torch.randn(2, 5, router.weight.shape[1], generator=g)
    one = token_gates(router, h[:, 2:3])  # a token's gates do not depend on its neighbours
    assert torch.allclose(one[:, 0], token_gates(router, h)[:, 2])


def _greedy(model, ids, max_new):
    import torch

    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=1)[0, len(ids):].tolist()


@pytest.mark.parametrize("arm", ["plain", "moe"])
def test_forced_answers_are_exactly_the_generated_ones(tmp_path, arm):
    """The teacher-forced pass (bench/eval/measure2.py, answers) settles a row only when greedy decoding
    would write exactly its completion and stop: the answers, hence the bits, equal generating every row,
    for rows whose completion is what the model writes before it stops (settled), a prefix of it (the model
    writes on: generated) or the task's (generated); the mixture pools only the prompt in both (its routers' prompt
    mask). The model's eos is made the token its greedy answers emit most (a random tiny model rarely
    emits its own), so that answers end before max_new, as a trained model's do."""
    import collections

    import torch
    from transformers import AutoModelForCausalLM

    from bench.eval.measure2 import Evaluator2
    from surgeon.commands.split import SplitOptions, split
    from surgeon.runtime import load_split

    data = T.make_tasks(4, 2, 36, 0, ("add", "lookup"), "v2")
    ev = Evaluator2(TINY, "cpu", data, 64, gen_batch=8, n_probes=2, gen_tokens=512)
    assert not ev.force  # off on the CPU by default (no gain there); the CUDA path, tested here on the CPU
    ev.force = True
    if arm == "plain":
        model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    else:
        split(str(TINY), tmp_path / "moe", SplitOptions(method="moe", rank=4))
        sm = load_split(tmp_path / "moe", trainable=True)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in sm.trainable_parameters():  # experts and routers given weight: the gates change the answers
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        model = sm.model.eval()
    settled = 0
    for task in ("add", "lookup"):
        rows, max_new = data[task]["test"], ev.max_new[task]
        raw = [_greedy(model, ev._prompt_ids(x["prompt"]), max_new) for x in rows]
        model.generation_config.eos_token_id = collections.Counter(t for r in raw for t in r[1:3]).most_common(1)[0][0]
        eos = model.generation_config.eos_token_id
        raw = [_greedy(model, ev._prompt_ids(x["prompt"]), max_new) for x in rows]
        # every third row: the model's answer up to its stop (settled); every third: a strict prefix of it, after
        # which the model writes on (must be generated); the rest: the task's answer
        own = {i: r[:-1] for i, r in enumerate(raw) if i % 3 == 0 and r[-1] == eos and len(r) >= 2}
        own |= {i: r[: len(r) // 2] for i, r in enumerate(raw) if i % 3 == 1 and len(r) >= 3}
        mixed = [dict(x, completion=ev.tok.decode(own[i])) if i in own else x for i, x in enumerate(rows)]
        ans, forced = ev.answers(model, mixed, max_new)
        assert ans == ev.generate(model, [x["prompt"] for x in mixed], max_new)
        settled += forced
    model.generation_config.repetition_penalty = 1.3  # generate would penalise what a plain argmax keeps: nothing is settled
    rows, max_new = data["add"]["test"], ev.max_new["add"]
    ans, forced = ev.answers(model, rows, max_new)
    assert forced == 0 and ans == ev.generate(model, [x["prompt"] for x in rows], max_new)
    assert settled >= 3  # the forced pass does settle rows (and the prefixes were generated: the answers are equal)
