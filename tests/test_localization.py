"""Location errors in mm through the DICOM geometry."""

from __future__ import annotations

import numpy as np
import pytest

from spinemm.data import load_tables, read_series, series_path
from spinemm.pipeline.location_errors import KEYS, location_errors, summarize_errors


@pytest.fixture(scope="module")
def labelled(phantom_root):
    frame = load_tables(phantom_root, "train")
    return frame, frame[frame.instance_number.notna()]


def _as_prediction(rows):
    out = rows[[*KEYS, "series_id", "instance_number", "x", "y"]].copy()
    out["confidence"] = 1.0
    return out


def test_exact_prediction_is_zero_mm(phantom_root, labelled):
    frame, rows = labelled
    errors = location_errors(phantom_root, "train", _as_prediction(rows), frame)
    assert len(errors) == len(rows)
    np.testing.assert_allclose(errors.error_mm, 0.0, atol=1e-6)
    assert summarize_errors(errors)["within_5mm"] == 1.0


def test_in_plane_and_through_plane_offsets(phantom_root, labelled):
    frame, rows = labelled
    row = rows.iloc[0]
    series = read_series(series_path(phantom_root, "train", row.study_id, row.series_id))
    pred = _as_prediction(rows.iloc[[0]])
    pred["x"] += 10  # ten columns to the right: 10 x column spacing
    err = location_errors(phantom_root, "train", pred, frame).error_mm.iloc[0]
    assert err == pytest.approx(10 * series.pixel_spacing[1], rel=1e-6)

    k = series.instance_to_index[int(row.instance_number)]
    other = k + 1 if k + 1 < len(series.instance_numbers) else k - 1
    pred = _as_prediction(rows.iloc[[0]])
    pred["instance_number"] = int(series.instance_numbers[other])
    gap = abs(float((series.positions[other] - series.positions[k]) @ series.normal))
    err = location_errors(phantom_root, "train", pred, frame).error_mm.iloc[0]
    assert err == pytest.approx(gap, rel=1e-6)


def test_missing_prediction_counts_as_a_miss(phantom_root, labelled):
    frame, rows = labelled
    pred = _as_prediction(rows.iloc[:4])
    pred.loc[pred.index[0], "series_id"] = -1
    summary = summarize_errors(location_errors(phantom_root, "train", pred, frame))
    assert summary["n_rows"] == 4 and summary["within_5mm"] == pytest.approx(0.75)
