"""The CPU thread policy (vlcore/train/threads.py): the pure rules, the CLI-only wait policy, and that the data
loader's worker processes run one intra-op thread."""

import os
import subprocess
import sys

import pytest
import torch

from vlcore.data.loader import DigitsSource
from vlcore.train import threads


@pytest.mark.parametrize("cores,local,expected", [(2, 1, 2), (2, 2, 1), (2, 4, 1), (16, 4, 4), (1, 1, 1), (7, 2, 3)])
def test_intra_op_threads_is_the_share_of_the_cores(cores, local, expected):
    assert threads.intra_op_threads(cores, local) == expected


def test_intra_op_threads_rejects_nonsense():
    with pytest.raises(ValueError, match="local_world_size=0"):
        threads.intra_op_threads(2, 0)


def test_wait_policy_defaults_keep_what_the_user_set():
    assert threads.wait_policy_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert threads.wait_policy_defaults({"OMP_WAIT_POLICY": "ACTIVE"}) == {"KMP_BLOCKTIME": "0"}


@pytest.mark.parametrize("argv,orig,cli", [
    (["/venv/bin/vlcore", "pretrain"], ["/venv/bin/python", "/venv/bin/vlcore", "pretrain"], True),
    (["-m"], ["python", "-m", "vlcore.cli", "pretrain"], True),
    (["-m"], ["python", "-u", "-m", "vlcore", "info"], True),
    (["/x/pytest"], ["python", "-m", "pytest", "tests"], False),
    (["train.py"], ["python", "train.py"], False),
])
def test_is_cli_process(argv, orig, cli):
    assert threads.is_cli_process(argv, orig) is cli


def test_set_wait_policy_only_in_cli_processes(monkeypatch):
    env = {"KMP_BLOCKTIME": "200"}
    monkeypatch.setattr(threads.sys, "argv", ["/venv/bin/vlcore", "pretrain"])
    assert threads.set_wait_policy_for_cli(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"KMP_BLOCKTIME": "200", "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(threads.sys, "argv", ["/x/pytest"])
    monkeypatch.setattr(threads.sys, "orig_argv", ["python", "-m", "pytest"], raising=False)
    library_env = {}
    assert threads.set_wait_policy_for_cli(library_env) == {} and library_env == {}


def test_configure_intra_op_threads_applies_the_share(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    before = torch.get_num_threads()
    try:
        assert threads.configure_intra_op_threads(local_world_size=4) == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert threads.configure_intra_op_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_usable_cores_respects_the_affinity_mask():
    assert 1 <= threads.usable_cores() <= len(threads.os.sched_getaffinity(0))


class _ThreadProbe(DigitsSource):
    """A DigitsSource whose batches report the intra-op thread count of the process that made them."""

    def make_batch(self, n):
        return {"threads": torch.tensor(torch.get_num_threads())}


def test_loader_workers_run_one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        source = _ThreadProbe(None, None, batch_size=1, num_workers=1)
        assert int(source.next_batch()["threads"]) == 1
        in_process = _ThreadProbe(None, None, batch_size=1, num_workers=0)
        assert int(in_process.next_batch()["threads"]) == 2  # the probe does see the trainer's setting
    finally:
        torch.set_num_threads(before)


_IMPORT_ORDER_PROBE = """
import os, sys
seen = {}
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
sys.meta_path.insert(0, Hook())
sys.argv = [sys.argv[1]]
import vlcore
print(seen["policy"])
"""


@pytest.mark.parametrize("argv0,expected", [("/venv/bin/vlcore", "PASSIVE"), ("script.py", "unset")])
def test_cli_sets_the_wait_policy_before_torch_is_imported(argv0, expected):
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_POLICY}
    out = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_PROBE, argv0], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == expected
