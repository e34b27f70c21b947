"""Incomplete, non-finite and oversized adapters are refused with a message naming the tensor or field (issue 24.6,
24.7): when loaded (``PeftModel.from_pretrained``, and so ``ssah-peft eval`` / ``export``), when merged, and with
ssah-peft's registration switched off (``SSAH_PEFT_NO_AUTOLOAD=1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer, tiny_units
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from ssah_peft import SSAHConfig, SSAHLayer, merge_and_dequantize
from ssah_peft.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOWN_PROJ = "base_model.model.model.layers.0.mlp.down_proj"


def ssah_layers(model: torch.nn.Module) -> list[SSAHLayer]:
    return [m for m in model.modules() if isinstance(m, SSAHLayer)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base checkpoint (with a chat tokenizer) and a trained-looking adapter of each mode."""
    root = tmp_path_factory.mktemp("integrity")
    tiny_model("llama", vocab_size=128).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    for mode in ("protect", "select"):
        config = SSAHConfig(units=tiny_units(), mode=mode, r=4, init_weights=False)
        get_peft_model(tiny_model("llama", vocab_size=128), config).save_pretrained(root / mode)
    return {name: root / name for name in ("base", "protect", "select")}


def edited_copy(source: Path, target: Path, tensors=None, config=None) -> Path:
    """A copy of the adapter at ``source`` whose tensors and/or config the given functions edit in place."""
    target.mkdir()
    state = load_file(source / "adapter_model.safetensors")
    settings = json.loads((source / "adapter_config.json").read_text())
    for edit, value in ((tensors, state), (config, settings)):
        if edit is not None:
            edit(value)
    save_file(state, target / "adapter_model.safetensors")
    (target / "adapter_config.json").write_text(json.dumps(settings))
    return target


def with_value(key: str, value: float):
    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[3] = value

    return edit


def without(key: str):
    def edit(state):
        del state[key]

    return edit


def with_extra(state):
    state[f"{DOWN_PROJ}.ssah_C"] = torch.zeros(2, 2)


def with_rank(r: int):
    def edit(settings):
        settings["r"] = r

    return edit


CASES = {
    "NaN in a select delta": ("select", dict(tensors=with_value(f"{DOWN_PROJ}.ssah_delta", float("nan")))),
    "inf in protect's B": ("protect", dict(tensors=with_value(f"{DOWN_PROJ}.ssah_B", float("inf")))),
    "missing A": ("protect", dict(tensors=without(f"{DOWN_PROJ}.ssah_A"))),
    "missing delta": ("select", dict(tensors=without(f"{DOWN_PROJ}.ssah_delta"))),
    "unexpected tensor": ("protect", dict(tensors=with_extra)),
    "r edited": ("protect", dict(config=with_rank(8))),
}
MESSAGES = {
    "NaN in a select delta": r"model\.layers\.0\.mlp\.down_proj\.ssah_delta holds NaN/inf values",
    "inf in protect's B": r"model\.layers\.0\.mlp\.down_proj\.ssah_B holds NaN/inf values",
    "missing A": r"model\.layers\.0\.mlp\.down_proj\.ssah_A is missing: that layer would run on its initial values",
    "missing delta": r"model\.layers\.0\.mlp\.down_proj\.ssah_delta is missing",
    "unexpected tensor": r"model\.layers\.0\.mlp\.down_proj\.ssah_C is stored, but adapter_config\.json's adapter has",
    "r edited": r"model\.layers\.0\.mlp\.down_proj\.ssah_A has shape \[4, 48\], but adapter_config\.json gives "
    r"\[8, 48\] \(r=8 in adapter_config\.json\)",
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_adapter_is_refused_naming_the_tensor_and_the_model_is_left_as_it_was(saved, tmp_path, case):
    mode, edits = CASES[case]
    adapter = edited_copy(saved[mode], tmp_path / "adapter", **edits)
    model = tiny_model("llama", vocab_size=128)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=MESSAGES[case]) as refusal:
        PeftModel.from_pretrained(model, adapter)
    assert str(refusal.value).startswith("Cannot load SSAH adapter 'default'") and "Nothing was loaded" in str(
        refusal.value
    )
    assert not ssah_layers(model) and not hasattr(model, "peft_config")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


def test_the_healthy_adapters_still_load_exactly(saved) -> None:
    for mode in ("protect", "select"):
        stored = load_file(saved[mode] / "adapter_model.safetensors")
        loaded = PeftModel.from_pretrained(tiny_model("llama", vocab_size=128), saved[mode])
        state = loaded.state_dict()
        assert stored and all(torch.equal(state[f"{key}.default"], value) for key, value in stored.items())


def test_eval_refuses_a_non_finite_adapter_in_one_line(saved, tmp_path, capsys) -> None:
    adapter = edited_copy(saved["select"], tmp_path / "adapter", tensors=with_value(f"{DOWN_PROJ}.ssah_delta", 1e999))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(saved["base"]), "--adapter", str(adapter), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert f"ssah-peft: error: --adapter {adapter} could not be loaded: Cannot load SSAH adapter 'default'" in err
    assert "model.layers.0.mlp.down_proj.ssah_delta holds NaN/inf values" in err
    assert not out.exists()


