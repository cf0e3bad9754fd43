"""The zoo table: every ``*-tiny`` model pretrained with its default run, then fine-tuned on each task it supports
(from that checkpoint and, for comparison, from random weights), on digits-scenes, on CPU.

    python benchmarks/zoo.py                                  # everything (hours on a CPU: run it on a free machine)
    python benchmarks/zoo.py --models vilt-tiny --tasks vqa --pretrain-steps 50 --finetune-steps 20   # one short row

Writes ``benchmarks/results/zoo/``: ``zoo.json`` (one record per run: model, stage, task, init, metric, value,
chance, seconds, command), ``zoo.md`` (model × task: pretrained / from scratch) and ``commands.txt``. Rows already
in ``zoo.json`` with the same command are kept, so an interrupted sweep continues where it stopped
(``--redo`` runs them again). Runs go to ``runs/zoo/<model>/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# pass thresholds of issue #18: dual encoders' zero-shot digit accuracy; fine-tuned tasks: above chance
ZERO_SHOT_TARGET = 0.80


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return rc, time.perf_counter() - t0


def _eval(run_dir: Path) -> dict:
    p = run_dir / "eval.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _plan(models: list[str], tasks: list[str] | None, args) -> list[dict]:
    from vlcore import models as registry
    from vlcore.train.finetune import supported_tasks

    cli = [sys.executable, "-m", "vlcore.cli"]
    common = ["--device", args.device, "--quiet", "--overwrite"]
    rows = []
    for name in models:
        base = Path(args.runs) / name
        pre = base / "pretrain"
        steps = ["--steps", str(args.pretrain_steps)] if args.pretrain_steps else []
        rows.append({"model": name, "stage": "pretrain", "task": "pretrain", "init": "scratch", "run": str(pre),
                     "cmd": cli + ["pretrain", "--model", name, "--out-dir", str(pre), *steps, *common]})
        supported = supported_tasks(registry.create(name))
        for task in [t for t in supported if tasks is None or t in tasks]:
            ft = ["--steps", str(args.finetune_steps)] if args.finetune_steps else []
            for init in ("pretrained", "scratch") if args.scratch else ("pretrained",):
                run = base / f"{task}-{init}"
                start = ["--checkpoint", str(pre)] if init == "pretrained" else ["--model", name]
                rows.append({"model": name, "stage": "finetune", "task": task, "init": init, "run": str(run),
                             "cmd": cli + ["finetune", "--task", task, *start, "--out-dir", str(run), *ft, *common]})
    return rows


def _record(row: dict, rc: int, seconds: float) -> dict:
    ev = _eval(Path(row["run"]))
    rec = {k: row[k] for k in ("model", "stage", "task", "init", "run")}
    rec.update(command=shlex.join(["vlcore", *row["cmd"][3:]]), seconds=round(seconds, 1), rc=rc)
    if row["stage"] == "pretrain":
        rec.update(metric="zero_shot_acc", value=ev.get("zero_shot_acc"), t2i_r1=ev.get("t2i_r1"),
                   method=ev.get("method"))
    else:
        rec.update(metric=ev.get("headline"), value=ev.get(ev.get("headline", ""), None), chance=ev.get("chance"),
                   recipe=ev.get("recipe"))
    return rec


def _markdown(records: list[dict]) -> str:
    tasks = ["vqa", "grounding", "nlvr2", "ve", "vcr", "captioning", "retrieval"]
    by = {(r["model"], r["task"], r["init"]): r for r in records}
    models = sorted({r["model"] for r in records})

    def cell(m, t):
        if t == "pretrain":
            r = by.get((m, "pretrain", "scratch"))
            return "—" if r is None or r["value"] is None else f"{100 * r['value']:.1f} % zero-shot"
        p, s = by.get((m, t, "pretrained")), by.get((m, t, "scratch"))
        if p is None and s is None:
            return "—"
        fmt = (lambda r: "fail" if r is None or r["value"] is None else
               {"rsum": f"{r['value']:.1f}", "cider": f"{r['value']:.2f}"}.get(r["metric"], f"{100 * r['value']:.1f}"))
        return f"{fmt(p)} / {fmt(s)}"

    lines = ["| model | pretrain | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for m in models:
        lines.append(f"| {m} | {cell(m, 'pretrain')} | " + " | ".join(cell(m, t) for t in tasks) + " |")
    lines += ["", "Cells: fine-tuned from the pretrained run / from random weights. Metrics: vqa VQA score %, "
              "grounding Acc@0.5 %, nlvr2 / ve / vcr accuracy %, captioning CIDEr, retrieval R-sum (R@1/5/10 both "
              "ways); pretrain: held-out zero-shot digit accuracy. Commands and times: zoo.json, commands.txt."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated (default: every *-tiny model)")
    p.add_argument("--tasks", default="", help="comma-separated fine-tuning tasks (default: all each supports)")
    p.add_argument("--pretrain-steps", type=int, default=0, help="0: the pretrain default")
    p.add_argument("--finetune-steps", type=int, default=0, help="0: the finetune default")
    p.add_argument("--no-scratch", dest="scratch", action="store_false", help="skip the from-scratch baselines")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", default="runs/zoo", help="run folders")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo"))
    p.add_argument("--redo", action="store_true", help="run rows that zoo.json already holds again")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    from vlcore import models as registry

    models = [m.strip() for m in args.models.split(",") if m.strip()] or \
        [m for m in registry.list_models() if m.endswith("-tiny")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
    plan = _plan(models, tasks, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.txt").write_text("\n".join(shlex.join(["vlcore", *r["cmd"][3:]]) for r in plan) + "\n")
    if args.dry_run:
        print((out / "commands.txt").read_text(), end="")
        return 0
    path = out / "zoo.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    failed = 0
    for row in plan:
        command = shlex.join(["vlcore", *row["cmd"][3:]])
        if not args.redo and any(r["command"] == command and r["rc"] == 0 for r in records):
            continue
        Path(row["run"]).parent.mkdir(parents=True, exist_ok=True)
        print(f"$ {command}", flush=True)
        rc, seconds = _run(row["cmd"], Path(row["run"]).parent / f"{Path(row['run']).name}.log")
        rec = _record(row, rc, seconds)
        failed += rc != 0
        print(f"  -> rc {rc}, {rec['metric']} = {rec['value']}, {seconds:.0f} s", flush=True)
        records = [r for r in records if r["command"] != command] + [rec]
        path.write_text(json.dumps(records, indent=2) + "\n")  # after every run: an interrupted sweep keeps it
        (out / "zoo.md").write_text(_markdown(records))
    (out / "zoo.md").write_text(_markdown(records))
    print(f"wrote {path} and {out / 'zoo.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
