"""The one small interface every split method implements.

A method turns one weight W (out, in) and its checked singular triplets into a frozen residual
plus named trainable factors, and says how to fold (possibly trained) factors back. It sees
float64 tensors on the compute device and never touches files; the pipeline does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from surgeon.linalg import Triplets


@dataclass(frozen=True)
class MethodConfig:
    rank: int
    alpha: float
    use_rslora: bool = False
    seed: int = 0  # base seed of methods with random initial factors (per-layer seeds derive from it)
    kasa_beta: float = 1e-4  # KaSA's regulariser weights (PEFT KasaConfig defaults), used by its runtime
    kasa_gamma: float = 1e-3
    module: str = ""  # the layer being split: set per layer by the pipeline, never persisted

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
    summary: str = ""

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
        from surgeon.runtime import LoRALinear

        return LoRALinear(base, factors["lora_A"], factors["lora_B"], cfg.scale, transposed)

    def regularizer(self, modules: list[torch.nn.Module]) -> torch.Tensor | None:
        """Extra training loss summed over the method's runtime modules (None: no extra loss)."""
        return None
