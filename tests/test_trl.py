"""TRL's SFTTrainer with an SSAH peft_config: chat-formatted data, completion-only loss, save and reload."""

from __future__ import annotations

from pathlib import Path

import torch
import trl
from datasets import Dataset
from helpers import tiny_model, tiny_tokenizer
from peft import PeftModel

from ssah_peft import SSAHConfig, SSAHLayer


def chat_dataset() -> Dataset:
    questions = ["What is 2 + 3?", "Name a colour.", "Spell cat backwards.", "Is ice cold?"]
    answers = ["5", "Blue.", "tac", "Yes, it is."]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": q}] for q in questions],
            "completion": [[{"role": "assistant", "content": a}] for a in answers],
        }
    )


def test_sft_trainer_completion_only(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=128, pad_token_id=tokenizer.pad_token_id)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    units = {0: {"mlp": [1, 4, 9], "attn": [0, 1, 2, 3, 4, 5, 6, 7]}, 1: {"mlp": [2]}}
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        completion_only_loss=True,
        bf16=False,  # fp32 on CPU, so the reloaded logits can be compared exactly
        max_length=64,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=chat_dataset(),
        processing_class=tokenizer,
        peft_config=SSAHConfig(units=units, mode="select"),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels == -100).any() and (labels != -100).any()  # prompt tokens are masked, completion tokens are not
    first_target = (labels[0] != -100).nonzero()[0].item()
    prompt = tokenizer.decode(ids[0, :first_target])
    assert prompt.endswith("<|im_start|>assistant\n")

    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    deltas = [p for n, p in trainer.model.named_parameters() if "ssah_delta" in n]
    assert deltas and all(p.abs().sum() > 0 for p in deltas)

    trainer.save_model(str(tmp_path / "adapter"))
    base = tiny_model("llama", vocab_size=128, pad_token_id=tokenizer.pad_token_id)
    assert all(torch.equal(v, base_state[k]) for k, v in base.state_dict().items())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert sum(isinstance(m, SSAHLayer) for m in reloaded.modules()) == 8  # gate/up/down x2 layers, q and o of layer 0
    probe = ids[:1]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, trainer.model(probe).logits, rtol=0, atol=1e-6)
