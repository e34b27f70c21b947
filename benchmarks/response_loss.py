"""What the response-only loss saves a training step of ``ssah-peft finetune``, measured side by side in one process.

    python benchmarks/response_loss.py                      # the README walkthrough's model and data, 2 CPU cores
    python benchmarks/response_loss.py --repeats 10 --batches 4 --out response_loss.json

The job's trainer (:class:`ssah_peft.training.ResponseLossTrainer`: the output head runs only on the positions that
predict a response token) against transformers' plain ``Trainer`` loss (the head on every position), on the same
model, adapter, tokenized examples (:func:`ssah_peft.finetuning.data.training_set`, as the job makes them) and
batches. One step is ``Trainer.training_step`` (forward and backward; the optimizer's update is the same for both
and is left out); the two are interleaved within each repeat, so the drifts of a shared machine cancel in the
paired ratio (each plain step over the response-only step of the same batch and repeat). The losses of the two are
checked to agree before anything is timed.
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

from ssah_peft import models
from ssah_peft.finetuning.data import read_examples, training_set
from ssah_peft.training import LORA, response_loss_trainer, training_arguments, with_method


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
        response_only = response_loss_trainer(model, tokenizer, dataset, options)
        plain = Trainer(model=model, args=options, train_dataset=dataset, data_collator=response_only.data_collator)
        rows = list(dataset)
        batches = [
            response_only.data_collator(rows[i * args.batch_size : (i + 1) * args.batch_size])
            for i in range(args.batches)
        ]
        head = model.get_base_model().get_output_embeddings()
        positions: list[int] = []
        head.register_forward_pre_hook(lambda module, inputs: positions.append(inputs[0].shape[1]))
        for batch in batches:
            with torch.no_grad():
                mine, theirs = (t.compute_loss(model, dict(batch)) for t in (response_only, plain))
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        head_share = sum(positions[0::2]) / sum(positions[1::2])

        times: dict[str, list[float]] = {"response_only": [], "plain": []}
        for trainer in (response_only, plain):  # what train() sets before its first step
            trainer.current_gradient_accumulation_steps = 1
        model.train()
        for _ in range(args.repeats):
            for batch in batches:
                for name, trainer in (("response_only", response_only), ("plain", plain)):
                    model.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    trainer.training_step(model, dict(batch))
                    times[name].append(time.perf_counter() - start)
    paired = [p / r for p, r in zip(times["plain"], times["response_only"])]
    result = {
        "model": args.model,
        "data": args.data,
        "batch_size": args.batch_size,
        "tokens_per_batch": [int(b["input_ids"].numel()) for b in batches],
        "head_positions_share": round(head_share, 3),
        "median_step_seconds": {name: round(statistics.median(values), 4) for name, values in times.items()},
        "plain_over_response_only_paired_median": round(statistics.median(paired), 3),
        "samples": len(paired),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
