"""``zkllm-hf capture | capture-dataset | validate | inspect | plan | compare``: the command line.

:func:`main` is the ``zkllm-hf`` console script (``zkllm_hf.cli:main``, and ``python -m zkllm_hf.cli``). The
modules: :mod:`.parser` (the options), :mod:`.capture` (capture, capture-dataset), :mod:`.check` (validate,
inspect), :mod:`.prover` (plan, compare), :mod:`.exits` (the exit codes and the table of error types),
:mod:`.entry` (main) and :mod:`.common` (what several commands share).
"""

from .entry import main
from .exits import EXIT_CODES, EXIT_ENVIRONMENT, EXIT_INVALID, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE
from .parser import build_parser

__all__ = [
    "EXIT_CODES",
    "EXIT_ENVIRONMENT",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "build_parser",
    "main",
]
