"""CPU thread policy for training on a machine whose cores may be shared.

Why: a default run on 2 cores fell from ~477 to 23–65 samples/s when one other CPU-bound 2-thread process shared
the cores — a 7–20x collapse where sharing explains 2x. Three things multiply:

* intra-op threads: torch starts one OpenMP thread per core in *every* process; two such processes put 4
  runnable threads on 2 cores, and each parallel region ends at a barrier that waits for its slowest thread —
  one descheduled for a whole time slice stalls all the others;
* OpenMP spin-waiting: libgomp threads spin (up to ~300k iterations) at every barrier and between regions
  before they sleep, burning the very core the descheduled thread needs (libgomp only throttles the spin when
  its *own* threads exceed the cores, which it cannot see across processes);
* data workers: each DataLoader worker is one more process; with intra-op threads of its own it adds a full
  thread pool per worker.

Policy: intra-op threads = usable cores / processes on this machine (torchrun's LOCAL_WORLD_SIZE), at least 1;
data workers run 1 intra-op thread (torch's DataLoader sets that in each worker; the tests hold vlcore's loaders
to it); OMP_WAIT_POLICY=PASSIVE and KMP_BLOCKTIME=0 (idle OpenMP threads sleep at
once) for the ``vlcore`` CLI unless the user set them. The OpenMP runtime reads those variables when torch loads
it, so :func:`set_wait_policy_for_cli` runs from ``vlcore/__init__.py`` before torch is imported — which is why
this module imports torch only inside functions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}  # libgomp / Intel OpenMP


def intra_op_threads(cores: int, local_world_size: int = 1) -> int:
    """Intra-op threads of one process: its share of the cores, at least 1."""
    if cores < 1 or local_world_size < 1:
        raise ValueError(f"intra_op_threads: cores and local_world_size must be >= 1; got cores={cores}, "
                         f"local_world_size={local_world_size}")
    return max(1, cores // local_world_size)


def wait_policy_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The wait-policy variables to set: those of :data:`WAIT_POLICY` the user has not set."""
    return {key: value for key, value in WAIT_POLICY.items() if key not in environ}


def is_cli_process(argv: Sequence[str], orig_argv: Sequence[str] = ()) -> bool:
    """True for the ``vlcore`` console script and ``python -m vlcore[.cli]`` (also as torchrun workers)."""
    if argv and os.path.basename(argv[0]) == "vlcore":
        return True
    args = list(orig_argv)
    return any(a == "-m" and i + 1 < len(args) and args[i + 1] in ("vlcore", "vlcore.cli")
               for i, a in enumerate(args))


def set_wait_policy_for_cli(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """In a CLI process, set the wait-policy defaults the user left unset; returns what it set. A library user's
    process is left alone (the variables change how every OpenMP program in it waits)."""
    environ = os.environ if environ is None else environ
    if not is_cli_process(sys.argv, getattr(sys, "orig_argv", ())):
        return {}
    added = wait_policy_defaults(environ)
    environ.update(added)
    return added


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask (taskset, cpusets), capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def configure_intra_op_threads(local_world_size: int | None = None) -> int:
    """Apply the policy to this process (``LOCAL_WORLD_SIZE`` by default); returns the thread count set."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world_size is None else local_world_size
    threads = intra_op_threads(usable_cores(), local)
    torch.set_num_threads(threads)
    return threads

