"""Fold (possibly trained) factors back into plain weights, and export a LoRA for the original base.

    surgeon absorb SPLIT_DIR --out MERGED
    surgeon export SPLIT_DIR --to lora --out LORA_DIR

absorb, per targeted weight, with s the LoRA scaling and B₀A₀ the factors as split:
  * base "original" (default when the source files named in surgeon.json are still there,
    unchanged): W' = W + s·(B'A' − B₀A₀). Untrained factors give back W bit for bit (the
    change is skipped when the factors are identical, and the original tensor is copied).
  * base "residual": W' = W_res + s·B'A', what PEFT's merge_and_unload computes.
For a method whose residual drops part of W on purpose (`Method.truncates`, KaSA: the r minor
components) "auto" means "residual": W' = W_world + ΔW', the model that was trained (the runtime
forward); "original" must be asked for and re-adds the dropped part: W' = W + ΔW' (ΔW₀ = 0).
The output has the source's tensor names and dtypes, streamed tensor by tensor.

export: the PiSSA→LoRA conversion from PEFT's docs: ΔW = s(B'A' − B₀A₀) = s'·[B' | B₀][A' ; −A₀],
a rank-2r adapter for the ORIGINAL model with lora_alpha doubled so that s' = s. A method that is
not LoRA-shaped exports through `Method.lora_change` when it has one (NuSA: lora_B = B,
lora_A = (M − M₀)A: a rank-r LoRA of the trained change on the ORIGINAL model), else through
`Method.lora_form` (KaSA: B diag(d), A: a rank-r LoRA on its RESIDUAL, the split folder itself).

absorb runs under torchrun as split does (surgeon/distributed.py): each rank merges its share of
the tensors into the same pre-laid-out shards; rank 0 writes the rest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from surgeon import __version__, distributed
from surgeon.card import build_card
from surgeon.errors import SplitDirError, UsageError
from surgeon.export.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, lora_key, task_type_for, write_adapter
from surgeon.io import Checkpoint, OutTensor, ShardSetWriter, plan_shards
from surgeon.io.writer import write_json
from surgeon.methods import Method, MethodConfig, get_method
from surgeon.outdir import WorkDir, copy_side_files
from surgeon.pipeline import FACTORS, INIT_FACTORS, MANIFEST, SPECTRA, factor_key, parse_size
from surgeon.progress import NullReporter, Reporter
from surgeon.source import resolve


@dataclass
class AbsorbOptions:
    base: str = "auto"  # auto | original | residual
    shard_size: str = "5GB"
    overwrite: bool = False
    fixed_gates: Path | None = None  # prompt-dependent methods (moe): gates JSON or calibration JSONL


class SplitDir:
    """A surgeon split folder: manifest, residual checkpoint, current and initial factors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.exists():
            raise SplitDirError(f"{self.path} is not a surgeon split folder (no {MANIFEST}); give the --out folder of `surgeon split`.")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("operation") != "split":
            raise SplitDirError(f"{self.path} was made by `surgeon {self.manifest.get('operation')}`, not split.")
        self.method = get_method(self.manifest["method"])
        self.lora = self.manifest.get("peft_adapter", False)
        self.factors_file = self.path / (ADAPTER_WEIGHTS if self.lora else FACTORS)
        self.init_file = self.path / INIT_FACTORS
        if not self.factors_file.exists():
            raise SplitDirError(f"{self.path} lacks {self.factors_file.name}; the split is incomplete.")
        self.cfg = self._config()

    def _config(self) -> MethodConfig:
        r, alpha, rs = self.manifest["rank"], self.manifest["alpha"], self.manifest.get("use_rslora", False)
        ac = self.path / ADAPTER_CONFIG
        if self.lora and ac.exists():  # a trainer may have saved its own config
            c = json.loads(ac.read_text())
            r, alpha, rs = c.get("r", r), c.get("lora_alpha", alpha), c.get("use_rslora", rs)
        known = {f.name for f in dataclasses.fields(MethodConfig)} - {"rank", "alpha", "use_rslora", "module"}
        saved = self.manifest.get("method_config", {})
        return MethodConfig(int(r), float(alpha), bool(rs), **{k: v for k, v in saved.items() if k in known})

    def factor_key(self, module: str, fname: str) -> str:
        return factor_key(self.lora, module, fname)

    def factors(self, handle, module: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        fnames = self.method.factor_shapes(1, 1, self.cfg).keys()
        return {f: handle.get_tensor(self.factor_key(module, f)).to(device) for f in fnames}

    def source_available(self) -> bool:
        files = self.manifest["source"]["files"]
        for f in files:
            p = Path(f["path"])
            if not p.exists() or p.stat().st_size != f["size"] or p.stat().st_mtime_ns != f["mtime_ns"]:
                return False
        return bool(files)

    def residual(self) -> Checkpoint:
        return resolve(str(self.path)).checkpoint()


@distributed.collective
def absorb(split_dir: Path, out: Path, opts: AbsorbOptions | None = None, reporter: Reporter | None = None) -> dict:
    dist = distributed.current()
    opts = opts or AbsorbOptions()
    reporter = reporter or NullReporter()
    sd = SplitDir(split_dir)
    if opts.base not in ("auto", "original", "residual"):
        raise UsageError(f"--base {opts.base!r}: choose auto, original or residual.")
    have_source = sd.source_available()
    base = opts.base if opts.base != "auto" else ("original" if have_source and not sd.method.truncates else "residual")
    if base == "original" and not have_source:
        raise UsageError(
            f"--base original: the source weights recorded in {MANIFEST} are missing or changed; use --base residual "
            "(merges into the residual; equal to the original up to rounding of the residual dtype)."
        )
    if base == "original" and not sd.init_file.exists():
        raise SplitDirError(f"{sd.path} lacks {INIT_FACTORS} (the untrained factors); use --base residual.")
    mult, gates = None, None  # module -> fixed gate multiplying its delta (moe only)
    if sd.method.prompt_dependent:
        mult, gates = dist.from_main(lambda: sd.method.fixed_gates(sd, opts.fixed_gates))  # refuses without --fixed-gates
    elif opts.fixed_gates is not None:
        raise UsageError(f"--fixed-gates is for splits whose update depends on the prompt (method moe); {sd.method.name} has static factors.")
    layers = sd.manifest["layers"]
    ckpt = Checkpoint.open([Path(f["path"]) for f in sd.manifest["source"]["files"]]) if base == "original" else sd.residual()
    by_tensor = {f"{m}.weight": (m, lay) for m, lay in layers.items()}
    plan = [OutTensor(n, i.dtype, i.shape) for n, i in ckpt.tensors.items()]
    work_plan = {"op": "absorb", "split": str(sd.path.resolve()), "base": base, "shard_size": opts.shard_size}
    if gates is not None:
        work_plan["fixed_gates"] = gates
    with dist.main_first():  # rank 0 creates the folder and lays out the shards, then the others open them
        work = WorkDir(out, work_plan, opts.overwrite, rank=dist.journal_rank)
        writer = ShardSetWriter(work.path, plan_shards(plan, parse_size(opts.shard_size)))
    left = [n for n in ckpt.tensors if n not in work.done]
    rank = sd.cfg.rank * (2 if base == "original" else 1)  # B·A once, or twice (current and initial)
    todo = dist.share(left, [distributed.matrix_cost(ckpt.tensors[n].shape, ckpt.tensors[n].nbytes, rank=rank if n in by_tensor else None) for n in left])
    reporter.start(len(ckpt.tensors) - len(left) + len(todo), sum(ckpt.tensors[n].nbytes for n in todo), done=len(ckpt.tensors) - len(left))
    t0 = time.perf_counter()
    with safe_open(sd.factors_file, "pt") as cur, safe_open(sd.init_file if base == "original" else sd.factors_file, "pt") as ini:
        with ThreadPoolExecutor(1, thread_name_prefix="surgeon-writer") as pool:
            pending: list[Future] = []
            for info, tensor in ckpt.stream(todo):
                hit = by_tensor.get(info.name)
                changed = False
                if hit is not None:
                    module, lay = hit
                    g = 1.0 if mult is None else mult[module]
                    f_cur = sd.factors(cur, module)
                    if base == "original":
                        f_ini = sd.factors(ini, module)
                        if g != 0 and any(not torch.equal(f_cur[k], f_ini[k]) for k in f_cur):
                            delta = sd.method.delta(f_cur, sd.cfg) - sd.method.delta(f_ini, sd.cfg)  # (out, in)
                            tensor = _add(tensor, g * delta, lay["transposed"])
                            changed = True
                    else:
                        tensor = _add(tensor, g * sd.method.delta(f_cur, sd.cfg), lay["transposed"])
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(pool.submit(writer.write, info.name, tensor))
                work.journal.add({"name": info.name, "changed": changed})
                reporter.advance(info.name, info.nbytes)
                dist.check_peers()  # another rank failed: stop here
            for f in pending:
                f.result()
    writer.sync()
    work.journal.commit()
    writer.close()
    dist.sync()  # every rank's tensors are written
    if not dist.is_main:
        reporter.close()
        return None  # rank 0 finishes the folder; every rank returns its manifest
    writer.write_index()
    changed = sum(1 for rec in work.records().values() if rec.get("changed"))
    skip = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, INIT_FACTORS, SPECTRA, FACTORS, MANIFEST, "README.md"}
    side = [p for p in sd.path.iterdir() if p.is_file() and p.suffix in (".json", ".jinja", ".txt", ".model", ".tiktoken") and "index" not in p.name]
    source_config = Path(sd.manifest["source"]["files"][0]["path"]).parent / "config.json"
    if base == "original" and source_config.exists():  # the source's config carries the original dtype
        side = [p for p in side if p.name != "config.json"] + [source_config]
    copy_side_files(side, work.path, skip)
    manifest = {
        "surgeon_version": __version__,
        "operation": "absorb",
        "split": str(sd.path.resolve()),
        "method": sd.method.name,
        "base": base,
        "layers_changed": changed if base == "original" else len(layers),
        "layers": len(layers),
        "seconds": round(time.perf_counter() - t0, 3),
        "source": sd.manifest["source"],
    }
    if gates is not None:
        manifest["fixed_gates"] = gates
    write_json(work.path / MANIFEST, manifest)
    build_card(manifest).save(work.path / "README.md")
    work.finish()
    reporter.close()
    return manifest


