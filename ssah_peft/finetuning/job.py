"""One fine-tuning job on the user's data: validate everything, then score, evaluate, train, save and report.

A module of its own because the job's order is its contract. The options were checked when they were made
(:class:`~.options.FinetuneOptions`: types, ranges, the chat template, unit types that leave something to train).
:meth:`FinetuneJob.prepare` then does every check that can fail on the user's input and creates nothing: the data
files, the run directory, a given (or, resuming, the run's own) unit map and whether it leaves anything to train,
all before the model is loaded; then the model and its chat template, the unit map against the model and the
tokenized examples. Only :meth:`FinetuneJob.run` writes into the run directory, so a refused job leaves it as it
was. ``run`` scores the model if no map was given (built-in safety calibration, a sample of the training data) and
refuses a map that leaves nothing to train, still before writing; then it locks the run directory for the rest of
the job (a second job into it is refused), pins the settings (``settings.json``), writes the unit map, evaluates
the base model, trains on the training layer the demo trains with (:mod:`ssah_peft.training`: the response-only
loss that runs the output head only where a response token is predicted; checkpoints every ``save_steps``;
``resume`` continues from the last complete one, passing over one a kill left half-written), saves ``adapter/``,
evaluates again, trains and evaluates the random control with ``control`` (:mod:`.control`) and writes the report
(:mod:`.report`). A scored map is kept in the cache folder and reused by a later job with the same inputs.

The module is long (about 480 lines) because that order is one sequence of checks and steps over shared state;
the reusable pieces already live elsewhere (data, options, checkpoints, control, report).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .._files import differing_keys, exclusive_lock, read_json, write_json
from ..chat import NO_TEMPLATE_ADVICE
from ..data import BUILTIN_DATASETS, load_builtin
from ..evaluate import write_generations
from ..training import Method, sft_trainer, spread, training_arguments, with_method
from ..unit_map import (
    CalibrationSet,
    CalibrationSettings,
    UnitMap,
    calibration_key,
    counts_per_block,
    unit_map_from_calibration,
    unit_widths,
)
from ..unit_map.attributed import ATTRIBUTION_MAPS
from .checkpoints import check_checkpoint_units, resume_checkpoint, save_adapter
from .control import train_control
from .data import Examples, TrainingSet, read_examples, read_prompts, training_set
from .options import FinetuneOptions, method_for
from .report import evaluation, write_report

#: The files of a run directory (besides ``checkpoints/`` and the ``adapter/`` folder).
SETTINGS_FILE = "settings.json"
UNIT_MAP_FILE = "unitmap.safetensors"
CHECKPOINTS = "checkpoints"
#: The lock file a running job holds in its run folder (:func:`ssah_peft._files.exclusive_lock`); removed at its end.
LOCK_FILE = ".ssah-peft.lock"


class RunRefused(ValueError):
    """A job that :meth:`FinetuneJob.run` refuses before writing anything: its run folder is in use by another job,
    or the unit map scored now leaves nothing to train."""


@dataclass
class FinetuneResult:
    """What a job produced: the trained model (peft-wrapped), the files it wrote and the report's content."""

    model: Any
    out: Path
    adapter: Path
    unit_map: Optional[Path]
    report: dict[str, Any]


