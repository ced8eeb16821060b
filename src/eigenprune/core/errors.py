"""The one exception type that reaches users as a single line on stderr (exit code 2).

Library code raises `UsageError` for anything the caller can fix (a missing file, a bad option, a
model that does not match an edit). The CLI catches it, prints its message and exits 2; every other
exception is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A problem with the caller's input; its message says what is wrong and what to do."""
