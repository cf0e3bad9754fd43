"""Initialise a vlcore model's towers from local checkpoint files (``vlcore pretrain --init-vision PATH`` /
``--init-text PATH``).

A checkpoint is a file (``.safetensors``, or a torch pickle ``.pt`` / ``.pth`` / ``.bin`` read with
``weights_only=True``) or a folder holding ``model.safetensors`` or ``pytorch_model.bin`` (a Hugging Face
snapshot, a timm ``save_pretrained`` folder). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vlcore.integrations import timm as timm_weights
from vlcore.integrations._bert import bert_state_dict
from vlcore.nn.swin import SwinEncoder
from vlcore.nn.text import TextEncoder
from vlcore.nn.vit import ViT

_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint file or folder (unwrapping a ``{"state_dict": ...}`` / ``{"model": ...}``)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in _FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"checkpoint folder {path} holds none of {list(_FOLDER_FILES)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: expected a mapping of names to tensors; got {type(state).__name__}")
    return dict(state)


def init_vision(model: nn.Module, path: str | Path) -> str:
    """Load a timm ViT / Swin checkpoint into ``model.vision`` (a vlcore ViT or SwinEncoder); returns a
    one-line summary. Raises naming the first key that does not map."""
    tower = getattr(model, "vision", None)
    state = read_state_dict(path)
    if isinstance(tower, ViT):
        tower.load_state_dict(timm_weights.vit_state_dict(state, tower))
    elif isinstance(tower, SwinEncoder):
        tower.load_state_dict(timm_weights.swin_state_dict(state, tower))
    else:
        raise ValueError(f"--init-vision: {type(model).__name__} has no vlcore ViT / SwinEncoder at `.vision` "
                         f"(found {type(tower).__name__}); models with one: coca, xvlm, ...")
    return f"vision tower ({type(tower).__name__}) initialised from {path} ({len(state)} tensors)"


def init_text(model: nn.Module, path: str | Path) -> str:
    """Load a BERT checkpoint (``BertModel`` / ``BertFor*``) into ``model.text_encoder``, a vlcore TextEncoder
    built with BERT's post-norm layers (ALIGN / MURAL: ``--set text_post_norm=true``); returns a one-line
    summary. A position table longer than the model's ``max_text_len`` keeps its first rows (absolute
    positions: exact for every text the model accepts). A word-embedding table of another vocabulary size
    (BERT's WordPiece ids are not the run's tokenizer's) is not loaded: the model keeps its own, and the
    summary says so. Raises naming the first key that does not map."""
    tower = getattr(model, "text_encoder", None)
    if not isinstance(tower, TextEncoder):
        raise ValueError(f"--init-text: {type(model).__name__} has no vlcore TextEncoder at `.text_encoder` "
                         f"(found {type(tower).__name__}); models with one: align, mural")
    if not tower.blocks.layers[0].post_norm:
        raise ValueError(f"--init-text: a BERT checkpoint needs BERT's post-norm text layers; {type(model).__name__}"
                         f"'s are pre-norm: add --set text_post_norm=true")
    state = read_state_dict(path)
    rows, vocab = tower.embeddings.positions.num_embeddings, tower.embeddings.tokens.num_embeddings
    note = ""
    for prefix in ("", "bert."):
        key = f"{prefix}embeddings.position_embeddings.weight"
        if key in state and state[key].shape[0] > rows:
            note += f", position table cut from {state[key].shape[0]} to {rows} rows"
            state[key] = state[key][:rows]
        key = f"{prefix}embeddings.word_embeddings.weight"
        if key in state and state[key].shape[0] != vocab:
            note += (f", word embeddings NOT loaded (checkpoint vocabulary {state[key].shape[0]}, the run's "
                     f"tokenizer {vocab}: the model keeps its own)")
            state[key] = tower.embeddings.tokens.weight.detach().clone()
    tower.load_state_dict(bert_state_dict(state, tower))
    return f"text tower (TextEncoder) initialised from {path} ({len(state)} tensors{note})"
