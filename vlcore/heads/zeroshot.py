"""Zero-shot classification with prompt templates (CLIP / ALIGN protocol).

Each class name is written into every template ("a photo of a {}."), the prompts are encoded with the model's
``encode_text``, L2-normalised, averaged over templates and normalised again: one weight vector per class.
An image is assigned the class whose weight has the largest cosine with ``encode_image(image)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tokenize = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.")


class ZeroShotClassifier:
    """weights (C, E) unit vectors; ``logits(image_emb)`` / ``predict(model, images)``."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    @classmethod
    @torch.no_grad()
    def from_model(cls, model, class_names: Sequence[str], tokenize: Tokenize,
                   templates: Sequence[str] = DEFAULT_TEMPLATES) -> ZeroShotClassifier:
        """``tokenize(list of strings) -> (ids (N, T), mask (N, T))`` in the batch-contract layout."""
        if not templates or not class_names:
            raise ValueError("ZeroShotClassifier: need at least one class name and one template")
        prompts = [t.format(name) for name in class_names for t in templates]
        ids, mask = tokenize(prompts)
        device = next(model.parameters()).device
        emb = F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1)
        emb = emb.view(len(class_names), len(templates), -1).mean(1)
        return cls(F.normalize(emb, dim=-1))

    def logits(self, image_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_emb.float(), dim=-1) @ self.weights.T.to(image_emb.device)

    @torch.no_grad()
    def predict(self, model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self.logits(model.encode_image(images[i:i + batch_size])).argmax(-1)
                          for i in range(0, len(images), batch_size)])
