"""The clip grade stage: the finding's metadata text (BERT) queries the crop's tokens (open_clip ViT)."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch

import spinemm
from spinemm.errors import SpineModelError
from spinemm.models.config import GraderConfig
from spinemm.pipeline import GradeStage, SpinePipeline, load_pipeline
from spinemm.text import acquisition, finding_text, finding_texts


def _encoder(seed: int = 0) -> spinemm.SpineCLIP:
    torch.manual_seed(seed)
    return spinemm.create_model("spine-tiny", num_slices=4)


def _series(spacing: float, gap: float, normal=(0.0, 0.0, 1.0)) -> types.SimpleNamespace:
    return types.SimpleNamespace(pixel_spacing=(spacing, spacing), slice_spacing=gap, normal=np.asarray(normal))


def test_finding_text_carries_the_series_acquisition():
    tilted = np.array([0.0, np.sin(np.radians(12)), np.cos(np.radians(12))])
    assert acquisition(_series(0.7, 4.0, tilted))["tilt_degrees"] == pytest.approx(12.0)
    text = finding_text("left_subarticular_stenosis", "l4_l5", **acquisition(_series(0.68, 4.2, tilted)))
    assert text == "Axial T2, L4/L5, left subarticular stenosis; pixels 0.7 mm, slices 4 mm apart, tilted 10 degrees"
    # the same finding in two differently acquired series reads differently; alike series share a text
    a, b, c = (finding_texts(_series(*s), [17]) for s in ((0.7, 4.0), (0.4, 3.0), (0.72, 4.1)))
    assert a != b and a == c
    # within the tiny tokenizer's 32 tokens, so nothing is cut off
    tokenizer = _encoder().tokenizer
    longest = finding_text("right_neural_foraminal_narrowing", "l5_s1", pixel_spacing_mm=10.55,
                           slice_spacing_mm=12.5, tilt_degrees=45)
    assert len(tokenizer(longest)["input_ids"]) <= 32


def test_text_queries_depend_on_the_metadata_and_each_text_is_encoded_once(monkeypatch):
    stage = GradeStage(GraderConfig(backbone="clip", size=32), encoder=_encoder()).eval()
    texts = [*finding_texts(_series(0.7, 4.0), [0, 0]), *finding_texts(_series(0.4, 3.0), [0])]
    calls = []
    encode = stage.encoder.text.encode
    monkeypatch.setattr(stage.encoder.text, "encode", lambda t: calls.append(list(t)) or encode(t))
    with torch.no_grad():
        queries = stage.grader.encode_queries(texts, torch.tensor([0, 0, 0]))
    assert calls == [[texts[0], texts[2]]]  # two distinct texts, one call
    torch.testing.assert_close(queries[0], queries[1])
    assert not torch.allclose(queries[0], queries[2], atol=1e-4)  # not a constant
    with pytest.raises(SpineModelError, match="one text per crop"):
        stage(torch.rand(3, 3, 32, 32), torch.tensor([0, 0, 0]))
    with pytest.raises(SpineModelError, match="context=1"):
        GradeStage(GraderConfig(backbone="clip", context=2), encoder=_encoder())
    with pytest.raises(SpineModelError, match="needs its encoder"):
        GradeStage(GraderConfig(backbone="clip"))


def test_a_pipeline_run_encodes_each_distinct_text_once_for_all_batches(phantom_root, monkeypatch):
    """The detect stage's 25 query texts and the grader's finding texts repeat in every batch of
    studies: a run encodes each once (TextTower.remembering) and predicts what encoding per batch does."""
    pipeline = SpinePipeline(_encoder(0), grade=GradeStage(GraderConfig(backbone="clip", size=32),
                                                           encoder=_encoder(1)))
    with monkeypatch.context() as patch:  # the reference: every batch encodes its texts itself
        patch.setattr(SpinePipeline, "_remembering_texts", lambda self: contextlib.nullcontext())
        per_batch = pipeline.run(phantom_root, "test", batch_size=1, progress=False)
    encoded = []
    for tower in (pipeline.detect.model.text, pipeline.grade.encoder.text):
        encode = tower.encode
        monkeypatch.setattr(tower, "encode", lambda t, encode=encode: encoded.extend(t) or encode(t))
    result = pipeline.run(phantom_root, "test", batch_size=1, progress=False)
    assert len(result.study_ids) > 1 and len(encoded) == len(set(encoded))  # several batches, no text twice
    np.testing.assert_allclose(result.probs, per_batch.probs, atol=1e-5)
    # outside a run nothing is remembered: each call encodes again
    assert pipeline.detect.model.text._remembered is None
    encoded.clear()
    for _ in range(2):
        pipeline.detect.model.text.pooled(["a text"])
    assert encoded == ["a text", "a text"]


def test_clip_grade_stage_round_trips_through_a_pipeline_folder(tmp_path):
    detect = _encoder(0).eval()
    stage = GradeStage(GraderConfig(backbone="clip", size=32), encoder=_encoder(1)).eval()
    crops, targets = torch.rand(3, 3, 32, 32), torch.tensor([0, 12, 24])
    texts = finding_texts(_series(0.7, 4.0), targets.tolist())
    with torch.no_grad():
        expected = stage(crops, targets, texts)["logits"]
    SpinePipeline(detect, grade=stage).save_pretrained(tmp_path / "p")
    # the encoder is a model folder of its own, so zero-shot scoring reads the grader's towers
    assert (tmp_path / "p" / "grade" / "config.json").is_file()
    loaded = load_pipeline(tmp_path / "p")
    assert loaded.grade.config.backbone == "clip"
    with torch.no_grad():
        torch.testing.assert_close(loaded.grade.eval()(crops, targets, texts)["logits"], expected, rtol=0, atol=0)
    probs = spinemm.zero_shot_classify(loaded.grade.encoder, crops, ["a severe finding", "a normal finding"])
    assert probs.shape == (3, 2)


def _blob_crops(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise crops with a bright blob in the left half, the right half, both or neither: [N, 3, 32, 32]
    and which halves hold one [N, 2] (left, right)."""
    sides = torch.randint(0, 2, (n, 2), generator=generator).bool()
    crops = 0.3 * torch.rand(n, 3, 32, 32, generator=generator)
    crops[sides[:, 0], :, 12:20, 4:12] += 0.7
    crops[sides[:, 1], :, 12:20, 20:28] += 0.7
    return crops.clamp(0, 1), sides


