"""surgeon.linalg.calibrated (CorDA / ASVD triplets) and the methods on calibrated triplets: no files.

    python -m pytest -q tests/test_calibrated_math.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from surgeon.errors import UsageError
from surgeon.linalg import calibrated, decompose, get_backend, output_share
from surgeon.methods import MethodConfig, get_method

CPU = get_backend("cpu")


def _layer(out=48, inp=32, n=600, seed=0, massive=True):
    """W (out, in) and the covariance of inputs with a few large channels (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64) / inp**0.5
    x = torch.randn(n, inp, generator=g, dtype=torch.float64)
    if massive:
        x[:, :3] *= 40.0
    return w, x.mT @ x, x


def _sin(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest sin of the principal angles between the column spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    c = torch.linalg.svdvals(qa.mT @ qb).clamp(max=1.0)
    return float((1 - c.min() ** 2).clamp_min(0).sqrt())


@pytest.mark.parametrize("mode,which", [("kpm", "minor"), ("ipm", "principal")])
def test_corda_takes_the_components_of_w_times_c_and_maps_them_back(mode, which):
    w, cov, x = _layer()
    t, rec = calibrated(w, cov, x.shape[0], 4, mode, CPU)
    c = cov / x.shape[0]
    u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)  # the reference: a plain float64 SVD of W C
    sel = slice(-4, None) if which == "minor" else slice(0, 4)
    assert rec["which"] == which and rec["regularised"] is False and rec["damping"] == 0.0
    assert _sin(t.U, u[:, sel]) < 1e-6  # the check's tolerance (the Gram route: ~1e-8 here)
    reference = (u[:, sel] * s[sel]) @ torch.linalg.solve(c, vh[sel].mT).mT  # U Σ Vᵀ C⁻¹ (C symmetric)
    assert torch.allclose((t.U * t.S) @ t.Vh, reference, atol=1e-7, rtol=0)
    assert torch.allclose(t.Vh.norm(dim=1), torch.ones(4, dtype=torch.float64))  # unit rows, the size in S
    assert rec["back_error"] < 1e-8 and t.calibrated


def test_all_components_recombine_to_w():
    w, cov, x = _layer(out=20, inp=12)
    t, _ = calibrated(w, cov, x.shape[0], 11, "ipm", CPU)
    last, _ = calibrated(w, cov, x.shape[0], 1, "kpm", CPU)
    full = (t.U * t.S) @ t.Vh + (last.U * last.S) @ last.Vh  # 11 largest + the smallest = all 12
    assert float((full - w).abs().max()) < 1e-11


def test_kpm_drops_less_output_than_the_plain_minor_components():
    """The point of calibrating: the r components of W C carry less of the layer's output than W's own minor r."""
    w, cov, x = _layer(seed=3)
    t, _ = calibrated(w, cov, x.shape[0], 6, "kpm", CPU)
    p = decompose(w, 6, "minor", CPU)
    share_cal = output_share((t.U * t.S) @ t.Vh, w, cov)
    share_plain = output_share((p.U * p.S) @ p.Vh, w, cov)
    direct = float(((x @ ((t.U * t.S) @ t.Vh).mT) ** 2).sum() / ((x @ w.mT) ** 2).sum())  # ‖X Δᵀ‖² / ‖X Wᵀ‖²
    assert share_cal == pytest.approx(direct, rel=1e-9)
    assert share_cal < 0.5 * share_plain


def test_singular_covariance_is_regularised_as_corda_and_says_so():
    w, _, x = _layer(inp=32, n=10)  # 10 samples in 32 dimensions: C has rank 10
    cov = x.mT @ x
    t, rec = calibrated(w, cov, 10, 4, "kpm", CPU)
    assert rec["regularised"] is True
    ratio = rec["damping"] / (0.01 * float((cov / 10).diagonal().mean()))  # CorDA: 0.01·mean(diag C), doubled
    assert ratio >= 1 and float(torch.tensor(ratio).log2()) == pytest.approx(round(float(torch.tensor(ratio).log2())))
    assert rec["inverse_error"] < 1e-8 and bool(torch.isfinite(t.Vh).all())


