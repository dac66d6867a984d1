"""The one small interface every split method implements.

A method turns one weight W (out, in) and its checked singular triplets into a frozen residual
plus named trainable factors, and says how to fold (possibly trained) factors back. It sees
float64 tensors on the compute device and never touches files; the pipeline does the I/O.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

import torch

from surgeon import options
from surgeon.errors import UsageError
from surgeon.linalg import Triplets
from surgeon.methods.lora import LoRALinear


@dataclass(frozen=True)
class MethodConfig:
    rank: int
    alpha: float
    use_rslora: bool = False
    _: KW_ONLY  # method-specific options below: keyword only
    seed: int = 0  # base seed of methods with random initial factors (per-layer seeds derive from it)
    kasa_beta: float = 1e-4  # KaSA's regulariser weights (PEFT KasaConfig defaults), used by its runtime
    kasa_gamma: float = 1e-3
    module: str = ""  # the layer being split: set per layer by the pipeline, never persisted
    # moe (methods/moe.py): experts kept per prompt (0 = all, dense) and the router's pooling
    moe_top_k: int = 2
    moe_pooling: str = "attention"
    null_energy: float | None = None  # NuSA: energy cutoff ρ of the principal part (None: the method's default)
    null_rank: int | None = None  # NuSA: fixed null-space size n (None: chosen by the energy cutoff)

    def __post_init__(self):
        options.check(  # finite, in range: the one checker of numeric options (surgeon/options.py)
            ("--rank", self.rank, options.COUNT), ("--alpha", self.alpha, options.POSITIVE), ("--seed", self.seed, options.Range(integer=True)),
            ("--kasa-beta", self.kasa_beta, options.NON_NEGATIVE), ("--kasa-gamma", self.kasa_gamma, options.NON_NEGATIVE),
            ("--top-k", self.moe_top_k, options.Range(0, integer=True)), required=True,
        )
        options.check(("--null-energy", self.null_energy, options.Range(0, 1, lo_open=True, hi_open=True)), ("--null-rank", self.null_rank, options.COUNT))
        if not isinstance(self.use_rslora, bool) or not isinstance(self.moe_pooling, str):
            raise UsageError("use_rslora must be true or false and the pooling a name.")

    @property
    def scale(self) -> float:
        """PEFT's LoRA scaling: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclass
class SplitResult:
    residual: torch.Tensor  # (out, in) float64: the frozen part written in place of W
    factors: dict[str, torch.Tensor]  # factor name -> tensor, e.g. {"lora_A": (r, in), "lora_B": (out, r)}
    stats: dict = field(default_factory=dict)  # extra per-layer facts for the manifest


class Method:
    """Base class; subclasses set the class attributes and implement `split` and `delta`."""

    name: str = ""
    which: str = "minor"  # which singular triplets the method needs: "minor" or "principal"
    lora_shaped: bool = True  # its factors are a PEFT LoRA (lora_A, lora_B) on the residual
    truncates: bool = False  # residual + delta(initial factors) != W: the residual drops part of W on purpose
    # (KaSA). absorb then merges into the residual by default; --base original re-adds the dropped part.
    needs_spectrum: bool = False  # split() reads every singular value (Triplets.spectrum), even with spectra off
    rslora_scale: bool = False  # the scale is always alpha/sqrt(r) (the method's own definition)
    summary: str = ""
    options: tuple[str, ...] = ()  # MethodConfig fields beyond rank/alpha/rsLoRA it uses (kept in the manifest)
    notes: dict = {}  # design decisions written to the manifest ("method_notes")
    prompt_dependent: bool = False  # its update depends on the input: absorb needs --fixed-gates
    per_block: bool = False  # it also has tensors per transformer block (block_shapes / init_block / attach)
    frozen_factors: tuple[str, ...] = ()  # factors its runtime keeps frozen (buffers), not counted as trainable

    def check(self, cfg: MethodConfig) -> None:
        """Refuse option values the method cannot use (raise UsageError); called before any work."""

    def default_alpha(self, rank: int) -> float:
        """--alpha when not given: rank, scale 1 (the MiLoRA authors' choice)."""
        return float(rank)

    def manifest_extra(self, cfg: MethodConfig) -> dict:
        """Method options recorded at the top level of surgeon.json."""
        return {}

    def factor_shapes(self, out_features: int, in_features: int, cfg: MethodConfig) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def split(self, w: torch.Tensor, t: Triplets, cfg: MethodConfig) -> SplitResult:
        raise NotImplementedError

    def delta(self, factors: dict[str, torch.Tensor], cfg: MethodConfig) -> torch.Tensor:
        """The (out, in) weight that the factors add to the residual: W = residual + delta."""
        raise NotImplementedError

    def lora_form(self, factors: dict[str, torch.Tensor], cfg: MethodConfig) -> dict[str, torch.Tensor] | None:
        """For a method that is not LoRA-shaped: its factors as an ordinary rank-r PEFT LoRA on the
        residual, {"lora_A": (r, in), "lora_B": (out, r)} with scaling cfg.scale, or None if it has none."""
        return None

    def describe(self, cfg: MethodConfig) -> dict:
        """Method-specific facts and decisions for the manifest ("method_details"); {} for none."""
        return {}

    # --- runtime (training / inference on a loaded transformers model) -------------------------
    def runtime(self, base: torch.nn.Module, factors: dict[str, torch.Tensor], cfg: MethodConfig, transposed: bool) -> torch.nn.Module:
        """A module replacing `base` (the residual's Linear/Conv1D) that adds the method's update,
        holding the factors as Parameters (trainable ones with requires_grad=True)."""
        return LoRALinear(base, factors["lora_A"], factors["lora_B"], cfg.scale, transposed)

    def lora_change(self, cur: dict[str, torch.Tensor], init: dict[str, torch.Tensor], cfg: MethodConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For methods that are not LoRA-shaped: (lora_A (r, in), lora_B (out, r)) with
        cfg.scale·B A = delta(cur) − delta(init), a rank-r PEFT LoRA on the ORIGINAL base with the
        split's r, alpha and rsLoRA flag; None when the method has no such form."""
        return None

    def regularizer(self, modules: list[torch.nn.Module]) -> torch.Tensor | None:
        """Extra training loss summed over the method's runtime modules (None: no extra loss)."""
        return None

    # --- per-block tensors (a method whose trainable state spans a whole block, e.g. moe's router) ---
    # The pipeline groups the targets by transformer block ("model.layers.3"), plans
    # block_shapes(...) for each block under keys "<block>.<name>" in surgeon.factors.safetensors,
    # writes init_block(...) there, and records {"experts": [modules], "hidden": d} per block in the
    # manifest ("blocks"). load_split hands those tensors to attach(...) after wrapping every layer.
    def block_shapes(self, hidden: int, n_experts: int, cfg: MethodConfig) -> dict[str, tuple[int, ...]]:
        return {}

    def init_block(self, index: int, hidden: int, n_experts: int, cfg: MethodConfig) -> dict[str, torch.Tensor]:
        return {}

    def attach(self, model: torch.nn.Module, modules: dict, blocks: dict, cfg: MethodConfig, manifest: dict) -> dict:
        """Install per-block runtime state on `model`; returns block name -> module holding its tensors
        (with a `factors()` method, saved like the layers' factors)."""
        return {}

    def fixed_gates(self, split, path, calibrate=None) -> tuple[dict[str, float], dict]:
        """For prompt-dependent methods: module -> multiplier of its delta for absorb, and a record;
        `calibrate(split_dir, prompts_path) -> (gates, n)` averages gates over prompts (surgeon.runtime.calibrate)."""
        raise NotImplementedError
