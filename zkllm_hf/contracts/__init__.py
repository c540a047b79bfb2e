"""The data contracts: load ``contracts/vN`` and run its checks on tensors in memory or files on disk.

``contracts/v1/capture.yaml`` lists every check a capture must pass; each entry names a ``kind``, an
implementation registered here, and carries its parameters. ``contracts/v1/manifest.yaml`` is a pandera
schema whose custom checks are registered here too, through ``pandera.extensions``. The capture gate and
``zkllm-hf validate`` run the same entries through the same functions, so a capture is valid by exactly one
definition: an entry removed from the contract is removed from both, a changed parameter changes both.

Scopes: ``layer`` checks see one layer's int32 codes (the identities); ``file`` checks see each file once
(integrity and range, from one read); ``capture`` checks see a manifest, its metadata and, when given, the
model; ``dataset`` checks see a dataset's index and its units; ``replay`` checks see one point of a unit
replayed through the model (``validate --replay``).

The package's modules, one job each: ``spec`` (the types), ``registry`` (kinds and their scopes), ``loader``
(a contract folder), ``manifest_schema`` (the pandera checks), ``layer_checks``, ``file_checks``,
``capture_checks``, ``dataset_checks`` and ``replay_checks`` (the kinds of each scope). This module only
gathers their public names, so ``from zkllm_hf.contracts import X`` works for each of them, and registers
every kind on import.
"""

from __future__ import annotations

from .capture_checks import INDEX_KINDS, CaptureSubject, run_capture_checks
from .dataset_checks import run_dataset_checks
from .file_checks import inside, run_file_checks
from .layer_checks import RESIDUAL_MODES, PendingIdentities, Tensors, run_identities, start_identities
from .loader import DEFAULT_CONTRACT, contracts_root, load_contract
from .manifest_schema import expected_file, register_manifest_checks
from .registry import SCOPES, implementation, register_check, run_entries, scope_of
from .replay_checks import ULP_STEPS, ReplayStats, judge_replay
from .spec import CheckResult, CheckSpec, Contract, ContractViolation, row_place

__all__ = [
    "DEFAULT_CONTRACT",
    "INDEX_KINDS",
    "RESIDUAL_MODES",
    "ULP_STEPS",
    "SCOPES",
    "CaptureSubject",
    "CheckResult",
    "CheckSpec",
    "Contract",
    "ContractViolation",
    "PendingIdentities",
    "ReplayStats",
    "Tensors",
    "contracts_root",
    "expected_file",
    "implementation",
    "inside",
    "judge_replay",
    "load_contract",
    "register_check",
    "register_manifest_checks",
    "row_place",
    "run_capture_checks",
    "run_dataset_checks",
    "run_entries",
    "run_file_checks",
    "run_identities",
    "scope_of",
    "start_identities",
]
