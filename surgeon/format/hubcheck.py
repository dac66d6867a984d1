"""Is an output folder fit for the Hub? Every problem at once, reading only (`surgeon push` refuses
while any remains; `surgeon push --regenerate-card` rewrites the card).

    chk = check_folder("split-dir"); chk.problems, chk.warnings, chk.files

Problems: a shard named by the index missing, a damaged safetensors header, no config.json, a split
without its factors, a file over the Hub's 50 GB, an interrupted run's bookkeeping, no model card or a
card whose metadata does not match surgeon.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.errors import (
    JSON_READ_ERRORS,
    CorruptCheckpointError,
    NotHubReadyError,
    SourceError,
)
from surgeon.format.listing import relist_one
from surgeon.format.reader import read_header
from surgeon.format.readlock import reads
from surgeon.format.splitdir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD,
    FACTORS,
    MANIFEST,
    RUN_LOG,
)

INDEX = "model.safetensors.index.json"
# HfApi.upload_file's docstring in huggingface_hub 2.4: "Upload a local file (up to 50 GB)".
HUB_MAX_FILE = 50 * 10**9


@dataclass
class FolderCheck:
    folder: Path
    files: list[str] = field(default_factory=list)  # what would be uploaded, relative POSIX paths
    problems: list[str] = field(default_factory=list)  # any one blocks the upload
    warnings: list[str] = field(default_factory=list)  # worth knowing, not blocking
    manifest: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


LOCAL_ONLY = {"train_state", RUN_LOG}  # train's resume state, this machine's run log: not part of a model repo


def _files(folder: Path) -> list[str]:
    """Every file under `folder` except hidden ones (.git, .cache, editor droppings) and local state."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.parts[0] not in LOCAL_ONLY:
            out.append(rel.as_posix())
    return out


