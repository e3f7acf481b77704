"""`refine store info`, `verify` and `gc`: look into a feature store, check it, clean it up."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from stages.common import console, domain_errors, err_console
from stages.options import finite

# `store gc`'s default grace period, pipeline.store.gc.DEFAULT_GRACE_S (a test keeps them equal); written
# out here so that `--help` does not import zarr.
DEFAULT_GRACE_S = 3600.0

store_app = typer.Typer(help="Inspect, check and clean up a feature store.", no_args_is_help=True)

StorePath = Annotated[str, typer.Argument(help="Feature store: a local path or an fsspec URL.")]


@store_app.command("info")
def info(
    store: StorePath,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Namespaces (one per encoder identity) with provenance, entry counts by layout, datasets and bytes on disk."""
    from pipeline.store import FeatureStore
    from pipeline.store.report import store_info

    with domain_errors():
        report = store_info(FeatureStore(store))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    console.print(
        f"store {report['store']} (version {report['version']}): {len(report['namespaces'])} namespace(s), "
        f"{report['bytes'] / 2**20:.1f} MiB",
        markup=False,
        highlight=False,
    )
    for namespace in report["namespaces"]:
        console.print(
            f"  {namespace['fingerprint']}  {namespace['encoder']}  {namespace['weights']}\n"
            f"    {namespace['entries']} entries, {namespace['bytes'] / 2**20:.1f} MiB, "
            f"created {namespace['created']}\n"
            f"    datasets: {', '.join(namespace['datasets']) or '(none)'}",
            markup=False,
            highlight=False,
        )
        for layout in namespace["layouts"]:
            console.print(
                f"    layout {layout['layout']}: {layout['entries']} entries, {layout['description']}",
                markup=False,
                highlight=False,
            )


@store_app.command("verify")
def verify(store: StorePath) -> None:
    """Read every committed entry and check shape, dtype, finiteness, digest and the dataset manifests."""
    from pipeline.errors import RefineError
    from pipeline.store import FeatureStore
    from pipeline.store.report import verify_store

    with domain_errors():
        checked, problems = verify_store(FeatureStore(store))
        if problems:
            for problem in problems:
                err_console.print(f"  {problem}", markup=False, highlight=False)
            raise RefineError(f"{store}: {len(problems)} problem(s) found in {checked} entries (listed above)")
    console.print(f"{store}: {checked} entries verified, no problems", markup=False, highlight=False)


@store_app.command("gc")
def gc(
    store: StorePath,
    grace: Annotated[
        float,
        typer.Option(
            min=0.0,
            callback=finite,
            help="Touch only segments and temporary files with no write for this many seconds, so a running "
            "`extract` is never disturbed. 0 is safe only when no extract runs on the store.",
        ),
    ] = DEFAULT_GRACE_S,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be removed; remove nothing.")] = False,
    drop_damaged: Annotated[
        bool,
        typer.Option(
            "--drop-damaged",
            help="Also remove damaged (unparseable) commit files and their segments; `extract` recomputes "
            "what a dataset needed from them. Without it they are reported and kept.",
        ),
    ] = False,
) -> None:
    """Remove segments and shards no commit references, duplicate copies of a key and stale temporary files."""
    from pipeline.store import FeatureStore
    from pipeline.store.gc import collect_garbage

    with domain_errors():
        report = collect_garbage(FeatureStore(store), grace, dry_run, drop_damaged)
    for message in report.left_alone:
        err_console.print(
            f"  left alone (damaged; --drop-damaged removes it): {message}", markup=False, highlight=False
        )
    for message in report.damaged_removed:
        err_console.print(f"  removed (damaged): {message}", markup=False, highlight=False)
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{store}: {verb} {report.segments_removed} segment(s), {report.shards_removed} shard file(s), "
        f"{report.duplicates_removed} duplicate entr(ies), {report.temporaries_removed} temporary file(s): "
        f"{report.bytes_freed / 2**20:.1f} MiB; {report.live_segments} segment(s) written within the grace period "
        "left alone",
        markup=False,
        highlight=False,
    )


@store_app.command("migrate")
def migrate(store: StorePath) -> None:
    """Rewrite entries of an older segment layout into the current one, which reads at disk speed.

    Old copies stay readable until `refine store gc` removes them; a killed migrate loses nothing and a
    re-run continues.
    """
    from pipeline.store import FeatureStore
    from pipeline.store.migrate import migrate_store

    from stages.progress import StatusLines

    status = StatusLines()
    with domain_errors():
        report = migrate_store(FeatureStore(store), lambda done, total: status(f"migrated {done} / {total} entries"))
    console.print(
        f"{store}: {report.entries_rewritten} entr(ies) rewritten into the current layout "
        f"({report.bytes_read / 2**20:.1f} MiB), {report.entries_current} already current"
        + (
            f"; `refine store gc {store}` frees the old copies once its grace period has passed"
            if report.entries_rewritten
            else ""
        ),
        markup=False,
        highlight=False,
    )
