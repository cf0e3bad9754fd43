"""Image–text retrieval: similarity matrices, ITM re-ranking and Recall@K.

Dual encoders rank by the cosine of ``encode_image`` / ``encode_text`` (contrastive recall); fusion models re-rank
the top-k candidates of each query with their ITM ``score`` (ALBEF / X-VLM protocol: candidates outside the
top-k keep a score below every re-ranked one), or score every pair when they have no dual encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def retrieval_metrics(sim_i2t: torch.Tensor, text_to_image: torch.Tensor, sim_t2i: torch.Tensor | None = None,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in both directions (percent) from an (images, texts) score matrix; ``text_to_image[t]`` = the image
    of text t (an image may own several texts). ``sim_t2i`` (same layout) ranks images for each text when the
    two directions were re-ranked separately. A ground truth's rank counts the candidates scored strictly
    higher; image→text uses the best-ranked of the image's texts. Also returns ``rsum``."""
    sim_t2i = sim_i2t if sim_t2i is None else sim_t2i
    n_img, n_txt = sim_i2t.shape
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"retrieval_metrics: `text_to_image` must be ({n_txt},); got {tuple(text_to_image.shape)}")
    gt = text_to_image.long().to(sim_i2t.device)
    txt = torch.arange(n_txt, device=sim_i2t.device)
    # text -> image: rank of the text's image in its column
    t2i_rank = (sim_t2i > sim_t2i[gt, txt][None, :]).sum(0)
    # image -> text: rank of each positive text in its image's row; best positive per image
    pos_score = sim_i2t[gt, txt]  # (texts,)
    rank_of_text = (sim_i2t[gt] > pos_score[:, None]).sum(1)  # rank of text t in row gt[t]
    i2t_rank = torch.full((n_img,), n_txt, dtype=torch.long, device=sim_i2t.device)
    i2t_rank = i2t_rank.scatter_reduce(0, gt, rank_of_text, reduce="amin")
    has_text = torch.zeros(n_img, dtype=torch.bool, device=sim_i2t.device).scatter(0, gt, True)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank[has_text] < k).float().mean())
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["rsum"] = sum(out.values())
    return out


@torch.no_grad()
def similarity_matrix(model, images: torch.Tensor, texts: torch.Tensor, text_mask: torch.Tensor,
                      batch_size: int = 64) -> torch.Tensor:
    """(images, texts) scores: cosine of the dual embeddings if the model has ``encode_image``, else the
    model's ``score`` on every pair (batched)."""
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        img = torch.cat([model.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        txt = torch.cat([model.encode_text(texts[i:i + batch_size], text_mask[i:i + batch_size])
                         for i in range(0, len(texts), batch_size)])
        return img.float() @ txt.float().T
    n_img, n_txt = images.shape[0], texts.shape[0]
    ii = torch.arange(n_img).repeat_interleave(n_txt)
    tt = torch.arange(n_txt).repeat(n_img)
    scores = [model.score(images[ii[s:s + batch_size]], texts[tt[s:s + batch_size]], text_mask[tt[s:s + batch_size]])
              for s in range(0, n_img * n_txt, batch_size)]
    return torch.cat(scores).float().view(n_img, n_txt)


@torch.no_grad()
def rerank_with_itm(sim: torch.Tensor, score_fn: ScoreFn, images: torch.Tensor, texts: torch.Tensor,
                    text_mask: torch.Tensor, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim_i2t, sim_t2i): for every image its top-k texts by ``sim`` (and for every text its top-k images) are
    re-scored with ``score_fn(images, texts, text_mask)`` (ITM); the others get min(ITM scores) − 1 − their
    rank-order-preserving share of the contrastive score, so they stay below every re-ranked candidate."""
    n_img, n_txt = sim.shape
    out = []
    for transpose in (False, True):
        s = sim.T if transpose else sim
        kk = min(k, s.shape[1])
        top = s.topk(kk, dim=1).indices  # (Q, kk)
        q = torch.arange(s.shape[0]).repeat_interleave(kk)
        c = top.reshape(-1).cpu()
        img_idx, txt_idx = (c, q) if transpose else (q, c)
        itm = score_fn(images[img_idx], texts[txt_idx], text_mask[txt_idx]).float().cpu().view(-1, kk)
        floor = itm.min() - 1.0
        # below the floor, ordered by the contrastive score (squashed into (0, 1))
        new = floor - 1.0 + torch.sigmoid(s.float().cpu())
        new.scatter_(1, top.cpu(), itm)
        out.append(new.T if transpose else new)
    return out[0].to(sim.device), out[1].to(sim.device)
