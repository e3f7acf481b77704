"""Thin Typer commands, one per pipeline stage; `stages.cli` assembles the `refine` CLI."""
