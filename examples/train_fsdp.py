"""Train an SSAH adapter under torch FSDP2 (``fully_shard``) on one process or many, in a plain torch loop.

    # one process, nothing sharded: the reference
    python examples/train_fsdp.py --model path/to/causal-lm --out out/
    # two processes, every parameter (frozen base and adapter) sharded over both
    torchrun --nproc_per_node 2 examples/train_fsdp.py --model path/to/causal-lm --out out/

Under torchrun every process loads the whole model and adds the same adapter (same seed, so the same protect-mode
A matrices); then ``fully_shard`` is applied to each decoder layer and to the root on a 1-D device mesh (CUDA with
nccl when there is a GPU, CPU with gloo otherwise or with ``--cpu``; the tests run the CPU one). Each process
keeps its dim-0 shard of every parameter as a DTensor, and AdamW steps on the shards. Every step draws a global
batch of ``--batch`` seeded random token rows; process ``i`` of ``N`` trains on rows ``i*batch/N`` to
``(i+1)*batch/N`` and FSDP averages the gradients, so the run trains what one process trains on the whole batch.
``--accumulate K`` splits each process's rows into K micro-batches (gradients accumulated locally); one process
with ``--accumulate N`` sums the gradients of the same N parts that N processes take.

After training the full state is gathered (``get_model_state_dict(..., full_state_dict=True)``, a collective) and
process 0 writes: ``adapter/`` (``save_pretrained``, a normal peft adapter), ``base.pt`` (the frozen base as
gathered, named as in the bare base model), ``losses.json`` (each process's loss per step) and ``sharding.json``
(for every trainable tensor on every process: type, placements, local and global shape, gradient type, as seen
during the first step), so a test can check that the adapter really was sharded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM, set_seed

from ssah_peft import SSAHConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved causal LM (local path or hub id)")
    parser.add_argument("--units", type=Path, help="JSON {layer: {'mlp': [...], 'attn': [...]}}; default: a few units")
    parser.add_argument("--mode", choices=["select", "protect"], default="protect")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="global batch: rows per step over all processes")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per process and step")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo) even when CUDA is available")
    return parser.parse_args(argv)


def pick_device(cpu: bool) -> torch.device:
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class transformers names in ``_no_split_modules``."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"found no decoder layers (classes {sorted(names)}) to shard")
    return layers


def shard(model: torch.nn.Module, device: torch.device) -> None:
    """Shard ``model`` in place over all processes: each decoder layer, then the root (everything else)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # moves the parameters (and buffers such as ssah_index) to the mesh's device


def sharding_record(model: torch.nn.Module) -> dict[str, dict]:
    """Type, placements and local / global shape of every trainable tensor as this process holds it."""
    from torch.distributed.tensor import DTensor

    record = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            sharded = isinstance(param, DTensor)
            record[name] = {
                "type": type(param).__name__,
                "placements": [str(p) for p in param.placements] if sharded else [],
                "local_shape": list((param.to_local() if sharded else param).shape),
                "shape": list(param.shape),
                "grad_type": type(param.grad).__name__ if param.grad is not None else None,
            }
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ  # started by torchrun
    device = pick_device(args.cpu)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    units = json.loads(args.units.read_text()) if args.units else {0: {"mlp": [1, 2, 3], "attn": list(range(8))}}
    set_seed(0)  # the protect-mode A matrices are drawn at random: same seed, same start everywhere
    model = get_peft_model(model, SSAHConfig(units=units, mode=args.mode, r=4))
    if distributed:
        shard(model, device)
    else:
        model.to(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch % (world * args.accumulate):
        raise ValueError(f"--batch {args.batch} does not split into {world} processes x {args.accumulate} parts")
    rows, micro = args.batch // world, args.batch // (world * args.accumulate)

    generator = torch.Generator().manual_seed(0)
    data = torch.randint(3, model.config.vocab_size, (args.steps, args.batch, args.length), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, sharding = [], {}
    for step in range(args.steps):
        ids = data[step, rank * rows : (rank + 1) * rows].to(device)
        loss = 0.0
        for i, chunk in enumerate(ids.split(micro)):
            if distributed:  # accumulate locally, reduce-scatter in the last backward of the step
                model.set_requires_gradient_sync(i == args.accumulate - 1)
            # the mean over the chunk's rows (all of the same length); FSDP's reduce-scatter averages over the
            # processes, so each one gets its shard of the mean gradient over the global batch
            chunk_loss = model(input_ids=chunk, labels=chunk).loss / args.accumulate
            chunk_loss.backward()
            loss += chunk_loss.item()
        if step == 0:
            sharding = sharding_record(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss)

    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full tensors: every process takes part in gathering them, only process 0 keeps them (on CPU)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        every_sharding, every_loss = [None] * world, [None] * world
        dist.all_gather_object(every_sharding, sharding)
        dist.all_gather_object(every_loss, losses)
    else:
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        every_sharding, every_loss = [sharding], [losses]

    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out / "adapter", state_dict=state)  # peft picks the adapter's tensors
        base = {
            name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor
            for name, tensor in state.items()
            if "ssah_" not in name
        }
        torch.save(base, args.out / "base.pt")
        (args.out / "sharding.json").write_text(json.dumps(every_sharding, indent=1))
        (args.out / "losses.json").write_text(json.dumps(every_loss))
        print(f"saved adapter to {args.out / 'adapter'} (world size {world})")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if "WORLD_SIZE" in os.environ:
        # Leave without finalizing the interpreter (seen with torch 2.13 and gloo). fully_shard's state outlives
        # the model (not freed even by gc.collect()) and holds the DeviceMesh, so the gloo process group is never
        # destroyed, and destroy_process_group() does not stop its worker threads (only the destructor does). A
        # worker that drops a finished collective's tensors while the interpreter is finalizing needs the GIL,
        # Python ends that thread, and the process aborts ("terminate called without an active exception",
        # SIGABRT: a few runs in a hundred on a busy 2-core machine). Everything is written by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
