"""Training for ``vlcore pretrain``: the loop, optimizer/schedule, checkpoints, progress/metrics, evaluation."""
