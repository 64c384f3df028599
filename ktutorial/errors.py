"""Errors a reader can fix. Each message says what went wrong and what to do about it."""


class UserError(Exception):
    """Bad input or a fixable condition; the CLI prints the message and exits 2."""


class MissingDependency(UserError):
    """An optional component (kt-kernel, xllamacpp, claude, sglang-kt) is not installed."""

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not installed: {install}")
        self.what = what
        self.install = install
