"""Thin Typer commands, one per pipeline stage; `stages.cli` assembles the `refine` CLI.

A command imports the library (torch, zarr) inside its function, never at the top of its module, so that
`refine --help` answers at once; tests/test_cli.py checks it.
"""
