"""MiLoRA: train the r minor singular components, freeze the principal part as the residual.

Follows Wang et al., "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
Finetuning" and their script: the PiSSA construction (see svdlora.py) applied to the r smallest
triplets, B = U[:, -r:] diag(√σ'), A = diag(√σ') Vh[-r:], σ' = σ[-r:]/s. The authors use α = r
(s = 1), which is surgeon's default too.
"""

from surgeon.methods.svdlora import SvdLoRA


class MiLoRA(SvdLoRA):
    name = "milora"
    which = "minor"
    summary = "the r minor singular components are trainable, the principal part is frozen"
