"""``main``: parse, check the shared options, run the command, and turn what escapes it into one error line and
an exit code (an interrupt, SIGTERM, an OSError, or a bug as the last resort)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

from .exits import EXIT_ENVIRONMENT, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, err
from .parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zkllm-hf`` with ``argv`` (default: the command line); the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    code = _shared_options_error(args)
    if code is not None:
        return code
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `zkllm-hf plan DIR | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:  # the capture's own cleanup has run as the exception unwound
        err("interrupted; nothing was emitted")
        return EXIT_SIGINT
    except Terminated:
        err("terminated; nothing was emitted")
        return EXIT_SIGTERM
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        err(f"{exc.strerror or exc}{where}; nothing was emitted")
        return EXIT_ENVIRONMENT
    except Exception as exc:  # the last resort: a bug, never how an input error is reported
        if os.environ.get("ZKLLM_HF_TRACEBACK") == "1":
            raise
        what = " ".join(str(exc).split())[:200]
        err(
            f"unexpected {type(exc).__name__}: {what}; this is a zkllm-hf bug: please report it with the command "
            f"(ZKLLM_HF_TRACEBACK=1 shows the traceback)"
        )
        return EXIT_ENVIRONMENT
    finally:
        signal.signal(signal.SIGTERM, previous)


def _shared_options_error(args) -> int | None:
    """Exit 2 after saying why --pad-to or --scale-log2 cannot be used; None if they can."""
    if getattr(args, "pad_to", None) is not None and args.pad_to <= 0:
        err(f"--pad-to {args.pad_to}: give a positive token count")
        return EXIT_USAGE
    try:
        from ..fixed_point import check_scale

        if getattr(args, "scale_log2", None) is not None:
            check_scale(args.scale_log2)
    except ValueError as exc:
        err(str(exc).replace("scale_log2", "--scale-log2"))
        return EXIT_USAGE
    return None


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every context manager cleans up on the way out."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()
