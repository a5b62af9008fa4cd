"""Train the grade stage as one grader or as an ensemble over study-level folds and seeds.

``grader.folds: K`` (K > 1) trains one grade stage per fold of all the run's studies (train and val
together, split by study with ``split.seed``): member k trains on the other folds, and is selected
and has its study context fitted on fold k, so every study is graded once by a member that never
saw it. Those out-of-fold grades are written to ``oof.csv`` (the grader's probabilities without the
study context, beside the recorded label), the yardstick of the ensemble and the input of a label
check. ``grader.seeds: [...]`` trains each fold's member once per training seed. The pipeline's
grade stage is then a :class:`~spinemm.pipeline.grade.GradeEnsemble` that averages its members.
Each member trains in its own folder (``member-K/``), so a stopped ensemble resumes member by member.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..constants import LABEL_COLUMNS, SUBMISSION_COLUMNS
from ..data.dataset import kfold_split
from ..errors import SpineModelError
from ..files import write_atomic
from ..metrics import rsna_score
from ..pipeline.grade import GradeEnsemble
from ..pipeline.pipeline import SpinePipeline
from ..pipeline.result import submission_from_probs
from .common import seed_everything
from .grade import train_grade, val_solution
from .study_context import val_grades

__all__ = ["train_grade_stage", "grade_members", "oof_score"]


def grade_members(config: dict[str, Any], train_ids: list[int], val_ids: list[int]) -> list[dict[str, Any]]:
    """Each member's ``{"name", "train_ids", "val_ids", "seed"}``: one per fold and seed."""
    options = config["grader"]
    folds = int(options["folds"])
    seeds = [int(s) for s in options["seeds"]] if options["seeds"] else [int(config["train"]["seed"])]
    if folds < 1:
        raise SpineModelError(f"grader.folds must be at least 1, got {folds}")
    if folds == 1:
        splits = [(list(train_ids), list(val_ids))]
    else:
        studies = sorted(set(train_ids) | set(val_ids))
        if folds > len(studies):
            raise SpineModelError(f"grader.folds={folds} is more than the run's {len(studies)} studies")
        splits = [kfold_split(studies, folds, k, seed=int(config["split"]["seed"])) for k in range(folds)]
    return [{"name": f"member-{k * len(seeds) + j}", "train_ids": tr, "val_ids": va, "seed": seed}
            for k, (tr, va) in enumerate(splits) for j, seed in enumerate(seeds)]


def train_grade_stage(config: dict[str, Any], run: Any, pipeline: SpinePipeline, output_dir: Path,
                      progress: bool = True) -> dict[str, Any]:
    """The grade stage's trainer (``train_stages``): :func:`~.grade.train_grade` for one grader,
    else every member in turn and a :class:`GradeEnsemble` of them; returns ``{"stage", "history",
    "metrics"}`` (the first member's history; ``metrics["members"]`` holds each member's)."""
    members = grade_members(config, run.train_ids, run.val_ids)
    if len(members) == 1:
        return train_grade(config, run, pipeline, output_dir, progress)
    trained, metrics, oof = [], [], []
    for member in members:
        member_config = copy.deepcopy(config)
        member_config["train"]["seed"] = member["seed"]
        seed_everything(member["seed"])  # each seed's member starts from its own initial weights
        member_run = dataclasses.replace(run, train_ids=member["train_ids"], val_ids=member["val_ids"])
        result = train_grade(member_config, member_run, pipeline, output_dir / member["name"], progress)
        if result["stage"] is None:  # stopped (stop_at_step): resume continues with this member
            return {"stage": None, "history": result["history"], "metrics": None}
        trained.append(result)
        metrics.append(result["metrics"])
        if int(config["grader"]["folds"]) > 1 and result.get("val") is not None:
            oof.append(_oof_rows(result["stage"], result["val"], member["name"]))
    summary: dict[str, Any] = {"members": metrics}
    for key in ("score", "grader_score", "before_score", "detect_score"):
        values = [m[key] for m in metrics if key in m]
        if values:
            summary[key] = float(np.mean(values))  # the members' validation scores, averaged
    if oof:
        frame = pd.concat(oof, ignore_index=True)
        if run.accelerator.is_main_process:
            write_atomic(output_dir / "oof.csv", frame.to_csv(index=False).encode())
        summary["oof_score"] = oof_score(frame, run.frame)
    return {"stage": GradeEnsemble([r["stage"] for r in trained]), "history": trained[0]["history"],
            "metrics": summary}


def _oof_rows(stage: Any, val: Any, member: str) -> pd.DataFrame:
    """One row per graded finding of the member's own fold: its probabilities (no study context)."""
    labelled = val_grades(stage.grade(val.before.findings, val.store), val.frame)
    probs = labelled.log_probs.double().exp().numpy()
    frame = pd.DataFrame({"study_id": labelled.studies.numpy(), "target": labelled.targets.numpy(),
                          "label": labelled.labels.numpy(), "member": member})
    frame.insert(0, "row_id", [f"{s}_{LABEL_COLUMNS[t]}" for s, t in zip(frame.study_id, frame.target, strict=True)])
    for k, name in enumerate(SUBMISSION_COLUMNS):
        frame[name] = probs[:, k]
    return frame


def oof_score(frame: pd.DataFrame, tables: pd.DataFrame) -> float:
    """Official score of the out-of-fold grades (``oof.csv``) on the labelled findings they cover;
    a finding no member graded is read as the prior (each severity's frequency in the labels)."""
    studies = sorted(frame.study_id.unique())
    solution = val_solution(tables, studies)
    labels = tables.label[tables.label >= 0].to_numpy()
    prior = np.bincount(labels, minlength=len(SUBMISSION_COLUMNS)) / max(len(labels), 1)
    probs = np.tile(prior, (len(studies), len(LABEL_COLUMNS), 1))
    position = {s: i for i, s in enumerate(studies)}
    probs[frame.study_id.map(position).to_numpy(), frame.target.to_numpy()] = frame[list(SUBMISSION_COLUMNS)].to_numpy()
    return rsna_score(solution, submission_from_probs(studies, probs))

