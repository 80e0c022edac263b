"""Image-description (captioning) network whose encoder feeds the super-resolution semantic branch.

- :class:`Vocabulary`: word-level, built from the training sentences; ids ``<pad>=0, <bos>=1,
  <eos>=2, <unk>=3``; words are lower-cased runs of letters/digits (with inner ``-`` or ``'``) and
  every punctuation mark is its own token, so ``decode(encode(s))`` gives ``s`` back in normal form.
- :class:`CaptionEncoder`: a small CNN (stride 4). Its output ``(B, feature_channels, H/4, W/4)``
  is the semantic map :class:`medsight.models.sr.SRNetwork` consumes.
- :class:`CaptionNet`: encoder + GRU decoder. The decoder sees the feature map average-pooled to a
  4x4 grid and flattened (so *where* things are survives, which whole-image pooling would lose):
  it sets the initial state and is fed, with the previous word, at every step. Trained with
  teacher forcing (:meth:`CaptionNet.loss`, cross-entropy ignoring ``<pad>``); :meth:`CaptionNet.greedy`
  decodes.
- :func:`bleu4`: corpus BLEU-4 (Papineni et al. 2002): clipped n-gram precisions summed over the
  corpus, uniform geometric mean of n = 1..4, brevity penalty ``exp(1 - r/c)`` when the candidate
  length ``c`` is below the effective reference length ``r`` (per sentence the reference length
  closest to the candidate's, the shorter on a tie). No smoothing: a corpus without any matching
  4-gram scores 0. :func:`token_accuracy`: teacher-forced next-word accuracy over non-pad targets.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")
_NO_SPACE_BEFORE = set(",.;:!?)")

__all__ = ["CaptionEncoder", "CaptionNet", "Vocabulary", "bleu4", "caption_scores", "token_accuracy"]


class Vocabulary:
    """Word <-> id mapping built from training sentences (words seen fewer than ``min_count`` times -> <unk>)."""

    def __init__(self, words: Sequence[str]):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}

    @staticmethod
    def tokenize(sentence: str) -> list[str]:
        return _TOKEN.findall(sentence.lower())

    @staticmethod
    def detokenize(tokens: Iterable[str]) -> str:
        out = ""
        for tok in tokens:
            out += tok if (not out or tok in _NO_SPACE_BEFORE) else " " + tok
        return out

    @classmethod
    def build(cls, sentences: Iterable[str], min_count: int = 1) -> Vocabulary:
        counts = Counter(t for s in sentences for t in cls.tokenize(s))
        return cls(sorted(w for w, c in counts.items() if c >= min_count))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, sentence: str) -> list[int]:
        """``<bos> w1 .. wn <eos>`` as ids."""
        return [BOS] + [self.index.get(t, UNK) for t in self.tokenize(sentence)] + [EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<eos>``; ``<bos>``/``<pad>`` are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (BOS, PAD):
                words.append(self.words[i] if 0 <= i < len(self.words) else "<unk>")
        return self.detokenize(words)

    def batch(self, sentences: Sequence[str], max_len: int | None = None) -> torch.Tensor:
        """``(B, T)`` long tensor of encoded sentences, right-padded with ``<pad>`` (truncated keeps <eos>)."""
        seqs = [self.encode(s) for s in sentences]
        if max_len is not None:
            seqs = [s if len(s) <= max_len else s[: max_len - 1] + [EOS] for s in seqs]
        out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
        for row, s in enumerate(seqs):
            out[row, : len(s)] = torch.tensor(s)
        return out

    def to_dict(self) -> dict:
        return {"words": self.words[len(SPECIALS) :]}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(data["words"])


def _conv(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, out_ch), out_ch),
        nn.LeakyReLU(0.05, inplace=True),
    )


class CaptionEncoder(nn.Module):
    """Four 3x3 conv/GroupNorm/LeakyReLU layers, two with stride 2: a ``(B, feature_channels, H/4, W/4)`` map."""

    def __init__(self, in_channels: int = 1, width: int = 32, feature_channels: int = 64):
        super().__init__()
        self.feature_channels = feature_channels
        self.layers = nn.Sequential(
            _conv(in_channels, width, 1),
            _conv(width, 2 * width, 2),
            _conv(2 * width, feature_channels, 2),
            _conv(feature_channels, feature_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CaptionNet(nn.Module):
    """Encoder + GRU decoder; see the module docstring."""

    GRID = 4

    def __init__(
        self,
        vocab_size: int,
        in_channels: int = 1,
        width: int = 32,
        feature_channels: int = 64,
        embed: int = 64,
        hidden: int = 128,
    ):
        super().__init__()
        # what a checkpoint stores to rebuild the same network: CaptionNet(**net.config)
        self.config = {
            "vocab_size": vocab_size,
            "in_channels": in_channels,
            "width": width,
            "feature_channels": feature_channels,
            "embed": embed,
            "hidden": hidden,
        }
        self.encoder = CaptionEncoder(in_channels, width, feature_channels)
        self.summary = nn.Linear(feature_channels * self.GRID * self.GRID, hidden)
        self.init_state = nn.Linear(hidden, hidden)
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=PAD)
        self.gru = nn.GRU(embed + hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def _context(self, images: torch.Tensor) -> torch.Tensor:
        grid = F.adaptive_avg_pool2d(self.encoder(images), self.GRID).flatten(1)
        return torch.tanh(self.summary(grid))

    def _step(self, tokens: torch.Tensor, ctx: torch.Tensor, h: torch.Tensor):
        inp = torch.cat([self.embed(tokens), ctx[:, None].expand(-1, tokens.shape[1], -1)], dim=2)
        y, h = self.gru(inp, h)
        return self.out(y), h

    def forward(self, images: torch.Tensor, tokens_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, T, V)`` for the next word after each input token."""
        ctx = self._context(images)
        return self._step(tokens_in, ctx, torch.tanh(self.init_state(ctx))[None])[0]

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (ignoring <pad>) and the logits, for ``(B, T)`` encoded sentences."""
        logits = self(images, tokens[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=PAD), logits

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: int = 40) -> list[list[int]]:
        """Most likely word at every step, from <bos> until <eos> (or ``max_len`` words)."""
        ctx = self._context(images)
        h = torch.tanh(self.init_state(ctx))[None]
        tok = torch.full((images.shape[0], 1), BOS, dtype=torch.long, device=images.device)
        out = []
        for _ in range(max_len):
            logits, h = self._step(tok, ctx, h)
            tok = logits[:, -1].argmax(dim=1, keepdim=True)
            out.append(tok)
        seqs = torch.cat(out, dim=1).tolist()
        return [s[: s.index(EOS)] if EOS in s else s for s in seqs]


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = PAD) -> float:
    """Share of non-pad target positions whose arg-max prediction is right (``logits`` ``(B, T, V)``)."""
    keep = targets != pad_id
    if not keep.any():
        return float("nan")
    return float((logits.argmax(dim=-1) == targets)[keep].float().mean())


@torch.no_grad()
def caption_scores(
    net: CaptionNet, vocab: Vocabulary, images: torch.Tensor, sentences: Sequence[str], batch_size: int = 16
) -> dict[str, float]:
    """Held-out caption quality: teacher-forced ``token_accuracy`` and ``bleu4`` of the greedy captions.

    Token accuracy is pooled over every non-pad target word of the set (not averaged per batch).
    """
    was_training = net.training
    net.eval()
    correct = total = 0
    decoded: list[str] = []
    try:
        for start in range(0, len(sentences), batch_size):
            x = images[start : start + batch_size]
            tokens = vocab.batch(sentences[start : start + batch_size]).to(x.device)
            _, logits = net.loss(x, tokens)
            keep = tokens[:, 1:] != PAD
            correct += int((logits.argmax(dim=-1) == tokens[:, 1:])[keep].sum())
            total += int(keep.sum())
            decoded += [vocab.decode(ids) for ids in net.greedy(x)]
    finally:
        net.train(was_training)
    return {"token_accuracy": correct / total, "bleu4": bleu4([[s] for s in sentences], decoded)}


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(
    references: Sequence[Sequence[str | Sequence[str]]], hypotheses: Sequence[str | Sequence[str]]
) -> float:
    """Corpus BLEU-4 in [0, 1]; ``references[i]`` lists the reference sentences of hypothesis ``i``.

    Sentences are strings (tokenised as :meth:`Vocabulary.tokenize`) or token lists.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")

    def toks(s):
        return Vocabulary.tokenize(s) if isinstance(s, str) else list(s)

    matched, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for refs, hyp in zip(references, hypotheses, strict=True):
        refs, hyp = [toks(r) for r in refs], toks(hyp)
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            best: Counter = Counter()
            for r in refs:
                best |= _ngrams(r, n)  # max count per n-gram over the references
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)
