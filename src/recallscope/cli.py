"""Command line: ``recallscope check-model``, ``recallscope run``.

Thin by design: parse flags, load, call the library, print.
"""

from __future__ import annotations

import sys

import click

from recallscope.errors import RecallscopeError
from recallscope.models.load import DEFAULT_MODEL

_MODEL_HELP = "Model: 'smollm2-135m' (embedded), a Hugging Face id, a local folder or a .gguf file."


def _load(name: str, dtype: str | None, device: str | None):
    from recallscope.models.load import load_model

    click.echo(f"loading {name} ...", err=True)
    return load_model(name, dtype=dtype, device=device)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recallscope")
def cli() -> None:
    """recallscope: how does a language model recall a fact?"""


@cli.command("check-model")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--dtype", default=None, help="float32 (default), float64, bfloat16, float16.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available).")
def check_model_cmd(model: str, dtype: str | None, device: str | None) -> None:
    """Run the adapter conformance checks on MODEL and report each one.

    MODEL: 'smollm2-135m' (embedded), a Hugging Face id, a local folder or a .gguf file.
    """
    from recallscope.check import check_model

    report = check_model(_load(model, dtype, device))
    click.echo(str(report))
    sys.exit(0 if report.passed else 1)


@cli.command("run")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True, help=_MODEL_HELP)
@click.option("--dtype", default=None, help="float32 (default), float64, bfloat16, float16.")
@click.option("--device", default=None, help="cpu, cuda … (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
def run_cmd(model_name: str, dtype: str | None, device: str | None, out: str) -> None:
    """Analyse how MODEL recalls facts (the main job).

    The dataset runner and the analysis methods arrive with later releases; for now this loads
    the model, verifies its adapter and lists what a run will do.
    """
    from recallscope.check import check_model

    model = _load(model_name, dtype, device)
    click.echo(repr(model))
    report = check_model(model)
    n_ok = len(report.results) - len(report.failures)
    click.echo(f"adapter checks: {n_ok}/{len(report.results)} passed")
    for failure in report.failures:
        click.echo(f"  {failure}")
    click.echo(
        f"plan: output folder {out}\n"
        "  methods registered: none yet (logit lens, causal tracing, attention knockout, "
        "attribution … come with the next issues)\n"
        "  nothing else to run."
    )
    sys.exit(0 if report.passed else 1)


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
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