def test_peft_settings_match_peft_corda_on_the_same_covariance():
    """--calibrate-peft: the same damping rule as PEFT's collect_eigens_for_layer, on one nn.Linear."""
    from peft.tuners.lora.corda import collect_eigens_for_layer

    w, cov, x = _layer(out=64, inp=40, seed=5)
    c = (cov / x.shape[0]).float()
    lin = nn.Linear(40, 64, bias=False)
    lin.weight.data = w.float()
    lin.covariance_matrix = c
    eig = collect_eigens_for_layer(lin, None)  # U_WC (out, k), S_WC (k,), V_WC (in, k) = (Vh C̃⁻¹)ᵀ
    for mode, sel in (("ipm", slice(0, 6)), ("kpm", slice(-6, None))):
        t, rec = calibrated(w, c.double(), 1, 6, mode, CPU, peft=True)
        assert rec["damping"] == pytest.approx(0.01 * float(c.diagonal().mean()), rel=1e-6)
        assert _sin(t.U, eig.U_WC[:, sel]) < 1e-4
        assert _sin(t.Vh.mT, eig.V_WC[:, sel]) < 1e-4


def test_asvd_scales_by_the_activation_rms():
    w, cov, x = _layer(seed=2)
    t, rec = calibrated(w, cov, x.shape[0], 5, "asvd", CPU, which="minor")
    scale = (cov.diagonal() / x.shape[0]).sqrt() ** 0.5
    u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)  # W diag(S)
    assert rec["which"] == "minor" and _sin(t.U, u[:, -5:]) < 1e-6
    assert torch.allclose((t.U * t.S) @ t.Vh, (u[:, -5:] * s[-5:]) @ (vh[-5:] / scale), atol=1e-7, rtol=0)


def test_unknown_mode_and_bad_covariance_are_usage_errors():
    w, cov, x = _layer()
    with pytest.raises(UsageError, match="calibration mode"):
        calibrated(w, cov, x.shape[0], 4, "best", CPU)
    with pytest.raises(UsageError, match="do not match"):
        calibrated(w, cov[:5, :5], x.shape[0], 4, "kpm", CPU)


@pytest.mark.parametrize("name", ["milora", "pissa", "kasa", "nusa"])
def test_methods_on_calibrated_triplets_are_exact(name):
    """residual + delta(factors) == W for the trainable methods; KaSA: residual + the truncated part == W."""
    method = get_method(name)
    w, cov, x = _layer(seed=7)
    mode = "ipm" if name == "pissa" else "kpm"
    t, _ = calibrated(w, cov, x.shape[0], 6, mode, CPU, which=method.which)
    cfg = dataclasses.replace(MethodConfig(6, method.default_alpha(6), method.rslora_scale), module="layers.0.q_proj")
    res = method.split(w, t, cfg)
    f = {k: v.double() for k, v in res.factors.items()}
    if method.truncates:
        assert float((res.residual + (t.U * t.S) @ t.Vh - w).abs().max()) < 1e-12
    else:
        assert float((res.residual + method.delta(f, cfg) - w).abs().max()) < 1e-12
    if name == "nusa":  # the frozen input basis stays orthonormal although Vᵀ C⁻¹ is not
        e = res.stats["effective_rank"]
        a = f["nusa_A"][:e]
        assert float((a @ a.mT - torch.eye(e, dtype=torch.float64)).abs().max()) < 1e-6
        assert _sin(a.mT, t.Vh[6 - e:].mT) < 1e-6


def test_nusa_plain_triplets_keep_their_bits():
    """Calibration's QR applies to calibrated triplets only: a plain split's A is Vh itself."""
    method = get_method("nusa")
    w, _, _ = _layer()
    t = decompose(w, 6, "minor", CPU)
    res = method.split(w, t, dataclasses.replace(MethodConfig(6, 2.0, True), module="m"))
    e = res.stats["effective_rank"]
    assert torch.equal(res.factors["nusa_A"][:e], t.Vh[6 - e:].float())


def test_whiten_truncation_is_the_least_output_change():
    """whiten: the r smallest components of W L (C = L Lᵀ) change the layer's output on the text least
    of every rank-r removal: their share is Σ of the r smallest σ²(W L) / ‖W L‖², below CorDA's and the plain one."""
    w, cov, x = _layer(seed=11)
    n = x.shape[0]
    t, rec = calibrated(w, cov, n, 6, "whiten", CPU, which="minor")
    l = torch.linalg.cholesky(cov / n)
    s = torch.linalg.svdvals(w @ l)
    share = output_share((t.U * t.S) @ t.Vh, w, cov)
    assert rec["which"] == "minor" and share == pytest.approx(float(s[-6:].square().sum() / s.square().sum()), rel=1e-8)
    kpm, _ = calibrated(w, cov, n, 6, "kpm", CPU)
    plain = decompose(w, 6, "minor", CPU)
    assert share <= output_share((kpm.U * kpm.S) @ kpm.Vh, w, cov) and share <= output_share((plain.U * plain.S) @ plain.Vh, w, cov)
