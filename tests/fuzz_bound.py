"""The long fuzz tier's allocation bound: a test process may grow its address space by at most
``SPINEMM_FUZZ_MEMORY_GIB`` (``make test-fuzz``: 2 GiB) beyond what importing everything takes.

Importing torch alone reserves about 3 GiB of address space, so an absolute RLIMIT_AS would measure
the imports, not the inputs. :func:`apply` first imports and exercises what the tests will (model
building, every pydicom decoder plugin), then sets RLIMIT_AS to the current size plus the budget:
an input that makes spinemm allocate more fails with MemoryError (or aborts the process, for a C++
decoder), which fails the run.
"""

from __future__ import annotations

import os
import resource
import warnings

ENV = "SPINEMM_FUZZ_MEMORY_GIB"


def address_space() -> int:
    """Bytes of address space this process holds now (``/proc/self/statm``'s size)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def prewarm() -> None:
    """Import and run once what the tests will, so their address space is in place before the bound."""
    import pydicom
    import torch
    from pydicom.data import get_testdata_file

    from spinemm.models.factory import create_model
    from spinemm.pipeline import load_pipeline  # noqa: F401 (its imports)

    torch.manual_seed(0)
    create_model("spine-tiny")
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg.dcm"):
        path = get_testdata_file(name, download=False)
        if path:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    pydicom.dcmread(path).pixel_array  # noqa: B018 (loads the decoder plugin)
                except Exception:  # a missing plugin: the tests meet the same
                    pass


def apply(gib: float | None = None) -> int:
    """Set RLIMIT_AS to the address space now plus ``gib`` GiB (default: ``$SPINEMM_FUZZ_MEMORY_GIB``);
    returns the limit in bytes."""
    gib = float(os.environ[ENV]) if gib is None else gib
    limit = address_space() + int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit
