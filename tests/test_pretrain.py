"""Contrastive pretraining: finding-crop pairs, class-balanced sampling, exact resume, the saved crop side."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import spinemm
from spinemm.constants import SEVERITIES
from spinemm.data.tables import load_tables
from spinemm.errors import SpineModelError
from spinemm.training import pretrain_clip
from spinemm.training.engine import EpochSampler
from spinemm.training.pretrain import FindingPairs, balance_weights, finding_windows, target_prompts

TINY = ["data.image_size=32", "data.num_slices=4", "data.phantom=null", "split.val_fraction=0.25",
        "train.epochs=2", "optim.lr=2e-3", "pretrain.batch_size=16", "pretrain.side_mm=50",
        "checkpoint.every_steps=3", "checkpoint.keep_last=3", "log.progress=false", "log.tensorboard=false"]


def _pretrain(root, out, *extra):
    return pretrain_clip(None, [f"data.root={root}", f"pretrain.output_dir={out}", *TINY, *extra])


def test_balanced_sampler_draws_each_class_alike_and_repeats_per_epoch():
    labels = torch.tensor([0] * 900 + [1] * 80 + [2] * 20)
    sampler = EpochSampler(labels, seed=3, weights=balance_weights(labels))
    counts = torch.bincount(labels[list(sampler)], minlength=3)
    assert len(list(sampler)) == 1000 and counts.min() > 250  # about a third each, not 90% class 0
    first = list(sampler)
    assert list(sampler) == first  # the same epoch is the same order (resume rebuilds it)
    sampler.set_epoch(1)
    assert list(sampler) != first
    for bad in (torch.zeros(1000), -torch.ones(1000), torch.ones(3)):
        with pytest.raises(SpineModelError, match="weights"):
            EpochSampler(labels, weights=bad)


def test_finding_pairs_are_seeded_crops_with_their_severity_prompt(phantom_root):
    frame = load_tables(phantom_root, "train")
    ids = sorted(frame["study_id"].unique().tolist())[:2]
    model = spinemm.create_model("spine-tiny", **{"vision.image_size": 24})
    pretrain = {"shift": 0.2, "crop_size": None}
    windows = finding_windows(phantom_root, frame, ids, model, pretrain, train=True, progress=False)
    assert windows.size == 24 and windows.pad == 5 and len(windows) > 10  # crops at the tower's input size
    pairs = FindingPairs(windows, seed=1, train=True)
    item = pairs[4]
    assert item["crop"].shape == (3, 24, 24) and torch.equal(item["crop"][0], item["crop"][2])
    assert item["text"] in target_prompts(item["target"])[SEVERITIES[item["severity"]]]
    assert item["severity"] == int(windows.labels[4]) and item["target"] == int(windows.targets[4])
    torch.testing.assert_close(pairs[4]["crop"], item["crop"])  # seeded by (seed, epoch, index)
    moved = []
    for epoch in range(1, 4):
        pairs.set_epoch(epoch)
        moved.append(not torch.equal(pairs[4]["crop"], item["crop"]))
    assert any(moved)  # a new epoch draws new shifts
    centred = FindingPairs(windows, train=False)[4]
    torch.testing.assert_close(centred["crop"][:1], windows.crops(torch.tensor([4]))[0][0])
    assert centred["text"] == target_prompts(item["target"])[SEVERITIES[item["severity"]]][0]


def test_pretrain_stop_then_resume_matches_uninterrupted(phantom_root, tmp_path):
    reference = _pretrain(phantom_root, tmp_path / "ref")
    steps = reference["state"].step
    assert steps >= 6 and reference["metrics"]["n_pairs"] > 0
    saved = spinemm.load_model(reference["model_dir"])
    assert saved.config.roi_side_mm == 50.0  # the crop side travels with the model, for zero-shot
    stopped = _pretrain(phantom_root, tmp_path / "run", "train.stop_at_step=3")
    assert stopped["stopped"] and stopped["model_dir"] is None
    resumed = _pretrain(phantom_root, tmp_path / "run", "resume=latest")
    assert resumed["state"].step == steps and not resumed["stopped"]
    want, got = (load_file(r["model_dir"] / "model.safetensors") for r in (reference, resumed))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert [h["score"] for h in resumed["history"]] == pytest.approx([h["score"] for h in reference["history"]])


def test_pretraining_without_coordinates_says_so(phantom_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    coords = root / "train_label_coordinates.csv"
    coords.write_text(coords.read_text().splitlines()[0] + "\n")  # the header alone
    with pytest.raises(SpineModelError, match="labelled coordinate"):
        _pretrain(root, tmp_path / "out")


def test_pretrain_towers_build_the_dual_encoder_in_place_of_the_detect_models_sizes(phantom_root, tmp_path):
    from spinemm.training.common import build_model
    from spinemm.training.config import load_config
    from spinemm.training.pretrain import pretrain_config

    conv = {"type": "cnn", "image_size": 16, "mean": None, "std": None, "open_clip_cfg": None,
            "model_name": None, "pretrained": None, "kwargs": {"width": 32, "channels": [8, 16]}}
    config = load_config(None, [f"data.root={phantom_root}", "data.image_size=32", "data.num_slices=4",
                                f"pretrain.output_dir={tmp_path}"])
    config["pretrain"]["towers"] = {"vision": conv}
    model = build_model(pretrain_config(config))
    assert model.config.vision.type == "cnn" and model.config.vision.image_size == 16  # not data's 32
    frame = load_tables(phantom_root, "train")
    ids = sorted(frame["study_id"].unique().tolist())[:1]
    windows = finding_windows(phantom_root, frame, ids, model, config["pretrain"], train=False, progress=False)
    assert windows.size == 16  # crops cut at the conv tower's own input size
    image = model.encode_image(FindingPairs(windows, train=False)[0]["crop"][None], normalize=True)
    assert image.shape == (1, model.config.embed_dim)
    with pytest.raises(SpineModelError, match="init_from"):
        pretrain_config({**config, "init_from": str(tmp_path)})
    with pytest.raises(SpineModelError, match="mapping"):
        pretrain_config({**config, "pretrain": {**config["pretrain"], "towers": "cnn"}})