@pytest.mark.slow
def test_the_query_text_decides_which_side_is_graded():
    """Trained on crops that show both sides, the 'left' text grades the left half and the 'right'
    text the right half: swapping the texts on an asymmetric crop swaps the grades."""
    torch.manual_seed(0)
    stage = GradeStage(GraderConfig(backbone="clip", size=32, dropout=0.0), encoder=_encoder(2))
    left, right = (finding_text(f"{side}_subarticular_stenosis", "l4_l5") for side in ("left", "right"))
    steps = 400
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        crops, sides = _blob_crops(16, generator)
        texts = [left] * 16 + [right] * 16
        labels = 2 * torch.cat([sides[:, 0], sides[:, 1]]).long()  # severe where the blob is
        out = stage(torch.cat([crops, crops]), torch.zeros(32, dtype=torch.long), texts)
        loss = torch.nn.functional.cross_entropy(out["logits"], labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0)  # as the engine does (optim.max_grad_norm)
        optimizer.step()
        schedule.step()
    stage.eval()
    only_left = 0.3 * torch.rand(1, 3, 32, 32, generator=generator)
    only_left[:, :, 12:20, 4:12] += 0.7
    with torch.no_grad():
        grades = stage(only_left.repeat(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), [left, right])["logits"]
        swapped = stage(only_left.flip(-1).repeat(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), [left, right])["logits"]
    assert grades.argmax(-1).tolist() == [2, 0]  # left: severe, right: normal
    assert swapped.argmax(-1).tolist() == [0, 2]  # the blob moved to the right: the grades swap


