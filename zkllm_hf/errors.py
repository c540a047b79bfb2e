"""The capture's own exception, raised from every stage of the pipeline (routing, quantising, the gate)."""

from __future__ import annotations

__all__ = ["CaptureError"]


class CaptureError(RuntimeError):
    """The capture could not be completed as asked; nothing was emitted."""
