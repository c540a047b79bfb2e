"""The hand-off to zkLLM: what its scripts will reject, a runnable proving script, and the skip-step comparison.

zkLLM (jvhs0706/zkllm-ccs2024) proves one decoder layer at a time with Python wrappers that run from the
zkLLM folder, load ``meta-llama/Llama-2-{7,13}b-hf`` by name and ignore their binaries' exit codes; the script
runs each of them unchanged through ``python -m zkllm_hf.zkllm_run`` (the model folder :mod:`.export` writes,
the attributes transformers 5 removed, every binary's exit status checked). Two of
them (``llama-rmsnorm.py``, ``llama-ffn.py``) write random data to a missing input path and prove that. The
script :func:`write_script` produces therefore checks everything itself: each input exists before its step,
each step printed zkLLM's success line (or wrote its output), and each skip connection's output equals the
captured next point within the contract's tolerance (``zkllm-hf compare``). See docs/architecture.md §5.

A script plan wrote is known by its content, never by its name: its second line is ``# zkllm-hf plan
sha256:HEX``, HEX the SHA-256 of every other byte of the script (:func:`is_plan_script`), so an edited script,
or a foreign file with that line pasted in, is not plan's. :func:`write_plan_file` writes the script
atomically and replaces only such a file; it never follows a symlink and never chmods what it did not create.
The script's scratch folder is marked the same way (:data:`SCRATCH_MARK`), and the script refuses one that

The modules: :mod:`.limits` (what zkLLM rejects), :mod:`.export` (the model zkLLM loads), :mod:`.script` (the
script), :mod:`.output` (where plan may write it) and :mod:`.compare` (``zkllm-hf compare``); every public
name is importable from here.
:mod:`.budget` is the proof budget plan and inspect print (its data: ``zkllm_costs.yaml``).
"""

from ..errors import OutputRefused, PlanRefused
from .budget import Budget, Shape, budget_of, estimate
from .compare import Comparison, compare_files
from .export import EXPORT_RECORD, expand_gqa, export_zkllm_model, read_export
from .limits import GATE_LIMIT, LAYER_PARAMS, SCRIPTS, ZKLLM_SCALE_LOG2, prover_problems
from .output import PLAN_MARK, SCRATCH_MARK, check_out, check_scratch, is_plan_script, write_plan_file
from .script import FAILURE_PATTERN, SUCCESS, Plan, write_script

__all__ = [
    "Budget",
    "Shape",
    "budget_of",
    "estimate",
    "FAILURE_PATTERN",
    "GATE_LIMIT",
    "LAYER_PARAMS",
    "EXPORT_RECORD",
    "PLAN_MARK",
    "SCRATCH_MARK",
    "SCRIPTS",
    "SUCCESS",
    "ZKLLM_SCALE_LOG2",
    "Comparison",
    "OutputRefused",
    "Plan",
    "PlanRefused",
    "check_out",
    "check_scratch",
    "compare_files",
    "is_plan_script",
    "expand_gqa",
    "export_zkllm_model",
    "read_export",
    "prover_problems",
    "write_plan_file",
    "write_script",
]
