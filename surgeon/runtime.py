"""A split folder as a live model: the residual base loaded with transformers, each targeted
layer wrapped by its method's runtime module holding the factors.

    from surgeon.runtime import load_split
    sm = load_split("split-dir")              # sm.model is a transformers model
    loss = task_loss + sm.extra_loss()        # e.g. KaSA's regularisers
    sm.save("split-dir-trained")              # same format: absorb/export/PEFT load it unchanged

The base shards are never rewritten by `save`: they are hard-linked (or copied if the file system
cannot link), and only the factor file changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import OutputExistsError, SplitDirError


class LoRALinear(nn.Module):
    """y = base(x) + s · B(A x): the runtime of every LoRA-shaped method (MiLoRA, PiSSA)."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool = False):
        super().__init__()
        self.base = base
        self.transposed = transposed
        self.scale = scale
        self.lora_A = nn.Parameter(a.detach().clone().float())  # (r, in)
        self.lora_B = nn.Parameter(b.detach().clone().float())  # (out, r)
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (models read it, e.g. T5 for its dtype, Gemma 3 for its device), as PEFT's layers do."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        # under autocast the products run in the autocast dtype anyway: casting x to the factors'
        # float32 first (as PEFT does) would only add a kernel; outside autocast, match dtypes
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        z = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return y + (self.scale * z).to(y.dtype)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}


