"""The one base class for mistakes a user can fix (a config value, a file, a flag).

Every CLI's `main()` catches `UserError` alone and exits 2 with `error: <message>`; anything else is
a bug and keeps its traceback. Messages name the file, key or value and what is expected.
"""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what would be right."""


class ConfigError(UserError):
    """A configuration value or file is wrong; the message says which and what is expected."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm (step_results.StepResults
    raises it; defined here, without torch, for the driver to recognise)."""
