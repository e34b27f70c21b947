"""Fixtures shared by the tests, and the process settings every test runs with; helpers are in ``helpers.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, pairs, tiny_model, tiny_tokenizer, write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cache folder of every test (unit maps the finetune job keeps, converted models): a temporary one, so that
    no test reads or writes the user's cache."""
    from ssah_peft.models import CACHE_ENV

    path = tmp_path_factory.mktemp("cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def avx512bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear4bit layers built while this fixture is active are armed to repack, as on a CPU with AVX-512 BF16.

    Only the flag is forced, not the kernel: without bitsandbytes' native AVX-512 kernel a forward through a
    repacked weight computes wrong values (silently), so a test using this fixture passes everywhere only if nothing
    repacks, which is what ``ssah_peft.disable_cpu_4bit_repacking`` must ensure. To get a repacked model on any CPU
    use :func:`repack_4bit_for_cpu`, and undo the repack before a forward.
    """
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny llama with the ChatML character tokenizer (a model folder for the command line)."""
    path = tmp_path_factory.mktemp("checkpoint") / "model"
    tiny_model("llama", vocab_size=128).float().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSON Lines file of 20 :func:`helpers.pairs` records."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", pairs())
