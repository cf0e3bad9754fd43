"""`vlcore finetune` end to end with tiny models on CPU: a few steps, then the held-out evaluation in eval.json."""

import json

import pytest
import torch

from vlcore.cli import main
from vlcore.train.checkpoint import load_checkpoint

FAST = ["--steps", "2", "--batch-size", "4", "--eval-examples", "8", "--device", "cpu", "--quiet", "--warmup", "0",
        "--save-every", "0"]


def _finetune(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["finetune", *args, *FAST, "--out-dir", str(out)]) == 0
    return out, json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize("task,model,keys", [
    ("vqa", "vilt-tiny", ("vqa_score", "accuracy")),  # classification over answers (ViLT)
    ("vqa", "simvlm-tiny", ("vqa_score",)),  # generation (SimVLM)
    ("retrieval", "align-tiny", ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r10")),
    ("grounding", "xvlm-tiny", ("acc@0.5", "mean_iou")),  # X-VLM's own box head
    ("grounding", "vilt-tiny", ("acc@0.5", "mean_iou")),  # BoxRegressionHead on [CLS]
    ("captioning", "coca-tiny", ("bleu4", "cider")),
    ("nlvr2", "vilt-tiny", ("accuracy",)),
    ("ve", "align-tiny", ("accuracy",)),
    ("vcr", "vilt-tiny", ("accuracy",)),
])
def test_finetune_from_scratch(tmp_path, task, model, keys):
    out, ev = _finetune(tmp_path, f"{task}-{model}", "--task", task, "--model", model)
    assert ev["task"] == task and ev["n"] == 8
    for k in keys:
        hi = 100.0 if k.startswith(("i2t", "t2i")) else (10.0 if k == "cider" else 1.0)
        assert 0.0 <= ev[k] <= hi, (k, ev[k])
    ckpt = load_checkpoint(out, with_state=False)
    assert ckpt["metadata"]["task"] == task and any(k.startswith("backbone.") for k in ckpt["model_state"])


def test_finetune_from_checkpoint_starts_from_its_weights(tmp_path):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--model", "vilt-tiny", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                 "--quiet", "--eval", "off", "--out-dir", str(pre)]) == 0
    # lr ~ 0: the fine-tuned backbone must still be the pretrained one (a fresh init would differ everywhere)
    out, ev = _finetune(tmp_path, "ft", "--task", "ve", "--checkpoint", str(pre), "--lr", "1e-12")
    before = load_checkpoint(pre, with_state=False)["model_state"]
    after = load_checkpoint(out, with_state=False)["model_state"]
    assert ev["accuracy"] >= 0
    for k, v in before.items():
        torch.testing.assert_close(after[f"backbone.{k}"], v, atol=1e-6, rtol=0)
    # and a fine-tuned run can itself be fine-tuned further (its head is dropped, the backbone kept)
    _finetune(tmp_path, "ft2", "--task", "vqa", "--checkpoint", str(out))
    # vlcore eval on a fine-tuned run: the task's metric (the same as the run's own evaluation, same examples)
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["task"] == "ve" and again["n"] == 500


def test_finetune_resume_continues(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["finetune", "--task", "vqa", "--model", "vilt-tiny", "--batch-size", "4", "--device", "cpu", "--quiet",
            "--eval", "off", "--out-dir", str(out)]
    assert main([*args, "--steps", "2", "--save-every", "1"]) == 0
    args[2] = "ve"  # the run's task is fixed by its weights: a different --task is reported and ignored
    assert main([*args, "--steps", "3", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "steps 2->3" in printed and "--task: ve ignored" in printed
    assert load_checkpoint(out, with_state=False)["step"] == 3


def test_finetune_usage_errors(tmp_path, capsys):
    assert main(["finetune", "--task", "vqa"]) == 2
    assert "--checkpoint or --model" in capsys.readouterr().err
    assert main(["finetune", "--task", "vqa", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", "--task", "captioning", "--model", "vilt-tiny", *FAST,
                 "--out-dir", str(tmp_path / "x")]) == 2
    assert "supports" in capsys.readouterr().err
