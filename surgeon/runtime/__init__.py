"""A split folder as a live model: the residual base loaded with transformers, each targeted
layer wrapped by its method's runtime module holding the factors.

    from surgeon.runtime import load_split
    sm = load_split("split-dir")              # sm.model is a transformers model
    loss = task_loss + sm.extra_loss()        # e.g. KaSA's regularisers
    sm.save("split-dir-trained")              # same format: absorb/export/PEFT load it unchanged

The base shards are never rewritten by `save`: they are hard-linked (or copied if the file system
cannot link), and only the factor file changes.

The runtime layer sits on top of methods/ (the trainable modules), format/ (the folder) and the engine
(output transactions); only the commands and the CLI import it. runtime/quant.py loads a 4-bit residual
without transformers' bitsandbytes loader; runtime/calibrate.py averages the mixture's gates over prompts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgeon.engine.outdir import check_outside, check_replaceable, unsafe_reason
from surgeon.engine.outplace import check_place, discard, out_path, sweep_trash
from surgeon.errors import OutputExistsError, SplitDirError, UnsafeOutputError
from surgeon.format.listing import FILES, TEMP, unlisted_reason, write_listing
from surgeon.format.readlock import reads
from surgeon.format.source import confined
from surgeon.format.splitdir import RUN_LOG
from surgeon.methods.folder import SplitDir
from surgeon.methods.lora import FusedLoRA
from surgeon.model.check import check_output
from surgeon.model.slots import module_slot


class SplitModel:
    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], split, blocks: dict[str, nn.Module] | None = None):
        self.model = model
        self.modules = modules  # module name -> runtime module
        self.split = split  # surgeon.methods.folder.SplitDir
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
        if out.resolve() == src.resolve():  # a trainer's later saves: the factor file only
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
            save_file(self.factor_state(), str(tmp / self.split.factors_file.name), metadata={"format": "pt"})
            os.chmod(tmp / self.split.factors_file.name, 0o644)  # safetensors writes 0600; split writes 0644
            os.replace(tmp / self.split.factors_file.name, self.split.factors_file)
            shutil.rmtree(tmp)
            return out
        return _save_copy(self, out_path(out), overwrite)


SAVING = ".surgeon-saving"  # inside a copy being written: the partial folder of a killed save is surgeon's


def check_save_target(out: Path, inputs: list[Path]) -> None:
    """Refuse, before any work, an `out` that is, holds or lies inside an input (the split, its
    source), or that cannot be renamed into place (under a file, a mount point)."""
    why = unsafe_reason(out, inputs)
    if why:
        raise UnsafeOutputError(f"{why}; surgeon never writes into its input, so choose another --out.")
    check_outside(out, inputs)
    check_place(out)


def _save_copy(sm: SplitModel, out: Path, overwrite: bool) -> Path:
    """A new folder: the split's files (base shards hard-linked, side files only as regular files
    inside the split), the current factors and the content listing, renamed into place when whole."""
    from safetensors.torch import save_file

    src, inputs = sm.split.path, sm.split.inputs()
    check_save_target(out, inputs)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (--overwrite) or choose another folder.")
    if out.exists():
        check_replaceable(out, inputs)  # empty, or surgeon's with every file listed and unchanged
    sweep_trash(out)
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists() or tmp.is_symlink():
        if not (tmp / SAVING).is_file() and unlisted_reason(tmp) and (tmp.is_symlink() or not tmp.is_dir() or any(tmp.iterdir())):
            raise UnsafeOutputError(f"{tmp} exists but was not made by surgeon; move it away, or choose another --out.")
        discard(tmp, out)  # an earlier, killed save: surgeon's own
    tmp.mkdir(parents=True)
    (tmp / SAVING).touch()
    for f in sorted(src.iterdir()):
        if (f.is_file() or f.is_symlink()) and f.name not in (sm.split.factors_file.name, FILES):  # the split's listing is not the copy's
            _link_or_copy(confined(src, f.name, "the split folder"), tmp / f.name)
    save_file(sm.factor_state(), str(tmp / sm.split.factors_file.name), metadata={"format": "pt"})
    os.chmod(tmp / sm.split.factors_file.name, 0o644)  # safetensors writes 0600; split writes 0644
    (tmp / SAVING).unlink()
    if sm.split.lora:  # the load check, before the copy is renamed into place
        check_output(tmp, sm.split.manifest)
    write_listing(tmp, {RUN_LOG: TEMP})  # the split's run log: timings, listed by name only
    if out.exists():  # replaced only after the new copy is complete
        discard(out, out, put=lambda: os.replace(tmp, out))
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


def load_residual_model(path: Path, dtype: torch.dtype = torch.float32, model_cls=None) -> nn.Module:
    """The residual checkpoint alone, through transformers, without its embedded adapter.

    transformers attaches an adapter_config.json found beside a checkpoint automatically; the
    runtime adds its own modules, so it loads through a view of the folder without the adapter.
    """
    path = Path(path)
    files = {f.name: confined(path, f.name, "the split folder").resolve()  # regular files inside the folder only
             for f in path.iterdir() if (f.is_file() or f.is_symlink()) and not f.name.startswith(("adapter_", "surgeon."))}
    return load_model_from(files, dtype, model_cls)


def load_model_from(files: dict[str, Path], dtype: torch.dtype = torch.float32, model_cls=None) -> nn.Module:
    """A transformers model from exactly these files (name in the folder transformers sees → the file),
    config.json among them; the class is the config's architecture unless `model_cls` is given."""
    import transformers

    conf = json.loads(Path(files["config.json"]).read_text())
    if model_cls is None:
        arch = (conf.get("architectures") or ["AutoModelForCausalLM"])[0]
        model_cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
    with tempfile.TemporaryDirectory() as view:
        for name, real in files.items():
            os.symlink(real, Path(view) / name)
        return model_cls.from_pretrained(view, dtype=dtype)


