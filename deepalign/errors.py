"""The error users see: one line naming the file, key or shape at fault."""


class DeepAlignError(Exception):
    """Bad input or configuration; the CLI and flows print it as one line and exit non-zero."""
