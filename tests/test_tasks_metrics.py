"""Each downstream metric against values computed by hand (the arithmetic is written out beside each)."""

import math

import pytest
import torch

from vlcore.eval import metrics as M


def test_vqa_score_hand_values():
    answers = ["two"] * 7 + ["2"] * 3
    # "2": 3 subsets (an annotator of "2" left out) see 2 matches -> 2/3, the 7 others see 3 -> 1: (2 + 7) / 10
    assert M.vqa_score("2", answers) == pytest.approx(0.9)
    assert M.vqa_score("two", answers) == pytest.approx(1.0)  # every subset has >= 6 matches
    assert M.vqa_score("3", answers) == 0.0
    # one match: 9 subsets see 1 -> 1/3, the subset without it sees 0: 9 * (1/3) / 10 = 0.3
    assert M.vqa_score("x", ["x"] + ["y"] * 9) == pytest.approx(0.3)


def test_vqa_score_matches_the_heads_soft_targets():
    from vlcore.heads import vqa_soft_targets

    answers = torch.tensor([[0] * 7 + [1] * 3, [2] + [3] * 9])
    soft = vqa_soft_targets(answers, 4)
    for row, a in zip(soft, answers.tolist()):
        assert [M.vqa_score(k, a) for k in range(4)] == pytest.approx(row.tolist())


def test_accuracy_and_box_acc():
    assert M.accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    # second box shifted right by half its width: intersection 0.1*0.2 = 0.02, union 0.04 + 0.04 - 0.02 = 0.06
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])
    out = M.box_acc_at(pred, target)
    assert out["acc@0.5"] == 0.5 and out["mean_iou"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-5)


def test_recall_at_k_hand_values():
    # image 0 ranks its text first; image 1 ranks its text third; image 2 second
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.0, 0.7], [0.3, 0.6, 0.5]])
    r = M.recall_at_k(sim, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r2"] == pytest.approx(200 / 3)
    # text 0: column (0.9, 0.8, 0.3) rank 1; text 1: (0.1, 0.0, 0.6) image 1 is last; text 2: (0.2, 0.7, 0.5) rank 2
    assert r["t2i_r1"] == pytest.approx(100 / 3) and r["t2i_r2"] == pytest.approx(200 / 3)


def test_bleu4_hand_value():
    assert M.bleu4(["a b c d e"], [["a b c d e"]]) == pytest.approx(1.0)
    # p1..p4 = 5/6, 4/5, 3/4, 2/3, same length (no brevity penalty): (1/3) ** (1/4)
    assert M.bleu4(["a b c d e f"], [["a b c d e g", "q"]]) == pytest.approx((1 / 3) ** 0.25)
    # brevity: hypothesis of 4 words, closest reference 8 words -> BP = exp(1 - 8/4)
    assert M.bleu4(["a b c d"], [["a b c d e f g h"]]) == pytest.approx(math.exp(-1))


def test_cider_hand_value():
    # two images, one reference each; idf of every reference n-gram is log(2) - log(1) = log 2.
    # image 1: hypothesis == reference: unigram and bigram cosines 1, no 3/4-grams: 10 * (1 + 1) / 4 = 5
    # image 2: "c e" vs "c d": unigram cosine (log2 * log2) / (sqrt2 log2 * sqrt2 log2) = 1/2 ("e" has df 0 -> idf
    #          log 2 too), bigram 0: 10 * 0.5 / 4 = 1.25;  CIDEr = (5 + 1.25) / 2
    assert M.cider(["a b", "c e"], [["a b"], ["c d"]]) == pytest.approx(3.125)
    # the gaussian length penalty: a 3-word hypothesis against a 2-word reference (one bigram more)
    assert M.cider(["a b", "c d d"], [["a b"], ["c d"]]) < M.cider(["a b", "c d"], [["a b"], ["c d"]])


def test_cider_without_pycocoevalcap_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)  # an import of it now fails
    with pytest.raises(ImportError, match="pycocoevalcap"):
        M.cider(["a b"], [["a b"]])


def test_caption_tokens():
    assert M.caption_tokens("A Dog, running.") == ["a", "dog", "running"]
