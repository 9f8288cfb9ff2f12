"""Exceptions that the CLI turns into a one-line message and a non-zero exit."""


class MoequantError(Exception):
    """A user-facing error: bad input, missing package, wrong checksum, unsupported model."""
