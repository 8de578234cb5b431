"""`python -m lab.dashboard [STORAGE]` (or `ddpm-lab-dashboard`): optuna-dashboard on a sweep's storage.

Plain `optuna-dashboard sqlite:///optuna.db` fails with a long traceback until a sweep has created the
tables; this opens the storage the way the sweeps do (creating an empty one, naming the psycopg 3
driver for `postgresql://`, journal files by path), then serves it with optuna-dashboard.
"""
import argparse
import sys

from optuna_dashboard import run_server

from lab.errors import reports_user_errors
from lab.stores import display_storage
from lab.sweeps.storage import make_storage


@reports_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("storage", nargs="?", default=None, metavar="URL_OR_PATH",
                        help="an RDB URL or a journal file, as for sweeps (default: sqlite:///optuna.db)")
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s (this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="default: %(default)s")
    args = parser.parse_args(argv)
    storage = make_storage(args.storage, where="storage")
    print(f"optuna-dashboard on {display_storage(args.storage)}: http://{args.host}:{args.port}", flush=True)
    try:
        run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:  # Ctrl-C is how a user stops it
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
