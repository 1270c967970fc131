"""The one exception type users see.

Every error raised at a boundary (a file, a record, a config key) is a :class:`VlkitError` whose
message is one sentence naming the thing at fault and what to do; the CLI prints it on one line
and exits non-zero.
"""


class VlkitError(Exception):
    """A user-facing error: one line naming the file, record or key and what to do."""
