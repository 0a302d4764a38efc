"""The one exception type users see: a one-line message naming the problem."""


class EdgeftError(Exception):
    """A problem with the user's input (data, bundle, adapter, options).

    The CLI prints ``str(err)`` on one line and exits non-zero, with no traceback.
    """
