"""Two runs' stored results, compared file by file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file


def assert_same_result_files(a: Path, b: Path) -> list[str]:
    """Every table and array under ``a/results`` equals the one under ``b/results``, to the bit.

    Returns:
        the names of the result files (the same in both).
    """
    files = sorted(p.name for p in (a / "results").iterdir())
    assert files == sorted(p.name for p in (b / "results").iterdir())
    for name in files:
        left, right = a / "results" / name, b / "results" / name
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(left), pd.read_parquet(right), check_exact=True)
        else:
            arrays, others = load_file(str(left)), load_file(str(right))
            assert list(arrays) == list(others), name
            for key, value in arrays.items():
                np.testing.assert_array_equal(value, others[key])
    return files
