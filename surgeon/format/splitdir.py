"""The split-folder format, in one place: file names, factor keys, and reading the manifest.

    from surgeon.format.splitdir import MANIFEST, factor_key, read_manifest
    m = read_manifest(folder)               # surgeon.json, validated

surgeon.methods.folder.SplitDir binds a folder of this format to the method that wrote it.

split writes this format; absorb, export, the runtime, the trainer, `surgeon spectra` and `surgeon
push` read it through here, so a folder that is not a complete split is refused in one line naming
the problem, wherever it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.errors import JSON_READ_ERRORS, SplitDirError

MANIFEST = "surgeon.json"  # what was done, with which settings, per layer: deterministic, so resumed runs match
RUN_LOG = "surgeon.run.json"  # this run's timings, resumed tensors and ranks: differs from run to run, stays local
INIT_FACTORS = "surgeon.init.safetensors"  # the untrained factors, kept for absorb and export
SPECTRA = "surgeon.spectra.safetensors"  # every targeted weight's singular values
FACTORS = "surgeon.factors.safetensors"  # factors of methods that are not LoRA-shaped
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's files, for LoRA-shaped methods
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
PEFT_PREFIX = "base_model.model."
OPERATIONS = ("split", "absorb", "export", "train")


def lora_key(module: str, factor: str) -> str:
    """PEFT's key of a saved LoRA factor (peft/utils/save_and_load.py); factor: "lora_A" or "lora_B"."""
    return f"{PEFT_PREFIX}{module}.{factor}.weight"


def factor_key(lora: bool, module: str, fname: str) -> str:
    """Where a factor lives in the factor file: PEFT's key for LoRA-shaped methods, else "<module>.<factor>"."""
    return lora_key(module, fname) if lora else f"{module}.{fname}"


def read_manifest(folder: Path, what: str = "a folder written by surgeon") -> dict:
    """surgeon.json of `folder` as a dict; SplitDirError naming the problem if it is missing or damaged."""
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SplitDirError(f"{folder} is not a surgeon split or output folder (no {MANIFEST}); give {what}.") from None
    except JSON_READ_ERRORS as e:
        raise SplitDirError(f"{path} is damaged ({e}); re-run the command that wrote {folder}.") from None
    if not isinstance(m, dict) or m.get("operation") not in OPERATIONS or "surgeon_version" not in m:
        raise SplitDirError(f"{path} is not a surgeon manifest (no operation/surgeon_version); give {what}.")
    return m


def is_surgeon_output(folder: Path) -> bool:
    """True when `folder` holds a manifest that surgeon wrote (what --overwrite may replace)."""
    try:
        read_manifest(folder)
    except SplitDirError:
        return False
    return True


def factor_hashes(path: Path) -> dict[str, str]:
    """Content hash of every tensor of a factor file, by key (sorted): what split records of the
    untrained factors (surgeon.json "factor_hashes") and SplitDir checks."""
    from safetensors import safe_open

    from surgeon.format.reader import tensor_hash

    with safe_open(path, "pt") as f:
        return {k: tensor_hash(f.get_tensor(k)) for k in sorted(f.keys())}


