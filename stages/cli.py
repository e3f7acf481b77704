"""The `refine` command line: one sub-command per stage."""

from __future__ import annotations

from typing import Annotated

import typer

from stages.apply import apply
from stages.common import state
from stages.demo_data import demo_data
from stages.evaluate import evaluate
from stages.extract import extract
from stages.review import review
from stages.store import store_app
from stages.train import train

app = typer.Typer(
    name="refine",
    help="Tight bounding boxes from HQ-SAM features: extract once into a Zarr store, then train fast.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors instead of one line.")] = False,
) -> None:
    state["debug"] = debug


app.command("demo-data")(demo_data)
app.command("extract")(extract)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("apply")(apply)
app.command("review")(review)
app.add_typer(store_app, name="store")


def main() -> None:
    """The `refine` console script."""
    app(prog_name="refine")


if __name__ == "__main__":  # `python -m stages.cli <command>`: the CLI without an installed script (torchrun -m)
    main()
