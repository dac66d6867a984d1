"""The model's shape, as transformers loads it: the meta-device skeleton built from config.json
(skeleton), every checkpoint key mapped to the loaded parameter it becomes through transformers' own
conversion rules (names), the targets resolved on the loaded module names as PEFT sees them (targets,
selection), fused MoE experts (moe), the PEFT adapter's plan and the load check after every write
(adapter, check, output), per-module ranks and alphas (patterns), where a module sits in a live
model (slots), and the model run one block at a time on calibration text for the input covariances
of `split --calibrate` (calibration; blockrun, calibhooks, calibdata).

    from surgeon.model import load_names
    names = load_names(config_dict, checkpoint_keys)   # a NameMap, or None when transformers cannot build it

May import surgeon.format and surgeon.errors (and transformers, PEFT); never methods or anything above.
"""

from surgeon.model.names import NameMap, Place, load_names  # noqa: F401
from surgeon.model.skeleton import build_skeleton  # noqa: F401