def _add(stored: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    d = delta.mT if transposed else delta  # stored layout
    return (stored.double() + d).to(stored.dtype)


def export_lora(split_dir: Path, out: Path, overwrite: bool = False) -> dict:
    """A PEFT LoRA for the original model: rank 2r [B' | B₀] [A' ; −A₀] with lora_alpha doubled for
    LoRA-shaped splits, the method's rank-r `lora_change` otherwise (or `lora_form` on the residual)."""
    sd = SplitDir(split_dir)
    change = type(sd.method).lora_change is not Method.lora_change
    if not sd.lora and not change:
        return _export_residual_lora(sd, out, overwrite)
    if not sd.init_file.exists():
        raise SplitDirError(f"{sd.path} lacks {INIT_FACTORS} (the untrained factors) needed for the conversion.")
    cfg = sd.cfg
    work = WorkDir(out, {"op": "export", "split": str(sd.path.resolve())}, overwrite)
    tensors = {}
    with safe_open(sd.factors_file, "pt") as cur, safe_open(sd.init_file, "pt") as ini:
        for module in sd.manifest["layers"]:
            if not sd.lora:
                a, b = sd.method.lora_change(sd.factors(cur, module), sd.factors(ini, module), cfg)
                tensors[lora_key(module, "lora_A")], tensors[lora_key(module, "lora_B")] = a.contiguous(), b.contiguous()
                continue
            a1, b1 = cur.get_tensor(lora_key(module, "lora_A")), cur.get_tensor(lora_key(module, "lora_B"))
            a0, b0 = ini.get_tensor(lora_key(module, "lora_A")), ini.get_tensor(lora_key(module, "lora_B"))
            tensors[lora_key(module, "lora_A")] = torch.cat([a1, -a0], 0)  # (2r, in)
            tensors[lora_key(module, "lora_B")] = torch.cat([b1, b0], 1)  # (out, 2r)
    # s' = alpha'/r' must equal s: r' = 2r, so alpha' = 2·alpha (√2·alpha with rsLoRA)
    r_out = 2 * cfg.rank if sd.lora else cfg.rank
    alpha2 = cfg.alpha * (2**0.5 if cfg.use_rslora else 2) if sd.lora else cfg.alpha
    src = sd.manifest["source"]
    side_cfg = sd.path / "config.json"
    conf = adapter_config(
        r=r_out,
        alpha=alpha2,
        target_modules=sd.manifest["target_modules"],
        fan_in_fan_out=sd.manifest.get("transposed", False),
        use_rslora=cfg.use_rslora,
        base_model=src.get("hub_id") or str(Path(src["files"][0]["path"]).parent),
        revision=src.get("revision") if src.get("hub_id") else None,
        task_type=task_type_for(json.loads(side_cfg.read_text())) if side_cfg.exists() else "CAUSAL_LM",
    )
    write_adapter(work.path, conf, tensors)
    work.finish()
    return conf


def _export_residual_lora(sd: SplitDir, out: Path, overwrite: bool) -> dict:
    """A rank-r PEFT LoRA on the split's residual (`Method.lora_form`), same r and alpha; its base
    model is the split folder itself."""
    with safe_open(sd.factors_file, "pt") as cur:
        first = next(iter(sd.manifest["layers"]))
        if sd.method.lora_form(sd.factors(cur, first), sd.cfg) is None:
            raise UsageError(f"method {sd.method.name} has no LoRA form; export --to lora needs a LoRA-shaped split.")
        work = WorkDir(out, {"op": "export", "split": str(sd.path.resolve()), "to": "lora-on-residual"}, overwrite)
        tensors = {}
        for module in sd.manifest["layers"]:
            f = sd.method.lora_form(sd.factors(cur, module), sd.cfg)
            tensors[lora_key(module, "lora_A")] = f["lora_A"]  # (r, in)
            tensors[lora_key(module, "lora_B")] = f["lora_B"]  # (out, r)
    conf = adapter_config(
        r=sd.cfg.rank,
        alpha=sd.cfg.alpha,
        target_modules=sd.manifest["target_modules"],
        fan_in_fan_out=sd.manifest.get("transposed", False),
        use_rslora=sd.cfg.use_rslora,
        base_model=str(sd.path.resolve()),
    )
    write_adapter(work.path, conf, tensors)
    work.finish()
    return conf
