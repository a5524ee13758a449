"""Error types shared by every part of dsd.

Errors a user can fix (bad file, bad flag, missing model, daemon not running) derive from
DsdError; the CLI prints them as one line instead of a traceback.
"""


class DsdError(Exception):
    """Base class of errors whose message tells the user what is wrong and how to fix it."""


class GGUFError(DsdError):
    """A GGUF file is malformed or unsupported. The message names the file and the problem."""


class ModelNotFoundError(DsdError):
    """The model file could not be found."""


class UnsupportedModelError(DsdError):
    """The model's architecture or tensor layout is not supported."""


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, DsdError)


class NumaError(DsdError):
    """A NUMA request cannot be met (node does not exist, pinning or binding refused)."""


class HugePagePoolError(NumaError):
    """A node's hugepage pool is too small for a strict-page-size allocation."""
