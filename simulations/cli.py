"""The ``fedmerge`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedmerge.errors import FederationError, FedmergeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="fedmerge: one-shot model merging as federated learning, on Flower.",
)
console = Console()
err_console = Console(stderr=True)


def _fail(exc: Exception, code: int) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(code)


@app.command()
def run(
    preset: Annotated[Optional[Path], typer.Argument(help="Preset TOML (default: the shipped default.toml).")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override a config key: key=value (repeatable).")] = [],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="New results directory (default: runs/NAME-TIME).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run one experiment: pre-train, fine-tune every client, merge with every strategy, evaluate."""
    from simulations.config import load_config
    from simulations.experiment import run_experiment
    from simulations.results import default_out_dir, print_table

    try:
        config = load_config(preset, set_)
        out_dir = out if out is not None else default_out_dir(config)
        results = run_experiment(config, out_dir, progress=not quiet, console=err_console).results
    except FederationError as exc:
        raise _fail(exc, 1) from None
    except FedmergeError as exc:
        raise _fail(exc, 2) from None
    except KeyboardInterrupt:
        raise _fail(KeyboardInterrupt("interrupted; no results were written"), 130) from None
    print_table(results, console)
    console.print(f"results: {out_dir}/results.json  (timing: {results['timing']['total']:.1f} s)")


@app.command()
def methods() -> None:
    """List the merging methods, their natural scale and their options."""
    from fedmerge.merging import METHODS

    table = Table("method", "scale", "options", "what it computes")
    for name, spec in METHODS.items():
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.items() if k not in spec.per_client)
        per = ", ".join(f"{k} (per client)" for k in spec.per_client)
        table.add_row(name, spec.natural_scale, ", ".join(x for x in (opts, per) if x) or "—", spec.summary)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
