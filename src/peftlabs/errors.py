"""The one exception type that the CLI turns into a one-line message."""


class UserError(Exception):
    """Invalid input from the user: the message names the value and the fix.

    The CLI prints it as a single line and exits with status 2, without a
    traceback, so every check on user input raises this type.
    """
