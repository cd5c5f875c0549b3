"""The one exception type for mistakes a user can fix (bad flag, missing data, bad checkpoint).

Scripts print its message without a traceback; library code raises it early, before long work.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what to do about it."""
