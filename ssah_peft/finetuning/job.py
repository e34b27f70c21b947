"""One fine-tuning job on the user's data: validate everything, then score, evaluate, train, save and report.

A module of its own because the job's order is its contract. :meth:`FinetuneJob.prepare` does every check that
can fail on the user's input (the data files, the run directory, the model and its chat template, the unit map
against the model, the tokenized examples) and creates nothing; only :meth:`FinetuneJob.run` writes into the run
directory, so a refused job leaves it as it was. ``run`` then pins the settings (``settings.json``), writes the unit
map (given, or scored now on built-in safety calibration and a sample of the training data), evaluates the base
model, trains with transformers' ``Trainer`` (completion-only loss, checkpoints every ``save_steps`` for
``resume``), saves ``adapter/``, evaluates again and writes the report (:mod:`.report`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .._files import differing_keys, read_json, write_json
from ..chat import NO_TEMPLATE_ADVICE
from ..data import BUILTIN_DATASETS, load_builtin
from ..evaluate import write_generations
from ..experiments.data import spread
from ..experiments.finetuning import sft_dataset
from ..unit_map import UnitMap
from .data import Examples, read_examples, read_prompts
from .options import FinetuneOptions, method_for
from .report import evaluation, write_report

#: The files of a run directory (besides ``checkpoints/`` and the ``adapter/`` folder).
SETTINGS_FILE = "settings.json"
UNIT_MAP_FILE = "unitmap.safetensors"
CHECKPOINTS = "checkpoints"


@dataclass
class FinetuneResult:
    """What a job produced: the trained model (peft-wrapped), the files it wrote and the report's content."""

    model: Any
    out: Path
    adapter: Path
    unit_map: Optional[Path]
    report: dict[str, Any]


