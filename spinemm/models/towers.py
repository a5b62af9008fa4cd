"""Text towers: the :class:`TextTower` interface and the BERT tower (transformers).

The fusion needs token-level text features and a pooled embedding, so a text tower is
``encode(texts) -> (tokens [N, L, D], mask [N, L] bool, pooled [N, D])`` with ``D == width``.
``"bert"`` builds three ways: a tiny BERT from scratch with the offline tokenizer (tests, demo), a
hub BERT (``bert-base-uncased``), or the HF text tower of an open_clip model (BiomedCLIP's
PubMedBERT), which also hands its pretrained projection to the model so zero-shot works as trained.
Vision towers live in :mod:`spinemm.models.vision`.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SpineModelError
from .config import TextConfig
from .hub import TOKENIZER_FILES, TOKENIZER_REQUIRED, MissingHubFiles, resolve_files
from .registry import BuildContext, register_text
from .vision import OPEN_CLIP_WEIGHTS, open_clip_files, open_clip_source, upstream_state

#: open_clip HF poolers -> this tower's pooling.
_OPEN_CLIP_POOLERS = {"cls_last_hidden_state_pooler": "cls", "mean_pooler": "mean"}


class TextTower(nn.Module):
    """The text-tower interface.

    Subclasses set ``width`` (D) and implement :meth:`encode`. Optional: a ``tokenizer`` attribute
    with ``save_pretrained(dir)`` (saved beside the weights) and ``pop_projection() -> nn.Module |
    None`` (a pretrained pooled-width -> embed-dim projection for ``encode_text``).
    """

    width: int
    tokenizer: Any = None

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """texts (N strings) -> (tokens [N, L, D], mask [N, L] bool (True = real token), pooled [N, D])."""
        raise NotImplementedError

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode(texts)

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """``encode(texts)``'s pooled features ``[N, D]``; inside :meth:`remembering`, each distinct
        text goes through the tower once for the whole block."""
        memo = getattr(self, "_remembered", None)
        if memo is None:
            return self.encode(texts)[2]
        missing = list(dict.fromkeys(t for t in texts if t not in memo))
        if missing:
            memo.update(zip(missing, self.encode(missing)[2].detach(), strict=True))
        return torch.stack([memo[t] for t in texts])

    @contextlib.contextmanager
    def remembering(self) -> Iterator[None]:
        """Within the block, :meth:`pooled` computes each text's features once and reuses them: for
        inference, where the weights stay fixed (a pipeline run encodes the same 25 detect queries and
        the same few hundred finding texts for every batch of studies). Nested blocks share one memo."""
        if getattr(self, "_remembered", None) is not None:
            yield
            return
        self._remembered: dict[str, torch.Tensor] | None = {}
        try:
            yield
        finally:
            self._remembered = None


class BertTextTower(TextTower):
    """A transformers ``BertModel`` + its tokenizer; pooled = [CLS] or masked mean of the last layer.

    Each distinct text is tokenized once per tower (:meth:`token_ids` keeps the ids of the
    ``TOKEN_CACHE_SIZE`` texts tokenized last): the grader encodes the same few thousand finding texts every
    epoch, and tokenizing was 4 ms of a 75 ms training step on the CPU."""

    TOKEN_CACHE_SIZE = 65_536

    def __init__(
        self,
        bert: nn.Module,
        tokenizer: Any,
        max_length: int,
        pooler: str = "cls",
        projection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if pooler not in ("cls", "mean"):
            raise SpineModelError(f"text.pooler must be 'cls' or 'mean', got {pooler!r}")
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooler = pooler
        self.width = bert.config.hidden_size
        self._projection = projection
        self._token_cache: OrderedDict[str, list[int]] = OrderedDict()
        self._token_cache_key: tuple[Any, int] | None = None  # (tokenizer, max_length) it was filled with

    def pop_projection(self) -> nn.Module | None:
        """Hand a pretrained text projection (open_clip HF tower) to the model (once)."""
        proj, self._projection = self._projection, None
        return proj

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """texts -> (tokens [N, L, width], mask [N, L], pooled [N, width])."""
        if isinstance(texts, str):
            raise SpineModelError("encode() takes a list of texts, not one string")
        return self.encode_ids(*self.token_ids(texts))

    def token_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (input ids [N, L], attention mask [N, L]) as ``tokenizer(texts, padding=True,
        truncation=True, max_length=max_length)`` gives them, each distinct text tokenized once."""
        owner = self._token_cache_key
        if owner is None or owner[0] is not self.tokenizer or owner[1] != self.max_length:
            self._token_cache.clear()  # another tokenizer (e.g. a loaded model's) or length
            self._token_cache_key = (self.tokenizer, self.max_length)
        cache = self._token_cache
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            found = self.tokenizer(missing, truncation=True, max_length=self.max_length)["input_ids"]
            cache.update(zip(missing, found, strict=True))
            while len(cache) > self.TOKEN_CACHE_SIZE:
                cache.popitem(last=False)
        rows = [cache[t] for t in texts]
        length = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), length), int(self.tokenizer.pad_token_id or 0), dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if left else slice(0, len(row))
            ids[i, span] = row
            mask[i, span] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def encode_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [N, L] and attention mask [N, L] (1 = real token) -> as :meth:`encode`."""
        device = self.bert.embeddings.word_embeddings.weight.device
        ids, attention = input_ids.to(device), attention_mask.to(device)
        tokens = self.bert(input_ids=ids, attention_mask=attention).last_hidden_state
        mask = attention.bool()
        if self.pooler == "cls":
            pooled = tokens[:, 0]
        else:
            weights = attention.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return tokens, mask, pooled


# ----------------------------------------------------------------------------------------- builders


def _load_tokenizer(folder: Path) -> Any:
    from transformers import BertTokenizerFast

    try:
        return BertTokenizerFast.from_pretrained(str(folder))
    except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
        raise SpineModelError(f"{folder}: cannot load the tokenizer files ({type(exc).__name__}: {exc})") from exc


def _saved_tokenizer(ctx: BuildContext) -> Any:
    """The tokenizer saved beside a model being loaded (None when building fresh)."""
    if ctx.source_dir is not None and any((ctx.source_dir / f).is_file() for f in TOKENIZER_REQUIRED):
        return _load_tokenizer(ctx.source_dir)
    return None


def _config_dict(config: Any) -> dict[str, Any]:
    """A transformers config as it will read back from JSON (non-default values only)."""
    return json.loads(config.to_json_string(use_diff=True))


def _bert_config(cfg: TextConfig, source: str, setting: str) -> Any:
    from transformers import BertConfig

    if cfg.hf_config is None:
        path = resolve_files(source, ["config.json"], setting=setting)["config.json"]
        cfg.hf_config = _config_dict(BertConfig.from_json_file(str(path)))
    return BertConfig.from_dict(cfg.hf_config)


def _tiny_bert(cfg: TextConfig, ctx: BuildContext) -> BertTextTower:
    from transformers import BertConfig, BertModel

    from ..tokenizer import build_tokenizer

    tokenizer = _saved_tokenizer(ctx) or build_tokenizer()
    if cfg.hf_config is None:
        cfg.hf_config = _config_dict(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.width,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_length,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    bert = BertModel(BertConfig.from_dict(cfg.hf_config), add_pooling_layer=False)
    return BertTextTower(bert, tokenizer, cfg.max_length, cfg.pooler)


def _hub_bert(cfg: TextConfig, ctx: BuildContext) -> BertTextTower:
    """A BERT from the hub or a local folder (``text.hf_model_name``), e.g. bert-base-uncased."""
    from transformers import BertModel

    source, setting = cfg.hf_model_name, "text.hf_model_name"
    tokenizer = _saved_tokenizer(ctx)
    want_weights = ctx.load_pretrained and cfg.pretrained
    files: list = [("model.safetensors", "pytorch_model.bin")] if want_weights else []
    if want_weights or cfg.hf_config is None:
        files.insert(0, "config.json")
    if tokenizer is None:
        files.append(TOKENIZER_REQUIRED)
    found = (
        resolve_files(source, files, optional=TOKENIZER_FILES if tokenizer is None else (), setting=setting)
        if files
        else {}
    )
    if tokenizer is None:
        tokenizer = _load_tokenizer(found[TOKENIZER_REQUIRED[0]].parent)
    if want_weights:
        bert = BertModel.from_pretrained(str(found["config.json"].parent), add_pooling_layer=False)
        cfg.hf_config = _config_dict(bert.config)
    else:
        bert = BertModel(_bert_config(cfg, source, setting), add_pooling_layer=False)
    return BertTextTower(bert, tokenizer, cfg.max_length, cfg.pooler)


def _open_clip_text_files(
    cfg: TextConfig, source: str, *, want_weights: bool, want_tokenizer: bool
) -> dict[str, Path]:
    """The open_clip repo's config / weights / tokenizer and the BERT's config.json; when offline,
    one error names the missing files of both repos."""
    found: dict[str, Path] = {}
    missing: list[MissingHubFiles] = []
    need_config = cfg.open_clip_text_cfg is None
    if need_config or want_weights or want_tokenizer:
        try:
            found = open_clip_files(
                source,
                config=need_config,
                weights=want_weights,
                tokenizer=want_tokenizer,
                setting="text.open_clip_model",
            )
        except MissingHubFiles as exc:
            missing.append(exc)
    if cfg.hf_model_name and cfg.hf_config is None:  # the BERT config's repo is known up front
        try:
            _bert_config(cfg, cfg.hf_model_name, "text.hf_model_name")
        except MissingHubFiles as exc:
            missing.append(exc)
    if missing:
        raise MissingHubFiles.merge(missing)
    if need_config:
        cfg.open_clip_text_cfg = json.loads(found["open_clip_config.json"].read_text())["model_cfg"][
            "text_cfg"
        ]
    return found


def _open_clip_bert(cfg: TextConfig, ctx: BuildContext) -> BertTextTower:
    """The HF text tower of an open_clip model (open_clip's ``HFTextEncoder``), e.g. BiomedCLIP."""
    from open_clip.hf_model import HFTextEncoder

    name = cfg.open_clip_model
    tokenizer = _saved_tokenizer(ctx)
    want_weights = bool(ctx.load_pretrained and cfg.pretrained)
    found = _open_clip_text_files(
        cfg, open_clip_source(name, None), want_weights=want_weights, want_tokenizer=tokenizer is None
    )
    if tokenizer is None:
        tokenizer = _load_tokenizer(found[TOKENIZER_REQUIRED[0]].parent)
    text_cfg = cfg.open_clip_text_cfg
    if "hf_model_name" not in text_cfg:
        raise SpineModelError(
            f"open_clip model {name!r} has no Hugging Face text tower (text_cfg.hf_model_name)"
        )
    # open_clip >= 2.x spells these hf_pooler_type / hf_proj_type (older configs: pooler_type / proj)
    pooler_type = text_cfg.get("hf_pooler_type", text_cfg.get("pooler_type", "mean_pooler"))
    proj_type = text_cfg.get("hf_proj_type", text_cfg.get("proj", "mlp"))
    if pooler_type not in _OPEN_CLIP_POOLERS:
        raise SpineModelError(
            f"open_clip text pooler {pooler_type!r} is not supported; use one of {list(_OPEN_CLIP_POOLERS)}"
        )
    bert_config = _bert_config(cfg, cfg.hf_model_name or text_cfg["hf_model_name"], "text.hf_model_name")
    hf = HFTextEncoder(
        text_cfg["hf_model_name"],
        output_dim=ctx.embed_dim,
        config=bert_config,
        pooler_type=pooler_type,
        proj_type=proj_type,
    )
    hf.transformer.pooler = None  # these poolers never use BERT's pooler layer, so checkpoints lack it
    if want_weights:
        state = upstream_state(ctx, found[OPEN_CLIP_WEIGHTS[0]])
        text_state = {k[len("text.") :]: v for k, v in state.items() if k.startswith("text.")}
        text_state.pop("transformer.embeddings.position_ids", None)  # a buffer older checkpoints saved
        try:
            hf.load_state_dict(text_state)
        except RuntimeError as exc:
            raise SpineModelError(f"pretrained text weights of {name} do not fit: {exc}") from exc
        if "logit_scale" in state:  # the image-text pair's trained temperature, for zero-shot as trained
            ctx.logit_scale = float(state["logit_scale"])
    return BertTextTower(hf.transformer, tokenizer, cfg.max_length, _OPEN_CLIP_POOLERS[pooler_type], hf.proj)


@register_text("bert")
def build_bert_text(cfg: TextConfig, ctx: BuildContext) -> TextTower:
    """A BERT text tower from ``cfg`` (see :class:`~spinemm.models.config.TextConfig`)."""
    if cfg.open_clip_model:
        return _open_clip_bert(cfg, ctx)
    if cfg.hf_model_name:
        return _hub_bert(cfg, ctx)
    return _tiny_bert(cfg, ctx)
