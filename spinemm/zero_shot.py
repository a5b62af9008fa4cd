"""Zero-shot scoring with the dual encoder: images vs text prompts, CLIP style.

``zero_shot_classify(model, images, prompts)`` returns probabilities [N, P] (rows sum to 1):

* ``prompts``: a list of P texts, or ``{class: [templates]}``; a class embedding is the mean of its
  normalised template embeddings, renormalised (as open_clip's zero-shot classifier builder does).
* ``negative_prompts`` (CheXzero style): one negative text (or templates) per class; each class gets
  a softmax over (positive, negative), and those probabilities are renormalised over classes.
* ``images``: a tensor or array [N, C, H, W] / [N, H, W], a list of [H, W] / [C, H, W] arrays, or
  DICOM paths.
  A pretrained dual encoder has seen crops around findings (:func:`crop_finding`, with the
  model's ``config.roi_side_mm``), so score crops like those, not whole slices.

Class embeddings are cached per (model, prompts) and rebuilt when any text-side parameter changes
(the key holds the parameters' in-place version counters, which every optimizer step bumps).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data.dicom import read_slice
from .data.images import load_images
from .data.transforms import intensity_window, to_unit_range
from .errors import SpineDataError
from .models.prompt_classifier import Prompts, ZeroShotClassifier, build_zero_shot_classifier

_CACHE_SIZE = 16
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> classifier)


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


def crop_finding(
    image: str | os.PathLike | torch.Tensor | np.ndarray,
    x: float,
    y: float,
    *,
    side_mm: float,
    size: int,
    pixel_spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """A crop ``[1, size, size]`` in [0, 1] of a slice around column ``x``, row ``y`` (pixels), with
    a side of ``side_mm`` patient millimetres: the crops the dual encoder is pretrained on (pass
    ``side_mm=model.config.roi_side_mm``, ``size=model.image_size``).

    ``image`` is a DICOM path (its PixelSpacing is read unless ``pixel_spacing`` is given) or an
    ``[H, W]`` array of intensities with ``pixel_spacing = (row mm, column mm)``. The slice is
    windowed to its own 0.5/99.5 percentiles; pretraining windows a whole series, which on a typical
    series differs little. Parts of the crop past the image's edge are zero; a point outside the
    image is a :class:`SpineDataError` (its crop would be all or mostly zeros, read as a finding).
    """
    from .data.roi import crop_roi

    if isinstance(image, (str, os.PathLike)):
        pixels, recorded = read_slice(image)
        pixels = torch.from_numpy(pixels)
        if pixel_spacing is None and recorded is None:
            raise SpineDataError(f"{image}: no PixelSpacing (0028,0030); pass pixel_spacing=(row mm, column mm)")
        pixel_spacing = pixel_spacing or recorded
    else:
        pixels = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if pixel_spacing is None:
        raise SpineDataError("crop_finding needs pixel_spacing=(row mm, column mm) for an array image")
    if pixels.ndim != 2:
        raise SpineDataError(f"crop_finding needs one [H, W] slice, got shape {tuple(pixels.shape)}")
    h, w = pixels.shape
    if not (np.isfinite(x) and np.isfinite(y) and -0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5):
        raise SpineDataError(f"crop_finding: the point (x={x:g}, y={y:g}) lies outside the {w} x {h} px image "
                             f"(x from 0 to {w - 1}, y from 0 to {h - 1})")
    unit = to_unit_range(pixels.numpy(), intensity_window(pixels.numpy()))
    return crop_roi(unit[None], pixel_spacing, 0, x, y, side_mm, size, slice_offsets=(0,))
