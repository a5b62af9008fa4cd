"""Side folding: a right-sided finding read mirrored, as its left twin, so one grader learns both
sides from twice the samples (as top RSNA 2024 solutions folded left and right).

The mirror follows the plane: on a sagittal series the patient's left-right axis is the slice axis,
so a neural foramen's crop has its slices reversed (its lateral neighbour becomes the left twin's);
on an axial series it is the image's columns, so a subarticular crop is flipped left to right. The
crop's offset from the finding is mirrored the same way (slice offset, or x offset).
"""

from __future__ import annotations

import numpy as np
import torch

from ..constants import CONDITION_PLANE, CONDITIONS, LABEL_COLUMNS, LEFT_TWIN, LEVELS

__all__ = ["folded_targets", "mirror_crops", "mirror_offsets"]

_COLUMN = {name: i for i, name in enumerate(LABEL_COLUMNS)}
_TWIN = np.array([_COLUMN[f"{LEFT_TWIN.get(c, c)}_{lv}"] for c in CONDITIONS for lv in LEVELS])
_SAGITTAL = np.array([CONDITION_PLANE[c].startswith("Sagittal") for c in CONDITIONS for _ in LEVELS])


def folded_targets(targets: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(columns, mirrored)``: each label column with a right-sided one replaced by its left twin,
    and which rows were."""
    targets = np.asarray(targets, dtype=np.int64)
    folded = _TWIN[targets]
    return folded, folded != targets


def mirror_crops(crops: torch.Tensor, targets: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Crops (or windows) ``[N, slices, H, W]`` of label columns ``targets`` (the unfolded ones),
    each right-sided one mirrored: slices reversed on a sagittal series, columns on an axial one."""
    targets = np.asarray(targets, dtype=np.int64)
    _, mirrored = folded_targets(targets)
    out = crops.clone()
    sagittal = torch.from_numpy(mirrored & _SAGITTAL[targets])
    axial = torch.from_numpy(mirrored & ~_SAGITTAL[targets])
    out[sagittal] = crops[sagittal].flip(1)
    out[axial] = crops[axial].flip(-1)
    return out


def mirror_offsets(offset: torch.Tensor, targets: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Offsets ``[N, 3]`` (x, y, slice) read on mirrored crops, back in the series' own frame (or
    the other way: the mirror is its own inverse)."""
    targets = np.asarray(targets, dtype=np.int64)
    _, mirrored = folded_targets(targets)
    out = offset.clone()
    out[torch.from_numpy(mirrored & _SAGITTAL[targets]), 2] *= -1
    out[torch.from_numpy(mirrored & ~_SAGITTAL[targets]), 0] *= -1
    return out
