"""User-facing errors.

Anything the user can fix (a bad config value, a malformed data line, a missing model directory) is
raised as `RlhfkitError` with a message that names the file/line/field and says what to do. The CLI
prints the message and exits with status 2 instead of showing a traceback.
"""


class RlhfkitError(Exception):
    """An error caused by user input, with a message meant to be read by that user."""


class ConfigError(RlhfkitError):
    """An invalid configuration: unknown key, wrong type, impossible value."""


class DataError(RlhfkitError):
    """An unreadable or invalid data file (names the file, line and field)."""
