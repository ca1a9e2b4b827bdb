"""The one exception type a user sees.

Everything a user can cause (bad config, missing files, unusable data, numerically broken
inputs) is raised as :class:`ReplaceMeError` with a message that names the field, path or URI
and says what to do. The CLI prints the message alone, without a traceback.
"""


class ReplaceMeError(Exception):
    """A problem the user can fix; the message says how."""


class Interrupted(KeyboardInterrupt):
    """An interrupt whose message says what state it left behind."""
