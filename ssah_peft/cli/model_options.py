"""The one model-loading option set: ``--model``, ``--dtype``, ``--device-map``, ``--load-in-4bit`` (and, where a
command renders conversations, ``--chat-template``/``--plain-chat-template`` and ``--system-prompt``).

Every command that loads a model declares these options with :func:`add_model_arguments`, checks ``--model`` with
:func:`check_model_source` before any work, and loads with :func:`load_model`, so that an option means the same in
every command. Where the model goes (:func:`device_map`):

1. ``--device-map`` as given, when given;
2. under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1) with CUDA: the process's own GPU,
   ``cuda:LOCAL_RANK``, since every process holds a whole model;
3. with ``--load-in-4bit`` and no CUDA: ``"cpu"`` (bitsandbytes' CPU backend);
4. otherwise none: transformers' default (a full-precision model on the CPU, a 4-bit one on the current GPU).
   Pass ``--device-map auto`` to spread a large model over several GPUs.

**Model sources.** ``--model`` (and ``--adapter``, ``--judge``) names an embedded model, a local folder or a
Hugging Face hub id. A value is a local path, and an error names it when it does not exist, if it exists, starts
like a path (``/``, ``./``, ``../``, ``~``), contains a backslash, has more than one ``/``, ends with ``/``,
is not a valid hub id, or if its first part is a folder in the current directory (``runs/model`` where
``runs/`` exists). Anything else (``owner/name``, or a bare name such as ``gpt2``) is left to the hub. A local
folder must hold the checkpoint's ``config.json`` (an adapter's ``adapter_config.json``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from ..data.text_files import read_text
from ..models import DEFAULT_MODEL, EMBEDDED_MODELS
from ..scoring import PLAIN_CHAT_TEMPLATE
from .errors import CLIError, loading, user_errors
from .paths import PARTIAL_SCORES, UNIT_MAP, check_input_file, is_kind, safetensors_metadata

#: Help of every ``--model`` option.
MODEL_HELP = (
    f"embedded model name ({', '.join(EMBEDDED_MODELS)}), local checkpoint folder, or hub id owner/name; a value "
    "that starts with / ./ ../ ~, has more than one '/', or whose first part is a folder here is a local path"
)
#: Values of ``--dtype``; ``auto`` is the checkpoint's dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    required: bool = False,
    dtype: str = "float32",
    chat_template: bool = False,
    system_prompt: bool = False,
) -> None:
    """Add the model-loading options to ``parser``: ``--model`` (``required``, else the embedded default model),
    ``--dtype`` (default ``dtype``), ``--device-map``, ``--load-in-4bit``; with ``chat_template`` also
    ``--chat-template``/``--plain-chat-template``, with ``system_prompt`` also ``--system-prompt``."""
    parser.add_argument("--model", required=required, default=None if required else DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=dtype,
        help="weight dtype (auto: the checkpoint's), also the compute dtype of --load-in-4bit (auto: float32)",
    )
    parser.add_argument(
        "--device-map",
        help="transformers device_map, e.g. auto, cpu, cuda:0 (default: the process's own GPU under torchrun or "
        "accelerate launch; cpu with --load-in-4bit and no GPU; else transformers' default: one device)",
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="load the model in bitsandbytes NF4")
    if chat_template:
        template = parser.add_mutually_exclusive_group()
        template.add_argument(
            "--chat-template", help="file with a Jinja chat template to use (default: the tokenizer's template)"
        )
        template.add_argument(
            "--plain-chat-template", action="store_true", help="use 'User: ...\\nAssistant: ...' (base models)"
        )
    if system_prompt:
        parser.add_argument("--system-prompt", help="system turn of every conversation (default: the chat template's)")


def device_map(args: argparse.Namespace) -> Optional[str]:
    """The ``device_map`` to load the model of ``args`` with (module docstring)."""
    import torch

    if args.device_map is not None:
        return args.device_map
    if torch.cuda.is_available() and _launched_processes() > 1:
        local_rank = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local_rank) if local_rank is not None else torch.cuda.current_device()}"
    if args.load_in_4bit and not torch.cuda.is_available():
        return "cpu"
    return None


def _launched_processes() -> int:
    """The number of processes a launcher started (a process group's size once one is joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` as the options of ``args`` say; a model that cannot be loaded is a user error."""
    from ..models import load  # looked up at each call: tests replace the loader

    with loading(args.model):
        return load(args.model, dtype=args.dtype, device_map=device_map(args), load_in_4bit=args.load_in_4bit)


def chat_template(args: argparse.Namespace) -> tuple[Optional[str], str]:
    """``(template, name)`` of ``--chat-template``/``--plain-chat-template``: the template text (None: the
    tokenizer's) and how calibration records name it (the file, ``"plain"`` or ``"tokenizer"``)."""
    if args.chat_template is not None:
        check_input_file(args.chat_template, "--chat-template")
        with user_errors(args.chat_template):
            return read_text(args.chat_template), args.chat_template
    if args.plain_chat_template:
        return PLAIN_CHAT_TEMPLATE, "plain"
    return None, "tokenizer"


# ----------------------------------------------------------------------------------------------------
# Model sources
# ----------------------------------------------------------------------------------------------------

_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def _path_reason(name: str) -> Optional[str]:
    """Why ``name`` is read as a local path rather than a hub id (module docstring), or None for a hub id."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name:
        return "it starts like a path"
    if name.endswith("/"):
        return "it ends with '/'"
    parts = name.split("/")
    if len(parts) > 2:
        return "hub ids have at most one '/'"
    if not all(_HUB_PART.fullmatch(part) and "--" not in part and ".." not in part for part in parts):
        return "it is not a valid hub id"
    if len(parts) == 2 and Path(parts[0]).is_dir():
        return f"the folder {parts[0]}/ exists here"
    return None


def check_model_source(
    name: Optional[str],
    option: str = "--model",
    *,
    marker: str = "config.json",
    what: str = "model checkpoint",
    embedded: Iterable[str] = (),
) -> None:
    """``name`` is an embedded model, a hub id, or an existing local folder holding ``marker`` (module docstring);
    a local checkpoint's weights must not be an ssah-peft file (a unit map written over ``model.safetensors``).

    ``embedded``: names that need no folder (:data:`ssah_peft.models.EMBEDDED_MODELS` for ``--model``)."""
    if name is None or name in set(embedded):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{option} {name} is a file; give the {what} folder (with {marker})")
        if not (path / marker).is_file():
            raise CLIError(
                f"{option} {name} is a folder without {marker}, not a {what} (as save_pretrained writes); "
                "give the folder that holds it"
            )
        for weights in sorted(path.glob("*.safetensors")):
            with user_errors(weights):
                safetensors_metadata(weights)  # a damaged file is named here, not deep inside from_pretrained
            if is_kind(weights, (UNIT_MAP, PARTIAL_SCORES)):
                raise CLIError(
                    f"{option} {name}: {weights} is an ssah-peft unit map or partial score file, not model weights "
                    "(an output written into the checkpoint?); restore the checkpoint's weights"
                )
        return
    reason = _path_reason(name)
    if reason is not None:
        raise CLIError(
            f"{option} {name} does not exist (read as a local path because {reason}; hub ids look like owner/name)"
        )
