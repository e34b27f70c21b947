"""transformers.Trainer with gradient checkpointing trains an SSAH adapter and saves only the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import VOCAB, tiny_model, tiny_units
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from ssah_peft import SSAHConfig


@pytest.mark.parametrize("mode", ["select", "protect"])
def test_trainer_with_gradient_checkpointing(tmp_path: Path, mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, VOCAB, (8, 12), generator=generator).tolist()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    base = tiny_model("llama")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    units = tiny_units()
    model = get_peft_model(base, SSAHConfig(units=units, mode=mode, r=4))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert model.base_model.model.is_gradient_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[n], p) for n, p in initial.items() if n.endswith("ssah_delta.default"))
    assert any(not torch.equal(trained[n], p) for n, p in initial.items())

    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved and "model.safetensors" not in saved

    merged = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").merge_and_unload()
    down = merged.model.layers[0].mlp.down_proj.weight
    before = base_state["model.layers.0.mlp.down_proj.weight"]
    columns = torch.tensor(units[0]["mlp"])
    others = torch.ones(down.shape[1], dtype=torch.bool)
    others[columns] = False
    if mode == "protect":
        assert torch.equal(down[:, columns], before[:, columns])
        assert not torch.equal(down[:, others], before[:, others])
    else:
        assert torch.equal(down[:, others], before[:, others])
        assert not torch.equal(down[:, columns], before[:, columns])


def test_example_script_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "finetune_tiny.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for mode in ("protect", "select"):
        assert (tmp_path / f"{mode}-adapter" / "adapter_model.safetensors").is_file()
        assert f"[{mode}] reloaded and merged" in done.stdout
