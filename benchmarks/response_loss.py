"""What the response-only loss saves a training step of ``ssah-peft finetune``, measured side by side in one process.

    python benchmarks/response_loss.py                      # the README walkthrough's model and data, 2 CPU cores
    python benchmarks/response_loss.py --repeats 10 --batches 4 --out response_loss.json

Three losses of one step on the same model, adapter, tokenized examples
(:func:`ssah_peft.finetuning.data.training_set`, as the job makes them) and batches: the job's
(:class:`ssah_peft.training.ResponseLossSFTTrainer`: the model's forward keeps the logits of the positions that
predict a response token), TRL's own ``SFTTrainer`` loss (its fused, tiled output head on the labelled positions),
and transformers' plain ``Trainer`` loss (the head on every position, the full logits built). One step is
``Trainer.training_step`` (forward and backward; the optimizer's update is the same for all and is left out); the
three are interleaved within each repeat, so the drifts of a shared machine cancel in the paired ratios (each
other step over the job's step of the same batch and repeat). The three losses are checked to agree before
anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer
from trl import SFTTrainer

from ssah_peft import models
from ssah_peft.finetuning.data import read_examples, training_set
from ssah_peft.training import LORA, sft_trainer, training_arguments, with_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "examples" / "finetune_data.jsonl"))
    parser.add_argument("--batch-size", type=int, default=4, help="the job's default")
    parser.add_argument("--max-length", type=int, default=512, help="the job's default")
    parser.add_argument("--batches", type=int, default=3, help="distinct batches per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = models.load(args.model, dtype="float32")
    examples, _ = read_examples(args.data).hold_out(10)  # as the job: every 10th example is held out
    dataset = training_set(tokenizer, examples, args.max_length).dataset
    model, _ = with_method(model, LORA, None, rank=8, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        options = training_arguments(
            Path(scratch), learning_rate=3e-4, batch_size=args.batch_size, seed=0, show_progress=False
        )
        response_only = sft_trainer(model, tokenizer, dataset, options)
        trl_fused = SFTTrainer(model=model, args=options, train_dataset=dataset, processing_class=tokenizer)
        plain = Trainer(model=model, args=options, train_dataset=dataset, data_collator=response_only.data_collator)
        trainers = {"response_only": response_only, "trl_fused": trl_fused, "plain": plain}
        rows = list(dataset)
        batches = [
            response_only.data_collator(rows[i * args.batch_size : (i + 1) * args.batch_size])
            for i in range(args.batches)
        ]
        for batch in batches:
            with torch.no_grad():
                mine, *theirs = (t.compute_loss(model, dict(batch)) for t in trainers.values())
            for other in theirs:
                torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-5)
        # the share of the plain loss's head positions that predict a response token
        head_share = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) / sum(
            b["input_ids"][:, 1:].numel() for b in batches
        )

        times: dict[str, list[float]] = {name: [] for name in trainers}
        for trainer in trainers.values():  # what train() sets before its first step
            trainer.current_gradient_accumulation_steps = 1
        model.train()
        for _ in range(args.repeats):
            for batch in batches:
                for name, trainer in trainers.items():
                    model.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    trainer.training_step(model, dict(batch))
                    times[name].append(time.perf_counter() - start)
    paired = {
        name: statistics.median(o / r for o, r in zip(times[name], times["response_only"]))
        for name in ("trl_fused", "plain")
    }
    result = {
        "model": args.model,
        "data": args.data,
        "batch_size": args.batch_size,
        "tokens_per_batch": [int(b["input_ids"].numel()) for b in batches],
        "head_positions_share": round(head_share, 3),
        "median_step_seconds": {name: round(statistics.median(values), 4) for name, values in times.items()},
        **{f"{name}_over_response_only_paired_median": round(ratio, 3) for name, ratio in paired.items()},
        "samples": len(times["plain"]),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