@pytest.mark.parametrize("tower", ["cnn", "unet3d"])
def test_any_vision_tower_can_grade_crops(tower):
    """The comparison swaps the grader's image encoder: a 2-D tower reads the crop's slices as
    channels, the 3D U-Net as depth (its tokens: every slice's)."""
    from spinemm.models.baselines import TINY_VISION_CONFIGS

    torch.manual_seed(0)
    encoder = spinemm.create_model("spine-tiny", num_slices=4, vision=TINY_VISION_CONFIGS[tower])
    stage = GradeStage(GraderConfig(backbone="clip", size=32), encoder=encoder).eval()
    crops = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        memory = stage.grader.memory(crops)
        out = stage(crops, torch.tensor([0, 1]), finding_texts(_series(0.7, 4.0), [0, 1]))
    tokens = encoder.vision.grid_size[0] * encoder.vision.grid_size[1]
    assert memory.shape == (2, 1 + tokens * (3 if tower == "unet3d" else 1), encoder.config.fusion.dim)
    assert out["logits"].shape == (2, 3) and torch.isfinite(out["logits"]).all()


def test_a_fresh_vision_tower_trains_at_lr_and_the_pretrained_text_tower_at_tower_lr():
    from spinemm.models.baselines import TINY_VISION_CONFIGS
    from spinemm.training import load_config
    from spinemm.training.grade import _param_groups, build_grade_stage

    config = load_config(None, [("grader.model", {"backbone": "clip", "size": 32}), ("grader.lr", 1e-3),
                                ("grader.tower_lr", 1e-4), ("grader.towers", {"vision": TINY_VISION_CONFIGS["cnn"]})])
    detect = _encoder(0)
    stage = build_grade_stage(config, detect)
    assert type(stage.encoder.vision).__name__ == "PlainCNN" and stage.encoder is not detect
    for name, value in detect.text.state_dict().items():  # the text tower is the source's
        torch.testing.assert_close(stage.encoder.text.state_dict()[name], value, rtol=0, atol=0)
    lr_of = {id(p): group["lr"] for group in _param_groups(stage, config["grader"]) for p in group["params"]}
    assert {lr_of[id(p)] for p in stage.encoder.vision.parameters()} == {1e-3}
    assert {lr_of[id(p)] for p in stage.encoder.text.parameters()} == {1e-4}
    assert {lr_of[id(p)] for p in stage.grader.layers.parameters()} == {1e-3}
    # with LoRA, the pretrained text tower gets adapters and the fresh vision tower trains in full
    lora = load_config(None, [("grader.model", {"backbone": "clip", "size": 32}), ("lora.r", 2),
                              ("grader.towers", {"vision": TINY_VISION_CONFIGS["cnn"]})])
    adapted = build_grade_stage(lora, detect).encoder
    assert all(p.requires_grad for p in adapted.vision.parameters())
    text = dict(adapted.text.named_parameters())
    assert any("lora_" in n for n in text) and not any(p.requires_grad for n, p in text.items() if "lora_" not in n)
    with pytest.raises(SpineModelError, match="grader.towers"):
        build_grade_stage(load_config(None, [("grader.towers", {"vision": {"type": "cnn", "kwargs": {"bogus": 1}}})]),
                          detect)


