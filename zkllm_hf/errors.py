"""Every error zkllm-hf raises, under one base, :class:`ZkllmHfError`.

Each type keeps the builtin base it has always had (``PromptsError`` is still a ``ValueError``, ``CaptureError``
a ``RuntimeError``), so ``except ValueError`` goes on catching what it caught. What each type means for the
command line's exit code is decided in one table, ``zkllm_hf.cli.exits``. This module imports nothing from the
package: every other module may import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ZkllmHfError(Exception):
    """The base of every error zkllm-hf raises on purpose; its message names the value and the fix."""


# -- the input ------------------------------------------------------------------------------------


class PromptsError(ZkllmHfError, ValueError):
    """The prompt set cannot be used as given (bad JSONL, a bad or repeated id)."""


class ModelLoadError(ZkllmHfError, ValueError):
    """The model could not be found or loaded offline."""


class ModelFilesError(ModelLoadError):
    """The model's files exist but cannot be read (truncated, corrupt): an environment error, exit code 3."""


class UnsupportedModelError(ZkllmHfError, ValueError):
    """The model's modules do not match the capture-point table."""


# -- the capture ----------------------------------------------------------------------------------


class FixedPointError(ZkllmHfError, ValueError):
    """A value cannot be stored as int32 at the requested scale (overflow, NaN or Inf)."""


class ContractViolation(ZkllmHfError, ValueError):
    """A capture broke its data contract. ``failures`` lists every failed check."""

    def __init__(self, failures: Sequence[Any], *, context: str = "capture"):
        self.failures = list(failures)
        lines = "\n".join(f"  - {f.describe()}" for f in self.failures)
        super().__init__(f"{context} failed {len(self.failures)} contract check(s); nothing was emitted:\n{lines}")


class CaptureError(ZkllmHfError, RuntimeError):
    """The capture could not be completed as asked; nothing was emitted."""


class TargetBusyError(ZkllmHfError, FileExistsError):
    """Another process is writing to the same output folder."""


# -- reading a capture ----------------------------------------------------------------------------


class CaptureNotFinished(ZkllmHfError, FileNotFoundError):
    """The folder is not a finished capture."""


class UnsafeManifestError(ZkllmHfError, ValueError):
    """A manifest names a file outside its capture folder (``..``, an absolute path, a symlink leaving it)."""


class MetadataError(ZkllmHfError, ValueError):
    """A manifest's metadata (or a column of its rows) lacks a field a reader needs, or holds a value
    zkllm-hf never writes.

    ``field`` is the dotted path (``tokens.seq_len``, ``units[1].folder``); ``check`` is the contract check the
    problem belongs to (``format_version``, else ``manifest``).
    """

    def __init__(self, message: str, *, field: str = "", check: str = "manifest"):
        super().__init__(message)
        self.field, self.check = field, check


# -- the prover hand-off --------------------------------------------------------------------------


class OutputRefused(ZkllmHfError, ValueError):
    """plan will not write its script (or let it write its outputs) there; the message names the path and the fix."""


class ExportRefused(ZkllmHfError, ValueError):
    """export-zkllm-model will not write the model folder zkLLM loads: the model given is not the captured one,
    or cannot be proved as it is; the message names it and the fix."""


class PlanRefused(ZkllmHfError, ValueError):
    """zkLLM would reject (or silently mis-prove) this capture; ``problems`` lists each limit and its fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"zkLLM cannot prove this capture as it stands:\n{lines}\n(--force writes the script anyway)")


__all__ = [
    "CaptureError",
    "CaptureNotFinished",
    "ContractViolation",
    "FixedPointError",
    "MetadataError",
    "ModelFilesError",
    "ModelLoadError",
    "OutputRefused",
    "PlanRefused",
    "PromptsError",
    "TargetBusyError",
    "UnsafeManifestError",
    "UnsupportedModelError",
    "ZkllmHfError",
]
