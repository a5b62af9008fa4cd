"""open_clip-style entry points: ``create_model_and_transforms`` and ``get_tokenizer``.

In open_clip the transforms turn one PIL image into a tensor; spinemm's do that too (a PIL image,
a numpy or torch slice or a DICOM path gives the tensor ``encode_image`` reads). A spinemm model reads a whole study
(three MRI series resampled to ``num_slices`` slices of ``image_size`` pixels), so its
"transforms" are :class:`SpinePreprocess` objects: called on an RSNA-layout folder they give the
:class:`~spinemm.data.SpineDataset` the model reads, augmented for training, plain for inference::

    model, preprocess_train, preprocess_val = spinemm.create_model_and_transforms("spine-tiny")
    train_set = preprocess_train(root, "train", study_ids=train_ids)
    batch = spinemm.data.collate([preprocess_val(root, "train")[0]])
    tokenizer = spinemm.get_tokenizer("spine-tiny")
    text = model.encode_text(tokenizer(["moderate spinal canal stenosis at L4/L5"]))
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SpineModelError
from ..tokenizer import SpineTokenizer
from .factory import create_model
from .names import PIPELINE_CONFIG, parse_model_name
from .spine_clip import CONFIG_NAME, SpineCLIP

__all__ = ["SpinePreprocess", "create_model_and_transforms", "get_tokenizer"]


@dataclass(frozen=True)
class SpinePreprocess:
    """How a model's input is made from a folder: ``num_slices`` slices per series, ``image_size``
    pixels, ``channels`` (``"2.5d"`` or ``"single"``), with train-time augmentation or without."""

    num_slices: int
    image_size: int
    channels: str
    augment: bool

    @classmethod
    def for_model(cls, model: SpineCLIP, *, augment: bool) -> SpinePreprocess:
        cfg = model.preprocess_cfg
        return cls(int(cfg["num_slices"]), int(cfg["image_size"]), str(cfg["channels"]), augment)

    def __call__(self, source: Any, split: str = "train", **dataset_kwargs: Any):
        """``source`` an RSNA-layout folder: a :class:`~spinemm.data.SpineDataset` of its ``split``
        as the model reads it (``dataset_kwargs``: ``study_ids``, ``store``, ``cache_dir``, ``seed``,
        ... pass through). Anything else, as open_clip's transforms take it (a PIL image, a numpy
        or torch slice, a DICOM file path): the ``[3, image_size, image_size]`` tensor the model's
        ``encode_image`` reads (:func:`~spinemm.data.images.load_images`; not augmented)."""
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            from ..data.dataset import SpineDataset

            return SpineDataset(source, split, **asdict(self), **dataset_kwargs)
        from ..data.images import load_images

        if dataset_kwargs:
            raise SpineModelError(f"{sorted(dataset_kwargs)} apply to a dataset folder, not to one image")
        # one slice, [H, W] or [C, H, W], is a batch of one; a PIL image or a path, a list of one
        batch = source[None] if isinstance(source, (np.ndarray, torch.Tensor)) else [source]
        return load_images(batch, self.image_size)[0]


def create_model_and_transforms(
    name: str | os.PathLike, pretrained: bool | str | os.PathLike | None = None, **overrides: Any
) -> tuple[SpineCLIP, SpinePreprocess, SpinePreprocess]:
    """``(model, preprocess_train, preprocess_val)``, as open_clip returns them. ``name``,
    ``pretrained`` and ``overrides`` are :func:`~spinemm.create_model`'s."""
    model = create_model(name, pretrained=pretrained, **overrides)
    return model, SpinePreprocess.for_model(model, augment=True), SpinePreprocess.for_model(model, augment=False)


def get_tokenizer(name: str | os.PathLike) -> SpineTokenizer:
    """The tokenizer of the model ``name`` (a preset, a saved folder, ``hf-hub:org/name``; see
    :mod:`spinemm.models.names`): ``tokenizer(texts) -> LongTensor [N, max_length]``.

    A saved folder's own tokenizer files are read without building the model; a preset builds its
    architecture (no upstream weights) to get the tokenizer its text tower uses.
    """
    import json

    source = parse_model_name(name, setting="get_tokenizer(name)")
    if not source.is_config:
        folder = source.saved_folder("get_tokenizer(name)")
        if (folder / PIPELINE_CONFIG).is_file():  # a pipeline's queries go through its detect model
            folder = folder / "detect"
        if (folder / "tokenizer.json").is_file() and (folder / CONFIG_NAME).is_file():
            from transformers import BertTokenizerFast

            max_length = json.loads((folder / CONFIG_NAME).read_text())["model_cfg"]["text"]["max_length"]
            return SpineTokenizer(BertTokenizerFast.from_pretrained(str(folder)), max_length)
    model = create_model(name, pretrained=False)
    if model.tokenizer is None:
        raise SpineModelError(f"model {name!r}: its text tower {type(model.text).__name__} has no tokenizer")
    return SpineTokenizer(model.tokenizer, model.config.text.max_length)
