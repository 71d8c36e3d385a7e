"""Command line: ``recallscope run | plan | report | compare | methods | datasets | check-model | models``.

Thin by design: parse flags, load, call the library, print.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click

from recallscope.defaults import DEFAULT_LIMIT, DEFAULT_MODEL
from recallscope.errors import RecallscopeError

_MODEL_HELP = "Model: 'smollm2-135m' (embedded), a Hugging Face id, a local folder or a .gguf file."


def _load(name: str, dtype: str | None, device: str | None, *, validate: bool = True):
    from recallscope.models.load import load_model

    click.echo(f"loading {name} ...", err=True)
    return load_model(name, dtype=dtype, device=device, validate=validate)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recallscope")
@click.option("--debug", is_flag=True, help="On an error, also print its full traceback.")
def cli(debug: bool) -> None:
    """recallscope: how does a language model recall a fact?"""
    _STATE["debug"] = debug


_STATE = {"debug": False}


@cli.command("check-model")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--dtype", default=None, help="float32 (default), float64, bfloat16, float16.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available).")
def check_model_cmd(model: str, dtype: str | None, device: str | None) -> None:
    """Run the adapter conformance checks on MODEL and report each one.

    MODEL: 'smollm2-135m' (embedded), a Hugging Face id, a local folder or a .gguf file. The first
    line says whether its architecture spec was discovered or written by hand; every spec field
    follows the checks.
    """
    from recallscope.check import check_model

    loaded = _load(model, dtype, device, validate=False)
    report = check_model(loaded)
    click.echo(str(report))
    click.echo(loaded.spec.describe())
    sys.exit(0 if report.passed else 1)


def _job_options(command):
    """The flags shared by ``run`` and ``plan`` (they describe the same job)."""
    options = [
        click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True, help=_MODEL_HELP),
        click.option(
            "--dataset",
            default="mixed",
            show_default=True,
            help="Built-in dataset name (see `recallscope datasets`) or a .jsonl/.csv/.json file.",
        ),
        click.option(
            "--methods",
            default="all",
            show_default=True,
            help="Comma-separated method names, or 'all' (see `recallscope methods`).",
        ),
        click.option(
            "--limit",
            default=str(DEFAULT_LIMIT),
            show_default=True,
            help="Analyse at most N facts (a seeded sample, in dataset order), or 'all'. One-to-many "
            "sets: N of the model's k-item lists, each giving k answer-step facts.",
        ),
        click.option(
            "--known-only/--all-facts",
            default=True,
            show_default=True,
            help="Keep only the facts the model answers correctly (first token); one-to-many sets: "
            "lists whose k items are all correct (else any k distinct items).",
        ),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)."),
        click.option(
            "--dtype",
            default=None,
            help="float32 (default), float64, bfloat16, float16. Projections, softmaxes and "
            "decompositions accumulate in float32 at least.",
        ),
        click.option(
            "--device-map",
            default=None,
            help="Spread a model larger than one device with accelerate: auto, balanced, sequential, "
            "or a JSON file / JSON object {module: device} (devices 0, cuda:1, cpu, disk).",
        ),
        click.option(
            "--max-memory",
            default=None,
            help="With --device-map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=64GiB' (the rest "
            "is offloaded to disk).",
        ),
        click.option(
            "--offload-folder",
            type=click.Path(file_okay=False),
            default=None,
            help="With --device-map: where weights offloaded to disk go (default: a scratch folder "
            "in recallscope's cache, removed at exit).",
        ),
        click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="local: this process. ray: shard the facts over Ray workers, each holding the model "
            "(pip install -e '.[ray]'; see docs/ray.md).",
        ),
        click.option(
            "--ray-address",
            default=None,
            help="With --executor ray: the cluster to join ('auto', 'ray://head:10001'); default: "
            "start a local one.",
        ),
        click.option(
            "--workers",
            type=int,
            default=None,
            help="With --executor ray: number of workers (default: one per GPU, or 2 without GPUs).",
        ),
        click.option(
            "--batch-size", type=int, default=None, help="Facts per chunk (default: each method's own)."
        ),
        click.option(
            "--seed", type=int, default=None, help="Seed of the fact sample and of every method's noise."
        ),
        click.option(
            "--shots",
            default="0",
            show_default=True,
            help="Demonstrations in front of each prompt, comma-separated: '0,1' analyses every fact "
            "zero-shot and one-shot (Lv et al.'s few-shot check).",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="TOML or JSON file with one section per method (fields, optionally `preset`).",
        ),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _job(**flags):
    from recallscope.runner import Job, load_config_file

    limit = flags["limit"]
    if limit != "all" and not limit.isdigit():
        raise click.BadParameter(f"expected a number of facts or 'all', got {limit!r}", param_hint="--limit")
    shots = [s.strip() for s in flags["shots"].split(",") if s.strip()]
    if not shots or not all(s.isdigit() for s in shots):
        raise click.BadParameter(
            f"expected numbers of demonstrations such as '0' or '0,1', got {flags['shots']!r}",
            param_hint="--shots",
        )
    return Job(
        out=flags["out"],
        model=flags["model_name"],
        dataset=flags["dataset"],
        methods=tuple(m.strip() for m in flags["methods"].split(",") if m.strip()),
        limit=None if limit == "all" else int(limit),
        known_only=flags["known_only"],
        device=flags["device"],
        dtype=flags["dtype"],
        device_map=_device_map(flags["device_map"]),
        max_memory=_max_memory(flags["max_memory"]),
        offload_folder=flags["offload_folder"],
        executor=flags["executor"],
        ray_address=flags["ray_address"],
        workers=flags["workers"],
        batch_size=flags["batch_size"],
        seed=flags["seed"],
        shots=tuple(int(s) for s in shots),
        configs=load_config_file(flags["config_file"]) if flags["config_file"] else {},
    )


def _device_map(value: str | None):
    """``--device-map``: a strategy name, a JSON object, or a JSON file holding one."""
    if value is None or not value.strip().startswith("{") and not value.endswith(".json"):
        return value
    text = Path(value).read_text() if value.endswith(".json") and Path(value).is_file() else value
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise click.BadParameter(
            f"not a JSON object {{module: device}}: {err}", param_hint="--device-map"
        ) from None
    if not isinstance(mapping, dict):
        raise click.BadParameter("expected a JSON object {module: device}", param_hint="--device-map")
    return mapping


def _max_memory(value: str | None) -> dict | None:
    """``--max-memory 0=20GiB,cpu=64GiB`` → ``{0: "20GiB", "cpu": "64GiB"}``."""
    if value is None:
        return None
    memory = {}
    for part in value.split(","):
        device, _, size = part.partition("=")
        if not device.strip() or not size.strip():
            raise click.BadParameter(
                f"expected DEVICE=SIZE pairs such as '0=20GiB,cpu=64GiB', got {value!r}",
                param_hint="--max-memory",
            )
        device = device.strip()
        memory[int(device) if device.isdigit() else device] = size.strip()
    return memory


@cli.command("run")
@_job_options
@click.option("--no-report", is_flag=True, help="Do not write report.html at the end.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="--out holds a run of another job: replace it by this one (its results and report are "
    "deleted; finished chunks that still apply are reused).",
)
def run_cmd(no_report: bool, overwrite: bool, **flags) -> None:
    """Analyse how a model recalls facts: every method, stored in --out, with an HTML report.

    Re-running the same command resumes: finished chunks are kept and not recomputed. A folder
    belongs to one job: another job (other facts or flags) needs another --out, or --overwrite.
    """
    from recallscope.runner import run_job

    job = _job(**flags)
    store = run_job(job, report=not no_report, overwrite=overwrite)
    manifest = store.read_manifest()
    for name, entry in manifest["methods"].items():
        click.echo(
            f"{name}: {entry['n_facts']} facts, {entry['rows']['rows']} rows, {entry['seconds']} s, "
            f"{len(entry['skipped'])} skipped -> {store.results_path(name)}"
        )
    if not no_report:
        _echo_scorecard(store.root)
        click.echo(f"report: {store.root / 'report.html'}")


def _echo_scorecard(run_dir) -> None:
    """One line per claim of the run's ``scorecard.parquet``: verdict, effect and interval, facts."""
    import pandas as pd

    path = Path(run_dir) / "scorecard.parquet"
    if not path.exists():
        return
    card = pd.read_parquet(path)
    click.echo("findings (scorecard.parquet; the rule: docs/scorecard.md):")
    for row in card.itertuples():
        numbers = (
            f" {row.effect:.3g} [{row.ci_low:.3g}, {row.ci_high:.3g}], {row.n_facts} facts"
            if row.n_facts
            else ""
        )
        extra = f" ({row.finding})" if row.finding else f" ({row.reason})" if row.reason else ""
        click.echo(f"  {row.key}: {row.verdict}{numbers}{extra}")


