"""Issue #18: the tiny models must learn digits-scenes. Fast checks of the pieces that decide whether they can.

Each test runs in seconds on a CPU: unit checks of the ITM / contrastive plumbing against independent
computations, and small overfitting runs on a fixed handful of scenes (a model that cannot fit 16 scenes
cannot learn the dataset). The long measurements are in ``benchmarks/zoo_learning.py``.
"""

from __future__ import annotations

import pytest
import torch

from vlcore import models
from vlcore.data.digits_scenes import DigitsScenes, all_captions, scenes_to_arrays
from vlcore.data.loader import Collator
from vlcore.data.tokenizer import ByteBPETokenizer
from vlcore.nn.objectives import sample_negatives


@pytest.fixture(scope="module")
def tokenizer():
    return ByteBPETokenizer.train(all_captions(), vocab_size=300)


def _batch(tokenizer, n: int, start: int = 0) -> dict:
    return Collator(tokenizer, 16).from_arrays(scenes_to_arrays(DigitsScenes("train").scenes(range(start, start + n))))


def test_itm_negatives_are_uniform_over_the_other_samples():
    g = torch.Generator().manual_seed(0)
    b, draws = 5, 4000
    counts = torch.zeros(b, b)
    for _ in range(draws // b):
        j = sample_negatives(b, generator=g)
        counts[torch.arange(b), j] += 1
    assert counts.diag().sum() == 0  # never the sample itself: a "negative" that is the positive is label noise
    off = counts[~torch.eye(b, dtype=torch.bool)].view(b, b - 1) / (draws // b)
    assert torch.allclose(off, torch.full_like(off, 1 / (b - 1)), atol=0.06)


def test_vilt_itm_label_is_one_exactly_for_unswapped_images(tokenizer, monkeypatch):
    """The ITM target of each pair must say whether its image is its own: run ViLT's forward with a known swap
    and compare the loss with the cross-entropy computed from the pooled outputs of the pairs built by hand."""
    import models.vilt as vilt_module

    torch.manual_seed(0)
    m = models.create("vilt-tiny", vocab_size=tokenizer.vocab_size, image_size=64, max_text_len=16,
                      mlm_weight=0.0, wpa_weight=0.0)
    batch = _batch(tokenizer, 6)
    swap = torch.tensor([True, False, True, False, False, True])
    other = torch.tensor([3, 0, 4, 1, 2, 0])
    monkeypatch.setattr(vilt_module, "sample_negatives", lambda b, device=None: other)
    real_rand = torch.rand

    def rand(*size, **kw):  # the (B,) draw that decides the swaps; every other draw stays random
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return torch.where(swap, 0.1, 0.9) if shape == (6,) else real_rand(*size, **kw)

    monkeypatch.setattr(torch, "rand", rand)
    loss = m(batch)["itm"]
    monkeypatch.undo()
    images = torch.where(swap[:, None, None, None], batch["image"][other], batch["image"])
    logits = m.itm_head(m.fuse(images, batch["text"], batch["text_mask"].bool())[2]).float()
    expected = torch.nn.functional.cross_entropy(logits, (~swap).long())
    torch.testing.assert_close(loss, expected)


def test_xvlm_score_is_the_itm_log_odds_of_the_cross_encoder(tokenizer):
    torch.manual_seed(0)
    m = models.create("xvlm-tiny", vocab_size=tokenizer.vocab_size, image_size=64, max_text_len=16).eval()
    b = _batch(tokenizer, 4)
    seen = []
    handle = m.itm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    s = m.score(b["image"], b["text"], b["text_mask"])
    handle.remove()
    assert s.shape == (4,)
    torch.testing.assert_close(s, (seen[0][:, 1] - seen[0][:, 0]).float())
    # the score of a pair does not depend on the other pairs of the batch
    torch.testing.assert_close(m.score(b["image"][:1], b["text"][:1], b["text_mask"][:1]), s[:1], rtol=1e-4, atol=1e-5)


def test_vilt_patch_stem_default_is_the_papers_linear_projection():
    assert models.get_config("vilt-b32").patch_stem == "linear"
    m = models.create("vilt-tiny", vocab_size=300, patch_stem="conv")
    x = torch.randn(2, 3, 64, 64)
    assert m.patch_embed(x).shape == models.create("vilt-tiny", vocab_size=300, patch_stem="linear").patch_embed(x).shape


def _distinct_scenes(tokenizer, n: int) -> dict:
    """``n`` training scenes with pairwise distinct captions (so each image has exactly one right text)."""
    ds, seen, scenes, i = DigitsScenes("train"), set(), [], 0
    while len(scenes) < n:
        s = ds.scene(i)
        i += 1
        if s.caption not in seen:
            seen.add(s.caption)
            scenes.append(s)
    return Collator(tokenizer, 16).from_arrays(scenes_to_arrays(scenes))


@pytest.mark.parametrize("name", ["align-tiny", "mural-tiny"])
def test_dual_encoder_fits_a_few_scenes(tokenizer, name):
    """Contrastive training on 8 fixed scenes with distinct captions must make each image retrieve its own
    caption far above chance (1/8): the towers, the loss and its temperature work together (~3 s of CPU).

    Measured in train mode (BatchNorm batch statistics): after 30 fast steps the running statistics still lag
    the weights (eval mode was at chance, 12 %, train mode at 75 %, in-batch loss 0.41).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only add synchronisation on a shared CPU
    try:
        acc = _fit_dual_encoder(name, tokenizer)
    finally:
        torch.set_num_threads(threads)
    assert acc >= 0.6, f"{name}: in-batch image->text accuracy {acc:.2f} after fitting 8 scenes"


def _fit_dual_encoder(name: str, tokenizer) -> float:
    torch.manual_seed(0)
    m = models.create(name, vocab_size=tokenizer.vocab_size, image_size=64, max_text_len=16)
    m.contrastive.backend = "cpu"  # the test session may enable the Triton interpreter; this test is about learning
    batch = _distinct_scenes(tokenizer, 8)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(30):
        loss = m(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sim = m.encode_image(batch["image"]) @ m.encode_text(batch["text"], batch["text_mask"]).T
    return (sim.argmax(1) == torch.arange(8)).float().mean().item()
