"""The one error type for bad input. Its message names the file, the line and the field."""

from rlhfkit.errors import RlhfkitError


class DataError(RlhfkitError, ValueError):
    """Bad input data. The message always starts with 'path:line:' and names the field."""
