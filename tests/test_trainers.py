"""A split trained by other trainers: transformers' Trainer + vanilla PEFT (the path TRL's SFTTrainer,
LLaMA-Factory and axolotl take), then `surgeon absorb` of what PEFT saved. README: "Train it with ...".
"""

from __future__ import annotations

import json
import shutil

import torch
from conftest import logits
from safetensors.torch import load_file

from surgeon.commands.absorb import absorb
from surgeon.commands.split import SplitOptions, split

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def test_transformers_trainer_with_peft_trains_a_split_and_absorb_merges_it(tiny, tmp_path):
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    from surgeon.runtime import load_residual_model

    d = tmp_path / "split"
    split(str(tiny["tiny-llama"]), d, SplitOptions(method="pissa", rank=4, rank_pattern=[r"mlp\..*=6"]))
    assert json.loads((d / "adapter_config.json").read_text())["init_lora_weights"] is True  # PEFT re-runs no SVD on load
    # README's recipe: the residual without its adapter (transformers would attach it already), the adapter once
    model = PeftModel.from_pretrained(load_residual_model(d), d, is_trainable=True)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (x := torch.randint(2, 300, (16,), generator=g)), "labels": x.clone()} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]

    trained = tmp_path / "trained"  # a trained split: the split folder with PEFT's saved adapter in place
    shutil.copytree(d, trained)
    model.save_pretrained(tmp_path / "adapter")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(tmp_path / "adapter" / f, trained / f)
    before, after = load_file(d / "adapter_model.safetensors"), load_file(trained / "adapter_model.safetensors")
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    m = absorb(trained, tmp_path / "merged")
    assert m["base"] == "original" and m["layers_changed"] == 14
    merged = logits(model.merge_and_unload(), IDS)
    assert torch.allclose(logits(tmp_path / "merged", IDS), merged, atol=1e-4, rtol=0)
