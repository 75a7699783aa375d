"""Errors raised by the data package; each message names the file at fault and what to do."""


class DatasetLayoutError(FileNotFoundError):
    """A dataset's folder or file is missing; the message names it and the `prepare` command that makes it."""


class BadSampleError(ValueError):
    """One image or label file cannot be used (unreadable, truncated, wrong size, unknown ids, missing key)."""
