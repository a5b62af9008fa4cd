"""An offline WordPiece tokenizer for the tiny BERT, built from the texts spinemm itself writes.

No download. The vocabulary is: the BERT special tokens, every word of
:func:`spinemm.text.vocabulary_corpus` (each query and prompt template) after BERT normalisation
and pre-tokenization, and the printable ASCII characters both as word starts and as ``##``
continuations, so any English prompt still tokenizes without ``[UNK]`` (unseen words fall apart
into characters). The vocabulary is sorted, so it is the same on every run; ``tokenizers``' own
WordPiece trainer breaks ties between equally frequent merges differently from run to run.
The result is a ``transformers`` ``BertTokenizerFast`` that saves and loads like any other.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Characters every vocabulary contains, so no printable ASCII text maps to [UNK].
ALPHABET = tuple(string.ascii_lowercase + string.digits + string.punctuation)


def build_tokenizer(texts: Iterable[str] | None = None):
    """A lower-casing WordPiece ``BertTokenizerFast`` whose words are those of ``texts``.

    ``texts`` defaults to the library's corpus. Deterministic: the same texts give the same ids.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    from .text import vocabulary_corpus

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set(ALPHABET)
    for text in vocabulary_corpus() if texts is None else texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab_list = [*SPECIAL_TOKENS, *sorted(words), *("##" + c for c in ALPHABET)]
    vocab = {token: i for i, token in enumerate(vocab_list)}

    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=True,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


class SpineTokenizer:
    """open_clip-style tokenizer: ``tokenizer(texts) -> LongTensor [N, context_length]`` of token
    ids, padded with the pad id and truncated to the text tower's ``max_length``; what
    :func:`spinemm.get_tokenizer` returns and ``model.encode_text`` reads. ``.hf`` is the underlying
    ``transformers`` tokenizer (the one ``model.tokenizer`` is)."""

    def __init__(self, hf_tokenizer, context_length: int) -> None:
        self.hf = hf_tokenizer
        self.context_length = int(context_length)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    def __call__(self, texts, context_length: int | None = None):
        from .errors import SpineModelError

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise SpineModelError("the tokenizer takes a string or a list of strings")
        length = self.context_length if context_length is None else int(context_length)
        encoded = self.hf(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return encoded["input_ids"]

    def __repr__(self) -> str:
        return f"SpineTokenizer({type(self.hf).__name__}, context_length={self.context_length})"
