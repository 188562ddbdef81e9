"""The one exception type for bad user input, and the one way an error is quoted in a line.

Anything a user can get wrong (a path, a key, a value, a malformed row) raises `UserError` with one
line that names what is wrong and where.  The CLI prints it as `robust-dpo: error: <line>` on stderr
and exits with code 2, before any Ray worker starts when the check can be made up front.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """The first line of an error's message (what a one-line report quotes), or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
