"""Model configs: JSON files (``models/configs/*.json``) turned into dataclasses, open_clip style.

A config names every choice that changes the architecture. Tower configs carry a ``type`` key
that picks a builder from :mod:`spinemm.models.registry`. After a model is built, builders write the
upstream architecture they resolved (``vision.open_clip_cfg``, ``text.hf_config``, mean/std) back
into the config, so a saved folder rebuilds offline without asking the hub anything.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpineModelError, unknown_key

CHANNEL_MODES = ("2.5d", "single")


@dataclass
class VisionConfig:
    """Vision tower (a :class:`~spinemm.models.base.SliceEncoder`).

    ``type``: registry key: ``"open_clip"`` (native ViT or timm tower of an open_clip model),
    ``"timm"`` (any timm backbone), or one registered by :mod:`spinemm.models.baselines`.
    ``model_name``: open_clip name (``"ViT-B-16"``), ``"hf-hub:org/repo"``, or a timm model name.
    ``pretrained``: an open_clip tag (``"openai"``) or a local weights file / folder. An
    ``hf-hub:`` model loads its repo's weights unless this is ``False``; a timm model loads its
    default weights when ``True``; otherwise ``None`` means random init.
    ``mean`` / ``std``: input normalisation; ``None`` takes the pretrained weights' own.
    ``open_clip_cfg``: an open_clip model config (``{"embed_dim", "quick_gelu", "vision_cfg"}``);
    written on creation for named models, or given directly for a custom ViT (the tiny preset).
    ``convert_attention``: swap ``nn.MultiheadAttention`` for Linear-projection attention (LoRA,
    torch.compile). ``kwargs``: free-form options for registered builders (baselines).
    """

    type: str = "open_clip"
    model_name: str | None = None
    pretrained: str | bool | None = None
    image_size: int = 224
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    open_clip_cfg: dict[str, Any] | None = None
    convert_attention: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextConfig:
    """Text tower (a :class:`~spinemm.models.towers.TextTower`).

    ``type``: registry key: ``"bert"`` or ``"none"`` (learned queries, the no-text ablation).
    ``hf_model_name``: a BERT on the hub (``"bert-base-uncased"``) or a local folder; ``None`` builds a
    fresh BERT of ``width/layers/heads/intermediate_size`` with the offline tokenizer.
    ``open_clip_model``: take the HF text tower of this open_clip model (``"hf-hub:..."`` or a local
    folder), e.g. BiomedCLIP's PubMedBERT with its pretrained projection; ``hf_model_name`` then
    only says where that BERT's ``config.json`` lives (default: the open_clip config's name).
    ``pretrained``: load upstream weights (``False``: architecture only).
    ``hf_config`` / ``open_clip_text_cfg``: resolved on creation so saved folders rebuild offline.
    """

    type: str = "bert"
    hf_model_name: str | None = None
    open_clip_model: str | None = None
    pretrained: bool = True
    width: int = 64
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 128
    max_length: int = 64
    pooler: str = "cls"
    hf_config: dict[str, Any] | None = None
    open_clip_text_cfg: dict[str, Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class FusionConfig:
    """Query decoder: ``layers`` x (self-attn over queries, cross-attn to own-plane tokens, MLP)."""

    dim: int = 256
    layers: int = 2
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    loc_dim: int = 64
    # A learned embedding per query (target column) added to its text embedding. Templated texts
    # that differ in one word ("left" / "right") embed almost alike (cosine 0.99 in a small BERT), so
    # without it the localiser cannot tell the two sides apart.
    learned_queries: bool = False


@dataclass
class GraderConfig:
    """The grade stage's model (``spinemm.models.grader``, run by ``spinemm.pipeline.GradeStage``):
    grade 2.5D crops of the original slices at each finding's located point."""

    side_mm: float = 60.0  # side of the crop in patient millimetres
    size: int = 32  # pixels the crop is resampled to
    context: int = 1  # neighbouring original slices on each side (channels = 1 + 2 * context)
    # "clip": the encoder's vision tower (open_clip's, or any SliceEncoder: grader.towers), queried
    # by its BERT text tower (spinemm.models.crop_grader); "cnn": a small ConvNet modulated by
    # constant query embeddings (spinemm.models.grader), or a timm model name for that trunk
    backbone: str = "clip"
    channels: tuple[int, ...] = (32, 64, 96)  # "cnn": output channels of each conv stage
    queries: str = "text"  # "clip": "text" (finding_text through BERT) or "learned" (no-text ablation)
    layers: int = 1  # "clip": decoder layers of the query over the crop's tokens
    dropout: float = 0.1  # "clip": dropout of the query decoder; "cnn": before the classifier
    refine: int = 1  # times the offset head re-centres the crop; the grade is the mean over every pass
    # Grade each finding with the rest of its study in view (StudyContext): degeneration is shared
    # across a patient's spine and across the conditions of one disc level, so 25 noisy readings
    # say more together than apart. train_stages fits it on the validation studies.
    study_context: bool = True
    # Read each right-sided finding mirrored, as its left twin (spinemm.data.sides), so one grader
    # learns both sides of a condition from twice the samples
    fold_sides: bool = False

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # JSON gives a list


