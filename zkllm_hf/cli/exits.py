"""The command line's exit codes, and the one table that says which code each error type means.

An error is looked up by its class and then its bases, in order (:func:`exit_code`), so a subclass may mean
another code than its base (``ModelFilesError`` 3, its base ``ModelLoadError`` 2 as a ``ValueError``). The
commands catch what they caught before and ask this table what it means; nothing else decides a code by type.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from ..contracts import ContractViolation
from ..engine import CaptureError
from ..errors import ModelFilesError, PlanRefused, UnsupportedModelError
from ..fixed_point import FixedPointError
from ..validate import UnsafeManifestError

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_ENVIRONMENT = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
EXIT_CODES = """exit codes:
  0    success
  1    the capture is invalid (its manifest or metadata unreadable too), or a contract was violated
  2    usage or input error
  3    environment or I/O error (disk full, read-only folder, unreadable model files), or an
       unexpected error: a bug to report (ZKLLM_HF_TRACEBACK=1 shows its traceback)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
An interrupted or failed capture leaves nothing that looks like a capture."""

# What an error raised while capturing (or checking a command's arguments) means.
BY_TYPE: Mapping[type[BaseException], int] = {
    ContractViolation: EXIT_INVALID,  # the capture broke its contract
    FixedPointError: EXIT_INVALID,  # a value does not fit int32 at the scale
    CaptureError: EXIT_INVALID,  # the capture could not be completed as asked
    UnsupportedModelError: EXIT_USAGE,  # the model's modules do not fit the point table: an input error
    PlanRefused: EXIT_INVALID,  # zkLLM would reject the capture
    ModelFilesError: EXIT_ENVIRONMENT,  # the model's files exist but cannot be read
    ValueError: EXIT_USAGE,  # every other input error: ModelLoadError, PromptsError, OutputRefused, ...
    FileExistsError: EXIT_USAGE,  # an existing --out, TargetBusyError
}
# Reading a capture to inspect or plan it: whatever keeps it from being read makes it invalid.
READING_A_CAPTURE: Mapping[type[BaseException], int] = {OSError: EXIT_INVALID, ValueError: EXIT_INVALID}
# compare's --tolerance-from: a capture that cannot be read is an input error, a crafted manifest invalid.
TOLERANCE_FROM: Mapping[type[BaseException], int] = {
    UnsafeManifestError: EXIT_INVALID,
    OSError: EXIT_USAGE,  # CaptureNotFinished too
    ValueError: EXIT_USAGE,
}


def exit_code(exc: BaseException, table: Mapping[type[BaseException], int] = BY_TYPE) -> int | None:
    """The code ``table`` gives the first of ``exc``'s classes it names; None if it names none."""
    return next((table[cls] for cls in type(exc).__mro__ if cls in table), None)


def err(msg: str) -> None:
    """Print ``msg`` as zkllm-hf's one error line on stderr."""
    print(f"zkllm-hf: error: {msg}", file=sys.stderr)


def fail(exc: BaseException, table: Mapping[type[BaseException], int] = BY_TYPE, *, layers: bool = False) -> int:
    """Print ``exc`` (``layer spec`` named as ``--layers`` with ``layers``) and return the code ``table`` gives it;
    an error the table does not name is raised again."""
    code = exit_code(exc, table)
    if code is None:
        raise exc
    err(str(exc).replace("layer spec", "--layers") if layers else str(exc))
    return code


__all__ = [
    "BY_TYPE",
    "EXIT_CODES",
    "EXIT_ENVIRONMENT",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "READING_A_CAPTURE",
    "TOLERANCE_FROM",
    "err",
    "exit_code",
    "fail",
]
