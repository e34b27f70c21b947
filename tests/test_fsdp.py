"""FSDP2 (``fully_shard``) training with 2 gloo processes on CPU equals one process on the same global batch.

``examples/train_fsdp.py`` shards every decoder layer and the root of a peft-wrapped tiny llama over 2 processes
(the adapter tensors become DTensors holding a dim-0 shard each), trains in a plain AdamW loop and gathers the full
state on process 0. The references run the same script in this process, unsharded.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_update_confined, tiny_model
from peft import PeftModel
from safetensors.torch import load_file
from test_distributed_training import ROOT, free_port, launch

SCRIPT = ROOT / "examples" / "train_fsdp.py"


def train_here(argv: list[str]) -> None:
    """The script's single-process run in this process, with the kernels' thread count of the launched ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # launch() runs the processes with OMP_NUM_THREADS=1
    try:
        runpy.run_path(str(SCRIPT))["main"](argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["select", "protect"])
def test_two_process_fsdp_equals_one_process(tmp_path: Path, mode: str) -> None:
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--mode", mode, "--steps", "3", "--batch", "4", "--cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch([*torchrun, "--master_port", str(free_port()), str(SCRIPT), *common, "--out", str(tmp_path / "fsdp")])
    train_here([*common, "--out", str(tmp_path / "single")])  # the whole global batch at once
    # the whole global batch in the two halves the processes took, gradients accumulated
    train_here([*common, "--accumulate", "2", "--out", str(tmp_path / "halves")])

    # the adapter was sharded during training: on each process every trainable tensor (and its gradient) was a
    # DTensor sharded on dim 0, holding its part of the rows
    ranks = json.loads((tmp_path / "fsdp" / "sharding.json").read_text())
    assert len(ranks) == 2 and ranks[0].keys() == ranks[1].keys()
    fsdp = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    trained = [key for key in fsdp if not key.endswith("ssah_index")]
    assert len(ranks[0]) == len(trained) > 0
    for name, rank0 in ranks[0].items():
        rank1 = ranks[1][name]
        for record in (rank0, rank1):
            assert (record["type"], record["grad_type"], record["placements"]) == ("DTensor", "DTensor", ["S(0)"])
            assert record["local_shape"][1:] == record["shape"][1:]
        assert rank0["local_shape"][0] + rank1["local_shape"][0] == rank0["shape"][0]
        assert rank0["local_shape"][0] < rank0["shape"][0]

    # Bit-exact against one process that accumulates the gradients of the same two halves: FSDP all-gathers exact
    # parameters, each process computes its half's gradient with the same kernels, and the reduce-scatter's
    # average (a + b) / 2 equals the accumulated a / 2 + b / 2 exactly; AdamW is elementwise, so stepping on
    # shards changes nothing.
    halves = load_file(tmp_path / "halves" / "adapter" / "adapter_model.safetensors")
    assert fsdp.keys() == halves.keys()
    assert all(torch.equal(fsdp[key], halves[key]) for key in fsdp)

    # Against one process on the whole batch only the float32 summation order differs (the 4-row mean vs the
    # mean of two 2-row means); seen: 1.2e-6 (protect) and 2.4e-8 (select) after 3 steps at lr 1e-2. It is this
    # large because Adam divides each gradient entry by its own magnitude: a protect-mode B entry whose gradient
    # is 2.8e-8, near Adam's eps (1e-8), turns the rounding of its sum into a 1e-6 step; the 2-half reference
    # above differs from the whole batch by the same 1.2e-6, without any process group.
    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert fsdp.keys() == single.keys()
    for key in fsdp:
        torch.testing.assert_close(fsdp[key], single[key], rtol=0, atol=1e-5)
    losses = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    single_losses = json.loads((tmp_path / "single" / "losses.json").read_text())[0]
    assert losses[0] != losses[1]  # the processes took different rows
    assert sum(losses[0]) + sum(losses[1]) == pytest.approx(2 * sum(single_losses), abs=1e-4)
    initial_zero = [key for key in fsdp if key.endswith(("ssah_delta", "ssah_B"))]
    assert initial_zero and all(fsdp[key].abs().sum() > 0 for key in initial_zero)  # every layer trained

    # the frozen base, gathered from its shards, is the model as loaded
    base = torch.load(tmp_path / "fsdp" / "base.pt")
    expected = tiny_model("llama").state_dict()
    assert base.keys() == expected.keys()
    assert all(torch.equal(base[key], expected[key]) for key in base)

    # the gathered adapter loads as a peft adapter, and its update is zero outside the slices its mode may change
    assert_update_confined(PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "fsdp" / "adapter"), mode)