@dataclass
class LocatorConfig:
    """Second-stage localiser (``spinemm.models.locator``): a heatmap per disc level on whole
    sagittal slices at ``size`` pixels, where the fusion model's coarse patch grid (about one cell
    per disc on the tiny preset) confuses neighbouring levels (run by ``spinemm.pipeline.LocateStage``)."""

    size: int = 96  # pixels each sagittal slice is resampled to; the heatmaps are size / 4 a side
    context: int = 1  # neighbouring slices on each side (channels = 1 + 2 * context)
    channels: tuple[int, ...] = (16, 32, 64, 96)  # conv stages, each halving the side
    # sd (mm) of the Gaussian that holds each foramen's level near its level's canal height; None: off
    prior_mm: float | None = 12.0
    # Per level, how far (mm, patient left-right) each neural foramen lies from the midline; the
    # stage puts each foramen on the slice that far to its own side of the canal points. Measured
    # on the training labels by spinemm.training.locate; None keeps the first stage's slices.
    foramen_mm: tuple[float, ...] | None = None
    # Per side (left, right) and level, the offset (x, y, z; patient mm) of each subarticular zone
    # from its level's canal point (spinemm.data.anatomy): the stage puts each subarticular finding
    # there, on the axial slice through it. Measured on the training labels by
    # spinemm.training.locate; None keeps the first stage's in-plane point.
    subarticular_mm: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # JSON gives a list
        if self.foramen_mm is not None:
            self.foramen_mm = tuple(float(v) for v in self.foramen_mm)
            if len(self.foramen_mm) != 5 or not all(0 < v < 100 for v in self.foramen_mm):
                raise SpineModelError(f"locator.foramen_mm must be 5 distances in mm (one per level, "
                                      f"each in (0, 100)), got {self.foramen_mm}")
        if self.subarticular_mm is not None:
            self.subarticular_mm = tuple(float(v) for v in self.subarticular_mm)
            if len(self.subarticular_mm) != 30 or not all(abs(v) < 100 for v in self.subarticular_mm):
                raise SpineModelError(f"locator.subarticular_mm must be 30 offsets in mm (x, y, z for each "
                                      f"side and level, each within 100 mm), got {self.subarticular_mm}")


