"""Peak host memory of `surgeon check` block by block (the default) against the whole model loaded in
float32 (the path it took before, and still takes for a model the block runner cannot load), on a random
Llama checkpoint of real dimensions, each run in a fresh process.

    python bench/bench_check_memory.py --dir /tmp/chkmem --hidden 4096 --inter 11008 --layers 4 --vocab 32000 --kv 32
    # lines "check streamed: peak RSS …", "check whole: …", then "same numbers: True" (bench/RESULTS.md)

The checkpoint (bf16, as Hub checkpoints are) and a PiSSA r = 8 split of it (the principal solve is the quick one on the CPU) are made once in --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WHOLE = "import surgeon.model.blockrun as b; b.BlockRunner.streamable = lambda self: False; "
RUN = "import sys; from surgeon.cli import run; sys.argv = ['surgeon', 'check', {split!r}, '--tokens', '{tokens}', '--json']; run()"


def make(d: Path, a) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src, out = d / "src", d / "split"
    if not (src / "config.json").exists():
        conf = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                           num_key_value_heads=a.kv, vocab_size=a.vocab, max_position_embeddings=4096, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device("meta"):
            m = LlamaForCausalLM(conf)
        m = m.to_empty(device="cpu").to(torch.bfloat16)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        m.save_pretrained(src, max_shard_size="2GB")
        from make_fixtures import _tokenizer  # the fixtures' byte-level BPE: check tokenizes with the split's tokenizer

        _tokenizer(min(a.vocab, 4096)).save_pretrained(src)
    if not (out / "surgeon.json").exists():
        subprocess.run([sys.executable, "-m", "surgeon", "split", str(src), "--out", str(out), "--method", "pissa", "--rank", "8",
                        "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
    return src, out


def timed(code: str) -> tuple[dict, float, float]:
    """(the check's --json result, the child's own peak RSS in GiB, wall seconds)."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.time() - t0
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(err.read()[-2000:])
        text = out.read()
        return json.loads(text[text.index("{"):]), usage.ru_maxrss / 2**20, wall  # ru_maxrss: KiB


def main() -> None:
    p = argparse.ArgumentParser()
    for k, v in (("hidden", 2048), ("inter", 5632), ("layers", 8), ("vocab", 32000), ("kv", 4), ("tokens", 256)):
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--dir", type=Path, default=Path("/tmp/chkmem"))
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    src, out = make(a.dir, a)
    from surgeon.format.reader import Checkpoint

    numel = sum(i.numel for i in Checkpoint.open(sorted(src.glob("*.safetensors"))).tensors.values())
    print(f"model: hidden {a.hidden}, intermediate {a.inter}, {a.layers} layers, vocab {a.vocab}: {numel / 1e9:.2f} G values, "
          f"{numel * 4 / 2**30:.2f} GiB in float32", flush=True)
    results = {}
    for mode in ("streamed", "whole"):
        code = (WHOLE if mode == "whole" else "") + RUN.format(split=str(out), tokens=a.tokens)
        results[mode], peak, wall = timed(code)
        print(f"check {mode}: peak RSS {peak:.2f} GiB, wall {wall:.1f} s, top-1 {results[mode]['top1_agreement']:.4f}, "
              f"ppl ratio {results[mode]['perplexity_ratio']:.6f}", flush=True)
    print("same numbers:", results["streamed"] == results["whole"])


if __name__ == "__main__":
    main()
