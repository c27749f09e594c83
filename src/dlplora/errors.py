"""User-facing errors.

Everything the user can get wrong (a path, a name, a number) raises :class:`DLPLoRAError`
with a message that names the problem and, where there is one, the fix. The CLI prints
such errors as one line and exits with status 2; anything else is a bug.
"""


class DLPLoRAError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class RequestError(DLPLoRAError):
    """A bad generation request. `field` names the part at fault: "prompt", "history", "adapters" or
    "max_new_tokens" (the server maps it to the request's JSON field)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class ContextLengthError(RequestError):
    """The prompt and the requested new tokens do not fit the model's context window."""
