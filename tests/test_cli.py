"""The ``vlcore`` command line end to end on CPU: pretrain -> checkpoint -> eval / caption, per model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_vlm  # noqa: F401  (registers test-tiny and test-tiny-score)
import torch

from vlcore import cli, models


def _run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def _saved_eval(text: str, run) -> Path:
    """The file `vlcore eval` says it saved: eval-<date>-<time>[-n].json in the run folder."""
    saved = [Path(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("saved ")]
    assert len(saved) == 1 and saved[0].parent == run and re.fullmatch(r"eval-\d{8}-\d{6}(-\d+)?\.json",
                                                                           saved[0].name), text
    return saved[0]


@pytest.mark.parametrize("command, must_mention", [
    ("pretrain", ["--model", "--data", "--steps", "--batch-size", "--grad-accum", "--lr", "--warmup", "--clip-grad",
                  "--precision", "--compile", "--activation-checkpointing", "--dist", "--resume", "--out-dir",
                  "--tokenizer", "torchrun", "digits-scenes"]),
    ("eval", ["--checkpoint", "--scenes", "zero-shot", "R@1"]),
    ("caption", ["--checkpoint", "--strategy", "--beams", "--top-p"]),
    ("bench", ["--quick", "--only", "run_all.py"]),
    ("info", ["backends"]),
])
def test_help_of_every_command(capsys, command, must_mention):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in must_mention:
        assert word in text, f"`vlcore {command} --help` does not mention {word}"


def test_top_level_help_lists_commands(capsys):
    rc, text = _run(capsys)
    assert rc == 2 and all(c in text for c in ("pretrain", "eval", "caption", "bench", "info"))


def test_console_script_is_installed():
    exe = shutil.which("vlcore")
    if exe is None:
        pytest.skip("the vlcore console script is not on PATH (package not installed)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("vlcore ")


def test_info_prints_what_python_m_vlcore_info_prints(capsys):
    from vlcore import info

    info.main([])
    expected = capsys.readouterr().out
    rc, text = _run(capsys, "info")
    assert rc == 0 and text == expected and text.startswith("vlcore ")


def test_bench_without_benchmarks_folder_says_why(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: None)
    rc, text = _run(capsys, "bench", "--quick")
    assert rc == 2 and "benchmarks/ folder was not found" in text and "pip install -e" in text


def test_bench_runs_run_all_with_the_options(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "run_all.py").write_text("import sys, pathlib\n"
                                      "pathlib.Path(sys.argv[0]).with_name('argv.json').write_text("
                                      "__import__('json').dumps(sys.argv[1:]))\nsys.exit(3)\n")
    monkeypatch.setenv("VLCORE_BENCHMARKS", str(bench))
    assert cli.main(["bench", "--quick", "--only", "attention,vq"]) == 3  # its exit code comes back
    assert json.loads((bench / "argv.json").read_text()) == ["--quick", "--only", "attention,vq"]


def test_pretrain_eval_caption_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    rc, text = _run(capsys, "pretrain", "--plugin", "tiny_vlm", "--model", "test-tiny", "--steps", "4",
                    "--batch-size", "8", "--warmup", "1", "--out-dir", str(run), "--device", "cpu",
                    "--save-every", "2", "--set", "width=24", "--log-every", "1")
    assert rc == 0
    for word in ("test-tiny", "step 4/4", "samples/s", "eta", "zero-shot digit accuracy", "text->image R@1",
                 "caption exact match", "eval.json"):
        assert word in text, word
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "samples_per_s", "loss/contrastive_loss", "loss/caption_loss"} <= set(records[-1])
    assert abs(records[-1]["loss"] - records[-1]["loss/contrastive_loss"] - records[-1]["loss/caption_loss"]) < 1e-4
    assert (run / "metrics.png").stat().st_size > 1000 or "matplotlib is not installed" in text
    ev = json.loads((run / "eval.json").read_text())
    assert ev["zero_shot_n"] == 359 and ev["retrieval_n"] == 100
    for k in ("zero_shot_acc", "t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "caption_exact_match"):
        assert 0.0 <= ev[k] <= 1.0
    assert ev["t2i_r5"] >= ev["t2i_r1"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["width"] == 24 and config["model"]["vocab_size"] == len(
        json.loads((run / "tokenizer.json").read_text())["merges"]) + 263

    rc, text = _run(capsys, "eval", "--checkpoint", str(run), "--scenes", "20", "--zero-shot-images", "30",
                    "--out", str(tmp_path / "e.json"))
    assert rc == 0 and "test-tiny at step 4" in text and "R@5" in text
    assert json.loads((tmp_path / "e.json").read_text())["retrieval_n"] == 20

    rc, text = _run(capsys, "caption", "--checkpoint", str(run / "checkpoints" / "latest.json"), "--num", "3")
    assert rc == 0 and text.count("held-out scene") == 3 and "reference: a " in text
    image = pytest.importorskip("PIL.Image")
    image.new("RGB", (40, 30), (200, 200, 200)).save(tmp_path / "photo.png")
    rc, text = _run(capsys, "caption", "--checkpoint", str(run), str(tmp_path / "photo.png"))
    assert rc == 0 and text.startswith(f"{tmp_path / 'photo.png'}: ")
    (tmp_path / "notes.png").write_text("not an image")
    for bad, why in [("notes.png", "that does not decode"), ("gone.png", "No such file")]:
        rc, text = _run(capsys, "caption", "--checkpoint", str(run), str(tmp_path / bad))
        assert rc == 2 and "images: expected" in text and why in text and len(text.strip().splitlines()) == 1


def test_eval_through_score_for_models_without_dual_encoders(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _ = _run(capsys, "pretrain", "--model", "test-tiny-score", "--steps", "2", "--batch-size", "4",
                 "--out-dir", str(run), "--eval", "off", "--quiet")
    assert rc == 0 and not (run / "eval.json").exists()
    (run / "eval.json").write_text("pretrain's own evaluation\n")
    rc, text = _run(capsys, "eval", "--checkpoint", str(run), "--scenes", "12", "--zero-shot-images", "10")
    assert rc == 0 and "(score;" in text
    ev = json.loads(_saved_eval(text, run).read_text())
    assert ev["method"] == "score" and ev["zero_shot_n"] == 10 and "caption_exact_match" not in ev
    # a second evaluation gets its own file; pretrain's eval.json is never overwritten
    rc, again = _run(capsys, "eval", "--checkpoint", str(run), "--scenes", "4", "--zero-shot-images", "4")
    assert rc == 0 and _saved_eval(again, run) != _saved_eval(text, run)
    assert (run / "eval.json").read_text() == "pretrain's own evaluation\n"
    rc, text = _run(capsys, "caption", "--checkpoint", str(run))
    assert rc == 2 and "expected a captioner's checkpoint" in text and "found a test-tiny-score" in text


def _real_tiny_models() -> list[str]:
    try:
        return [m for m in models.list_models() if m.endswith("-tiny") and not m.startswith("test-")]
    except Exception:  # noqa: BLE001 - a broken model file shows up as the failing test below
        return ["<registry failed to load>"]


@pytest.mark.parametrize("name", _real_tiny_models())
def test_every_registered_tiny_model_trains_and_evaluates(tmp_path, capsys, name):
    run = tmp_path / name
    rc, text = _run(capsys, "pretrain", "--model", name, "--steps", "2", "--batch-size", "2", "--warmup", "1",
                    "--out-dir", str(run), "--eval", "off", "--quiet", "--device", "cpu")
    assert rc == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    rc, text = _run(capsys, "eval", "--checkpoint", str(run), "--scenes", "4", "--zero-shot-images", "4",
                    "--batch-size", "64")
    assert rc == 0
    ev = json.loads(_saved_eval(text, run).read_text())
    assert 0 <= ev["zero_shot_acc"] <= 1 and 0 <= ev["t2i_r1"] <= 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
