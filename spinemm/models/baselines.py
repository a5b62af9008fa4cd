"""The paper's comparison backbones as token producers, plus the "no text" ablation.

Every vision baseline is a :class:`~spinemm.models.base.SliceEncoder`, so SpineCLIP's fusion and
heads see the same [N, S, h*w, width] tokens whichever backbone made them:

- ``"cnn"``: the paper's plain CNN (conv + ReLU + max-pool blocks, then a fully connected layer).
- ``"resnet50"`` / ``"efficientnet"``: timm ConvNets (``resnet50`` / ``efficientnet_b0``); tokens
  are the cells of the final feature map, projected to ``width``.
- ``"unet3d"``: a 3D U-Net encoder over the whole series (see :mod:`spinemm.models.unet3d`).

``"none"`` replaces the BERT text tower with one learned embedding per query text.
``TINY_VISION_CONFIGS`` hold settings that build offline in well under a second, for tests and
the backbone-comparison recipe: ``create_model("spine-tiny", vision=TINY_VISION_CONFIGS["cnn"])``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from ..errors import SpineModelError
from ..text import QUERY_TEXTS
from .base import SliceEncoder
from .config import TextConfig, VisionConfig
from .encoders import check_series  # defined in .encoders, still importable from here
from .hub import resolve_files
from .registry import BuildContext, register_text, register_vision
from .towers import TextTower
from .unet3d import UNet3DEncoder

#: Weight files of a timm model repo on the hub, safetensors preferred.
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
#: Default timm model per baseline family; ``vision.model_name`` overrides it.
TIMM_FAMILIES = {"resnet50": "resnet50", "efficientnet": "efficientnet_b0"}

_OWN_NORM = {"mean": None, "std": None, "open_clip_cfg": None}
#: Full ``vision`` overrides per baseline (real sizes): they also reset the keys a preset's ViT
#: sets (mean/std, open_clip_cfg) so each backbone uses its own normalisation.
VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "cnn": {**_OWN_NORM, "type": "cnn", "model_name": None, "pretrained": None, "kwargs": {"width": 512}},
    "resnet50": {**_OWN_NORM, "type": "resnet50", "model_name": "resnet50", "pretrained": True, "kwargs": {}},
    "efficientnet": {**_OWN_NORM, "type": "efficientnet", "model_name": "efficientnet_b0", "pretrained": True, "kwargs": {}},
    "unet3d": {**_OWN_NORM, "type": "unet3d", "model_name": None, "pretrained": None, "kwargs": {"width": 512}},
}
#: Small settings per baseline type; each builds in milliseconds offline (timm's ``test_*``
#: models stand in for the real families).
TINY_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "cnn": {**_OWN_NORM, "type": "cnn", "model_name": None, "pretrained": None, "kwargs": {"width": 32, "channels": [8, 16, 32]}},
    "resnet50": {**_OWN_NORM, "type": "resnet50", "model_name": "test_resnet", "pretrained": False,
                 "kwargs": {"output_stride": 16}},
    "efficientnet": {**_OWN_NORM, "type": "efficientnet", "model_name": "test_efficientnet", "pretrained": False,
                     "kwargs": {"output_stride": 16}},
    "unet3d": {**_OWN_NORM, "type": "unet3d", "model_name": None, "pretrained": None,
               "kwargs": {"width": 32, "channels": [8, 16, 32, 32], "decoder_stages": 1}},
}
#: The "no text" ablation's text section (its width comes from ``text.width``).
TINY_TEXT_CONFIGS: dict[str, dict[str, Any]] = {"none": {"type": "none"}}


class PlainCNN(SliceEncoder):
    """The paper's CNN baseline: [Conv3x3 -> ReLU -> MaxPool2] per stage, then FC layers.

    Each stage runs as Conv -> MaxPool -> ReLU, the same function (ReLU is monotone, so it
    commutes with a max), with the ReLU and its backward on a quarter of the values.

    Tokens are the last feature map's cells projected to ``width`` (a shared Linear, i.e. a 1x1
    conv); ``pooled`` is a fully connected layer over the whole flattened map, as in the paper.

    Args:
        image_size: input H = W (must be divisible by 2 ** len(channels)).
        width: token dim.
        channels: output channels of each conv stage; each stage halves H and W.
        in_chans: image channels C.
        negative_slope: > 0 for a leaky ReLU (not in the paper's CNN). Contrastive pretraining
            leaves a ReLU tower with a third of its last stage's channels dead (no input makes them
            positive, so nothing trains them again); a leaky channel still gets a gradient.
    """

    def __init__(
        self,
        image_size: int = 224,
        width: int = 512,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        in_chans: int = 3,
        negative_slope: float = 0.0,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        stride = 2 ** len(channels)
        if not channels or image_size % stride:
            raise SpineModelError(
                f"cnn: image_size {image_size} must be divisible by 2**len(channels) = {stride}"
            )
        self.image_size, self.width, self.in_chans = image_size, width, in_chans
        self.grid_size = (image_size // stride, image_size // stride)
        layers: list[nn.Module] = []
        for cin, cout in zip((in_chans, *channels[:-1]), channels, strict=True):
            act = nn.LeakyReLU(negative_slope, inplace=True) if negative_slope else nn.ReLU(inplace=True)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.MaxPool2d(2), act]
        self.features = nn.Sequential(*layers)
        self.token_proj = nn.Linear(channels[-1], width)
        h, w = self.grid_size
        self.fc = nn.Linear(channels[-1] * h * w, width)

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """series [N, S, C, H, W] in [0, 1] -> (tokens [N, S, h*w, width], pooled [N, S, width])."""
        n, s = check_series(series, self.in_chans, self.image_size, "cnn")
        # channels-last: the CPU's conv and max-pool kernels run ~3x faster on it than on NCHW
        # (benchmarks/RESULTS.md, "Speed and scale"); the maths is the same
        images = self.normalize(series.flatten(0, 1)).contiguous(memory_format=torch.channels_last)
        fmap = self.features(images)  # [N*S, C', h, w]
        tokens = self.token_proj(fmap.flatten(2).transpose(1, 2))  # [N*S, h*w, width]
        pooled = self.fc(fmap.flatten(1))  # [N*S, width]
        return tokens.unflatten(0, (n, s)), pooled.unflatten(0, (n, s))


class TimmConvEncoder(SliceEncoder):
    """A timm ConvNet trunk (``forward_features``) whose final feature-map cells are the tokens.

    Args:
        model_name: timm model name, e.g. ``"resnet50"``, ``"efficientnet_b0"``, ``"test_resnet"``.
        image_size: input H = W.
        width: token dim; a Linear (1x1 conv) maps the trunk's channels to it. None (default)
            keeps the trunk's channels: SpineCLIP's ``token_proj`` already maps tokens to the
            fusion width, so a second projection would only add a redundant Linear.
        weights_file: a local weight file for this architecture (resolve one with
            :func:`timm_weights_file`), or None for random init.
        in_chans: image channels C.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``output_stride=16``, ``drop_path_rate``).
    """

    def __init__(
        self,
        model_name: str,
        image_size: int = 224,
        width: int | None = None,
        weights_file: str | None = None,
        in_chans: int = 3,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            raise SpineModelError(f"unknown timm model {model_name!r}; see timm.list_models()")
        if weights_file is not None:
            timm_kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights_file)})
        self.trunk = timm.create_model(model_name, in_chans=in_chans, num_classes=0, **timm_kwargs)
        stride = timm_kwargs.get("output_stride") or self.trunk.feature_info[-1]["reduction"]
        side = -(-image_size // stride)  # stride-2 convs with "same"-style padding round up
        self.model_name, self.image_size, self.in_chans = model_name, image_size, in_chans
        self.width = width or self.trunk.num_features
        self.grid_size = (side, side)
        cfg = self.trunk.pretrained_cfg
        self.image_mean = tuple(cfg.get("mean", self.image_mean))
        self.image_std = tuple(cfg.get("std", self.image_std))
        self.proj = nn.Linear(self.trunk.num_features, width) if width else nn.Identity()

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """series [N, S, C, H, W] in [0, 1] -> (tokens [N, S, h*w, width], pooled [N, S, width])."""
        n, s = check_series(series, self.in_chans, self.image_size, self.model_name)
        fmap = self.trunk.forward_features(self.normalize(series.flatten(0, 1)))  # [N*S, F, h, w]
        tokens = self.proj(fmap.flatten(2).transpose(1, 2)).unflatten(0, (n, s))
        # Mean of projected cells == projection of the global average pool (timm's usual head).
        return tokens, tokens.mean(dim=2)


def timm_weights_file(model_name: str, pretrained: str | bool | None) -> str | None:
    """Local path of the weights ``pretrained`` asks for: None/False -> None; a str -> that file or
    folder; True -> timm's default hub weights (cache first; offline and uncached -> SpineModelError
    naming the repo to download)."""
    if pretrained in (None, False):
        return None
    if isinstance(pretrained, str):
        source = pretrained
    else:
        if not timm.is_model(model_name):
            raise SpineModelError(f"unknown timm model {model_name!r}; see timm.list_models()")
        source = timm.models.get_pretrained_cfg(model_name).hf_hub_id
        if not source:
            raise SpineModelError(f"timm model {model_name!r} has no hub weights; set vision.pretrained to a file")
    return str(resolve_files(source, [TIMM_WEIGHTS], setting="vision.pretrained")[TIMM_WEIGHTS[0]])


class LearnedQueries(TextTower):
    """The "no text" ablation: one learned embedding per query text instead of a text encoder.

    A text's embedding is looked up by its position in :data:`spinemm.text.QUERY_TEXTS`, so the
    model still gets 25 distinct queries but no language prior; any other text is an error.
    """

    def __init__(self, width: int = 512, init_std: float = 0.02) -> None:
        super().__init__()
        self.width = width
        self.index = {text: i for i, text in enumerate(QUERY_TEXTS)}
        self.embed = nn.Parameter(torch.randn(len(QUERY_TEXTS), width) * init_std)

    def indices(self, texts: Sequence[str]) -> torch.Tensor:
        """Query positions [T] of ``texts``; raises SpineModelError for a text outside QUERY_TEXTS."""
        try:
            idx = [self.index[t] for t in texts]
        except KeyError as err:
            raise SpineModelError(
                f"text tower 'none' only knows the {len(QUERY_TEXTS)} query texts of spinemm.text.QUERY_TEXTS; "
                f"got {err.args[0]!r} (free text such as zero-shot prompts needs a real text tower)"
            ) from None
        return torch.tensor(idx, dtype=torch.long, device=self.embed.device)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """texts (N strings) -> (tokens [N, 1, width], mask [N, 1] all True, pooled [N, width])."""
        if isinstance(texts, str):
            raise SpineModelError("encode() takes a list of texts, not one string")
        pooled = self.embed[self.indices(texts)]
        mask = torch.ones(len(texts), 1, dtype=torch.bool, device=pooled.device)
        return pooled.unsqueeze(1), mask, pooled


# ----------------------------------------------------------------------------------------- builders

def _construct(cls: type, cfg: VisionConfig, **fixed: Any) -> SliceEncoder:
    """``cls(image_size=cfg.image_size, **fixed, **cfg.kwargs)`` with mean/std synced both ways."""
    kwargs = dict(cfg.kwargs)
    params = inspect.signature(cls).parameters
    reserved = set(fixed) | {"image_size"}  # set from other config keys
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    bad = sorted(k for k in kwargs if k in reserved or not (takes_any or k in params))
    if bad:
        raise SpineModelError(f"vision.kwargs {bad} are not options of vision.type {cfg.type!r}; "
                              f"valid: {sorted(set(params) - reserved - {'kwargs', 'timm_kwargs'})}")
    encoder = cls(image_size=cfg.image_size, **fixed, **kwargs)
    if cfg.mean is not None:
        encoder.image_mean = tuple(cfg.mean)
    if cfg.std is not None:
        encoder.image_std = tuple(cfg.std)
    cfg.mean, cfg.std = tuple(encoder.image_mean), tuple(encoder.image_std)
    return encoder


@register_vision("cnn")
def build_cnn(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder:
    """The paper's plain CNN; ``vision.kwargs``: width, channels, in_chans, negative_slope."""
    return _construct(PlainCNN, cfg)


