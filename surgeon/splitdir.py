"""The split-folder format, in one place: file names, factor keys, and reading the manifest.

    from surgeon.splitdir import SplitDir
    sd = SplitDir("split-dir")              # validated manifest, method, config, factor files

split writes this format; absorb, export, the runtime, the trainer, `surgeon spectra` and `surgeon
push` read it through here, so a folder that is not a complete split is refused in one line naming
the problem, wherever it is given.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from surgeon.errors import JSON_READ_ERRORS, SourceError, SplitDirError, UsageError

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


def _str_map(obj, kinds) -> bool:
    """Whether obj is a JSON object of name → value of `kinds` (no booleans)."""
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, kinds) and not isinstance(v, bool) for k, v in obj.items())


class SplitDir:
    """A surgeon split folder: manifest, residual checkpoint, current and initial factors."""

    def __init__(self, path: Path):
        from surgeon.methods import get_method

        self.path = Path(path)
        self.manifest = m = read_manifest(self.path, "the --out folder of `surgeon split`")
        if m["operation"] not in ("split", "train"):
            raise SplitDirError(f"{self.path} was made by `surgeon {m['operation']}`, not split; give a split folder.")
        for key, kind in (("method", str), ("rank", int), ("alpha", (int, float)), ("layers", dict), ("source", dict)):
            if not isinstance(m.get(key), kind):
                raise SplitDirError(f"{self.path / MANIFEST} lacks a valid {key!r}; re-run the split.")
        self.method = get_method(m["method"])
        self.lora = bool(m.get("peft_adapter", False))
        self.factors_file = self.path / (ADAPTER_WEIGHTS if self.lora else FACTORS)
        self.init_file = self.path / INIT_FACTORS
        if not self.factors_file.is_file():
            raise SplitDirError(f"{self.path} lacks {self.factors_file.name}; the split is incomplete, re-run it.")
        self._check_files()
        self.cfg = self._config()

    def _check_files(self) -> None:
        """The factor files must be valid safetensors (the library's check), the source recorded."""
        from surgeon.io.reader import read_header

        for p in (self.factors_file, self.init_file):
            if p.exists():
                try:
                    read_header(p)
                except SourceError as e:
                    raise SplitDirError(f"{e} ({self.path} is damaged: re-run the command that wrote it)") from None
        src = self.manifest["source"]
        files = src.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
            raise SplitDirError(f"{self.path / MANIFEST} records no source files; re-run the split.")
        hashes = src.get("tensor_hashes") or {}
        if not _str_map(hashes, str):
            raise SplitDirError(f"{self.path / MANIFEST} holds damaged source hashes; re-run the split.")

    def _config(self):
        from surgeon.methods import MethodConfig

        r, alpha, rs = self.manifest["rank"], self.manifest["alpha"], self.manifest.get("use_rslora", False)
        ac = self.path / ADAPTER_CONFIG
        self.patterns = None  # (rank_pattern, alpha_pattern) of the adapter config: PEFT's per-module ranks
        if self.lora and ac.exists():  # a trainer may have saved its own config
            try:
                c = json.loads(ac.read_text())
            except JSON_READ_ERRORS as e:
                raise SplitDirError(f"{ac} is damaged ({e}); re-run the command that wrote {self.path}.") from None
            if not isinstance(c, dict):
                raise SplitDirError(f"{ac} is not a JSON object; re-run the command that wrote {self.path}.")
            r, alpha, rs = c.get("r", r), c.get("lora_alpha", alpha), c.get("use_rslora", rs)
            self.patterns = (c.get("rank_pattern") or {}, c.get("alpha_pattern") or {})
            if not all(_str_map(p, (int, float)) for p in self.patterns):
                raise SplitDirError(f"{ac}: rank_pattern and alpha_pattern must map module patterns to numbers; re-run the command that wrote {self.path}.")
        known = {f.name for f in dataclasses.fields(MethodConfig)} - {"rank", "alpha", "use_rslora", "module"}
        saved = self.manifest.get("method_config", {})
        if not isinstance(saved, dict):
            raise SplitDirError(f"{self.path / MANIFEST}: method_config is not an object; re-run the split.")
        try:
            cfg = MethodConfig(r, alpha, rs, **{k: v for k, v in saved.items() if k in known})
        except UsageError as e:  # a damaged value (text, null, NaN) in surgeon.json or adapter_config.json
            raise SplitDirError(f"{self.path} holds an invalid setting ({str(e).rstrip('.')}); re-run the command that wrote it.") from None
        return dataclasses.replace(cfg, alpha=float(cfg.alpha))

    @property
    def layers(self) -> dict[str, dict]:
        return self.manifest["layers"]

    def layer_cfg(self, module: str):
        """The module's own rank and alpha (--rank-pattern/--alpha-pattern): resolved from the adapter
        config as PEFT does when a LoRA-shaped split has one, else the manifest's per-layer record."""
        from surgeon.patterns import resolve

        if self.patterns is not None:
            r, a = resolve(module, self.cfg.rank, self.cfg.alpha, *self.patterns)
        else:
            lay = self.layers.get(module, {})
            r, a = lay.get("rank", self.cfg.rank), lay.get("alpha", self.cfg.alpha)
        return self.cfg if (r, a) == (self.cfg.rank, self.cfg.alpha) else dataclasses.replace(self.cfg, rank=int(r), alpha=float(a))

    def factor_key(self, module: str, fname: str) -> str:
        return factor_key(self.lora, module, fname)

    def factors(self, handle, module: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The factors of one split layer from an open factor file. A fused MoE expert matrix (layer
        record "fused") is read under its own keys (surgeon.init) or cut out of the adapter's fused pair."""
        fnames = self.method.factor_shapes(1, 1, self.cfg).keys()
        fu = self.layers.get(module, {}).get("fused")
        if fu is not None and self.factor_key(module, "lora_A") not in self._keys(handle):
            from surgeon.model.moe import piece

            info = self.manifest["fused"][fu["param"]]
            return {f: t.to(device) for f, t in piece(self._fused(handle, info["module"]), fu["expert"], fu["part"], fu["parts"], info["experts"]).items()}
        return {f: handle.get_tensor(self.factor_key(module, f)).to(device) for f in fnames}

    def _keys(self, handle) -> set[str]:
        if getattr(self, "_keys_of", (None,))[0] is not handle:
            self._keys_of = (handle, set(handle.keys()))
        return self._keys_of[1]

    def _fused(self, handle, module: str) -> dict[str, torch.Tensor]:
        """The fused (lora_A, lora_B) PEFT keeps for one fused parameter (cached: every expert reads it)."""
        if getattr(self, "_fused_of", (None, None))[:2] != (handle, module):
            self._fused_of = (handle, module, {f: handle.get_tensor(lora_key(module, f)) for f in ("lora_A", "lora_B")})
        return self._fused_of[2]

    def source_files(self) -> list[dict]:
        """The source's weight files as recorded: [{"path", "size", "mtime_ns"}]."""
        return list(self.manifest["source"].get("files") or [])

    def source_hashes(self) -> dict[str, str]:
        """Content hash of every source tensor at split time (empty for splits by surgeon < 0.2)."""
        return dict(self.manifest["source"].get("tensor_hashes") or {})

    def identity(self) -> dict:
        """What a resumed absorb or export must find unchanged: the factor files' content (training
        rewrites them in place) and the surgeon version."""
        from surgeon import __version__
        from surgeon.io.reader import file_hash

        files = [self.factors_file] + ([self.init_file] if self.init_file.exists() else [])
        return {"surgeon": __version__, **{p.name: file_hash(p) for p in files}}

    def inputs(self) -> list[Path]:
        """What an output made from this split may never replace, hold or lie inside: the split, the
        source's files and, when the source was a folder or a Hub id, its folder."""
        files = [Path(f["path"]) for f in self.source_files()]
        given_file = Path(str(self.manifest["source"].get("model") or "")).suffix in (".safetensors", ".bin", ".pt", ".pth")
        return [self.path, *files, *({f.parent for f in files} if not given_file else set())]

    def missing_source_files(self) -> list[str]:
        return [f["path"] for f in self.source_files() if not Path(f["path"]).is_file()]

    def residual(self):
        from surgeon.source import resolve

        return resolve(str(self.path)).checkpoint()
