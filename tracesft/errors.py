"""The one exception type that means "the user gave us something we cannot use".

The CLI and the pipeline steps turn it into a readable message (which file, which record, which
field, what to do) instead of a traceback; anything else that escapes is a bug in tracesft.
"""


class TracesftError(Exception):
    """A user-facing error: its message must say where the problem is and how to fix it."""
