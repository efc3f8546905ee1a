"""The exception types the harness raises on purpose; the CLI prints them and exits 2, pytest skips or stops."""


class HarnessError(Exception):
    """A user-fixable problem: the message says what is wrong and what to do."""


class BackendUnavailable(Exception):
    """This machine cannot run a backend for a case; the message is the concrete reason (a skip, not a failure)."""


def check_choice(kind: str, name: str, choices) -> str:
    """`name` when it is one of `choices`, else the one-line error that lists them."""
    if name not in choices:
        raise HarnessError(f"unknown {kind} {name!r}; choose one of {', '.join(choices)}")
    return name
