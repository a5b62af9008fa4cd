"""The official metric against an independent loop-based reference, hand-computed cases, bad frames,
frame builders and the classification reports."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from spinemm.constants import LABEL_COLUMNS, SUBMISSION_COLUMNS
from spinemm.errors import SpineDataError
from spinemm.metrics import (
    classification_report,
    evaluate_frames,
    per_condition_report,
    rsna_score,
    score_breakdown,
    solution_frame,
    submission_frame,
)

LN3 = math.log(3.0)


def reference_score(solution: pd.DataFrame, submission: pd.DataFrame) -> float:
    """DESIGN §2 written as a plain loop, sharing no code with spinemm.metrics."""
    eps = 1e-15
    preds = {r.row_id: [r.normal_mild, r.moderate, r.severe] for r in submission.itertuples()}
    num = {"spinal": 0.0, "foraminal": 0.0, "subarticular": 0.0}
    den = dict.fromkeys(num, 0.0)
    studies: dict[str, list[float]] = {}  # study -> [any severe, max severe prob, max weight]
    for r in solution.itertuples():
        study, column = r.row_id.split("_", 1)
        truth = [r.normal_mild, r.moderate, r.severe].index(1)
        w = r.sample_weight if "sample_weight" in solution.columns else [1.0, 2.0, 4.0][truth]
        total = sum(preds[r.row_id])
        p = [min(max(v / total, eps), 1 - eps) for v in preds[r.row_id]]
        group = next(g for g in num if g in column)
        num[group] += w * -math.log(p[truth])
        den[group] += w
        if group == "spinal":
            s = studies.setdefault(study, [0.0, 0.0, 0.0])
            s[0] = max(s[0], float(truth == 2))
            s[1] = max(s[1], p[2])
            s[2] = max(s[2], w)
    any_num = sum(w * -(y * math.log(p) + (1 - y) * math.log(1 - p)) for y, p, w in studies.values())
    any_severe = any_num / sum(w for _, _, w in studies.values())
    return (sum(num[g] / den[g] for g in num) + any_severe) / 4


def random_case(seed: int, n: int = 7):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10_000, size=n, replace=False)
    labels = rng.choice([-1, 0, 0, 0, 1, 2], size=(n, 25))
    labels[0, :5] = [0, 1, 2, 0, 0]  # every group and both any-severe outcomes present
    labels[1, :5] = 0
    labels[:, 5], labels[:, 15] = 1, 2
    # Unnormalised rows with a few exact zeros (exercises normalising and clipping).
    probs = rng.random((n, 25, 3)) * rng.uniform(0.1, 10.0, size=(n, 25, 1))
    probs[rng.random((n, 25, 3)) < 0.05] = 0.0
    probs[..., 0] += 1e-3
    return ids, labels, probs


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_on_random_frames(seed):
    ids, labels, probs = random_case(seed)
    solution = solution_frame(ids, labels)
    # Extra rows: unlabelled targets (-1) and a study absent from the solution; shuffled order.
    extra_id = int(ids.max()) + 1
    submission = submission_frame([*ids, extra_id], np.concatenate([probs, probs[:1]]))
    submission = submission.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    assert len(submission) > len(solution)
    assert rsna_score(solution, submission) == pytest.approx(reference_score(solution, submission), abs=1e-9)
    # Without sample_weight the official weights are derived from the one-hot truth.
    unweighted = solution.drop(columns="sample_weight")
    assert rsna_score(unweighted, submission) == pytest.approx(rsna_score(solution, submission), abs=1e-12)
    # Custom weights are used as given.
    custom = solution.assign(sample_weight=np.random.default_rng(seed).uniform(0.5, 3.0, len(solution)))
    assert rsna_score(custom, submission) == pytest.approx(reference_score(custom, submission), abs=1e-9)


def test_breakdown_terms_and_csv_round_trip(tmp_path):
    ids, labels, probs = random_case(11)
    solution, submission = solution_frame(ids, labels), submission_frame(ids, probs)
    parts = score_breakdown(solution, submission)
    assert set(parts) == {"spinal", "foraminal", "subarticular", "any_severe_spinal", "score"}
    terms = [parts[k] for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")]
    assert parts["score"] == pytest.approx(np.mean(terms), abs=1e-12)
    solution.to_csv(tmp_path / "solution.csv", index=False)
    submission.to_csv(tmp_path / "submission.csv", index=False)
    again = rsna_score(pd.read_csv(tmp_path / "solution.csv"), pd.read_csv(tmp_path / "submission.csv"))
    assert again == pytest.approx(parts["score"], abs=1e-9)
    renamed = rsna_score(
        solution.rename(columns={"row_id": "rid"}), submission.rename(columns={"row_id": "rid"}), "rid"
    )
    assert renamed == parts["score"]


def hand_labels() -> np.ndarray:
    labels = np.zeros((2, 25), dtype=np.int64)
    labels[0, :5] = [0, 0, 0, 1, 2]  # study A: any severe, spinal weight max 4
    labels[1, :5] = [0, 1, 0, 0, 0]  # study B: no severe, spinal weight max 2
    labels[1, 7] = -1
    return labels


def test_uniform_prediction_by_hand():
    labels = hand_labels()
    solution = solution_frame([5, 6], labels)
    parts = score_breakdown(solution, submission_frame([5, 6], np.full((2, 25, 3), 1 / 3)))
    for group in ("spinal", "foraminal", "subarticular"):
        assert parts[group] == pytest.approx(LN3, abs=1e-12)
    # any severe: study A (label 1, weight 4) pays -ln(1/3); study B (label 0, weight 2) -ln(2/3).
    any_severe = (4 * LN3 + 2 * math.log(1.5)) / 6
    assert parts["any_severe_spinal"] == pytest.approx(any_severe, abs=1e-12)
    assert parts["score"] == pytest.approx((3 * LN3 + any_severe) / 4, abs=1e-12)
    # Scale of each row does not matter: rows are normalised.
    scaled = submission_frame([5, 6], np.full((2, 25, 3), 7.0))
    assert rsna_score(solution, scaled) == pytest.approx(parts["score"], abs=1e-12)


def test_perfect_and_confident_wrong_predictions():
    labels = hand_labels()
    solution = solution_frame([5, 6], labels)
    perfect = np.eye(3)[np.clip(labels, 0, 2)]
    assert rsna_score(solution, submission_frame([5, 6], perfect)) < 1e-12
    wrong = np.eye(3)[(np.clip(labels, 0, 2) + 1) % 3]
    # Every probability of the truth is clipped to 1e-15, so each group costs L = -ln(1e-15). Any
    # severe: study A (severe) has a Moderate level predicted Severe, so it is right (cost ~0, weight 4);
    # study B (not severe) has its Moderate level predicted Severe (cost L, weight 2).
    big = -math.log(1e-15)
    expected = (3 * big + 2 * -math.log(1 - (1 - 1e-15)) / 6) / 4  # 1 - p of the clipped p, as sklearn
    assert rsna_score(solution, submission_frame([5, 6], wrong)) == pytest.approx(expected, rel=1e-9)


def test_solution_and_submission_frames():
    labels = hand_labels()
    solution = solution_frame([9, 3], labels)
    assert list(solution.columns) == ["row_id", *SUBMISSION_COLUMNS, "sample_weight"]
    assert len(solution) == 49  # one -1 dropped
    assert solution.row_id.iloc[0] == "9_spinal_canal_stenosis_l1_l2"
    assert solution.row_id.iloc[25] == "3_spinal_canal_stenosis_l1_l2"
    assert "3_" + LABEL_COLUMNS[7] not in set(solution.row_id)
    assert solution.sample_weight.iloc[:5].tolist() == [1.0, 1.0, 1.0, 2.0, 4.0]
    assert solution[list(SUBMISSION_COLUMNS)].iloc[4].tolist() == [0, 0, 1]
    probs = np.random.default_rng(0).random((2, 25, 3))
    submission = submission_frame([9, 3], probs)
    assert list(submission.columns) == ["row_id", *SUBMISSION_COLUMNS]
    assert submission.row_id.tolist() == [f"{s}_{c}" for s in (9, 3) for c in LABEL_COLUMNS]
    np.testing.assert_allclose(submission[list(SUBMISSION_COLUMNS)].to_numpy(), probs.reshape(-1, 3))
    for bad in (
        lambda: solution_frame([1, 1], labels),
        lambda: solution_frame([1], labels),
        lambda: solution_frame([1, 2], np.full((2, 25), 3)),
        lambda: solution_frame([1, 2], labels.astype(float)),
        lambda: submission_frame([1, 2], probs[:, :24]),
        lambda: submission_frame([1, 2], np.full((2, 25, 3), np.nan)),
    ):
        with pytest.raises(SpineDataError):
            bad()


def _frames():
    labels = hand_labels()
    return solution_frame([5, 6], labels), submission_frame([5, 6], np.full((2, 25, 3), 1 / 3))


def _set(frame, row, col, value):
    frame = frame.copy()
    frame[col] = frame[col].astype(object if isinstance(value, str) else float)
    frame.loc[row, col] = value
    return frame


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda so, su: (so.drop(columns="moderate"), su), "lacks column"),
        (lambda so, su: (so, su.drop(columns="severe")), "lacks column"),
        (lambda so, su: (so.drop(columns="row_id"), su), "row id column"),
        (lambda so, su: (pd.concat([so, so.iloc[:1]]), su), "duplicate"),
        (lambda so, su: (so, pd.concat([su, su.iloc[:1]])), "duplicate"),
        (lambda so, su: (so, _set(su, 3, "moderate", np.nan)), "not finite"),
        (lambda so, su: (so, _set(su, 3, "moderate", np.inf)), "not finite"),
        (lambda so, su: (so, _set(su, 3, "moderate", -0.1)), "negative"),
        (lambda so, su: (so, su.assign(normal_mild=0.0, moderate=0.0, severe=0.0)), "all-zero"),
        (lambda so, su: (so, _set(su, 3, "moderate", "high")), "numeric"),
        (lambda so, su: (_set(so, 2, "row_id", "x5_spinal_canal_stenosis_l3_l4"), su), "malformed row_id"),
        (lambda so, su: (so, _set(su, 60, "row_id", "6_spinal_canal_stenosis_l9")), "malformed row_id"),
        (lambda so, su: (so, su.drop(index=[1, 2])), "5_spinal_canal_stenosis_l2_l3"),
        (lambda so, su: (_set(so, 0, "moderate", 1), su), "one-hot"),
        (lambda so, su: (so.assign(sample_weight=0.0), su), "sample_weight"),
        (lambda so, su: (so[~so.row_id.str.contains("foraminal")], su), "foraminal"),
        (lambda so, su: (so.iloc[:0], su), "empty"),
    ],
)
def test_malformed_frames_raise(mutate, match):
    solution, submission = mutate(*_frames())
    with pytest.raises(SpineDataError, match=match):
        rsna_score(solution, submission)


def test_classification_report_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    report = classification_report(y_true, y_pred)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["accuracy"] == pytest.approx(4 / 6)
    precision, recall = [1.0, 0.5, 0.5], [2 / 3, 0.5, 1.0]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    for k, sev in enumerate(("Normal/Mild", "Moderate", "Severe")):
        assert report["per_class"][sev]["precision"] == pytest.approx(precision[k])
        assert report["per_class"][sev]["recall"] == pytest.approx(recall[k])
        assert report["per_class"][sev]["f1"] == pytest.approx(f1[k])
    assert report["per_class"]["Normal/Mild"]["support"] == 3
    assert report["macro_f1"] == pytest.approx(np.mean(f1))
    assert report["balanced_accuracy"] == pytest.approx(np.mean(recall))
    # Probabilities give the same report through their argmax.
    assert classification_report(y_true, np.eye(3)[y_pred] * 0.8 + 0.05) == report


def test_class_without_support_is_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report(np.array([0, 0, 1]), np.array([0, 2, 1]))
    severe = report["per_class"]["Severe"]
    assert (severe["precision"], severe["recall"], severe["f1"], severe["support"]) == (0.0, 0.0, 0.0, 0)
    assert report["balanced_accuracy"] == pytest.approx(0.75)  # mean over classes with support
    assert report["macro_recall"] == pytest.approx(0.5)  # all three classes
    with pytest.raises(SpineDataError):
        classification_report(np.array([0, -1]), np.array([0, 1]))
    with pytest.raises(SpineDataError):
        classification_report(np.array([], dtype=int), np.array([], dtype=int))


def test_per_condition_report_ignores_missing():
    rng = np.random.default_rng(3)
    labels = rng.integers(-1, 3, size=(6, 25))
    labels[:, 10:15] = -1  # right foraminal entirely unlabelled
    probs = rng.random((6, 25, 3))
    report = per_condition_report(labels, probs)
    assert "right_neural_foraminal_narrowing" not in report
    valid = labels != -1
    assert report["overall"] == classification_report(labels[valid], probs[valid])
    spinal = labels[:, :5]
    assert report["spinal_canal_stenosis"]["n"] == int((spinal != -1).sum())


def test_evaluate_frames():
    ids, labels, probs = random_case(4)
    solution, submission = solution_frame(ids, labels), submission_frame(ids, probs)
    result = evaluate_frames(solution, submission)
    json.dumps(result)
    assert result["score"] == pytest.approx(rsna_score(solution, submission), abs=1e-12)
    assert result["official"] == score_breakdown(solution, submission)
    assert result["n_rows"] == len(solution) == result["classification"]["n"]
    assert result["n_studies"] == len(ids)
    assert result["per_condition"]["spinal_canal_stenosis"]["log_loss"] == pytest.approx(
        result["official"]["spinal"]
    )
    valid = labels != -1
    expected = classification_report(labels[valid], probs[valid])
    assert result["classification"]["confusion_matrix"] == expected["confusion_matrix"]
