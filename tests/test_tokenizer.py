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


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_bert_towers_cached_token_ids_are_the_tokenizers_padded_batch(tokenizer, side):
    """BertTextTower tokenizes each distinct text once; its ids and mask must be what the
    tokenizer's own padded, truncated batch holds, for repeats, long texts and either padding side."""
    import copy

    import torch
    from transformers import BertConfig, BertModel

    from spinemm.models.towers import BertTextTower

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = side
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))
    tower = BertTextTower(bert, tok, max_length=12)
    long_text = " ".join(["moderate left neural foraminal narrowing"] * 5)  # truncated at 12 tokens
    batches = [[QUERY_TEXTS[0], long_text, QUERY_TEXTS[0], "a"], ["a", QUERY_TEXTS[3]], [long_text]]
    for texts in batches:  # later batches hit the cache
        expected = tok(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
        ids, mask = tower.token_ids(texts)
        assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert list(tower._token_cache) == [QUERY_TEXTS[0], long_text, "a", QUERY_TEXTS[3]]
    tower.tokenizer = copy.deepcopy(tok)  # a swapped tokenizer starts a fresh cache
    tower.token_ids(["b"])
    assert list(tower._token_cache) == ["b"]
