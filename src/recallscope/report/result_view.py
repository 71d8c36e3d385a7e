"""A method's in-memory result seen as a run folder, so that its report section can be drawn in a
notebook (``result.plot()``) with the same code as the report.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recallscope.report.section import Options, Section

__all__ = ["ResultStore", "plot_result"]


class ResultStore:
    """The part of :class:`~recallscope.runner.store.Store` a report section reads, over one result:
    its table, extra tables, arrays and config (other methods' tables are empty).
    """

    def __init__(self, result: Any) -> None:
        self.result = result

    def methods(self) -> list[str]:
        return [self.result.method]

    def read_table(self, method: str, table: str | None = None) -> pd.DataFrame:
        if method != self.result.method:
            return pd.DataFrame()
        return self.result.to_frame() if table is None else self.result.tables().get(table, pd.DataFrame())

    def read_arrays(self, method: str, keys=None) -> dict[str, np.ndarray]:
        arrays = self.result.arrays() if method == self.result.method else {}
        return arrays if keys is None else {k: arrays[k] for k in keys}

    def read_manifest(self) -> dict[str, Any]:
        entry = {
            "config": self.result.config.to_dict(),
            "conventions": self.result.provenance.get("conventions", {}),
        }
        return {"methods": {self.result.method: entry}, "model": self.result.provenance.get("model", {})}

    def read_json(self, name: str) -> None:
        return None


def plot_result(result: Any, folder: str | Path | None = None, facts: pd.DataFrame | None = None) -> Section:
    """``result``'s report section (figures written to ``folder``, a temporary one by default)."""
    from recallscope.report.sections import build_section

    ids = list(result.fact_ids)
    if facts is None:
        blank = [""] * len(ids)
        facts = pd.DataFrame({"fact_id": ids, "prompt": blank, "target": blank, "relation": blank,
                              "subject": blank, "answers": [[] for _ in ids]})  # fmt: skip
    if folder is not None:
        return build_section(result.method, ResultStore(result), facts, Path(folder), Options())
    with tempfile.TemporaryDirectory(prefix="recallscope-plot-") as tmp:
        return build_section(result.method, ResultStore(result), facts, Path(tmp), Options())
