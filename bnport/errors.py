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
