"""The model card (README.md) of an output folder, built from its manifest (surgeon.json).

    python -c "import json; from surgeon.format.card import build_card; print(build_card(json.load(open('out/surgeon.json'))))"

Metadata follows the Hub's model-card spec (https://huggingface.co/docs/hub/model-cards):
`base_model` is the source's Hub id (omitted for a local source: the Hub rejects paths there),
`library_name` is peft when the folder holds a PEFT adapter, else transformers, `tags` carry
"surgeon" and the method, and `license` (with `license_name`/`license_link` for "other") is copied
from the source's own card when it had one.

The load snippet names the model through one line, `repo = "..."`: the local folder when written,
replaced by the Hub id when `surgeon push` uploads the card (`for_repo`), so that the snippet on the
Hub page runs as printed. The local file is never rewritten.
"""

from __future__ import annotations

import math
import re

from huggingface_hub import ModelCard, ModelCardData

REPO_LINE = re.compile(r'^repo = "[^"\n]*"$', re.M)

SPLIT = """
# {title}

This checkpoint was rewritten by [surgeon](https://pypi.org/project/surgeon/) with the **{method}** method
(rank {rank}, alpha {alpha:g}, scaling {scale:g}): {summary}.

- Source model: `{source}`{revision}{license}
- Targets: {n_layers} linear weights ({targets})
- Solver: {solvers}; worst error of the written weights against the original, ‖W − (W_res + s·BA)‖/‖W‖ over all layers: {worst:.2e}
  ({meaning})
- Spectra: {spectra}
- The trainable factors hold {factor_energy:.3g}% of each weight's spectral energy on average.{calibration}

`surgeon.json` records every layer's solver, factor singular values and reconstruction error; plot the
spectra with `surgeon spectra DIR` (stored in `surgeon.spectra.safetensors` when split with `--spectra`).

## How to load

{load_text}

```python
{snippet}
```

{after}
"""

LORA_LOAD = """The folder is a transformers checkpoint of the frozen residual plus a PEFT LoRA adapter of the
trainable factors (adapter_config.json, adapter_model.safetensors). transformers finds the adapter and,
with `peft` installed, attaches it, so the model loads as the source model:"""

LORA_SNIPPET = """from transformers import {cls}

repo = "{repo}"
model = {cls}.from_pretrained(repo)  # W_res + s·B·A: the source model, up to the error above"""

LORA_AFTER = """The adapter is already attached: do not wrap this model in `PeftModel.from_pretrained(model, repo)`,
which would inject it a second time. For a `PeftModel` (PEFT-aware trainers), attach the adapter to the
residual loaded without it: `PeftModel.from_pretrained(surgeon.runtime.load_residual_model(folder), folder)`.
Train the adapter with any PEFT-aware trainer (or `surgeon train`). To merge it back into plain
weights, download the folder (`hf download REPO --local-dir split`) and run `surgeon absorb split --out merged`."""

FACTORS_LOAD = """The folder is a transformers checkpoint of the frozen residual; the method's factors are in
`surgeon.factors.safetensors` (keys `<module>.<factor>`), and surgeon's runtime puts them back:"""

FACTORS_SNIPPET = """import os

from huggingface_hub import snapshot_download
from surgeon.runtime import load_split

repo = "{repo}"
model = load_split(repo if os.path.isdir(repo) else snapshot_download(repo)).model  # residual + factors"""

ABSORB = """
# {title}

Plain weights with the source's tensor names: a **{method}** split of `{source}`{revision}, its factors
merged back by [surgeon](https://pypi.org/project/surgeon/) (`surgeon absorb`, base: {base};
{changed} of {layers} layers changed).{license}

## How to load

```python
from transformers import AutoModelForCausalLM

repo = "{repo}"
model = AutoModelForCausalLM.from_pretrained(repo)
```
"""


def _license(src: dict) -> str | None:
    lic = src.get("license")
    if lic == "other" and src.get("license_name"):
        return f"{src['license_name']} ({src.get('license_link', 'see the source card')})"
    return lic


