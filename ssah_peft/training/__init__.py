"""The training layer: what every fine-tuning run of the project is made of, below the demo's experiments
(:mod:`ssah_peft.experiments`) and the user's job (:mod:`ssah_peft.finetuning`, ``ssah-peft finetune``), one concept
per module:

* :mod:`.methods`: each fine-tuning method once (:class:`Method`: its peft config, its units chosen from a unit map
  by a :class:`UnitSelector`), with the adapter builders and the standard methods;
* :mod:`.data`: records as SFT examples with the loss on the responses only, and evenly spread subsets;
* :mod:`.trainer`: a method's adapter on a model, the training schedule, and TRL's ``SFTTrainer`` on those examples
  (:class:`ResponseLossSFTTrainer`), whose loss runs the output head only on the positions that predict a response
  token.
"""

from .data import record_tokens, response_loss_dataset, sft_dataset, spread
from .methods import (
    FULL,
    LORA,
    SSAH_PROTECT_ALL_CU,
    SSAH_PROTECT_TOP_CU,
    SSAH_SELECT_RU,
    Method,
    UnitSelector,
    lora_config,
    protect_config,
    select_config,
    ssah_protect,
    ssah_select,
)
from .trainer import ResponseLossSFTTrainer, keeps_logits, sft_trainer, training_arguments, with_method

__all__ = [
    "ResponseLossSFTTrainer",
    "FULL",
    "LORA",
    "SSAH_PROTECT_ALL_CU",
    "SSAH_PROTECT_TOP_CU",
    "SSAH_SELECT_RU",
    "Method",
    "UnitSelector",
    "keeps_logits",
    "lora_config",
    "protect_config",
    "record_tokens",
    "response_loss_dataset",
    "select_config",
    "sft_trainer",
    "sft_dataset",
    "spread",
    "ssah_protect",
    "ssah_select",
    "training_arguments",
    "with_method",
]
