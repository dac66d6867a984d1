"""The reported error is what the written files reconstruct against the ORIGINAL weights (issue 23).

    python -m pytest -q tests/test_exactness.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgeon.commands.split import SplitOptions, split
from surgeon.format.splitdir import INIT_FACTORS
from surgeon.methods import get_method, names
from surgeon.methods.folder import SplitDir


def _tensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob(pattern)):
        out.update(load_file(f))
    return out


def measured_errors(src: Path, d: Path) -> dict[str, float]:
    """‖W − (W_res + delta(initial factors))‖/‖W‖ per layer, from the files alone, in float64."""
    sd = SplitDir(d)
    orig, res, init = _tensors(src, "model*.safetensors"), _tensors(d, "model*.safetensors"), load_file(d / INIT_FACTORS)
    out = {}
    for module, lay in sd.layers.items():
        w, r = orig[f"{module}.weight"].double(), res[f"{module}.weight"].double()
        w, r = (w.mT, r.mT) if lay["transposed"] else (w, r)  # (out, in)
        cfg = sd.layer_cfg(module)
        factors = {f: init[sd.factor_key(module, f)] for f in sd.method.factor_shapes(1, 1, cfg)}
        delta = sd.method.delta(factors, cfg)  # (out, in)
        out[module] = float(torch.linalg.matrix_norm(w - r - delta) / torch.linalg.matrix_norm(w))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", names())
def test_reported_error_is_the_error_of_the_files_against_the_original(tiny, tmp_path, method, dtype):
    d = tmp_path / "split"
    m = split(str(tiny["tiny-llama"]), d, SplitOptions(method=method, rank=4, dtype=dtype))
    got = measured_errors(tiny["tiny-llama"], d)
    for module, err in got.items():
        assert m["layers"][module]["reconstruction_error"] == pytest.approx(err, rel=1e-6, abs=1e-12), module
    assert m["summary"]["worst_reconstruction_error"] == pytest.approx(max(got.values()), rel=1e-6, abs=1e-12)
    assert json.loads((d / "surgeon.json").read_text())["summary"] == m["summary"]
    meaning = m["summary"]["error_meaning"]
    if get_method(method).truncates:  # KaSA: the truncation shows, far above rounding, and is named
        assert max(got.values()) > 1e-3 and "NOT the original" in meaning
        assert all(lay["target_error"] < lay["reconstruction_error"] for lay in m["layers"].values())
        if dtype == "float32":  # against its own truncated target it looked perfect: 1e-7 instead of 1e-3
            assert all(lay["target_error"] < 1e-6 for lay in m["layers"].values())
    elif dtype == "float32":
        assert max(got.values()) < 1e-6 and "float32 precision" in meaning
    else:
        assert 1e-4 < max(got.values()) < 1e-2 and "--dtype float32" in meaning and "not equal" in meaning


def test_card_states_the_error_against_the_original(tiny, tmp_path):
    d = tmp_path / "split"
    split(str(tiny["tiny-llama"]), d, SplitOptions(method="milora", rank=4, dtype="bfloat16"))
    card = (d / "README.md").read_text()
    assert "which equals the source model" not in card
    assert "against the original" in card and "--dtype float32 for an exact split" in card


def test_kasa_error_is_what_the_truncation_removed(tiny, tmp_path):
    """For KaSA with float32 base: the reported error is ‖removed‖/‖W‖ = sqrt(Σ σ_removed²)/‖W‖."""
    d = tmp_path / "kasa"
    m = split(str(tiny["tiny-llama"]), d, SplitOptions(method="kasa", rank=4, dtype="float32"))
    w_all = _tensors(tiny["tiny-llama"], "model*.safetensors")
    for module, lay in m["layers"].items():
        w = w_all[f"{module}.weight"].double()
        s = torch.linalg.svdvals(w)
        want = float(s[-4:].square().sum().sqrt() / s.square().sum().sqrt())
        assert lay["reconstruction_error"] == pytest.approx(want, rel=1e-5), module
