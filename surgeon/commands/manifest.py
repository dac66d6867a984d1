"""The manifest of a split (surgeon.json): what was done, with which settings, per layer."""

from __future__ import annotations

import dataclasses

from surgeon.format.dtypes import CONFIG_DTYPE
from surgeon.methods import MethodConfig
from surgeon.version import __version__


def method_config(cfg: MethodConfig) -> dict:
    """The persisted MethodConfig (everything but the per-layer `module`); SplitDir reads it back."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "module"}


def build_manifest(src, method, cfg, opts, new_dtype, backend, layers, target_modules, targets, tensor_hashes) -> dict:
    """surgeon.json of a split. Deterministic: a resumed run writes the same bytes; timings go to
    the run log (surgeon.run.json)."""
    solvers: dict[str, int] = {}
    for lay in layers.values():
        solvers[lay["solver"]] = solvers.get(lay["solver"], 0) + 1
    errs = [lay["reconstruction_error"] for lay in layers.values()]
    return {
        "surgeon_version": __version__,
        "operation": "split",
        "method": method.name,
        "method_summary": method.summary,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "scale": cfg.scale,
        "use_rslora": cfg.use_rslora,
        "method_config": method_config(cfg),
        **({"method_details": method.describe(cfg)} if method.describe(cfg) else {}),
        **method.manifest_extra(cfg),
        "peft_adapter": method.lora_shaped,
        "factor_dtype": "float32",
        "residual_dtype": CONFIG_DTYPE.get(new_dtype, "as source") if new_dtype else "as source",
        "source": {"model": src.model, "hub_id": src.hub_id, "revision": src.revision, "files": src.fingerprint(), **src.card_metadata(),
                   "pickled": src.pickled, "tensor_hashes": tensor_hashes},
        "target": list(opts.target),
        "target_modules": target_modules,
        "transposed": any(t.transposed for t in targets.values()),
        "device": str(backend.device),
        "backend": backend.name,
        "solver": opts.solver,
        "tol": opts.tol,
        "summary": {
            "layers": len(layers),
            "solvers": solvers,
            "worst_reconstruction_error": max(errs) if errs else 0.0,
            "worst_subspace_bound": max((lay["subspace_bound"] for lay in layers.values()), default=0.0),
            "mean_factor_energy": sum(lay["factor_energy"] for lay in layers.values()) / max(len(layers), 1),
        },
        "layers": layers,
    }


def error_meaning(method, base_dtype: str, quantized: bool = False) -> str:
    """What the worst reconstruction error says about the split's outputs, in one sentence.

    The error is ‖W − (W_res + s·B·A)‖/‖W‖ against the ORIGINAL weight, with the factors as written
    (for KaSA this includes the r components its truncation removes). Measured on SmolLM2-135M
    (`surgeon check`, its built-in 255-token sample): a float32 base of a milora r=16 split reproduces the
    logits to 1.2e-4; a bfloat16 base moves them by up to 0.26 (99.6% top-1 agreement); KaSA r=8 on
    all linear layers agrees on 1.6% of the next tokens (perplexity × 281)."""
    if quantized:
        return "4-bit rounding of the residual: the split approximates the original model; `surgeon check SPLIT` measures how closely."
    if method.truncates:
        return (f"{method.name} removes part of every weight on purpose: the split is NOT the original model until trained; "
                "`surgeon check SPLIT` measures the change on text (top-1 agreement, perplexity).")
    if base_dtype == "F32":
        return "float32 rounding only: the split reproduces the original model to float32 precision."
    return (f"{CONFIG_DTYPE.get(base_dtype, base_dtype)} rounding of the residual: the split is close to, not equal to, the original model "
            "(SmolLM2-135M, milora r=16, bfloat16 base: max |Δlogit| 0.26, 99.6% top-1 agreement on 255 tokens); split with --dtype float32 "
            "for an exact split, and `surgeon check SPLIT` measures it.")


def truncation_warnings(method, layers: dict[str, dict], limit: float = 5e-4) -> list[str]:
    """A method whose residual drops part of W (KaSA) changes the untrained model: say where the
    dropped part (its factor_energy) exceeds `limit` of a layer's spectral energy. Energy understates
    the harm: on SmolLM2 one minor component of v_proj holds 0.08% of its energy but 21% of its output
    on real text, and removing it multiplies perplexity by 9 (bench/eval_methods_v1.md, KaSA sweep), while
    q_proj's 8 smallest hold 3e-7 and change nothing. So the limit is low and the advice is to measure."""
    if not method.truncates:
        return []
    over = {m: lay["factor_energy"] for m, lay in layers.items() if lay["factor_energy"] > limit}
    if not over:
        return []
    worst = max(over, key=over.get)
    return [f"{method.name} removes {100 * over[worst]:.2g}% of the spectral energy of {worst} ({len(over)} of {len(layers)} layers lose "
            f"more than {100 * limit:g}%; inputs can align with minor directions, so even small fractions can break the untrained "
            "model): measure perplexity with `surgeon check SPLIT` before training, or lower --rank or narrow --target."]
