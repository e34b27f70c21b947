"""Unit scorers (activation variance, Wanda, SNIP), calibration batches and the ``ssah-peft`` command line.

Scores are checked against direct computations written out here: X^B captured by plain hooks and concatenated,
weights read from the modules, SNIP gradients from autograd on the weights themselves.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from ssah_peft import (
    UnitMap,
    build_calibration_batches,
    merge_partial_scores,
    resolve_architecture,
    save_partial_scores,
    score_units,
    unit_statistics,
)
from ssah_peft.cli import main, read_pairs
from ssah_peft.scoring import PLAIN_CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<pad>", "<bos>", "<eos>", "<user>", "<assistant>", "User:", "Assistant:"] + [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} <user> {{ m['content'] }}"
    "{% else %} <assistant> {{ m['content'] }} <eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)


def word_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS (no hub access needed)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def random_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    generator = torch.Generator().manual_seed(seed)

    def text(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 40, (length,), generator=generator))

    return [(text(1, 9), text(2, 12)) for _ in range(count)]


def tiny_model(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> torch.nn.Module:
    sizes = {
        "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
        "phi3": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
        "gpt2": dict(n_embd=64, n_head=4, n_inner=128, bos_token_id=1, eos_token_id=2),
    }[model_type]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(WORDS), num_hidden_layers=2, pad_token_id=0, **{**sizes, **overrides}
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return random_pairs(11, seed=1)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


# ----------------------------------------------------------------------------------------------------
# Direct computations
# ----------------------------------------------------------------------------------------------------


def output_projections(model: torch.nn.Module) -> dict[tuple[int, str], torch.nn.Module]:
    spec = resolve_architecture(model.config)
    found = {}
    for kind, block in spec.blocks.items():
        for name, module in model.named_modules():
            match = spec.layer_pattern(block.out_proj).fullmatch(name)
            if match:
                found[int(match.group(1)), kind] = module
    return found


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """W in nn.Linear convention; GPT-2's Conv1D stores W transposed, so column j of W is row j of .weight."""
    return module.weight.detach().T if isinstance(module, Conv1D) else module.weight.detach()


def captured_inputs(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """X^B of the scored tokens of all batches, concatenated, in float64."""
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    current = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, key=key: captured.setdefault(key, []).append(
                args[0].detach().reshape(-1, args[0].shape[-1])[current["mask"].flatten()].double()
            )
        )
        for key, module in output_projections(model).items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["score_mask"] & batch["attention_mask"].bool()
                model(**{k: v for k, v in batch.items() if k != "score_mask"})
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(chunks) for key, chunks in captured.items()}


def direct_scores(model, batches, method: str, weights=None) -> dict[tuple[int, str], torch.Tensor]:
    weights = weights or {key: linear_weight(m) for key, m in output_projections(model).items()}
    if method == "snip":
        return direct_snip(model, batches)
    result = {}
    for key, x in captured_inputs(model, batches).items():
        w = weights[key].double()
        if method == "variance":
            result[key] = torch.var(x, dim=0, correction=1) * w.square().sum(dim=0)
        else:  # wanda: RMS of the input channel times the L1 norm of the column
            result[key] = x.square().mean(dim=0).sqrt() * w.abs().sum(dim=0)
    return result


