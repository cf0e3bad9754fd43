"""`vlcore pretrain --init-vision PATH`: a local timm checkpoint (file or folder) initialises a model's vision
tower exactly (its outputs equal timm's), and a checkpoint of another architecture fails naming a key."""

import re

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm not installed (pip install -e '.[interop]')")
import vlcore.models as models  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vlcore import cli  # noqa: E402
from vlcore.integrations._mapping import UnmappableKeyError  # noqa: E402
from vlcore.integrations.init import init_vision, read_state_dict  # noqa: E402

# coca-tiny's tower with timm's linear patch stem: 64 px, patch 8, 64 wide, 2 blocks, 2 heads, no class token
COCA = {"patch_stem": "linear"}


def _timm_vit():
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=64,
                             depth=2, num_heads=2, class_token=False, global_pool="avg", fc_norm=False,
                             num_classes=0).eval()


@pytest.mark.parametrize("as_folder", [False, True])
def test_init_vision_from_a_local_file_equals_timm(tmp_path, as_folder):
    theirs = _timm_vit()
    path = tmp_path / ("model.safetensors" if as_folder else "vit.safetensors")
    save_file(theirs.state_dict(), str(path))
    model = models.create("coca-tiny", **COCA).eval()
    summary = init_vision(model, tmp_path if as_folder else path)
    assert "ViT" in summary
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.vision(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)


def test_torch_pickles_and_wrapped_state_dicts_read(tmp_path):
    state = _timm_vit().state_dict()
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")
    assert read_state_dict(tmp_path / "ckpt.pt").keys() == state.keys()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of"):
        read_state_dict(tmp_path / "empty")


def _pretrain(tmp_path, path, run, *model_set):
    return cli.main(["pretrain", "--model", "coca-tiny", *model_set, "--steps", "1", "--batch-size", "4",
                     "--eval", "off", "--quiet", "--device", "cpu", "--init-vision", str(path),
                     "--out-dir", str(tmp_path / run)])


def test_pretrain_init_vision_and_a_mismatched_checkpoint(tmp_path, capsys):
    path = tmp_path / "vit.safetensors"
    save_file(_timm_vit().state_dict(), str(path))
    assert _pretrain(tmp_path, path, "run", "--set", "patch_stem=linear") == 0
    capsys.readouterr()
    # coca-tiny's default convolutional stem has no counterpart in a timm ViT: one line naming the key, exit 2
    assert _pretrain(tmp_path, path, "run2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"cannot map checkpoint key .patch_embed\.proj\.", err), err
    with pytest.raises(UnmappableKeyError, match=r"cannot map checkpoint key .patch_embed\.proj\."):
        cli.main(["pretrain", "--debug", "--model", "coca-tiny", "--steps", "1", "--batch-size", "4", "--eval", "off",
                  "--quiet", "--device", "cpu", "--init-vision", str(path), "--out-dir", str(tmp_path / "run3")])


# ---------------------------------------------------------------------------------------------- --init-text

ALIGN_BERT = {"text_post_norm": True}  # align-tiny's text tower with BERT's post-norm layers


def _bert_for_align_tiny(positions=40):
    """A BertModel shaped like align-tiny's text tower (1024 tokens, 64 wide, 2 layers, 2 heads, MLP 256), with
    a longer position table than its 32 positions."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.BertConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, max_position_embeddings=positions,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return bert


@pytest.mark.parametrize("as_folder", [False, True])
def test_init_text_from_a_local_bert_equals_bert(tmp_path, as_folder):
    from vlcore.integrations.init import init_text

    bert = _bert_for_align_tiny()
    path = tmp_path / ("model.safetensors" if as_folder else "bert.safetensors")
    save_file({f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}, str(path))  # BertFor* keys
    model = models.create("align-tiny", **ALIGN_BERT).eval()
    summary = init_text(model, tmp_path if as_folder else path)
    assert "cut from 40 to 32 rows" in summary
    ids = torch.randint(0, 1024, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    valid = mask.bool()
    theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model.text_encoder(ids, valid)[valid], theirs[valid], rtol=1e-5, atol=1e-5)


def test_init_text_refuses_a_pre_norm_tower_and_a_model_without_one(tmp_path):
    from vlcore.integrations.init import init_text

    path = tmp_path / "bert.safetensors"
    save_file(_bert_for_align_tiny().state_dict(), str(path))
    with pytest.raises(ValueError, match="--set text_post_norm=true"):
        init_text(models.create("align-tiny"), path)
    with pytest.raises(ValueError, match="no vlcore TextEncoder"):
        init_text(models.create("coca-tiny"), path)


def test_pretrain_init_text(tmp_path, capsys):
    path = tmp_path / "bert.safetensors"
    save_file(_bert_for_align_tiny().state_dict(), str(path))
    args = ["pretrain", "--model", "align-tiny", "--steps", "1", "--batch-size", "4", "--eval", "off", "--device",
            "cpu", "--init-text", str(path)]
    assert cli.main([*args, "--set", "text_post_norm=true", "--out-dir", str(tmp_path / "run")]) == 0
    # the run trains its own BPE (not BERT's 1024 ids): every tensor but the word embeddings is loaded
    out = capsys.readouterr().out
    assert "text tower (TextEncoder) initialised" in out and "word embeddings NOT loaded" in out, out
    assert cli.main([*args, "--quiet", "--out-dir", str(tmp_path / "run2")]) == 2  # pre-norm tower: one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set text_post_norm=true" in err, err
