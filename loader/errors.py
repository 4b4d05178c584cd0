"""Errors meant for the operator: one line naming the cause, no traceback.

The CLI prints str(error) and exits non-zero for any DataplaneError; anything
else is a bug and keeps its traceback.
"""


class DataplaneError(Exception):
    """A failure whose message alone tells the operator what went wrong."""

    exit_code = 1


class PrivilegeError(DataplaneError):
    exit_code = 77


class InterfaceError(DataplaneError):
    pass


class CompileError(DataplaneError):
    pass


class VerifierError(DataplaneError):
    """The kernel refused a program. log is the whole verifier log."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


class ForeignProgramError(DataplaneError):
    pass


class PinError(DataplaneError):
    pass


class MapError(DataplaneError):
    pass
