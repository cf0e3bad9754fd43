"""Backend selection rules (vlcore/dispatch.py): explicit requests, VLCORE_BACKEND, automatic fallback, and
that every refusal is explained."""

import logging

import pytest
import torch

import vlcore
from vlcore import dispatch


class _Impl:
    pass


@pytest.fixture
def toy_op():
    """A throwaway op family with three backends, removed afterwards."""
    op = "toy_op"
    dispatch.register(dispatch.Backend(op=op, name="reference", devices=("cpu", "cuda"),
                                       dtypes=(torch.float32,), priority=0, load=_Impl))
    dispatch.register(dispatch.Backend(op=op, name="fast", devices=("cuda",), dtypes=(torch.float16, torch.float32),
                                       priority=10, load=_Impl, interpreter_cpu=True,
                                       supports=lambda p: [] if p["dim"] <= 128 else [f"head dim {p['dim']} > 128"]))
    dispatch.register(dispatch.Backend(op=op, name="missing", devices=("cuda",), dtypes=(torch.float32,),
                                       priority=20, load=_Impl, requires=lambda: "not built in this install"))
    yield op
    dispatch._REGISTRY.pop(op)
    dispatch._LOGGED.clear()


def _problem(device="cpu", dtype=torch.float32, dim=64):
    return dispatch.Problem(torch.device(device), dtype, {"dim": dim})


def test_cpu_tensors_get_reference_automatically(toy_op):
    assert dispatch.choose(toy_op, _problem()).name == "reference"


def test_automatic_choice_on_cuda_takes_highest_available_and_logs_refusal_once(toy_op, caplog):
    with caplog.at_level(logging.WARNING, logger="vlcore"):
        assert dispatch.choose(toy_op, _problem("cuda")).name == "fast"
        dispatch.choose(toy_op, _problem("cuda"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "missing" in messages[0] and "not built in this install" in messages[0]


def test_automatic_choice_falls_back_when_inputs_are_refused(toy_op):
    assert dispatch.choose(toy_op, _problem("cuda", dim=256)).name == "reference"


def test_explicit_request_that_cannot_run_lists_every_reason(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendError) as e:
        dispatch.choose(toy_op, _problem("cpu", torch.float64, dim=256), backend="fast")
    msg = str(e.value)
    assert "runs on cuda" in msg and "float64" in msg


def test_explicit_cpu_request_allowed_only_under_interpreter(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose(toy_op, _problem("cpu"), backend="fast").name == "fast"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendError, match="TRITON_INTERPRET=1"):
        dispatch.choose(toy_op, _problem("cpu"), backend="fast")


def test_input_specific_refusal_is_reported(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(dispatch.BackendError, match="head dim 256 > 128"):
        dispatch.choose(toy_op, _problem("cpu", dim=256), backend="fast")


def test_environment_variable_global_and_per_op(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLCORE_BACKEND", "fast")
    assert dispatch.choose(toy_op, _problem("cpu")).name == "fast"
    monkeypatch.setenv("VLCORE_BACKEND", "attention=reference,toy_op=fast")
    assert dispatch.choose(toy_op, _problem("cpu")).name == "fast"
    monkeypatch.setenv("VLCORE_BACKEND", "attention=reference")
    assert dispatch.choose(toy_op, _problem("cpu")).name == "reference"
    # the keyword wins over the environment
    monkeypatch.setenv("VLCORE_BACKEND", "fast")
    assert dispatch.choose(toy_op, _problem("cpu"), backend="reference").name == "reference"


@pytest.mark.parametrize("env, message", [
    ("vq_nearest=triton", "unknown op 'vq_nearest'; valid ops: attention, contrastive_loss, toy_op, vq"),
    ("toy_op=triton", "op 'toy_op' has no backend 'triton'; its backends: missing, fast, reference"),
    ("attention=reference,toy_op", "OP=BACKEND pairs separated by commas"),
    ("toy_op=", "found the item 'toy_op='"),
    ("tritn", "unknown backend; valid names: cpu, cuda, fast, missing, reference, triton"),
])
def test_environment_variable_typos_are_errors_naming_the_valid_choices(toy_op, monkeypatch, env, message):
    # before: an unknown key was ignored (the default backend ran while the user believed otherwise)
    monkeypatch.setenv("VLCORE_BACKEND", env)
    with pytest.raises(dispatch.BackendError) as e:
        dispatch.choose(toy_op, _problem("cpu"))
    assert f"VLCORE_BACKEND={env!r}" in str(e.value) and message in str(e.value)


def test_environment_variable_typo_fails_the_public_op(monkeypatch):
    monkeypatch.setenv("VLCORE_BACKEND", "vq_nearest=triton")
    with pytest.raises(dispatch.BackendError, match="unknown op 'vq_nearest'.*vq"):
        vlcore.vq_nearest(torch.randn(4, 3), torch.randn(5, 3))


def test_unknown_backend_names_the_known_ones(toy_op):
    with pytest.raises(dispatch.BackendError, match="known backends: missing, fast, reference"):
        dispatch.choose(toy_op, _problem(), backend="nope")


def test_public_op_honours_backend_keyword():
    q = torch.randn(1, 3, 1, 4)
    with pytest.raises(dispatch.BackendError, match="unknown backend 'nope'"):
        vlcore.attention(q, q, q, backend="nope")


def test_describe_lists_every_registered_op():
    rows = dispatch.describe()
    ops = {r["op"] for r in rows}
    assert "attention" in ops
    ref = [r for r in rows if r["op"] == "attention" and r["backend"] == "reference"][0]
    assert ref["available"] and not ref["why_not"]