def direct_snip(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Σ over sequences of |W ⊙ ∇_W ℓ(x)| summed over rows, / number of sequences, one sequence at a time."""
    projections = output_projections(model)
    totals = {key: 0.0 for key in projections}
    sequences = 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][real][None]
            targets_scored = batch["score_mask"][row][real][1:]
            if not targets_scored.any():
                continue
            params = [m.weight for m in projections.values()]
            for p in params:
                p.requires_grad_(True)
            logits = model(input_ids=ids).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits[targets_scored], ids[0, 1:][targets_scored])
            grads = torch.autograd.grad(loss, params)
            for p in params:
                p.requires_grad_(False)
            for (key, module), grad in zip(projections.items(), grads):
                grad = grad.T if isinstance(module, Conv1D) else grad
                totals[key] = totals[key] + (linear_weight(module) * grad).abs().double().sum(dim=0)
            sequences += 1
    return {key: total / sequences for key, total in totals.items()}


def assert_scores_close(scores, expected, rtol: float) -> None:
    assert {(layer, kind) for kind in scores.kinds for layer in range(scores.num_layers)} == set(expected)
    for (layer, kind), reference in expected.items():
        got = scores[layer, kind]
        assert got.dtype == torch.float64 and got.shape == reference.shape
        error = ((got - reference).abs() / reference.abs().clamp(min=1e-300)).max().item()
        assert error <= rtol, f"layer {layer} {kind}: relative error {error}"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [torch.argsort(torch.argsort(x)).double() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


# ----------------------------------------------------------------------------------------------------
# Calibration batches
# ----------------------------------------------------------------------------------------------------


def test_batches_split_prompt_and_response_tokens_exactly(tokenizer, pairs):
    by_selection = {
        tokens: build_calibration_batches(tokenizer, pairs, tokens=tokens, batch_size=4, padding_side="left")
        for tokens in ("prompt", "response", "both")
    }
    for prompt_batch, response_batch, both_batch in zip(*by_selection.values()):
        real = both_batch["attention_mask"].bool()
        assert torch.equal(both_batch["score_mask"], real)
        assert not (prompt_batch["score_mask"] & response_batch["score_mask"]).any()
        assert torch.equal(prompt_batch["score_mask"] | response_batch["score_mask"], real)
        # left padding: real tokens are right-aligned and position ids count real tokens only
        assert real[:, -1].all()
        assert torch.equal(both_batch["position_ids"][real], torch.cat([torch.arange(int(r.sum())) for r in real]))
    batches = by_selection["response"]
    rows = [(b, i) for b in batches for i in range(b["input_ids"].shape[0])]
    for (prompt, response), (batch, i) in zip(pairs, rows):
        response_ids = batch["input_ids"][i][batch["score_mask"][i]].tolist()
        assert tokenizer.decode(response_ids) == f"{response} <eos>"
        prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool() & ~batch["score_mask"][i]].tolist()
        assert tokenizer.decode(prompt_ids) == f"<bos> <user> {prompt} <assistant>"


def test_batches_respect_batch_size_max_length_and_mappings(tokenizer, pairs):
    records = [{"prompt": p, "response": r} for p, r in pairs]
    batches = build_calibration_batches(tokenizer, records, batch_size=4, max_length=6)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 3]
    assert all(b["input_ids"].shape[1] <= 6 for b in batches)
    full = build_calibration_batches(tokenizer, pairs, batch_size=4)
    for cut, whole in zip(batches, full):  # truncation keeps the first max_length tokens (right padding)
        length = cut["input_ids"].shape[1]
        assert torch.equal(cut["input_ids"], whole["input_ids"][:, :length] * cut["attention_mask"])


def test_batches_need_a_chat_template(pairs):
    bare = word_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        build_calibration_batches(bare, pairs)
    batch = build_calibration_batches(bare, pairs[:1], chat_template=PLAIN_CHAT_TEMPLATE, tokens="both")[0]
    assert bare.decode(batch["input_ids"][0].tolist()).startswith("<bos> User:")


def test_batches_reject_bad_options(tokenizer, pairs):
    with pytest.raises(ValueError, match="tokens must be one of"):
        build_calibration_batches(tokenizer, pairs, tokens="answers")
    with pytest.raises(ValueError, match="No calibration pairs"):
        build_calibration_batches(tokenizer, [])


# ----------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "padding_side"), [(1, "right"), (3, "left"), (4, "right"), (16, "left")])
def test_variance_equals_direct_computation_for_any_batching(llama, tokenizer, pairs, batch_size, padding_side):
    one_by_one = build_calibration_batches(tokenizer, pairs, batch_size=1)
    expected = direct_scores(llama, one_by_one, "variance")
    batches = build_calibration_batches(tokenizer, pairs, batch_size=batch_size, padding_side=padding_side)
    scores = score_units(llama, batches, show_progress_bar=False)
    assert_scores_close(scores, expected, rtol=1e-6)
    assert scores.num_tokens == sum(int(b["score_mask"].sum()) for b in one_by_one)
    assert scores.num_sequences == len(pairs)


@pytest.mark.parametrize("method", ["wanda", "snip"])
def test_baselines_equal_direct_computation(llama, tokenizer, pairs, method):
    expected = direct_scores(llama, build_calibration_batches(tokenizer, pairs, batch_size=1), method)
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4, padding_side="left")
    scores = score_units(llama, batches, method=method, show_progress_bar=False)
    assert scores.method == method
    assert_scores_close(scores, expected, rtol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "phi3"])
def test_conv1d_and_fused_architectures(tokenizer, pairs, model_type):
    model = tiny_model(model_type)
    expected = direct_scores(model, build_calibration_batches(tokenizer, pairs, batch_size=1), "variance")
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4, padding_side="left")
    assert_scores_close(score_units(model, batches, show_progress_bar=False), expected, rtol=1e-6)


def test_bf16_model_is_scored_from_its_own_activations(tokenizer, pairs):
    model = tiny_model("llama", dtype=torch.bfloat16)
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4)
    for method in ("variance", "wanda"):
        assert_scores_close(
            score_units(model, batches, method=method, show_progress_bar=False),
            direct_scores(model, batches, method),
            rtol=1e-6,
        )


def test_scoring_is_deterministic_and_restores_the_training_state(tokenizer, pairs):
    model = tiny_model("llama", dtype=torch.float32).train()
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4)
    model.model.layers[1].eval()
    first = score_units(model, batches, show_progress_bar=False, metadata={"data": "random words"})
    second = score_units(model, batches, show_progress_bar=False)
    assert all(torch.equal(a, b) for kind in first.kinds for a, b in zip(first.scores[kind], second.scores[kind]))
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training
    assert first.calibration_info() == {
        "method": "variance",
        "num_tokens": first.num_tokens,
        "num_sequences": len(pairs),
        "data": "random words",
    }


# ----------------------------------------------------------------------------------------------------
# bitsandbytes 4-bit base
# ----------------------------------------------------------------------------------------------------


def heterogeneous_llama(path: Path) -> torch.nn.Module:
    """A saved fp32 llama (dims multiple of 64) whose units differ in scale, as trained units do."""
    model = tiny_model("llama", dtype=torch.float32, hidden_size=128, intermediate_size=256)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for linear, units in ((layer.mlp.gate_proj, 256), (layer.mlp.up_proj, 256), (layer.self_attn.v_proj, 64)):
                linear.weight.mul_(torch.exp(torch.empty(units, 1).uniform_(-1.5, 1.5, generator=generator)))
    model.save_pretrained(path)
    return model


def test_4bit_scores_match_fp32_within_quantization_error(tmp_path, tokenizer, pairs, avx512bf16_cpu):
    import bitsandbytes as bnb
    from helpers import repack_4bit_for_cpu
    from transformers import BitsAndBytesConfig

    fp32 = heterogeneous_llama(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    # armed to repack on its first eval forward whatever this CPU is: scoring must switch that off first
    assert all(m.support_avx512bf16_for_cpu for m in output_projections(quantized).values())
    dequantized = {  # read before any forward, i.e. before bitsandbytes could repack the weights
        key: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).clone()
        for key, m in output_projections(quantized).items()
    }
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in output_projections(quantized).values())
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4)
    scores = score_units(quantized, batches, show_progress_bar=False)
    # exact w.r.t. the 4-bit model's own activations and dequantized weights ...
    assert_scores_close(scores, direct_scores(quantized, batches, "variance", weights=dequantized), rtol=1e-5)
    # ... and within quantization error of the fp32 model
    reference = score_units(fp32, batches, show_progress_bar=False)
    for kind in scores.kinds:
        flat, flat_reference = torch.cat(scores.scores[kind]), torch.cat(reference.scores[kind])
        assert spearman(flat, flat_reference) >= 0.99, kind
    assert not any(m.support_avx512bf16_for_cpu for m in output_projections(quantized).values())
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in quantized.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    # a model repacked by an eval forward before scoring is converted back first (with a warning); the repack is
    # bitsandbytes' own conversion, applied as the forward applies it on a CPU with AVX-512 BF16, so on every CPU
    repacked = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    assert repack_4bit_for_cpu(repacked)
    assert output_projections(repacked)[0, "mlp"].weight.quant_state.packing_format_for_cpu
    with pytest.warns(UserWarning, match="already been repacked"):
        rescored = score_units(repacked, batches, show_progress_bar=False)
    for kind in scores.kinds:
        for again, first in zip(rescored.scores[kind], scores.scores[kind]):
            assert torch.allclose(again, first, rtol=0.05)


# ----------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------


def score_shard(rank: int, world_size: int, port: int, model, batches, folder: Path) -> None:
    """One rank: score its interleaved shard of the batches with both kinds of statistics, save the results."""
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        results = {}
        for method in ("variance", "snip"):
            scores = score_units(model, batches[rank::world_size], method=method, show_progress_bar=False)
            results[method] = (scores.scores, scores.num_tokens, scores.num_sequences)
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path, llama, tokenizer, pairs):
    batches = build_calibration_batches(tokenizer, pairs, batch_size=2, padding_side="left")
    port = free_port()
    context = multiprocessing.get_context("fork")  # children inherit the imported modules and the model
    ranks = [context.Process(target=score_shard, args=(r, 2, port, llama, batches, tmp_path)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
        if process.is_alive():
            process.kill()
        assert process.exitcode == 0
    for method in ("variance", "snip"):
        single = score_units(llama, batches, method=method, show_progress_bar=False)
        for rank in range(2):
            scores, num_tokens, num_sequences = torch.load(tmp_path / f"rank{rank}.pt")[method]
            assert (num_tokens, num_sequences) == (single.num_tokens, single.num_sequences)
            for kind in single.kinds:
                for merged, reference in zip(scores[kind], single.scores[kind]):
                    assert torch.allclose(merged, reference, rtol=1e-9, atol=0), (method, rank, kind)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_empty_dataloader_is_an_error(llama):
    with pytest.raises(ValueError, match="no batches"):
        score_units(llama, [], show_progress_bar=False)


def test_batch_without_tokens_to_score_is_an_error(llama, tokenizer, pairs):
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4)
    padding_only = dict(batches[1], attention_mask=torch.zeros_like(batches[1]["attention_mask"]))
    with pytest.raises(ValueError, match="batch 1 has no token to score"):
        score_units(llama, [batches[0], padding_only], show_progress_bar=False)
    first_token_only = dict(batches[0], score_mask=torch.zeros_like(batches[0]["score_mask"]))
    first_token_only["score_mask"][:, 0] = True
    with pytest.raises(ValueError, match="never a sequence's first token"):
        score_units(llama, [first_token_only], method="snip", show_progress_bar=False)


def test_nan_activations_are_an_error(tokenizer, pairs):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5, 0] = float("nan")
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4)
    with pytest.raises(ValueError, match=r"Non-finite.*model\.layers\.1\.mlp\.down_proj"):
        score_units(model, batches, show_progress_bar=False)
    with pytest.raises(ValueError, match="loss is not finite"):
        score_units(model, batches, method="snip", show_progress_bar=False)


def test_offloaded_weights_are_an_error(tokenizer, pairs):
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj is offloaded"):
        score_units(model, build_calibration_batches(tokenizer, pairs), show_progress_bar=False)


def test_adapter_wrapped_model_is_an_error(tokenizer, pairs):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="wrapped by a peft adapter"):
        score_units(model, build_calibration_batches(tokenizer, pairs), show_progress_bar=False)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


def test_cli_score_and_units_commands(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama", dtype=torch.float32).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    safety = write_jsonl(tmp_path / "safety.jsonl", random_pairs(6, seed=2))
    utility = write_jsonl(tmp_path / "utility.jsonl", random_pairs(6, seed=3))
    common = ["score", "--model", str(model_dir), "--safety-data", str(safety), "--utility-data", str(utility)]
    common += ["--batch-size", "4", "--max-length", "32", "--no-progress"]
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main([*common, "--out", str(first), "--plot", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--out", str(second), "--method", "wanda", "--tokens", "both", "--standardize"]) == 0

    unit_map = UnitMap.load(first)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    unit_map.check_model(model)
    batches = build_calibration_batches(word_tokenizer(), read_pairs(str(safety)), batch_size=4, max_length=32)
    expected = score_units(model, batches, show_progress_bar=False)
    assert all(
        torch.equal(cli, library.float())
        for kind in expected.kinds
        for cli, library in zip(unit_map.safety_scores[kind], expected.scores[kind])
    )
    assert unit_map.calibration["safety"]["data"] == str(safety)
    assert unit_map.calibration["utility"]["num_examples"] == 6
    assert unit_map.calibration["safety"]["tokens"] == "response"
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    assert main(["units", "show", str(first)]) == 0
    assert unit_map.summary() in capsys.readouterr().out
    assert main(["units", "compare", str(first), str(second)]) == 0
    lines = capsys.readouterr().out.splitlines()
    overlap = unit_map.overlap(UnitMap.load(second))
    assert [line.split() for line in lines[1:]] == [[t, f"{overlap[t]:.4f}"] for t in ("CU", "SCU", "UCU", "RU")]
    assert main(["units", "migrate", str(first), str(second)]) == 0
    assert capsys.readouterr().out.strip() == unit_map.migration(UnitMap.load(second)).table()


def cli_error(capsys, argv: list[str], status: int) -> str:
    """The error a `ssah-peft` run reports (`ssah-peft: error: ...` on stderr, exit ``status``, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    error = capsys.readouterr().err
    assert "ssah-peft: error: " in error and "Traceback" not in error
    return error


def test_cli_reports_bad_data_files_before_loading_the_model(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", random_pairs(2, seed=0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    command = ["score", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "map.safetensors")]
    error = cli_error(capsys, [*command, "--safety-data", str(good), "--utility-data", str(bad)], status=1)
    assert re.search(r"bad\.jsonl:1: expected a JSON object with 'prompt' and 'response'", error)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n{not json\n")
    error = cli_error(capsys, [*command, "--safety-data", str(broken), "--utility-data", str(good)], status=1)
    assert re.search(r"broken\.jsonl:2: not valid JSON", error)
    error = cli_error(
        capsys, [*command, "--safety-data", str(tmp_path / "missing.jsonl"), "--utility-data", str(good)], status=2
    )
    assert re.search(r"missing\.jsonl", error)
    with pytest.raises(SystemExit):
        main(command)  # the data arguments are required


def test_cli_reads_built_in_calibration_sets_by_name():
    from ssah_peft.data import load_builtin

    records = load_builtin("utility_calibration")
    assert read_pairs("utility_calibration", limit=3) == [
        (r["prompt"], r["response"]) for r in records.select(range(3))
    ]
    with pytest.raises(ValueError, match=r"harmful_eval\[0\]: expected a JSON object with 'prompt' and 'response'"):
        read_pairs("harmful_eval")  # prompts without responses


# ----------------------------------------------------------------------------------------------------
# Scaling out: processes under a launcher, shards scored by independent jobs
# ----------------------------------------------------------------------------------------------------


def test_partial_scores_merge_exactly_with_an_empty_shard(tmp_path, llama, tokenizer, pairs):
    batches = build_calibration_batches(tokenizer, pairs, batch_size=3, padding_side="left")
    shards = [batches[0::2], batches[1::2], []]  # three jobs, the last without any batch
    options = dict(show_progress_bar=False, metadata={"data": "words"})
    for method in ("variance", "wanda", "snip"):
        single = score_units(llama, batches, method=method, **options)
        paths = [tmp_path / f"{method}-{rank}.safetensors" for rank in range(3)]
        for rank, (path, shard) in enumerate(zip(paths, shards)):
            statistics = unit_statistics(llama, shard, method=method, **options)
            save_partial_scores(path, {"safety": statistics}, rank=rank, world_size=3)
        merged = merge_partial_scores(paths[::-1])["safety"]  # any file order
        assert merged.calibration_info() == single.calibration_info() and merged.fingerprint == single.fingerprint
        expected = {(layer, kind): single[layer, kind] for kind in single.kinds for layer in range(single.num_layers)}
        assert_scores_close(merged, expected, rtol=1e-9)


def test_merging_partial_scores_names_what_does_not_fit(tmp_path, llama, tokenizer, pairs):
    batches = build_calibration_batches(tokenizer, pairs[:4], batch_size=2)

    def part(
        name, rank=1, world_size=2, model=llama, method="variance", data="words", batches=batches, set_name="safety"
    ):
        """A partial score file; by default rank 1 of 2, consistent with rank0."""
        statistics = unit_statistics(model, batches, method=method, show_progress_bar=False, metadata={"data": data})
        save_partial_scores(tmp_path / name, {set_name: statistics}, rank=rank, world_size=world_size)
        return tmp_path / name

    rank0, rank1 = part("rank0", rank=0), part("rank1")
    cases = {
        "different world sizes: .*rank0: rank 0 of 2, .*of3: rank 1 of 3": [rank0, part("of3", world_size=3)],
        r"Rank\(s\) \[1\] of 2 are missing": [rank0],
        "Rank 0 of 2 is given twice: .*rank0 and .*rank0": [rank0, rank1, rank0],
        "different methods: .*'variance', .*'wanda'": [rank0, part("wanda", method="wanda")],
        r"different models \(fingerprints\)": [rank0, part("gpt2", model=tiny_model("gpt2"))],
        "output projection weights of .*rank0 and .*reseeded differ": [
            rank0,
            part("reseeded", model=tiny_model("llama", seed=1)),
        ],
        r"different data or settings \(metadata\)": [rank0, part("other", data="other words")],
        r"rank0 holds the calibration sets \['safety'\] but .*utility holds \['utility'\]": [
            rank0,
            part("utility", set_name="utility"),
        ],
        "yielded no batches": [part("empty0", rank=0, batches=[]), part("empty1", batches=[])],
    }
    for message, paths in cases.items():
        with pytest.raises(ValueError, match=message):
            merge_partial_scores(paths)
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an ssah-peft partial score file"):
        merge_partial_scores([rank0, tmp_path / "other.safetensors"])
    with pytest.raises(ValueError, match="rank must be in 0..world_size-1"):
        part("bad", rank=2)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory) -> tuple[list[str], UnitMap]:
    """A saved model and tokenizer, uneven safety and utility files, and the map of a single-process `score`."""
    folder = tmp_path_factory.mktemp("scaling")
    model_dir = folder / "model"
    tiny_model("llama", dtype=torch.float32).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    safety = write_jsonl(folder / "safety.jsonl", random_pairs(7, seed=4))
    utility = write_jsonl(folder / "utility.jsonl", random_pairs(6, seed=5))
    command = ["score", "--model", str(model_dir), "--safety-data", str(safety), "--utility-data", str(utility)]
    command += ["--batch-size", "2", "--max-length", "32", "--no-progress"]
    assert main([*command, "--out", str(folder / "single.safetensors")]) == 0
    return command, UnitMap.load(folder / "single.safetensors")


def assert_same_map(got: UnitMap, single: UnitMap) -> None:
    """The single-process map, up to float rounding of the scores (statistics are merged in another order)."""
    assert got.fingerprint == single.fingerprint and got.settings == single.settings
    assert got.calibration == single.calibration  # token and sequence counts, data description
    for kind in single.kinds:
        assert all(torch.equal(a, b) for a, b in zip(got.types[kind], single.types[kind], strict=True))
        scores = got.safety_scores[kind] + got.utility_scores[kind]
        torch.testing.assert_close(scores, single.safety_scores[kind] + single.utility_scores[kind], rtol=1e-6, atol=0)


def test_accelerate_launch_of_two_processes_writes_the_single_process_map(tmp_path, cli_setup):
    command, single = cli_setup
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", str(free_port())]
    out = tmp_path / "launched.safetensors"
    # gloo on CPU even where there are GPUs; another batch size than the single run, as batching must not matter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    launched = [*accelerate, "-m", "ssah_peft.cli", *command, "--batch-size", "3", "--out", str(out)]
    done = subprocess.run(launched, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "merged the statistics of 2 processes" in done.stdout
    assert done.stdout.count(f"wrote {out}") == 1  # one process writes
    assert_same_map(UnitMap.load(out), single)


def test_cli_shards_as_independent_jobs_merge_into_the_single_process_map(tmp_path, cli_setup, capsys):
    command, single = cli_setup
    parts = [tmp_path / f"part{rank}.safetensors" for rank in range(2)]
    for rank, part in enumerate(parts):
        assert main([*command, "--batch-size", "3", "--shard", f"{rank}/2", "--partial-out", str(part)]) == 0
    assert f"wrote {parts[1]} (shard 1/2)" in capsys.readouterr().out
    merged = tmp_path / "merged.safetensors"
    assert main(["units", "merge-scores", str(parts[1]), str(parts[0]), "--out", str(merged)]) == 0
    assert_same_map(UnitMap.load(merged), single)

    error = cli_error(capsys, ["units", "merge-scores", str(parts[0]), "--out", str(merged)], status=1)
    assert re.search(r"Rank\(s\) \[1\] of 2 are missing", error)
    error = cli_error(capsys, [*command, "--shard", "0/2", "--out", str(merged)], status=2)
    assert "--shard scores part of the data: write it with --partial-out" in error
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(SystemExit):
            main([*command, "--shard", bad, "--partial-out", str(tmp_path / "bad.safetensors")])


# ----------------------------------------------------------------------------------------------------
# Partial score files record the data and the weights they come from, and are written reproducibly
# ----------------------------------------------------------------------------------------------------


def test_partial_score_files_record_the_calibration_data_and_the_weights(tmp_path, llama, tokenizer, pairs):
    from safetensors import safe_open

    from ssah_peft.scoring import calibration_data_hash

    data_hash = calibration_data_hash(pairs)
    assert re.fullmatch("[0-9a-f]{64}", data_hash)
    assert data_hash == calibration_data_hash([{"prompt": p, "response": r} for p, r in pairs])  # content, not form
    assert data_hash != calibration_data_hash(pairs[::-1])
    assert data_hash != calibration_data_hash([*pairs[:-1], (pairs[-1][0], pairs[-1][1] + " w1")])
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4)
    path = tmp_path / "part.safetensors"
    for method in ("variance", "snip"):
        statistics = unit_statistics(
            llama, batches, method=method, show_progress_bar=False, metadata={"data": "words", "data_sha256": data_hash}
        )
        assert re.fullmatch("[0-9a-f]{64}", statistics.weights_sha256)
        save_partial_scores(path, {"safety": statistics}, rank=0, world_size=1)
        with safe_open(path, "pt") as f:
            recorded = json.loads(f.metadata()["sets"])["safety"]
        assert recorded["weights_sha256"] == statistics.weights_sha256
        assert recorded["metadata"]["data_sha256"] == data_hash
    reseeded = unit_statistics(tiny_model("llama", seed=1), batches, show_progress_bar=False)
    assert reseeded.weights_sha256 != statistics.weights_sha256


@pytest.mark.parametrize("method", ["variance", "wanda", "snip"])
def test_merging_refuses_shards_scored_with_other_weights(tmp_path, tokenizer, pairs, method):
    batches = build_calibration_batches(tokenizer, pairs, batch_size=3)
    model, other = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():  # another checkpoint whose output projections are the same: only the embeddings differ
        other.model.embed_tokens.weight[5:9] += 0.01
    paths = [tmp_path / f"{method}-{rank}.safetensors" for rank in range(2)]
    for rank, (path, scored) in enumerate(zip(paths, (model, other))):
        statistics = unit_statistics(
            scored, batches[rank::2], method=method, show_progress_bar=False, metadata={"data": "words"}
        )
        save_partial_scores(path, {"safety": statistics}, rank=rank, world_size=2)
    with pytest.raises(
        ValueError,
        match=rf"The partial scores of 'safety' come from different model weights: {re.escape(str(paths[0]))} "
        rf"\(sha256 [0-9a-f]{{12}}…\) and {re.escape(str(paths[1]))} \(sha256 [0-9a-f]{{12}}…\)",
    ):
        merge_partial_scores(paths)


def test_merging_refuses_shards_whose_calibration_data_changed_between_the_jobs(tmp_path, cli_setup):
    command, _ = cli_setup
    model_dir = command[command.index("--model") + 1]
    safety = write_jsonl(tmp_path / "safety.jsonl", random_pairs(6, seed=7))
    utility = write_jsonl(tmp_path / "utility.jsonl", random_pairs(6, seed=8))
    score = ["score", "--model", model_dir, "--safety-data", str(safety), "--utility-data", str(utility)]
    score += ["--batch-size", "2", "--max-length", "32", "--no-progress"]
    parts = [tmp_path / f"part{rank}.safetensors" for rank in range(2)]
    assert main([*score, "--shard", "0/2", "--partial-out", str(parts[0])]) == 0
    write_jsonl(safety, random_pairs(6, seed=9))  # the same file, as many examples, other content
    assert main([*score, "--shard", "1/2", "--partial-out", str(parts[1])]) == 0
    with pytest.raises(
        ValueError,
        match=rf"The calibration data of 'safety' changed between the shard jobs: {re.escape(str(parts[0]))} scored "
        rf"data with sha256 [0-9a-f]{{12}}…, {re.escape(str(parts[1]))} data with sha256 [0-9a-f]{{12}}…",
    ):
        merge_partial_scores(parts)


KILLED_PARTIAL_SAVE = """
import os, sys
import torch
from ssah_peft import UnitStatistics, save_partial_scores

statistics = UnitStatistics(method="snip", states={"mlp": (torch.zeros(4, dtype=torch.float64),)},
                            weight_statistics={}, fingerprint={"num_layers": 1})
os.replace = lambda *args, **kwargs: os._exit(9)  # dies once the new file is written, before it is put in place
save_partial_scores(sys.argv[1], {"safety": statistics}, rank=0, world_size=1)
"""


def test_partial_score_files_are_byte_identical_and_saved_atomically(tmp_path, llama, tokenizer, pairs):
    batches = build_calibration_batches(tokenizer, pairs, batch_size=4)
    metadata = {"data": "words", "settings": {"b": 1, "a": 2}}
    statistics = {"safety": unit_statistics(llama, batches, show_progress_bar=False, metadata=metadata)}
    reversed_metadata = dict(reversed(metadata.items()))
    reordered = {"safety": unit_statistics(llama, batches, show_progress_bar=False, metadata=reversed_metadata)}
    folder = tmp_path / "parts"
    folder.mkdir()
    path, again = folder / "part.safetensors", tmp_path / "again.safetensors"
    save_partial_scores(path, statistics, rank=0, world_size=1)
    save_partial_scores(again, reordered, rank=0, world_size=1)
    assert path.read_bytes() == again.read_bytes()
    old = path.read_bytes()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_PARTIAL_SAVE, str(path)], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert path.read_bytes() == old and len(list(folder.iterdir())) == 2  # the old file, whole, and the killed one's
    save_partial_scores(path, statistics, rank=0, world_size=1)
    assert [p.name for p in folder.iterdir()] == ["part.safetensors"] and path.read_bytes() == old


def test_a_unit_map_scored_twice_is_byte_identical(tmp_path, cli_setup):
    command, _ = cli_setup
    maps = [tmp_path / "first.safetensors", tmp_path / "second.safetensors"]
    for path in maps:
        assert main([*command, "--out", str(path)]) == 0
    assert maps[0].read_bytes() == maps[1].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.safetensors", "second.safetensors"]
