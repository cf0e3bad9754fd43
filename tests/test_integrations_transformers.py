"""transformers' BertModel in vlcore's TextEncoder (post-norm switch): last_hidden_state and gradients equal
BERT's at the valid positions of right-padded text (fp32). Real transformers, random weights, tiny shapes."""

import pytest
import torch

pytest.importorskip("vlcore.integrations.transformers", exc_type=ImportError,
                    reason="transformers not installed (pip install -e '.[interop]')")
import transformers  # noqa: E402

from vlcore.integrations import transformers as vtf  # noqa: E402
from vlcore.integrations._mapping import UnmappableKeyError  # noqa: E402


def _tiny_bert(**kw):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **kw)
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():  # LayerNorms and biases random too, so a swapped tensor shows
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return bert


def test_bert_equals_transformers_forward_and_gradients():
    bert = _tiny_bert()
    ours = vtf.text_encoder_from_bert(bert).eval()
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    valid = mask.bool()
    theirs_out = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    ours_out = ours(ids, valid)
    torch.testing.assert_close(ours_out[valid], theirs_out[valid], rtol=1e-5, atol=1e-5)

    w = torch.randn_like(theirs_out)
    (theirs_out[valid] * w[valid]).sum().backward()
    (ours_out[valid] * w[valid]).sum().backward()
    theirs_grad = bert.encoder.layer[0].intermediate.dense.weight.grad
    ours_grad = ours.blocks.layers[0].mlp.fc1.weight.grad
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-5)
    q = bert.encoder.layer[1].attention.self.query.weight.grad
    torch.testing.assert_close(ours.blocks.layers[1].attn.qkv.weight.grad[:32], q, rtol=1e-4, atol=1e-5)


def test_the_default_text_encoder_stays_pre_norm():
    from vlcore.nn.text import TextEncoder

    enc = TextEncoder(50, 32, 1, 2, 16)
    assert not enc.blocks.layers[0].post_norm and isinstance(enc.blocks.norm, torch.nn.LayerNorm)


def test_an_unmappable_bert_key_is_named():
    bert = _tiny_bert()
    ours = vtf.text_encoder_from_bert(bert)
    state = dict(bert.state_dict())
    state["encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 32)
    with pytest.raises(UnmappableKeyError, match="distance_embedding"):
        vtf.bert_state_dict(state, ours)


def test_relative_position_bert_is_refused_by_name():
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        vtf.text_encoder_from_bert(_tiny_bert(position_embedding_type="relative_key"))
