"""What the scorer's hooks cost a GPU, checked on the CPU: no host-device synchronisation, no float copy of a batch.

A forward pre-hook on every output projection runs once per layer and batch, so anything it makes the device wait
for, or any copy of the ``[tokens, width]`` activation it makes, is paid dozens of times per batch. The operators
the hooks run are recorded with a dispatch mode: they are the same on any CPU and are what a GPU would launch. The
path a CUDA device takes (one Welford reduction per batch, :func:`batch_moments` with ``one_read=True``)
is forced here to check it without a GPU: its operators with the CPU's kernel of the same operator, its exactness
with that operator's CUDA contract (mean and variance in float32 for a half-precision batch), which the CPU's kernel
does not keep.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_scoring import assert_scores_close, direct_scores, random_pairs, tiny_model, word_tokenizer

from ssah_peft import build_calibration_batches, score_units
from ssah_peft.scoring import accumulators, scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dispatch_counts import OperatorCounter  # noqa: E402  (benchmarks/dispatch_counts.py)
from scoring import counting_hooks  # noqa: E402  (benchmarks/scoring.py: its --count-ops hooks)


def force_one_read(monkeypatch: pytest.MonkeyPatch, cuda_contract: bool = True) -> None:
    """Make the hooks take the one-read path; with ``cuda_contract``, with CUDA's results for its operator."""
    batch_moments = accumulators.batch_moments
    monkeypatch.setattr(accumulators, "batch_moments", lambda x, one_read: batch_moments(x, one_read=True))
    if cuda_contract:
        monkeypatch.setattr(torch, "batch_norm_update_stats", cuda_batch_norm_update_stats)


def cuda_batch_norm_update_stats(x, running_mean, running_var, momentum):
    """CUDA's ``batch_norm_update_stats`` without running statistics: per channel (dim 1) mean and variance
    (divided by the count) in the accumulation type, float32 for half precision (CUDA's Welford rounds in float32;
    this rounds once, which the 1e-6 tolerances cover)."""
    assert running_mean is None and running_var is None and x.dim() == 2
    exact = x.double()
    mean = exact.mean(dim=0)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return mean.to(dtype), (exact - mean).square().mean(dim=0).to(dtype)


def test_the_one_read_operator_returns_the_mean_and_the_variance_divided_by_the_count():
    # the operator's meaning is the same on every device; float64 in, float64 out on the CPU too
    x = torch.randn(37, 5, dtype=torch.float64) * 3 + 100
    mean, variance = torch.batch_norm_update_stats(x, None, None, 0.0)
    torch.testing.assert_close(mean, x.mean(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(variance, x.var(dim=0, correction=0), rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    return build_calibration_batches(word_tokenizer(), random_pairs(11, seed=1), batch_size=4, padding_side="left")


@pytest.mark.parametrize("one_read", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_batch_moments_are_centred(monkeypatch, dtype, one_read):
    if one_read:
        monkeypatch.setattr(torch, "batch_norm_update_stats", cuda_batch_norm_update_stats)
    # channels whose mean is 100 to 1000 times their spread: E[x²] − mean² in float32 is off by up to 1% here
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([100.0, -300.0, 0.0, 1000.0])
    x = (offsets + torch.randn(333, 4, generator=generator) * torch.tensor([1.0, 0.5, 1.0, 4.0])).to(dtype)
    compute_dtype = torch.promote_types(dtype, torch.float32)
    mean, variance = accumulators.batch_moments(x, one_read=one_read)
    assert mean.dtype == variance.dtype == compute_dtype
    exact = x.double()
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean.double(), exact.mean(dim=0), rtol=rtol, atol=0)
    torch.testing.assert_close(variance.double(), exact.var(dim=0, correction=0), rtol=rtol, atol=0)
    mean, variance = accumulators.batch_moments(x[:1], one_read=one_read)
    assert torch.equal(mean, x[0].to(compute_dtype)) and not variance.any()


@pytest.mark.parametrize("one_read", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_both_paths_score_exactly_with_and_without_a_gather(monkeypatch, batches, dtype, one_read):
    if one_read:
        force_one_read(monkeypatch)
    model = tiny_model("llama", dtype=dtype)
    # every position scored (the hooks read the layer's input itself, which must stay as it is), and padded
    # batches (a gathered copy)
    unpadded = build_calibration_batches(word_tokenizer(), random_pairs(3, seed=2), batch_size=1, tokens="both")
    assert all(b["score_mask"].all() for b in unpadded) and not all(b["score_mask"].all() for b in batches)
    for data in (unpadded, batches, unpadded + batches):
        for method in ("variance", "wanda"):
            scores = score_units(model, data, method=method, show_progress_bar=False)
            assert_scores_close(scores, direct_scores(model, data, method), rtol=1e-6)


@pytest.mark.parametrize("one_read", [False, True])
def test_hooks_never_wait_for_the_device_nor_copy_the_batch_to_float64(monkeypatch, batches, one_read):
    if one_read:  # the operators the GPU runs: the CPU's kernel of the same operator
        force_one_read(monkeypatch, cuda_contract=False)
    counter = OperatorCounter()
    model = tiny_model("llama", dtype=torch.bfloat16)
    with counting_hooks(counter):
        score_units(model, batches, method="variance", show_progress_bar=False)
    assert counter.calls and counter.operators.total(), "the hooks ran no operator"
    assert not counter.synchronising
    width = max(model.config.hidden_size, model.config.intermediate_size)  # the widest output projection input
    # float64 only for the state and the buffered batches' moments (width-sized rows), never a batch of tokens
    assert counter.largest[torch.float64] <= accumulators.PENDING_BATCHES * width
    if one_read:  # one reduction reads the bf16 batch as it is: no float copy of it at all
        assert all(
            n <= width for dtype, n in counter.largest.items() if dtype.is_floating_point and dtype != torch.bfloat16
        )
        assert counter.operators["aten::batch_norm_update_stats"] == counter.calls


@pytest.mark.parametrize("pending", [1, 2, 3])
def test_buffered_batch_moments_merge_exactly_across_the_buffer(monkeypatch, pending):
    # 10 batches of 2 sequences: the buffer fills and merges several times, and a part-filled one merges at the end
    monkeypatch.setattr(accumulators, "PENDING_BATCHES", pending)
    model = tiny_model("llama")
    data = build_calibration_batches(word_tokenizer(), random_pairs(20, seed=3), batch_size=2, padding_side="left")
    assert len(data) > 2 * pending + 1
    for method in ("variance", "wanda"):
        scores = score_units(model, data, method=method, show_progress_bar=False)
        assert_scores_close(scores, direct_scores(model, data, method), rtol=1e-6)
        assert scores.num_tokens == sum(int(b["score_mask"].sum()) for b in data)


def test_each_batch_is_prepared_one_batch_ahead_and_keeps_its_mask():
    # the next batch is prepared (its mask read back, on a GPU) before the current one is handed to the forward
    events = []

    def prepare(batch):
        events.append(("prepare", batch["id"]))
        return {"input_ids": batch["input_ids"]}, batch["mask"]

    batches = [
        {"id": i, "input_ids": torch.full((1, 2), i), "mask": torch.tensor([[True, i % 2 == 0]])} for i in range(3)
    ]
    for inputs, mask in scorer._prepared_batches(batches, prepare, torch.device("cpu")):
        i = int(inputs["input_ids"][0, 0])
        events.append(("forward", i))
        assert torch.equal(mask, batches[i]["mask"])
    assert events == [
        ("prepare", 0),
        ("prepare", 1),
        ("forward", 0),
        ("prepare", 2),
        ("forward", 1),
        ("forward", 2),
    ]
