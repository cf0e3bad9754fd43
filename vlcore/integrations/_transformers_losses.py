"""transformers' ``CLIPModel`` / ``SiglipModel`` losses on :func:`vlcore.contrastive_loss` (part of
``vlcore.integrations.transformers.apply``): only ``__class__`` is swapped, for a subclass whose ``forward``
runs the model without its loss and computes ``loss`` from the normalised embeddings through vlcore's op —
CLIP's InfoNCE (mean of both directions) or SigLIP's sigmoid loss with its bias; the same value and
gradients as transformers' in a single process. Inside an initialised torch.distributed group the loss is
the global-batch one (vlcore gathers the features; see :func:`vlcore.contrastive_loss`), where transformers'
own is the local batch's.
"""

from __future__ import annotations

from transformers import CLIPModel, SiglipModel

import vlcore


class _VlcoreLoss:
    kind = "infonce"

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                return_loss=None, **kwargs):
        if not return_loss or kwargs.get("return_dict") is False:
            return super().forward(input_ids, pixel_values, attention_mask, position_ids, return_loss, **kwargs)
        out = super().forward(input_ids, pixel_values, attention_mask, position_ids, False, **kwargs)
        scale = self.logit_scale.exp()
        bias = self.logit_bias if self.kind == "siglip" else None
        out.loss = vlcore.contrastive_loss(out.image_embeds, out.text_embeds, scale, kind=self.kind, logit_bias=bias)
        return out


class VlcoreCLIPModel(_VlcoreLoss, CLIPModel):
    """``CLIPModel`` whose ``loss`` (``return_loss=True``) is vlcore's InfoNCE."""


class VlcoreSiglipModel(_VlcoreLoss, SiglipModel):
    """``SiglipModel`` whose ``loss`` is vlcore's sigmoid loss."""

    kind = "siglip"


PATCHES = {CLIPModel: VlcoreCLIPModel, SiglipModel: VlcoreSiglipModel}
