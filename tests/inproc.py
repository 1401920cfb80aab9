"""`curate ...` run in the test's own process, through the console entry point
(curate.cli.main: the same parsing, the same one-line `error: ...` and exit code as the
installed command), without starting an interpreter and importing pyarrow again (~0.5 s
of CPU each time).

For tests about what a command says and does. Tests about the process itself (kill -9,
signals, two processes on one manifest, the installed script, a new shell, what a fresh
interpreter imports) keep a real subprocess: `in_new_process` runs the same command so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings


@contextlib.contextmanager
def _as_a_new_process(err):
    """What a fresh interpreter prints on stderr that pytest would otherwise take: warnings
    under Python's default filters, and log records of WARNING and up (logging's last-resort
    handler: the message alone)."""
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)


def run_curate(*args, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Like subprocess.run([curate, *args], capture_output=True, text=True, cwd=cwd, env=env):
    returncode, stdout and stderr as the command gives them. `env`, when given, is the whole
    environment for the call (as for subprocess); it is restored afterwards, as are the
    working directory and sys.argv. An unexpected exception is printed as the interpreter
    would print it (a traceback on stderr, exit status 1); warnings and logged warnings reach
    stderr as in a new process."""
    from curate.cli import main

    argv = ["curate", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    code = 0
    try:
        sys.argv = argv
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _as_a_new_process(err):
            try:
                main()
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:  # sys.exit("message"): printed, status 1
                    print(exc.code, file=sys.stderr)
                    code = 1
            except Exception:  # noqa: BLE001 - what the interpreter would do with it
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def in_new_process(*args, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m curate ARGS` in a new interpreter, output captured as text; `env`: variables
    set on top of this process's environment."""
    return subprocess.run([sys.executable, "-m", "curate", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **env} if env else None)
