"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a job file, a field, a path, an address. The message names it and the fix."""
