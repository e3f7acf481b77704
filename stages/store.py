"""`refine store info` and `refine store verify`: look into a feature store."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipeline.errors import RefineError
from pipeline.store_report import store_info, verify_store
from pipeline.store import FeatureStore
from stages.common import console, domain_errors, err_console

store_app = typer.Typer(help="Inspect and check a feature store.", no_args_is_help=True)

StorePath = Annotated[str, typer.Argument(help="Feature store: a local path or an fsspec URL.")]


@store_app.command("info")
def info(
    store: StorePath,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Namespaces (one per encoder identity) with provenance, entry counts, datasets and bytes on disk."""
    with domain_errors():
        report = store_info(FeatureStore(store))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    console.print(f"store {report['store']}: {len(report['namespaces'])} namespace(s), {report['bytes'] / 2**20:.1f} MiB", markup=False, highlight=False)
    for namespace in report["namespaces"]:
        console.print(
            f"  {namespace['fingerprint']}  {namespace['encoder']}  {namespace['weights']}\n"
            f"    {namespace['entries']} entries, {namespace['bytes'] / 2**20:.1f} MiB, created {namespace['created']}\n"
            f"    datasets: {', '.join(namespace['datasets']) or '(none)'}",
            markup=False,
            highlight=False,
        )


@store_app.command("verify")
def verify(store: StorePath) -> None:
    """Read every committed entry and check shape, dtype, finiteness, digest and the dataset manifests."""
    with domain_errors():
        checked, problems = verify_store(FeatureStore(store))
        if problems:
            for problem in problems:
                err_console.print(f"  {problem}", markup=False, highlight=False)
            raise RefineError(f"{store}: {len(problems)} problem(s) found in {checked} entries (listed above)")
    console.print(f"{store}: {checked} entries verified, no problems", markup=False, highlight=False)
