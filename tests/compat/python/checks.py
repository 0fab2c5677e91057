"""What the Python compatibility scripts share: where the proxy is (the
environment tests/compat.rs sets) and a small runner that runs every
registered check and prints "N passed, N failed"."""

import os
import traceback

HOST = os.environ["PGHOST"]
PORT = int(os.environ["PGPORT"])
DATABASE = os.environ["PGDATABASE"]
TOKEN_A = os.environ["AUTHGRES_TOKEN_A"]
TOKEN_B = os.environ["AUTHGRES_TOKEN_B"]
CA = os.environ["AUTHGRES_CA"]

_checks = []


def check(name):
    """Registers the decorated function as the check `name`."""

    def register(fn):
        _checks.append((name, fn))
        return fn

    return register


def run_all():
    """Runs every check, reports each, and exits non-zero if any failed."""
    passed = failed = 0
    for name, fn in _checks:
        try:
            fn()
            passed += 1
            print(f"ok   {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every failure and go on
            failed += 1
            print(f"FAIL {name}\n     " + traceback.format_exc().replace("\n", "\n     "), flush=True)
    print(f"{passed} passed, {failed} failed")
    raise SystemExit(0 if failed == 0 else 1)
