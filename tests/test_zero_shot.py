"""Zero-shot scoring: probabilities, prompt handling, CheXzero pairs, caching, image inputs, ROI crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spinemm.data.images import _read_dicom, load_images
from spinemm.errors import SpineDataError, SpineModelError
from spinemm.models.factory import create_model
from spinemm.zero_shot import build_zero_shot_classifier, crop_finding, zero_shot_classify

PROMPTS = ["normal lumbar spine", "mild stenosis", "moderate stenosis", "severe canal stenosis"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("spine-tiny").eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # sharp softmax, so differences are visible
    return model


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def manual_probs(model, images, groups, negatives=None):
    def classes(gs):
        return F.normalize(torch.stack([model.encode_text(g, normalize=True).mean(0) for g in gs]), dim=-1)

    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        logits = 100.0 * img @ classes(groups).T
        if negatives is None:
            return logits.softmax(-1)
        pos = torch.stack([logits, 100.0 * img @ classes(negatives).T], -1).softmax(-1)[..., 0]
        return pos / pos.sum(-1, keepdim=True)


def test_rows_sum_to_one_and_match_clip_softmax(model, images):
    probs = zero_shot_classify(model, images, PROMPTS)
    assert probs.shape == (6, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    torch.testing.assert_close(probs, manual_probs(model, images, [[p] for p in PROMPTS]))
    assert probs.std(0).max() > 1e-3  # the images are actually told apart


def test_permuting_prompts_permutes_columns(model, images):
    order = [2, 0, 3, 1]
    probs = zero_shot_classify(model, images, PROMPTS)
    permuted = zero_shot_classify(model, images, [PROMPTS[i] for i in order])
    torch.testing.assert_close(permuted, probs[:, order])


def test_mapping_prompts_average_templates(model, images):
    prompts = {
        "normal": ["no stenosis", "normal canal"],
        "severe": ["severe stenosis", "canal severely narrowed", "severe"],
    }
    probs = zero_shot_classify(model, images, prompts)
    torch.testing.assert_close(probs, manual_probs(model, images, list(prompts.values())))
    single = zero_shot_classify(model, images, {"normal": "no stenosis", "severe": "severe stenosis"})
    assert not torch.allclose(probs, single)  # the extra templates count
    assert build_zero_shot_classifier(model, prompts).classes == ["normal", "severe"]


def test_negative_prompt_pairs(model, images):
    positives, negatives = ["severe stenosis", "foraminal narrowing"], ["no severe stenosis", "open foramen"]
    probs = zero_shot_classify(model, images, positives, negative_prompts=negatives)
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    torch.testing.assert_close(
        probs, manual_probs(model, images, [[p] for p in positives], [[n] for n in negatives])
    )
    with pytest.raises(SpineModelError, match="negative"):
        zero_shot_classify(model, images, positives, negative_prompts=["only one"])


def test_text_embeddings_cached_until_the_model_changes(images, monkeypatch):
    torch.manual_seed(0)
    model = create_model("spine-tiny").eval()
    calls = []
    encode = model.encode_text
    monkeypatch.setattr(
        model,
        "encode_text",
        lambda texts, normalize=False: calls.append(len(texts)) or encode(texts, normalize=normalize),
    )
    first = zero_shot_classify(model, images, PROMPTS)
    assert calls == [4]
    again = zero_shot_classify(model, images, PROMPTS)
    assert calls == [4]  # served from the cache
    torch.testing.assert_close(again, first)
    with torch.no_grad():  # what an optimizer step does: an in-place update of a text-side weight
        model.text_proj.weight.add_(torch.randn_like(model.text_proj.weight))
    changed = zero_shot_classify(model, images, PROMPTS)
    assert calls == [4, 4] and not torch.allclose(changed, first)


def test_mode_is_restored(model, images):
    model.train()
    try:
        zero_shot_classify(model, images, ["a", "b"])
        assert model.training
    finally:
        model.eval()


def test_array_inputs(model):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4000, size=(3, 48, 40)).astype(np.uint16)  # [N, H, W] raw intensities
    probs = zero_shot_classify(model, raw, PROMPTS)
    as_list = zero_shot_classify(model, [raw[i] for i in range(3)], PROMPTS)
    as_tensor = zero_shot_classify(model, torch.from_numpy(raw.astype(np.float32)), PROMPTS)
    torch.testing.assert_close(probs, as_list)
    torch.testing.assert_close(probs, as_tensor)
    pixels = load_images(raw, 32)
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1
    assert torch.equal(pixels[:, 0], pixels[:, 2])  # greyscale replicated to 3 channels
    with pytest.raises(SpineDataError):
        load_images(torch.rand(2, 5, 8, 8), 32)
    with pytest.raises(SpineModelError):
        zero_shot_classify(model, raw, "one string is not a prompt list")


def _write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_paths(model, tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 1000, size=(24, 20)).astype(np.uint16)
    _write_dicom(tmp_path / "a.dcm", stored)
    _write_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1")
    physical = stored.astype(np.float32) * 2 - 100
    torch.testing.assert_close(_read_dicom(tmp_path / "a.dcm"), torch.from_numpy(physical))
    inverted = _read_dicom(tmp_path / "b.dcm")  # MONOCHROME1: mirrored across the mapped storable range
    mirror = (0 * 2 - 100) + (65535 * 2 - 100)
    torch.testing.assert_close(inverted, torch.from_numpy(mirror - physical))
    probs = zero_shot_classify(model, [tmp_path / "a.dcm", str(tmp_path / "b.dcm")], PROMPTS)
    expect = zero_shot_classify(model, [physical, inverted.numpy()], PROMPTS)
    torch.testing.assert_close(probs, expect)
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom")
    with pytest.raises(SpineDataError, match="bad.dcm"):
        zero_shot_classify(model, [tmp_path / "bad.dcm"], PROMPTS)


def test_crop_finding_is_a_millimetre_window_around_the_point(tmp_path):
    image = torch.zeros(40, 40)
    image[18:23, 20:25] = 1.0  # a bright 5 x 5 block centred on column 22, row 20
    image[0, 0] = -1.0  # sets the low end of the percentile window
    block = crop_finding(image.numpy(), x=22, y=20, side_mm=10, size=10, pixel_spacing=(1.0, 1.0))
    assert block.shape == (1, 10, 10) and block.min() >= 0 and block.max() <= 1
    # 1 mm pixels, 10 mm side: the block fills the middle 5 x 5 pixels
    assert block[0, 3:7, 3:7].min() > 0.9 and block[0, 0].max() < 0.1 and block[0, :, 0].max() < 0.1
    # 0.5 mm pixels: the same 10 mm now spans 20 pixels, so the block fills only the middle quarter.
    # Two source pixels shrink into one, so the crop averages 2 x 2 blocks first (no aliasing); the
    # block's odd edge then falls inside one average, which softens the middle to 0.77-1.0
    finer = crop_finding(image.numpy(), x=22, y=20, side_mm=10, size=10, pixel_spacing=(0.5, 0.5))
    assert finer[0, 4:6, 4:6].min() > 0.7 and finer[0, 4, 4] > 0.99 and finer[0, 2].max() < 0.1
    moved = crop_finding(image.numpy(), x=27, y=20, side_mm=10, size=10, pixel_spacing=(1.0, 1.0))
    torch.testing.assert_close(moved[0, :, :5], block[0, :, 5:])  # 5 mm right: the block shifts left
    # a point outside the image is refused, never an all-zero crop read as a finding (issue 29)
    for x, y in ((500, 500), (-1, 20), (22, 39.6), (float("nan"), 20)):
        with pytest.raises(SpineDataError, match="outside the 40 x 40 px image"):
            crop_finding(image.numpy(), x=x, y=y, side_mm=10, size=10, pixel_spacing=(1.0, 1.0))
    edge = crop_finding(image.numpy(), x=39, y=0, side_mm=10, size=10, pixel_spacing=(1.0, 1.0))
    assert edge.shape == (1, 10, 10)  # on the last pixel: its crop, zero past the edge
    with pytest.raises(SpineDataError, match="pixel_spacing"):
        crop_finding(image.numpy(), 5, 5, side_mm=10, size=10)
    _write_dicom(tmp_path / "a.dcm", np.full((24, 20), 7, dtype=np.uint16))  # has no PixelSpacing
    with pytest.raises(SpineDataError, match="a.dcm.*PixelSpacing"):
        crop_finding(tmp_path / "a.dcm", 5, 5, side_mm=10, size=10)
    assert crop_finding(tmp_path / "a.dcm", 5, 5, side_mm=10, size=10, pixel_spacing=(1, 1)).shape == (1, 10, 10)
