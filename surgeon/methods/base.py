"""The one small interface every split method implements.

A method turns one weight W (out, in) and its checked singular triplets into a frozen residual
plus named trainable factors, and says how to fold (possibly trained) factors back. It sees
float64 tensors on the compute device and never touches files; the pipeline does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from surgeon.errors import UsageError
from surgeon.linalg import Triplets


@dataclass(frozen=True)
class MethodConfig:
    rank: int
    alpha: float
    use_rslora: bool = False
    null_energy: float | None = None  # NuSA: energy cutoff ρ of the principal part (None: the method's default)
    null_rank: int | None = None  # NuSA: fixed null-space size n (None: chosen by the energy cutoff)

    def __post_init__(self):
        if self.null_energy is not None and not 0.0 < self.null_energy < 1.0:
            raise UsageError(f"--null-energy {self.null_energy} must lie strictly between 0 and 1 (e.g. 0.95, the NuSA-CL authors').")
        if self.null_rank is not None and self.null_rank < 1:
            raise UsageError(f"--null-rank {self.null_rank} must be at least 1.")

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
    needs_spectrum: bool = False  # split() reads every singular value (Triplets.spectrum), even with spectra off
    rslora_scale: bool = False  # the scale is always alpha/sqrt(r) (the method's own definition)
    options: tuple[str, ...] = ()  # method-specific MethodConfig fields it reads ("null_energy", ...)
    summary: str = ""

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

    # --- runtime (training / inference on a loaded transformers model) -------------------------
    def runtime(self, base: torch.nn.Module, factors: dict[str, torch.Tensor], cfg: MethodConfig, transposed: bool) -> torch.nn.Module:
        """A module replacing `base` (the residual's Linear/Conv1D) that adds the method's update,
        holding the factors as Parameters (trainable ones with requires_grad=True)."""
        from surgeon.runtime import LoRALinear

        return LoRALinear(base, factors["lora_A"], factors["lora_B"], cfg.scale, transposed)

    def lora_form(self, cur: dict[str, torch.Tensor], init: dict[str, torch.Tensor], cfg: MethodConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For methods that are not LoRA-shaped: (lora_A (r, in), lora_B (out, r)) with
        cfg.scale·B A = delta(cur) − delta(init), a rank-r PEFT LoRA on the ORIGINAL base with the
        split's r, alpha and rsLoRA flag; None when the method has no such form."""
        return None

    def regularizer(self, modules: list[torch.nn.Module]) -> torch.Tensor | None:
        """Extra training loss summed over the method's runtime modules (None: no extra loss)."""
        return None
