"""One error type for mistakes a user can make: the scripts print it as one line and exit 1."""


class UserError(Exception):
    """A readable, one-line error naming the file and the key or value at fault."""

    def __init__(self, where, message):
        self.where = str(where)
        super().__init__(f"{where}: {message}")
