"""Classification heads on a joint image–text representation: VQA, visual entailment, NLVR², VCR.

* VQA (Antol et al., 2015; as UNITER / ViLT fine-tune it): an MLP over the answer vocabulary trained with binary
  cross-entropy against *soft* VQA scores, score(a) = the official accuracy of answering a given the 10 human
  answers (the mean over the 10 leave-one-out subsets of min(1, #matches / 3)).
* Visual entailment (SNLI-VE): 3-way (entailment / neutral / contradiction) MLP, cross-entropy.
* NLVR²: (image_left, sentence) and (image_right, sentence) are encoded separately; the two joint vectors are
  concatenated into a binary classifier (the "pair" setting of UNITER / ViLT).
* VCR: each of K options is appended to the question and scored by a linear layer on its joint vector;
  cross-entropy over the K options (Q→A and QA→R alike).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.nn.heads import MLPHead


def vqa_soft_targets(answers: torch.Tensor, num_answers: int) -> torch.Tensor:
    """(B, A) soft targets from annotator answers (B, K) long (negative = missing) or one answer (B,) (one-hot).

    Per answer a given by n of the K annotators: (1/K)·Σ_k min(1, (n − [annotator k said a]) / 3), i.e.
    ((K − n)·min(1, n/3) + n·min(1, (n − 1)/3)) / K — the official VQA accuracy of predicting a.
    """
    if answers.dim() == 1:
        return F.one_hot(answers.long(), num_answers).float()
    valid = answers >= 0
    k = valid.sum(1, keepdim=True).clamp(min=1).float()
    counts = torch.zeros(answers.shape[0], num_answers, device=answers.device)
    counts.scatter_add_(1, answers.clamp(min=0).long(), valid.float())
    return ((k - counts) * (counts / 3).clamp(max=1) + counts * ((counts - 1) / 3).clamp(min=0, max=1)) / k


def vqa_accuracy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean VQA score of the top answer."""
    return soft_targets.gather(1, logits.argmax(-1, keepdim=True)).mean()


class VQAHead(nn.Module):
    """forward(joint (B, D)) -> answer logits (B, A); loss(logits, soft targets (B, A)) -> BCE (sum over answers,
    mean over the batch, as UNITER/ViLT scale it)."""

    def __init__(self, dim: int, num_answers: int, hidden: int | None = None):
        super().__init__()
        self.num_answers = num_answers
        self.mlp = MLPHead(dim, num_answers, hidden or 2 * dim, norm=True)

    def forward(self, joint: torch.Tensor) -> torch.Tensor:
        return self.mlp(joint)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 1 or targets.dtype == torch.long:
            targets = vqa_soft_targets(targets, self.num_answers)
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]


class EntailmentHead(nn.Module):
    """forward(joint (B, D)) -> (B, 3) logits (entailment, neutral, contradiction); loss = cross-entropy."""

    def __init__(self, dim: int, num_classes: int = 3):
        super().__init__()
        self.mlp = MLPHead(dim, num_classes, 2 * dim, norm=True)

    def forward(self, joint: torch.Tensor) -> torch.Tensor:
        return self.mlp(joint)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


class NLVR2Head(nn.Module):
    """forward(joint_left (B, D), joint_right (B, D)) -> (B, 2) logits (false, true); loss = cross-entropy."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = MLPHead(2 * dim, 2, 2 * dim, norm=True)

    def forward(self, joint_left: torch.Tensor, joint_right: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([joint_left, joint_right], dim=-1))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.long())


class MultipleChoiceHead(nn.Module):
    """VCR: forward(joint (B, K, D)) -> option scores (B, K); loss(scores, answer (B,)) = cross-entropy over K."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = MLPHead(dim, 1, dim, norm=True)

    def forward(self, joint: torch.Tensor) -> torch.Tensor:
        return self.mlp(joint).squeeze(-1)

    def loss(self, scores: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores.float(), answer)

    @staticmethod
    def option_inputs(question: torch.Tensor, question_mask: torch.Tensor, options: torch.Tensor,
                      options_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate BOS question EOS with each option's tokens (its BOS dropped): (B*K, Tq + To - 1) + mask,
        valid tokens packed to the front (the layout of the batch contract)."""
        b, k, to = options.shape
        q = question[:, None].expand(-1, k, -1)
        qm = question_mask.bool()[:, None].expand(-1, k, -1)
        seq = torch.cat([q, options[..., 1:]], -1).reshape(b * k, -1)
        valid = torch.cat([qm, options_mask.bool()[..., 1:]], -1).reshape(b * k, -1)
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        seq, valid = seq.gather(1, order), valid.gather(1, order)
        return torch.where(valid, seq, torch.zeros_like(seq)), valid
