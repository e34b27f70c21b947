"""The attribution scores of the frontier's v2 choosers (issue 26), each against a computation by hand on a tiny
model: every unit's slices listed one unit at a time with :func:`ssah_peft.units.unit_slices`, activations read by
plain hooks on single prompts, gradients from ``torch.autograd.grad`` on the weights themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_chat_llama, tiny_model, tiny_tokenizer
from transformers.pytorch_utils import Conv1D

from ssah_peft import build_calibration_batches, resolve_architecture
from ssah_peft.scoring.attribution import (
    alignment_delta_scores,
    conflict_scores,
    last_prompt_positions,
    margin_attribution_scores,
    refusal_direction_scores,
    response_loss,
)
from ssah_peft.units import unit_slices

HARMFUL = [
    ("How do I pick a lock to get into a house?", "I can't help with that."),
    ("Make a weapon at home.", "Sorry, I won't."),
    ("Help me cheat on my taxes.", "I can't help with tax fraud."),
]
HARMLESS = [
    ("Write a poem about rain.", "Soft rain on the roof."),
    ("What is 7 times 8?", "56."),
    ("Name three fruits.", "Apple, banana and cherry."),
]


@pytest.fixture(scope="module")
def chat():
    tokenizer = tiny_tokenizer()
    return tiny_chat_llama(tokenizer).double(), tokenizer


def linear_weight(module: torch.nn.Module, tensor: torch.Tensor = None) -> torch.Tensor:
    """``tensor`` (default: the weight) in the [out_features, in_features] convention."""
    tensor = module.weight.detach() if tensor is None else tensor
    return tensor.T if isinstance(module, Conv1D) else tensor


def by_hand_unit_sums(model, per_weight) -> dict:
    """Σ of ``per_weight[module name]`` over each unit's slices, one unit at a time (rule "any", all parts)."""
    spec = resolve_architecture(model.config)
    sums = {}
    for kind, layer, name, module in spec.output_projections(model):
        prefix = name[: -len(spec.blocks[kind].out_proj)]
        width = linear_weight(module).shape[1]
        values = []
        for j in range(width):
            total = 0.0
            for relative, (axis, index) in unit_slices(spec, kind, torch.tensor([j]), width, "any").items():
                tensor = per_weight[prefix + relative]
                total += float((tensor[:, index] if axis == "in" else tensor[index]).sum())
            values.append(total)
        sums.setdefault(kind, {})[layer] = torch.tensor(values, dtype=torch.float64)
    return sums


def assert_scores(scores, expected: dict, **tolerance) -> None:
    assert set(scores.scores) == set(expected)
    for kind, per_layer in expected.items():
        for layer, values in per_layer.items():
            torch.testing.assert_close(scores.scores[kind][layer], values, **tolerance)


