"""`curate ARGS` in this process, for the tests that are about a command's output and its
files rather than its process: the same `curate.cli.app` the console script runs, through
typer's CliRunner, with the subprocess helpers' result shape (returncode, stdout, stderr).
A stage that raises fails the test with its traceback. Error exits and killed workers stay
subprocesses in the tests that check them (the one-line error is the console entry point's).
"""

import contextlib
import subprocess

from typer.testing import CliRunner


def curate(*args, cwd=None) -> subprocess.CompletedProcess:
    from curate.cli import app

    args = [*map(str, args)]
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        r = CliRunner().invoke(app, args, catch_exceptions=False)
    return subprocess.CompletedProcess(["curate", *args], r.exit_code, r.stdout, r.stderr)
