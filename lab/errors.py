"""One error type for mistakes a user can make: the scripts print it as one line and exit 1."""


class UserError(Exception):
    """A readable, one-line error naming the file and the key or value at fault."""

    def __init__(self, where, message):
        self.where, self.message = str(where), message
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # rebuilt from its two parts: a worker process's error reaches the user unchanged
        return type(self), (self.where, self.message)


def choose(key, kind, name, registry):
    """registry[name] (or name, for a tuple of names); an unknown name fails listing the choices."""
    if name not in registry:
        raise UserError(key, f"unknown {kind} '{name}'; choose one of: {', '.join(registry)}")
    return registry[name] if isinstance(registry, dict) else name


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
