"""The training layer on TRL (issue 27, item 4): every run trains with TRL's ``SFTTrainer`` on the project's own
completion-only examples; multi-turn conversations train every assistant turn; ``--packing`` packs without letting
examples attend to each other; ``finetune`` takes both end to end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import Interrupt, StopAfterSave, tiny_chat_llama, tiny_tokenizer, write_jsonl
from safetensors.torch import load_file
from trl import SFTTrainer

import ssah_peft
from ssah_peft.chat import record_messages, tokenize_conversation, tokenize_exchange
from ssah_peft.finetuning.data import read_examples, training_set
from ssah_peft.training import (
    FULL,
    LORA,
    ResponseLossSFTTrainer,
    keeps_logits,
    record_tokens,
    sft_dataset,
    sft_trainer,
    training_arguments,
    with_method,
)

RECORDS = [
    {"prompt": "say hi", "response": "hi there"},
    {"prompt": "a much longer prompt than the other one", "response": "ok"},
    {
        "prompt": "and now?",
        "response": "now it is two",
        "history": [{"role": "user", "content": "what is one plus one"}, {"role": "assistant", "content": "two"}],
    },
]
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]


def flagged_text(tokenizer, ids, flags) -> list[str]:
    """The runs of consecutive flagged tokens, decoded."""
    runs, current = [], []
    for token, flag in zip(ids, flags):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("joined", [False, True])
def test_every_assistant_turn_is_flagged_and_nothing_else(joined):
    tokenizer = tiny_tokenizer()
    ids, flags = tokenize_conversation(tokenizer, CONVERSATION, joined=joined)
    rendering = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids) == rendering  # the same text, cut where the turns start and end
    # each assistant turn: its text and the template's end of turn (ChatML: "<|im_end|>\n")
    assert flagged_text(tokenizer, ids, flags) == ["first answer<|im_end|>\n", "second answer<|im_end|>\n"]


def test_a_single_exchange_tokenizes_as_before_in_both_record_shapes():
    tokenizer = tiny_tokenizer()
    record = {"prompt": "say hi", "response": "hi there", "system": "be brief"}
    expected = tokenize_exchange(tokenizer, "say hi", "hi there", 64, system_prompt="be brief")
    assert record_tokens(tokenizer, record, 64) == expected
    assert record_messages(record) == CONVERSATION[:1] + [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hi there"},
    ]
    # the system field wins over a default system prompt; none keeps the template's default
    assert record_messages({"prompt": "p", "response": "r"}, "default")[0] == {"role": "system", "content": "default"}
    assert record_messages({"prompt": "p", "response": "r"})[0]["role"] == "user"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = tiny_tokenizer()
    # renders an assistant turn only when it is the last message: earlier answers vanish once a turn follows
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="renders the conversation before assistant turn 4 differently"):
        tokenize_conversation(tokenizer, CONVERSATION)


@pytest.mark.parametrize("method", [LORA, FULL], ids=lambda m: m.name)
def test_the_jobs_loss_and_gradients_equal_transformers_and_trls(method, tmp_path):
    tokenizer = tiny_tokenizer()
    model, _ = with_method(tiny_chat_llama(tokenizer, intermediate_size=64), method, None, rank=4, seed=0)
    args = training_arguments(tmp_path, learning_rate=1e-3, batch_size=3, seed=0, show_progress=False)
    trainer = sft_trainer(model, tokenizer, sft_dataset(tokenizer, RECORDS, 320), args)
    batch = trainer.data_collator(list(trainer.train_dataset))
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum()  # prompts are not trained
    for items in (None, 40):  # 40: the response tokens of every batch a step accumulates
        trained = [p for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        mine = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        mine.backward()
        my_grads = [p.grad.clone() for p in trained]
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        theirs = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
        ) / (items if items is not None else (batch["labels"][:, 1:] != -100).sum())
        theirs.backward()
        torch.testing.assert_close(mine, theirs)
        for mine_grad, parameter in zip(my_grads, trained):
            torch.testing.assert_close(mine_grad, parameter.grad)
        with torch.no_grad():  # TRL's own loss (its fused head), what a model without logits_to_keep trains with
            torch.testing.assert_close(
                SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=items), mine
            )
    assert isinstance(trainer, ResponseLossSFTTrainer) and keeps_logits(model)


def test_trls_own_defaults_do_not_change_a_run(tmp_path):
    args = training_arguments(tmp_path, learning_rate=1e-3, batch_size=2, seed=3, show_progress=False)
    assert not args.bf16 and not args.gradient_checkpointing and not args.shuffle_dataset and not args.packing
    assert args.lr_scheduler_type == "constant" and args.weight_decay == 0.0 and args.seed == 3
    asked = training_arguments(tmp_path, learning_rate=1e-3, batch_size=2, seed=0, show_progress=False,
                               gradient_checkpointing=True)  # fmt: skip
    assert asked.gradient_checkpointing
    with pytest.raises(ValueError, match="packing needs a max_length"):
        training_arguments(tmp_path, learning_rate=1e-3, batch_size=2, seed=0, show_progress=False, packing=True)


def test_packing_trains_the_same_tokens_with_the_same_loss(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_chat_llama(tokenizer, intermediate_size=64)
    dataset = sft_dataset(tokenizer, RECORDS, 320)
    common = dict(learning_rate=1e-3, batch_size=3, seed=0, show_progress=False)
    padded = sft_trainer(model, tokenizer, dataset, training_arguments(tmp_path / "a", **common))
    packed = sft_trainer(
        model, tokenizer, dataset, training_arguments(tmp_path / "b", max_length=128, packing=True, **common)
    )
    rows = list(packed.train_dataset)
    assert len(rows) < len(dataset) and all(len(row["input_ids"]) <= 128 for row in rows)
    labelled = sorted(t for row in dataset for t in row["labels"] if t != -100)
    assert sorted(t for row in rows for t in row["labels"] if t != -100) == labelled
    padded_batch = padded.data_collator(list(padded.train_dataset))
    packed_batch = packed.data_collator(rows)
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch  # padding-free
    with torch.no_grad():
        # the same loss: no example attends to another in a packed row
        torch.testing.assert_close(
            packed.compute_loss(model, dict(packed_batch)), padded.compute_loss(model, dict(padded_batch))
        )


def test_chat_files_with_several_turns_read_and_train_every_turn(tmp_path):
    tokenizer = tiny_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    examples = read_examples(str(path))
    assert examples.shape == "chat" and examples.records[0] == {
        "prompt": "second question",
        "response": "second answer",
        "history": CONVERSATION[1:3],
        "system": "be brief",
    }
    assert examples.records[1] == {"prompt": "first question", "response": "first answer"}
    row = training_set(tokenizer, examples, 512).dataset[0]
    flags = [label != -100 for label in row["labels"]]
    assert flagged_text(tokenizer, row["input_ids"], flags) == ["first answer<|im_end|>\n", "second answer<|im_end|>\n"]
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"messages": CONVERSATION}, {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": " "},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}])  # fmt: skip
    assert read_examples(str(blank)).blank == [f"{blank}:2"]  # a blank earlier turn is skipped and listed


def test_finetune_trains_conversations_packed_and_resumes_identically(tmp_path, checkpoint):
    turns = [
        {"messages": [*CONVERSATION[1:3], {"role": "user", "content": f"and {i}?"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(24)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", turns)
    options = dict(
        calibration_samples=8, max_length=96, max_steps=4, save_steps=2, evaluate=False, show_progress=False, packing=True
    )  # fmt: skip
    whole = ssah_peft.finetune(str(checkpoint), str(data), tmp_path / "whole", **options)
    assert whole.report["steps"] == 4 and whole.report["data"]["examples_trained"] == 24
    assert json.loads((tmp_path / "whole" / "settings.json").read_text())["packing"] is True

    with pytest.raises(Interrupt):
        ssah_peft.finetune(str(checkpoint), str(data), tmp_path / "cut", callbacks=[StopAfterSave(2)], **options)
    resumed = ssah_peft.finetune(str(checkpoint), str(data), tmp_path / "cut", resume=True, **options)
    assert resumed.report["steps"] == 4

    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs"
