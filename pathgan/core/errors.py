"""The one error type a user sees as a single line (exit code 2), never as a traceback."""


class PathganError(Exception):
    """A problem with the user's input, options or files, explained in one line."""
