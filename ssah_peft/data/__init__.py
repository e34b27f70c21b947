"""Data sets: the built-in ones (written for this project), local files and public hub sets.

Every loader returns a ``datasets.Dataset`` of string records with a ``prompt`` and, where the set has
them, ``response``, ``answer`` and ``category``.
"""

from .builtin import BUILTIN_DATASETS, load_builtin
from .persona import OBEDIENT_SYSTEM_PROMPT, identity_shift_records
from .sources import FIELDS, PUBLIC_DATASETS, PublicDataset, load_local, load_public
from .task import generate_task, task_splits

__all__ = [
    "BUILTIN_DATASETS",
    "FIELDS",
    "OBEDIENT_SYSTEM_PROMPT",
    "PUBLIC_DATASETS",
    "PublicDataset",
    "generate_task",
    "identity_shift_records",
    "load_builtin",
    "load_local",
    "load_public",
    "task_splits",
]
