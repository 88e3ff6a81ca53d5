"""The one exception type for problems a user can fix: the CLI prints it as one line and exits 1.

Bugs keep their traceback; anything raised as `BnportError` is a message for the user, with a hint that says
how to fix it.
"""


class BnportError(Exception):
    """A user-fixable problem: `message` says what is wrong, `hint` how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):  # keeps the hint when the error crosses a process boundary (worker pools, DataLoader)
        return type(self), (self.message, self.hint)

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def one_line(err: BaseException, limit: int = 400) -> str:
    """'Type: first line' of an exception, plus its root cause's (exporters and onnxruntime's tools wrap the
    informative error), colour codes removed, cut to `limit` characters: how a report names a failure it went on
    from."""
    import re

    def line(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"

    root = err
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    summary = line(err) if root is err else f"{line(err)} (cause: {line(root)})"
    return summary[:limit]