@register_vision("unet3d")
def build_unet3d(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder:
    """3D U-Net encoder; ``vision.kwargs``: width, channels, decoder_stages, in_chans."""
    return _construct(UNet3DEncoder, cfg)


def _build_timm_family(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder:
    model_name = cfg.model_name or TIMM_FAMILIES[cfg.type]
    if not timm.is_model(model_name):  # e.g. a preset's "ViT-B-16" left in place by an override
        raise SpineModelError(f"vision.model_name {model_name!r} is not a timm model; for vision.type "
                              f"{cfg.type!r} set it to a timm name or null (default {TIMM_FAMILIES[cfg.type]})")
    cfg.model_name = model_name  # saved configs rebuild the same trunk
    # A saved model's own weights follow its rebuild, so upstream weights are fetched only on creation.
    weights = timm_weights_file(model_name, cfg.pretrained) if ctx.load_pretrained else None
    return _construct(TimmConvEncoder, cfg, model_name=model_name, weights_file=weights)


@register_vision("resnet50")
def build_resnet50(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder:
    """timm ResNet (``vision.model_name``, default resnet50); ``vision.kwargs``: width + timm options."""
    return _build_timm_family(cfg, ctx)


@register_vision("efficientnet")
def build_efficientnet(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder:
    """timm EfficientNet (default efficientnet_b0); ``vision.kwargs``: width + timm options."""
    return _build_timm_family(cfg, ctx)


@register_text("none")
def build_no_text(cfg: TextConfig, ctx: BuildContext) -> TextTower:
    """The no-text ablation: learned queries of ``text.width`` dims (``text.kwargs``: init_std)."""
    bad = sorted(set(cfg.kwargs) - {"init_std"})
    if bad:
        raise SpineModelError(f"text.kwargs {bad} are not options of text.type 'none'; valid: ['init_std']")
    return LearnedQueries(width=cfg.width, **cfg.kwargs)