@reads("path")
def load_split(path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", trainable: bool = True, model_cls=None) -> SplitModel:
    from safetensors import safe_open

    split = SplitDir(Path(path))
    if split.manifest.get("quantization"):  # quant hook: a 4-bit residual, loaded by surgeon itself (surgeon/quant_runtime.py)
        from surgeon.runtime.quant import load_quantized_model

        model = load_quantized_model(split.path, split.manifest, split.residual(), dtype, model_cls)
    else:
        model = load_residual_model(split.path, dtype, model_cls)
    for p in model.parameters():
        p.requires_grad_(False)
    with safe_open(split.factors_file, "pt") as f:
        fused = {}
        for module, (owner, pname, rt) in fused_runtimes(model, split, f, trainable).items():
            parametrize.register_parametrization(owner, pname, rt)
            fused[module] = rt
        modules = attach_layers(model, split, f, trainable)
        blocks = attach_blocks(model, split, f, modules, trainable)
    model.to(device)
    sm = SplitModel(model, modules, split, blocks)
    sm.fused = fused
    return sm


def attach_layers(model: nn.Module, split, handle, trainable: bool) -> dict[str, nn.Module]:
    """Every split layer but the fused experts replaced by its method's runtime module holding its factors
    (the base it wraps may still be on the meta device: nothing here reads it)."""
    modules: dict[str, nn.Module] = {}
    for name, lay in split.manifest["layers"].items():
        if "fused" in lay:
            continue
        parent, child, base = module_slot(model, name, split.path)
        rt = split.method.runtime(base, split.factors(handle, name), split.layer_cfg(name), lay["transposed"])
        for p in rt.parameters():
            if not any(p is q for q in base.parameters()):
                p.requires_grad_(trainable)
        setattr(parent, child, rt)
        modules[name] = rt
    return modules


def attach_blocks(model: nn.Module, split, handle, modules: dict[str, nn.Module], trainable: bool) -> dict[str, nn.Module]:
    """The per-block runtime modules of methods that have them (the mixture's routers), bound to `modules`."""
    if not split.method.per_block:
        return {}
    names = split.method.block_shapes(1, 1, split.cfg)
    tensors = {b: {n: handle.get_tensor(f"{b}.{n}") for n in names} for b in split.manifest["blocks"]}
    blocks = split.method.attach(model, modules, tensors, split.cfg, split.manifest)
    for mod in blocks.values():
        for p in mod.parameters():
            p.requires_grad_(trainable)
    return blocks


def fused_runtimes(model: nn.Module, split, handle, trainable: bool) -> dict[str, tuple[nn.Module, str, FusedLoRA]]:
    """PEFT's module path of every fused expert parameter of the split (manifest "fused") -> (the module
    holding it, the parameter's name, its FusedLoRA), not yet registered as a parametrization."""
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
        out[info["module"]] = (owner, pname, rt)
    return out
