"""Pure-PyTorch reference implementations: the ground truth of the tests and the CPU execution path."""
