"""Exporting an SSAH adapter for serving: as a plain peft LoRA adapter, or merged into a checkpoint.

Servers (vLLM, TGI, llama.cpp) load peft's LoRA format or full checkpoints, not SSAH adapters. Each way of writing
one is an :class:`~ssah_peft.export.base.ExportFormat` in :data:`EXPORT_FORMATS` (adding a format is one entry):

* ``lora`` (:mod:`.lora`): an exact LoRA adapter folder, while every module fits a server's maximum rank;
* ``merged`` (:mod:`.merged`): the base model with the adapter merged in, for any adapter.

An export checks what the format can hold (:attr:`ExportFormat.check`, also usable before any model is loaded),
refuses an adapter with non-finite values, and writes its folder atomically (:mod:`.folder`): the folder is
complete or absent, and an existing non-empty folder is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .base import (
    DEFAULT_MAX_RANK,
    AdaptedModule,
    ExportFormat,
    ExportOptions,
    adapted_modules,
    check_finite,
    resolve_adapter,
    stored_slice_counts,
)
from .folder import output_folder_problem, write_folder
from .lora import LORA
from .merged import MERGED

#: The export formats by name (``ssah-peft export --format``).
EXPORT_FORMATS: dict[str, ExportFormat] = {export_format.name: export_format for export_format in (LORA, MERGED)}

__all__ = [
    "DEFAULT_MAX_RANK",
    "EXPORT_FORMATS",
    "AdaptedModule",
    "ExportFormat",
    "ExportOptions",
    "export_adapter",
    "export_lora",
    "export_merged",
    "output_folder_problem",
    "stored_slice_counts",
]


def export_adapter(
    model: nn.Module,
    out_dir: Union[str, os.PathLike],
    format: str,
    *,
    adapter_name: Optional[str] = None,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write one SSAH adapter of ``model`` (a ``PeftModel`` or an :class:`ssah_peft.SSAHModel`) in ``format`` (a
    key of :data:`EXPORT_FORMATS`) to the folder ``out_dir``; returns the folder.

    ``adapter_name``: the adapter to export (default: the active one). ``overwrite``: replace a folder that is not
    empty. ``options``: the fields of :class:`ExportOptions` (``max_rank``, ``tokenizer``, ``base_model``). Raises
    ``ValueError`` for an adapter the format cannot hold or with non-finite values, ``FileExistsError`` for an
    output folder it may not replace; nothing is written then.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; the formats: {', '.join(EXPORT_FORMATS)}")
    export_format, settings = EXPORT_FORMATS[format], ExportOptions(**options)
    problem = output_folder_problem(out_dir, overwrite)
    if problem is not None:
        raise FileExistsError(problem)
    tuner, adapter = resolve_adapter(model, adapter_name)
    modules = adapted_modules(tuner, adapter)
    export_format.check(tuner.peft_config[adapter], {m.name: m.index.numel() for m in modules}, settings)
    check_finite(modules)

    def write(folder: Path) -> None:
        export_format.write(tuner, adapter, modules, folder, settings)

    return write_folder(out_dir, overwrite, write)


def export_lora(
    model: nn.Module,
    out_dir: Union[str, os.PathLike],
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    adapter_name: Optional[str] = None,
    base_model: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write an SSAH adapter of ``model`` as an exact peft LoRA adapter folder (:mod:`ssah_peft.export.lora`).

    Loads with plain peft (``PeftModel.from_pretrained(base, out_dir)``, no ssah_peft needed) and serves with vLLM
    (``--enable-lora``). ``max_rank``: refuse an adapter that needs a larger rank (select mode: the most slices a
    module selects), as vLLM would; export it with :func:`export_merged` instead. An adapter with
    ``modules_to_save`` is refused. ``base_model``: recorded as ``base_model_name_or_path`` (default: the adapter's).
    """
    return export_adapter(
        model, out_dir, "lora", adapter_name=adapter_name, overwrite=overwrite, max_rank=max_rank, base_model=base_model
    )


def export_merged(
    model: nn.Module,
    out_dir: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    adapter_name: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Merge an SSAH adapter into ``model`` (in place: the model is unwrapped) and save it as a checkpoint folder,
    with ``tokenizer`` beside it (:mod:`ssah_peft.export.merged`); ``AutoModelForCausalLM.from_pretrained`` loads it.
    """
    return export_adapter(model, out_dir, "merged", adapter_name=adapter_name, overwrite=overwrite, tokenizer=tokenizer)
