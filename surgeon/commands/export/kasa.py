"""A KaSA split as PEFT's own KaSA adapter, for the ORIGINAL base model.

    surgeon export SPLIT_DIR --to kasa --out DIR

PEFT 0.21 (peft/tuners/lora/variants.py, KasaLinearVariant) truncates the base weight itself when
the adapter is attached: a float32 full SVD of each targeted weight, dropping the r smallest of
k = min(out, in) components, which is surgeon's truncation up to float32 rounding. So this adapter
must be loaded on the ORIGINAL model (the source recorded in surgeon.json), never on the split
folder: there PEFT would drop another r components. Layout (checked against a PEFT save):
`base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r), `...lora_diag`
(r,), and `"kasa_config": {"beta", "gamma"}` in adapter_config.json. PEFT's KaSA accepts
nn.Linear only (no fan_in_fan_out), so Conv1D splits (GPT-2) export with `--to lora` instead.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from surgeon.commands.export.peft import adapter_config, lora_key, publish_adapter, split_plain_targets, split_task_type
from surgeon.errors import UsageError
from surgeon.format.readlock import reads
from surgeon.format.splitdir import PEFT_PREFIX
from surgeon.methods.folder import SplitDir
from surgeon.model.check import check_output


@reads("split_dir")
def export_kasa(split_dir: Path, out: Path, overwrite: bool = False) -> dict:
    sd = SplitDir(split_dir)
    if sd.method.name != "kasa":
        raise UsageError(f"--to kasa needs a KaSA split; {sd.path} was split with {sd.method.name}. Use --to lora.")
    if sd.manifest.get("calibration"):
        raise UsageError("--to kasa: PEFT truncates the plain SVD's minor components of the original weights itself, but this split truncated calibrated ones (--calibrate); use --to lora (a LoRA on the truncated base).")
    if sd.manifest.get("transposed", False):
        raise UsageError("PEFT's KaSA does not support Conv1D (fan_in_fan_out) layers such as GPT-2's; use --to lora (a LoRA on the truncated base).")
    moved = split_plain_targets(sd)[1]
    if moved:
        raise UsageError(f"PEFT's KaSA cannot target {moved[0].removesuffix('.weight')}: its MoE conversion moves that name onto the "
                         "fused experts, where KaSA does not run (ParamWrapper); use --to lora (a LoRA on the truncated base).")
    cfg = sd.cfg
    tensors = {}
    with safe_open(sd.factors_file, "pt") as cur:
        for module in sd.manifest["layers"]:
            f = sd.factors(cur, module)
            tensors[lora_key(module, "lora_A")] = f["lora_A"]  # (r, in)
            tensors[lora_key(module, "lora_B")] = f["lora_B"]  # (out, r)
            tensors[f"{PEFT_PREFIX}{module}.lora_diag"] = f["lora_diag"]  # (r,)
    src = sd.manifest["source"]
    conf = adapter_config(
        r=cfg.rank,
        alpha=cfg.alpha,
        target_modules=sd.manifest["target_modules"],
        use_rslora=cfg.use_rslora,
        base_model=src.get("hub_id") or str(Path(src["files"][0]["path"]).parent),
        revision=src.get("revision") if src.get("hub_id") else None,
        task_type=split_task_type(sd.path),
        rank_pattern=sd.manifest.get("rank_pattern"), alpha_pattern=sd.manifest.get("alpha_pattern"),
    )
    conf["kasa_config"] = {"beta": cfg.kasa_beta, "gamma": cfg.kasa_gamma}
    return publish_adapter(out, {"op": "export", "split": str(sd.path.resolve()), "to": "kasa", **sd.identity()}, overwrite, sd.inputs(), conf, tensors,
                           check=lambda folder: check_output(folder, sd.manifest, sd.path))
