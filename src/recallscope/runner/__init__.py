"""The runner: jobs, chunked and resumable execution, and the result store."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recallscope.runner.job import DEFAULT_LIMIT, Job, load_config_file, method_configs, select_facts
    from recallscope.runner.run import prepare_job, run_job
    from recallscope.runner.store import Store

_WHERE = {
    "DEFAULT_LIMIT": "job",
    "Job": "job",
    "load_config_file": "job",
    "method_configs": "job",
    "select_facts": "job",
    "prepare_job": "run",
    "run_job": "run",
    "Store": "store",
}


def __getattr__(name: str):
    """Names load on first use, so reading a stored run (the report) does not import torch."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"recallscope.runner.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'recallscope.runner' has no attribute {name!r}")


__all__ = [
    "DEFAULT_LIMIT",
    "Job",
    "Store",
    "load_config_file",
    "method_configs",
    "prepare_job",
    "run_job",
    "select_facts",
]
