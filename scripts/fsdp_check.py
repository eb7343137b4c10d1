"""Train RWKV-7 for a few steps under FSDP2 (full shard, one unit per `RWKV7Block`) and save the final weights, to
compare them with one process that takes the same global batches.

    # N processes (N divides --batch_size), each holding 1/N of every parameter; on CPU over gloo:
    accelerate launch --multi_gpu --num_processes 2 scripts/fsdp_check.py --output_dir out/fsdp
    # one process, no sharding, the same global batches:
    python scripts/fsdp_check.py --output_dir out/single
    # then out/fsdp/model.safetensors and out/single/model.safetensors hold the same weights (to fp32 rounding)

The optimizer is SGD with momentum (its momentum buffers are sharded like the parameters): its update is linear in
the gradient, so the two runs differ by float32 rounding only. AdamW's first steps move every weight by about the
learning rate whatever the gradient's size, which turns rounding differences in near-zero gradient entries into
weight differences of that order.

The model is sharded with torch's `fully_shard` exactly as accelerate's FSDP2 plugin does it (each `RWKV7Block`,
the model's `_no_split_modules`, as a unit, then the root, `reshard_after_forward=True`: parameters, gradients and
optimizer state sharded). accelerate 1.15 itself does not enable FSDP on CPU: `AcceleratorState` turns
`--use_fsdp` into `DistributedType.FSDP` for accelerator devices only and keeps `MULTI_CPU` (DDP) on CPU, so on a CPU
machine `accelerate launch --use_fsdp ... scripts/train.py --use_cpu` would train with DDP; train.py refuses it.
On GPUs, `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_transformer_layer_cls_to_wrap RWKV7Block ...
scripts/train.py` uses the same units.

Each step, process r takes rows [r * B / N, (r + 1) * B / N) of the step's global batch of B random rows, each row two
packed documents (position_ids restart at a random split), and FSDP averages the gradients over the N processes:
the same update as one process on all B rows. Writes `model.safetensors` (full, unsharded, float32) and
`report.json` (losses per step, the number of FSDP units, the fraction of the parameters each process held) to
--output_dir.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM  # noqa: E402
from modeling_rwkv7.modeling_rwkv7 import RWKV7Block  # noqa: E402

IGNORE_INDEX = -100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Model folder to start from (default: a tiny model from --seed).")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=4, help="Global batch: rows per step over all processes.")
    parser.add_argument("--seq_len", type=int, default=48, help="Tokens per row.")
    parser.add_argument("--learning_rate", type=float, default=0.02, help="SGD learning rate (momentum 0.9).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tiny model and of the batches.")
    parser.add_argument("--output_dir", required=True, help="Where model.safetensors and report.json go.")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.seq_len < 4:
        parser.error(f"--seq_len must be at least 4 (two documents of two tokens), got {args.seq_len}.")
    return args


def build_model(args: argparse.Namespace) -> RWKV7ForCausalLM:
    """--model in float32, or a 2-layer model (hidden 64, vocab 256, tied embeddings) with the official init."""
    if args.model is not None:
        return RWKV7ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(args.seed)
    config = RWKV7Config(vocab_size=256, hidden_size=64, head_dim=16, num_hidden_layers=2, tie_word_embeddings=True)
    return RWKV7ForCausalLM(config)


def global_batches(args: argparse.Namespace, vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """`--steps` batches of `--batch_size` rows [batch_size, seq_len], the same in every process: random tokens,
    two documents per row (position_ids restart at 0 at a random split), labels -100 at each document's start."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(args.steps):
        input_ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=generator)
        splits = torch.randint(2, args.seq_len - 1, (args.batch_size,), generator=generator)
        positions = torch.arange(args.seq_len).expand(args.batch_size, -1)
        position_ids = torch.where(positions < splits[:, None], positions, positions - splits[:, None])
        labels = input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)
        batches.append({"input_ids": input_ids, "position_ids": position_ids, "labels": labels})
    return batches


def shard(model: RWKV7ForCausalLM, world_size: int) -> int:
    """FSDP2 full shard: every `RWKV7Block` (the model's `_no_split_modules`), then the root. Returns the number of
    FSDP units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(model.device.type, (world_size,))
    for module in model.modules():
        if isinstance(module, RWKV7Block):
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return sum(isinstance(module, FSDPModule) for module in model.modules())


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Every tensor whole, in its own CPU memory (gathered from the shards under FSDP; only rank 0 receives them)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state_dict = model.state_dict()
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in state_dict.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    sharded = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if sharded:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    if args.batch_size % world_size:
        raise ValueError(f"--batch_size {args.batch_size} must be a multiple of the {world_size} processes.")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

    model = build_model(args).to(device).train()
    total_parameters = sum(p.numel() for p in model.parameters())
    units = shard(model, world_size) if sharded else 0
    local_parameters = sum((p.to_local() if sharded else p).numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9)

    rows = args.batch_size // world_size
    losses = []
    for batch in global_batches(args, model.config.vocab_size):
        local = {key: value[rank * rows : (rank + 1) * rows].to(device) for key, value in batch.items()}
        # the mean over this process's targets; every row has the same number of targets, so the gradient average
        # over the processes is the gradient of the mean over the global batch
        loss = model(**local, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if sharded:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())

    state_dict = full_state_dict(model, sharded)
    fractions = [local_parameters / total_parameters] * world_size
    if sharded:
        dist.all_gather_object(fractions, local_parameters / total_parameters)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        save_file(state_dict, os.path.join(args.output_dir, "model.safetensors"))
        report = {
            "world_size": world_size,
            "fsdp_units": units,
            "parameter_fraction_per_process": fractions,
            "losses": losses,
        }
        with open(os.path.join(args.output_dir, "report.json"), "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"{world_size} process(es), {units} FSDP units, losses {losses}", flush=True)
    if sharded:
        dist.barrier()  # no process tears its connections down while another still uses them (rank 0 saves last)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