@cli.command("plan")
@_job_options
def plan_cmd(**flags) -> None:
    """Print the forward passes, peak memory and rough time of a run, before running it.

    Loads the model and selects the facts (the known filter runs, as it would in `run`).
    """
    from recallscope.runner.plan import plan_job

    click.echo(str(plan_job(_job(**flags), log=lambda m: click.echo(m, err=True))))


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report_cmd(run_dir: str) -> None:
    """(Re)write RUN_DIR/report.html and RUN_DIR/figures/ from the stored results (no model needed)."""
    from recallscope.report import write_report

    path = write_report(run_dir)
    _echo_scorecard(run_dir)
    click.echo(f"report: {path}")


@cli.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for comparison.html.")
@click.option("--label", "labels", multiple=True, help="A name per run, in order (default: model · dataset).")
def compare_cmd(run_dirs: tuple[str, ...], out: str, labels: tuple[str, ...]) -> None:
    """One report across runs: scorecards side by side, curves on a relative depth axis (no model)."""
    from recallscope.report.compare import write_comparison

    click.echo(f"comparison: {write_comparison(run_dirs, out, labels=labels or None)}")


@cli.command("methods")
def methods_cmd() -> None:
    """List the registered methods, the paper folder (or package) holding each, and their presets."""
    from recallscope.methods import REGISTRY

    def paper(module) -> str:
        parts = module.__name__.split(".")
        return parts[2] if parts[:2] == ["recallscope", "methods"] else f"plugin: {parts[0]}"

    _table(
        ["method", "paper", "presets", "description"],
        [[name, paper(m), ", ".join(m.Config.PRESETS) or "-", m.DESCRIPTION] for name, m in REGISTRY.items()],
    )


