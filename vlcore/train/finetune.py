"""Fine-tuning recipes: a pretrained (or fresh) model plus a task head as one module, ``TaskModel(batch) -> loss``.

The recipe follows the paper of the model where it defines one, and the model's own interface otherwise:

* VQA — classification over the answer vocabulary with binary cross-entropy against the VQA soft scores on the
  joint [CLS] vector (ViLT, X-VLM, UNITER: :class:`VQAHead`); generation of the answer after the image and the
  question as PrefixLM prefix for generative encoder-decoders (SimVLM: ``prefix_lm`` + ``generate``).
* grounding — the model's own box head where it has one (X-VLM: ``predict_box``), else :class:`BoxRegressionHead`
  on the joint vector; both trained with 5·L1 + 2·GIoU (X-VLM / TransVG).
* NLVR² — :class:`NLVR2Head` on the two (image, statement) joint vectors (the "pair" setting of ViLT/UNITER).
* VE — :class:`EntailmentHead` (3-way) on the joint vector (SOHO, UNITER); VCR — :class:`MultipleChoiceHead`
  over question + option joint vectors.
* captioning — the model's own captioning loss (CoCa / E2E-VLP: ``caption``; SimVLM: PrefixLM with an empty text
  prefix) and ``generate``; models without a decoder get a :class:`CaptionHead` over ``image_tokens``.
* retrieval — the model's own pretraining objective (ITC / ITM) on image–caption pairs, as ALIGN / ViLT / X-VLM
  fine-tune on COCO / Flickr30K.

"joint vector": ``joint_embedding`` where the model has one (fusion encoders; ALIGN/MURAL's [u, v, u·v]), else
[u, v, u·v] of ``encode_image`` / ``encode_text`` (CoCa, X-VLM: dual encoders without a pooled fusion output).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vlcore import tokens as T
from vlcore.data.digits_scenes import ANSWERS
from vlcore.data.tasks import TASKS, VE_LABELS
from vlcore.heads import (
    BoxRegressionHead,
    CaptionHead,
    EntailmentHead,
    MultipleChoiceHead,
    NLVR2Head,
    VQAHead,
    vqa_soft_targets,
)
from vlcore.nn.objectives import box_losses, token_cross_entropy

JOINT_TASKS = ("nlvr2", "ve", "vcr")


def _has_joint(model) -> bool:
    return hasattr(model, "joint_embedding") or (hasattr(model, "encode_image") and hasattr(model, "encode_text"))


def recipe(task: str, model) -> str | None:
    """The recipe ``task`` uses on ``model`` (None: the model cannot do the task)."""
    if task not in TASKS:
        raise ValueError(f"--task: expected one of {', '.join(TASKS)}, found {task!r}")
    if task == "vqa":
        if hasattr(model, "prefix_lm") and hasattr(model, "generate") and not hasattr(model, "joint_embedding"):
            return "generate"
        return "classify" if _has_joint(model) else None
    if task == "grounding":
        return "own_box" if hasattr(model, "predict_box") else ("box_head" if _has_joint(model) else None)
    if task in JOINT_TASKS:
        return "classify" if _has_joint(model) else None
    if task == "captioning":
        return "own" if hasattr(model, "generate") else ("caption_head" if hasattr(model, "image_tokens") else None)
    return "own" if _has_joint(model) or hasattr(model, "score") else None  # retrieval


def supported_tasks(model) -> list[str]:
    return [t for t in TASKS if recipe(t, model) is not None]


def _takes_regions(fn) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


class TaskModel(nn.Module):
    """``backbone`` (any registered model) + the head of ``task``; ``forward(batch)`` -> {"loss", ...}."""

    def __init__(self, task: str, backbone: nn.Module, max_text_len: int = 32):
        super().__init__()
        self.task, self.backbone = task, backbone
        self.recipe = recipe(task, backbone)
        if self.recipe is None:
            raise ValueError(f"--task {task}: {type(backbone).__name__} has none of the interfaces the task needs "
                             f"(it supports: {', '.join(supported_tasks(backbone)) or 'nothing'})")
        head: nn.Module | None = None
        if self.recipe in ("classify", "box_head"):
            dim = self._joint_dim()
            head = {"vqa": lambda: VQAHead(dim, len(ANSWERS)), "grounding": lambda: BoxRegressionHead(dim),
                    "nlvr2": lambda: NLVR2Head(dim), "ve": lambda: EntailmentHead(dim, len(VE_LABELS)),
                    "vcr": lambda: MultipleChoiceHead(dim)}[task]()
        elif self.recipe == "caption_head":
            with torch.no_grad():
                context_dim = backbone.image_tokens(self._probe_image()).shape[-1]
            vocab = getattr(getattr(backbone, "config", None), "vocab_size", None)
            if vocab is None:
                raise ValueError(f"--task captioning: {type(backbone).__name__} has no generate() and no "
                                 "config.vocab_size for a caption head")
            head = CaptionHead(context_dim, vocab, dim=64, depth=1, heads=2,
                               max_len=max_text_len)
        self.head = head

    # ---- the joint vector ---------------------------------------------------------------------------------
    def _probe_image(self) -> torch.Tensor:
        # models registered by plugins need not carry a config: their image size defaults to the data's 64
        size = int(getattr(getattr(self.backbone, "config", None), "image_size", 64))
        return torch.zeros(1, 3, size, size)

    def _joint_dim(self) -> int:
        was = self.backbone.training
        self.backbone.eval()
        text = torch.tensor([[T.BOS, T.NUM_SPECIAL + 1, T.EOS]])
        regions = {"boxes": torch.full((1, 1, 4), 0.5), "box_valid": torch.ones(1, 1, dtype=torch.bool)}
        with torch.no_grad():
            dim = self.joint(self._probe_image(), text, text != T.PAD, regions).shape[-1]
        self.backbone.train(was)
        return dim

    def joint(self, image, text, text_mask, regions: dict | None = None) -> torch.Tensor:
        m = self.backbone
        if hasattr(m, "joint_embedding"):
            extra = {}
            if regions is not None and _takes_regions(m.joint_embedding):  # region models (VinVL), no tags
                n = image.shape[0]
                extra = {**regions, "tags": torch.zeros(n, 1, dtype=torch.long, device=image.device),
                         "tags_mask": torch.zeros(n, 1, dtype=torch.bool, device=image.device)}
            return m.joint_embedding(image, text, text_mask, **extra)
        u, v = m.encode_image(image), m.encode_text(text, text_mask)
        return torch.cat([u, v, u * v], dim=-1)

    # ---- predictions (shared by the loss and the evaluation) ---------------------------------------------
    def logits(self, batch: dict, suffix: str = "") -> torch.Tensor:
        """Head output of a classification task (vqa/nlvr2/ve: logits; vcr: option scores; grounding: boxes)."""
        image, regions = batch["image"], {"boxes": batch["boxes"], "box_valid": batch["box_valid"]}
        if self.task == "grounding" and self.recipe == "own_box":
            return self.backbone.predict_box(image, batch["text"], batch["text_mask"])
        if self.task == "vcr":
            b, k = batch["options"].shape[:2]
            seq, mask = MultipleChoiceHead.option_inputs(batch["text"], batch["text_mask"], batch["options"],
                                                         batch["options_mask"])
            rep = {key: v.repeat_interleave(k, 0) for key, v in regions.items()}
            joint = self.joint(image.repeat_interleave(k, 0), seq, mask, rep)
            return self.head(joint.view(b, k, -1))
        joint = self.joint(image, batch["text"], batch["text_mask"], regions)
        if self.task == "nlvr2":
            right = self.joint(batch["image_right"], batch["text"], batch["text_mask"],
                               {"boxes": batch["boxes_right"], "box_valid": batch["box_valid_right"]})
            return self.head(joint, right)
        return self.head(joint)

    # ---- the training objective ---------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, task = self.backbone, self.task
        if task == "retrieval":
            return m(batch)
        if task == "captioning":
            if self.recipe == "caption_head":
                return {"loss": self.head.loss(m.image_tokens(batch["image"]), batch["text"], batch["text_mask"])}
            if hasattr(m, "prefix_lm"):  # SimVLM: the whole caption is the suffix (prefix = BOS)
                ones = torch.ones(batch["text"].shape[0], dtype=torch.long, device=batch["text"].device)
                logits, targets = m.prefix_lm(batch["image"], batch["text"], batch["text_mask"], ones)
                return {"loss": token_cross_entropy(logits, targets)}
            out = m(batch)
            return {"loss": out["caption"] if "caption" in out else out["loss"]}
        if task == "vqa" and self.recipe == "generate":
            logits, targets = m.prefix_lm(batch["image"], batch["qa_text"], batch["qa_text_mask"],
                                          batch["qa_prefix_lens"])
            return {"loss": token_cross_entropy(logits, targets)}
        pred = self.logits(batch)
        if task == "vqa":
            return {"loss": self.head.loss(pred, vqa_soft_targets(batch["answers"], len(ANSWERS)))}
        if task == "grounding":
            l1, giou = box_losses(pred.float(), batch["target_box"].float())
            return {"loss": 5.0 * l1 + 2.0 * giou, "box_l1": l1.detach(), "box_giou": giou.detach()}
        return {"loss": self.head.loss(pred, batch["label"])}
