"""Per-image text: sheet parsing and offline MiniLM embeddings with an on-disk cache."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from medsight.errors import MedsightError
from medsight.text import EMBED_DIM, TextEmbedding, TextEncoder, lookup, read_text_file, require_rows

SENTENCES = [
    "The nuclei density in the upper right is high.",
    "The nuclei are evenly distributed.",
    "Bilateral lower-lobe infection.",
]


# -- sheets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_sheet_rows_by_image_name(tmp_path, suffix):
    table = pd.DataFrame(
        {"image": ["a.png", "b.png", "c"], "DESCRIPTION": ["  Dense   upper left. ", "", "Few nuclei."]}
    )
    sheet = tmp_path / f"Train_text{suffix}"
    table.to_csv(sheet, index=False) if suffix == ".csv" else table.to_excel(sheet, index=False)
    texts = read_text_file(sheet)
    # whitespace is normalised, an empty description means no text
    assert texts == {"a.png": "Dense upper left.", "b.png": None, "c": "Few nuclei."}
    assert lookup(texts, "c.png") == (True, "Few nuclei.")  # rows may omit the suffix
    assert lookup(texts, "b.png") == (True, None)
    assert lookup(texts, "d.png") == (False, None)


def test_missing_rows_are_named_with_the_sheet(tmp_path):
    sheet = tmp_path / "Val_text.csv"
    pd.DataFrame({"Image": ["a.png"], "Description": ["x"]}).to_csv(sheet, index=False)
    with pytest.raises(MedsightError, match=r"no row for 2 image\(s\): b.png, c.png") as info:
        require_rows(read_text_file(sheet), ["a.png", "b.png", "c.png"], sheet)
    assert "Val_text.csv" in str(info.value)


def test_sheet_without_the_columns_is_refused(tmp_path):
    sheet = tmp_path / "t.csv"
    pd.DataFrame({"Name": ["a.png"], "Caption": ["x"]}).to_csv(sheet, index=False)
    with pytest.raises(MedsightError, match="columns Image and Description"):
        read_text_file(sheet)
    with pytest.raises(MedsightError, match="no such text sheet"):
        read_text_file(tmp_path / "absent.xlsx")


# -- embeddings ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    enc = TextEncoder(max_tokens=24, cache_dir=tmp_path_factory.mktemp("text_cache"))
    enc.embed(SENTENCES)  # loads the model once for the module
    return enc


def test_token_and_sentence_embeddings(encoder):
    emb = encoder.embed_one(SENTENCES[0])
    n_tokens = len(encoder.model.tokenizer(SENTENCES[0])["input_ids"])  # [CLS] ... [SEP]
    assert emb.has_text and emb.tokens.shape == (24, EMBED_DIM) and emb.mask.shape == (24,)
    assert emb.mask.sum() == n_tokens and emb.mask[:n_tokens].all()
    assert np.all(emb.tokens[n_tokens:] == 0)
    # MiniLM's sentence vector is the normalised mean of its token vectors
    mean = emb.tokens[emb.mask].mean(0)
    np.testing.assert_allclose(emb.sentence, mean / np.linalg.norm(mean), atol=1e-4)
    assert np.linalg.norm(emb.sentence) == pytest.approx(1.0, abs=1e-5)


def test_embeddings_are_deterministic_and_semantic(encoder):
    fresh = TextEncoder(max_tokens=24)  # no cache: computed again
    fresh._model = encoder.model
    a, b = encoder.embed_one(SENTENCES[0]), fresh.embed_one(SENTENCES[0])
    np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5)
    np.testing.assert_allclose(a.sentence, b.sentence, atol=1e-6)
    similar = encoder.embed_one("The nuclei density in the upper left is high.").sentence
    assert similar @ a.sentence > encoder.embed_one(SENTENCES[2]).sentence @ a.sentence


def test_cache_is_reused_without_loading_the_model(encoder):
    files = sorted(encoder.cache_dir.glob("*.npz"))
    assert len(files) >= len(SENTENCES)
    again = TextEncoder(max_tokens=24, cache_dir=encoder.cache_dir)
    for text in SENTENCES:
        cached, computed = again.embed_one(text), encoder.embed([text])[0]
        np.testing.assert_array_equal(cached.tokens, computed.tokens)
        np.testing.assert_array_equal(cached.mask, computed.mask)
    assert again._model is None  # everything came from the cache
    # whitespace differences hit the same cache entry
    again.embed_one("  The nuclei are   evenly distributed. ")
    assert again._model is None


def test_truncation_and_missing_text(encoder):
    short = TextEncoder(max_tokens=4)
    short._model = encoder.model
    long = encoder.embed_one(SENTENCES[0])
    cut = short.embed_one(SENTENCES[0])
    assert cut.mask.all() and cut.tokens.shape == (4, EMBED_DIM)
    np.testing.assert_allclose(cut.tokens, long.tokens[:4], atol=1e-5)
    for blank in (None, "", "   "):
        emb = encoder.embed_one(blank)
        assert not emb.has_text and not emb.mask.any() and not emb.tokens.any() and not emb.sentence.any()
    assert isinstance(TextEmbedding.empty(8), TextEmbedding) and TextEmbedding.empty(8).tokens.shape == (
        8,
        384,
    )


def test_missing_text_warns_once():
    from medsight.text import warn_missing_text

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_missing_text(3, 10, "unit-test-place")
        warn_missing_text(3, 10, "unit-test-place")
        warn_missing_text(0, 10, "other-place")
    assert [str(w.message) for w in caught] == [
        "3 of 10 image(s) in unit-test-place have no text; they are segmented from the image alone"
    ]
