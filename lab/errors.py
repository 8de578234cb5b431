"""How the scripts end: a mistake a user can make as one line and exit 1; Ctrl-C as one interruption, exit 130."""
import contextlib
import functools
import signal
import sys
import threading
import time


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


@contextlib.contextmanager
def one_interrupt(grace_s=5.0):
    """Ctrl-C (SIGINT) raises KeyboardInterrupt once; more within `grace_s` of it are ignored, so that the cleanup
    it starts (ending the MLflow run or the Optuna trial) is not cut short and leaves nothing RUNNING: `timeout -s
    INT` signals the process and then its process group, and users press twice. One later interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    first = None

    def interrupt(signum, frame):
        nonlocal first
        if first is None or time.monotonic() - first > grace_s:
            first = time.monotonic()
            raise KeyboardInterrupt
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def reports_user_errors(main):
    """Wrap a command-line `main`: a UserError becomes `error: ...` on stderr and exit code 1, Ctrl-C one line
    and exit code 130 once the cleanup it started has run (`one_interrupt`)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            with one_interrupt():
                return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return wrapper
