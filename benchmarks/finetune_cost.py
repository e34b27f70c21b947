"""What ``ssah-peft finetune`` costs beyond a plain TRL LoRA run of the same steps on the same data, in one process.

    python benchmarks/finetune_cost.py                       # the README walkthrough's model and data, 14 steps
    python benchmarks/finetune_cost.py --steps 14 --repeats 2 --out benchmarks/results/finetune_cost.json

Arms, each timed from loading the model to the saved adapter, run in turn within each repeat so that a shared
machine's drift falls on all of them:

* ``trl_lora``: TRL's ``SFTTrainer`` with a ``LoraConfig`` of the job's LoRA (rank 8, every linear layer) on the
  same records as prompt/completion chats (completion-only loss), as a TRL user would write it;
* ``finetune_lora``: ``ssah_peft.finetune(mode="lora", evaluate=False)``: the job's own overhead (data checks,
  run folder, report) and its trainer;
* ``finetune_protect``: ``ssah_peft.finetune(mode="protect", evaluate=False, reuse_scores=False)``: the above plus
  scoring the units, as a first job on a model does;
* ``finetune_protect_reused``: the same with the unit map an earlier job scored for the same inputs (the job's
  default; an untimed job of one step scores and caches it first if it is not cached yet);
* ``finetune_protect_eval``: the walkthrough's job (``--eval-limit``, map scored), with the safety evaluation
  before and after.

The job's report splits its time into stages (``stage_seconds``: scoring, evaluations, training, saving); the
ratios are each arm's total and training time over ``trl_lora``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ssah_peft
from ssah_peft import models
from ssah_peft.finetuning.data import read_examples
from ssah_peft.training import lora_config

DATA = Path(__file__).resolve().parents[1] / "examples" / "finetune_data.jsonl"


def trl_lora(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The plain TRL run: what a user of TRL and peft alone would write for the same training."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    model, tokenizer = models.load(args.model, dtype="float32")
    records = read_examples(args.data).records
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": r["prompt"]}] for r in records],
            "completion": [[{"role": "assistant", "content": r["response"]}] for r in records],
        }
    )
    config = SFTConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        max_length=512,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(rank=8)
    )
    train_start = time.perf_counter()
    trainer.train()
    training = time.perf_counter() - train_start
    trainer.model.save_pretrained(out / "adapter")
    return {"total": time.perf_counter() - start, "training": training}


def job(args: argparse.Namespace, out: Path, mode: str, evaluate: bool, reuse: bool = False) -> dict[str, Any]:
    extra = {"eval_limit": args.eval_limit} if evaluate else {}
    common = dict(mode=mode, evaluate=evaluate, show_progress=False, reuse_scores=reuse, **extra)
    if reuse:  # the map of these inputs cached by an earlier job
        ssah_peft.finetune(args.model, str(args.data), out.with_name(out.name + "-warmup"), max_steps=1, **common)
    start = time.perf_counter()
    result = ssah_peft.finetune(args.model, str(args.data), out, max_steps=args.steps, **common)
    stages = result.report["stage_seconds"]
    return {"total": time.perf_counter() - start, "training": stages["training"], "stages": stages}


ARMS = {
    "trl_lora": trl_lora,
    "finetune_lora": lambda args, out: job(args, out, "lora", False),
    "finetune_protect": lambda args, out: job(args, out, "protect", False),
    "finetune_protect_reused": lambda args, out: job(args, out, "protect", False, reuse=True),
    "finetune_protect_eval": lambda args, out: job(args, out, "protect", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=14, help="the walkthrough's: one epoch of its 54 examples")
    parser.add_argument("--eval-limit", type=int, default=36, help="the walkthrough's")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated: " + ", ".join(ARMS))
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    arms = [name for name in args.arms.split(",") if name]
    unknown = sorted(set(arms) - set(ARMS) | ({"trl_lora"} - set(arms)))
    if unknown:
        parser.error(f"--arms: {', '.join(unknown)} unknown or missing (trl_lora is the reference)")

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name in arms:
                runs[name].append(ARMS[name](args, Path(scratch) / f"{name}-{repeat}"))
                print(f"[finetune_cost] repeat {repeat}: {name} {runs[name][-1]['total']:.1f} s", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    result = {
        "model": args.model,
        "data": str(args.data),
        "steps": args.steps,
        "eval_limit": args.eval_limit,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "median_seconds": {name: {k: round(median(name, k), 2) for k in ("total", "training")} for name in arms},
        "stage_seconds": {name: runs[name][-1]["stages"] for name in arms if "stages" in runs[name][-1]},
        "total_over_trl_lora": {name: round(median(name, "total") / median("trl_lora", "total"), 3) for name in arms},
        "training_over_trl_lora": {
            name: round(median(name, "training") / median("trl_lora", "training"), 3) for name in arms
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
