"""Streaming statistics of a scoring pass: what the hooks on the output projections accumulate, and how it merges.

A score needs a statistic of every unit's input over all calibration tokens, but the tokens arrive in batches, on
several devices and possibly in several processes. This module keeps that bookkeeping apart from the pass itself:
per-batch moments (count, mean, M2) merged into float64 with Chan et al.'s parallel formula (variance, wanda), SNIP's
per-sequence saliency sums and the backward that feeds them, the hooks that feed both from a block's output
projection, and the merge of every rank's state vectors. States are plain float64 vectors, so shards merge
through files (:mod:`.partial_files`) exactly as ranks merge through ``torch.distributed``.

Used only inside :mod:`ssah_peft.scoring`; not public API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..quantization import dense_weight
from ..units import ArchitectureSpec


class BatchTokens:
    """The tokens to score in the current batch: their counts and which rows of a layer input they are.

    All of it is worked out on the host when the batch is set, before its forward: a mask on a GPU is read back
    there, once per batch, so the hooks take no count or index from the device and never make it wait in the
    middle of a forward. For SNIP a scored token counts as a loss target, so the first position of a sequence
    never counts.
    """

    def __init__(self, targets_only: bool) -> None:
        self.targets_only = targets_only
        self.mask = torch.zeros(0, 0, dtype=torch.bool)
        self.num_tokens = 0
        self.num_sequences = 0
        self._index: Optional[torch.Tensor] = None  # flat indices of the scored positions; None: all of them
        self._index_by_device: dict[torch.device, torch.Tensor] = {}

    def set(self, mask: torch.Tensor, batch_index: int) -> None:
        if mask.dim() != 2:
            raise ValueError(f"The token mask must be [batch, seq], got shape {tuple(mask.shape)}")
        self.mask = mask.to("cpu", torch.bool)
        counted = self.mask[:, 1:] if self.targets_only else self.mask
        self.num_tokens = int(counted.sum())
        if self.num_tokens == 0:
            raise ValueError(
                f"Calibration batch {batch_index} has no token to score (all padding, or the score mask selects "
                "nothing, e.g. tokens='response' with responses cut off by max_length"
                + ("; SNIP scores loss targets, never a sequence's first token)" if self.targets_only else ")")
            )
        self.num_sequences = int(counted.any(dim=1).sum())
        self._index = None if bool(self.mask.all()) else self.mask.flatten().nonzero().flatten()
        self._index_by_device = {}

    def select(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The scored rows of a ``[batch, seq, width]`` layer input as ``[tokens, width]``: a view of it when every
        position is scored, else a gathered copy."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.mask.numel():
            raise ValueError(
                f"{name} received {flat.shape[0]} token positions but the token mask has {self.mask.numel()} "
                f"(shape {tuple(self.mask.shape)}); prepare_model_inputs_fn must return a [batch, seq] mask"
            )
        if self._index is None:
            return flat
        if flat.device not in self._index_by_device:
            self._index_by_device[flat.device] = _to_device(self._index, flat.device)
        return flat.index_select(0, self._index_by_device[flat.device])


#: Batches whose moments a :class:`Moments` buffers before merging them into its float64 state.
PENDING_BATCHES = 32


class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations), merged exactly (Chan et al.) in float64.

    A batch costs one reduction (:func:`batch_moments`: its mean and variance in the model's precision, float32
    at least), kept as it is; every :data:`PENDING_BATCHES` batches (and before any read) the buffered batches are
    merged into the float64 state at once. So a batch launches nothing but its reduction: no per-batch merge
    arithmetic, whose handful of tiny kernels per projection cost a GPU as much as the reductions. The state
    lives on the device of the first batch and is updated in place, so a scoring pass copies nothing between
    devices and reads nothing back until :meth:`state`.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.num_tokens = 0  # merged into the float64 state; the buffered batches are in _pending
        self.num_sequences = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (count, mean, variance) per batch

    def add_tokens(self, x: torch.Tensor) -> None:
        """Add a ``[tokens, width]`` batch (left unmodified: it may be a view of the layer's input)."""
        if x.shape[0] == 0:
            return
        if self._pending and self._pending[-1][1].device != x.device:
            self._merge_pending()
        self._pending.append((x.shape[0], *batch_moments(x, one_read=x.device.type == "cuda")))
        if len(self._pending) == PENDING_BATCHES:
            self._merge_pending()

    def _merge_pending(self) -> None:
        """Merge the buffered batches into the float64 state: their joint mean and M2 (Chan et al. for many parts:
        M2 = Σ_b n_b (var_b + (mean_b − mean)²)), then that one part into the state."""
        if not self._pending:
            return
        counts, means, variances = zip(*self._pending)
        self._pending = []
        total = sum(counts)
        batch_means, batch_variances = torch.stack(means + variances).double().split(len(counts))
        # each batch's share of the tokens (for the mean) and its count (for M2), in one copy to the device
        weights = _to_device(
            torch.tensor([[c / total for c in counts], counts], dtype=torch.float64), batch_means.device
        )
        mean = batch_means.T.mv(weights[0])
        self._merge(total, mean, batch_variances.add_(batch_means.sub_(mean).square_()).T.mv(weights[1]))

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge ``count`` tokens of per-channel ``mean`` and ``m2`` (any float dtype, converted as they are read).
        Into empty statistics, float64 ``mean`` and ``m2`` become the state: pass tensors nothing else holds."""
        if count == 0:
            return
        if self.mean is None or self.m2 is None:
            self.num_tokens, self.mean, self.m2 = count, mean.double(), m2.double()
            return
        previous, self.num_tokens = self.num_tokens, self.num_tokens + count
        delta = mean.to(self.mean.device) - self.mean  # float64 by type promotion
        self.mean.add_(delta, alpha=count / self.num_tokens)
        self.m2.add_(m2.to(self.m2.device)).addcmul_(delta, delta, value=previous * count / self.num_tokens)

    def end_batch(self, tokens: BatchTokens) -> None:
        self.num_sequences += tokens.num_sequences  # tokens are counted as they are added

    def unbiased_variance(self) -> torch.Tensor:
        self._merge_pending()
        if self.m2 is None or self.num_tokens < 2:
            raise ValueError("The variance needs at least two scored tokens; the calibration set has fewer")
        return self.m2 / (self.num_tokens - 1)

    def root_mean_square(self) -> torch.Tensor:
        """‖X_j‖₂ / √N, from M2 + N·mean² = Σ_n X_nj²."""
        self._merge_pending()
        if self.m2 is None or self.mean is None:
            raise ValueError("No token was scored")
        return ((self.m2 + self.num_tokens * self.mean.square()) / self.num_tokens).sqrt()

    def state(self) -> torch.Tensor:
        """``[num_tokens, num_sequences, mean..., M2...]`` in float64, on the statistics' device
        (:func:`host_copies` reads many back at once)."""
        self._merge_pending()
        if self.mean is None or self.m2 is None:
            return torch.cat(
                [_counts(self.num_tokens, self.num_sequences), torch.zeros(2 * self.width, dtype=torch.float64)]
            )
        return torch.cat([_counts(self.num_tokens, self.num_sequences, self.mean.device), self.mean, self.m2])

    def load_states(self, states: Sequence[torch.Tensor]) -> None:
        """Replace the statistics by the exact merge of several :meth:`state` vectors, in order."""
        self.num_tokens, self.num_sequences, self.mean, self.m2 = 0, 0, None, None
        self._pending = []
        for state in states:
            self._merge(int(state[0]), state[2 : 2 + self.width].clone(), state[2 + self.width :].clone())
            self.num_sequences += int(state[1])


class Saliency:
    """SNIP: running sum over sequences of Σ_i |W_ij · ∂ℓ(x)/∂W_ij| per unit j, in float64."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.num_tokens = 0
        self.num_sequences = 0
        self.total = torch.zeros(width, dtype=torch.float64)

    def add_sequences(self, per_sequence_gradients: Iterable[torch.Tensor], weight: torch.Tensor) -> None:
        magnitude = weight.abs().to(_compute_dtype(weight.dtype))
        total = self.total.to(weight.device)
        for gradient in per_sequence_gradients:
            total += (magnitude * gradient.abs()).sum(dim=0, dtype=torch.float64)
        self.total = total

    def end_batch(self, tokens: BatchTokens) -> None:
        self.num_tokens += tokens.num_tokens
        self.num_sequences += tokens.num_sequences

    def state(self) -> torch.Tensor:
        """``[num_tokens, num_sequences, total...]`` in float64, on the statistics' device."""
        return torch.cat([_counts(self.num_tokens, self.num_sequences, self.total.device), self.total])

    def load_states(self, states: Sequence[torch.Tensor]) -> None:
        self.num_tokens = int(sum(int(s[0]) for s in states))
        self.num_sequences = int(sum(int(s[1]) for s in states))
        self.total = torch.stack([s[2:] for s in states]).sum(dim=0)

    def mean(self) -> torch.Tensor:
        return self.total / self.num_sequences


Accumulator = Union[Moments, Saliency]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models, the model's own precision above."""
    return torch.promote_types(dtype, torch.float32)


def batch_moments(x: torch.Tensor, one_read: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance (divided by the count) of a ``[tokens, width]`` batch, in
    :func:`_compute_dtype` of its dtype.

    Both ways are centred, the variance being taken about the batch's own mean rather than as E[x²] − mean², so a
    channel whose mean dwarfs its spread keeps its variance. ``one_read`` (CUDA, ROCm included): the batch-norm
    statistics kernel (``batch_norm_update_stats`` without running statistics), one Welford reduction over the
    tokens that reads the batch once, converting as it reads, and returns both in its accumulation type (float32
    for a bf16/fp16 batch). So no copy of the batch is made and each layer input is read once: half the reads of
    a sum followed by a variance. Elsewhere two vectorized passes over a converted batch: the CPU's kernel of that
    operator returns a half-precision batch's statistics in half precision, and not every backend has one.
    """
    if one_read:
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    x = x.to(_compute_dtype(x.dtype))
    mean = x.mean(dim=0)
    return mean, (x - mean).square_().mean(dim=0)


def _counts(num_tokens: int, num_sequences: int, device: Optional[torch.device] = None) -> torch.Tensor:
    counts = torch.tensor([num_tokens, num_sequences], dtype=torch.float64)
    return counts if device is None else _to_device(counts, device)


def host_copies(tensors: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """``tensors`` (``None`` kept) on the host, read back in one copy per device.

    Each read from a GPU makes the host wait for it: reading a model's few hundred statistic vectors one by one
    cost a 1B model's scoring pass as much as a forward's worth of batches' reductions.
    """
    copies = list(tensors)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, tensor in enumerate(copies):
        if tensor is not None and tensor.device.type != "cpu":
            by_device.setdefault(tensor.device, []).append((i, tensor))
    for parts in by_device.values():
        flat = torch.cat([tensor.reshape(-1) for _, tensor in parts]).cpu()
        for (i, tensor), copy in zip(parts, flat.split([tensor.numel() for _, tensor in parts])):
            copies[i] = copy.view(tensor.shape)
    return copies


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: a copy from pageable memory to a CUDA device
    first waits for everything queued on the stream, one from pinned memory is queued like a kernel."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class OutputProjection:
    """One block's output projection B, its weight statistic and the running statistics of its hook."""

    def __init__(self, name: str, module: nn.Module, layer: int, kind: str, method: str) -> None:
        self.name, self.module, self.layer, self.kind, self.method = name, module, layer, kind, method
        weight = dense_weight(module)  # once: for 4-bit layers, a single dequantization
        if weight.is_meta:
            raise ValueError(
                f"{name} is offloaded (its weight is on the meta device, as accelerate does for modules that "
                "device_map puts on 'cpu' or 'disk' next to GPUs); score the model without offloading"
            )
        self.width = int(weight.shape[1])
        self.accumulator: Accumulator = Saliency(self.width) if method == "snip" else Moments(self.width)
        self.weight_statistic: Optional[torch.Tensor] = None  # snip: the weights enter the saliency sums
        # norms accumulated in float64 as the weight is read, once: no float64 copy of it
        if method == "variance":
            self.weight_statistic = torch.linalg.vector_norm(weight, dim=0, dtype=torch.float64).square_()  # ‖W_{:,j}‖²
        elif method == "wanda":
            self.weight_statistic = torch.linalg.vector_norm(weight, ord=1, dim=0, dtype=torch.float64)  # Σ_i |W_ij|
        self._handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def register(self, tokens: BatchTokens) -> None:
        if isinstance(self.accumulator, Saliency):
            self._handle = self.module.register_forward_hook(_gradient_hook(self.accumulator))
        else:
            self._handle = self.module.register_forward_pre_hook(moment_hook(self.accumulator, tokens, self.name))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def check_finite(self, state: torch.Tensor, weight_statistic: Optional[torch.Tensor]) -> None:
        """Raise if NaN/inf reached the statistics (read back: :meth:`Moments.state` and the weight statistic),
        naming the projection: its scores would be meaningless."""
        values = [state] if weight_statistic is None else [state, weight_statistic]
        if not all(torch.isfinite(v).all() for v in values):
            raise ValueError(
                f"Non-finite (NaN/inf) {'gradients' if self.method == 'snip' else 'activations'} at the input of "
                f"{self.name}: the model produces NaN/inf on the calibration data (fp16 overflow? corrupted "
                "weights?)"
            )


def unit_score(method: str, accumulator: Accumulator, weight_statistic: Optional[torch.Tensor]) -> torch.Tensor:
    """One block's scores from its merged statistics (the formulas: :mod:`ssah_peft.scoring`)."""
    if isinstance(accumulator, Saliency):
        return accumulator.mean()
    if weight_statistic is None:
        raise ValueError(f"{method} scores need the weight statistics of the output projections; none were given")
    activation = accumulator.unbiased_variance() if method == "variance" else accumulator.root_mean_square()
    return activation * weight_statistic


def merged_accumulator(method: str, states: Sequence[torch.Tensor]) -> Accumulator:
    """A CPU accumulator of ``method``'s kind holding the exact merge of ``states`` (:meth:`state` vectors)."""
    size = states[0].numel() - 2  # two counts, then one (saliency) or two (mean, M2) entries per unit
    accumulator: Accumulator = Saliency(size) if method == "snip" else Moments(size // 2)
    accumulator.load_states(states)
    return accumulator


def moment_hook(moments: Moments, tokens: BatchTokens, name: str) -> Callable[..., None]:
    """The forward pre-hook a scoring pass puts on the output projection ``name``: it adds the scored tokens of
    each batch's input to ``moments`` (public so that ``benchmarks/scoring.py`` counts exactly what a pass runs)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        moments.add_tokens(tokens.select(args[0].detach(), name))

    return hook


def _gradient_hook(saliency: Saliency) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0].detach()

        def on_gradient(grad_output: torch.Tensor) -> None:
            # ∇_W ℓ(x) of one sequence = Σ_t g_t x_tᵀ; sequences are separable (causal masks), so one
            # backward of Σ_x ℓ(x) yields every per-sequence gradient
            dtype = _compute_dtype(x.dtype)
            g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).to(dtype)
            inputs = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
            per_sequence = (g[s].T @ inputs[s] for s in range(g.shape[0]))
            saliency.add_sequences(per_sequence, dense_weight(module))

        if output.requires_grad:
            output.register_hook(on_gradient)

    return hook


def attach_projections(model: nn.Module, spec: ArchitectureSpec, method: str) -> list[OutputProjection]:
    projections = []
    for kind, layer, name, module in spec.output_projections(model):
        if isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"{name} is wrapped by a peft adapter; score the base model, or merge the adapters first "
                "(model.merge_and_unload(), or ssah_peft.merge_and_dequantize for a quantized base)"
            )
        projections.append(OutputProjection(name, module, layer, kind, method))
    return sorted(projections, key=lambda p: (p.layer, p.kind))


def snip_backward(
    model: nn.Module,
    forward_fn: Callable[[nn.Module, dict[str, Any]], Any],
    inputs: dict[str, Any],
    tokens: BatchTokens,
    batch_index: int,
) -> None:
    """Backward of Σ_x ℓ(x) to the input embeddings only (no parameter gradients are accumulated)."""
    if "input_ids" not in inputs:
        raise ValueError("method='snip' needs input_ids in the model inputs (the targets of the loss)")
    captured: list[torch.Tensor] = []

    def require_grad(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        output = output if output.requires_grad else output.detach().requires_grad_()
        captured.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(require_grad)
    try:
        with torch.enable_grad():
            output = forward_fn(model, inputs)
            logits = output.logits if hasattr(output, "logits") else output[0]
            loss = _sequence_losses(logits, inputs["input_ids"], tokens.mask.to(logits.device))
            if not torch.isfinite(loss):
                raise ValueError(f"Calibration batch {batch_index}: the loss is not finite ({loss.item()})")
            torch.autograd.grad(loss, captured)
    finally:
        handle.remove()


def _sequence_losses(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over sequences of the mean cross-entropy of their scored tokens, each predicted from the previous one."""
    dtype = _compute_dtype(logits.dtype)
    targets = input_ids[:, 1:].to(logits.device)
    target_mask = mask[:, 1:].to(dtype)
    token_loss = F.cross_entropy(logits[:, :-1].to(dtype).transpose(1, 2), targets, reduction="none")
    per_sequence = (token_loss * target_mask).sum(dim=1) / target_mask.sum(dim=1).clamp(min=1)
    return per_sequence.sum()


def distributed_run() -> bool:
    """Whether this process is one rank of an initialized ``torch.distributed`` group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def merge_across_ranks(accumulators: Sequence[Accumulator]) -> None:
    """Gather every rank's statistics (one collective) and merge them in rank order on every rank."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    states = [a.state() for a in accumulators]
    local = torch.cat([state.to(device) for state in states])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    sizes = [s.numel() for s in states]
    per_rank = [torch.split(g.cpu(), sizes) for g in gathered]
    for i, accumulator in enumerate(accumulators):
        accumulator.load_states([states[i] for states in per_rank])
