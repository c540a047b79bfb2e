"""A small mutation pass: plant each known-dangerous bug in a copy of the package and run the fast tests.

Run from the repository root: ``python tests/mutation_pass.py [--jobs 2]``. Each mutant must make at least
one test fail ("killed"); a survivor means a test is missing. Results are recorded in tests/README.md.
The slow tests (real model) are left out: every mutant here is reachable from the tiny-model tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what the bug does, file, the exact text it replaces, the text it plants)
MUTANTS = [
    ("the gate never runs the chain check", "zkllm_hf/unit.py",
     'previous=None if previous is None else {"block_output": previous},', "previous=None,"),
    ("the gate skips the pandera manifest schema", "zkllm_hf/gate.py",
     'skip = frozenset() if flat else frozenset({"manifest_schema"})', 'skip = frozenset({"manifest_schema"})'),
    ("the gate skips the staged files' checks (integrity, range)", "zkllm_hf/gate.py",
     "file_checks = run_file_checks(contract, root / u.folder, rows, known=read_backs(rows, written, root, u.folder))",
     "file_checks = []"),
    ("the read-back does not compare what it read with what was written", "zkllm_hf/direct_io.py",
     "or not _same(out, view[pos - start : pos - start + len(out)]):", ":"),
    ("the gate trusts a read-back after the file changed", "zkllm_hf/gate.py",
     "if rb is not None and path is not None and _stamp_or_none(path) == rb.stamp:",
     "if rb is not None and path is not None:"),
    ("the range check ignores int_min", "zkllm_hf/contracts/file_checks.py",
     'ok = (lo, hi) == (row["int_min"], row["int_max"]) and lo > -(2**31)', 'ok = hi == row["int_max"]'),
    ("attach() leaves hooks behind when a registration fails", "zkllm_hf/hooks.py",
     "    except BaseException:\n        hooks.remove()\n        raise", "    except BaseException:\n        raise"),
    ("a failed move does not put the previous capture back", "zkllm_hf/writer.py",
     "            if old is not None:  # put the previous capture back\n                os.rename(old, self.out_dir)",
     "            pass"),
    ("the host buffers are unbounded (the writer's queue and the pool)", "zkllm_hf/engine.py",
     "bound = (2 * len(POINTS) + 1) * 4 * hidden * max(1, rows)", "bound = 1 << 40"),
    ("the norm checks read the other norm's weight", "zkllm_hf/hooks.py",
     "params = norm_params(self.module(layer, name))",
     'params = norm_params(self.module(layer, "post_attention_layernorm"))'),
    ("an unreadable norm weight counts as a pass", "zkllm_hf/contracts/layer_checks.py",
     "slots.append(CheckResult(spec.name, False, skipped=str(norm), **where))",
     "slots.append(CheckResult(spec.name, True, **where))"),
    ("validate ignores a contract entry's parameters", "zkllm_hf/contracts/layer_checks.py",
     'tolerance = {k: float(spec.params[k]) for k in ("quantisation_lsb", "rounding_ulps") if k in spec.params}',
     "tolerance = {}"),
    ("a manifest may name its own (laxer) contract", "zkllm_hf/trust.py",
     "if not packaged and (trusted is None or Path(trusted).resolve() != Path(folder).resolve()):",
     "if False:"),
    # issue 17: the identity checks' int32 fast path
    ("the fast path leaves out the elements off by 2 LSB", "zkllm_hf/fast_checks.py",
     "flagged = np.flatnonzero(ad.numpy() >= 2)", "flagged = np.flatnonzero(ad.numpy() >= 3)"),
    ("the fast path trusts int32 sums that may wrap", "zkllm_hf/fast_checks.py",
     "        if lo <= -(2**31) or hi > INT32_MAX:\n            return False",
     "        if False:\n            return False"),
    # issue 14: ownership, the dataset index, resume, plan --out, compare, the fingerprint, metadata, threads
    ("ownership trusts a manifest whose digest does not match", "zkllm_hf/writer.py",
     'if rows_digest(table.to_pylist(), meta) != meta.get("manifest_digest"):\n            return None',
     "pass"),
    ("the index's unit entries are not compared with their units", "zkllm_hf/contracts/dataset_checks.py",
     "if stated.get(k) != truth[k] or type(stated.get(k)) is not type(truth[k])", "if False"),
    ("resume keeps a unit without re-running the model-free checks", "zkllm_hf/resume.py",
     "failed = validate_folder(path.parent, None, progress=False).failures", "failed = []"),
    ("plan writes through a symlink at --out", "zkllm_hf/prove/output.py",
     "    if stat.S_ISLNK(st.st_mode):\n        raise OutputRefused(\n            f\"{what} is a symbolic link; plan",
     "    if False:\n        raise OutputRefused(\n            f\"{what} is a symbolic link; plan"),
    ("compare does not check the captured file's digest", "zkllm_hf/prove/compare.py",
     'if len(data) != int(row["byte_size"]) or digest != want:', "if False:"),
    ("the fingerprint hashes bitsandbytes' transient 4-bit packing", "zkllm_hf/provenance.py",
     'if cls == "Params4bit" and getattr(weight, "quant_state", None) is not None:', "if False:"),
    ("the loader does not check the metadata readers rely on", "zkllm_hf/validate.py",
     "    check_metadata(meta, str(manifest))", "    pass"),
    ("capture-dataset leaves each unit's thread count to the process", "zkllm_hf/dataset.py",
     "with _intra_op_threads(self.threads):", "with _intra_op_threads(None):"),
    # issue 16: the contract package's registry
    ("the registry runs no entry of the dataset scope", "zkllm_hf/contracts/registry.py",
     "    return contract.entries(scope=scope)",
     '    return () if scope == "dataset" else contract.entries(scope=scope)'),
    # issue 16: the seams of the engine's split (options, sink, gate)
    ("a layer spec is not checked against the model's layer count", "zkllm_hf/options.py",
     "n = num_layers() if callable(num_layers) else num_layers", "n = 1 << 20"),
    ("the in-memory sink drops a point", "zkllm_hf/sink.py",
     "self._parts.setdefault(point_of_file(name), []).append(part)",
     'self._parts.setdefault(point_of_file(name), []).append(part) if "attn-output" not in name else None'),
    ("the gate skips the dataset index's checks", "zkllm_hf/gate.py",
     "bad = [r for r in gated.index_results if r.failed]", "bad = []"),
    # issue 16: the command line's one table of exit codes by error type
    ("the exit-code table makes an input error an invalid capture (1, not 2)", "zkllm_hf/cli/exits.py",
     "    ValueError: EXIT_USAGE,  # every other input error",
     "    ValueError: EXIT_INVALID,  # every other input error"),
    # issue 16: the seams of the dataset's split
    ("the resume decision ignores a changed capture setting (layers, threads, the model)", "zkllm_hf/resume.py",
     "    for key in want:\n        if got.get(key) != want[key]:",
     '    for key in ("prompt",):\n        if got.get(key) != want[key]:'),
    # issue 15: the replay audit
    ("replay counts every code as equal", "zkllm_hf/replay_compare.py",
     "    if np.array_equal(got, want):", "    if True:"),
    ("replay runs the forward table's tokens, not the unit's recorded ones", "zkllm_hf/replay_inputs.py",
     "        ids[r.row, r.cols] = torch.tensor(claim_ids, dtype=torch.long)", "        pass"),
    ("the exact replay verdict ignores differing codes", "zkllm_hf/contracts/replay_checks.py",
     "        ok = s.equal == s.elements", "        ok = True"),
    ("the tolerant replay verdict ignores the worst element", "zkllm_hf/contracts/replay_checks.py",
     "    over = s.max_ulps > allowed", "    over = False"),
    ("the capture records no cache chain (a decode step cannot be replayed)", "zkllm_hf/replay_record.py",
     "                continues, before = self._last_of_cache[inputs.cache_id]", "                pass"),
    ("localisation does not put the captured block_input in", "zkllm_hf/replay.py",
     "        if not mine:\n            return None", "        if True:\n            return None"),
]


def run(mutant: tuple[str, str, str, str], jobs: int) -> tuple[str, bool, float, str]:
    what, file, old, new = mutant
    with tempfile.TemporaryDirectory(prefix="zkllm-mutant-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", ".tox", "__pycache__", "*.egg-info",
                                                                   ".zkllm-test-cache", ".hypothesis"))
        target = copy / file
        text = target.read_text()
        if text.count(old) != 1:
            return what, False, 0.0, f"mutation site not found exactly once in {file}"
        target.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=str(copy), HF_HUB_OFFLINE="1")
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", "-n", str(jobs)]
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        return what, proc.returncode != 0, time.perf_counter() - start, failed[0] if failed else proc.stdout[-200:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2, help="pytest-xdist workers per mutant")
    parser.add_argument("-k", dest="only", default="", help="run only the mutants whose description has this text")
    args = parser.parse_args()
    survivors = 0
    chosen = [m for m in MUTANTS if args.only in m[0]]
    for mutant in chosen:
        what, killed, seconds, detail = run(mutant, args.jobs)
        survivors += not killed
        print(f"{'KILLED ' if killed else 'SURVIVED'} {seconds:6.1f}s  {what}\n          {detail}", flush=True)
    print(f"{len(chosen) - survivors}/{len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
