"""The one exception type for mistakes a user can fix: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (file, folder, config key) that they can fix; printed without a traceback."""


class TrainingStopped(Exception):
    """A stop the user asked for (Ctrl-C, SIGTERM), after its checkpoint was saved: not an error, the CLI exits 0."""
