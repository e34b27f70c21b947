"""Where tensors go for a model: one place, because every pass that feeds a model (scoring, evaluation, probes,
attribution) must put its input ids where the model reads them, also when a device_map spreads it over devices."""

from __future__ import annotations

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids must go: the device of its input embeddings (first device under a device_map)."""
    return model.get_input_embeddings().weight.device
