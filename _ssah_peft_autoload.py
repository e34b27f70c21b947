"""Register ssah-peft with peft in processes that never import ssah_peft.

Installed with the package as a top-level module plus ``ssah_peft_autoload.pth``, which Python's
``site`` runs at start-up. It costs one entry on ``sys.meta_path`` and imports nothing heavy: only when
``peft`` itself is imported does it import ``ssah_peft`` (right after peft finishes), so that
``PeftModel.from_pretrained`` and transformers' ``load_adapter`` can load SSAH adapters in a fresh
process. Set ``SSAH_PEFT_NO_AUTOLOAD=1`` to switch it off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from importlib.abc import MetaPathFinder


class _RegisterAfterPeft(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001
            exec_peft(module)
            try:
                import ssah_peft  # noqa: F401
            except Exception as error:  # never break the user's `import peft`
                warnings.warn(f"ssah-peft could not register with peft: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if os.environ.get("SSAH_PEFT_NO_AUTOLOAD") or "peft" in sys.modules:
        return
    if not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())


install()
