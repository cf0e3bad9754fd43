"""Kill a training run again and again (SIGKILL at chosen steps and inside checkpoint writes), restart it each time
with ``--resume auto`` until it finishes, and compare its final weights and losses with an uninterrupted run.

Every attempt is a process forked from this one, which imported torch once and never computed with it (so the
fork is safe), instead of a new interpreter: an attempt costs a fraction of a second, not an import of torch.

    python tests/fault_matrix.py OUT_DIR --seed 0 --faults 10 [--steps 12 --grad-accum 1 --num-workers 0]

prints one JSON line: {"faults": injected, "fired": [...], "attempts": n, "identical": bool, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import tiny_vlm  # noqa: F401  (registers test-tiny)

from vlcore.train import faults
from vlcore.train.loop import TrainConfig, train_tokenizer


def _config(out: Path, tokenizer: str, args) -> TrainConfig:
    return TrainConfig(model="test-tiny", steps=args.steps, batch_size=4, grad_accum=args.grad_accum, lr=3e-3,
                       warmup=2, save_every=args.save_every, keep=2, log_every=1, eval="off", quiet=True,
                       device="cpu", seed=11, threads=1, num_workers=args.num_workers, tokenizer=tokenizer,
                       out_dir=str(out), resume="auto")


def _attempt(cfg: TrainConfig, env: dict, timeout: float) -> int:
    """Run ``pretrain(cfg)`` in a forked child with ``env`` set; its exit status (-9: killed by a fault)."""
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's exit handlers
        code = 0
        try:
            os.environ.update(env)
            sys.stdout = open(os.devnull, "w")
            from vlcore.train.loop import pretrain

            pretrain(cfg)
        except BaseException:  # noqa: BLE001 - report anything, the parent only sees the status
            traceback.print_exc()
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"an attempt ran past {timeout} s")


def _pick_faults(rng: random.Random, n: int, steps: int, saves: int) -> list[str]:
    """``n`` distinct kill points: random steps, and random renames among the checkpoint files of an attempt's first
    two saves (each save renames its weights, its state and latest.json: the temporaries of each are complete but
    not in place when the kill comes; an attempt killed earlier never reaches later renames)."""
    points = [f"step:{s}" for s in range(1, steps + 1)] + [f"write:{w}" for w in range(1, 3 * min(saves, 2) + 1)]
    return rng.sample(points, min(n, len(points)))


def _final(run: Path):
    from vlcore.train import checkpoint
    from vlcore.train.progress import read_metrics

    ckpt = checkpoint.load_checkpoint(run)
    losses = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    return ckpt["model_state"], losses, ckpt["train_state"]["step"]


def run_matrix(root: Path, seed: int, n_faults: int, args) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = root / "tokenizer.json"
    train_tokenizer(TrainConfig(model="test-tiny")).save(tokenizer)
    timeout = args.attempt_timeout
    rc = _attempt(_config(root / "reference", str(tokenizer), args), {faults.ENV: ""}, timeout)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed ({rc})")
    spec = _pick_faults(random.Random(seed), n_faults, args.steps, args.steps // args.save_every)
    fired = root / "fired"
    env = {faults.ENV: ";".join(spec), faults.ONCE_ENV: str(fired)}
    attempts, kills = 0, 0
    while True:
        attempts += 1
        rc = _attempt(_config(root / "run", str(tokenizer), args), env, timeout)
        if rc == 0:
            break
        if rc != -signal.SIGKILL or attempts > len(spec) + 1:
            raise RuntimeError(f"attempt {attempts} ended with {rc}, not a fault's SIGKILL")
        kills += 1
    ref_w, ref_losses, ref_step = _final(root / "reference")
    w, losses, step = _final(root / "run")
    identical = (step == ref_step and ref_w.keys() == w.keys() and all(ref_w[k].equal(w[k]) for k in ref_w)
                 and losses == ref_losses)
    return {"seed": seed, "planned": spec, "fired": sorted(p.name for p in fired.iterdir()) if fired.exists() else [],
            "faults": kills, "attempts": attempts, "identical": bool(identical), "steps": args.steps,
            "grad_accum": args.grad_accum, "num_workers": args.num_workers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=10)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--attempt-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    print(json.dumps(run_matrix(args.out, args.seed, args.faults, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
