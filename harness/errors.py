"""The one exception type for mistakes a user can fix; the CLI prints it and exits 2."""


class HarnessError(Exception):
    """A user-fixable problem: the message says what is wrong and what to do."""
