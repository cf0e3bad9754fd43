"""SOHO's visual dictionary (Huang et al., CVPR 2021) as a module, plus the MVM masking helper.

Every feature is mapped to its nearest entry (``vlcore.vq_nearest``: fused distance + argmin, no N x K buffer)
and the output is straight-through: quantized = x + sg(e_h - x), so d quantized / d x = identity. It is computed
as the entry itself (in x's dtype) with an identity gradient, which saves that expression's N x D temporaries
and its rounding.

A training step (under ``torch.no_grad``, state in fp32 whatever the input dtype or autocast):

1. assignment h = vq_nearest(x, codebook);
2. per-entry counts and sums by one fused scatter-add, packed in one (K, D + 1) fp32 buffer;
3. ONE ``all_reduce`` of that buffer when torch.distributed is initialised (``group`` or the default group);
4. SOHO's momentum update with Laplace smoothing (:func:`vlcore.reference.vq.ema_update`) at momentum
   gamma_t = min(momentum, momentum * t / momentum_warmup_steps) for the t-th update; the default
   ``momentum_warmup_steps = momentum / 0.4`` reproduces SOHO's intended min(0.4 t, 0.99) (its release never
   applied the schedule because of a bug);
5. dead-entry restart (SOHO never restarts: unused entries decay to 0): entries whose EMA count is below
   ``dead_code_threshold`` are replaced by the batch features the dictionary currently represents worst (the
   largest assignment distances, ties to the earliest feature in rank order). Each rank proposes its local
   top candidates, one all_gather shares them and every rank picks the same global top — so all ranks restart
   identically, and the result equals a single process on the concatenated batch. Whether to restart depends
   only on all-reduced state, so every rank enters the collective or none does (no hang).

The output's codebook values are those after the momentum update (as SOHO's release), before the restart.
With ``distance="cosine"`` the statistics are taken on the L2-normalised features (spherical k-means update).
Optional k-means initialisation (``kmeans_init=True``) runs Lloyd's iterations on the first training batch with
all-reduced statistics, from a uniform sample of the global batch chosen identically on every rank.
On the first training step under torch.distributed, rank 0's state is broadcast once, so ranks that were
constructed with different random seeds still agree.

Usage statistics for logging: ``perplexity`` (of the last batch's assignment; global in training) and
``dead_codes`` (entries below the threshold at the last update), as tensors (no device sync) or via
:meth:`usage` as floats.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlcore import _validate as V
from vlcore.ops import vq as vq_ops
from vlcore.reference import vq as ref

_NAME = "vlcore.nn.VisualDictionary"
_FP32_STATE = ("codebook", "ema_counts", "ema_sums", "perplexity")


class VisualDictionary(nn.Module):
    """K-entry visual dictionary with EMA updates (see the module docstring for the algorithm).

    forward(x (..., dim)) -> (quantized (..., dim) in x's dtype, indices int64 (...))
    """

    def __init__(self, num_codes: int = 2048, dim: int = 768, momentum: float = 0.99,
                 momentum_warmup_steps: float | None = None, eps: float = 1e-5, dead_code_threshold: float = 1.0,
                 distance: str = "l2", kmeans_init: bool = False, kmeans_iters: int = 10, group=None,
                 backend: str | None = None, seed: int = 0):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"{_NAME}: num_codes and dim must be positive; got num_codes={num_codes}, dim={dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{_NAME}: momentum must lie in [0, 1); got {momentum}")
        if distance not in ref.DISTANCES:
            raise ValueError(f"{_NAME}: distance must be one of {ref.DISTANCES}; got {distance!r}")
        if dead_code_threshold < 0 or eps <= 0:
            raise ValueError(f"{_NAME}: need dead_code_threshold >= 0 and eps > 0; got {dead_code_threshold}, {eps}")
        self.num_codes, self.dim, self.distance = num_codes, dim, distance
        self.momentum, self.eps, self.dead_code_threshold = float(momentum), float(eps), float(dead_code_threshold)
        # momentum / 0.4 makes gamma_t = min(0.4 t, momentum): SOHO's intended schedule.
        self.momentum_warmup_steps = momentum / 0.4 if momentum_warmup_steps is None else float(momentum_warmup_steps)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.group, self.backend, self.seed = group, backend, seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("codebook", torch.randn(num_codes, dim, generator=gen))  # SOHO: normal init
        self.register_buffer("ema_counts", torch.zeros(num_codes))
        self.register_buffer("ema_sums", torch.zeros(num_codes, dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("dead_codes", torch.zeros((), dtype=torch.int64), persistent=False)
        self._synced = False

    # The dictionary state stays fp32 under .half()/.to(bf16): keep the exact fp32 values, follow the device.
    def _apply(self, fn, *args, **kwargs):
        saved = {n: self._buffers[n] for n in _FP32_STATE}
        out = super()._apply(fn, *args, **kwargs)
        for n, old in saved.items():
            new = self._buffers[n]
            if new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device, dtype=torch.float32)
        return out

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, momentum={self.momentum}, "
                f"momentum_warmup_steps={self.momentum_warmup_steps:g}, eps={self.eps}, "
                f"dead_code_threshold={self.dead_code_threshold}, distance={self.distance!r}")

    def current_momentum(self, step: int | None = None) -> float:
        """gamma_t for update number t (default: the next update)."""
        t = int(self.step) + 1 if step is None else step
        return ref.momentum_at(t, self.momentum, self.momentum_warmup_steps)

    def usage(self) -> dict[str, float]:
        return {"perplexity": float(self.perplexity), "dead_codes": float(self.dead_codes)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        V.tensor(_NAME, "x", x, dtypes=V.FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{_NAME}: `x` must have shape (..., {self.dim}); got {V.describe(x)}")
        V.same_device(_NAME, "codebook", self.codebook, x=x)
        x2d = x.detach().reshape(-1, self.dim)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            if self.training:
                indices, table = self._train_step(x2d)
            else:
                indices, _ = vq_ops.vq_nearest(x2d, self.codebook, distance=self.distance, backend=self.backend)
                table = self.codebook.to(x.dtype)
                counts = torch.bincount(indices, minlength=self.num_codes).float()
                self.perplexity.copy_(_perplexity(counts))
        quantized = _StraightThrough.apply(x, table, indices)
        return quantized, indices.reshape(x.shape[:-1])

    # ---- training step ---------------------------------------------------------------------------------

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def _train_step(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._synced:
            self._broadcast_state()
        if not bool(self.initialized):
            self._kmeans(x2d)
        backend = vq_ops.choose_backend(x2d, self.backend).name
        indices, dist2 = vq_ops.vq_nearest(x2d, self.codebook, distance=self.distance, backend=backend)
        feats = self._stat_features(x2d)
        packed = vq_ops.vq_statistics_packed(feats, indices, self.num_codes, backend=backend).float()
        if self._world() > 1:
            dist.all_reduce(packed, group=self.group)  # the one collective of K x (D + 1) values
        self.step += 1
        gamma = self.current_momentum(int(self.step))
        update_backend = vq_ops.choose_backend(self.codebook, backend).impl()
        update_backend.ema_update(self.codebook, self.ema_counts, self.ema_sums, packed, gamma, self.eps)
        table = self.codebook.to(x2d.dtype, copy=True)  # the output's entries: after the update, before restarts
        self.perplexity.copy_(_perplexity(packed[:, -1]))
        dead = self.ema_counts < self.dead_code_threshold
        self.dead_codes.copy_(dead.sum())
        n_dead = int(self.dead_codes)  # identical on every rank: computed from all-reduced state
        if n_dead:
            self._restart(dead.nonzero().squeeze(1), feats, dist2.float())
        return indices, table

    def _stat_features(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.distance == "cosine":
            return F.normalize(x2d.float(), dim=1, eps=ref.NORMALIZE_EPS)
        return x2d

    def _restart(self, dead: torch.Tensor, feats: torch.Tensor, priority: torch.Tensor) -> None:
        """Dead entries (ascending) <- the global batch features with the largest assignment distance."""
        chosen = self._select_global(feats.float(), priority, dead.numel())
        m = chosen.shape[0]
        if m == 0:
            return
        rows = dead[:m]
        count = max(self.dead_code_threshold, self.eps)
        self.codebook[rows] = chosen
        self.ema_sums[rows] = chosen * count
        self.ema_counts[rows] = count

    def _select_global(self, feats: torch.Tensor, priority: torch.Tensor, want: int) -> torch.Tensor:
        """The ``want`` rows of the global batch with the highest priority (ties: earliest in rank order),
        identical on every rank: one all_gather of (want, D + 2) candidates per rank."""
        d = feats.shape[1]
        local = torch.sort(priority, descending=True, stable=True).indices[:want]
        cand = feats.new_zeros(want, d + 2)
        cand[: local.numel(), :d] = feats[local]
        cand[: local.numel(), d] = priority[local]
        cand[: local.numel(), d + 1] = 1.0  # valid row (a rank may hold fewer than `want` features)
        world = self._world()
        if world > 1:
            parts = [torch.empty_like(cand) for _ in range(world)]
            dist.all_gather(parts, cand, group=self.group)
            cand = torch.cat(parts)
        cand = cand[cand[:, d + 1] > 0]
        top = torch.sort(cand[:, d], descending=True, stable=True).indices[:want]
        return cand[top, :d]

    def _kmeans(self, x2d: torch.Tensor) -> None:
        """Lloyd's k-means on the global first batch (all-reduced statistics), from a uniform global sample."""
        feats = self._stat_features(x2d).float()
        rank = dist.get_rank(self.group) if self._world() > 1 else 0
        gen = torch.Generator(device=feats.device).manual_seed(self.seed * 1_000_003 + rank)
        keys = torch.rand(feats.shape[0], generator=gen, device=feats.device)
        start = self._select_global(feats, keys, self.num_codes)
        centroids = self.codebook.clone()
        centroids[: start.shape[0]] = start
        packed = None
        for _ in range(max(1, self.kmeans_iters)):
            idx, _ = vq_ops.vq_nearest(feats, centroids, distance=self.distance, backend=self.backend)
            packed = vq_ops.vq_statistics_packed(feats, idx, self.num_codes, backend=self.backend).float()
            if self._world() > 1:
                dist.all_reduce(packed, group=self.group)
            counts, sums = vq_ops.unpack_statistics(packed)
            means = sums / counts.clamp_min(1).unsqueeze(1)
            centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
        counts, sums = vq_ops.unpack_statistics(packed)
        self.codebook.copy_(centroids)
        self.ema_counts.copy_(counts)
        self.ema_sums.copy_(sums)
        self.initialized.fill_(True)

    def _broadcast_state(self) -> None:
        """Once per process: every rank adopts the group's first rank's state (a single broadcast)."""
        self._synced = True
        if self._world() <= 1:
            return
        # float64: the fp32 state is exact in it, and so is the step count (beyond fp32's 2^24)
        parts = (self.codebook.flatten(), self.ema_counts, self.ema_sums.flatten(), self.step.reshape(1),
                 self.initialized.reshape(1))
        flat = torch.cat([p.double() for p in parts])
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(flat, src=src, group=self.group)
        k, d = self.num_codes, self.dim
        self.codebook.copy_(flat[: k * d].view(k, d))
        self.ema_counts.copy_(flat[k * d: k * d + k])
        self.ema_sums.copy_(flat[k * d + k: 2 * k * d + k].view(k, d))
        self.step.fill_(int(flat[-2]))
        self.initialized.fill_(bool(flat[-1] > 0))


class _StraightThrough(torch.autograd.Function):
    """Value table[indices] (in x's dtype), gradient identity to x: SOHO's x + sg(e_h - x) without the two extra
    N x D temporaries of that expression (and without its rounding: the value is exactly the entry)."""

    @staticmethod
    def forward(ctx, x, table, indices):
        return F.embedding(indices, table).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the assignment distribution; 0 for an empty batch."""
    total = counts.sum()
    p = counts / total.clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return torch.where(total > 0, torch.exp(entropy), torch.zeros_like(entropy))


def mvm_mask(indices: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SOHO's Masked Visual Modeling mask: per sample, draw one dictionary index uniformly among the distinct
    indices present in that sample and mask ALL of its positions mapped to it (so no neighbour can leak it).

    Args:
        indices: (B, L) int dictionary indices (VisualDictionary's output for B samples of L grid features).
        generator: optional torch.Generator on indices' device, for reproducible draws.
    Returns:
        (mask bool (B, L), chosen index per sample int64 (B,)); the MVM targets are ``indices[mask]``.
    """
    V.tensor("vlcore.nn.mvm_mask", "indices", indices, ndim=2, dtypes=V.INDEX_DTYPES, layout="(B, L)")
    batch, length = indices.shape
    if length == 0:
        raise ValueError(f"vlcore.nn.mvm_mask: `indices` must have at least one position; got {V.describe(indices)}")
    ordered = indices.long().sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # one representative per distinct index
    keys = torch.rand(batch, length, generator=generator, device=indices.device)
    keys = torch.where(first, keys, torch.full_like(keys, -1.0))
    chosen = ordered.gather(1, keys.argmax(dim=1, keepdim=True)).squeeze(1)
    return indices.long() == chosen.unsqueeze(1), chosen


__all__ = ["VisualDictionary", "mvm_mask"]
