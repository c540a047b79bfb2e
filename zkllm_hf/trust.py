"""Which contract a capture's manifest may be checked against: a packaged one, or the folder the manifest names
only when the caller trusts that folder too (``--contract``), so that a manifest cannot bring its own laxer
contract."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .contracts import Contract, load_contract


def trusted_contract(meta: Mapping[str, Any], trusted: str | None) -> Contract:
    """The contract ``meta`` (a manifest's metadata) names, loaded; ValueError naming the folder and the fix if it
    is not packaged and ``trusted`` does not name it. KeyError or TypeError if ``meta`` names no contract."""
    folder = str(meta["contract"]["folder"])
    packaged = not ("/" in folder or os.sep in folder)
    if not packaged and (trusted is None or Path(trusted).resolve() != Path(folder).resolve()):
        raise ValueError(
            f"the manifest names the contract at {folder!r}, which is not one zkllm-hf ships; pass "
            f"contract={folder!r} (--contract) if you trust it"
        )
    return load_contract(folder)


__all__ = ["trusted_contract"]
