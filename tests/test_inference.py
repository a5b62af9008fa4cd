"""spinemm.predict: every study x 25 rows in sample_submission order, locations in original pixels."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import spinemm
from spinemm.constants import LABEL_COLUMNS, SUBMISSION_COLUMNS
from spinemm.data import read_series, series_path
from spinemm.data.tables import load_series_descriptions
from spinemm.errors import SpineDataError


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return spinemm.create_model("spine-tiny", num_slices=4).eval()


def _check_submission(submission: pd.DataFrame, root) -> None:
    order = pd.read_csv(root / "sample_submission.csv").row_id.tolist()
    assert submission.row_id.tolist() == order
    probs = submission[list(SUBMISSION_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_predict_covers_every_study_with_locations_in_original_pixels(tiny_model, phantom_root):
    submission, locations = spinemm.predict(tiny_model, phantom_root, split="test", progress=False)
    _check_submission(submission, phantom_root)
    studies = load_series_descriptions(phantom_root, "test").study_id.unique()
    assert len(submission) == 25 * len(studies)
    assert len(locations) == 25 * len(studies)

    located = locations[locations.series_id >= 0]
    assert len(located) > 0 and (located.confidence > 0).all() and (located.confidence <= 1).all()
    for (study, series_id), rows in located.groupby(["study_id", "series_id"]):
        series = read_series(series_path(phantom_root, "test", study, series_id))
        height, width = series.volume.shape[1:]
        assert set(rows.instance_number.astype(int)) <= set(series.instance_to_index)
        assert rows.x.between(0, width).all() and rows.y.between(0, height).all()

    # The same model through the CLI writes the same numbers.
    assert set(submission.row_id) == {f"{s}_{c}" for s in studies for c in LABEL_COLUMNS}


def test_unreadable_series_falls_back_with_a_warning_and_drops_nothing(tiny_model, phantom_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    desc = load_series_descriptions(root, "test")
    victim = desc.iloc[0]
    folder = series_path(root, "test", victim.study_id, victim.series_id)
    for dcm in folder.glob("*.dcm"):
        dcm.write_bytes(dcm.read_bytes()[:200])  # truncated DICOM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        submission, locations = spinemm.predict(tiny_model, root, split="test", progress=False)
    assert any(str(victim.series_id) in str(w.message) for w in caught), [str(w.message) for w in caught]
    _check_submission(submission, root)
    lost = locations[(locations.study_id == victim.study_id) & (locations.series_id == victim.series_id)]
    assert lost.empty  # the broken series is never reported as a location source
    assert (locations.study_id == victim.study_id).sum() == 25


def test_cli_predict_writes_both_files(tiny_model, phantom_root, tmp_path):
    from spinemm.cli import main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    out = tmp_path / "preds"
    assert main(["predict", "--model", str(model_dir), "--data", str(phantom_root), "--out", str(out), "--png", "1"]) == 0
    submission = pd.read_csv(out / "submission.csv")
    _check_submission(submission, phantom_root)
    assert len(pd.read_csv(out / "locations.csv")) == len(submission)
    assert len(list((out / "overlays").glob("study_*.png"))) == 1


def test_cli_predict_names_an_unreadable_series_in_warnings_txt(tiny_model, phantom_root, tmp_path):
    from spinemm.cli import main

    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    victim = load_series_descriptions(root, "test").iloc[0]
    for dcm in series_path(root, "test", victim.study_id, victim.series_id).glob("*.dcm"):
        dcm.write_bytes(dcm.read_bytes()[:200])  # truncated DICOM
    tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "preds"
    with pytest.warns(UserWarning, match=str(victim.series_id)):
        assert main(["predict", "--model", str(tmp_path / "model"), "--data", str(root), "--out", str(out)]) == 0
    notes = (out / "warnings.txt").read_text()
    assert f"series {victim.series_id} of study {victim.study_id}" in notes
    assert len(pd.read_csv(out / "submission.csv")) == 3 * 25  # nothing dropped


def test_cli_predict_never_leaves_a_cut_pair(tiny_model, phantom_root, tmp_path, monkeypatch, capsys):
    import spinemm.files
    from spinemm.cli import main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    out = tmp_path / "preds"
    args = ["predict", "--model", str(model_dir), "--data", str(phantom_root), "--out", str(out)]
    assert main(args) == 0
    before = {name: (out / name).read_bytes() for name in ("submission.csv", "locations.csv")}

    # another live run holds the folder: refused before any work, nothing touched
    (out / spinemm.files.LOCK_NAME).write_text(f"{os.getppid()}\n")
    assert main(args) == 2
    assert f"{out} is being written by another spinemm run (pid {os.getppid()})" in capsys.readouterr().err
    (out / spinemm.files.LOCK_NAME).unlink()

    # the disk fills while the second file is written: the old pair stays, byte for byte
    real = spinemm.files._temp_beside

    def full_disk(path, data):
        if path.name == "locations.csv":
            raise spinemm.errors.SpineOutputError(f"cannot write {path}: No space left on device")
        return real(path, data)

    monkeypatch.setattr(spinemm.files, "_temp_beside", full_disk)
    assert main(args) == 2
    assert f"cannot write {out / 'locations.csv'}: No space left on device" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["locations.csv", "submission.csv", "warnings.txt"]  # no temp, no lock


@pytest.mark.parametrize(("text", "words"), [
    ("study_id,normal_mild\n1,0.3\n", "missing column 'row_id'"),
    ("", "file is empty"),
    ("row_id,normal_mild,moderate,severe\n", "no rows"),
    ("repeat", "repeats row_id"),
])
def test_a_bad_sample_submission_is_named(tiny_model, phantom_root, tmp_path, text, words):
    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    sample = root / "sample_submission.csv"
    if text == "repeat":
        lines = sample.read_text().splitlines()
        text = "\n".join([*lines, lines[1]]) + "\n"
    sample.write_text(text)
    with pytest.raises(SpineDataError, match=rf"{sample}.*{words}"):
        spinemm.predict(tiny_model, root, split="test", progress=False)
