"""Data-parallel runs over processes started by torchrun: the process group, the model wrapper, reductions.

Imports from fasttrain: compute.device, system.errors.

    torchrun --nproc_per_node=N -m fasttrain.train CONFIG.toml

torchrun gives each process RANK, WORLD_SIZE and LOCAL_RANK; a plain `python -m fasttrain.train` is a world of one, with
no process group and no wrapper. CUDA uses NCCL and one GPU per process (cuda:LOCAL_RANK), CPU gloo. Every collective,
and joining the group, has a timeout (FASTTRAIN_DIST_TIMEOUT seconds, default 600), so ranks waiting on a dead one fail
in one line instead of hanging.

train.parallel: "ddp" holds the whole model on every rank and averages gradients in the backward; "fsdp" (FSDP2
`fully_shard` on every block and the root) gives each rank 1/N of the parameters, gradients and optimizer state,
gathering a block's parameters only while it computes (cast to bf16/fp16, gradients reduced in fp32); "hsdp" shards
within groups of train.shard_group_size ranks (default: one node's) on a 2-D mesh, the groups being replicas whose
gradients are averaged after each group's reduce-scatter, so only that all-reduce crosses nodes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterable, Protocol, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from fasttrain.compute.device import PRECISIONS
from fasttrain.system.errors import RunStopped, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size`, on local device `local_rank`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The World torchrun describes in the environment; a world of one without it."""
    unset = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": os.environ.get("WORLD_SIZE", "1")}
    try:
        world = World(*(int(os.environ.get(name, value)) for name, value in unset.items()))
    except ValueError:
        raise UsageError(
            "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (as torchrun sets them)"
        ) from None
    if not 0 <= world.rank < world.size:
        raise UsageError(f"RANK={world.rank} is outside WORLD_SIZE={world.size}")
    return world


SHARDED = ("fsdp", "hsdp")  # the train.parallel modes whose parameters are DTensors, split over ranks


def shard_group(world: World, parallel: str, size: int) -> int:
    """How many ranks one parameter is split over: the world under "fsdp", 1 under "ddp", `size` under "hsdp" (0: the
    node's processes; UsageError unless it divides the world)."""
    if parallel == "hsdp":
        size = size or world.local_size
        if world.size % size != 0:
            raise UsageError(
                f"train.shard_group_size = {size} does not divide the world of {world.size} process(es) "
                "into whole replicas (0: the processes on one node)"
            )
        return size
    return world.size if parallel == "fsdp" else 1


