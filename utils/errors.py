"""User-facing errors.

Anything a user can cause (bad flags, missing data, wrong checkpoint) raises ``UserError``
with a one-line message that names the problem and the fix. Scripts catch it, print
``error: <message>`` and exit with status 2; library callers can catch it like any exception.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line (no traceback)."""


class DataError(UserError):
    """A data set is missing, incomplete or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not match the requested model."""
