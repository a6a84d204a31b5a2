"""The one exception type users see: a clear, one-line message.

The CLI prints ``error: <message>`` and exits with status 2 for any
``MemformersError``; everything else is a bug and keeps its traceback.
"""


class MemformersError(Exception):
    """A user-facing error (bad config, missing file, impossible size...)."""
