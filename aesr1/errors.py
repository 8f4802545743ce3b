"""The project's base class for expected, user-facing errors, and what keeps secrets out of their messages.

The CLI prints an :class:`AesError` as one message without a traceback (exit status 2):
bad params, unreadable inputs, a stage's own quality gate, a server that refuses the
credentials. Any other exception is a bug and keeps its traceback.
"""

import re


class AesError(ValueError):
    """An error the user can fix from its message alone (params, input files, environment).

    A ``ValueError`` so that callers catching bad values keep working.
    """


def redact(text: str) -> str:
    """URLs less their credentials (``scheme://user:password@host``): a message or log line names a server, never
    what signs in to it."""
    return re.sub(r"(\w+://)[^/\s@]+@", r"\1***@", text)