@cli.command("datasets")
@click.option(
    "--known-by",
    "known_by",
    default=None,
    metavar="MODEL",
    help="Also count, per relation, the facts MODEL answers correctly.",
)
@click.option(
    "--criterion",
    type=click.Choice(["first_token", "greedy_prefix"]),
    default="first_token",
    show_default=True,
    help="What counts as known (with --known-by).",
)
@click.option(
    "--templates",
    default="rotate",
    show_default=True,
    help="Template per fact for --known-by: rotate, all, first or an index.",
)
@click.option("--dtype", default=None, help="float32 (default), float64, bfloat16, float16.")
@click.option("--device", default=None, help="cpu, cuda … (default: cuda if available).")
def datasets_cmd(
    known_by: str | None, criterion: str, templates: str, dtype: str | None, device: str | None
) -> None:
    """List the built-in datasets; with --known-by, how many facts a model knows per relation."""
    from recallscope.data import builtin_summary, load_facts
    from recallscope.data.known import known_counts

    rows = builtin_summary()
    _table(
        ["dataset", "kind", "facts", "templates", "description"],
        [[r["name"], r["kind"], r["facts"], r["templates"], r["description"]] for r in rows],
    )
    total = sum(r["facts"] for r in rows if r["kind"] == "relation" and r["name"] != "lv_capitals")
    click.echo(f"\n{total} single-answer facts in {sum(r['kind'] == 'relation' for r in rows) - 1} relations")
    if known_by is None:
        return
    model = _load(known_by, dtype, device)
    choice = int(templates) if templates.isdigit() else templates
    facts = load_facts("mixed", templates=choice).known_by(model, criterion)
    counts = known_counts(facts)
    click.echo(f"\nfacts {known_by} knows ({criterion}, templates={templates}):")
    _table(
        ["relation", "known", "total", "%"],
        [[rel, c["known"], c["total"], f"{100 * c['known'] / c['total']:.0f}"] for rel, c in counts.items()],
    )
    n_known, n_total = sum(c["known"] for c in counts.values()), sum(c["total"] for c in counts.values())
    click.echo(f"total: {n_known}/{n_total} ({100 * n_known / max(n_total, 1):.0f}%)")


@cli.command("models")
@click.option("--matrix", is_flag=True, help="Build a tiny model of every type and run every check on it.")
@click.option("--only", default=None, metavar="TYPES", help="Comma-separated model types (with --matrix).")
@click.option(
    "--write",
    "write_to",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the matrix as Markdown (docs/models.md).",
)
def models_cmd(matrix: bool, only: str | None, write_to: str | None) -> None:
    """The model types of the installed transformers and whether recallscope supports them.

    Without --matrix: the types of transformers' causal-LM mapping. With --matrix: each one built
    as a tiny random model, loaded through architecture discovery and checked in float64 (a few
    minutes), then classified supported, failing (with the failing check) or excluded (with why).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not matrix:
        if only is not None or write_to is not None:
            raise click.UsageError("--only and --write need --matrix")
        names = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        _table(["model type", "class"], [[n, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[n]] for n in names])
        click.echo(f"\n{len(names)} model types; `recallscope models --matrix` says which are supported")
        return
    from recallscope.coverage import coverage_matrix, render_markdown, summary

    types = None if only is None else [t.strip() for t in only.split(",") if t.strip()]
    unknown = sorted(set(types or ()) - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    if unknown:
        raise click.BadParameter(
            f"not in transformers' causal-LM mapping: {', '.join(unknown)}", param_hint="--only"
        )
    with click.progressbar(
        length=len(types or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), label="checking", file=sys.stderr
    ) as bar:
        rows = coverage_matrix(types, progress=lambda name: bar.update(1))
    _table(
        ["model type", "status", "dtype", "detail"],
        [[r.model_type, r.status, r.dtype or "-", r.reason[:100]] for r in rows],
    )
    click.echo(f"\n{summary(rows)}")
    if write_to is not None:
        Path(write_to).write_text(render_markdown(rows))
        click.echo(f"wrote {write_to}")


def _table(header: list[str], rows: list[list]) -> None:
    """Print an aligned plain-text table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``recallscope`` command; library errors print as one clean message."""
    try:
        code = cli.main(args=argv, prog_name="recallscope", standalone_mode=False)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except RecallscopeError as err:
        if _STATE["debug"]:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
