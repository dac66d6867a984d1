"""What a split is: its options (SplitOptions), its plan (SplitJob) and its open output files (Writers),
shared by the plan and run steps (split.py) and the finish step (split_finish.py).

    from surgeon.commands.split_job import SplitOptions; SplitOptions(method="milora", rank=8)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgeon.engine import calibrate
from surgeon.engine.outdir import (
    COMMIT_SECONDS,
)
from surgeon.format import Checkpoint, OutTensor, ShardSetWriter, quant
from surgeon.format.dtypes import FLOAT_DTYPES
from surgeon.format.source import Source
from surgeon.methods import MethodConfig
from surgeon.model import NameMap
from surgeon.model.adapter import AdapterPlan
from surgeon.model.selection import (
    Target,
)


@dataclass
class SplitOptions:
    method: str = "milora"
    rank: int = 64
    alpha: float | None = None  # default: the method's (rank, scale 1, as the MiLoRA authors; nusa: 2)
    use_rslora: bool = False
    null_energy: float | None = None  # nusa: energy cutoff ρ (default 0.95)
    null_rank: int | None = None  # nusa: fixed null-space size
    target: list[str] = field(default_factory=lambda: ["all-linear"])
    dtype: str | None = None  # residual dtype ("bfloat16", ...); None keeps the checkpoint's
    device: str = "auto"
    backend: str = "auto"
    solver: str = "auto"
    tol: float = 1e-6
    shard_size: str = "5GB"
    revision: str | None = None
    config: Path | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    prefetch: int = 2
    workers: int = 0  # concurrent solves (threads; CUDA: one stream each); 0 = 2 on CPU, 1 on CUDA
    spectra: bool = False  # also keep every singular value (surgeon.spectra.safetensors): a full eigensolve per weight
    commit_seconds: float = COMMIT_SECONDS  # how often finished tensors are fsynced and journaled (resume points)
    seed: int = 0  # methods with random initial factors (KaSA): per-layer seeds derive from it
    kasa_beta: float = 1e-4  # KaSA's regulariser weights, recorded for the runtime (PEFT's defaults)
    kasa_gamma: float = 1e-3
    top_k: int = 2  # moe: experts kept per prompt and block (0 = all)
    pooling: str = "attention"  # moe: how the router pools the prompt (attention, mean, last)
    quantize: str | None = None  # nf4 | fp4: write the residual as bitsandbytes 4-bit codes (surgeon/quant.py)
    quantize_iters: int = 0  # LoftQ/QPiSSA alternations (pissa)
    quant_blocksize: int = 64
    double_quant: bool = False
    rank_pattern: list[str] = field(default_factory=list)  # "REGEX=R", PEFT's rank_pattern (surgeon/patterns.py)
    alpha_pattern: list[str] = field(default_factory=list)  # "REGEX=A", PEFT's alpha_pattern
    calibrate: str | None = None  # DATA: decompose W as the layer is used on this text (surgeon/engine/calibrate.py)
    calibrate_tokens: int = 65536  # calibration tokens at most
    calibrate_mode: str | None = None  # kpm | ipm | asvd; None: the method's default (options.CALIBRATE_DEFAULT_MODE)
    calibrate_peft: bool = False  # PEFT's covariance and damping settings (its CorDA), instead of ours


def file_stem(file_name: str) -> str:
    return file_name[: -len(".safetensors")]


@dataclass
class SplitJob:
    """Everything planned before any data is read."""

    opts: SplitOptions
    method: object
    cfg: MethodConfig
    new_dtype: str | None
    backend: object
    src: Source
    ckpt: Checkpoint
    model_cfg: dict
    targets: dict[str, Target]
    base_plan: list[OutTensor]
    factor_plan: list[OutTensor]
    spectra_plan: list[OutTensor]
    blocks: dict[str, dict]
    plan: dict = field(default_factory=dict)
    qspec: quant.QuantSpec | None = None  # --quantize: the residual as 4-bit codes
    layer_cfgs: dict[str, MethodConfig] = field(default_factory=dict)  # module -> its config (--rank-pattern/--alpha-pattern)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    names: NameMap | None = None  # the skeleton and checkpoint key -> loaded name (None: transformers cannot build it)
    names_why: str = ""  # why there is no skeleton
    dense: dict[str, str] = field(default_factory=dict)  # all-linear layers left dense (module -> why)
    adapter: AdapterPlan | None = None  # the PEFT names of a LoRA-shaped split (None without a skeleton)
    init_plan: list[OutTensor] = field(default_factory=list)  # surgeon.init: per expert matrix where the adapter fuses them
    calib_mode: str | None = None  # --calibrate: the mode in force (None: a plain split)
    calib_data: object = None  # surgeon.model.calibration.CalibrationData
    calib: calibrate.Calibrator | None = None
    block_hidden: int | None = None  # a per-block method: the hidden width entering its blocks (surgeon/model/routed.py)

    def out_dtype(self, stored: str) -> str:
        return self.new_dtype if (self.new_dtype and stored in FLOAT_DTYPES) else stored

    def layer(self, module: str) -> MethodConfig:
        return self.layer_cfgs.get(module, self.cfg)

    def inputs(self) -> list[Path]:
        """What no output may replace, hold or lie inside: the model folder (when one was given) and
        every file read (a model given as one file may have its output beside it)."""
        folder = [self.src.root] if self.src.hub_id or self.src.root.resolve() == Path(self.src.model).expanduser().resolve() else []
        return [*folder, *self.src.weights, *([self.src.config_file] if self.src.config_file else [])]


@dataclass
class Writers:
    base: ShardSetWriter
    factors: ShardSetWriter
    init: ShardSetWriter  # the untrained factors once more, kept beside the trainable copy for absorb and export
    spectra: ShardSetWriter | None

    @property
    def all(self) -> list[ShardSetWriter]:
        return [w for w in (self.base, self.factors, self.spectra, self.init) if w is not None]
