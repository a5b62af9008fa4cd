"""Checked CSV reading: every problem becomes a :class:`SpineDataError` naming file, row and column.

Rows are reported 1-based over data rows (the header is not a row), together with the line in the
file (``line = row + 1``: one header line, one line per record). All checks are vectorised: a table
of 50k rows is validated in milliseconds, and only the first offending row is formatted.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from spinemm.errors import SpineDataError

# A non-negative integer; a trailing ".0" is tolerated because pandas writes int columns holding
# NaN as floats. Signs, exponents and fractions are rejected.
_UINT = re.compile(r"[0-9]+(?:\.0*)?")
# int64 holds every 18-digit number; longer ids would overflow silently.
_MAX_INT_DIGITS = 18


def where(path: Path, index: int, column: str | Sequence[str]) -> str:
    """``"<path>: row 3 (line 4), column 'x'"`` for the 0-based ``index`` of a data row."""
    if isinstance(column, str):
        col = f"column {column!r}"
    else:
        col = "columns " + ", ".join(repr(c) for c in column)
    return f"{path}: row {index + 1} (line {index + 2}), {col}"


def fail_at(
    path: Path, frame: pd.DataFrame, bad: np.ndarray, column: str | Sequence[str], problem: str
) -> None:
    """Raise for the first True entry of ``bad`` (a bool mask over ``frame``'s rows), if any.

    ``problem`` may use ``{value}``, replaced by the repr of the offending cell(s).
    """
    hits = np.flatnonzero(bad)
    if hits.size == 0:
        return
    label = frame.index[hits[0]]
    cols = [column] if isinstance(column, str) else list(column)
    values = tuple(frame.at[label, c] for c in cols)
    value = repr(values[0]) if len(values) == 1 else repr(values)
    more = f" (and {hits.size - 1} more rows)" if hits.size > 1 else ""
    raise SpineDataError(f"{where(path, int(label), column)}: {problem.format(value=value)}{more}")


def read_csv(path: Path, columns: Iterable[str]) -> pd.DataFrame:
    """Read ``path`` as strings, stripped, blank lines dropped, with ``columns`` required.

    The index of the result is the 0-based data row in the file, so errors can name the line.
    """
    path = Path(path)
    if not path.is_file():
        raise SpineDataError(f"missing file: expected {path}")
    try:
        # na_filter=False keeps empty cells as "" (no float NaN in string columns) and is fastest;
        # skip_blank_lines=False keeps the index aligned with line numbers; index_col=False stops
        # pandas from silently turning surplus fields into an index, and the warning it gives
        # instead (surplus fields dropped) is made an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, na_filter=False, skip_blank_lines=False, index_col=False)
            # pandas renames a repeated header ("x", "x.1"), so one copy would win silently: read
            # the header as written to catch it.
            header = pd.read_csv(path, dtype=str, header=None, nrows=1, na_filter=False, index_col=False)
    except pd.errors.EmptyDataError as err:
        raise SpineDataError(f"{path}: file is empty (expected a header line)") from err
    except pd.errors.ParserWarning as err:
        raise SpineDataError(f"{path}: a row has more fields than the header") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise SpineDataError(f"{path}: cannot parse as CSV: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    written = [str(c).strip() for c in header.iloc[0]] if len(header) else []
    repeated = sorted({c for c in written if written.count(c) > 1})
    if repeated:
        raise SpineDataError(
            f"{path}: line 1 (header) repeats column {repeated[0]!r}"
            + (f" (and {len(repeated) - 1} more)" if len(repeated) > 1 else "")
            + "; each column must appear once"
        )
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SpineDataError(
            f"{path}: missing column {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; found columns {list(frame.columns)}"
        )
    for c in frame.columns:
        frame[c] = frame[c].str.strip()
    blank = (frame == "").all(axis=1).to_numpy()
    return frame[~blank] if blank.any() else frame


def int_column(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    """Column ``column`` as int64, raising on anything but a non-negative integer."""
    text = frame[column]
    ok = text.str.fullmatch(_UINT).to_numpy(dtype=bool)
    fail_at(path, frame, ~ok, column, "{value} is not a non-negative integer")
    too_long = text.str.match(f"[0-9]{{{_MAX_INT_DIGITS + 1}}}").to_numpy(dtype=bool)
    fail_at(path, frame, too_long, column, "{value} is too large")
    # Regex string ops run in pyarrow; a Python-level split would dominate the load time.
    digits = text.str.replace(r"\.0*$", "", regex=True)
    return pd.to_numeric(digits).to_numpy(dtype=np.int64)


def float_column(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    """Column ``column`` as float64, raising on empty, non-numeric or non-finite cells."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    fail_at(path, frame, ~np.isfinite(values), column, "{value} is not a finite number")
    return values


def choice_column(
    path: Path, frame: pd.DataFrame, column: str, choices: Sequence[str], allow_empty: bool = False
) -> None:
    """Raise unless every cell of ``column`` is one of ``choices`` (or empty, if allowed)."""
    allowed = list(choices) + ([""] if allow_empty else [])
    bad = ~frame[column].isin(allowed).to_numpy()
    fail_at(path, frame, bad, column, f"unknown value {{value}}; expected one of {list(choices)}")


def unique_rows(path: Path, frame: pd.DataFrame, columns: Sequence[str], parsed: pd.DataFrame) -> None:
    """Raise if two rows share the values of ``columns`` (compared on the ``parsed`` values)."""
    dup = parsed.duplicated(subset=list(columns), keep="first").to_numpy()
    hits = np.flatnonzero(dup)
    if hits.size == 0:
        return
    key = parsed.iloc[hits[0]][list(columns)]
    same = (parsed[list(columns)] == key).all(axis=1).to_numpy()
    first = int(frame.index[np.flatnonzero(same)[0]])
    named = columns[0] if len(columns) == 1 else columns
    fail_at(path, frame, dup, named, f"duplicate {{value}}, already given in row {first + 1}")


def check_split(split: str) -> str:
    """Return ``split`` if it is ``"train"`` or ``"test"``; it names files and folders."""
    if split not in ("train", "test"):
        raise SpineDataError(f"split must be 'train' or 'test', got {split!r}")
    return split


def check_id(value: object, name: str) -> int:
    """A study/series id as a non-negative Python int (bools, floats and strings are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SpineDataError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise SpineDataError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)
