"""The recipes: configs, pretrain -> LoRA fine-tune, the backbone comparison, and a 2-process launch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import spinemm
from spinemm.training import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SMALL = ["data.num_slices=4", "data.image_size=32", "data.batch_size=2", "data.phantom=null",
         "split.val_fraction=0.25", "log.progress=false", "log.tensorboard=false"]


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted((RECIPES / "accelerate").glob("*.yaml"))}
    assert set(configs) == {"cpu_2proc", "single_gpu", "multi_gpu_ddp", "fsdp", "multi_node"}
    assert configs["cpu_2proc"].num_processes == 2 and configs["cpu_2proc"].use_cpu
    assert configs["fsdp"].distributed_type == "FSDP" and configs["multi_node"].num_machines == 2
    assert configs["single_gpu"].num_processes == 1 and configs["multi_gpu_ddp"].distributed_type == "MULTI_GPU"


def test_recipe_configs_resolve():
    tiny = load_config(RECIPES / "configs" / "tiny.yaml")
    assert tiny["model"]["name"] in spinemm.list_models() and tiny["data"]["phantom"]
    assert tiny["data"]["image_size"] <= 64 and 6 <= tiny["data"]["num_slices"] <= 8
    for name in ("vitb16-bert", "biomedclip"):
        real = load_config(RECIPES / "configs" / f"{name}.yaml")
        assert real["model"]["name"] in spinemm.list_models()
        assert real["train"]["mixed_precision"] == "bf16" and real["data"]["image_size"] == 224
        assert 16 <= real["data"]["num_slices"] <= 24 and real["lora"]["r"] > 0 and real["data"]["root"]
        assert real["optim"]["lr_lora"] < real["optim"]["lr"]
    compare = load_config(RECIPES / "configs" / "compare-tiny.yaml")
    names = [b["name"] for b in compare["compare"]["backbones"]]
    assert names == ["cnn", "resnet50", "efficientnet", "unet3d", "clip", "bert-none"]


@pytest.mark.slow
def test_pretrain_then_lora_finetune(phantom_root, tmp_path):
    pre_out, sev_out = tmp_path / "pretrain", tmp_path / "severity"
    pre = _recipe("pretrain_clip").main(["--config", str(RECIPES / "configs" / "tiny.yaml"), *SMALL,
                                         f"data.root={phantom_root}", f"pretrain.output_dir={pre_out}",
                                         "pretrain.epochs=1", "pretrain.batch_size=16"])
    metrics = json.loads((pre_out / "metrics.json").read_text())
    n_pairs, accuracy = metrics["metrics"]["n_pairs"], metrics["metrics"]["zero_shot_accuracy"]
    assert n_pairs > 0 and accuracy * n_pairs == pytest.approx(round(accuracy * n_pairs))  # right crops / n_pairs
    assert metrics["metrics"]["score"] > 0 and pre["model_dir"] == pre_out / "model"
    model = spinemm.load_model(pre_out / "model")
    probs = spinemm.zero_shot_classify(model, _images(), spinemm.text.severity_prompts("spinal_canal_stenosis", "l4_l5"))
    assert probs.shape == (2, 3)

    result = _recipe("train_detect").main(["--config", str(RECIPES / "configs" / "tiny.yaml"), *SMALL,
                                             f"data.root={phantom_root}", f"output_dir={sev_out}",
                                             f"init_from={pre_out / 'model'}", "train.epochs=1",
                                             "lora.r=2", "lora.alpha=4", "checkpoint.every_steps=0"])
    assert result["parameters"]["trainable"] < result["parameters"]["total"]  # LoRA froze the tower bases
    assert (sev_out / "model" / "adapter" / "adapter_model.safetensors").is_file()
    merged = spinemm.load_model(sev_out / "model")  # saved merged: a plain model
    assert merged.preprocess_cfg["num_slices"] == 4

    # The later stages on top: the stages recipe writes a pipeline folder and the val scores.
    staged = _recipe("train_stages").main(["--config", str(RECIPES / "configs" / "tiny.yaml"), *SMALL,
                                           f"data.root={phantom_root}", f"init_from={sev_out / 'model'}",
                                           f"pipeline.output_dir={tmp_path / 'stages'}", "grader.epochs=1",
                                           "grader.model.size=16", "locator.epochs=2", "locator.model.size=32"])
    grade, locate = staged["stages"]["grade"]["metrics"], staged["stages"]["locate"]["metrics"]
    assert grade["score"] > 0 and grade["detect_score"] > 0
    assert len(staged["stages"]["locate"]["history"]) == 2 and locate["val_median_mm"] > 0
    pipeline = spinemm.load_pipeline(tmp_path / "stages" / "pipeline")
    assert pipeline.grade.config.size == 16 and pipeline.locate.config.size == 32
    assert (tmp_path / "stages" / "config.yaml").is_file()
    # Only the grade stage again, on top of that pipeline: its locate stage is kept as it was.
    regraded = _recipe("train_stages").main(["--config", str(RECIPES / "configs" / "tiny.yaml"), *SMALL,
                                             f"data.root={phantom_root}", f"init_from={tmp_path / 'stages' / 'pipeline'}",
                                             f"pipeline.output_dir={tmp_path / 'regrade'}", "pipeline.stages=grade",
                                             "grader.epochs=1", "grader.model.size=16"])
    assert list(regraded["stages"]) == ["grade"]
    again = spinemm.load_pipeline(regraded["pipeline_dir"])
    for name, value in pipeline.locate.state_dict().items():
        torch.testing.assert_close(again.locate.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(spinemm.SpineModelError, match="init_from"):
        _recipe("train_detect").main([*SMALL, f"data.root={phantom_root}", f"output_dir={tmp_path / 'x'}",
                                        f"init_from={pre_out / 'model'}", "data.num_slices=5"])

    # The paper's comparison at the grade stage, on that pipeline: every row grades its located points.
    table = _recipe("compare_backbones").main([
        "--config", str(RECIPES / "configs" / "compare-grade-demo.yaml"), *SMALL, f"data.root={phantom_root}",
        "data.cache_dir=null", f"init_from={tmp_path / 'stages' / 'pipeline'}", f"grader.towers_from={pre_out / 'model'}",
        "grader.epochs=1", f"compare.output_dir={tmp_path / 'compare'}"])
    assert table["backbone"].tolist() == ["cnn-pretrained", "cnn", "cnn-learned-queries", "clip-vit", "resnet50",
                                          "efficientnet", "unet3d", "cnn-film"]
    for column in ("accuracy", "macro_precision", "macro_recall", "score", "train_crops_per_s", "eval_crops_per_s"):
        assert pd.to_numeric(table[column]).notna().all(), column
    assert "| unet3d |" in (tmp_path / "compare" / "comparison.md").read_text()
    graders = {name: spinemm.load_pipeline(tmp_path / "compare" / name / "pipeline").grade
               for name in ("cnn-pretrained", "cnn", "clip-vit", "unet3d", "cnn-film")}
    towers = {type(graders[name].encoder.vision).__name__ for name in ("cnn", "clip-vit", "unet3d")}
    assert towers == {"PlainCNN", "OpenCLIPViTEncoder", "UNet3DEncoder"}
    pretrained = spinemm.load_model(pre_out / "model").vision.state_dict()  # tiny.yaml pretrains the ViT
    assert type(graders["cnn-pretrained"].encoder.vision).__name__ == "OpenCLIPViTEncoder"
    assert graders["cnn-pretrained"].encoder.vision.state_dict().keys() == pretrained.keys()
    assert graders["cnn-film"].encoder is None


def _images():
    import torch

    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_compare_backbones_tiny(phantom_root, tmp_path):
    table = _recipe("compare_backbones").main([
        "--config", str(RECIPES / "configs" / "compare-tiny.yaml"), *SMALL, f"data.root={phantom_root}",
        f"compare.output_dir={tmp_path}", "compare.only=[cnn, bert-none]", "train.max_steps=2"])
    assert table["backbone"].tolist() == ["cnn", "bert-none"] and (table["steps"] == 2).all()
    for column in ("accuracy", "macro_precision", "macro_recall", "score", "train_studies_per_s",
                   "eval_studies_per_s"):
        assert pd.to_numeric(table[column]).notna().all(), column
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| cnn |" in markdown and "| bert-none |" in markdown and "official score" in markdown
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(tmp_path / "comparison.csv")) == 2
    assert any((tmp_path / "series-cache").rglob("*.safetensors"))  # series decoded once, shared


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(phantom_root, tmp_path, launch_two_cpu):
    out = tmp_path / "ddp"
    proc = launch_two_cpu(str(RECIPES / "train_detect.py"), "--config", str(RECIPES / "configs" / "tiny.yaml"),
                          *SMALL, f"data.root={phantom_root}", f"output_dir={out}", "train.epochs=1",
                          "checkpoint.every_steps=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2  # really two ranks, not two copies training alone
    sub = pd.read_csv(out / "val_submission.csv")
    assert len(sub) == 25 * metrics["val_studies"] and sub["row_id"].is_unique  # gathered, no duplicates
    assert spinemm.load_model(out / "model").preprocess_cfg["image_size"] == 32
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()  # per-rank RNG state


def test_the_old_detect_names_still_work_and_say_so(tmp_path):
    import subprocess
    import sys

    import spinemm.training

    with pytest.warns(DeprecationWarning, match="train_severity is now train_detect"):
        with pytest.raises(spinemm.SpineModelError):  # reaches train_detect, which refuses the unknown key
            spinemm.training.train_severity(None, ["no_such_key=1"])
    proc = subprocess.run([sys.executable, str(RECIPES / "train_severity.py"), "no_such_key=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train_severity.py is now recipes/train_detect.py" in proc.stderr
    assert "unknown key 'no_such_key'" in proc.stderr
