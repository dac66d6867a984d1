"""4-bit splits on CUDA: transformers + vanilla PEFT load them, against fp32 and plain NF4; train; absorb.

    PYTHONPATH=$PWD:$PWD/plugins/surgeon-train:$PWD/.carry/bnb python bench/quant_gpu.py --out $OUT \
        tiny=fixtures/tiny-llama smol-random=random smol=/tmp/smol

Each NAME=PATH is a model (an HF folder; "random" builds a SmolLM2-shaped Llama with 4 blocks and random
weights; a missing path is recorded and skipped). Per model, on cuda:0:
  1. `surgeon split --dry-run` and `surgeon split --method pissa --rank 16 --quantize nf4` (every linear
     layer of the blocks; the split itself runs on the GPU);
  2. logits on fixed ids of: the fp32 original; plain NF4 (transformers quantizing the original in
     memory, BitsAndBytesConfig nf4, compute float32); the split loaded by transformers'
     `from_pretrained` (pre-quantized bnb) + `PeftModel.from_pretrained`; the split in surgeon's runtime;
  3. the pre-quantized round trip of plain NF4 (save_pretrained, from_pretrained) against in memory: the
     CPU defect of transformers 5.x + bitsandbytes 0.50.2, looked for on CUDA;
  4. 5 AdamW steps of PEFT on the 4-bit transformers model (QLoRA path), 5 steps of `surgeon train`;
  5. absorb of the untrained split (must be the source bit for bit) and of the trained one (default base
     original and --base residual), each against the trained runtime's logits.
Writes quant_gpu.json to --out (and prints it); errors of one step are recorded, the rest goes on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

import torch

IDS = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
DEV = "cuda:0"  # --device cpu runs the same steps on the CPU (a smoke test of this script; the 4-bit transformers path is wrong there)
DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "tiny_instruct.jsonl"


def build_random(d: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    tiny = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"
    for f in ("tokenizer.json", "tokenizer_config.json"):  # ids < 320: valid in this vocabulary too
        shutil.copy(tiny / f, d / f)
    return d


def errs(x: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (x.float().cpu() - ref.float().cpu()).abs()
    return {"max": float(d.max()), "mean": float(d.mean()), "top1_agree": float((x.cpu().argmax(-1) == ref.cpu().argmax(-1)).float().mean())}


def fwd(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS.to(next(model.parameters()).device)).logits.float().cpu()


def step(rec: dict, name: str, fn):
    t0 = time.perf_counter()
    try:
        rec[name] = fn()
    except Exception as e:  # keep going: one broken step must not hide the others
        rec[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
    if isinstance(rec[name], dict):
        rec[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(name, json.dumps(rec[name])[:400], flush=True)


def peft_4bit(split_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(split_dir, device_map=DEV), split_dir)


def qlora_steps(split_dir: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(split_dir, device_map=DEV), split_dir, is_trainable=True)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = IDS.to(DEV)
    losses = []
    for _ in range(5):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return {"losses": losses, "trainable": sum(p.numel() for p in params), "peak_gpu_bytes": torch.cuda.max_memory_allocated() if DEV != "cpu" else None}


def one_model(name: str, path: str, work: Path) -> dict:
    from surgeon_train import TrainOptions, train_files
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from surgeon.commands.absorb import AbsorbOptions, absorb
    from surgeon.commands.plan import dry_run
    from surgeon.commands.split import SplitOptions, split
    from surgeon.runtime import load_split

    rec: dict = {"model": path}
    src = build_random(work / f"{name}-src") if path == "random" else Path(path)
    if not src.exists():
        return rec | {"skipped": f"{src} does not exist"}
    opts = SplitOptions(method="pissa", rank=16, quantize="nf4", device=DEV, spectra=False)
    q = work / f"{name}-q"
    step(rec, "dry_run", lambda: {k: v for k, v in dry_run(str(src), q, opts).items() if k in ("layers", "trainable_parameters", "output_bytes", "estimated_seconds", "device")})

    def do_split():
        m = split(str(src), q, opts)
        return {"layers": len(m["layers"]), "split_seconds": m["run"]["seconds"], "peak_gpu_bytes": m["run"]["peak_gpu_bytes"], **{k: m["quantization"][k] for k in ("mean_quant_error", "mean_quant_error_plain", "layers_better_than_plain")}}

    step(rec, "split", do_split)
    ref = fwd(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(DEV))
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    plain = {}

    def plain_nf4():
        m = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_cfg, device_map=DEV)
        plain["logits"] = fwd(m)
        m.save_pretrained(work / f"{name}-plain4")
        back = fwd(AutoModelForCausalLM.from_pretrained(work / f"{name}-plain4", device_map=DEV))
        return {"vs_fp32": errs(plain["logits"], ref), "prequantized_roundtrip_vs_in_memory": errs(back, plain["logits"])}

    step(rec, "plain_nf4_transformers", plain_nf4)
    peft_logits = {}

    def via_peft():
        peft_logits["x"] = fwd(peft_4bit(q))
        return {"vs_fp32": errs(peft_logits["x"], ref)}

    step(rec, "split_transformers_peft", via_peft)
    step(rec, "split_surgeon_runtime", lambda: (lambda x: {"vs_fp32": errs(x, ref), "vs_transformers_peft": errs(x, peft_logits["x"]) if "x" in peft_logits else None})(fwd(load_split(q, trainable=False, device=DEV).model)))
    step(rec, "qlora_peft_5_steps", lambda: qlora_steps(q))
    t = work / f"{name}-trained"
    def train5():
        s = train_files(q, DATA, t, TrainOptions(steps=5, lr=1e-3, seq_len=64, batch_size=4, device=DEV), eval_data=DATA)
        return {k: s[k] for k in ("final_loss", "eval_loss", "tokens_per_s_this_run")}

    step(rec, "surgeon_train_5_steps", train5)

    def absorbs():
        from safetensors.torch import load_file

        absorb(q, work / f"{name}-a0")
        def tensors(d):
            return {k: v for f in sorted(d.glob("model*.safetensors")) for k, v in load_file(f).items()}

        a, b = tensors(src), tensors(work / f"{name}-a0")
        out = {"untrained_original_bit_for_bit": set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)}
        want = fwd(load_split(t, trainable=False, device=DEV).model)
        for base in ("original", "residual"):  # original: W + s(B'A' - B0A0), free of the 4-bit error; residual: deq(Q) + s B'A'
            absorb(t, work / f"{name}-{base}", AbsorbOptions(base=base))
            out[f"trained_{base}_vs_runtime"] = errs(fwd(AutoModelForCausalLM.from_pretrained(work / f"{name}-{base}", dtype=torch.float32).to(DEV)), want)
        return out

    step(rec, "absorb", absorbs)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="NAME=PATH; PATH 'random' builds a SmolLM2-shaped random model")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quant_gpu"))
    ap.add_argument("--device", default="cuda:0")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    import bitsandbytes
    import transformers

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    res = {"torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
           "device": torch.cuda.get_device_name(0) if DEV != "cpu" else "cpu", "models": {}}
    t0 = time.perf_counter()
    for spec in args.models:
        name, _, path = spec.partition("=")
        res["models"][name] = one_model(name, path, args.work)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_gpu.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "models"}))


if __name__ == "__main__":
    main()
