"""SmolLM2-135M-Instruct with a 4-bit residual: QPiSSA r=16 beats plain NF4 (issue 15's criterion)."""

from __future__ import annotations

import pytest
import torch
from conftest import logits
from test_quant import plain_nf4_logits

from surgeon.commands.split import SplitOptions, split
from surgeon.runtime import load_split

pytestmark = pytest.mark.real_model
IDS = torch.tensor([[1, 504, 3458, 314, 6462, 28, 3135, 46, 378, 2],
                    [1, 19161, 30, 2683, 314, 260, 3575, 282, 4649, 47]])


def test_qpissa_nf4_is_closer_to_the_original_than_plain_nf4(smollm2, tmp_path):
    out = tmp_path / "q"
    m = split(str(smollm2), out, SplitOptions(method="pissa", rank=16, quantize="nf4", spectra=False))
    assert m["summary"]["layers"] == 210  # every linear layer of the 30 blocks is 4-bit
    q = m["quantization"]
    assert q["layers_better_than_plain"] == 210 and q["mean_quant_error"] < 0.95 * q["mean_quant_error_plain"]
    ref = logits(smollm2, IDS)
    got = logits(load_split(out, trainable=False).model, IDS)
    plain = plain_nf4_logits(smollm2, IDS)
    err, err_plain = (got - ref).abs(), (plain - ref).abs()
    assert float(err.max()) < float(err_plain.max()) and float(err.mean()) < 0.95 * float(err_plain.mean())
