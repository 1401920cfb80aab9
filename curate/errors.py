"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class CurateError(Exception):
    """A problem with the user's input (bad file, bad key, bad value).

    The CLI prints `error: <message>` and exits with `exit_code`; no traceback.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
