"""Every tiny model x every task it supports: the TaskModel builds, its loss is finite and reaches the weights,
and its evaluation runs (what benchmarks/zoo.py relies on). Unsupported pairs are refused with the reason."""

import math

import pytest
import torch

from vlcore import models
from vlcore.data.tasks import TASKS, TaskData
from vlcore.data.tasks_batch import collate
from vlcore.data.tokenizer import ByteBPETokenizer
from vlcore.train.finetune import TaskModel, recipe, supported_tasks
from vlcore.train.finetune_eval import evaluate_task

TINY = [m for m in models.list_models() if m.endswith("-tiny")]
EXPECTED = {  # the recipe each paper's model gets (checked, so a model that loses an interface is noticed)
    ("vilt-tiny", "vqa"): "classify", ("simvlm-tiny", "vqa"): "generate", ("xvlm-tiny", "grounding"): "own_box",
    ("vilt-tiny", "grounding"): "box_head", ("coca-tiny", "captioning"): "own", ("align-tiny", "captioning"):
    "caption_head", ("align-tiny", "retrieval"): "own", ("soho-tiny", "vqa"): None,
}


@pytest.fixture(scope="module")
def tok():
    return ByteBPETokenizer.train(["a 3 left of a 7", "how many digits ?", "the left 3", "there is no 5"],
                                  vocab_size=300)


def test_expected_recipes():
    for (name, task), want in EXPECTED.items():
        assert recipe(task, models.create(name, vocab_size=300)) == want, (name, task)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_supported_tasks_train_and_evaluate(name, tok):
    torch.manual_seed(0)
    backbone = models.create(name, vocab_size=300)
    for task in supported_tasks(backbone):
        model = TaskModel(task, backbone, max_text_len=32)
        batch = collate(task, TaskData(task, "train").examples(range(2)), tok, 16)
        out = model(batch)
        assert math.isfinite(out["loss"].item()), (name, task)
        out["loss"].backward()
        trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert trained, (name, task)
        if model.head is not None:
            assert any(n.startswith("head.") for n in trained), (name, task)
        model.zero_grad(set_to_none=True)
        ev = evaluate_task(model, tok, "cpu", max_text_len=16, n=2 if task != "retrieval" else 3)
        assert ev[ev["headline"]] is not None
    for task in sorted(set(TASKS) - set(supported_tasks(backbone))):
        with pytest.raises(ValueError, match="supports"):
            TaskModel(task, backbone)


@pytest.mark.slow
@pytest.mark.parametrize("name,task", [("vilt-tiny", "vqa"), ("simvlm-tiny", "vqa"), ("xvlm-tiny", "grounding"),
                                       ("vilt-tiny", "grounding"), ("align-tiny", "captioning"), ("vilt-tiny", "vcr"),
                                       ("align-tiny", "nlvr2")])
def test_each_recipe_can_fit_one_batch(name, task, tok):
    """The loss of a fixed batch falls under 60 % of its start within 40 Adam steps: the targets reach the outputs
    they should (a head fed the wrong tensor, or a detached path, would not fit)."""
    torch.manual_seed(0)
    model = TaskModel(task, models.create(name, vocab_size=300), max_text_len=32)
    batch = collate(task, TaskData(task, "train").examples(range(8)), tok, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model(batch)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first, (name, task, first, loss.item())
