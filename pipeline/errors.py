"""The one exception type the CLI turns into a clean one-line error and exit code 1."""


class RefineError(Exception):
    """A domain error: bad input, a mismatch, a damaged store. The message names the file and entry."""
