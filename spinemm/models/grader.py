"""The ROI grader: severity logits from a 2.5D crop of the original slices, conditioned on the query text.

Localise, then classify at full resolution (the recipe of the strongest RSNA 2024 solutions). The
pipeline's earlier stages find each (condition, level); the grader (``spinemm.pipeline.GradeStage``)
then reads a crop of the original slices around that point (``spinemm.data.roi``) and grades it. The crop's
features are modulated (FiLM) by the query's text embedding, the same embedding that drives the
fusion decoder, so one grader serves all 25 (condition, level) queries.

:class:`StudyContext` (``study_context``) then reads a study's grades together: each finding's
log-probabilities, a temperature, and the mean expected grade of its study and of its disc level.
It has ten parameters, fitted on held-out studies at the predicted locations (``train_stages``):
learned jointly with the grader, the study's mean features let it memorise training studies.

``backbone="cnn"`` is a small ConvNet built here (fast on a CPU, enough for the phantom); any timm
model name gives that trunk instead, randomly initialised (pretrained timm weights need the hub:
load them into ``pipeline.grade.grader.encoder`` yourself where you have it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..constants import NUM_TARGETS
from ..errors import SpineModelError
from .config import GraderConfig


def _conv_trunk(in_chans: int, channels: tuple[int, ...]) -> nn.Sequential:
    """Conv3x3 -> BN -> ReLU stages, halving the side between stages, then global average pooling."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip((in_chans, *channels[:-1]), channels, strict=True)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class ROIGrader(nn.Module):
    """crops [N, 1 + 2 * context, size, size] in [0, 1] + label columns [N] -> severity logits and
    the finding's offset from the crop centre."""

    def __init__(self, config: GraderConfig, query_dim: int, num_classes: int = 3) -> None:
        super().__init__()
        self.config = config
        in_chans = 1 + 2 * int(config.context)
        if config.backbone == "cnn":
            if not config.channels:
                raise SpineModelError("grader.channels must list at least one conv stage")
            self.encoder = _conv_trunk(in_chans, tuple(config.channels))
            width = int(config.channels[-1])
        else:
            import timm

            try:
                self.encoder = timm.create_model(config.backbone, pretrained=False, num_classes=0, in_chans=in_chans)
            except RuntimeError as err:  # timm's "Unknown model"
                raise SpineModelError(f"grader.backbone {config.backbone!r}: {err}") from None
            width = int(self.encoder.num_features)
        self.width = width
        self.film = nn.Linear(query_dim, 2 * width)
        nn.init.zeros_(self.film.weight)  # start as the plain trunk; the text learns to modulate it
        nn.init.zeros_(self.film.bias)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, width), nn.GELU(),
                                  nn.Linear(width, num_classes))
        # Where the finding lies relative to the crop's centre: (x, y) as fractions of the crop side
        # and the slice, in slices. Trained on the known shifts of the training crops; used to
        # re-centre the crop before grading.
        self.offset = nn.Linear(width, 3)
        # one constant embedding per label column (the detect stage's query text, set by training)
        self.register_buffer("query_table", torch.zeros(NUM_TARGETS, query_dim))

    def encode_queries(self, texts: object, targets: torch.Tensor) -> torch.Tensor:
        """``[N, query_dim]``: each label column's constant embedding (``texts`` is not read)."""
        return self.query_table[targets.to(self.query_table.device)]

    def forward(self, crops: torch.Tensor, targets: torch.Tensor, texts: object = None,
                queries: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """-> ``{"logits": [N, classes], "offset": [N, 3]}`` (x, y as fractions of the side; slices).
        ``targets [N]``: each crop's label column; ``queries``: :meth:`encode_queries`, if at hand."""
        expected = 1 + 2 * int(self.config.context)
        if crops.ndim != 4 or crops.shape[1] != expected:
            raise SpineModelError(f"grader crops must be [N, {expected}, H, W], got {tuple(crops.shape)}")
        features = self.encoder((crops - 0.5) / 0.5)  # [N, width]
        queries = self.encode_queries(texts, targets) if queries is None else queries
        scale, shift = self.film(queries).chunk(2, dim=-1)
        features = features * (1 + scale) + shift
        return {"logits": self.head(features), "offset": self.offset(features)}


class StudyContext(nn.Module):
    """Per-crop log-probabilities ``[N, K]`` of one or more studies -> logits ``[N, K]`` that also
    weigh the mean expected grade of the finding's study and of its disc level.

    ``logits = temperature * log_probs + bias + W @ (study mean grade, level mean grade)``. It
    starts as the identity (temperature 1, everything else 0).
    """

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(1))
        self.mix = nn.Linear(2, num_classes)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, log_probs: torch.Tensor, levels: torch.Tensor, studies: torch.Tensor | None = None) -> torch.Tensor:
        """``levels [N]``: each finding's disc level (0..4); ``studies [N]``: its study (any integer
        ids; ``None``: one study)."""
        if log_probs.ndim != 2 or levels.shape != log_probs.shape[:1]:
            raise SpineModelError(f"StudyContext needs log_probs [N, K] and levels [N], got "
                                  f"{tuple(log_probs.shape)} and {tuple(levels.shape)}")
        studies = torch.zeros_like(levels) if studies is None else studies.to(levels.device)
        classes = torch.arange(log_probs.shape[-1], dtype=log_probs.dtype, device=log_probs.device)
        grade = (log_probs.exp() * classes).sum(-1, keepdim=True)  # expected grade, [N, 1]
        by_study = _group_mean(grade, studies[:, None])
        by_level = _group_mean(grade, torch.stack([studies, levels], dim=1))
        return self.log_temperature.exp() * log_probs + self.mix(torch.cat([by_study, by_level], dim=-1))


def _group_mean(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Each row of ``values [N, D]`` replaced by the mean of the rows sharing its key row (``keys [N, K]``)."""
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    count = int(group.max()) + 1
    sums = values.new_zeros(count, values.shape[-1]).index_add_(0, group, values)
    sizes = torch.bincount(group, minlength=count).to(values.dtype)
    return (sums / sizes[:, None])[group]