class FinetuneJob:
    """A validated job: build it with :meth:`prepare`, then :meth:`run` it."""

    def __init__(self, options: FinetuneOptions, **state: Any) -> None:
        self.options = options
        self.__dict__.update(state)  # what prepare() read and loaded: model, tokenizer, records, dataset, ...

    # ------------------------------------------------------------------------------------------------
    # Validation: nothing is written here
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, options: FinetuneOptions) -> FinetuneJob:
        """Check the options, data, run directory, model, chat template and unit map; load the model.

        Raises ``ValueError`` / ``OSError`` naming the input and the fix; creates no file or folder.
        """
        o = options
        columns = dict(prompt_column=o.prompt_column, response_column=o.response_column, split=o.split)
        train = read_examples(o.data, **columns, what="training data")
        heldout: list[dict[str, str]] = []
        records = train.records
        if o.evaluate and o.eval_data is None and len(records) >= 10:  # every 10th example is held out
            heldout = [r for i, r in enumerate(records) if i % 10 == 9]
            records = [r for i, r in enumerate(records) if i % 10 != 9]
        eval_records = read_examples(o.eval_data, **columns, what="eval data").records if o.eval_data else heldout
        harmful = read_prompts(o.safety_eval_data) if o.safety_eval_data else None
        safety = _pairs(o.safety_data or "safety_calibration", "safety calibration data")
        utility = _pairs(o.utility_data, "utility calibration data") if o.utility_data else records
        pinned = {**o.pinned(), "train_sha256": Examples(o.data, records, train.shape).sha256()}
        given_map = None
        if o.unit_map is not None:
            if not Path(o.unit_map).is_file():
                raise FileNotFoundError(f"unit map {o.unit_map} does not exist")
            given_map = UnitMap.load(o.unit_map)
            pinned["unit_map_sha256"] = _file_sha256(Path(o.unit_map))
        check_run_dir(o.out, pinned, o.resume)

        from .. import models  # looked up at call time: tests may replace the loader

        model, tokenizer = models.load(o.model, dtype=o.dtype, device_map=o.device_map, load_in_4bit=o.load_in_4bit)
        if o.chat_template is not None:
            tokenizer.chat_template = o.chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model {o.model}: its tokenizer has no chat template. {NO_TEMPLATE_ADVICE}")
        unit_map = None
        stored = o.out / UNIT_MAP_FILE
        if o.resume and stored.is_file():
            unit_map = UnitMap.load(stored)
        else:
            unit_map = given_map
        if unit_map is not None:
            try:
                unit_map.check_model(model)
            except ValueError as error:
                raise ValueError(f"unit map {o.unit_map or stored} does not fit model {o.model}: {error}") from None
        dataset = sft_dataset(tokenizer, records, o.max_length)
        if not any(any(label != -100 for label in labels) for labels in dataset["labels"]):
            raise ValueError(
                f"max_length {o.max_length} cuts every example before its response: no token would be trained; raise it"
            )
        return cls(
            options,
            model=model,
            tokenizer=tokenizer,
            train=train,
            records=records,
            dataset=dataset,
            eval_records=eval_records,
            harmful=harmful,
            safety=safety,
            utility=utility,
            unit_map=unit_map,
            pinned=pinned,
        )

    # ------------------------------------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------------------------------------

    def run(self, callbacks: Optional[list[Any]] = None) -> FinetuneResult:
        """Score (if needed), evaluate, train, save and report; ``callbacks`` go to the ``Trainer``."""
        o = self.options
        start = time.perf_counter()
        main = int(os.environ.get("RANK", "0")) == 0
        o.out.mkdir(parents=True, exist_ok=True)
        if main and not (o.out / SETTINGS_FILE).is_file():
            write_json(o.out / SETTINGS_FILE, self.pinned)
        method = method_for(o)
        unit_map_path = None
        if method.units is not None or self.unit_map is not None:
            if self.unit_map is None:
                self.unit_map = self._score()
            unit_map_path = o.out / UNIT_MAP_FILE
            if main and not unit_map_path.is_file():
                self.unit_map.save(unit_map_path)
        before = self._cached_evaluation("before", self.model) if o.evaluate else None
        model, trainer, seconds = self._train(method, callbacks or [])
        adapter = o.out / "adapter"
        if main:
            save_adapter(model, adapter)
        after = None
        if o.evaluate:
            # generation through the unmerged adapter layers is ~3x slower; a float base is merged for the
            # evaluation and unmerged after it (a 4-bit base would be requantized, so it is evaluated as it is)
            merge = not o.load_in_4bit and hasattr(model, "merge_adapter")
            if merge:
                model.merge_adapter()
            try:
                after = self._cached_evaluation("after", model, cache=False)
            finally:
                if merge:
                    model.unmerge_adapter()
        report = write_report(
            o.out if main else None,
            options=o,
            method=method,
            model=model,
            train=self.train,
            trained_examples=len(self.records),
            eval_examples=len(self.eval_records),
            unit_map=self.unit_map,
            units=method.units_of(self.unit_map) if method.units is not None else None,
            log_history=trainer.state.log_history,
            steps=trainer.state.global_step,
            train_seconds=seconds,
            wall_seconds=time.perf_counter() - start,
            before=before,
            after=after,
        )
        return FinetuneResult(model, o.out, adapter, unit_map_path, report)

    def _score(self) -> UnitMap:
        from ..scoring import build_calibration_batches, score_units

        o = self.options
        scores = {}
        for name, pairs in (("safety", self.safety), ("utility", self.utility)):
            chosen = spread(pairs, o.calibration_samples)
            # at least 512 tokens, as ssah-peft score: a short training max_length must not cut the responses away
            batches = build_calibration_batches(self.tokenizer, chosen, max_length=max(o.max_length, 512))
            metadata = {
                "data": (o.safety_data or "safety_calibration") if name == "safety" else (o.utility_data or o.data)
            }
            scores[name] = score_units(
                self.model,
                batches,
                show_progress_bar=o.show_progress,
                metadata={**metadata, "num_examples": len(chosen)},
            )
        return UnitMap.from_scores(scores["safety"], scores["utility"])

    def _cached_evaluation(self, stage: str, model: Any, cache: bool = True) -> dict[str, Any]:
        """The evaluation of ``stage`` (``eval_before.json`` is kept, so a resumed run does not redo it)."""
        o = self.options
        path = o.out / f"eval_{stage}.json"
        if cache and path.is_file():
            return read_json(path)
        result, generations = evaluation(
            model,
            self.tokenizer,
            harmful=self.harmful,
            perplexity_records=self.eval_records,
            limit=o.eval_limit,
            max_new_tokens=o.max_new_tokens,
            show_progress=o.show_progress,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            write_generations(o.out / f"generations_{stage}.jsonl", generations)
            write_json(path, result)
        return result

    def _train(self, method: Any, callbacks: list[Any]) -> tuple[Any, Any, float]:
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
        from transformers.trainer_utils import get_last_checkpoint

        o = self.options
        set_seed(o.seed)  # the adapter's random init
        model = self.model
        if o.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=o.gradient_checkpointing)
        units = method.units_of(self.unit_map) if method.units is not None else None
        model = get_peft_model(model, method.peft_config(units, rank=o.rank))
        args = TrainingArguments(
            output_dir=str(o.out / CHECKPOINTS),
            max_steps=o.max_steps if o.max_steps is not None else -1,
            num_train_epochs=o.epochs,
            per_device_train_batch_size=o.batch_size,
            gradient_accumulation_steps=o.grad_accum,
            learning_rate=o.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            seed=o.seed,
            data_seed=o.seed,
            logging_steps=1,
            save_strategy="steps",
            save_steps=o.save_steps,
            save_total_limit=2,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not o.show_progress,
            dataloader_num_workers=0,
            **({"gradient_checkpointing": True} if o.gradient_checkpointing else {}),
        )
        collator = DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(
            model=model, args=args, train_dataset=self.dataset, data_collator=collator, callbacks=callbacks
        )
        checkpoints = o.out / CHECKPOINTS
        last = get_last_checkpoint(str(checkpoints)) if o.resume and checkpoints.is_dir() else None
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=last)
        model.eval()
        return model, trainer, time.perf_counter() - start


