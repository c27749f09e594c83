"""User-facing errors.

Everything the user can get wrong (a path, a name, a number) raises :class:`DLPLoRAError`
with a message that names the problem and, where there is one, the fix. The CLI prints
such errors as one line and exits with status 2; anything else is a bug.
"""


class DLPLoRAError(Exception):
    """A problem with the user's input or environment, explained in the message."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise DLPLoRAError(message)
