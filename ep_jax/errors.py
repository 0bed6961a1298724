"""The errors ep_jax raises for things a user can fix, one type per kind.

Every command maps `EpJaxError` to exit status 2 and one `error:` line; anything else is a bug
and shows its traceback. Each carries the value, the file and the fix in its message.
"""

from __future__ import annotations


class EpJaxError(Exception):
    """A problem the user can fix; `fix` (optional) is appended to the message."""

    def __init__(self, message: str = "", fix: str | None = None):
        self.fix = fix
        super().__init__(f"{message}; {fix}" if fix else message)


class InputError(EpJaxError, ValueError):
    """Bad user input: arguments, prompts, images, model inputs."""


class ProcessingError(InputError):
    """Inputs that cannot be turned into model inputs (images, prompts, templates)."""


class BudgetError(InputError):
    """A pruning setting or budget that cannot be met."""


class CheckpointError(EpJaxError, ValueError):
    """A checkpoint that is missing, damaged or of an unsupported kind."""


class ConfigError(CheckpointError):
    """A config.json / ep_config.json that cannot be read."""


class OutputPathError(EpJaxError, OSError):
    """A destination that cannot or must not be written."""


class NumericalError(EpJaxError, ArithmeticError):
    """The model produced NaN or infinite values (damaged weights, overflow in low precision)."""
