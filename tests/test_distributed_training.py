"""DDP training under `accelerate launch` with 2 gloo processes equals one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import PeftModel
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.parametrize("mode", ["select", "protect"])
def test_two_process_ddp_equals_one_process(tmp_path: Path, mode: str) -> None:
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--mode", mode, "--cpu", "--gradient-checkpointing", "--steps", "3"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", str(free_port())]
    launch([*accelerate, str(SCRIPT), *common, "--per-device-batch", "2", "--out", str(tmp_path / "ddp")])
    launch([sys.executable, str(SCRIPT), *common, "--per-device-batch", "4", "--out", str(tmp_path / "single")])

    rank0 = torch.load(tmp_path / "ddp" / "adapter-rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "adapter-rank1.pt")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5)
    initial_zero = [k for k in ddp if k.endswith(("ssah_delta", "ssah_B"))]
    assert initial_zero and any(ddp[k].abs().sum() > 0 for k in initial_zero)  # it trained

    base = tiny_model("llama")
    merged = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ddp" / "adapter").merge_and_unload()
    before, after = base.model.layers[0].mlp.down_proj.weight, merged.model.layers[0].mlp.down_proj.weight
    columns = torch.tensor([1, 2, 3])  # the script's default units
    if mode == "protect":
        assert torch.equal(after[:, columns], before[:, columns])
    else:
        others = torch.ones(before.shape[1], dtype=torch.bool)
        others[columns] = False
        assert torch.equal(after[:, others], before[:, others])