@dataclass(eq=False)  # a job, not a value: compared by identity (its fields hold a model)
class FinetuneJob:
    """A validated job: build it with :meth:`prepare`, then :meth:`run` it. Its fields are what ``prepare`` read
    and loaded."""

    options: FinetuneOptions
    model: Any
    tokenizer: Any
    train: Examples
    """The training data as read (before the held-out tenth is taken out)."""
    records: list[dict[str, str]]
    """The records trained on."""
    dataset: Any
    training: TrainingSet
    eval_records: list[dict[str, str]]
    """Records whose perplexity is measured before and after."""
    harmful: Optional[Examples]
    """Harmful prompts of the ASR (``--safety-eval-data``, with the blank ones it left out); None: the built-in
    held-out set."""
    safety: list[dict[str, str]]
    utility: list[dict[str, str]]
    """Calibration pairs, when the model is scored now."""
    unit_map: Optional[UnitMap]
    """The given map, the run's own (``--resume``), or None until :meth:`run` scores the model."""
    pinned: dict[str, Any]
    """What ``settings.json`` holds: the options that decide the adapter, and the data's and map's hashes."""
    resume_from: Optional[Path]
    """The checkpoint ``resume`` continues from (:func:`.checkpoints.resume_checkpoint`); None: training starts at
    step 0."""

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
        trained, heldout = train, []
        if o.evaluate and o.eval_data is None and len(train.records) >= 10:  # every 10th example is held out
            trained, heldout = train.hold_out(10)
        records = trained.records
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
        stored = o.out / UNIT_MAP_FILE
        unit_map = UnitMap.load(stored) if o.resume and stored.is_file() else given_map
        resume_from = resume_checkpoint(o.out / CHECKPOINTS) if o.resume else None
        if unit_map is not None:
            method = method_for(o)
            check_something_trains(method, unit_map)
            if resume_from is not None:
                check_checkpoint_units(method, unit_map, stored, resume_from)

        from .. import models  # looked up at call time: tests may replace the loader

        model, tokenizer = models.load(o.model, dtype=o.dtype, device_map=o.device_map, load_in_4bit=o.load_in_4bit)
        if o.chat_template is not None:
            tokenizer.chat_template = o.chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model {o.model}: its tokenizer has no chat template. {NO_TEMPLATE_ADVICE}")
        if unit_map is not None:
            try:
                unit_map.check_model(model, allow_other_weights=o.allow_other_weights)
            except ValueError as error:
                raise ValueError(f"unit map {o.unit_map or stored} does not fit model {o.model}: {error}") from None
        training = training_set(tokenizer, trained, o.max_length, o.skip_truncated)
        if not o.utility_data and training.skipped:  # calibrated on what is trained: no response cut away
            skipped = set(training.skipped)
            utility = [r for r, where in zip(trained.records, trained.locations) if where not in skipped]
        return cls(
            options,
            model=model,
            tokenizer=tokenizer,
            train=train,
            records=records,
            dataset=training.dataset,
            training=training,
            eval_records=eval_records,
            harmful=harmful,
            safety=safety,
            utility=utility,
            unit_map=unit_map,
            pinned=pinned,
            resume_from=resume_from,
        )

    # ------------------------------------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------------------------------------

    def run(self, callbacks: Optional[list[Any]] = None) -> FinetuneResult:
        """Score (if needed), evaluate, train, save and report; ``callbacks`` go to the ``Trainer``.

        The model is scored before anything is written, so that a map that leaves nothing to train is refused
        (:class:`RunRefused`) with the run folder as it was; from then on the main process holds the run folder's
        lock (another job into it is refused, naming its process) until the report is written.
        """
        start = time.perf_counter()
        method = method_for(self.options)
        self.stage_seconds: dict[str, float] = {}
        if method.units is not None and self.unit_map is None:
            self.unit_map = self._score()
            self.stage_seconds["scoring"] = time.perf_counter() - start
            check_something_trains(method, self.unit_map)
        main = int(os.environ.get("RANK", "0")) == 0
        self.options.out.mkdir(parents=True, exist_ok=True)
        with self._hold_run_folder() if main else contextlib.nullcontext():
            return self._train_and_report(method, callbacks or [], start, main)

    @contextlib.contextmanager
    def _hold_run_folder(self) -> Iterator[None]:
        """The run folder locked for this job, and checked again under the lock: another job may have started
        into it, or finished in it, since :meth:`prepare` checked it."""
        o = self.options
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(exclusive_lock(o.out / LOCK_FILE, f"run folder {o.out}"))
        except BlockingIOError as error:
            raise RunRefused(f"{error.strerror}; wait for that job to end, or choose another output folder") from None
        with lock:
            check_run_dir(o.out, self.pinned, o.resume)
            yield

    def _train_and_report(self, method: Method, callbacks: list[Any], start: float, main: bool) -> FinetuneResult:
        o = self.options
        if main and not (o.out / SETTINGS_FILE).is_file():
            write_json(o.out / SETTINGS_FILE, self.pinned)
        unit_map_path = None
        if self.unit_map is not None:
            unit_map_path = o.out / UNIT_MAP_FILE
            if main and not unit_map_path.is_file():
                self.unit_map.save(unit_map_path)
        stages = self.stage_seconds
        with _timed(stages, "evaluation_before"):
            before = self._cached_evaluation("before", self.model) if o.evaluate else None
        model, trainer, seconds = self.train_adapter(method, callbacks or [])
        stages["training"] = seconds
        adapter = o.out / "adapter"
        with _timed(stages, "saving"):
            if main:
                save_adapter(model, adapter)
        with _timed(stages, "evaluation_after"):
            after = self.evaluate_adapter("after", model) if o.evaluate else None
        with _timed(stages, "control"):
            control = train_control(self, method, callbacks, main) if o.control else None
        report = write_report(
            o.out if main else None,
            options=o,
            method=method,
            model=model,
            train=self.train,
            training=self.training,
            safety_eval=self.harmful,
            eval_examples=len(self.eval_records),
            unit_map=self.unit_map,
            units=method.units_of(self.unit_map) if method.units is not None else None,
            log_history=trainer.state.log_history,
            steps=trainer.state.global_step,
            train_seconds=seconds,
            wall_seconds=time.perf_counter() - start,
            stage_seconds={name: round(value, 2) for name, value in stages.items() if round(value, 2) > 0},
            before=before,
            after=after,
            control=control,
        )
        return FinetuneResult(model, o.out, adapter, unit_map_path, report)

    def _score(self) -> UnitMap:
        """The map of the model on the safety and utility calibration samples (spread over each set), at least
        512 tokens long, as ``ssah-peft score``: a short training ``max_length`` must not cut the responses away;
        scored by the scorer the method chooses from (``chooser``): a map of one attribution score
        (:data:`~ssah_peft.unit_map.attributed.ATTRIBUTION_MAPS`) reads the safety sample's prompts and, for
        ``margin_grad``, the utility sample's prompts; for ``conflict`` the utility sample is the task (by default a
        sample of the training data)."""
        o = self.options
        sources = (o.safety_data or "safety_calibration", o.utility_data or o.data)
        safety, utility = (
            CalibrationSet(source, spread(pairs, o.calibration_samples))
            for source, pairs in zip(sources, (self.safety, self.utility))
        )
        method = method_for(o)
        settings = CalibrationSettings(
            method=method.units.scorer if method.units is not None else "variance",
            max_length=max(o.max_length, 512),
            chat_template_name="given" if o.chat_template else "tokenizer",
        )
        model_source = {"model": o.model, "dtype": o.dtype, "load_in_4bit": o.load_in_4bit}
        inputs = (self.model, self.tokenizer, safety, utility, settings)
        cached = None
        if o.reuse_scores:
            from ..models import cache_dir

            cached = cache_dir() / "unit_maps" / f"{calibration_key(*inputs, model_source=model_source)}.safetensors"
            reused = _reusable_map(cached, self.model)
            if reused is not None:
                print(f"Reusing the unit map scored earlier for these weights, data and settings: {cached}")
                return reused
        if settings.method in ATTRIBUTION_MAPS:  # one score per unit: the user's data is the utility or task side
            metadata = {"safety": safety.source, "other": utility.source, **model_source}
            unit_map = ATTRIBUTION_MAPS[settings.method](
                self.model,
                self.tokenizer,
                safety.pairs,
                utility.pairs,
                max_length=settings.max_length,
                show_progress=o.show_progress,
                metadata=metadata,
            )
        else:
            unit_map = unit_map_from_calibration(*inputs, model_source=model_source, show_progress=o.show_progress)
        if cached is not None and int(os.environ.get("RANK", "0")) == 0:
            cached.parent.mkdir(parents=True, exist_ok=True)
            unit_map.save(cached)
        return unit_map

    def evaluate_adapter(self, stage: str, model: Any) -> dict[str, Any]:
        """The evaluation of a trained ``model`` (not cached: each run measures its own adapter). Generation through
        the unmerged adapter layers is ~3x slower; a float base is merged for the evaluation and unmerged after it
        (a 4-bit base would be requantized, so it is evaluated as it is)."""
        merge = not self.options.load_in_4bit and hasattr(model, "merge_adapter")
        if merge:
            model.merge_adapter()
        try:
            return self._cached_evaluation(stage, model, cache=False)
        finally:
            if merge:
                model.unmerge_adapter()

    def _cached_evaluation(self, stage: str, model: Any, cache: bool = True) -> dict[str, Any]:
        """The evaluation of ``stage`` (``eval_before.json`` is kept, so a resumed run does not redo it)."""
        o = self.options
        path = o.out / f"eval_{stage}.json"
        if cache and path.is_file():
            return read_json(path)
        result, generations = evaluation(
            model,
            self.tokenizer,
            harmful=self.harmful.records if self.harmful is not None else None,
            perplexity_records=self.eval_records,
            limit=o.eval_limit,
            max_new_tokens=o.max_new_tokens,
            show_progress=o.show_progress,
            max_length=o.max_length,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            write_generations(o.out / f"generations_{stage}.jsonl", generations)
            write_json(path, result)
        return result

    def train_adapter(
        self,
        method: Method,
        callbacks: list[Any],
        base: Any = None,
        checkpoints: str = CHECKPOINTS,
        resume_from: Optional[Path] = None,
    ) -> tuple[Any, Any, float]:
        """Train with the training layer (:mod:`ssah_peft.training`): the method's adapter on ``base`` (default:
        the job's model), the response-only loss, a checkpoint every ``save_steps`` into ``checkpoints`` (the last
        two kept) and ``resume_from`` (default: the job's ``resume_from``) continued."""
        o = self.options
        resume_from = self.resume_from if base is None else resume_from
        model, _ = with_method(
            self.model if base is None else base,
            method,
            self.unit_map,
            rank=o.rank,
            seed=o.seed,
            load_in_4bit=o.load_in_4bit,
            gradient_checkpointing=o.gradient_checkpointing,
            allow_other_weights=o.allow_other_weights,
        )
        args = training_arguments(
            o.out / checkpoints,
            max_steps=o.max_steps if o.max_steps is not None else -1,
            epochs=o.epochs,
            batch_size=o.batch_size,
            learning_rate=o.lr,
            seed=o.seed,
            show_progress=o.show_progress,
            max_length=o.max_length,
            packing=o.packing,
            data_seed=o.seed,
            gradient_accumulation_steps=o.grad_accum,
            logging_steps=1,
            save_strategy="steps",
            save_steps=o.save_steps,
            save_total_limit=2,
            **({"gradient_checkpointing": True} if o.gradient_checkpointing else {}),
        )
        trainer = sft_trainer(model, self.tokenizer, self.dataset, args, callbacks)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
        model.eval()
        return model, trainer, time.perf_counter() - start


def check_run_dir(out: Path, pinned: dict[str, Any], resume: bool) -> None:
    """``out`` may receive this run: new or empty, or holding a run of the same settings when ``resume``.

    ``ValueError`` otherwise: a file (or a path below one), a folder of other files, a ``settings.json`` that is
    not ours, another run's settings (naming those that differ), the same run without ``resume``, or ``resume``
    with nothing to resume. A lock file that a killed job left counts as nothing.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; give a folder for the run")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"output folder {out} cannot be created: {blocking} is a file; give a folder for the run")
    settings = out / SETTINGS_FILE
    if settings.is_file():
        try:
            previous = read_json(settings)
        except ValueError as error:  # not JSON, not UTF-8
            previous, problem = None, f"not valid JSON: {error}"
        else:
            problem = None if isinstance(previous, dict) else "not a JSON object"
        if problem is not None:
            raise ValueError(
                f"{settings} is not the settings file of an ssah-peft run ({problem}), so {out} holds no run of ours; "
                "choose a new or empty output folder (or move that file away if it is not needed)"
            )
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
    found = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if found:
        raise ValueError(
            f"{out} is not empty and holds no ssah-peft run ({', '.join(found[:5])}); choose a new or empty folder"
        )


def check_something_trains(method: Method, unit_map: UnitMap) -> None:
    """Refuse units of ``unit_map`` that leave nothing to train: protect mode freezing every unit of the model, or
    select mode selecting none (:class:`RunRefused`). Checked on the map's own widths, so that it comes before the
    model is loaded (a given map) or before anything is written (a map scored now), not when the adapter is built."""
    if method.units is None:
        return
    counts = counts_per_block(method.units_of(unit_map))
    blocks = [
        (layer, kind, width) for kind, widths in unit_widths(unit_map).items() for layer, width in enumerate(widths)
    ]
    if method.freezes_units and all(counts.get((layer, kind), 0) >= width for layer, kind, width in blocks):
        raise RunRefused(
            f"protecting {method.units.name} freezes every unit of the model in this unit map: nothing would be "
            "trained; protect fewer unit types"
        )
    if not method.freezes_units and not any(counts.values()):
        raise RunRefused(f"the unit map has no {method.units.name} units: nothing would be trained; select other types")


def _reusable_map(path: Path, model: Any) -> Optional[UnitMap]:
    """The cached map at ``path`` if there is one that loads and fits ``model``; None otherwise (it is scored
    again and replaced: a cache file is never trusted over the model)."""
    if not path.is_file():
        return None
    try:
        unit_map = UnitMap.load(path)
        unit_map.check_model(model)
    except (ValueError, OSError):
        return None
    return unit_map


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the wall time of the block to ``seconds[stage]``."""
    start = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def _pairs(source: str, what: str) -> list[dict[str, str]]:
    """Calibration pairs of a built-in data set or of a file in any format :func:`read_examples` reads."""
    if not Path(source).exists() and source in BUILTIN_DATASETS:
        return [{"prompt": r["prompt"], "response": r["response"]} for r in load_builtin(source)]
    return read_examples(source, what=what).records


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
