"""The offline WordPiece tokenizer of the tiny BERT."""

from __future__ import annotations

import pytest

from spinemm.text import QUERY_TEXTS, vocabulary_corpus
from spinemm.tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_query_texts_round_trip_without_unknowns(tokenizer):
    unk = tokenizer.unk_token_id
    for text in QUERY_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert unk not in ids, text
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
        assert tokenizer(decoded)["input_ids"] == ids
    # every word the library writes is a whole token, not pieces
    pieces = [t for text in vocabulary_corpus() for t in tokenizer.tokenize(text) if t.startswith("##")]
    assert pieces == []
    assert len({tuple(tokenizer(t)["input_ids"]) for t in QUERY_TEXTS}) == 25


def test_unseen_words_fall_back_to_characters(tokenizer):
    tokens = tokenizer.tokenize("Quixotic xylophone, 42%!")
    assert "[UNK]" not in tokens
    assert tokens[:3] == ["q", "##u", "##i"]
    assert tokenizer.tokenize("é") == ["e"]  # accents stripped like BERT uncased
    assert tokenizer.tokenize("→") == ["[UNK]"]  # outside printable ASCII


def test_vocabulary_is_deterministic_and_complete(tokenizer):
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0
    assert all(c in vocab and "##" + c in vocab for c in ALPHABET)
    assert build_tokenizer(["alpha beta", "gamma"]).get_vocab().keys() > {"alpha", "beta", "gamma"}


def test_save_and_reload(tokenizer, tmp_path):
    from transformers import BertTokenizerFast

    tokenizer.save_pretrained(tmp_path)
    loaded = BertTokenizerFast.from_pretrained(tmp_path)
    batch = list(QUERY_TEXTS[:3]) + ["an unseen prompt"]
    assert loaded(batch, padding=True)["input_ids"] == tokenizer(batch, padding=True)["input_ids"]