def check_run_dir(out: Path, pinned: dict[str, Any], resume: bool) -> None:
    """``out`` may receive this run: new or empty, or holding a run of the same settings when ``resume``.

    ``ValueError`` otherwise: a file, a folder of other files, another run's settings (naming those that
    differ), the same run without ``resume``, or ``resume`` with nothing to resume.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; give a folder for the run")
    settings = out / SETTINGS_FILE
    if settings.is_file():
        previous = read_json(settings)
        if previous != pinned:
            raise ValueError(
                f"{out} holds a run of other settings ({', '.join(differing_keys(pinned, previous))} differ); "
                "choose another output folder or delete it"
            )
        if not resume:
            raise ValueError(f"{out} already holds a run of these settings; pass --resume to continue it")
        return
    if resume:
        raise ValueError(f"--resume: {out} holds no run to resume (no {SETTINGS_FILE}); start it without --resume")
    if out.is_dir() and any(out.iterdir()):
        found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ValueError(f"{out} is not empty and holds no ssah-peft run ({found}); choose a new or empty folder")


def save_adapter(model: Any, adapter: Path) -> None:
    """``model.save_pretrained(adapter)`` that replaces an old adapter only once the new one is complete."""
    staging = adapter.parent / f".{adapter.name}.partial"
    old = adapter.parent / f".{adapter.name}.old"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(staging)
    if adapter.exists():
        adapter.rename(old)
    staging.rename(adapter)
    shutil.rmtree(old, ignore_errors=True)


def _pairs(source: str, what: str) -> list[dict[str, str]]:
    """Calibration pairs of a built-in data set or of a file in any format :func:`read_examples` reads."""
    if not Path(source).exists() and source in BUILTIN_DATASETS:
        return [{"prompt": r["prompt"], "response": r["response"]} for r in load_builtin(source)]
    return read_examples(source, what=what).records


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
