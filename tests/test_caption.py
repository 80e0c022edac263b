"""Caption network: vocabulary, BLEU-4 by hand, token accuracy, overfitting four pictures."""

from __future__ import annotations

import math
import time

import pytest
import torch

from medsight.models.caption import (
    BOS,
    EOS,
    PAD,
    UNK,
    CaptionNet,
    Vocabulary,
    bleu4,
    caption_scores,
    token_accuracy,
)


def test_vocabulary_round_trip_and_unknown_words():
    sentences = ["The anterior hippocampus lies on the right; it is large; one piece.", "a small, dark spot"]
    vocab = Vocabulary.build(sentences)
    ids = vocab.encode(sentences[0])
    assert ids[0] == BOS and ids[-1] == EOS and UNK not in ids
    assert vocab.decode(ids) == "the anterior hippocampus lies on the right; it is large; one piece."
    assert vocab.decode(vocab.encode(sentences[1])) == "a small, dark spot"
    assert vocab.encode("a purple spot")[1:-1] == [vocab.index["a"], UNK, vocab.index["spot"]]
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again.words == vocab.words
    batch = vocab.batch(sentences)
    assert batch.shape == (2, len(ids)) and batch[1, -1] == PAD
    assert vocab.batch(sentences, max_len=5)[0].tolist()[-1] == EOS


def test_bleu4_hand_computed_corpus():
    # pair 1: p1 5/6, p2 3/5, p3 1/4, p4 0/3; pair 2 (closest reference length 3): 4/4, 3/3, 2/2, 1/1
    # corpus: 9/10, 6/8, 3/6, 1/4; candidate length 10 > reference length 6 + 3: no brevity penalty
    refs = [["the cat sat on the mat"], ["a small dark spot lies here", "a dark spot"]]
    hyps = ["the cat is on the mat", "a small dark spot"]
    assert bleu4(refs, hyps) == pytest.approx((0.9 * 0.75 * 0.5 * 0.25) ** 0.25, rel=1e-12)


def test_bleu4_brevity_penalty_and_zero():
    # every n-gram matches, c = 4 < r = 6: BP = exp(1 - 6/4)
    assert bleu4([["a small dark spot lies here"]], ["a small dark spot"]) == pytest.approx(math.exp(-0.5))
    assert bleu4([["the cat sat on the mat"]], ["the cat is on the mat"]) == 0.0  # no matching 4-gram
    assert bleu4([["x y z w"]], ["x y z w"]) == pytest.approx(1.0)


def test_token_accuracy_ignores_padding():
    logits = torch.zeros(1, 4, 5)
    logits[0, [0, 1, 2, 3], [4, 2, 3, 1]] = 1.0  # predictions 4, 2, 3, 1
    targets = torch.tensor([[4, 2, 0, 0]])  # pad positions would count as wrong (3 != 0, 1 != 0)
    assert token_accuracy(logits, targets) == 1.0
    assert token_accuracy(logits, torch.tensor([[4, 1, 3, 0]])) == pytest.approx(2 / 3)


def _four_pictures():
    imgs = torch.zeros(4, 1, 32, 32)
    imgs[0, 0, 4:12, 4:12] = 1.0  # upper left
    imgs[1, 0, 20:28, 20:28] = 1.0  # lower right
    imgs[2, 0, 4:28, 14:18] = 1.0  # vertical bar
    imgs[3, 0, 14:18, 4:28] = 1.0  # horizontal bar
    sentences = [
        "a small square in the upper left",
        "a small square in the lower right",
        "a long vertical bar in the middle",
        "a long horizontal bar in the middle",
    ]
    return imgs, sentences


def test_caption_net_shapes_and_encoder_map():
    net = CaptionNet(vocab_size=11, in_channels=3, feature_channels=24)
    x = torch.randn(2, 3, 40, 28)
    assert net.encoder(x).shape == (2, 24, 10, 7)
    tokens = torch.tensor([[BOS, 5, 6, EOS], [BOS, 7, EOS, PAD]])
    loss, logits = net.loss(x, tokens)
    assert logits.shape == (2, 3, 11) and loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith("embed"))


@pytest.mark.slow
def test_caption_net_overfits_four_pictures_and_decodes_them_exactly(single_thread):
    torch.manual_seed(0)
    imgs, sentences = _four_pictures()
    vocab = Vocabulary.build(sentences)
    tokens = vocab.batch(sentences)
    net = CaptionNet(len(vocab), width=16, feature_channels=32, embed=32, hidden=64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(300):
        loss, logits = net.loss(imgs, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert time.perf_counter() - start < 60
    assert token_accuracy(logits, tokens[:, 1:]) == 1.0
    decoded = [vocab.decode(ids) for ids in net.greedy(imgs)]
    assert decoded == sentences
    assert bleu4([[s] for s in sentences], decoded) == pytest.approx(1.0)
    assert caption_scores(net, vocab, imgs, sentences, batch_size=3) == {"token_accuracy": 1.0, "bleu4": 1.0}
    assert net.training  # caption_scores restores the mode
    rebuilt = CaptionNet(**net.config)
    rebuilt.load_state_dict(net.state_dict())
    assert [vocab.decode(ids) for ids in rebuilt.greedy(imgs)] == sentences
