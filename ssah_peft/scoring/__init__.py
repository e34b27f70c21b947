"""Unit importance from a calibration pass: the paper's activation variance and the Wanda / SNIP baselines.

A unit is input channel j of a block's output projection B (see :mod:`ssah_peft.units`). Li & Kim (arXiv
2410.10862, Eq. 1) score it by how much its input fluctuates over calibration tokens, weighted by the size of the
column of B it feeds::

    I_j = Var_n(X^B_{n,j}) · ‖W^B_{:,j}‖²      (unbiased variance over all scored tokens n)

Run once on safety data (I_S) and once on utility data (I_U); :class:`ssah_peft.UnitMap` turns the pair into unit
types. For comparison, the per-weight scores Wei et al. (2024) used are aggregated per unit:

* ``"wanda"``: |W_ij|·‖X_j‖ summed over the rows of column j, i.e. RMS_n(X_{n,j}) · Σ_i |W_ij|. The root mean
  square (‖X_j‖₂/√N, as in Wei et al.'s code) rather than ‖X_j‖₂ keeps data sets of different sizes comparable;
  within one data set both rank identically.
* ``"snip"``: |W ⊙ ∇_W ℓ(x)| summed over column j and averaged over calibration sequences x, where ℓ(x) is the
  mean causal-LM loss of the sequence's scored tokens (as targets), as in Wei et al.'s code.

The pass is streaming and exact: hooks on the output projections compute each batch's moments (count, mean,
variance about the batch's own mean) in the model's precision, float32 at least, and merge them into float64 state with
Chan et al.'s parallel formula, so any batching, padding side, device placement or number of
``torch.distributed`` ranks gives the scores of a one-shot computation on the concatenated tokens, to that
precision's rounding (a relative 1e-7 for half-precision and float32 models). The same
statistics (:class:`UnitStatistics`) can be saved per shard by independent jobs (:func:`save_partial_scores`) and
merged later (:func:`merge_partial_scores`), with the same result.

The package, one concept per module:

* :mod:`.calibration`: (prompt, response) pairs → padded token batches with a mask of the tokens to score; the
  hash of a calibration set.
* :mod:`.scorer`: the scoring pass, :func:`score_units` and :func:`unit_statistics`, and their options.
* :mod:`.results`: :class:`UnitScores`, :class:`UnitStatistics` and what identifies the model they belong to.
* :mod:`.accumulators`: the streaming statistics, the hooks that feed them, SNIP's backward, the merge of ranks.
* :mod:`.partial_files`: saving the statistics of one shard, and merging the files of all shards into scores.
* :mod:`.attribution`: one-number attributions of safety to units for the frontier's v2 choosers (the refusal
  direction's write, the alignment's weight change, the refusal margin's gradient attribution and its conflict
  with the fine-tuning data's gradient).
"""

from .attribution import (
    alignment_delta_scores,
    conflict_scores,
    margin_attribution_scores,
    refusal_direction_scores,
    unit_sums,
)
from .calibration import (
    PLAIN_CHAT_TEMPLATE,
    TOKEN_SELECTIONS,
    CalibrationPair,
    TokenSelection,
    build_calibration_batches,
    calibration_data_hash,
)
from .partial_files import PARTIAL_FILE_FORMAT, PARTIAL_FILE_FORMAT_VERSION, merge_partial_scores, save_partial_scores
from .results import UnitScores, UnitStatistics, model_fingerprint, model_weights_hash
from .scorer import (
    SCORING_METHODS,
    Batch,
    ScoringMethod,
    ScoringOptions,
    forward_fn_dict,
    prepare_model_inputs_fn_language_modeling,
    score_units,
    unit_statistics,
)

__all__ = [
    "Batch",
    "CalibrationPair",
    "PARTIAL_FILE_FORMAT",
    "PARTIAL_FILE_FORMAT_VERSION",
    "PLAIN_CHAT_TEMPLATE",
    "SCORING_METHODS",
    "ScoringMethod",
    "ScoringOptions",
    "TOKEN_SELECTIONS",
    "TokenSelection",
    "UnitScores",
    "UnitStatistics",
    "alignment_delta_scores",
    "build_calibration_batches",
    "calibration_data_hash",
    "conflict_scores",
    "forward_fn_dict",
    "margin_attribution_scores",
    "merge_partial_scores",
    "model_fingerprint",
    "model_weights_hash",
    "prepare_model_inputs_fn_language_modeling",
    "refusal_direction_scores",
    "save_partial_scores",
    "score_units",
    "unit_statistics",
    "unit_sums",
]
