"""The runner: jobs, chunked and resumable execution, and the result store."""

from recallscope.runner.job import DEFAULT_LIMIT, Job, load_config_file, method_configs, select_facts
from recallscope.runner.run import prepare_job, run_job
from recallscope.runner.store import Store

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
