"""The project's base class for expected, user-facing errors.

The CLI prints an :class:`AesError` as one message without a traceback (exit status 2):
bad params, unreadable inputs, a stage's own quality gate. Any other exception is a bug
and keeps its traceback.
"""


class AesError(ValueError):
    """An error the user can fix from its message alone (params, input files, environment).

    A ``ValueError`` so that callers catching bad values keep working.
    """
