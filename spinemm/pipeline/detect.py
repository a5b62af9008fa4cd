"""Stage "detect": SpineCLIP on a study's low-resolution stacks -> every finding's grade and place.

The first stage reads each series resampled to a few slices (``spinemm.data.SpineDataset``, taken
from the run's :class:`~spinemm.data.store.SeriesStore`) and returns, for each of the 25 findings,
severity probabilities and a point decoded to the original instance and pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import LABEL_COLUMNS, TARGET_PLANE_INDEX
from ..data.dataset import SpineDataset, collate
from ..data.transforms import source_slice
from ..errors import SpineModelError
from ..models.factory import load_model
from .findings import Findings
from .stage import RunJob, Stage, StageInput, StageOutput

__all__ = ["DetectStage", "preprocess_settings", "findings_from_outputs", "detect_outputs"]


def preprocess_settings(model: torch.nn.Module) -> dict[str, Any]:
    """The dataset settings a model was built for (``num_slices``, ``image_size``, ``channels``)."""
    cfg = getattr(model, "preprocess_cfg", None)
    if not isinstance(cfg, dict):
        raise SpineModelError(f"{type(model).__name__} has no preprocess_cfg; build it with spinemm.create_model")
    return {k: cfg[k] for k in ("num_slices", "image_size", "channels")}


def findings_from_outputs(location: np.ndarray, confidence: np.ndarray, metas: list[dict]) -> Findings:
    """Model-frame locations ``[B, 25, 3]`` (slice, x / W, y / H) -> :class:`Findings` in original
    instances and pixels, study-major in ``LABEL_COLUMNS`` order."""
    n_targets = len(LABEL_COLUMNS)
    rows = len(metas) * n_targets
    series_id = np.full(rows, -1, dtype=np.int64)
    instance = np.full(rows, -1, dtype=np.int64)
    x, y = np.full(rows, np.nan), np.full(rows, np.nan)
    for b, meta in enumerate(metas):
        for target in range(n_targets):
            plane = TARGET_PLANE_INDEX[target]
            shown = np.asarray(meta["slice_indices"][plane])
            sources = np.asarray(meta["source_instance_numbers"][plane])
            row = b * n_targets + target
            series_id[row] = int(meta["series_ids"][plane])
            if series_id[row] < 0 or len(shown) == 0:
                series_id[row] = -1
                continue
            slice_f, fx, fy = (float(v) for v in location[b, target])
            height, width = meta["original_shape"][plane]
            # a position between two shown slices is a source slice the stack did not show
            instance[row] = int(sources[int(np.clip(source_slice(shown, slice_f), 0, len(sources) - 1))])
            x[row], y[row] = fx * width, fy * height
    study_ids = np.repeat([int(m["study_id"]) for m in metas], n_targets)
    return Findings(study_ids, np.tile(np.arange(n_targets), len(metas)), series_id, instance, x, y,
                    np.where(series_id >= 0, np.asarray(confidence, dtype=np.float64).reshape(-1), 0.0))


def detect_outputs(model: torch.nn.Module, batch: dict[str, Any], device: torch.device | None = None,
                   forward: Any = None) -> dict[str, torch.Tensor]:
    """``model``'s raw outputs on a collated batch (moved to ``device`` first unless None), in eval
    mode, without gradients: the one forward pass of both the detect stage and
    ``spinemm.training.evaluate_model``. ``forward``: a compiled stand-in for ``model(batch)``."""
    was_training = model.training
    model.eval()
    try:
        if device is not None:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            return model(batch) if forward is None else forward(batch)
    finally:
        model.train(was_training)


class DetectStage(Stage):
    """Wraps a :class:`~spinemm.models.SpineCLIP` as the pipeline's first stage (saved as the
    pipeline folder's ``detect/``, a model folder ``spinemm.load_model`` reads)."""

    name = "detect"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess_settings(model)
        self._compiled = None  # the model's tensor core under torch.compile (compile_models())
        self._dataset: SpineDataset | None = None  # the run's studies (begin())
        self._index: dict[int, int] = {}

    def compile_models(self, **options: Any) -> None:
        """Run the model's tensor core (``SpineCLIP.fuse``: everything after the text tower) as one
        ``torch.compile(fullgraph=True)`` graph; the text tower and the input checks stay eager."""
        if not hasattr(self.model, "fuse"):
            raise SpineModelError(f"{type(self.model).__name__} has no fuse(): only SpineCLIP's core compiles")
        self._compiled = torch.compile(self.model.fuse, fullgraph=True, **options)

    def text_towers(self) -> list[torch.nn.Module]:
        tower = getattr(self.model, "text", None)
        return [tower] if tower is not None else []

    def begin(self, job: RunJob) -> None:
        """Index the run's studies: each batch's low-resolution stacks come from the run's store."""
        self._dataset = SpineDataset(job.root, job.split, study_ids=job.study_ids, augment=False, store=job.store,
                                     frame=job.frame, on_bad_series="warn", **self.preprocess)
        self._index = {study_id: i for i, study_id in enumerate(self._dataset.study_ids)}

    def end(self) -> None:
        self._dataset, self._index = None, {}

    def run(self, inputs: StageInput) -> StageOutput:
        if self._dataset is None:
            raise SpineModelError("DetectStage.run before begin(job): run it through SpinePipeline.run")
        batch = collate([self._dataset[self._index[s]] for s in inputs.study_ids])
        probs, found = self.predict_batch(batch, next(self.model.parameters()).device)
        return StageOutput(found, probs.reshape(-1, probs.shape[-1]))

    def predict_batch(self, batch: dict[str, Any], device: torch.device) -> tuple[np.ndarray, Findings]:
        """A collated batch of studies -> ``(probs [B, 25, 3], findings)``."""
        forward = None if self._compiled is None else lambda b: self._compiled(*self.model.fuse_inputs(b))
        out = detect_outputs(self.model, batch, device, forward)
        probs = out["logits"].float().softmax(-1).cpu().numpy()
        findings = findings_from_outputs(out["location"].float().cpu().numpy(),
                                         out["location_confidence"].float().cpu().numpy(), batch["meta"])
        return probs, findings

    def save(self, folder: Path) -> dict[str, Any]:
        self.model.save_pretrained(Path(folder) / "detect")
        return {}

    @classmethod
    def load(cls, folder: Path, section: dict[str, Any]) -> DetectStage:
        return cls(load_model(Path(folder) / "detect"))
