"""The grader's study context: each grade weighed with the mean grade of its study and disc level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spinemm.constants import SEVERITY_WEIGHTS
from spinemm.errors import SpineModelError
from spinemm.models.grader import StudyContext
from spinemm.training.study_context import ValGrades, cross_fitted, fit_study_context


def test_study_context_starts_as_the_identity():
    log_probs = torch.randn(7, 3).log_softmax(-1)
    out = StudyContext()(log_probs, torch.tensor([0, 1, 2, 3, 4, 0, 1]))
    torch.testing.assert_close(out.log_softmax(-1), log_probs)


def test_study_context_means_are_per_study_and_per_level():
    context = StudyContext()
    with torch.no_grad():
        context.mix.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    # expected grades 0, 2, 1, 2: study 7 has levels 0 and 0, study 9 has levels 0 and 3
    probs = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 0, 1.0]]).clamp_min(1e-12)
    log_probs = probs.log()
    out = context(log_probs, torch.tensor([0, 0, 0, 3]), torch.tensor([7, 7, 9, 9])) - log_probs
    grade = (probs * torch.arange(3.0)).sum(-1)
    study_mean = torch.tensor([1.0, 1.0, 1.5, 1.5])  # (0+2)/2 and (1+2)/2
    level_mean = torch.tensor([1.0, 1.0, grade[2], grade[3]])  # study 9's levels differ: each alone
    torch.testing.assert_close(out[:, 0], study_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], level_mean, atol=1e-5, rtol=0)
    with pytest.raises(SpineModelError, match="levels"):
        context(log_probs, torch.tensor([0, 1]))


def _synthetic_grades(n_studies: int, seed: int) -> ValGrades:
    """Studies whose labels follow a shared study severity that each single grade sees noisily."""
    g = torch.Generator().manual_seed(seed)
    study = torch.randn(n_studies, 1, generator=g).expand(-1, 25)
    latent = study + 0.5 * torch.randn(n_studies, 25, generator=g)
    labels = (latent > 0.6).long() + (latent > 1.4).long()
    reading = latent + 1.2 * torch.randn(n_studies, 25, generator=g)  # one crop's noisy view
    log_probs = torch.stack([-2 * reading, torch.zeros_like(reading), 2 * reading - 2], -1).log_softmax(-1)
    targets = torch.arange(25).repeat(n_studies)
    return ValGrades(log_probs.reshape(-1, 3), targets, torch.arange(n_studies).repeat_interleave(25) + 1000,
                     labels.reshape(-1), np.arange(n_studies * 25))


def _weighted_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    weights = torch.tensor(SEVERITY_WEIGHTS)[labels]
    return float((F.nll_loss(probs.clamp_min(1e-9).log(), labels, reduction="none") * weights).sum() / weights.sum())


def test_fitted_context_beats_single_grades_on_held_out_studies():
    train, test = _synthetic_grades(60, seed=0), _synthetic_grades(60, seed=1)
    context = StudyContext()
    fit_study_context(context, train)
    with torch.no_grad():
        fitted = context(test.log_probs, test.levels, test.studies).softmax(-1)
    alone = _weighted_nll(test.log_probs.exp(), test.labels)
    assert _weighted_nll(fitted, test.labels) < 0.85 * alone
    # The study mean carries the shared severity: its weight on Severe is positive, on Normal negative.
    assert context.mix.weight[2, 0] > 0 > context.mix.weight[0, 0]
    # Out-of-fold outputs help too, and each study is scored by a context that never saw it.
    oof = cross_fitted(train, folds=5)
    assert oof.shape == train.log_probs.shape and torch.allclose(oof.sum(-1), torch.ones(len(oof)))
    assert _weighted_nll(oof, train.labels) < _weighted_nll(train.log_probs.exp(), train.labels)


def test_unlabelled_rows_count_in_the_means_but_not_the_loss():
    grades = _synthetic_grades(20, seed=2)
    grades.labels[::3] = -1
    first = fit_study_context(StudyContext(), grades)
    assert np.isfinite(first)
    grades.labels[:] = -1
    assert np.isnan(fit_study_context(StudyContext(), grades))


def test_configs_with_stages_attached_to_the_model_are_refused_by_name():
    from spinemm.errors import SpineModelError
    from spinemm.models.config import GraderConfig, ModelConfig

    # Saved before the staged pipeline: a grader that was off is simply dropped ...
    assert ModelConfig.from_dict({"grader": {"enabled": False, "size": 16}}).name == "custom"
    # ... one that was on cannot be loaded as the detect model alone, and says what to do.
    with pytest.raises(SpineModelError, match="grader attached.*train_stages"):
        ModelConfig.from_dict({"grader": {"enabled": True, "size": 16}})
    assert GraderConfig().study_context is True  # new graders have it