def card_data(manifest: dict) -> ModelCardData:
    src = manifest.get("source", {})
    method = manifest["method"]
    merged = manifest.get("operation") == "absorb"
    peft = bool(manifest.get("peft_adapter")) and not merged
    tags = ["surgeon", method, "svd", *(["lora"] if peft else []), *(["merged"] if merged else [])]
    extra = {k: src[k] for k in ("license_name", "license_link") if src.get(k)}
    return ModelCardData(
        base_model=src.get("hub_id"),
        library_name="peft" if peft else "transformers",
        tags=tags,
        license=src.get("license"),
        **extra,
    )


def _spectra(layers: dict) -> str:
    if not layers:
        return "no layers"
    if any(lay.get("sigma_max") is None for lay in layers.values()):
        return "not stored (split with --spectra to keep them; `surgeon spectra DIR` computes them from the source)"
    top = max(lay["sigma_max"] for lay in layers.values())
    bottom = min(lay["sigma_min"] for lay in layers.values())
    lo = min(lay["factor_sigma"][1] for lay in layers.values())
    hi = max(lay["factor_sigma"][0] for lay in layers.values())
    ratios = [lay["sigma_max"] / lay["sigma_min"] for lay in layers.values() if lay["sigma_min"] > 0]
    span = f", up to {math.log10(max(ratios)):.1f} decades within a layer" if ratios else ""
    return f"σ from {bottom:.3g} to {top:.3g} over all layers{span}; the trainable band spans σ ∈ [{lo:.3g}, {hi:.3g}]"


def _calibration(c: dict | None) -> str:
    """One card line for a --calibrate split ("" otherwise)."""
    if not c:
        return ""
    share = f"; at most {100 * c['output_share_max']:.3g}% of a layer's output on that text is carried by the {c['carried']}" if c.get("output_share_max") is not None else ""
    return (f"\n- Calibrated ({c['mode']}, CorDA/ASVD-style) on {c['tokens']} tokens of `{c['source']}` "
            f"(sha256 {c['sha256'][:12]}…){share}.")


def build_card(manifest: dict, repo: str = ".") -> ModelCard:
    """The card for a split (`operation` "split") or merged (`operation` "absorb") folder."""
    src = manifest.get("source", {})
    name = src.get("hub_id") or src.get("model") or "model"
    revision = f" (revision `{src['revision']}`)" if src.get("revision") else ""
    if manifest.get("operation") == "absorb":
        body = ABSORB.format(
            title=f"{name} — {manifest['method']} split, merged",
            method=manifest["method"],
            source=name,
            revision=revision,
            base=manifest.get("base", "?"),
            changed=manifest.get("layers_changed", "?"),
            layers=manifest.get("layers", "?"),
            license=f" License: {_license(src)}, as the source." if _license(src) else "",
            repo=repo,
        )
    else:
        s = manifest["summary"]
        peft = bool(manifest.get("peft_adapter"))
        mods = manifest.get("target_modules", [])
        body = SPLIT.format(
            title=f"{name} — {manifest['method']} split, rank {manifest['rank']}",
            method=manifest["method"],
            rank=manifest["rank"],
            alpha=manifest["alpha"],
            scale=manifest.get("scale", manifest["alpha"] / manifest["rank"]),
            summary=manifest.get("method_summary", ""),
            source=name,
            revision=revision,
            license=f"; license: {_license(src)}, as the source" if _license(src) else "",
            n_layers=s["layers"],
            targets=", ".join(mods[:12]) + (" …" if len(mods) > 12 else ""),
            solvers=", ".join(f"{k} × {v}" for k, v in s["solvers"].items()),
            worst=s["worst_reconstruction_error"],
            meaning=s.get("error_meaning", "measured against the original weights"),
            spectra=_spectra(manifest.get("layers", {})),
            factor_energy=100 * s["mean_factor_energy"],
            calibration=_calibration(manifest.get("calibration")),
            load_text=LORA_LOAD if peft else FACTORS_LOAD,
            snippet=(LORA_SNIPPET if peft else FACTORS_SNIPPET).format(repo=repo, cls=manifest.get("load_class") or "AutoModelForCausalLM"),
            after=LORA_AFTER if peft else "Merge the trained factors with `surgeon absorb DIR --out merged`.",
        )
    return ModelCard(f"---\n{card_data(manifest).to_yaml()}\n---\n{body}")


def for_repo(text: str, repo_id: str) -> str:
    """The card text with its snippet's `repo = "..."` line pointing at `repo_id` (unchanged if absent)."""
    return REPO_LINE.sub(f'repo = "{repo_id}"', text, count=1)
