"""Zero-shot scoring with the dual encoder: images vs text prompts, CLIP style.

``zero_shot_classify(model, images, prompts)`` returns probabilities [N, P] (rows sum to 1):

* ``prompts``: a list of P texts, or ``{class: [templates]}``; a class embedding is the mean of its
  normalised template embeddings, renormalised (as open_clip's zero-shot classifier builder does).
* ``negative_prompts`` (CheXzero style): one negative text (or templates) per class; each class gets
  a softmax over (positive, negative), and those probabilities are renormalised over classes.
* ``images``: a tensor or array [N, C, H, W] / [N, H, W], a list of 2-D arrays, or DICOM paths.

Class embeddings are cached per (model, prompts) and rebuilt when any text-side parameter changes
(the key holds the parameters' in-place version counters, which every optimizer step bumps).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.transforms import INTENSITY_PERCENTILES
from .errors import SpineDataError, SpineModelError

Prompts = Sequence[str] | Mapping[str, Sequence[str] | str]
_CACHE_SIZE = 16
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> classifier)
_NORMALIZE_MODES = ("auto", "percentile", "none")


@dataclass
class ZeroShotClassifier:
    """Normalised class embeddings (and negatives) ready to score normalised image embeddings."""

    classes: list[str]
    weights: torch.Tensor  # [P, E]
    negatives: torch.Tensor | None = None  # [P, E]

    def __call__(self, image_embeds: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
        """image_embeds [N, E] (normalised) -> probabilities [N, P], rows summing to 1."""
        logits = logit_scale * image_embeds @ self.weights.T
        if self.negatives is None:
            return logits.softmax(dim=-1)
        # softmax over the (positive, negative) pair of each class == sigmoid of their difference
        positive = torch.sigmoid(logits - logit_scale * image_embeds @ self.negatives.T)
        return positive / positive.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _templates(prompts: Prompts) -> tuple[list[str], list[list[str]]]:
    if isinstance(prompts, str):
        raise SpineModelError(
            "prompts must be a list of texts or a {class: [templates]} mapping, not one string"
        )
    if isinstance(prompts, Mapping):
        classes = [str(c) for c in prompts]
        groups = [[v] if isinstance(v, str) else list(v) for v in prompts.values()]
    else:
        classes = [str(p) for p in prompts]
        groups = [[p] for p in classes]
    if not groups or any(not g for g in groups):
        raise SpineModelError("every class needs at least one prompt")
    return classes, groups


def _class_embeddings(model: Any, groups: list[list[str]], batch_size: int) -> torch.Tensor:
    """Mean of each class's normalised template embeddings, renormalised: [P, E]."""
    texts = [t for g in groups for t in g]
    embeds = torch.cat(
        [
            model.encode_text(texts[i : i + batch_size], normalize=True)
            for i in range(0, len(texts), batch_size)
        ]
    )
    sizes = [len(g) for g in groups]
    return F.normalize(torch.stack([chunk.mean(0) for chunk in embeds.split(sizes)]), dim=-1)


@torch.no_grad()
def build_zero_shot_classifier(
    model: Any, prompts: Prompts, negative_prompts: Prompts | None = None, batch_size: int = 64
) -> ZeroShotClassifier:
    """Encode ``prompts`` (and aligned ``negative_prompts``) once, for reuse over many images."""
    classes, groups = _templates(prompts)
    negatives = None
    if negative_prompts is not None:
        if isinstance(prompts, Mapping) and isinstance(negative_prompts, Mapping):
            if list(negative_prompts) != list(prompts):
                raise SpineModelError(
                    "negative_prompts must have the same classes, in the same order, as prompts"
                )
        _, negative_groups = _templates(negative_prompts)
        if len(negative_groups) != len(groups):
            raise SpineModelError(f"{len(negative_groups)} negative prompts for {len(groups)} classes")
    was_training = model.training
    model.eval()
    try:
        weights = _class_embeddings(model, groups, batch_size)
        if negative_prompts is not None:
            negatives = _class_embeddings(model, negative_groups, batch_size)
    finally:
        model.train(was_training)
    return ZeroShotClassifier(classes, weights, negatives)