def start(world: World, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when there is more than one rank; RunStopped (one
    line, exit status 1) if the ranks cannot meet within FASTTRAIN_DIST_TIMEOUT seconds."""
    if world.distributed and not dist.is_initialized():
        seconds = float(os.environ.get("FASTTRAIN_DIST_TIMEOUT", 600))
        timeout = timedelta(seconds=seconds)
        failed = (
            f"error: rank {world.rank} of {world.size} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
            f"FASTTRAIN_DIST_TIMEOUT={seconds:g} s"
        )
        # Gloo's full-mesh connect can wait past its own timeout after a restart (seen once in 7 kills under
        # torchrun, stuck in ProcessGroupGloo's constructor): a timer bounds the join whatever torch does.
        watchdog = threading.Timer(seconds + 10, _give_up, (f"{failed}: no answer from its peers",))
        watchdog.daemon = True
        watchdog.start()
        try:
            store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
            store.set_timeout(timeout)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend, store=_attempt_store(world, store), rank=world.rank, world_size=world.size, timeout=timeout
            )
        except RuntimeError as e:  # torch's DistError, DistStoreError, gloo's and NCCL's are all RuntimeErrors
            raise RunStopped(f"{failed}: {' '.join(str(e).split())[:300]}", 1) from None
        finally:
            watchdog.cancel()


def _give_up(message: str) -> None:
    """End the process with `message` as its one line, exit status 1: the join hangs in torch, which no
    exception reaches, so the timer's thread ends it."""
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def _attempt_store(world: World, store: dist.Store) -> dist.Store:
    """The store this attempt's group meets in: `store` under a prefix per torchrun restart, since torchrun's static
    rendezvous keeps the dead attempt's keys there (a restarted gloo group hung or failed on them); one node only
    (docs/multi-gpu.md)."""
    if world.local_size != world.size:
        return store
    return dist.PrefixStore(f"fasttrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def new_group(world: World) -> dist.ProcessGroup | None:
    """A gloo process group of every rank, for collectives on a thread beside training's (None in a world of
    one). Every rank must call it, in the same order."""
    return dist.new_group(backend="gloo") if world.distributed else None


def stop() -> None:
    """Leave the process group, if this process joined one. What nothing reaches any more (a wrapped model, its
    meshes, its optimizer's sharded state) is collected first, while the interpreter is whole: left to its teardown
    at exit, a gloo thread still holding a tensor aborts the process ("terminate called without an active
    exception"). So a caller drops its references before it calls this."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(
    module: nn.Module,
    blocks: Iterable[nn.Module],
    world: World,
    parallel: str,
    group: int,
    precision: str,
    device: torch.device,
) -> nn.Module:
    """The module that trains: `module` in a world of one, DDP around it, or for FSDP and HSDP `module` sharded in place
    over groups of `group` ranks, each of `blocks` a unit of its own."""
    if not world.distributed:
        return module
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = PRECISIONS[precision]
    reduce_dtype = torch.float32 if dtype else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype)
    # The mesh on the run's device (fully_shard's default takes a GPU whenever there is one). 2-D is HSDP: rank r is
    # in replica r // group and holds shard r % group.
    replicas = world.size // group
    shape, names = ((world.size,), None) if replicas == 1 else ((replicas, group), ("replicate", "shard"))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root's inputs include the loss's fp32 grad_scale (NextTokenLoss): cast to bf16 it would no longer equal the
    # gradient the backward receives, and the fused loss's backward would make the pass the announcement saves.
    root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    return cast(nn.Module, fully_shard(module, mesh=mesh, mp_policy=root_policy))  # the module, sharded in place


def release_gathered(wrapped: nn.Module) -> None:
    """Under FSDP, free the whole parameters the root gathered for a forward with no backward after it (an
    evaluation): the root keeps its own gathered after a forward, expecting the backward, so until this the module's
    parameters are not the shards an in-place change of the weights must reach (training/calibration.py). Not after
    every evaluation: sampling runs the plain model, which needs the root's gathered."""
    release = getattr(wrapped, "reshard", None)  # FSDP2's FSDPModule (its module imported only with it)
    if release is not None:
        release()


def gradient_sync(wrapped: nn.Module, enabled: bool) -> ContextManager[None]:
    """A context in which the backward does (or, not `enabled`, skips) the gradient reduction:
    skipped on every micro-batch but the last of an accumulated step."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    set_sync = getattr(wrapped, "set_requires_gradient_sync", None)  # FSDP2's (its module imported only with it)
    if set_sync is not None:
        set_sync(enabled)
    return contextlib.nullcontext()


class Optimizer(Protocol):
    """What checkpoints use of an optimizer: a torch one, or the training layer's Hybrid of several."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None: ...


def full_state(model: nn.Module, optimizer: Optimizer | None, fsdp: bool) -> tuple[dict, dict | None]:
    """Unsharded state dicts of `model` and `optimizer` (None: not asked for). Sharded, every rank must call it: rank 0
    gets them in CPU memory, keyed by parameter name; the others get empty dicts."""
    if not fsdp:
        return model.state_dict(), None if optimizer is None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_state, None
    return model_state, _merged([get_optimizer_state_dict(model, part, options=options) for part in _parts(optimizer)])


def load_full_state(
    model: nn.Module, optimizer: Optimizer, model_state: dict, optimizer_state: dict, fsdp: bool
) -> None:
    """Load what `full_state` returned (every rank read the same file), in any mode: FSDP re-shards it, and an optimizer
    state keyed by index (saved without FSDP) or by name is re-keyed to what this mode loads."""
    load_full_model_state(model, model_state, fsdp)
    for part, state in zip(_parts(optimizer), _split(optimizer, optimizer_state)):
        state = keyed_by_name(model, part, state, by_name=fsdp)
        if fsdp:
            _load_part(model, part, state, full=True)
        else:
            part.load_state_dict(state)


def keyed_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, by_name: bool) -> dict:
    """A torch optimizer's full `state` keyed by parameter name (`by_name`, as FSDP's are) or by index (its place in the
    optimizer's groups, as `optimizer.state_dict()`'s), whichever it was keyed by."""
    keys = [k for group in state["param_groups"] for k in group["params"]]
    if not keys or isinstance(keys[0], str) == by_name:
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    key = dict(enumerate(order)) if by_name else {name: i for i, name in enumerate(order)}
    return {
        "state": {key[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def _parts(optimizer: Optimizer) -> list[torch.optim.Optimizer]:
    """`optimizer`'s torch optimizers: a Hybrid's parts in order, or itself."""
    parts = getattr(optimizer, "parts", None)
    return list(parts.values()) if parts is not None else [cast(torch.optim.Optimizer, optimizer)]


def _merged(states: list[dict]) -> dict:
    """Optimizers' state dicts keyed by name as one, states side by side, groups in order (DCP cannot load several when
    one has a group without parameters); empty if any is (off rank 0)."""
    if not all(states):
        return {}
    return {
        "state": {name: value for state in states for name, value in state["state"].items()},
        "param_groups": [group for state in states for group in state["param_groups"]],
    }


def _split(optimizer: Optimizer, state: dict) -> list[dict]:
    """`optimizer`'s saved `state` as each of its torch optimizers' own: itself for one; a Hybrid's own state dict
    (by part name) part by part; one `_merged` (by any mode) cut at each part's number of groups."""
    parts = getattr(optimizer, "parts", None)
    if parts is None:
        return [state]
    if state.keys() == parts.keys():
        return [state[name] for name in parts]
    split, start = [], 0
    for part in parts.values():
        groups = state["param_groups"][start : start + len(part.param_groups)]
        start += len(groups)
        keys = {key for group in groups for key in group["params"]}
        split.append({"state": {k: v for k, v in state["state"].items() if k in keys}, "param_groups": groups})
    return split


def local_state(model: nn.Module, optimizer: Optimizer) -> tuple[dict, dict]:
    """State dicts of `model` and `optimizer` as this rank holds them, for a sharded checkpoint: DTensor shards
    under FSDP and HSDP, whole tensors otherwise; the optimizer's keyed by parameter name. Nothing is gathered."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model), _merged([get_optimizer_state_dict(model, part) for part in _parts(optimizer)])


def load_local_state(model: nn.Module, optimizer: Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load what `local_state` returned (filled from a checkpoint) into `model` and `optimizer`."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, model_state)
    for part, state in zip(_parts(optimizer), _split(optimizer, optimizer_state)):
        _load_part(model, part, state, full=False)


def _load_part(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, full: bool) -> None:
    """Load one optimizer's `state` keyed by name, whole (`full`) or this rank's shards, through DCP, then its groups'
    settings as saved (DCP drops those of a group without parameters: torch 2.13)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=full))
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update((key, value) for key, value in saved.items() if key != "params")


def load_full_model_state(model: nn.Module, model_state: dict, fsdp: bool) -> None:
    """Load full (unsharded) weights that every rank read alike into `model`; FSDP re-shards them."""
    if not fsdp:
        model.load_state_dict(model_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))


def total(value: torch.Tensor, world: World) -> torch.Tensor:
    """`value` summed over the ranks (a new tensor; `value` itself in a world of one)."""
    if not world.distributed:
        return value
    summed = value.detach().clone()
    dist.all_reduce(summed)
    return summed


def main_value(value: float, world: World, device: torch.device) -> float:
    """Rank 0's `value` on every rank, so that all decide alike (a collective: every rank calls it)."""
    mine = torch.tensor(value if world.is_main else 0.0, dtype=torch.float64, device=device)
    return total(mine, world).item()


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (every rank gets the same answer)."""
    return flag if not world.distributed else total(torch.tensor(float(flag), device=device), world).item() > 0


def gather(obj: Any, world: World) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def decided_by_main(world: World, decide: Callable[[], T]) -> T:
    """What `decide()` returns on rank 0, on every rank (the process group joined): a choice read from files that
    another rank could see mid-change (an --overwrite start put back, a phase ending) is made once. A UsageError
    rank 0 meets is every rank's."""
    if not world.distributed:
        return decide()
    box: list[object] = [None]
    if world.is_main:
        try:
            box = [(True, decide())]
        except UsageError as e:
            box = [(False, str(e))]
    dist.broadcast_object_list(box, src=0)
    ok, value = cast(tuple[bool, Any], box[0])
    if not ok:
        raise UsageError(value)
    return value


def barrier(world: World) -> None:
    """Wait until every rank gets here (after rank 0 wrote a file the others will read)."""
    if world.distributed:
        dist.barrier()