@dataclass
class ModelConfig:
    """A whole :class:`~spinemm.models.spine_clip.SpineCLIP`: towers, fusion and preprocessing."""

    name: str = "custom"
    embed_dim: int = 512
    num_slices: int = 16
    channels: str = "2.5d"
    logit_scale_init: float = math.log(1 / 0.07)
    # Side, in patient mm, of the finding crops the dual encoder is contrastively pretrained on
    # (recipes/pretrain_clip.py); zero-shot crops should be cut the same way (spinemm.zero_shot).
    roi_side_mm: float = 60.0
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Strict parse: unknown keys raise :class:`SpineModelError` naming the key."""
        sections = {"vision": VisionConfig, "text": TextConfig, "fusion": FusionConfig}
        data = dict(data)
        fusion = dict(data.get("fusion") or {})
        if fusion.pop("roi_crop", 0.0):  # saved before 0.2; the grade stage reads crops now
            raise SpineModelError("fusion.roi_crop was removed in spinemm 0.2: the grade stage reads the crops")
        for key in ("roi_teacher_forcing", "roi_jitter"):
            fusion.pop(key, None)
        if "fusion" in data:
            data["fusion"] = fusion
        for stage in ("grader", "locator"):  # saved before 0.2, when the stages hung off the model
            if (data.pop(stage, None) or {}).get("enabled"):
                raise SpineModelError(f"this model was saved with a {stage} attached to it, by a spinemm before "
                                      f"0.2 (no staged pipeline); retrain the second stages (recipes/train_stages.py)")
        top = _check_keys(cls, data, "")
        for key, sub in sections.items():
            if key in top:
                value = top[key]
                if not isinstance(value, Mapping):
                    raise SpineModelError(
                        f"model config key {key!r} must be a mapping, got {type(value).__name__}"
                    )
                top[key] = sub(**_check_keys(sub, value, key + "."))
        cfg = cls(**top)
        for attr in ("mean", "std"):
            value = getattr(cfg.vision, attr)
            if isinstance(value, (list, tuple)):
                setattr(cfg.vision, attr, tuple(float(v) for v in value))
        if cfg.channels not in CHANNEL_MODES:
            raise SpineModelError(
                f"model config 'channels' must be one of {CHANNEL_MODES}, got {cfg.channels!r}"
            )
        check_config(cfg, "model config ")
        for key in sections:
            check_config(getattr(cfg, key), f"model config {key}.")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    def preprocess(self, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
        """What a dataset must feed this model (written beside the weights as ``preprocess_cfg``)."""
        return {
            "image_size": self.vision.image_size,
            "num_slices": self.num_slices,
            "channels": self.channels,
            "mean": list(mean),
            "std": list(std),
        }


#: Bounds of numeric config values, checked before any module is built, so a ``config.json`` or
#: ``pipeline.json`` asking for 100,000 layers or a 10^7-wide embedding is refused at once instead
#: of allocating gigabytes first. Generous: the base presets (ViT-B/16, BERT-base) sit far inside.
BOUNDS: dict[str, tuple[float, float]] = {
    "ModelConfig.embed_dim": (1, 8192), "ModelConfig.num_slices": (1, 256), "ModelConfig.roi_side_mm": (1, 500),
    "ModelConfig.logit_scale_init": (-10, 10),
    "VisionConfig.image_size": (8, 2048),
    "TextConfig.width": (1, 8192), "TextConfig.layers": (0, 64), "TextConfig.heads": (1, 128),
    "TextConfig.intermediate_size": (1, 32768), "TextConfig.max_length": (1, 4096),
    "FusionConfig.dim": (1, 8192), "FusionConfig.layers": (0, 64), "FusionConfig.heads": (1, 128),
    "FusionConfig.mlp_ratio": (0.25, 16), "FusionConfig.dropout": (0, 0.99), "FusionConfig.loc_dim": (1, 4096),
    "LocatorConfig.size": (8, 1024), "LocatorConfig.context": (0, 8), "LocatorConfig.channels": (1, 2048),
    "LocatorConfig.prior_mm": (0.1, 1000),
    "GraderConfig.side_mm": (1, 500), "GraderConfig.size": (4, 512), "GraderConfig.context": (0, 8),
    "GraderConfig.channels": (1, 2048), "GraderConfig.layers": (0, 32), "GraderConfig.dropout": (0, 0.99),
    "GraderConfig.refine": (0, 16),
}


def check_config(cfg: Any, where: str = "") -> None:
    """Every field of the config dataclass ``cfg`` against its type and :data:`BOUNDS`; a value of
    the wrong type or out of bounds is a :class:`SpineModelError` naming ``where`` and the key."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}{f.name}"
        if not _fits(value, hints[f.name]):
            raise SpineModelError(f"{key} must be {_describe(hints[f.name])}, got {value!r}")
        low, high = BOUNDS.get(f"{type(cfg).__name__}.{f.name}", (-math.inf, math.inf))
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not low <= v <= high:
                raise SpineModelError(f"{key} = {value!r} is outside {low:g}..{high:g} "
                                      f"(spinemm.models.config.BOUNDS)")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _check_keys(cls: type, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise unknown_key(prefix + unknown[0], (prefix + n for n in names), "model config")
    return dict(data)


def config_from_dict(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """The config dataclass ``cls`` from a mapping (a JSON / YAML section): an unknown key names
    the nearest known one, and every value is typed and bounded (:func:`check_config`); errors are
    :class:`SpineModelError` starting with ``where`` (e.g. ``"pipeline.json: grade."``)."""
    if not isinstance(values, Mapping):
        raise SpineModelError(f"{where.rstrip('.')} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise unknown_key(unknown[0], names, where.rstrip(". "))
    try:
        config = cls(**values)
    except (TypeError, ValueError) as err:
        raise SpineModelError(f"{where.rstrip('.')}: bad {cls.__name__}: {err}") from None
    check_config(config, where)
    return config


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``.

    Keys may be dotted (``{"fusion.layers": 4}``) or nested (``{"fusion": {"layers": 4}}``);
    mappings merge key by key, anything else replaces.
    """
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise SpineModelError(f"override {key!r}: {part!r} is not a config section")
            node = child
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = merge_overrides(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return out