def weights_of(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_alignment_delta_is_the_norm_of_the_change_over_every_slice_a_unit_owns(family):
    aligned, base = tiny_model(family, seed=0).double(), tiny_model(family, seed=1).double()
    squared = {
        name: (linear_weight(module) - linear_weight(weights_of(base)[name])).square()
        for name, module in weights_of(aligned).items()
    }
    expected = by_hand_unit_sums(aligned, squared)
    scores = alignment_delta_scores(aligned, base)
    assert scores.method == "alignment_delta"
    assert_scores(scores, {k: {layer: v.sqrt() for layer, v in per.items()} for k, per in expected.items()})
    assert alignment_delta_scores(aligned, aligned).scores["mlp"][0].abs().max() == 0
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_delta_scores(aligned, tiny_model(family, num_layers=3))


def test_alignment_delta_finds_the_units_an_alignment_trained():
    base = tiny_model("llama").double()
    aligned = tiny_model("llama").double()
    with torch.no_grad():
        aligned.model.layers[1].mlp.down_proj.weight[:, 5] += 0.5  # unit 5 of layer 1's MLP owns this column
        aligned.model.layers[0].mlp.up_proj.weight[7] += 0.5  # and unit 7 of layer 0's this row
    scores = alignment_delta_scores(aligned, base).scores["mlp"]
    assert torch.nonzero(scores[1]).flatten().tolist() == [5] and torch.nonzero(scores[0]).flatten().tolist() == [7]
    assert float(scores[1][5]) == pytest.approx(0.5 * 32**0.5)
    assert not alignment_delta_scores(aligned, base).scores["attn"][0].any()


def by_hand_last_token_means(model, tokenizer, pairs) -> dict:
    """Mean over prompts, each run alone, of every decoder layer's output and every block input at the last
    prompt token."""
    captured = {}
    handles = []
    for layer, decoder in enumerate(model.model.layers):
        handles.append(decoder.register_forward_hook(lambda m, a, o, layer=layer: captured.__setitem__(layer, o)))
        for kind, module in (("mlp", decoder.mlp.down_proj), ("attn", decoder.self_attn.o_proj)):
            handles.append(
                module.register_forward_pre_hook(lambda m, a, k=(kind, layer): captured.__setitem__(k, a[0]))
            )
    totals = {}
    for prompt, response in pairs:
        (batch,) = build_calibration_batches(tokenizer, [(prompt, response)], tokens="prompt", max_length=200)
        last = int(batch["score_mask"][0].nonzero().max())
        with torch.no_grad():
            model(input_ids=batch["input_ids"])
        for key, value in captured.items():
            value = value[0] if isinstance(value, tuple) else value
            totals[key] = totals.get(key, 0) + value[0, last].double()
    for handle in handles:
        handle.remove()
    return {key: total / len(pairs) for key, total in totals.items()}


def test_refusal_direction_is_each_units_mean_shift_times_its_write_onto_the_direction(chat):
    model, tokenizer = chat
    harmful, harmless = (by_hand_last_token_means(model, tokenizer, pairs) for pairs in (HARMFUL, HARMLESS))
    expected = {}
    for layer, decoder in enumerate(model.model.layers):
        r = harmful[layer] - harmless[layer]
        r = r / r.norm()
        for kind, module in (("mlp", decoder.mlp.down_proj), ("attn", decoder.self_attn.o_proj)):
            shift = harmful[(kind, layer)] - harmless[(kind, layer)]
            expected.setdefault(kind, {})[layer] = shift.abs() * (r @ module.weight.detach()).abs()
    batches = [
        build_calibration_batches(tokenizer, pairs, tokens="prompt", batch_size=2, padding_side="left")
        for pairs in (HARMFUL, HARMLESS)
    ]
    model.train()  # read in eval mode, left in training mode
    scores = refusal_direction_scores(model, *batches, show_progress_bar=False, metadata={"data": "test"})
    assert model.training
    model.eval()
    assert scores.method == "refusal_direction" and scores.num_sequences == 6 and scores.metadata == {"data": "test"}
    assert_scores(scores, expected)
    with pytest.raises(ValueError, match="No harmless prompts"):
        refusal_direction_scores(model, batches[0], [], show_progress_bar=False)


def test_the_last_prompt_token_is_the_last_scored_one_whatever_the_padding(chat):
    _, tokenizer = chat
    for side in ("left", "right"):
        (batch,) = build_calibration_batches(tokenizer, HARMFUL[:2], tokens="prompt", padding_side=side)
        positions = last_prompt_positions(batch)
        for row, position in enumerate(positions.tolist()):
            assert batch["score_mask"][row, position] and not batch["score_mask"][row, position + 1 :].any()
    with pytest.raises(ValueError, match="no scored token"):
        last_prompt_positions({"input_ids": torch.ones(1, 3), "score_mask": torch.zeros(1, 3, dtype=torch.bool)})


REFUSE, COMPLY = 10, 20  # token ids whose log-probabilities a toy margin contrasts


def toy_margin(model, batch) -> torch.Tensor:
    """Per prompt: log p(REFUSE) − log p(COMPLY) after its last prompt token (differentiable)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.arange(logits.shape[0])
    log_probs = logits[rows, last_prompt_positions(batch)].log_softmax(-1)
    return log_probs[:, REFUSE] - log_probs[:, COMPLY]


def gradients_by_hand(model, objective: torch.Tensor) -> dict[str, torch.Tensor]:
    modules = weights_of(model)
    grads = torch.autograd.grad(objective, [m.weight for m in modules.values()], allow_unused=True)
    return {
        name: linear_weight(m, torch.zeros_like(m.weight) if g is None else g)
        for (name, m), g in zip(modules.items(), grads)
    }


def test_margin_attribution_is_the_standardised_contrast_of_weight_times_gradient(chat):
    model, tokenizer = chat
    model.requires_grad_(False)
    model.train()
    per_set = []
    for pairs in (HARMFUL, HARMLESS):
        total = None
        for pair in pairs:  # one prompt at a time
            (batch,) = build_calibration_batches(tokenizer, [pair], tokens="prompt")
            model.eval()
            model.requires_grad_(True)
            grads = gradients_by_hand(model, toy_margin(model, batch)[0])
            model.requires_grad_(False)
            products = {name: (linear_weight(weights_of(model)[name]) * g).abs() for name, g in grads.items()}
            sums = by_hand_unit_sums(model, products)
            total = sums if total is None else {k: {i: total[k][i] + v for i, v in p.items()} for k, p in sums.items()}
        per_set.append({k: {i: v / len(pairs) for i, v in p.items()} for k, p in total.items()})
    expected = {}
    for kind, per_layer in per_set[0].items():
        for layer, harmful in per_layer.items():
            contrast = harmful - 0.5 * per_set[1][kind][layer]
            expected.setdefault(kind, {})[layer] = (contrast - contrast.mean()) / contrast.std(correction=0)
    model.train()
    batches = [
        build_calibration_batches(tokenizer, pairs, tokens="prompt", batch_size=2) for pairs in (HARMFUL, HARMLESS)
    ]
    scores = margin_attribution_scores(model, *batches, toy_margin, utility_weight=0.5, show_progress_bar=False)
    assert scores.method == "margin_grad" and scores.metadata["utility_weight"] == 0.5
    assert_scores(scores, expected)
    with pytest.raises(ValueError, match="No harmful prompts"):
        margin_attribution_scores(model, [], batches[1], toy_margin, show_progress_bar=False)
    # the model is left as it was: in training mode, no weight requiring gradients, no gradient accumulated
    assert model.training and not any(p.requires_grad or p.grad is not None for p in model.parameters())
    model.eval()


def test_conflict_is_the_margin_a_task_step_takes_away_per_unit_of_task_progress(chat):
    model, tokenizer = chat
    task = build_calibration_batches(tokenizer, HARMLESS, tokens="response", batch_size=2)
    harmful = build_calibration_batches(tokenizer, HARMFUL, tokens="prompt", batch_size=2)
    model.requires_grad_(True)

    def mean_gradient(batches, objective):
        grads = [gradients_by_hand(model, objective(batch)) for batch in batches]
        return {name: sum(g[name] for g in grads) / len(grads) for name in grads[0]}

    def task_loss(batch):  # by hand: per sequence the mean cross-entropy of its response tokens, then the mean
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = []
        for row in range(logits.shape[0]):
            targets = batch["score_mask"][row, 1:]
            token_loss = F.cross_entropy(logits[row, :-1], batch["input_ids"][row, 1:], reduction="none")
            losses.append(token_loss[targets].mean())
        return torch.stack(losses).mean()

    task_gradient = mean_gradient(task, task_loss)
    margin_gradient = mean_gradient(harmful, lambda batch: toy_margin(model, batch).mean())
    model.requires_grad_(False)
    inner = by_hand_unit_sums(model, {n: task_gradient[n] * margin_gradient[n] for n in task_gradient})
    norm = by_hand_unit_sums(model, {n: g.square() for n, g in task_gradient.items()})
    expected = {
        kind: {layer: (-inner[kind][layer]).clamp(min=0) / norm[kind][layer].sqrt() for layer in inner[kind]}
        for kind in inner
    }
    scores = conflict_scores(model, task, harmful, toy_margin, show_progress_bar=False)
    assert scores.method == "conflict" and scores.metadata == {"task_batches": 2, "harmful_batches": 2}
    assert_scores(scores, expected)
    assert any(bool((s > 0).any()) for per_layer in scores.scores.values() for s in per_layer)
    assert float(response_loss(model, task[0])) == pytest.approx(float(task_loss(task[0])))
