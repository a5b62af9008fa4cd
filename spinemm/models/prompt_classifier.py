"""Zero-shot classifiers from text prompts, CLIP style: the class embeddings a dual encoder's text
tower gives a set of prompts, ready to score image embeddings (:func:`spinemm.zero_shot_classify`
reads images into them; pretraining scores its held-out crops with them).

A class embedding is the mean of its normalised template embeddings, renormalised (as open_clip's
zero-shot classifier builder does); negative prompts (CheXzero style) give each class a softmax over
(positive, negative), renormalised over classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SpineModelError

__all__ = ["Prompts", "ZeroShotClassifier", "build_zero_shot_classifier"]

#: A list of P texts, or ``{class: [templates]}`` (or ``{class: text}``).
Prompts = Sequence[str] | Mapping[str, Sequence[str] | str]


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
