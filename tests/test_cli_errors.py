"""Every user error of every subcommand is one line naming the argument with what was expected and what was
found, exit status 2, no traceback (``--debug`` shows it); other failures are one line with exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import tiny_vlm  # noqa: F401  (registers test-tiny)
import torch

from vlcore import cli


def _fail(capsys, argv, env=None, monkeypatch=None):
    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's own errors exit from parse_args
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.err


# (argv, words the one-line message must hold); paths with {tmp} are filled in
CASES = [
    (["pretrain", "--model", "no-such-model"], ["--model", "expected a registered model", "found 'no-such-model'"]),
    (["pretrain", "--tokenizer", "{tmp}/missing.json"], ["--tokenizer", "expected a tokenizer JSON file",
                                                         "does not exist"]),
    (["pretrain", "--log-every", "0"], ["--log-every", "expected an integer >= 1, found '0'"]),
    (["pretrain", "--batch-size", "0"], ["--batch-size", "expected an integer >= 1, found '0'"]),
    (["pretrain", "--steps", "ten"], ["--steps", "expected an integer >= 1, found 'ten'"]),
    (["pretrain", "--lr", "nan"], ["--lr", "expected a number > 0, found 'nan'"]),
    (["pretrain", "--max-bad-fraction", "1.5"], ["--max-bad-fraction", "expected a number >= 0 and <= 1"]),
    (["pretrain", "--device", "gpu"], ["--device", "expected auto, cpu, cuda or cuda:N, found 'gpu'"]),
    (["pretrain", "--precision", "fp8"], ["--precision", "invalid choice: 'fp8'"]),
    (["pretrain", "--scene-mix", "1,2"], ["--scene-mix", "expected three non-negative weights", "found '1,2'"]),
    (["pretrain", "--model", "test-tiny", "--set", "nope=1"], ["--set", "expected fields of test-tiny", "found nope"]),
    (["pretrain", "--set", "width"], ["--set", "expected KEY=VALUE, found 'width'"]),
    (["pretrain", "--plugin", "no_such_plugin_module"], ["--plugin", "found 'no_such_plugin_module'"]),
    (["pretrain", "--data", "{tmp}/shards-{{0..3}}.tar", "--tokenizer", "{tmp}/tok.json"],
     ["--data", "no such file '{tmp}/shards-0.tar' and 3 more"]),
    (["pretrain", "--data", "{tmp}/*.tar"], ["--data", "matches no file"]),
    (["eval", "--checkpoint", "{tmp}/run", "--scenes", "0"], ["--scenes", "expected an integer >= 1, found '0'"]),
    (["eval", "--checkpoint", "{tmp}/run", "--batch-size", "-1"], ["--batch-size", "found '-1'"]),
    (["eval", "--checkpoint", "{tmp}/missing"], ["--checkpoint", "found '{tmp}/missing', which does not exist"]),
    (["eval"], ["the following arguments are required: --checkpoint"]),
    (["caption", "--checkpoint", "{tmp}/run", "--num", "0"], ["--num", "expected an integer >= 1, found '0'"]),
    (["caption", "--checkpoint", "{tmp}/run", "--top-p", "0"], ["--top-p", "expected a number > 0 and <= 1"]),
    (["caption", "--checkpoint", "{tmp}/missing"], ["--checkpoint", "which does not exist"]),
    (["bench", "--only"], ["--only", "expected one argument"]),
    (["info", "--verbose"], ["unrecognized arguments: --verbose"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, words):
    (tmp_path / "tok.json").write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in argv]
    t0 = time.perf_counter()
    rc, err = _fail(capsys, argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlcore") and ": error: " in lines[0], err
    for w in words:
        assert w.format(tmp=tmp_path) in lines[0], (w, lines[0])
    assert time.perf_counter() - t0 < 20  # before any work (no tokenizer training, no model)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["info"], ["pretrain", "--steps", "1"], ["eval", "--checkpoint", "x"]])
@pytest.mark.parametrize("env, words", [
    ("vq_nearest=triton", ["unknown op 'vq_nearest'", "valid ops: attention, contrastive_loss, vq"]),
    ("attention=tritn", ["op 'attention' has no backend 'tritn'", "its backends:"]),
    ("fastest", ["unknown backend; valid names:"]),
])
def test_unknown_backend_in_the_environment_is_a_user_error(capsys, monkeypatch, command, env, words):
    rc, err = _fail(capsys, command, {"VLCORE_BACKEND": env}, monkeypatch)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"VLCORE_BACKEND='{env}'" in err
    assert all(w in err for w in words), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    rc, err = _fail(capsys, ["pretrain", "--device", "cuda"])
    assert rc == 2 and "--device: found 'cuda', but CUDA is not available on this machine" in err


def test_an_unexpected_failure_is_one_line_exit_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(cli, "_cmd_info", broken)
    rc, err = _fail(capsys, ["info"])
    assert rc == 1 and err.strip() == ("vlcore info: internal error: RuntimeError: something inside broke second "
                                       "line (rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="something inside broke"):
        cli.main(["info", "--debug"])


def test_ctrl_c_outside_the_training_loop_is_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    rc, err = _fail(capsys, ["info"])
    assert rc == 130 and err.strip() == "vlcore info: interrupted"


def _vlcore(*argv, **kw):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "vlcore.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120, **kw)


def test_the_real_command_line_exits_2_with_one_line_and_debug_shows_the_traceback(tmp_path):
    # before: an 18-line traceback (unknown model) and ZeroDivisionError (--log-every 0)
    for argv, word in [(["pretrain", "--model", "nope"], "--model"), (["pretrain", "--log-every", "0"], "--log-every"),
                       (["eval", "--checkpoint", str(tmp_path), "--scenes", "0"], "--scenes")]:
        out = _vlcore(*argv)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and word in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
    out = _vlcore("pretrain", "--model", "nope", "--debug")
    assert out.returncode == 1 and "Traceback" in out.stderr and "UsageError: --model" in out.stderr


@pytest.mark.parametrize("torchrun", [True, False])
def test_program_exit_status_and_torchrun_worker_shutdown(monkeypatch, torchrun):
    """`vlcore` exits with main()'s status; a torchrun worker leaves through os._exit (no interpreter shutdown, in
    which a communication thread touching Python objects can abort a run that succeeded)."""
    hard_exits = []

    def fake_exit(code):
        hard_exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run()
    assert e.value.code == 3
    assert hard_exits == ([3] if torchrun else [])
