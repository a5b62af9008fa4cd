"""open_clip-style entry points: get_tokenizer, create_model_and_transforms, encode_text on tokens."""

from __future__ import annotations

import pytest
import torch

import spinemm
from spinemm.data import SpineDataset, collate
from spinemm.errors import SpineModelError

TEXTS = ["one text", "severe spinal canal stenosis at L4/L5"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return spinemm.create_model("spine-tiny").eval()


def test_encode_text_of_tokenizer_output_is_one_embedding_per_text(model):
    with torch.no_grad():
        from_strings = model.encode_text(["one text"])
        unpadded = model.encode_text(model.tokenizer(["one text"]))  # lists of ids, as open_clip users write it
        padded = model.encode_text(model.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert unpadded.shape == (1, model.config.embed_dim)
    torch.testing.assert_close(unpadded, from_strings)
    torch.testing.assert_close(padded, model.encode_text(TEXTS))


def test_get_tokenizer_gives_ids_encode_text_reads(model, tmp_path):
    tokenizer = spinemm.get_tokenizer("spine-tiny")
    ids = tokenizer(TEXTS)
    assert ids.dtype == torch.long and ids.shape == (2, model.config.text.max_length)
    assert (ids[0] == tokenizer.pad_token_id).sum() > 0  # padded to the context length
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.encode_text(TEXTS), atol=1e-5, rtol=1e-5)
    # a saved model folder and a pipeline folder read their own tokenizer files
    model.save_pretrained(tmp_path / "m")
    spinemm.SpinePipeline(model).save_pretrained(tmp_path / "pipe")
    for name in (tmp_path / "m", str(tmp_path / "pipe")):
        assert torch.equal(spinemm.get_tokenizer(name)(TEXTS), ids)


@pytest.mark.parametrize("bad, message", [
    ({"text": ["a"]}, "no input_ids"),
    ([1, 2, 3], "list of int"),
    (torch.rand(2, 4), "must be integers"),
    (3.5, "got float"),
    ({"input_ids": [[1, 2, 3], [4]]}, "unequal lengths"),
])
def test_encode_text_refuses_anything_else(model, bad, message):
    with pytest.raises(SpineModelError, match=message):
        model.encode_text(bad)


def test_create_model_and_transforms(phantom_root):
    model, preprocess_train, preprocess_val = spinemm.create_model_and_transforms("spine-tiny", num_slices=4)
    assert (preprocess_train.augment, preprocess_val.augment) == (True, False)
    assert preprocess_val.num_slices == 4 and preprocess_val.image_size == model.image_size
    train, val = preprocess_train(phantom_root, "train"), preprocess_val(phantom_root, "train")
    assert isinstance(val, SpineDataset) and len(val) == 8
    first = val[0]["image"]
    assert first.shape[1:3] == (4, 3) and first.shape[-1] == model.image_size
    assert torch.equal(val[0]["image"], first) and not torch.equal(train[0]["image"], first)  # augmented
    with torch.no_grad():
        out = model.eval()(collate([val[0], val[1]]))
    assert out["logits"].shape == (2, 25, 3)


def test_the_transforms_take_one_image_as_open_clips_do(tmp_path):
    import numpy as np
    from PIL import Image
    from test_zero_shot import _write_dicom

    from spinemm.data.images import load_images

    model, preprocess_train, preprocess_val = spinemm.create_model_and_transforms("spine-tiny")
    size = model.preprocess_cfg["image_size"]
    rng = np.random.default_rng(0)
    grey = (rng.random((40, 50)) * 255).astype(np.uint8)
    from_pil = preprocess_val(Image.fromarray(grey))
    assert from_pil.shape == (3, size, size) and 0 <= float(from_pil.min()) and float(from_pil.max()) <= 1
    torch.testing.assert_close(from_pil, load_images(grey[None].astype(np.float32), size)[0])
    torch.testing.assert_close(preprocess_val(grey.astype(np.float32)), from_pil)  # a numpy slice
    torch.testing.assert_close(preprocess_train(torch.from_numpy(grey).float()), from_pil)  # a tensor slice
    stored = rng.integers(0, 1000, size=(24, 20)).astype(np.uint16)
    _write_dicom(tmp_path / "a.dcm", stored)
    assert preprocess_val(tmp_path / "a.dcm").shape == (3, size, size)  # a DICOM path
    embedding = model.eval().encode_image(from_pil[None])
    assert embedding.shape == (1, model.config.embed_dim)
    with pytest.raises(SpineModelError, match="apply to a dataset folder"):
        preprocess_val(grey, study_ids=[1])
