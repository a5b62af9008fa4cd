"""SpineCLIP: a study's 3 series + 25 query texts -> severity logits and locations; plus a dual encoder.

Forward, for a collated batch (CONTRACTS "Sample format"), B studies, P = 3 planes, S slices:

1. The 25 query texts are the same for every study, so each distinct text is encoded once per
   forward (BERT pooled -> ``query_proj``) and gathered per study: queries [B, 25, D].
2. Every series that exists (``plane_mask``) is encoded once by the vision tower: tokens
   [B, P, S, h*w, D] after ``token_proj`` + slice-position and plane embeddings + LayerNorm.
3. The query decoder lets each query attend only to its own plane's tokens (fusion.py).
4. Heads: severity logits [B, 25, 3]; location logits [B, 25, S, h, w] over its plane, decoded.

Dual encoder: :meth:`encode_image` (pooled vision of single images -> ``image_proj``),
:meth:`encode_text` (pooled text -> ``text_proj``) and ``logit_scale``, as in open_clip.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import NUM_CLASSES, PLANES, TARGET_PLANE_INDEX
from ..errors import SpineError, SpineModelError
from ..text import QUERY_TEXTS
from .base import SliceEncoder
from .config import ModelConfig
from .fusion import QueryDecoder, SlicePlaneEmbedding
from .heads import LocationHead, SeverityHead, decode_location, pool_at_location
from .hub import MissingHubFiles
from .hub_mixin import SpineHubMixin
from .registry import BuildContext, build_towers
from .saved import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_finite,
    load_weights,
    read_saved_config,
)
from .towers import TextTower


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))} (no input_ids)"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(value).__name__


#: Licences of the upstream weights the presets load, as their model cards state them. A tower
#: built from its config carries no upstream weights; any other upstream name is "not recorded".
UPSTREAM_LICENCES = {
    "ViT-B-16:openai": "MIT (OpenAI CLIP, github.com/openai/CLIP)",
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": "MIT (its Hugging Face model card)",
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": "MIT (its Hugging Face model card)",
    "bert-base-uncased": "Apache-2.0 (its Hugging Face model card)",
    "google-bert/bert-base-uncased": "Apache-2.0 (its Hugging Face model card)",
}


def upstream_licence(name: str) -> str:
    """The licence of upstream weights ``name`` (``model`` or ``model:pretrained_tag``), for model cards."""
    if name == "built from its config":
        return "no upstream weights"
    licence = UPSTREAM_LICENCES.get(name)
    return f"licence {licence}" if licence else "licence not recorded by spinemm: check the upstream model card"


class SpineCLIP(nn.Module, SpineHubMixin):
    """Vision tower + text tower + query decoder + heads. Build with :func:`spinemm.create_model`;
    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` as :mod:`spinemm.models.hub_mixin`."""

    def __init__(
        self,
        config: ModelConfig,
        vision: SliceEncoder,
        text: TextTower,
        image_proj: nn.Module | None = None,
        text_proj: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dim = config.fusion.dim
        self.config = config
        self.vision = vision
        self.text = text
        # dual-encoder projections: pretrained ones come from open_clip towers, else fresh
        self.image_proj = image_proj or nn.Linear(vision.width, config.embed_dim, bias=False)
        self.text_proj = text_proj or nn.Linear(text.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        # fusion path
        self.token_proj = nn.Linear(vision.width, dim)
        self.query_proj = nn.Linear(text.width, dim)
        num_queries = len(TARGET_PLANE_INDEX)
        # unit-variance init, as DETR's learned queries: an identity as large as the text embedding
        self.query_embed = nn.Parameter(torch.randn(num_queries, dim)) if config.fusion.learned_queries else None
        self.slice_plane = SlicePlaneEmbedding(dim, config.num_slices, len(PLANES))
        self.memory_norm = nn.LayerNorm(dim)
        self.decoder = QueryDecoder(
            dim,
            config.fusion.layers,
            config.fusion.heads,
            TARGET_PLANE_INDEX,
            config.fusion.mlp_ratio,
            config.fusion.dropout,
        )
        self.severity_head = SeverityHead(dim, NUM_CLASSES)
        self.location_head = LocationHead(dim, config.fusion.loc_dim)

    # ------------------------------------------------------------------------------- properties
    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """What a dataset must feed this model: image_size, num_slices, channels, mean, std
        (saved as ``preprocess_cfg`` in config.json, as open_clip names it)."""
        return self.config.preprocess(self.vision.image_mean, self.vision.image_std)

    @property
    def preprocess(self) -> dict[str, Any]:
        """Same as :attr:`preprocess_cfg`."""
        return self.preprocess_cfg

    @property
    def tokenizer(self) -> Any:
        return getattr(self.text, "tokenizer", None)

    # ------------------------------------------------------------------------------ dual encoder
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [N, C, H, W] in [0, 1] (resized to ``image_size`` if needed) -> [N, embed_dim]."""
        if images.ndim != 4:
            raise SpineModelError(f"encode_image expects [N, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        _, pooled = self.vision(images[:, None])  # one-slice series: pooled [N, 1, width]
        embeds = self.image_proj(pooled[:, 0])
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, text: str | Sequence[str] | torch.Tensor | Mapping[str, Any],
                    normalize: bool = False) -> torch.Tensor:
        """Texts -> [N, embed_dim]. ``text``: N strings (or one); token ids [N, L] as
        ``spinemm.get_tokenizer(name)(texts)`` gives them (pad ids are masked out); or a tokenizer's
        output holding ``input_ids`` (and ``attention_mask``), e.g. ``model.tokenizer(texts,
        padding=True, return_tensors="pt")``. Anything else is refused."""
        embeds = self.text_proj(self._pooled_text(text))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def _pooled_text(self, text: Any) -> torch.Tensor:
        if isinstance(text, str):
            text = [text]
        if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            return self.text.encode(list(text))[2]
        if isinstance(text, Mapping) and "input_ids" in text:
            ids, mask = text["input_ids"], text.get("attention_mask")
        elif isinstance(text, torch.Tensor):
            ids, mask = text, None
        else:
            raise SpineModelError(
                "encode_text takes strings, token ids [N, L] (spinemm.get_tokenizer) or a tokenizer's output "
                f"with input_ids; got {_describe(text)}"
            )
        try:
            ids = torch.as_tensor(ids)
        except (ValueError, TypeError) as err:
            raise SpineModelError(f"encode_text: input_ids of unequal lengths; tokenize with padding=True ({err})") from None
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise SpineModelError(f"encode_text: token ids must be integers [N, L], got {ids.dtype} {tuple(ids.shape)}")
        if not hasattr(self.text, "encode_ids") or self.tokenizer is None:
            raise SpineModelError(f"{type(self.text).__name__} encodes strings only; pass the texts")
        mask = ids != self.tokenizer.pad_token_id if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        return self.text.encode_ids(ids.long(), mask.long())[2]

    # ----------------------------------------------------------------------------------- fusion
    def encode_queries(self, texts: Sequence[Sequence[str]] | None, batch_size: int) -> torch.Tensor:
        """Per-study query texts (or None = ``QUERY_TEXTS``) -> queries [B, Q, dim].

        Each distinct text goes through the text tower once, however many studies share it.
        """
        rows = [QUERY_TEXTS] * batch_size if texts is None else [list(r) for r in texts]
        if len(rows) != batch_size or any(len(r) != len(TARGET_PLANE_INDEX) for r in rows):
            raise SpineModelError(
                f"batch['text'] must hold {batch_size} lists of {len(TARGET_PLANE_INDEX)} texts"
            )
        unique = list(dict.fromkeys(t for row in rows for t in row))
        position = {t: i for i, t in enumerate(unique)}
        pooled = self.text.pooled(unique)  # [U, text width]
        index = torch.tensor([[position[t] for t in row] for row in rows], device=pooled.device)
        queries = self.query_proj(pooled)[index]  # [B, Q, dim]
        return queries if self.query_embed is None else queries + self.query_embed

    def encode_series(self, image: torch.Tensor, plane_mask: torch.Tensor) -> torch.Tensor:
        """image [B, P, S, C, H, W], plane_mask [B, P] -> memory tokens [B, P, S, h*w, dim]."""
        b, p, s = image.shape[:3]
        h, w = self.vision.grid_size
        if torch.compiler.is_compiling():
            # one graph without data-dependent shapes: encode every plane, zero the absent ones
            # (the same tokens; eager mode skips them, which also keeps them out of BatchNorm's
            # batch statistics in training)
            series_tokens, _ = self.vision(image.flatten(0, 1))  # [B * P, S, h*w, width]
            tokens = self.token_proj(series_tokens).unflatten(0, (b, p))
            tokens = tokens * plane_mask[:, :, None, None, None].to(tokens.dtype)
        else:
            tokens = image.new_zeros(b, p, s, h * w, self.config.fusion.dim)
            if plane_mask.any():  # absent series are never encoded
                series_tokens, _ = self.vision(image[plane_mask])  # [M, S, h*w, width]
                tokens = tokens.index_put((plane_mask,), self.token_proj(series_tokens).to(tokens.dtype))
        return self.memory_norm(self.slice_plane(tokens))

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Collated batch -> CONTRACTS "Model outputs" (logits, loc_logits, location, ...)."""
        return self.fuse(*self.fuse_inputs(batch))

    def fuse_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A collated batch checked and turned into :meth:`fuse`'s tensors (the queries through
        the text tower)."""
        image = batch["image"]
        if image.ndim != 6 or image.shape[1] != len(PLANES):
            raise SpineModelError(
                f"batch['image'] must be [B, {len(PLANES)}, S, C, H, W], got {tuple(image.shape)}"
            )
        if image.shape[-2:] != (self.image_size, self.image_size):
            raise SpineModelError(
                f"images are {tuple(image.shape[-2:])} but the model expects "
                f"{self.image_size}x{self.image_size}; build the dataset from model.preprocess_cfg"
            )
        b = image.shape[0]
        plane_mask = batch.get("plane_mask")
        plane_mask = (
            torch.ones(b, len(PLANES), dtype=torch.bool, device=image.device)
            if plane_mask is None
            else plane_mask.to(device=image.device, dtype=torch.bool)
        )
        return image, plane_mask, self.encode_queries(batch.get("text"), b)

    def fuse(self, image: torch.Tensor, plane_mask: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensor core of :meth:`forward` (everything after the text tower): images
        ``[B, P, S, C, H, W]``, ``plane_mask [B, P]`` and queries ``[B, 25, dim]`` -> the outputs.
        One graph under ``torch.compile(fullgraph=True)`` (:meth:`~spinemm.pipeline.SpinePipeline.compile`)."""
        s = image.shape[2]
        memory = self.encode_series(image, plane_mask)  # [B, P, S, L, D]
        decoded, attn = self.decoder(queries, memory.flatten(2, 3), plane_mask)
        h, w = self.vision.grid_size
        loc_logits = self.location_head(decoded, memory, self.decoder.query_plane)  # [B, 25, S, h*w]
        roi = pool_at_location(loc_logits, memory, self.decoder.query_plane)  # [B, 25, D]
        loc_logits = loc_logits.unflatten(-1, (h, w))
        location, confidence = decode_location(loc_logits)
        return {
            "logits": self.severity_head(decoded, roi),  # [B, 25, 3]
            "loc_logits": loc_logits,  # [B, 25, S, h, w]
            "location": location,  # [B, 25, 3]: slice, x, y
            "location_confidence": confidence,  # [B, 25]
            "attn": attn.unflatten(-1, (s, h, w)),  # [B, 25, S, h, w] last cross-attention layer
            "query_embeds": decoded,  # [B, 25, D]
        }

    # -------------------------------------------------------------------------------- save/load
    def save_pretrained(self, save_directory: str | Path, *, merge: bool = False, **kwargs: Any) -> Path:
        """Write the model folder (:mod:`spinemm.models.hub_mixin`). A LoRA model is saved as its
        base weights plus ``adapter_config.json`` / ``adapter_model.safetensors`` beside them, as peft
        does, and ``load_model`` applies the adapter again; ``merge=True`` saves a copy with the
        adapters merged into the base weights instead (checked numerically by ``merge_lora``)."""
        if merge and getattr(self, "lora_config", None) is not None:
            from .lora import merge_lora

            return merge_lora(copy.deepcopy(self)).save_pretrained(save_directory, **kwargs)
        return super().save_pretrained(save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``config.json`` (model + preprocess config), ``model.safetensors`` and tokenizer files
        (``save_pretrained`` adds the model card)."""
        from safetensors.torch import save_model

        from .. import __version__

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "spinemm_version": __version__,
            "model_cfg": self.config.to_dict(),
            "preprocess_cfg": self.preprocess_cfg,
        }
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if getattr(self, "lora_config", None) is None:
            save_model(self, str(out / WEIGHTS_NAME))
        else:  # peft-style: the base weights, and beside them the adapter that load_model applies
            from safetensors.torch import save_file

            from .lora import base_state_dict, save_adapter

            save_file({k: v.detach().cpu().contiguous().clone() for k, v in base_state_dict(self).items()},
                      str(out / WEIGHTS_NAME))
            save_adapter(self, out)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))

    @classmethod
    def from_config(cls, config: ModelConfig, *, load_pretrained: bool = True,
                    source_dir: Path | None = None) -> SpineCLIP:
        """Build the towers from the registries (:func:`~spinemm.models.registry.build_towers`)
        and assemble the model. Builders fill resolved upstream details into ``config`` (so saving
        it rebuilds offline); ``load_pretrained=False``: no upstream weights (architecture only)."""
        ctx = BuildContext(embed_dim=config.embed_dim, load_pretrained=load_pretrained, source_dir=source_dir)
        vision, text = build_towers(config.vision, config.text, ctx)
        if ctx.logit_scale is not None:
            config.logit_scale_init = ctx.logit_scale
        image_proj = vision.pop_projection() if hasattr(vision, "pop_projection") else None
        text_proj = text.pop_projection() if hasattr(text, "pop_projection") else None
        return cls(config, vision, text, image_proj=image_proj, text_proj=text_proj)

    @classmethod
    def _load_folder(cls, folder: Path) -> SpineCLIP:
        """The model ``save_pretrained`` wrote to ``folder``."""
        meta = read_saved_config(folder)
        try:
            model = cls.from_config(ModelConfig.from_dict(meta["model_cfg"]), load_pretrained=False, source_dir=folder)
        except MissingHubFiles:
            raise
        except Exception as exc:  # it parses, but spinemm / torch / transformers / open_clip refuse what it describes
            kind = "" if isinstance(exc, SpineError) else f"{type(exc).__name__}: "
            raise SpineModelError(f"{folder / CONFIG_NAME}: model_cfg does not build a model ({kind}{exc})") from exc
        load_weights(model, folder / WEIGHTS_NAME)
        if (folder / ADAPTER_CONFIG).is_file():  # saved with its LoRA adapters (not merged)
            from .lora import load_adapter

            load_adapter(model, folder)
            check_finite(model, folder / ADAPTER_WEIGHTS)
        return model.eval()  # loaded to be used: dropout off, as transformers' from_pretrained does

    def tower_sources(self) -> str:
        """Where the towers came from, for the model card: each tower's type, upstream model and
        the licence its upstream weights carry (:data:`UPSTREAM_LICENCES`)."""
        vision, text = self.config.vision, self.config.text
        upstream_v = vision.model_name or "built from its config"
        upstream_t = text.open_clip_model or text.hf_model_name or "built from its config"
        pretrained = f", weights {vision.pretrained}" if vision.pretrained not in (None, False) else ""
        weights_v = f"{upstream_v}:{vision.pretrained}" if pretrained else upstream_v
        return (f"vision: {vision.type} `{upstream_v}`{pretrained} ({upstream_licence(weights_v)}); "
                f"text: {text.type} `{upstream_t}` ({upstream_licence(upstream_t)})")

    def card_facts(self) -> dict[str, Any]:
        return {
            "title": f"spinemm model ({self.config.name})",
            "summary": "A SpineCLIP model: a vision tower over a study's three MRI series, a BERT text tower "
                       "whose 25 finding queries attend to them, and heads that grade each finding "
                       "(Normal/Mild, Moderate, Severe) and place it; also a CLIP-style dual encoder.",
            "preset": self.config.name,
            "towers": self.tower_sources(),
            "loader": 'model = spinemm.load_model("hf-hub:ORG/NAME").eval()   # or a local folder\n'
                      "with torch.no_grad():\n    outputs = model(batch)",
        }
