"""The model card (README.md) of an output folder, built with huggingface_hub's ModelCard."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

This checkpoint was rewritten by [surgeon](https://pypi.org/project/surgeon/) with the **{{ method }}** method
(rank {{ rank }}, alpha {{ alpha }}): {{ summary }}.

Source model: `{{ source }}`{{ revision }}. Targets: {{ n_layers }} linear weights ({{ targets }}).
Solver: {{ solvers }}. Worst reconstruction error ‖W − (W_res + s·BA)‖/‖W‖ over all layers: {{ worst }}.
Fraction of spectral energy (Σσ²) held by the trainable factors, mean over layers: {{ factor_energy }}.

## How to load

The folder is a transformers checkpoint of the frozen residual plus a PEFT LoRA adapter of the
trainable factors. Together they reproduce the source model:

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{{ repo }}")
model = PeftModel.from_pretrained(base, "{{ repo }}")  # residual + factors == the source model
```

Train the adapter with any PEFT trainer (or `surgeon train`), then merge with
`surgeon absorb {{ repo }} --out merged` or PEFT's `merge_and_unload()`.
`surgeon.json` records every layer's spectrum energy, solver and reconstruction error.
"""


def build_card(manifest: dict, repo: str = ".") -> ModelCard:
    src = manifest["source"]
    method = manifest["method"]
    data = ModelCardData(
        base_model=src.get("hub_id"),
        library_name="peft" if manifest.get("peft_adapter") else "transformers",
        tags=["surgeon", method, "svd", *(["lora"] if manifest.get("peft_adapter") else [])],
        license=manifest.get("license"),
    )
    s = manifest["summary"]
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=f"{src.get('hub_id') or Path(src['model']).name} — {method} split, rank {manifest['rank']}",
        method=method,
        rank=manifest["rank"],
        alpha=manifest["alpha"],
        summary=manifest.get("method_summary", ""),
        source=src.get("hub_id") or src["model"],
        revision=f" (revision `{src['revision']}`)" if src.get("revision") else "",
        n_layers=s["layers"],
        targets=", ".join(manifest["target_modules"][:12]) + (" …" if len(manifest["target_modules"]) > 12 else ""),
        solvers=", ".join(f"{k} × {v}" for k, v in s["solvers"].items()),
        worst=f"{s['worst_reconstruction_error']:.2e}",
        factor_energy=f"{s['mean_factor_energy']:.3g}",
        repo=repo,
    )
