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
