"""Training on several processes (torchrun): one per device, each with a share of every step.

    torchrun --nproc_per_node=N train.py --train_data ...                           one machine
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 train.py --train_data ...                     several

Every rank builds the same step plan (a pure function of the seed, plan.py) with the world's
accumulation (micro-batches per step = gradient_accumulation_steps x world size) and takes its own
contiguous share of each step's micro-batches, so a step sees exactly the examples a one-process
run with that accumulation sees, in the same order, and length grouping carries over. Each rank
normalises its loss by the whole step's target tokens; the gradients are then summed over ranks,
which gives the one-process gradient (up to the order of the float additions).

Why an all-reduce of the LoRA gradients rather than DistributedDataParallel: loss.py calls the
model's parts (the LM head only at labelled positions, a preamble shared within a step), never its
forward, which is where DDP's reducer hooks in; the trainable LoRA weights are a few MB, summed
once per step with one flattened all_reduce (full fine-tuning's in buckets). Only rank 0 writes (archive, checkpoints, metrics,
plot); evaluation is split over the ranks and its sums reduced.

sharding=fsdp wraps each decoder layer with FSDP2 (shard_layers), for bases too large for one device;
FSDP then reduces those layers' gradients itself, and the whole adapter (or, full fine-tuning, the
whole model) and for checkpoints the optimizer state are gathered onto rank 0's CPU to be written
(full_state_dict, full_state_dicts), layer by layer, so no rank's device holds the whole base's layers.

The backend is NCCL on GPUs and gloo on CPU (how the tests run it). A rank that dies ends the job:
torchrun stops the others when one exits non-zero. Under Cog (no torchrun), train() with
num_devices > 1 (or several GPUs visible) starts torchrun on train.py itself (relaunch_command).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits this long has lost a peer


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharded: bool = False  # sharding=fsdp: every rank must run as many forwards as the others

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, items: list, per_rank: int) -> list:
        """This rank's contiguous share of a step's items (per_rank each)."""
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (the values themselves on one process)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Every rank's .grad becomes the sum of all ranks': flattened into buckets of at most
        BUCKET values, one all_reduce each (LoRA's fit one bucket; full fine-tuning's do not)."""
        if not self.distributed:
            return
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        for parameter in parameters:  # FSDP has averaged its shards' gradients: the sum is W times that
            if isinstance(parameter, DTensor) and parameter.grad is not None:
                parameter.grad.mul_(self.size)
        parameters = [p for p in parameters if not isinstance(p, DTensor)]
        for bucket in _buckets(parameters) if parameters else []:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for parameter, grad in zip(bucket, grads):
                count = grad.numel()
                parameter.grad = flat[offset:offset + count].view_as(grad).to(grad.dtype)
                offset += count

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


ONE = World()  # a run on one process
BUCKET = 1 << 25  # values per gradient all_reduce (128 MB of fp32)


def _buckets(parameters: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    buckets, size = [[]], 0
    for parameter in parameters:
        if buckets[-1] and size + parameter.numel() > BUCKET:
            buckets.append([])
            size = 0
        buckets[-1].append(parameter)
        size += parameter.numel()
    return buckets


def launched_world() -> World:
    """The world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK), or one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def processes_wanted(num_devices: int) -> int:
    """num_devices, or (0) every visible GPU, or one process without GPUs."""
    if num_devices:
        return num_devices
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def relaunch_command(script: str, args: list[str], processes: int) -> list[str] | None:
    """The torchrun command that runs `script args` on `processes` local processes, when more than
    one is wanted and this process is not already one of torchrun's (None: train here)."""
    if processes <= 1 or "WORLD_SIZE" in os.environ:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            script, *args]


def start(world: World, device: torch.device) -> None:
    """Join the process group (after the data was checked: bad data never starts one)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("rank %d of %d (%s backend) on %s", world.rank, world.size, backend, device)


def stop(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(world: World, device: torch.device) -> torch.device:
    """The device of this rank: its own GPU (LOCAL_RANK) when there are GPUs."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def shard_layers(causal_lm) -> int:
    """sharding=fsdp: each decoder layer an FSDP2 unit (its weights, frozen and LoRA's, split over the
    ranks and gathered for its forward and backward). FSDP averages their gradients over the ranks;
    World.sum_gradients turns that into the sum the step expects (each rank's loss is already its
    share of the step's mean; gloo has no pre-scaled sum to ask FSDP for). The
    embeddings, final norm and head stay whole on every rank: loss.py uses the head's weight
    directly, and a tied head shares it with the embeddings. Returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    layers = causal_lm.get_decoder().layers
    for layer in layers:
        fully_shard(layer)
    return len(layers)


def full_state_dict(model) -> dict:
    """The trained weights (LoRA's; every weight in full fine-tuning), unsharded, on rank 0's CPU;
    {} on the others. The frozen base is left out: rank 0 never holds it whole. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    if state:
        log.info("gathered onto rank 0: %d trained tensors, %.1f MB", len(state),
                 sum(t.numel() * t.element_size() for t in state.values()) / 1e6)
    return state


def full_state_dicts(model, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state keyed by parameter name), whole, on rank 0's CPU; ({}, {}) on
    the others. Every rank must call it: each layer's shards are gathered in turn."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_state_dict(model), get_optimizer_state_dict(model, optimizer, options=options)


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over parameters of which some may be FSDP shards (DTensors)
    and some whole (embeddings, head): torch's own function cannot stack the two kinds of norm, so
    each kind's norm is taken apart (a shard's over all ranks) and the two combined."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norms = [get_total_norm(sharded).full_tensor()]
    if whole:
        norms.append(get_total_norm(whole).to(norms[0].device))
    total = get_total_norm(norms)
    # torch's coefficient; as a number, since a DTensor cannot be multiplied by a plain tensor
    coefficient = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    with torch.no_grad():
        for grad in grads:
            grad.mul_(coefficient)
    return total