class FusedLoRA(nn.Module):
    """A parametrization of a fused MoE expert parameter (E, out, in): W + s·ΔW, ΔW_e = B_e A_e, the
    factors held in PEFT's ParamWrapper layout (surgeon/model/moe.py): lora_A (E·R, in), lora_B (out, R·E)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, experts: int, scale: float):
        super().__init__()
        self.experts, self.scale = experts, scale
        self.lora_A = nn.Parameter(a.detach().clone().float())  # (E·R, in)
        self.lora_B = nn.Parameter(b.detach().clone().float())  # (out, R·E)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.reshape(self.experts, -1, self.lora_A.shape[1])  # (E, R, in)
        b = self.lora_B.reshape(self.lora_B.shape[0], -1, self.experts)  # (out, R, E)
        return w + (self.scale * torch.einsum("ore,eri->eoi", b, a)).to(w.dtype)  # (E, out, in)

    def factors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}


class SplitModel:
    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], split, blocks: dict[str, nn.Module] | None = None):
        self.model = model
        self.modules = modules  # module name -> runtime module
        self.split = split  # surgeon.splitdir.SplitDir
        self.blocks = blocks or {}  # block name -> per-block runtime module (methods with per_block, e.g. moe routers)
        self.fused: dict[str, FusedLoRA] = {}  # PEFT's module path of a fused expert parameter -> its parametrization

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_loss(self) -> torch.Tensor | None:
        return self.split.method.regularizer(list(self.modules.values()))

    def factor_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, mod in self.modules.items():
            for fname, t in mod.factors().items():
                out[self.split.factor_key(name, fname)] = t.detach().to("cpu", torch.float32).contiguous()
        for name, mod in self.blocks.items():
            for fname, t in mod.factors().items():
                out[f"{name}.{fname}"] = t.detach().to("cpu", torch.float32).contiguous()
        for name, mod in self.fused.items():
            for fname, t in mod.factors().items():
                out[self.split.factor_key(name, fname)] = t.detach().to("cpu", torch.float32).contiguous()
        return out

    def save(self, out: Path, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        src = self.split.path
        if out.resolve() == src.resolve():
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
            save_file(self.factor_state(), str(tmp / self.split.factors_file.name), metadata={"format": "pt"})
            os.chmod(tmp / self.split.factors_file.name, 0o644)  # safetensors writes 0600; split writes 0644
            os.replace(tmp / self.split.factors_file.name, self.split.factors_file)
            shutil.rmtree(tmp)
            return out
        from surgeon.outdir import FILES, check_outside, check_replaceable

        check_outside(out, self.split.inputs())
        if out.exists() and not overwrite:
            raise OutputExistsError(f"{out} exists; pass overwrite=True (--overwrite) or choose another folder.")
        if out.exists():
            check_replaceable(out, self.split.inputs())  # never the split, nor the model it came from
        tmp = out.parent / f".{out.name}.partial"
        if tmp.exists():
            check_replaceable(tmp, self.split.inputs())  # an earlier, killed save: surgeon's own
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.name not in (self.split.factors_file.name, FILES):  # the split's listing is not the copy's
                _link_or_copy(f, tmp / f.name)
        save_file(self.factor_state(), str(tmp / self.split.factors_file.name), metadata={"format": "pt"})
        os.chmod(tmp / self.split.factors_file.name, 0o644)  # safetensors writes 0600; split writes 0644
        if self.split.lora:  # the load check, before the copy is renamed into place
            from surgeon.model.check import check_output

            check_output(tmp, self.split.manifest)
        if out.exists():  # replaced only after the new copy is complete
            trash = out.parent / f".{out.name}.replaced"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return out


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.suffix == ".safetensors" and not src.name.startswith(("adapter_", "surgeon.")):
        try:
            os.link(src, dst)  # base shards are immutable: share them
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def module_slot(model: nn.Module, name: str, path: Path) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of the module `name`, to replace it; path names the folder in the error."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        return parent, child, getattr(parent, child)
    except AttributeError as e:
        raise SplitDirError(f"the model built from {path}/config.json has no module {name!r}.") from e


def load_residual_model(path: Path, dtype: torch.dtype = torch.float32, model_cls=None) -> nn.Module:
    """The residual checkpoint alone, through transformers, without its embedded adapter.

    transformers attaches an adapter_config.json found beside a checkpoint automatically; the
    runtime adds its own modules, so it loads through a view of the folder without the adapter.
    """
    import transformers

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    if model_cls is None:
        arch = (conf.get("architectures") or ["AutoModelForCausalLM"])[0]
        model_cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
    with tempfile.TemporaryDirectory() as view:
        for f in path.iterdir():
            if f.is_file() and not f.name.startswith(("adapter_", "surgeon.")):
                os.symlink(f.resolve(), Path(view) / f.name)
        return model_cls.from_pretrained(view, dtype=dtype)


def load_split(path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", trainable: bool = True, model_cls=None) -> SplitModel:
    from safetensors import safe_open

    from surgeon.splitdir import SplitDir

    split = SplitDir(Path(path))
    if split.manifest.get("quantization"):  # quant hook: a 4-bit residual, loaded by surgeon itself (surgeon/quant_runtime.py)
        from surgeon.quant_runtime import load_quantized_model

        model = load_quantized_model(split.path, split.manifest, split.residual(), dtype, model_cls)
    else:
        model = load_residual_model(split.path, dtype, model_cls)
    for p in model.parameters():
        p.requires_grad_(False)
    modules: dict[str, nn.Module] = {}
    with safe_open(split.factors_file, "pt") as f:
        fused = _attach_fused(model, split, f, trainable)
        for name, lay in split.manifest["layers"].items():
            if "fused" in lay:
                continue
            parent, child, base = module_slot(model, name, split.path)
            rt = split.method.runtime(base, split.factors(f, name), split.layer_cfg(name), lay["transposed"])
            for p in rt.parameters():
                if not any(p is q for q in base.parameters()):
                    p.requires_grad_(trainable)
            setattr(parent, child, rt)
            modules[name] = rt
        blocks = {}
        if split.method.per_block:
            names = split.method.block_shapes(1, 1, split.cfg)
            tensors = {b: {n: f.get_tensor(f"{b}.{n}") for n in names} for b in split.manifest["blocks"]}
            blocks = split.method.attach(model, modules, tensors, split.cfg, split.manifest)
            for mod in blocks.values():
                for p in mod.parameters():
                    p.requires_grad_(trainable)
    model.to(device)
    sm = SplitModel(model, modules, split, blocks)
    sm.fused = fused
    return sm


def _attach_fused(model: nn.Module, split, handle, trainable: bool) -> dict[str, FusedLoRA]:
    """A FusedLoRA parametrization on every fused expert parameter of the split (manifest "fused")."""
    from torch.nn.utils import parametrize

    out = {}
    for param, info in (split.manifest.get("fused") or {}).items():
        owner_name, _, pname = param.rpartition(".")
        owner = module_slot(model, owner_name, split.path)[2]
        w = getattr(owner, pname, None)
        f = split._fused(handle, info["module"])
        if w is None or w.dim() != 3 or tuple(w.shape[1:]) != (f["lora_B"].shape[0], f["lora_A"].shape[1]):
            raise SplitDirError(f"the model built from {split.path}/config.json has no fused parameter {param} of the split's shape.")
        cfg = split.layer_cfg(next(m for m, lay in split.layers.items() if lay.get("fused", {}).get("param") == param))
        rt = FusedLoRA(f["lora_A"], f["lora_B"], info["experts"], cfg.scale)
        rt.requires_grad_(trainable)
        parametrize.register_parametrization(owner, pname, rt)
        out[info["module"]] = rt
    return out
