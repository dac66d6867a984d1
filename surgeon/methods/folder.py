"""A split folder read with its method: the format's files (surgeon.format.splitdir) bound to the
method and settings that wrote them, every factor file checked against the manifest before use.

    from surgeon.methods.folder import SplitDir
    sd = SplitDir("split-dir")              # validated manifest, method, config, factor files
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from surgeon.errors import JSON_READ_ERRORS, SourceError, SplitDirError, UsageError
from surgeon.format.reader import file_hash, read_header
from surgeon.format.source import resolve as resolve_source
from surgeon.format.splitdir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FACTORS,
    INIT_FACTORS,
    MANIFEST,
    factor_hashes,
    factor_key,
    lora_key,
    read_manifest,
)
from surgeon.methods import MethodConfig, get_method
from surgeon.model.patterns import resolve
from surgeon.version import __version__


def _str_map(obj, kinds) -> bool:
    """Whether obj is a JSON object of name → value of `kinds` (no booleans)."""
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, kinds) and not isinstance(v, bool) for k, v in obj.items())


FLOATS = ("F32", "BF16", "F16", "F64")


def _first_mismatch(want: dict[str, tuple[int, ...]], have: dict, dtype: str | None) -> str | None:
    """The first way a factor file's header (name → TensorInfo) differs from the expected key → shape:
    a missing or extra key, another shape, a dtype other than `dtype` (None: any float)."""
    for key, shape in want.items():
        info = have.get(key)
        if info is None:
            return f"it lacks {key}"
        if tuple(info.shape) != shape:
            return f"{key} has shape {list(info.shape)}, the split's is {list(shape)}"
        if info.dtype != dtype if dtype else info.dtype not in FLOATS:
            return f"{key} is {info.dtype}, not {dtype or 'a float dtype'}"
    extra = [k for k in have if k not in want]
    return f"it holds {extra[0]}, which the split does not have" if extra else None


class SplitDir:
    """A surgeon split folder: manifest, residual checkpoint, current and initial factors."""

    def __init__(self, path: Path):
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
        self._check_factors()

    def _check_files(self) -> None:
        """The factor files must be valid safetensors (the library's check), the source recorded."""
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

    def expected_factors(self, trainable: bool = False) -> dict[str, tuple[int, ...]]:
        """Every factor tensor this split has, key → shape, from the manifest: each layer's shape and
        rank, and the per-block tensors (moe routers). The untrained file holds each MoE expert's own
        factors; the trainable file (`trainable`) holds them fused per expert parameter instead, in
        PEFT's ParamWrapper layout (lora_A (E·R, in), lora_B (out, R·E); surgeon/model/moe.py)."""
        want: dict[str, tuple[int, ...]] = {}
        fused: dict[str, list[tuple[list[int], int]]] = {}  # fused parameter -> [(expert shape, rank)]
        for module, lay in self.layers.items():
            shape, r = lay.get("shape") if isinstance(lay, dict) else None, lay.get("rank", self.manifest["rank"]) if isinstance(lay, dict) else None
            if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape) and isinstance(r, int) and r > 0):
                raise SplitDirError(f"{self.path / MANIFEST}: the record of layer {module} is damaged; re-run the split.")
            place = lay.get("fused")
            if isinstance(place, dict):  # PEFT's rank applies to the fused parameter, not to one expert
                fused.setdefault(place.get("param"), []).append((shape, r))
                if trainable:
                    continue
            elif self.layer_cfg(module).rank != r:
                raise SplitDirError(f"{self.path / ADAPTER_CONFIG} gives {module} rank {self.layer_cfg(module).rank}, {MANIFEST} records {r}; "
                                    "put back the adapter config split wrote (or split again).")
            cfg = dataclasses.replace(self.cfg, rank=r)
            want |= {self.factor_key(module, f): tuple(s) for f, s in self.method.factor_shapes(*shape, cfg).items()}
        if trainable:
            want |= self._fused_shapes(fused)
        for block, info in (self.manifest.get("blocks") or {}).items():
            shapes = self.method.block_shapes(info["hidden"], len(info["experts"]), self.cfg)
            want |= {f"{block}.{f}": tuple(s) for f, s in shapes.items()}
        return want

    def _fused_shapes(self, fused: dict[str, list[tuple[list[int], int]]]) -> dict[str, tuple[int, ...]]:
        """key → shape of the fused factors PEFT keeps for each fused expert parameter (manifest "fused")."""
        want = {}
        for param, info in (self.manifest.get("fused") or {}).items():
            parts = fused.get(param) or []
            if not isinstance(info, dict) or not parts or not isinstance(info.get("module"), str):
                raise SplitDirError(f"{self.path / MANIFEST}: the record of the fused parameter {param} is damaged; re-run the split.")
            experts, per = int(info.get("experts", 0)), int(info.get("parts", 1))
            (out, inp), r = parts[0]
            rank = per * r  # gate_up: the parts' ranks side by side
            want[lora_key(info["module"], "lora_A")] = (experts * rank, inp)
            want[lora_key(info["module"], "lora_B")] = (per * out, rank * experts)
        return want

    def _check_factors(self) -> None:
        """Factor files against the manifest, before any use: the same keys, shapes (so ranks) and float
        dtypes in both; the untrained factors (surgeon.init) also by the content hash split recorded of
        each tensor. The trainable file may hold other values (training, by surgeon or PEFT, changes
        them), never other shapes. A file copied from another split is refused naming its first wrong key."""
        for p in (self.factors_file, self.init_file):
            if not p.exists():
                continue
            have = read_header(p)[0]
            want = self.expected_factors(trainable=p == self.factors_file and self.factors_file != self.init_file)
            why = _first_mismatch(want, have, "F32" if p == self.init_file else None)
            if why:
                raise SplitDirError(f"{p} does not belong to this split: {why}; put back the file split wrote there (or split again).")
        hashes = self.manifest.get("factor_hashes")
        if hashes is None or not self.init_file.exists():
            return  # a split by surgeon < 0.3 recorded shapes only
        if not _str_map(hashes, str):
            raise SplitDirError(f"{self.path / MANIFEST} holds damaged factor hashes; re-run the split.")
        for key, got in factor_hashes(self.init_file).items():
            if hashes.get(key) != got:
                raise SplitDirError(f"{self.init_file} is not the file split wrote: {key} differs from the content hash in {MANIFEST}; "
                                    "put back the file split wrote there (or split again).")

    def _config(self):
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
        if self.patterns is not None:  # PEFT matches a target parameter (a dense MLP kept off the experts) by its parameter name
            name = f"{module}.weight" if f"{module}.weight" in (self.manifest.get("target_parameters") or ()) else module
            r, a = resolve(name, self.cfg.rank, self.cfg.alpha, *self.patterns)
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
        return resolve_source(str(self.path)).checkpoint()
