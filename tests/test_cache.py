"""SeriesCache: content keys, the stat index, corrupt entries, and "the second epoch decodes no DICOM"."""

from __future__ import annotations

import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from spinemm.data import dicom
from spinemm.data.cache import SeriesCache, entry_key
from spinemm.data.dataset import SpineDataset
from spinemm.data.transforms import preprocess_series
from spinemm.errors import SpineDataError

HOUR_NS = 3_600 * 10**9


def write_slice(path: Path, pixels: np.ndarray, instance: int, z: float) -> None:
    """One uint16 MR slice with the tags read_series uses (rescale 2x - 100, axial orientation)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = MRImageStorage
    # one UID per (file, instance): a random UID's length varies, and a rewrite must keep the size
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name), str(instance)])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.6]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(series_dir: Path, n: int = 5, shape: tuple[int, int] = (20, 24), seed: int = 0) -> None:
    """``n`` slices whose instance numbers run against the geometric order (as in real data)."""
    rng = np.random.default_rng(seed)
    series_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        instance = 10 + n - k
        write_slice(
            series_dir / f"{instance}.dcm", rng.integers(100, 1000, shape) + 60 * k, instance, 4.0 * k
        )


def age(series_dir: Path) -> None:
    """Backdate every file by an hour, as for data written long before training starts."""
    old = time.time_ns() - HOUR_NS
    for path in series_dir.iterdir():
        os.utime(path, ns=(old, old))


@pytest.fixture
def series_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "1" / "2"
    write_series(path)
    age(path)
    return path


def assert_same(a, b) -> None:
    assert torch.equal(a.image, b.image)
    for name in ("indices", "instance_numbers", "source_instance_numbers"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.original_shape == b.original_shape and a.pixel_spacing == b.pixel_spacing
    assert a.slice_spacing == pytest.approx(b.slice_spacing)


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/*.safetensors"))


def test_second_load_hits_without_decoding_or_hashing(tmp_path, series_dir, monkeypatch):
    cache = SeriesCache(tmp_path / "cache")
    first = cache.load(series_dir, 4, 16)
    assert cache.stats() == {"hits": 0, "misses": 1, "decodes": 1, "hashes": 1, "corrupt": 0}

    def no_decoding(path):
        raise AssertionError(f"decoded {path} on a cache hit")

    monkeypatch.setattr(dicom, "read_series", no_decoding)
    second = cache.load(series_dir, 4, 16)
    # the stat index matched, so the DICOM bytes were neither decoded nor hashed again
    assert cache.stats() == {"hits": 1, "misses": 1, "decodes": 1, "hashes": 1, "corrupt": 0}
    assert_same(first, second)
    assert first.image.shape == (4, 3, 16, 16) and first.image.dtype == torch.float16
    # a new cache object on the same directory (another process) finds the entry and the index too
    fresh = SeriesCache(tmp_path / "cache")
    assert_same(fresh.load(series_dir, 4, 16), first)
    assert fresh.stats() == {"hits": 1, "misses": 0, "decodes": 0, "hashes": 0, "corrupt": 0}


def test_cached_equals_uncached(tmp_path, series_dir):
    direct = preprocess_series(dicom.read_series(series_dir), 6, 12, "2.5d")
    cache = SeriesCache(tmp_path / "cache")
    assert_same(cache.load(series_dir, 6, 12, "2.5d"), direct)
    assert_same(cache.load(series_dir, 6, 12, "2.5d"), direct)
    assert cache.hits == 1
    # 5 slices -> 6: one repeats; instance numbers follow the geometric (not the file name) order
    np.testing.assert_array_equal(direct.indices, [0, 1, 2, 2, 3, 4])
    np.testing.assert_array_equal(direct.source_instance_numbers, [15, 14, 13, 12, 11])
    assert direct.original_shape == (20, 24) and direct.pixel_spacing == (0.5, 0.6)


def test_modified_file_invalidates_the_entry(tmp_path, series_dir):
    cache = SeriesCache(tmp_path / "cache")
    before = cache.load(series_dir, 5, 16)
    # same size, new pixels, new mtime: the stat signature changes, the bytes are hashed again
    write_slice(series_dir / "13.dcm", np.full((20, 24), 900), 13, 8.0)
    after = cache.load(series_dir, 5, 16)
    assert cache.stats() == {"hits": 0, "misses": 2, "decodes": 2, "hashes": 2, "corrupt": 0}
    assert not torch.equal(before.image[2], after.image[2])
    assert len(entries(tmp_path / "cache")) == 2
    # a file removed changes the key as well
    (series_dir / "11.dcm").unlink()
    assert cache.load(series_dir, 5, 16).num_source_slices == 4
    assert cache.misses == 3


def test_recently_written_files_are_rehashed_but_still_hit(tmp_path):
    fresh_dir = tmp_path / "fresh"
    write_series(fresh_dir)  # mtimes are "now": a same-size rewrite in the same tick would not show
    cache = SeriesCache(tmp_path / "cache")
    cache.load(fresh_dir, 4, 16)
    cache.load(fresh_dir, 4, 16)
    assert cache.stats() == {"hits": 1, "misses": 1, "decodes": 1, "hashes": 2, "corrupt": 0}
    index = json.loads(next((tmp_path / "cache" / "index").glob("*.json")).read_text())
    assert index["trusted"] is False and [row[0] for row in index["signature"]] == [
        f"{i}.dcm" for i in range(11, 16)
    ]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_a_miss_with_warning_and_is_rewritten(tmp_path, series_dir, damage):
    cache = SeriesCache(tmp_path / "cache")
    good = cache.load(series_dir, 4, 16)
    (entry,) = entries(tmp_path / "cache")
    data = entry.read_bytes()
    broken = {"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage]
    entry.write_bytes(broken)
    with pytest.warns(UserWarning, match="corrupt cache entry"):
        again = cache.load(series_dir, 4, 16)
    assert_same(again, good)
    assert cache.stats()["corrupt"] == 1 and cache.decodes == 2 and cache.misses == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry reads cleanly
        assert_same(cache.load(series_dir, 4, 16), good)
    assert cache.hits == 1


def test_entry_with_wrong_shape_is_rejected(tmp_path, series_dir):
    cache = SeriesCache(tmp_path / "cache")
    cache.load(series_dir, 4, 16)
    (entry,) = entries(tmp_path / "cache")
    # an entry whose content does not match its key (e.g. written by a buggy version) is not trusted
    other = SeriesCache(tmp_path / "other")
    other.load(series_dir, 4, 8)
    entry.write_bytes(entries(tmp_path / "other")[0].read_bytes())
    with pytest.warns(UserWarning, match="expected float16"):
        assert cache.load(series_dir, 4, 16).image.shape == (4, 3, 16, 16)


def test_key_covers_every_preprocessing_parameter(tmp_path, series_dir):
    cache = SeriesCache(tmp_path / "cache")
    settings = [(4, 16, "2.5d"), (4, 16, "single"), (5, 16, "2.5d"), (4, 12, "2.5d")]
    for num_slices, size, channels in settings:
        out = cache.load(series_dir, num_slices, size, channels)
        assert out.image.shape == (num_slices, 3, size, size)
    assert cache.misses == 4 and len(entries(tmp_path / "cache")) == 4
    keys = {entry_key("abc", *s) for s in settings}
    assert len(keys) == 4 and entry_key("abd", 4, 16, "2.5d") not in keys


def test_entries_are_safetensors_with_json_metadata_and_no_temp_files(tmp_path, series_dir):
    cache = SeriesCache(tmp_path / "cache")
    cache.load(series_dir, 4, 16)
    (entry,) = entries(tmp_path / "cache")
    data = entry.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 size + JSON
    assert {"image", "indices", "instance_numbers", "source_instance_numbers"} <= set(header)
    assert header["image"]["dtype"] == "F16" and header["image"]["shape"] == [4, 3, 16, 16]
    meta = json.loads(header["__metadata__"]["spinemm"])
    assert meta["original_shape"] == [20, 24] and meta["pixel_spacing"] == [0.5, 0.6]
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_unreadable_series_raises_and_is_not_cached(tmp_path):
    cache = SeriesCache(tmp_path / "cache")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(SpineDataError, match="no DICOM files"):
        cache.load(bad, 4, 16)
    (bad / "1.dcm").write_bytes(b"not a dicom file")
    with pytest.raises(SpineDataError, match="1.dcm"):
        cache.load(bad, 4, 16)
    with pytest.raises(SpineDataError, match="not a series folder"):
        cache.load(tmp_path / "missing", 4, 16)
    assert entries(tmp_path / "cache") == []


def test_concurrent_loads_agree(tmp_path, series_dir):
    cache_dir = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:  # each worker has its own cache object, as DataLoader workers do
        results = list(pool.map(lambda _: SeriesCache(cache_dir).load(series_dir, 4, 16), range(4)))
    for other in results[1:]:
        assert_same(results[0], other)
    assert len(entries(cache_dir)) == 1 and not list(cache_dir.rglob("*.tmp"))


def test_second_epoch_decodes_no_dicom(phantom_root, tmp_path, monkeypatch):
    cache = SeriesCache(tmp_path / "cache")
    data = SpineDataset(phantom_root, num_slices=6, image_size=32, cache_dir=cache)
    epoch1 = [data[i] for i in range(len(data))]
    num_series = int(sum(s["plane_mask"].sum() for s in epoch1))
    assert num_series >= 2 * len(data)
    assert cache.decodes == cache.misses == num_series and cache.hits == 0

    uncached = SpineDataset(phantom_root, num_slices=6, image_size=32)
    reference = [uncached[i] for i in range(len(uncached))]

    def no_decoding(path):
        raise AssertionError(f"decoded {path} in the second epoch")

    monkeypatch.setattr(dicom, "read_series", no_decoding)
    epoch2 = [data[i] for i in range(len(data))]
    assert cache.decodes == num_series and cache.hits == num_series
    for a, b, c in zip(epoch1, epoch2, reference, strict=True):
        for key in ("image", "plane_mask", "label", "location", "location_mask"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
        assert a["meta"]["series_ids"] == c["meta"]["series_ids"]


# --- issue 14: verify mode, and what else invalidates an entry ---------------------------------------


def _rewrite_keeping_stat(path: Path, pixels: np.ndarray, instance: int, z: float) -> None:
    """Rewrite a slice with new pixels but its old size and mtime (as ``cp -p`` or a restore would)."""
    st = path.stat()
    write_slice(path, pixels, instance, z)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_mode_sees_a_rewrite_the_stat_signature_misses(tmp_path, series_dir):
    cache = SeriesCache(tmp_path / "cache")
    before = cache.load(series_dir, 5, 16)
    _rewrite_keeping_stat(series_dir / "13.dcm", np.full((20, 24), 900), 13, 8.0)
    # the documented trade-off: the signature matches, so the old entry is served
    assert_same(cache.load(series_dir, 5, 16), before)
    assert cache.hits == 1
    checking = SeriesCache(tmp_path / "cache", verify=True)
    after = checking.load(series_dir, 5, 16)
    assert checking.misses == 1 and checking.hashes == 1 and not torch.equal(before.image[2], after.image[2])
    assert_same(after, preprocess_series(dicom.read_series(series_dir), 5, 16, "2.5d"))


def test_verify_reports_and_repairs_stale_index_records(tmp_path, series_dir):
    other = tmp_path / "data" / "1" / "3"
    write_series(other, seed=1)
    age(other)
    cache = SeriesCache(tmp_path / "cache")
    cache.load(series_dir, 5, 16)
    assert cache.verify([series_dir, other]) == {"ok": [str(series_dir)], "stale": [], "new": [str(other)]}
    _rewrite_keeping_stat(series_dir / "13.dcm", np.full((20, 24), 900), 13, 8.0)
    with pytest.warns(UserWarning, match=rf"{series_dir}: files changed without a change of name, size or mtime"):
        report = cache.verify([series_dir, other])
    assert report == {"ok": [str(other)], "stale": [str(series_dir)], "new": []} and cache.stale == 1
    # the repaired record makes a plain (stat-trusting) cache find the new content
    plain = SeriesCache(tmp_path / "cache")
    assert_same(plain.load(series_dir, 5, 16), preprocess_series(dicom.read_series(series_dir), 5, 16, "2.5d"))
    assert plain.misses == 1 and plain.hashes == 0


@pytest.mark.parametrize("change", ["spinemm", "pydicom", "percentiles", "format"])
def test_a_new_library_version_or_window_invalidates_entries(tmp_path, series_dir, monkeypatch, change):
    import spinemm
    from spinemm.data import cache as cache_mod
    from spinemm.data import transforms
    from spinemm.data.store import _entry_key as whole_series_key

    cache = SeriesCache(tmp_path / "cache")
    cache.load(series_dir, 4, 16)
    whole_before = whole_series_key("abc")
    if change == "spinemm":
        monkeypatch.setattr(spinemm, "__version__", spinemm.__version__ + ".post1")
    elif change == "pydicom":
        monkeypatch.setattr(cache_mod, "_pydicom_version", lambda: "0.0.1")
    elif change == "percentiles":
        monkeypatch.setattr(transforms, "INTENSITY_PERCENTILES", (1.0, 99.0))
    else:
        monkeypatch.setattr(cache_mod, "FORMAT_VERSION", cache_mod.FORMAT_VERSION + 1)
    cache.load(series_dir, 4, 16)
    assert cache.misses == 2 and cache.hits == 0
    assert whole_series_key("abc") != whole_before  # SeriesStore's full-resolution entries too
