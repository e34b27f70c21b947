"""Register ssah-peft with peft in processes that never import ssah_peft.

Installed with the package as a top-level module plus ``ssah_peft_autoload.pth``, which Python's
``site`` runs at start-up. It costs one entry on ``sys.meta_path`` and imports nothing heavy: only when
``peft`` itself is imported does it import ``ssah_peft`` (right after peft finishes), so that
``PeftModel.from_pretrained`` and transformers' ``load_adapter`` can load SSAH adapters in a fresh
process.

Set ``SSAH_PEFT_NO_AUTOLOAD=1`` to switch it off: ssah_peft is then not imported, and peft would answer an SSAH
adapter with a bare ``KeyError: 'SSAH'`` from its table of config classes (a plain dict, looked up inside peft: no
hook reaches it). So the table gets a placeholder under ``"SSAH"`` instead, which raises
:class:`SSAHNotRegisteredError` saying to ``import ssah_peft``; importing it replaces the placeholder with the real
config class.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from importlib.abc import MetaPathFinder
from types import ModuleType


class SSAHNotRegisteredError(KeyError):
    """An SSAH adapter met peft while ssah-peft is not registered with it (a ``KeyError``, as peft's own lookup
    failure was, so code that caught that still catches this)."""

    def __str__(self) -> str:
        return str(self.args[0])


NOT_REGISTERED = (
    "This is an SSAH adapter (peft_type 'SSAH', made with ssah-peft), and ssah-peft is not registered with peft in "
    "this process because SSAH_PEFT_NO_AUTOLOAD is set: run `import ssah_peft` before loading it."
)


class _Unregistered(type):
    def __getattr__(cls, name: str):  # noqa: ANN204 - any class attribute peft asks for (from_pretrained, ...)
        raise SSAHNotRegisteredError(NOT_REGISTERED)

    def __call__(cls, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        raise SSAHNotRegisteredError(NOT_REGISTERED)


class SSAHConfigPlaceholder(metaclass=_Unregistered):
    """peft's config class for ``"SSAH"`` while ssah-peft is switched off: every use raises
    :class:`SSAHNotRegisteredError`. ``ssah_peft`` recognises it by ``ssah_peft_placeholder`` and replaces it."""

    ssah_peft_placeholder = True


def _import_ssah_peft(peft: ModuleType) -> None:
    try:
        import ssah_peft  # noqa: F401
    except Exception as error:  # never break the user's `import peft`
        warnings.warn(f"ssah-peft could not register with peft: {error!r}", stacklevel=3)


def _add_placeholder(peft: ModuleType) -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault("SSAH", SSAHConfigPlaceholder)


class _AfterPeft(MetaPathFinder):
    """Runs ``action`` once, right after the module ``peft`` has been executed.

    It stays on ``sys.meta_path`` until then: transformers probes ``importlib.util.find_spec("peft")`` (to see
    whether peft is installed) long before anything imports it, and a finder that left at the first lookup would miss
    the real import. Every lookup gets a spec whose loader runs ``action`` after peft's own code; only the spec the
    import uses ever executes."""

    def __init__(self, action: Callable[[ModuleType], None]) -> None:
        self.action = action
        self.looking = False

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != "peft" or self.looking:
            return None
        self.looking = True  # the lookup below asks the finders again, this one included
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self.looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            exec_peft(module)
            self.action(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "peft" in sys.modules or any(isinstance(finder, _AfterPeft) for finder in sys.meta_path):
        return
    action = _add_placeholder if os.environ.get("SSAH_PEFT_NO_AUTOLOAD") else _import_ssah_peft
    sys.meta_path.insert(0, _AfterPeft(action))


install()
