"""PiSSA: train the r principal singular components (the reference baseline).

Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
Models"; identical to PEFT's `init_lora_weights="pissa"` (full SVD variant): the r largest
triplets, scaled by 1/s before √σ' is split between A and B.
"""

from surgeon.methods.svdlora import SvdLoRA


class PiSSA(SvdLoRA):
    name = "pissa"
    which = "principal"
    summary = "the r principal singular components are trainable, the minor part is frozen"
