"""Dependencies earn their place: ``datasets`` is an extra (only ``to_hf_dataset`` uses it), and
scikit-learn, the metrics' reference, is a test dependency."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(block: str) -> set[str]:
    names = set()
    for line in block.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "%(")):
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    return names


@pytest.fixture(scope="module")
def setup_cfg():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_datasets_is_an_extra_and_sklearn_a_dev_dependency(setup_cfg):
    core = requirement_names(setup_cfg["options"]["install_requires"])
    extras = setup_cfg["options.extras_require"]
    assert "datasets" not in core and "datasets" in requirement_names(extras["datasets"])
    assert "%(datasets)s" in extras["dev"] and "scikit-learn" in requirement_names(extras["dev"])
    assert "scikit-learn" not in core


@pytest.mark.slow
def test_core_paths_do_not_import_datasets(phantom_root):
    """One fresh interpreter (a subprocess costs seconds) checks two import facts in order:
    unet3d does not pull in baselines (imports point baselines -> unet3d -> encoders, never back:
    no circle), and the core paths never import ``datasets``."""
    code = (
        "import sys, spinemm.models.unet3d as u\n"
        "assert 'spinemm.models.baselines' not in sys.modules, 'unet3d pulled in baselines'\n"
        "import spinemm.models.baselines as b, spinemm.models.encoders as e\n"
        "assert b.check_series is e.check_series is u.check_series and b.UNet3DEncoder is u.UNet3DEncoder\n"
        "import spinemm\n"
        f"frame = spinemm.data.load_tables({str(phantom_root)!r}, 'train')\n"
        "model = spinemm.create_model('spine-tiny')\n"
        "spinemm.metrics.classification_report(frame.label.clip(0).to_numpy(), frame.label.clip(0).to_numpy())\n"
        "assert 'datasets' not in sys.modules, 'a core path imported datasets'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_to_hf_dataset_without_datasets_names_the_extra(phantom_root, monkeypatch):
    import spinemm

    frame = spinemm.data.load_tables(phantom_root, "train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"spinemm\[datasets\]"):
        spinemm.data.to_hf_dataset(frame)
