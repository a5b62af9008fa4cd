"""save_pretrained -> push_to_hub -> hf-hub:org/name, through huggingface_hub's ModelHubMixin, with a
model card. A local folder stands in for the hub: the two HfApi calls the mixin's push makes
(create_repo, upload_folder) write a commit into a hub cache, which huggingface_hub then reads
offline as it reads any download. The HTTP layer itself is not exercised (the tests have no network)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard

import spinemm
from spinemm.models.config import LocatorConfig
from spinemm.pipeline import LocateStage, SpinePipeline


class FolderHub:
    """Stands in for ``huggingface_hub.HfApi`` in the mixin: each upload is a commit in a hub cache."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.uploads = cache, []

    def __call__(self, token=None):  # the mixin calls HfApi(token=...)
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, repo_type, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        sha = hashlib.sha1("\n".join(files).encode() + str(len(self.uploads)).encode()).hexdigest()
        repo_dir = self.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo_dir / "snapshots" / sha)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(sha)
        self.uploads.append((repo_id, repo_type, files))
        return f"https://huggingface.co/{repo_id}/commit/{sha}"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    stand_in = FolderHub(tmp_path / "hub-cache")
    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", stand_in)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # reading back never touches the network
    monkeypatch.setenv("HF_HUB_CACHE", str(stand_in.cache))
    return stand_in


CARD = {"training_data": "the spinemm demo phantom, 160 studies", "metrics": {"official score": 0.5123},
        "phantom": True}


def test_pipeline_push_and_load_by_hub_name(phantom_root, hub):
    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4)
    pipeline = SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))))
    url = pipeline.push_to_hub("org/spine-demo", model_card_kwargs=CARD)
    assert url.startswith("https://huggingface.co/org/spine-demo/commit/")
    (repo, kind, files), = hub.uploads
    assert (repo, kind) == ("org/spine-demo", "model")
    assert {"README.md", "pipeline.json", "locate.safetensors", "detect/model.safetensors"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]

    for loaded in (spinemm.load_pipeline("hf-hub:org/spine-demo"),
                   SpinePipeline.from_pretrained("hf-hub:org/spine-demo")):
        assert loaded.stage_names == ["detect", "locate"]
        want = pipeline.run(phantom_root, "test", progress=False)
        got = loaded.run(phantom_root, "test", progress=False)
        pd.testing.assert_frame_equal(got.submission(), want.submission())
        pd.testing.assert_frame_equal(got.locations(), want.locations())

    snapshot = next((hub.cache / "models--org--spine-demo" / "snapshots").iterdir())
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.library_name == "spinemm" and card.data.license == "mit"
    for fact in ("spine-tiny", "detect -> locate", "160 studies", "| official score | 0.5123 |",
                 "synthetic phantom", 'spinemm.load_pipeline("hf-hub:org/spine-demo")'):
        assert fact in card.text


def test_model_save_push_from_pretrained(hub, tmp_path):
    torch.manual_seed(1)
    model = spinemm.create_model("spine-tiny").eval()
    folder = model.save_pretrained(tmp_path / "m", model_card_kwargs={"metrics": {"val loss": 1.0}})
    assert (folder / "README.md").is_file() and "| val loss | 1.0 |" in (folder / "README.md").read_text()
    model.save_pretrained(folder)  # saving again rewrites the card: it never describes an older model
    assert "None recorded." in (folder / "README.md").read_text()
    assert "synthetic phantom" not in (folder / "README.md").read_text()  # said only when true

    model.push_to_hub("hf-hub:org/spine-tiny-m")  # the id form loading takes works for pushing too
    assert hub.uploads[-1][0] == "org/spine-tiny-m"
    loaded = spinemm.models.SpineCLIP.from_pretrained("hf-hub:org/spine-tiny-m").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(["a"]), model.encode_text(["a"]), rtol=0, atol=0)


def test_an_offline_push_says_what_to_do(tmp_path, monkeypatch):
    class NoNetwork:
        def __call__(self, token=None):
            return self

        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known")  # as the HTTP client raises it

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", NoNetwork())
    model = spinemm.create_model("spine-tiny")
    with pytest.raises(spinemm.SpineModelError, match=r"(?s)cannot reach the hub \(ConnectionError.*hf upload org/m FOLDER"):
        model.push_to_hub("org/m")
    with pytest.raises(spinemm.SpineModelError, match="not a valid hub repo id"):
        model.push_to_hub("hf-hub:not/a/repo")


def test_cards_name_the_licence_of_each_upstream_tower():
    from types import SimpleNamespace

    from spinemm.models.config import ModelConfig
    from spinemm.models.presets import get_model_config
    from spinemm.models.spine_clip import SpineCLIP

    def towers(preset):
        cfg = get_model_config(preset)
        return SpineCLIP.tower_sources(SimpleNamespace(config=cfg if isinstance(cfg, ModelConfig)
                                                       else ModelConfig.from_dict(cfg)))

    vitb = towers("spine-vitb16-bert")
    assert "`ViT-B-16`, weights openai (licence MIT" in vitb and "`bert-base-uncased` (licence Apache-2.0" in vitb
    assert "licence MIT" in towers("spine-biomedclip")
    assert towers("spine-tiny").count("no upstream weights") == 2
