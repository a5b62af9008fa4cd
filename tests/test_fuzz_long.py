"""The long fuzz tier (issue 28): the inputs the issue lists, at their full size, refused with a
spinemm error while the process may allocate at most 2 GiB (tests/fuzz_bound.py).

``make test-fuzz`` runs this file and tests/test_fuzz.py with 10,000 mutations a target (bigger
sizes among the config values) under the bound: ``SPINEMM_FUZZ=1 SPINEMM_FUZZ_LONG=1
SPINEMM_FUZZ_MEMORY_GIB=2``. The tests marked ``fuzz`` are deselected from every other run; the
one unmarked test shows the bound itself works.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from test_compressed_bounds import declare_size, deflate_bomb
from test_dicom import AXIAL, write_slice
from test_safe_loading import saved_pipeline as _tiny_pipeline  # noqa: F401 (registers the fixture)

from spinemm.data.dicom import read_series
from spinemm.errors import SpineError

TESTS = Path(__file__).resolve().parent


def test_the_bound_turns_a_large_allocation_into_a_memory_error():
    """What the tier relies on: past the bound, an allocation fails (here 1 GiB over 0.25 GiB)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fuzz_bound; fuzz_bound.apply(0.25)\n"
            "try:\n    bytearray(1 << 30)\nexcept MemoryError:\n    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", code, str(TESTS)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "refused", out.stderr


# --- the inputs at full size (the fuzz tier) -----------------------------------------------


@pytest.fixture(autouse=True)
def _bounded(request):
    if request.node.get_closest_marker("fuzz") and \
            resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        pytest.skip("needs the allocation bound: run `make test-fuzz` (SPINEMM_FUZZ_MEMORY_GIB=2)")


def _series_with(tmp_path: Path, make: Callable[[Path], None]) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    make(folder / "1.dcm")
    return folder


def _bundled(name: str, rows: int, columns: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        shutil.copy(get_testdata_file(name, download=False), path)
        declare_size(path, rows, columns)

    return make


def _spacing(path: Path) -> None:
    write_slice(path, np.ones((32, 32), np.uint16), instance=1, position=(0.0, 0.0, 0.0), orientation=AXIAL,
                spacing=(0.001, 0.001))


DICOM_BOMBS = {
    "deflated 1.76 MB -> 1.8 GB": lambda path: deflate_bomb(path, 1_800_000_000),
    "JPEG-LS 6 KB claiming 20000x20000": _bundled("MR_small_jpeg_ls_lossless.dcm", 20000, 20000),
    "JPEG 2000 claiming 20000x20000": _bundled("MR_small_jp2klossless.dcm", 20000, 20000),
    "PixelSpacing 0.001": _spacing,
}


@pytest.mark.fuzz
@pytest.mark.parametrize("case", list(DICOM_BOMBS))
def test_a_dicom_bomb_is_refused_within_the_bound(tmp_path, case):
    folder = _series_with(tmp_path, DICOM_BOMBS[case])
    start = time.perf_counter()
    with pytest.raises(SpineError, match=str(folder)):
        read_series(folder)
    print(f"\n{case}: {(folder / '1.dcm').stat().st_size} bytes refused in {time.perf_counter() - start:.3f} s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB")


def _set_keys(node, sizes: dict[str, object]) -> None:
    """Set every key named in ``sizes``, at any depth of a JSON tree."""
    if isinstance(node, dict):
        for key, child in node.items():
            if key in sizes:
                node[key] = sizes[key]
            else:
                _set_keys(child, sizes)
    elif isinstance(node, list):
        for child in node:
            _set_keys(child, sizes)


@pytest.mark.fuzz
@pytest.mark.parametrize("sizes", [{"layers": 100_000}, {"num_hidden_layers": 100_000}, {"embed_dim": 10_000_000},
                                   {"width": 10_000_000}, {"max_length": 10**9}, {"roi_side_mm": -60}],
                         ids=lambda sizes: next(iter(sizes)))
def test_a_config_asking_for_huge_modules_is_refused_within_the_bound(tmp_path, sizes):
    from spinemm.models.factory import create_model, load_model

    folder = tmp_path / "model"
    create_model("spine-tiny").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    _set_keys(config, sizes)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpineError, match=str(folder)):
        load_model(folder)


@pytest.mark.fuzz
@pytest.mark.parametrize("edit", [("grade", "query_dim", 10**9), ("locate", "size", 10**6),
                                  ("grade", "size", 10**6)], ids=lambda e: ".".join(map(str, e[:2])))
def test_a_pipeline_json_asking_for_huge_stages_is_refused_within_the_bound(_tiny_pipeline, tmp_path, edit):  # noqa: F811
    from spinemm.pipeline import load_pipeline

    folder = Path(shutil.copytree(_tiny_pipeline, tmp_path / "pipeline"))
    meta = json.loads((folder / "pipeline.json").read_text())
    section, key, value = edit
    meta[section][key] = value
    (folder / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(SpineError):
        load_pipeline(folder)

