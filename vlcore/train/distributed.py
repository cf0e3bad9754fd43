"""Process-group set-up for ``torchrun`` and the DDP / FSDP wrapping of a model.

Under torchrun (``WORLD_SIZE`` > 1) the default process group is initialised (NCCL on GPUs, gloo on CPU); the
models' distributed pieces (contrastive loss all-gather, visual dictionary all_reduce) take that default group
from ``torch.distributed`` themselves, so nothing is passed to them.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_CREATED = False


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta):
    """Under torchrun, the rendezvous store with a prefix per restart attempt; None elsewhere (``env://``).

    torchrun's agent keeps its store across ``--max-restarts`` attempts, and gloo's address keys are not
    namespaced by attempt: a restarted rank could read the killed attempt's addresses and fail to connect
    ("connectFullMesh ... Connection refused"). One prefix per attempt makes every attempt start clean.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts_it, timeout=timeout)
    return dist.PrefixStore(f"vlcore/attempt_{attempt}", store)


def setup(requested_device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun; returns this process's rank and device."""
    global _CREATED
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if dist.is_initialized():  # the caller set up the group (e.g. a launcher of its own): use it as it is
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _attempt_store(rank, world, timeout)
        dist.init_process_group(backend, timeout=timeout, **({"store": store, "rank": rank, "world_size": world}
                                                             if store is not None else {}),
                                **({"device_id": device} if device.type == "cuda" else {}))
        _CREATED = True
    return DistInfo(rank, world, local_rank, device)


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it."""
    global _CREATED
    if _CREATED and dist.is_initialized():
        # DDP/FSDP modules hold the group inside reference cycles: collect them first, so that destroying the group
        # frees it (and joins gloo's worker threads) now. Left to interpreter shutdown, a worker thread that drops
        # its last tensor then needs the GIL and aborts the process ("terminate called without an active
        # exception", SIGABRT after a successful run).
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    _CREATED = False


def ranks_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same parameters (compares per-tensor float64 sums and sums of squares)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    params = [p.detach() for p in unwrap(model).parameters()]
    local = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).flatten()
    local = local.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def wrap(model: torch.nn.Module, info: DistInfo, strategy: str = "ddp") -> torch.nn.Module:
    """DDP (default) or FSDP2 (``fully_shard``: parameters, gradients and optimizer state sharded)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        # Objectives may leave some heads unused in a step (e.g. a VQA head without questions).
        return DDP(model, device_ids=ids, find_unused_parameters=True)
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # pragma: no cover - torch < 2.6
            raise RuntimeError("--dist fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
        # fully_shard refuses 0-dim parameters (learnable temperatures): they stay replicated, their
        # gradients averaged by sync_replicated_grads after each backward.
        scalars = {p for p in model.parameters() if p.dim() == 0}
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    if any(p.requires_grad for p in block.parameters()):
                        fully_shard(block, ignored_params=scalars or None)
        fully_shard(model, ignored_params=scalars or None)
        model._vlcore_replicated = [p for p in model.parameters() if p in scalars]
        return model
    raise ValueError(f"--dist must be ddp or fsdp; got {strategy!r}")


def sync_replicated_grads(model: torch.nn.Module) -> None:
    """Average the gradients of the parameters FSDP left replicated (no-op for DDP and single processes)."""
    params = getattr(unwrap(model), "_vlcore_replicated", None)
    if not params or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.stack([g.reshape(()) for g in grads]).float()
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat):
        p.grad = g.to(p.dtype).reshape(p.shape).clone()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def full_model_state(model: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The complete (unsharded) state dict on CPU; a collective under FSDP (every rank must call it)."""
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def full_optim_state(model, optimizer, strategy: str) -> dict:
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(model, optimizer, model_state: dict, optim_state: dict | None, strategy: str) -> None:
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, model_state, options=opts)
        if optim_state is not None:
            set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
        return
    unwrap(model).load_state_dict(model_state)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
