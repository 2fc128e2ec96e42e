"""The ``fedmerge`` command."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.table import Column, Table

from fedmerge.errors import FederationError, FedmergeError, MergeOverflowError, OutputError
from simulations.progress import count, labelled, terminal

if TYPE_CHECKING:
    from simulations.config import ExperimentConfig

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="fedmerge: one-shot model merging as federated learning, on Flower.",
)
console = terminal()
err_console = terminal(stderr=True)


def _shipped(folder: str) -> str:
    """Names of the TOML files shipped in ``simulations/<folder>`` (presets, sweeps), for --help."""
    return ", ".join(sorted(p.stem for p in (Path(__file__).parent / folder).glob("*.toml")))


def _fail(exc: BaseException, code: int) -> typer.Exit:
    err_console.print(labelled("error:", "bold red", str(exc)), highlight=False)
    return typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up path runs (engines stop, nothing is left half-written)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def user_errors(on_interrupt: str = "interrupted; no results were written") -> Iterator[None]:
    """One red ``error:`` line and an exit code instead of a traceback: 2 for bad input (config,
    files, values), 1 for a run that could not finish (a federated round, a result beyond its dtype's
    range, results that could not be written), 130 for Ctrl-C, 143 for SIGTERM."""
    try:
        yield
    except (FederationError, MergeOverflowError, OutputError) as exc:
        raise _fail(exc, 1) from None
    except FedmergeError as exc:
        raise _fail(exc, 2) from None
    except OSError as exc:  # the machine, not the input: a full disk, a cache made unwritable mid-run
        where = f"{exc.filename}: " if exc.filename else ""
        raise _fail(OutputError(f"{where}{exc.strerror or exc}"), 1) from None
    except Terminated:
        raise _fail(KeyboardInterrupt(f"terminated; {on_interrupt.removeprefix('interrupted; ')}"), 143) from None
    except KeyboardInterrupt:
        raise _fail(KeyboardInterrupt(on_interrupt), 130) from None


# Arguments' own help is lost between typer 0.20 and click 8.5, so each command's help describes them.
@app.command(help="Run one experiment: pre-train, fine-tune every client, merge with every strategy, evaluate."
             f"\n\nPRESET is a preset TOML file or the name of a shipped preset ({_shipped('presets')}); "
             "without it, the default experiment runs.")
def run(
    preset: Annotated[Path | None, typer.Argument(help="A preset TOML file or a shipped preset's name.",
                                                  show_default=False)] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override a config key: key=value (repeatable).")] = [],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="New results directory (default: runs/NAME-TIME).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    plugin: Annotated[list[Path], typer.Option("--plugin", help="A Python file that registers merging rules, datasets, partitioners or models (repeatable).")] = [],
    seeds: Annotated[str | None, typer.Option("--seeds", help="Run once per seed, e.g. 0,1,2 (a sweep of one cell per seed, resumable into --out), and print mean ± sd per strategy.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="With --seeds: seeds run at once, as Ray tasks (1: one after another here).")] = 1,
) -> None:
    """Run one experiment (its help, with PRESET's, is in the decorator)."""
    with user_errors():  # the imports too: Ctrl-C while torch loads is an interrupt like any other
        from simulations.config import load_config
        from simulations.experiment import run_experiment
        from simulations.results import print_table, results_directory

        if workers < 1:
            raise FedmergeError(f"--workers must be at least 1, got {workers}")
        config = load_config(preset, set_, plugins=plugin)
        if seeds is not None:
            return _run_seeds(config, seeds, out, quiet, workers)
        with results_directory(out, config.name) as out_dir:
            results = run_experiment(config, out_dir, progress=not quiet, console=err_console).results
    with user_errors(f"interrupted; the results are complete in {out_dir}"):
        print_table(results, console)
        if len({c["task"] for c in results["clients"]}) > 1:  # clients with tasks of their own: per task too
            from simulations.clip_report import print_task_table, rows_from_run

            print_task_table(rows_from_run(results), console,
                             title="CLIP tasks" if results["config"].get("tasks") else "clients' tasks")
        console.print(f"results: {out_dir}/results.json  (timing: {results['timing']['total']:.1f} s)")


def _run_seeds(config: ExperimentConfig, seeds: str, out: Path | None, quiet: bool, workers: int) -> None:
    """``fedmerge run --seeds``: the experiment once per seed, as a sweep, then mean ± sd per strategy."""
    from simulations.results import results_directory
    from simulations.sweep import SweepSpec, print_seed_summary, run_sweep

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise FedmergeError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    spec = SweepSpec.over_seeds(config, seed_list)
    # --out is a sweep directory (re-running resumes, as `fedmerge sweep` does); else a new run directory
    with contextlib.nullcontext(out) if out is not None else results_directory(None, config.name) as out_dir:
        run_sweep(spec, out_dir, console=err_console, progress=not quiet, workers=workers)
    print_seed_summary(out_dir / "results.csv", console, title=config.name)
    console.print(f"results: {out_dir}/results.csv, one directory per seed in {out_dir}/cells")


@app.command(help="Run a grid of config values × seeds; write a tidy results.csv and plots (resumable)."
             f"\n\nSPEC is a sweep spec TOML file or the name of a shipped one ({_shipped('sweeps')}).")
def sweep(
    spec: Annotated[Path, typer.Argument(help="A sweep spec TOML file or a shipped spec's name.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Sweep directory; re-running resumes (default: runs/sweep-NAME).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    plugin: Annotated[list[Path], typer.Option("--plugin", help="A Python file that registers merging rules, datasets, partitioners or models (repeatable).")] = [],
    workers: Annotated[int | None, typer.Option("--workers", help="Cells run at once, as Ray tasks (default: this machine's usable cores over cell-cpus; 1 runs them one after another here).")] = None,
    cell_cpus: Annotated[float | None, typer.Option("--cell-cpus", help="CPUs per cell on Ray (default: the spec's cell-cpus, else 1).")] = None,
    cell_gpus: Annotated[float | None, typer.Option("--cell-gpus", help="GPUs per cell on Ray (default: the spec's cell-gpus, else 0).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="A running Ray cluster to spread the cells over (as RAY_ADDRESS does); --workers then defaults to the cluster's CPUs over cell-cpus.")] = None,
) -> None:
    """Run a sweep (its help, with SPEC's, is in the decorator)."""
    with user_errors("interrupted; finished cells are kept, re-run to resume"):
        from simulations.cluster import joins_a_cluster
        from simulations.sweep import SweepSpec, default_workers, print_sweep_summary, run_sweep

        if workers is not None and workers < 1:
            raise FedmergeError(f"--workers must be at least 1, got {workers}")
        if address is not None:
            if not address.strip():
                raise FedmergeError("--address must name a Ray cluster, e.g. 10.0.0.5:6379")
            os.environ["RAY_ADDRESS"] = address
        loaded = SweepSpec.load(spec, plugins=plugin).with_resources(cell_cpus, cell_gpus)
        out_dir = out if out is not None else Path("runs") / f"sweep-{loaded.name}"
        run_sweep(loaded, out_dir, console=err_console, progress=not quiet,
                  workers=workers or (None if joins_a_cluster() else default_workers(loaded.cell_cpus)))
    with user_errors(f"interrupted; the sweep's results are complete in {out_dir}"):
        print_sweep_summary(out_dir / "results.csv", list(loaded.grid), console, title=loaded.name)
        console.print(f"sweep: {out_dir}/results.csv and {', '.join(p.name for p in sorted(out_dir.glob('*.png')))}")


@app.command()
def methods(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the README's markdown table instead.")] = False,
    plugin: Annotated[list[Path], typer.Option("--plugin", help="A Python file that registers merging rules, datasets, partitioners or models (repeatable).")] = [],
) -> None:
    """List the merging methods, their natural scale, options and source."""
    from fedmerge.merging import METHODS
    from simulations.config import load_plugins

    with user_errors():
        load_plugins([str(p) for p in plugin])
        METHODS.load_entry_points()
    if markdown:
        from simulations.reference import methods_table

        print(methods_table(), end="")
        return

    table = Table(Column("method", no_wrap=True), "scale", "weights", "options", "what it computes", "reference")
    for name, entry in METHODS.items():
        table.add_row(name, entry.natural_scale, "used" if entry.uses_weights else "ignored",
                      ", ".join(o.describe() for o in entry.options) or "—", entry.formula or entry.summary,
                      entry.citation or "—")
    console.print(table)


@app.command()
def equivalence(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="New directory for equivalence.json and the figures (default: runs/equivalence-TIME).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="Engine of the Flower runs being checked: inprocess or ray.")] = "inprocess",
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, base model and client shuffling.")] = 0,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override a key of the default experiment: key=value.")] = [],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Show that Task Arithmetic is one-shot FedAvg (exit 1 if any equivalence fails), and what heterogeneity does."""
    with user_errors():
        from simulations.config import load_config
        from simulations.equivalence import print_lesson, run_lesson, write_lesson
        from simulations.progress import RunProgress
        from simulations.results import results_directory

        config = load_config(None, set_).replace(engine=engine, seed=seed)
        with results_directory(out, "equivalence") as out_dir:
            with RunProgress(err_console, enabled=not quiet) as bar:
                report = run_lesson(config, stage=bar.stage)
            write_lesson(report, out_dir)
    with user_errors(f"interrupted; the results are complete in {out_dir}"):
        print_lesson(report, console)
        console.print(f"numbers and figures: {out_dir}")
    if report["failures"]:
        raise _fail(ValueError("equivalence violated: " + "; ".join(report["failures"])), 1)

@app.command(context_settings={"allow_extra_args": True})
def merge(
    ctx: typer.Context,
    base: Annotated[Path | None, typer.Option("--base", help="The pre-trained model θ0: a checkpoint file (.safetensors or a PyTorch state dict), a Hugging Face model directory or a Hub id in the local cache.")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", help="Fine-tuned models: --models FT1 FT2 ... (the architecture of --base, in the same form).")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Merging method (see `fedmerge methods`).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The merged model: a new .safetensors file, or for model directories a new directory.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help=f"A merge recipe TOML file, or a shipped recipe's name ({_shipped('recipes')}), instead of --base, --models, --method and the rest (--out overrides its out).")] = None,
    scale: Annotated[float | None, typer.Option("--scale", help="λ in θ0 + λ·τ_merged (default 1).")] = None,
    option: Annotated[list[str], typer.Option("--option", help="A method option key=value, e.g. k=0.2 (repeatable).")] = [],
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    plugin: Annotated[list[Path], typer.Option("--plugin", help="A Python file that registers merging rules, datasets, partitioners or models (repeatable).")] = [],
    merge_device: Annotated[str | None, typer.Option("--merge-device", help="Where the rule computes: auto (the default: the GPU when there is one), cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Model directories: the output's dtype, bfloat16, float16 or float32 (default: the base's).")] = None,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Model directories: the largest output shard, e.g. 5GB (the default) or 500MB.")] = None,
    embeddings: Annotated[str | None, typer.Option("--embeddings", help="Model directories whose vocabularies differ: error (the default), or base to merge the rows they share and keep the base's vocabulary.")] = None,
) -> None:
    """Merge checkpoints you already have, tensor by tensor, into θ0 + λ·τ_merged (no training, no Flower)."""
    from fedmerge.offline import merge_checkpoints
    from fedmerge.recipe import MergeRecipe
    from simulations.config import RECIPES_DIR, find_shipped, load_plugins, parse_override
    from simulations.progress import progress_bar

    extra = [a for a in ctx.args if a.startswith("-")]
    with user_errors("interrupted; nothing was written"):
        if extra:
            raise FedmergeError(f"unknown option {extra[0]!r}")
        load_plugins([str(p) for p in plugin])
        if recipe is not None:
            given = [flag for flag, value in (("--base", base), ("--models", models), ("--method", method),
                                               ("--scale", scale), ("--option", option), ("--dtype", dtype),
                                               ("--max-shard-size", max_shard_size), ("--embeddings", embeddings),
                                               ("--merge-device", merge_device), ("models after --models", ctx.args))
                     if value is not None and value != []]
            if given:
                raise FedmergeError(f"--recipe holds the whole merge; set {', '.join(given)} in it instead")
            steps = MergeRecipe.load(find_shipped(recipe, RECIPES_DIR, "recipe"))
            if out is not None:  # the recipe's models and rules, written elsewhere
                steps = steps.model_copy(update={"out": str(out)})
            with progress_bar(err_console, enabled=not quiet, unit="tensors read", transient=True) as bar:
                task = bar.add_task(f"Merging {count(len(steps.models), 'model')} with {', '.join(steps.methods)}",
                                    total=None)
                summaries = steps.run(overwrite=force, on_read=lambda: bar.advance(task))
            for summary in summaries:
                _print_merged(summary)
            return
        missing = [flag for flag, value in (("--base", base), ("--models", models), ("--method", method),
                                             ("--out", out)) if not value]
        if missing:
            raise FedmergeError(f"give {', '.join(missing)} (or --recipe)")
        assert base is not None and models is not None and method is not None and out is not None
        options = {}
        for text in option:
            if "=" not in text:
                raise FedmergeError(f"--option expects key=value, got {text!r}")
            key, value = parse_override(text)
            options[key.replace("-", "_")] = value
        with progress_bar(err_console, enabled=not quiet, unit="tensors read", transient=True) as bar:
            task = bar.add_task(f"Merging {count(len(models) + len(ctx.args), 'model')} with {method}", total=None)
            model_options = {k: v for k, v in {"dtype": dtype, "max_shard_size": max_shard_size,
                                                "embeddings": embeddings}.items() if v is not None}
            summary = merge_checkpoints(base, [*models, *map(Path, ctx.args)], method, out,
                                        scale=1.0 if scale is None else scale, options=options, overwrite=force,
                                        on_read=lambda: bar.advance(task), device=merge_device or "auto",
                                        model_options=model_options)
    _print_merged(summary)


def _print_merged(summary: dict) -> None:
    console.print(f"merged {count(summary['models'], 'model')} with {summary['method']} (λ={summary['scale']:g}): "
                  f"{count(len(summary['merged']), 'tensor')} merged, {len(summary['copied'])} copied from the base "
                  f"-> {summary['out']}")


@app.command(context_settings={"allow_extra_args": True})
def evaluate(
    ctx: typer.Context,
    base: Annotated[str, typer.Option("--base", help="The pre-trained CLIP model: a Hub id or a save_pretrained directory.")],
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated tasks, e.g. Cars,DTD,EuroSAT,GTSRB,MNIST,RESISC45,SUN397,SVHN (or folder:PATH).")],
    models: Annotated[list[str], typer.Option("--models", help="One fine-tuned model per task, in the order of --tasks (repeat --models, or list them after it).")],
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated merging methods to build and score.")] = "task_arithmetic,tsv",
    scale: Annotated[list[str], typer.Option("--scale", help="λ: a number for every method, or method=λ (repeatable).")] = [],
    merged: Annotated[list[str], typer.Option("--merged", help="Also score an already merged model: NAME=SOURCE (repeatable).")] = [],
    max_examples: Annotated[int, typer.Option("--max-examples", help="Score at most this many test images per task (0: all).")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader processes decoding images.")] = 0,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where zero-shot heads are cached (default ~/.cache/fedmerge).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the table as JSON here.")] = None,
    plugin: Annotated[list[Path], typer.Option("--plugin", help="A Python file that registers merging rules (repeatable).")] = [],
) -> None:
    """Score existing CLIP checkpoints without fine-tuning: zero-shot, fine-tuned, every merge (papers' table)."""
    from fedmerge.evaluation.checkpoints import evaluate_checkpoints
    from fedmerge.io import check_output, write_text_atomic
    from fedmerge.merging import METHODS
    from simulations.clip_report import print_task_table
    from simulations.config import default_cache_dir, load_plugins
    from simulations.results import to_json

    with user_errors("interrupted; nothing was written"):
        load_plugins([str(p) for p in plugin])
        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        for m in method_list:  # before any checkpoint is read: unknown rules, rules needing options
            missing = sorted(METHODS[m].required)
            if missing:
                raise FedmergeError(f"{m} needs option {missing[0]!r}, which fedmerge evaluate cannot set; "
                                    "merge with `fedmerge merge --option` and score it with --merged")
        scales: dict[str, float] = {}
        for text in scale:
            name, sep, value = text.rpartition("=")
            try:
                scales.update({name: float(value)} if sep else {m: float(value) for m in method_list})
            except ValueError:
                raise FedmergeError(f"--scale expects a number or method=number, got {text!r}") from None
            if sep and name not in method_list:
                raise FedmergeError(f"--scale names {name!r}, which is not in --methods ({', '.join(method_list)})")
        named = {}
        for text in merged:
            name, sep, source = text.partition("=")
            if not sep:
                raise FedmergeError(f"--merged expects NAME=SOURCE, got {text!r}")
            named[name] = source
        if out is not None:
            check_output(out, directory=False, overwrite=True)  # a table may be replaced; not after the work
        cache = cache_dir or default_cache_dir()
        report = evaluate_checkpoints(base, [*models, *ctx.args], task_list, methods=method_list,
                                      scales=scales, merged=named, cache_dir=cache, max_examples=max_examples,
                                      workers=workers)
        if out is not None:
            write_text_atomic(out, to_json(report))
    print_task_table(report, console, title=f"{base}")


def main() -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        app()
    except SystemExit as exc:
        _exit(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
    _exit(0)


def _exit(code: int) -> NoReturn:
    """Exit with ``code``. A client thread the in-process engine gave up on may still be inside a torch
    operation; a normal exit would run C++ destructors under it and abort the process (SIGABRT), so
    then the output is flushed and the process ends at once."""
    engine = sys.modules.get("simulations.engine")
    if engine is not None and not engine.settle_client_threads():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
