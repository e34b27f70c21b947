"""Counting what a piece of PyTorch code launches: CPU-measurable evidence for GPU time.

On a GPU every aten operator is a kernel launch, memory-bound kernels cost the bytes they move, and an operator
whose result the host must read (a count, a nonzero index) makes the host wait for the device. A dispatch mode sees
every operator below autograd (backward ones included) with its tensors, the same on any CPU as on a GPU, so these
counts compare commits without a GPU. Used by ``scoring.py --count-ops``, ``ops_per_step.py`` and the scorer's
regression test (``tests/test_scoring_gpu_costs.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: Operators whose result size or value the host must read back from the device before it can go on.
SYNCHRONISING = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::is_nonzero", "aten::equal"}


class OperatorCounter(TorchDispatchMode):
    """The aten operators on tensors run while active: names, synchronising ones, bytes moved, elements made."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.operators: Counter[str] = Counter()
        self.synchronising: Counter[str] = Counter()
        self.bytes_moved = 0  # every tensor argument read in full, every output written (views: nothing)
        self.elements: Counter[torch.dtype] = Counter()  # outputs computed from tensors, neither in place nor views
        self.largest: Counter[torch.dtype] = Counter()  # the most elements of one such output, per dtype

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not inputs and not outputs:
            return out  # host-side only (promote_types): no kernel
        name = func._schema.name
        self.operators[name] += 1
        if name in SYNCHRONISING or (name == "aten::index" and any(t.dtype == torch.bool for t in inputs[1:])):
            self.synchronising[name] += 1
        if not func.is_view:
            self.bytes_moved += sum(t.nbytes for t in inputs + outputs)
            if not func._schema.is_mutable and inputs:  # a buffer made from nothing (torch.empty) copies nothing
                for tensor in outputs:
                    self.elements[tensor.dtype] += tensor.numel()
                    self.largest[tensor.dtype] = max(self.largest[tensor.dtype], tensor.numel())
        return out
