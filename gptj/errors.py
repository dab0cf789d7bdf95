"""The one base class of the project's errors.

Every error the project raises on purpose (bad input, a file that cannot be used, a model that
does not fit) derives from GPTJError, so a command line catches this one class and prints its
message as one line. Most subclasses are ValueErrors too, so code that catches ValueError keeps
working. This module imports nothing: every layer, the model and the data included, may use it.
"""


class GPTJError(Exception):
    """A problem the project explains in one line; the command lines exit 2 with it."""


class UsageError(GPTJError, ValueError):
    """Bad input from the user (an option, a path, a prompt), explained in one line."""
