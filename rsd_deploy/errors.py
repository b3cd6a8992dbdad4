"""The one exception type for mistakes a user can fix (bad input, missing files).

The command line prints these as a single line and exits non-zero; anything else
is a bug and keeps its traceback.

Messages speak the library's language: an option is named by its field or keyword
name in backticks (:func:`option`, e.g. ``max_batch``), never by a command-line flag.
A front end shows those names its own way (the CLI as its flags, ``--max-batch``).
"""

import re

#: An option name as :func:`option` writes it into a message.
OPTION = re.compile(r"`([a-z][a-z0-9_]*)`")


class RSDError(Exception):
    """A user-facing error whose message says what went wrong and how to fix it."""


def option(name: str) -> str:
    """``name`` (a dataclass field or keyword argument) as messages name an option."""
    return f"`{name}`"
