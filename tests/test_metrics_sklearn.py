"""The generic classification metrics agree with scikit-learn, the reference, on random and
degenerate inputs (classes never predicted, classes without support). The official RSNA score has
its own tests (test_metrics.py): scikit-learn has no such metric."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics  # the dev extra's reference

from spinemm.constants import SEVERITIES
from spinemm.metrics import classification_report


def cases():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50, 400):
        y = rng.integers(0, 3, n)
        yield y, rng.integers(0, 3, n)
        yield y, np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))  # mostly right
        yield y, np.zeros(n, dtype=np.int64)  # only one class predicted
        yield np.full(n, 2), rng.integers(0, 3, n)  # classes 0 and 1 have no support


@pytest.mark.parametrize("y_true, y_pred", list(cases()))
def test_classification_report_matches_sklearn(y_true, y_pred):
    report = classification_report(y_true, y_pred)
    labels = [0, 1, 2]
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    assert report["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    with warnings.catch_warnings():  # sklearn warns when a predicted class has no support; we do not
        warnings.simplefilter("ignore")
        assert report["balanced_accuracy"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(y_true, y_pred))
    assert report["macro_precision"] == pytest.approx(precision.mean())
    assert report["macro_recall"] == pytest.approx(recall.mean())
    assert report["macro_f1"] == pytest.approx(f1.mean())
    for k, name in enumerate(SEVERITIES):
        got = report["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision[k], recall[k], f1[k]))
        assert got["support"] == support[k]
    assert report["confusion_matrix"] == sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()


def test_probabilities_are_scored_by_their_argmax_as_sklearn_would():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), 60)
    y = rng.integers(0, 3, 60)
    expected = sklearn_metrics.f1_score(y, probs.argmax(1), average="macro", labels=[0, 1, 2], zero_division=0)
    assert classification_report(y, probs)["macro_f1"] == pytest.approx(expected)
