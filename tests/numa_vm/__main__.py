"""Run a script file in the 2-NUMA-node VM from the shell (a manual-use convenience).

    python -m tests.numa_vm SCRIPT [--timeout S] [--cpu MODEL] [--env K=V ...]

SCRIPT ending in .sh runs under /bin/sh, anything else under this Python. Prints the
guest's stdout/stderr and the timings, and exits with the guest script's exit code.
"""
import argparse
import sys
from pathlib import Path

from .harness import VMError, run_in_vm


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.numa_vm")
    ap.add_argument("script")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--cpu", default="max")
    ap.add_argument("--env", action="append", default=[], metavar="K=V")
    ap.add_argument("--console", action="store_true", help="also print the serial console")
    a = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in a.env)
    lang = "sh" if a.script.endswith(".sh") else "python"
    try:
        r = run_in_vm(Path(a.script).read_text(), timeout=a.timeout, env=env, lang=lang, cpu=a.cpu)
    except VMError as e:
        print(f"VM error: {e}", file=sys.stderr)
        return 125
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if a.console:
        sys.stderr.write(r.console)
    print(f"[vm] exit {r.returncode}; timings {r.timings}", file=sys.stderr)
    return r.returncode


sys.exit(main())
