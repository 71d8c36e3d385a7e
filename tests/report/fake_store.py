"""A stand-in for a run folder's Store: tables by (method, table), for report tests."""

from __future__ import annotations

import pandas as pd


class FakeStore:
    """The part of a run folder's Store the scorecard reads: tables by (method, table)."""

    def __init__(self, tables: dict, d_vocab: int | None = None) -> None:
        self.tables = tables
        self.d_vocab = d_vocab

    def methods(self) -> list[str]:
        return sorted({key[0] if isinstance(key, tuple) else key for key in self.tables})

    def read_table(self, method: str, table: str | None = None) -> pd.DataFrame:
        return self.tables.get(method if table is None else (method, table), pd.DataFrame())

    def read_manifest(self) -> dict:
        return {"model": {"dims": {"d_vocab": self.d_vocab}}} if self.d_vocab else {"model": {}}
