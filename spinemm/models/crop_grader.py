"""The CLIP crop grader: a finding's metadata text attends to its crop's patch tokens.

SpineCLIP's dual encoder, applied to one finding at a time:

1. the 2.5D crop (the finding's slice and its neighbours as channels) goes through the encoder's
   vision tower (open_clip's ViT, as contrastive pretraining trained it, or any
   :class:`~spinemm.models.base.SliceEncoder`; a volumetric one reads the slices as depth): its
   tokens and its pooled embedding become the memory, ``token_proj`` + LayerNorm;
2. the finding's metadata text (:func:`spinemm.text.finding_text`: series, level, condition and
   side, pixel spacing, slice gap, tilt) goes through the encoder's BERT text tower, each distinct
   text once per call, ``query_proj``: the query;
3. ``layers`` decoder layers let the query cross-attend to the memory; heads give the severity
   logits and the finding's offset from the crop centre (x, y in crop sides, slices).

``queries="learned"`` replaces the text by one learned vector per label column: the no-text
ablation of the paper's comparison. The projections start as the encoder's own fusion
projections, so a detect model's or a pretrained model's alignment carries over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import NUM_TARGETS
from ..errors import SpineModelError
from .config import GraderConfig
from .fusion import DecoderLayer
from .spine_clip import SpineCLIP


class CropGrader(nn.Module):
    """crops ``[N, C, H, W]`` in [0, 1] + texts (N strings) or targets ``[N]`` -> severity logits and offset."""

    def __init__(self, encoder: SpineCLIP, config: GraderConfig, num_classes: int = 3) -> None:
        super().__init__()
        if config.queries not in ("text", "learned"):
            raise SpineModelError(f"grader.queries must be 'text' or 'learned', got {config.queries!r}")
        if int(config.context) != 1:  # the vision tower reads 3 channels: a slice and its neighbours
            raise SpineModelError(f"the clip grader reads 2.5D crops of 3 slices (grader.context=1), "
                                  f"got context={config.context}")
        self.config = config
        self.encoder = encoder  # vision + text towers; its series fusion path is not used here
        dim = encoder.config.fusion.dim
        self.token_proj = nn.Linear(encoder.vision.width, dim)
        self.token_proj.load_state_dict(encoder.token_proj.state_dict())
        self.pooled_proj = nn.Linear(encoder.vision.width, dim)
        self.pooled_proj.load_state_dict(encoder.token_proj.state_dict())
        self.memory_norm = nn.LayerNorm(dim)
        if config.queries == "text":
            self.query_proj = nn.Linear(encoder.text.width, dim)
            self.query_proj.load_state_dict(encoder.query_proj.state_dict())
            self.query_embed = None
        else:
            self.query_proj = None
            self.query_embed = nn.Parameter(torch.randn(NUM_TARGETS, dim))
        heads = int(encoder.config.fusion.heads)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, encoder.config.fusion.mlp_ratio, config.dropout)
                                    for _ in range(int(config.layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.offset = nn.Linear(dim, 3)

    def memory(self, crops: torch.Tensor) -> torch.Tensor:
        """crops ``[N, C, H, W]`` -> memory ``[N, 1 + T, dim]``: the pooled embedding, then the
        tokens (a 2-D tower reads the C slices as the image's channels; a volumetric one, the 3D
        U-Net, reads them as depth, each slice in every channel)."""
        size = self.encoder.image_size
        if crops.shape[-2:] != (size, size):
            crops = F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        vision = self.encoder.vision
        if vision.volumetric:
            stack = crops[:, :, None].expand(-1, -1, vision.in_chans, -1, -1)  # [N, S=C, in_chans, H, W]
            tokens, pooled = vision(stack)  # [N, S, h*w, width], [N, S, width]
            tokens, pooled = tokens.flatten(1, 2), pooled.mean(dim=1)
        else:
            tokens, pooled = vision(crops[:, None])  # one "slice" of C channels
            tokens, pooled = tokens[:, 0], pooled[:, 0]
        memory = torch.cat([self.pooled_proj(pooled)[:, None], self.token_proj(tokens)], dim=1)
        return self.memory_norm(memory)

    def encode_queries(self, texts: Sequence[str] | None, targets: torch.Tensor) -> torch.Tensor:
        """``[N, dim]``: each finding's text through the text tower (each distinct text once), or
        its label column's learned query."""
        if self.query_embed is not None:
            return self.query_embed[targets]
        if texts is None or len(texts) != len(targets):
            raise SpineModelError(f"the text grader needs one text per crop: {len(targets)} crops, "
                                  f"{'no' if texts is None else len(texts)} texts")
        features, index = self.text_features(texts)
        return self.query_proj(features)[index.to(features.device)]

    def text_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower's pooled features of each distinct text, ``[U, text width]``, and each
        text's row in them ``[N]``. With the text tower frozen these can be computed once, before
        training (``grader.train_text: false``), and given to :meth:`forward` as ``text_features``."""
        unique = list(dict.fromkeys(texts))
        pooled = self.encoder.text.pooled(unique)
        position = {t: i for i, t in enumerate(unique)}
        return pooled, torch.tensor([position[t] for t in texts], dtype=torch.long)

    def forward(self, crops: torch.Tensor, targets: torch.Tensor, texts: Sequence[str] | None = None,
                queries: torch.Tensor | None = None, need_attention: bool = False,
                text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """-> ``{"logits": [N, classes], "offset": [N, 3]}``; ``queries``: :meth:`encode_queries`,
        if at hand (the grade stage encodes a whole record's texts once); ``text_features``: each
        crop's row of :meth:`text_features`, ``[N, text width]``, computed once by a caller whose
        text tower is frozen (``query_proj`` still learns on them). ``need_attention`` adds
        ``"attention"``: each decoder layer's cross-attention of the query over the memory,
        head-averaged, ``[N, layers, 1 + T]`` (index 0 the pooled embedding, then the tokens; see
        :meth:`token_grid`). The outputs are the same maths either way (float rounding aside)."""
        expected = 1 + 2 * int(self.config.context)
        if crops.ndim != 4 or crops.shape[1] != expected:
            raise SpineModelError(f"grader crops must be [N, {expected}, H, W], got {tuple(crops.shape)}")
        memory = self.memory(crops)
        if queries is None and text_features is not None:
            if self.query_proj is None:
                raise SpineModelError("text_features need a text-queried grader (grader.queries='text')")
            queries = self.query_proj(text_features)
        if queries is None:
            queries = self.encode_queries(texts, targets.to(memory.device))
        query = queries[:, None]  # [N, 1, dim]
        weights = []
        for layer in self.layers:
            query, attention = layer(query, memory, None, need_weights=need_attention)
            weights.append(attention)
        query = self.norm(query[:, 0])
        out = {"logits": self.head(query), "offset": self.offset(query)}
        if need_attention:
            out["attention"] = torch.stack([w[:, 0] for w in weights], dim=1)  # [N, layers, 1 + T]
        return out

    def token_grid(self) -> tuple[int, int, int]:
        """How the T memory tokens lie over the crop: (slices, h, w), so ``attention[..., 1:]``
        reshapes to ``[..., slices, h, w]`` (slices is 1 for a 2-D tower)."""
        vision = self.encoder.vision
        h, w = vision.grid_size
        return (1 + 2 * int(self.config.context) if vision.volumetric else 1), h, w