def test_a_frozen_text_tower_encodes_each_training_text_once_and_grades_the_same():
    from spinemm.models.baselines import TINY_VISION_CONFIGS
    from spinemm.training import load_config
    from spinemm.training.grade import (
        GraderSamples,
        _frozen_text_features,
        _param_groups,
        build_grade_stage,
        grade_step,
    )

    overrides = [("grader.model", {"backbone": "clip", "size": 32}), ("grader.towers", {"vision": TINY_VISION_CONFIGS["cnn"]})]
    frozen = build_grade_stage(load_config(None, [*overrides, ("grader.train_text", False)]), _encoder(0))
    assert not any(p.requires_grad for p in frozen.encoder.text.parameters())
    assert all(p.requires_grad for p in frozen.grader.query_proj.parameters())  # the queries still learn
    grouped = {id(p) for group in _param_groups(frozen, {"towers": True, "lr": 1e-3, "tower_lr": 1e-4})
               for p in group["params"]}
    assert not grouped & {id(p) for p in frozen.encoder.text.parameters()}

    texts = [*finding_texts(_series(0.7, 4.0), [0, 5]), *finding_texts(_series(0.4, 3.0), [0]), finding_texts(_series(0.7, 4.0), [0])[0]]
    features, rows = _frozen_text_features(frozen, texts)
    assert features.shape[0] == 3 and rows.tolist() == [0, 1, 2, 0]  # each distinct text once
    crops, targets = torch.rand(4, 3, 32, 32), torch.tensor([0, 5, 0, 0])
    frozen.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(crops, targets, text_features=features[rows])["logits"],
                                   frozen(crops, targets, texts)["logits"])
    # the samples hand out features in place of texts, and the step trains on them
    class Windows(list):  # the three things GraderSamples asks of ROIWindows
        labels = torch.tensor([0, 1, 2, 0])

        def draw_shifts(self, n, generator):
            return torch.zeros(n, 3)

        def crops(self, index, shifts):
            return crops[index], torch.zeros(len(index), 3)

    windows = Windows(texts)
    windows.texts, windows.targets = texts, targets
    batch = GraderSamples(windows, text_features=(features, rows)).__getitems__([3, 1])
    assert "texts" not in batch and torch.equal(batch["text_features"], features[rows[[3, 1]]])
    frozen.train()
    loss, _ = grade_step(frozen, batch)
    loss.backward()
    assert frozen.grader.query_proj.weight.grad is not None
    # a trained text tower or a grader without text queries needs no table
    trained = build_grade_stage(load_config(None, overrides), _encoder(0))
    assert _frozen_text_features(trained, texts) is None


def test_the_grader_trains_its_text_tower_at_grader_text_dropout():
    from spinemm.training import load_config
    from spinemm.training.grade import build_grade_stage

    detect = _encoder(0)
    bert_dropout = {m.p for m in detect.text.modules() if isinstance(m, torch.nn.Dropout)}
    assert bert_dropout == {0.1}  # the tower's own (hidden and attention dropout)
    base = [("grader.model", {"backbone": "clip", "size": 32})]

    def text_dropouts(stage):
        return [m.p for m in stage.encoder.text.modules() if isinstance(m, torch.nn.Dropout)]

    default = build_grade_stage(load_config(None, base), detect)
    assert text_dropouts(default) and set(text_dropouts(default)) == {0.0}
    assert {m.p for m in detect.text.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # a copy was changed
    assert set(text_dropouts(build_grade_stage(load_config(None, [*base, ("grader.text_dropout", None)]), detect))) == {0.1}
    assert set(text_dropouts(build_grade_stage(load_config(None, [*base, ("grader.text_dropout", 0.3)]), detect))) == {0.3}
    # with no dropout a training-mode text tower is deterministic: the same texts give the same queries
    default.train()
    texts = finding_texts(_series(0.7, 4.0), [0, 5])
    torch.testing.assert_close(default.grader.encode_queries(texts, torch.tensor([0, 5])),
                               default.grader.encode_queries(texts, torch.tensor([0, 5])), rtol=0, atol=0)
    # LoRA adapters keep their own dropout (lora.dropout)
    adapted = build_grade_stage(load_config(None, [*base, ("lora.r", 2), ("lora.dropout", 0.05)]), detect)
    lora_dropouts = {m.p for n, m in adapted.encoder.text.named_modules()
                     if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n}
    assert lora_dropouts == {0.05}
    assert {m.p for n, m in adapted.encoder.text.named_modules()
            if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in n} == {0.0}
    with pytest.raises(SpineModelError, match="text_dropout"):
        build_grade_stage(load_config(None, [*base, ("grader.text_dropout", 1.0)]), detect)