def _cached_classifier(
    model: Any, prompts: Prompts, negative_prompts: Prompts | None, batch_size: int
) -> ZeroShotClassifier:
    def freeze(p: Prompts | None) -> Any:
        if p is None or isinstance(p, str):
            return p
        if isinstance(p, Mapping):
            return tuple((str(k), freeze(v)) for k, v in p.items())
        return tuple(freeze(v) for v in p)

    # in-place version counters change with every optimizer step, load_state_dict or LoRA merge
    params = [*model.text.parameters(), *model.text_proj.parameters()]
    key = (
        freeze(prompts),
        freeze(negative_prompts),
        tuple(p._version for p in params),
        str(params[0].device),
        params[0].dtype,
    )
    cache = _CACHE.setdefault(model, OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    classifier = build_zero_shot_classifier(model, prompts, negative_prompts, batch_size)
    cache[key] = classifier
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return classifier


@torch.no_grad()
def zero_shot_classify(
    model: Any,
    images: Any,
    prompts: Prompts,
    *,
    negative_prompts: Prompts | None = None,
    batch_size: int = 64,
    normalize: str = "auto",
) -> torch.Tensor:
    """Probabilities [N, P] of each image for each prompt (or class); rows sum to 1.

    ``normalize``: ``"auto"`` percentile-normalises inputs not already within [0, 1] (DICOM pixels,
    raw arrays); ``"percentile"`` always; ``"none"`` never (inputs must be in [0, 1]).
    """
    classifier = _cached_classifier(model, prompts, negative_prompts, batch_size)
    pixels = load_images(images, model.image_size, normalize=normalize)
    device = classifier.weights.device
    was_training = model.training
    model.eval()
    try:
        embeds = torch.cat(
            [
                model.encode_image(pixels[i : i + batch_size].to(device), normalize=True)
                for i in range(0, len(pixels), batch_size)
            ]
        )
    finally:
        model.train(was_training)
    scale = model.logit_scale.exp().clamp(max=100.0)
    return classifier(embeds, scale)


# ---------------------------------------------------------------------------------------- images


def load_images(images: Any, image_size: int, normalize: str = "auto") -> torch.Tensor:
    """Any supported image input -> float32 [N, 3, image_size, image_size] in [0, 1]."""
    if normalize not in _NORMALIZE_MODES:
        raise SpineModelError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (torch.Tensor, np.ndarray)):
        batch = torch.as_tensor(
            np.asarray(images, dtype=np.float32) if isinstance(images, np.ndarray) else images
        )
        batch = batch.float()
        if batch.ndim == 3:
            batch = batch[:, None]
        if batch.ndim != 4:
            raise SpineDataError(f"images must be [N, C, H, W] or [N, H, W], got shape {tuple(batch.shape)}")
        items = list(batch)
    else:
        items = [
            _read_dicom(Path(x))[None]
            if isinstance(x, (str, os.PathLike))
            else torch.as_tensor(np.asarray(x), dtype=torch.float32)[None]
            for x in images
        ]
    if not items:
        raise SpineDataError("no images given")
    return torch.stack([_prepare(img, image_size, normalize) for img in items])


def _prepare(image: torch.Tensor, image_size: int, normalize: str) -> torch.Tensor:
    """[C, H, W] (C = 1 or 3) -> [3, image_size, image_size] in [0, 1]."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise SpineDataError(
            f"each image must be [H, W], [1, H, W] or [3, H, W], got shape {tuple(image.shape)}"
        )
    image = image.float()
    outside = bool(image.min() < 0 or image.max() > 1)
    if normalize == "percentile" or (normalize == "auto" and outside):
        low, high = np.percentile(image.numpy(), INTENSITY_PERCENTILES)  # the dataset's intensity window
        image = ((image - low) / max(high - low, 1e-6)).clamp(0, 1)
    elif outside:
        raise SpineDataError("normalize='none' needs images in [0, 1]")
    image = image.expand(3, -1, -1)
    if image.shape[-2:] != (image_size, image_size):
        image = F.interpolate(
            image[None], size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(0, 1)
    return image


def _read_dicom(path: Path) -> torch.Tensor:
    """One greyscale DICOM slice -> [H, W] float32 physical intensities (modality LUT applied,
    MONOCHROME1 inverted)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except Exception as exc:  # pydicom raises many kinds for unreadable files
        raise SpineDataError(f"{path}: cannot read DICOM image ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise SpineDataError(f"{path}: expected one greyscale slice, got pixel array of shape {pixels.shape}")
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels  # bright means dense, as in MONOCHROME2
    return torch.from_numpy(pixels)


def crop_roi(
    image: torch.Tensor | np.ndarray, x: float, y: float, size: int, *, normalized: bool = False
) -> torch.Tensor:
    """A ``size`` x ``size`` crop of ``image [..., H, W]`` centred on column ``x``, row ``y``.

    ``x, y`` are pixels, or fractions of the width/height with ``normalized=True`` (the dataset's
    location convention). Parts outside the image are zero, so every crop has the same shape.
    """
    image = torch.as_tensor(image)
    height, width = image.shape[-2:]
    if normalized:
        x, y = x * width, y * height
    top, left = int(round(y - size / 2)), int(round(x - size / 2))
    out = image.new_zeros(*image.shape[:-2], size, size)
    r0, r1 = max(top, 0), min(top + size, height)
    c0, c1 = max(left, 0), min(left + size, width)
    if r0 < r1 and c0 < c1:
        out[..., r0 - top : r1 - top, c0 - left : c1 - left] = image[..., r0:r1, c0:c1]
    return out
