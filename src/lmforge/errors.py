"""The one exception type users see: the CLI prints its message on one line and exits with 2."""


class LmforgeError(Exception):
    """Bad input from the user (unknown model, bad file, bad value): a one-line message, no traceback."""
