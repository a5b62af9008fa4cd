"""Side folding: a right-sided finding is read mirrored, as its left twin, by one grader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spinemm
from spinemm.constants import LABEL_COLUMNS
from spinemm.data.sides import folded_targets, mirror_crops, mirror_offsets
from spinemm.data.store import SeriesStore
from spinemm.models.config import GraderConfig
from spinemm.pipeline import GradeStage

RIGHT_FORAMEN = LABEL_COLUMNS.index("right_neural_foraminal_narrowing_l4_l5")
LEFT_FORAMEN = LABEL_COLUMNS.index("left_neural_foraminal_narrowing_l4_l5")
RIGHT_SUBARTICULAR = LABEL_COLUMNS.index("right_subarticular_stenosis_l4_l5")
CANAL = LABEL_COLUMNS.index("spinal_canal_stenosis_l4_l5")


def test_right_columns_fold_onto_their_left_twins_and_the_mirror_undoes_itself():
    folded, mirrored = folded_targets([RIGHT_FORAMEN, LEFT_FORAMEN, CANAL, RIGHT_SUBARTICULAR])
    assert folded.tolist() == [LEFT_FORAMEN, LEFT_FORAMEN, CANAL, LABEL_COLUMNS.index("left_subarticular_stenosis_l4_l5")]
    assert mirrored.tolist() == [True, False, False, True]
    crops = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    targets = [RIGHT_FORAMEN, LEFT_FORAMEN, CANAL, RIGHT_SUBARTICULAR]
    out = mirror_crops(crops, targets)
    assert torch.equal(out[0], crops[0].flip(0))  # sagittal: the slices (patient left-right) reversed
    assert torch.equal(out[3], crops[3].flip(-1))  # axial: the columns reversed
    assert torch.equal(out[1:3], crops[1:3])  # the left and midline findings as they were
    assert torch.equal(mirror_crops(out, targets), crops)
    offset = torch.tensor([[0.1, 0.2, 1.0]] * 4)
    back = mirror_offsets(offset, targets)
    assert back[0].tolist() == pytest.approx([0.1, 0.2, -1.0]) and back[3].tolist() == pytest.approx([-0.1, 0.2, 1.0])
    assert torch.equal(back[1:3], offset[1:3])


@pytest.mark.parametrize("backbone", ["cnn", "clip"])
def test_a_right_finding_is_graded_as_its_mirrored_left_twin(phantom_root, backbone):
    """The folding stage's grade of a right finding is the grader's read of the mirrored crop with the
    left twin's query (its text says "left"): mirroring the crop and swapping the side gives the grade."""
    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    config = GraderConfig(backbone=backbone, size=32 if backbone == "clip" else 16, channels=(8, 16), refine=0,
                          fold_sides=True, study_context=False)
    stage = GradeStage(config, query_dim=detect.config.fusion.dim, encoder=detect if backbone == "clip" else None)
    stage.eval()
    store = SeriesStore(phantom_root, "train")
    frame = spinemm.data.load_tables(phantom_root, "train")
    rows = frame[frame.target.isin([RIGHT_FORAMEN, RIGHT_SUBARTICULAR]) & frame.x.notna()].head(2)
    findings = spinemm.pipeline.Findings(rows.study_id, rows.target, rows.series_id, rows.instance_number, rows.x,
                                         rows.y, np.ones(len(rows)))
    grades = stage.grade(findings, store)
    for k in range(len(rows)):
        series = store.get(int(findings.study_id[k]), int(findings.series_id[k]))
        part = [(series, np.array([k]), None)]
        crop = stage._cut(part, [np.array([series.instance_to_index[int(findings.instance_number[k])]])],
                          [np.array([[findings.x[k], findings.y[k]]])])
        twin = torch.from_numpy(folded_targets(findings.target[[k]])[0])
        texts = spinemm.text.finding_texts(series, twin.numpy())
        assert "left" in texts[0] and "right" not in texts[0]
        with torch.no_grad():
            queries = stage.grader.encode_queries(texts, twin)
            expected = stage(crop.flip(1) if findings.target[k] == RIGHT_FORAMEN else crop.flip(-1), twin,
                             queries=queries)["logits"].log_softmax(-1)
        np.testing.assert_allclose(grades.log_probs[k], expected[0].double().numpy(), rtol=1e-5, atol=1e-6)


def test_training_windows_of_right_findings_are_mirrored_left_twins(phantom_root):
    from spinemm.data.roi import ROIWindows

    frame = spinemm.data.load_tables(phantom_root, "train")
    ids = sorted(frame.study_id.unique())[:2]
    args = {"side_mm": 60.0, "size": 16, "progress": False}
    plain = ROIWindows(phantom_root, frame, ids, **args)
    folded = ROIWindows(phantom_root, frame, ids, fold_sides=True, **args)
    assert torch.equal(folded.targets, torch.from_numpy(folded_targets(plain.targets)[0]))
    assert torch.equal(folded.windows, mirror_crops(plain.windows, plain.targets))
    assert not any("right" in t for t in folded.texts) and any("right" in t for t in plain.texts)
