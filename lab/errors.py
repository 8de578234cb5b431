"""One error type for mistakes a user can make: the scripts print it as one line and exit 1."""


class UserError(Exception):
    """A readable, one-line error naming the file and the key or value at fault."""

    def __init__(self, where, message):
        self.where = str(where)
        super().__init__(f"{where}: {message}")


def reports_user_errors(main):
    """Wrap a command-line `main`: a UserError becomes `error: ...` on stderr and exit code 1."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return wrapper
