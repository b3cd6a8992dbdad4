"""The one exception type for mistakes a user can fix (bad input, missing files).

The command line prints these as a single line and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class RSDError(Exception):
    """A user-facing error whose message says what went wrong and how to fix it."""
