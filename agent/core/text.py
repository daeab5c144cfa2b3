"""Numbers read from text that anyone can set (a label, a key)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

MAX_DIGITS = 9  # an index or a class: never a number that overflows int64


def small_ints(text: npt.NDArray[np.str_]) -> tuple[IntArray, BoolArray]:
    """Per element: its value where it is a small non-negative integer (decimal digits only,
    at most `MAX_DIGITS` of them), else 0; and whether it is one."""
    ok = np.asarray(np.char.isdecimal(text) & (np.char.str_len(text) <= MAX_DIGITS), dtype=bool)
    values = np.zeros(text.shape, dtype=np.int64)
    values[ok] = text[ok].astype(np.int64)
    return values, ok