# Merging an adapter that went non-finite in memory (e.g. a diverged run) is refused before any weight is written
# ----------------------------------------------------------------------------------------------------


def broken_in_memory(mode: str):
    model = get_peft_model(tiny_model("llama"), SSAHConfig(units=tiny_units(), mode=mode, r=4, init_weights=False))
    layer = model.base_model.model.model.layers[1].self_attn.o_proj
    name = "ssah_delta" if mode == "select" else "ssah_A"
    with torch.no_grad():
        getattr(layer, name)["default"].view(-1)[0] = float("nan")
    return model, f"model.layers.1.self_attn.o_proj.{name}.default"


@pytest.mark.parametrize("mode", ["select", "protect"])
@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter", "merge_and_dequantize", "safe merge"])
def test_merges_refuse_a_non_finite_adapter_and_write_nothing(mode: str, merge: str) -> None:
    model, tensor = broken_in_memory(mode)
    before = {name: p.detach().clone() for name, p in model.base_model.model.named_parameters() if "ssah_" not in name}
    calls = {
        "merge_and_unload": lambda: model.merge_and_unload(),
        "merge_adapter": lambda: model.merge_adapter(),
        "merge_and_dequantize": lambda: merge_and_dequantize(model),
        "safe merge": lambda: model.merge_and_unload(safe_merge=True),
    }
    with pytest.raises(ValueError, match="seems to be broken") as refusal:
        calls[merge]()
    if merge == "safe merge":  # peft's wording, which tools match on
        assert str(refusal.value) == "NaNs detected in the merged weights. The adapter default seems to be broken"
    else:
        assert f"NaN/inf in {tensor}" in str(refusal.value) and "Nothing was merged" in str(refusal.value)
    after = dict(model.base_model.model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert ssah_layers(model) and not any(layer.merged for layer in ssah_layers(model))


# Sizes are checked against the model before anything is allocated
# ----------------------------------------------------------------------------------------------------

PEAK_MEMORY = """
import json, resource, sys, tracemalloc
sys.path.insert(0, {tests!r})
from helpers import tiny_model
from peft import PeftModel

model = tiny_model("llama", vocab_size=128)
def peak_rss():
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
before = peak_rss()
tracemalloc.start()
try:
    PeftModel.from_pretrained(model, {adapter!r})
    message = None
except ValueError as error:
    message = str(error)
print(json.dumps({{"message": message, "rss": peak_rss() - before, "python": tracemalloc.get_traced_memory()[1]}}))
"""


def test_a_huge_rank_is_refused_before_anything_is_allocated(saved, tmp_path) -> None:
    """r=10**7 asked for A [10**7, in] and B [out, 10**7] per weight (GBs) before; now refused against the model's
    widths first. Peak memory measured in a fresh process: the process's peak RSS and Python's (tracemalloc)."""
    adapter = edited_copy(saved["protect"], tmp_path / "adapter", config=with_rank(10**7))
    script = PEAK_MEMORY.format(tests=str(ROOT / "tests"), adapter=str(adapter))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert "r=10000000 exceeds every side of the weights it would adapt (the largest is 48)" in measured["message"]
    assert measured["rss"] < 100 * 2**20 and measured["python"] < 100 * 2**20, measured


# SSAH_PEFT_NO_AUTOLOAD=1: peft alone meets an SSAH adapter
# ----------------------------------------------------------------------------------------------------

NO_AUTOLOAD = """
import runpy
# this checkout's autoload module (the installed copy is this file, copied at install time)
runpy.run_path({autoload!r}, run_name="_ssah_peft_autoload_checkout")
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained({base!r})
try:
    PeftModel.from_pretrained(model, {adapter!r})
except KeyError as error:
    print("refused:", type(error).__name__, error)
import sys
assert "ssah_peft" not in sys.modules
import ssah_peft
print("after import:", type(PeftModel.from_pretrained(model, {adapter!r})).__name__)
"""


def test_without_autoload_loading_says_to_import_ssah_peft(saved) -> None:
    script = NO_AUTOLOAD.format(
        autoload=str(ROOT / "_ssah_peft_autoload.py"), base=str(saved["base"]), adapter=str(saved["protect"])
    )
    env = {**os.environ, "SSAH_PEFT_NO_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("refused: SSAHNotRegisteredError This is an SSAH adapter")
    assert "SSAH_PEFT_NO_AUTOLOAD is set: run `import ssah_peft` before loading it" in lines[-2]
    assert lines[-1] == "after import: PeftModel"


# the autoload hook survives a probe of peft before its import (transformers' is_peft_available does one)
# ----------------------------------------------------------------------------------------------------

PROBED_FIRST = """
import importlib.util, sys
assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r})
print(type(model).__name__, "ssah_peft" in sys.modules)
"""


def test_an_adapter_loads_without_importing_ssah_peft_after_peft_was_probed(saved) -> None:
    script = PROBED_FIRST.format(base=str(saved["base"]), adapter=str(saved["protect"]))
    env = {key: value for key, value in os.environ.items() if key != "SSAH_PEFT_NO_AUTOLOAD"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "PeftModel True"