def _links_to_folders(folder: Path) -> list[str]:
    """Links to folders under `folder` (not followed), but hidden ones and local state."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_symlink() and p.is_dir() and not any(part.startswith(".") for part in rel.parts) and rel.parts[0] not in LOCAL_ONLY:
            out.append(rel.as_posix())
    return out


def _json(path: Path, problems: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text())
    except JSON_READ_ERRORS as e:
        problems.append(f"{path.name} is not valid JSON ({e}).")
        return None


def _check_weights(folder: Path, files: list[str], problems: list[str]) -> None:
    parsed: dict[str, set[str]] = {}

    def header(name: str) -> set[str] | None:
        if name not in parsed:
            try:
                parsed[name] = set(read_header(folder / name)[0])
            except (CorruptCheckpointError, SourceError) as e:
                problems.append(str(e))
                parsed[name] = None  # type: ignore[assignment]
        return parsed[name]

    index = folder / INDEX
    if index.exists():
        idx = _json(index, problems)
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if idx is not None and not isinstance(wmap, dict):
            problems.append(f"{INDEX} has no weight_map.")
        for shard in sorted(set((wmap or {}).values())):
            if not (folder / shard).is_file():
                problems.append(f"{INDEX} lists shard {shard}, which is missing; re-run the command that wrote the folder.")
                continue
            names = header(shard)
            if names is not None:
                lost = sorted(t for t, s in wmap.items() if s == shard and t not in names)
                if lost:
                    problems.append(f"{INDEX} maps {len(lost)} tensors to {shard}, which does not hold them (first: {lost[0]}).")
    elif not (folder / "model.safetensors").is_file():
        problems.append(f"no weights: neither model.safetensors nor {INDEX}.")
    for f in files:  # every other safetensors file too: adapter, factors, spectra, single-file weights
        if f.endswith(".safetensors"):
            header(f)


def _check_card(folder: Path, manifest: dict, problems: list[str], warnings: list[str]) -> None:
    from huggingface_hub.repocard import metadata_load

    fix = "rewrite it from surgeon.json with `surgeon push --regenerate-card` (or fix it by hand)"
    card = folder / CARD
    if not card.is_file():
        problems.append(f"no model card ({CARD}); {fix}.")
        return
    try:
        meta = metadata_load(card)
    except Exception as e:  # yaml errors, a non-dict block, bad encoding
        problems.append(f"{CARD}'s metadata block does not parse ({e}); {fix}.")
        return
    if not meta:
        problems.append(f"{CARD} has no metadata block (--- ... --- at the top); {fix}.")
        return
    src = manifest.get("source") or {}
    want = src.get("hub_id")
    have = meta.get("base_model")
    if want and have != want and not (isinstance(have, list) and want in have):
        problems.append(f"{CARD}: base_model is {have!r}, but the source was {want!r}; {fix}.")
    elif not want and not have:
        warnings.append(
            f"{CARD} names no base_model: the source was a local folder ({src.get('model')}), so the Hub will not "
            "link this model to its base. Split from the Hub id (org/name) to record it."
        )
    if not meta.get("library_name"):
        problems.append(f"{CARD}: no library_name (transformers or peft); {fix}.")
    method = manifest.get("method")
    tags = meta.get("tags") or []
    if method and method not in tags:
        problems.append(f"{CARD}: tags {tags} lack the method {method!r}; {fix}.")
    lic = src.get("license")
    if lic and meta.get("license") != lic:
        problems.append(f"{CARD}: license is {meta.get('license')!r}, but the source card says {lic!r}; {fix}.")
    if not meta.get("license"):
        warnings.append(f"{CARD} states no license (the source card had none); add `license:` to its metadata if you know it.")
    elif meta.get("license") == "other" and not meta.get("license_name"):
        problems.append(f"{CARD}: license 'other' needs license_name and license_link (Hub card spec).")


def check_folder(folder: Path) -> FolderCheck:
    """Everything that would make an upload useless or rejected, as one list. Reads only."""
    folder = Path(folder)
    chk = FolderCheck(folder)
    if not folder.is_dir():
        chk.problems.append(f"{folder} is not a folder.")
        return chk
    chk.files = _files(folder)
    p = chk.problems
    for marker in (".surgeon/plan.json", "plan.json", "journal.jsonl"):
        if (folder / marker).exists():
            p.append(f"{marker} is present: {folder} is an interrupted run; repeat the command that wrote it to finish.")
    if (folder / MANIFEST).is_file():
        chk.manifest = _json(folder / MANIFEST, p) or {}
    else:
        p.append(f"no {MANIFEST}: {folder} was not written by surgeon (split, train or absorb).")
    if not (folder / "config.json").is_file():
        p.append("no config.json: transformers cannot load the folder; copy the source model's config.json into it.")
    else:
        _json(folder / "config.json", p)
    _check_weights(folder, chk.files, p)
    m = chk.manifest
    if m.get("operation") == "split":
        need = [ADAPTER_CONFIG, ADAPTER_WEIGHTS] if m.get("peft_adapter") else [FACTORS]
        p.extend(f"no {n}: the split's trainable factors are missing; re-run the split." for n in need if not (folder / n).is_file())
    root = folder.resolve()
    for d in _links_to_folders(folder):  # skipped by the upload, so refused like a file's link
        if not (folder / d).resolve().is_relative_to(root):
            p.append(f"{d} links to {(folder / d).resolve()}, outside {folder}; surgeon uploads only the folder's own files: copy it in or remove the link.")
    for f in chk.files:
        real = (folder / f).resolve()
        if not real.is_relative_to(root):  # a link would upload what it points to
            p.append(f"{f} links to {real}, outside {folder}; surgeon uploads only the folder's own files: copy it in or remove the link.")
        elif (size := real.stat().st_size) > HUB_MAX_FILE:
            p.append(f"{f} is {size / 1e9:.1f} GB; the Hub takes files up to 50 GB: re-run with --shard-size 5GB.")
    if m:
        _check_card(folder, m, p, chk.warnings)
    return chk


@reads("folder")
def validate(folder: Path) -> FolderCheck:
    """check_folder, raising NotHubReadyError with every problem when there is any."""
    chk = check_folder(folder)
    if chk.problems:
        lines = "\n".join(f"  - {x}" for x in chk.problems)
        raise NotHubReadyError(f"{folder} is not ready for the Hub ({len(chk.problems)} problems):\n{lines}")
    return chk


def write_card(folder: Path) -> Path:
    """(Re)write README.md from surgeon.json: the explicit fix for a missing or outdated card."""
    from surgeon.format.card import build_card

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except JSON_READ_ERRORS as e:
        raise NotHubReadyError(f"cannot build a card for {folder}: {MANIFEST} is missing or invalid ({e}).") from e
    build_card(manifest).save(folder / CARD)
    relist_one(folder, CARD)  # surgeon's own card again: a later --overwrite may replace it
    return folder / CARD
