"""The contract is the one definition: every entry drives a check in the gate and in validate, and the gate's
own safety nets (chain, schema, re-hash, rollback, hook removal) each catch what they are there for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import count_hooks, make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf import engine as engine_mod
from zkllm_hf import hooks as hooks_mod
from zkllm_hf import writer as writer_mod
from zkllm_hf.contracts import contracts_root, load_contract
from zkllm_hf.manifest import read_manifest


def contract_copy(tmp_path: Path, edit) -> str:
    """A copy of contracts/v1 with ``edit(spec)`` applied to its capture.yaml; returns the folder."""
    folder = tmp_path / f"contract-{len(list(tmp_path.glob('contract-*')))}"
    shutil.copytree(contracts_root() / "v1", folder)
    spec = yaml.safe_load((folder / "capture.yaml").read_text())
    edit(spec)
    (folder / "capture.yaml").write_text(yaml.safe_dump(spec))
    load_contract.cache_clear()
    return str(folder)


def batch_capture(model, out: Path, contract: str = "v1", residuals: str = "model"):
    """Two right-padded rows: a dataset, so the index's checks run too."""
    ids = torch.cat([tiny_ids(6), tiny_ids(6, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad(), zkllm_hf.capture(model, out, contract=contract, residuals=residuals) as s:
        model(input_ids=ids, attention_mask=mask)
    return s.result


def names(results) -> set[str]:
    return {r.check for r in results}


def test_every_entry_drives_a_check_in_the_gate_and_in_validate(tmp_path):
    model = make_tiny()
    entries = [c.name for c in load_contract("v1").checks]
    full = contract_copy(tmp_path, lambda spec: None)
    # exact-int residuals: the drift checks apply only there; every other entry runs in both modes
    drift = {c.name for c in load_contract("v1").checks if c.kind == "drift"}
    # the replay entries run in validate --replay only (a capture is not replayed by the gate that made it)
    replay = {c.name for c in load_contract("v1").checks if c.scope == "replay"}
    assert replay and drift
    assert names(batch_capture(model, tmp_path / "default", full).checks) == set(entries) - drift - replay
    res = batch_capture(model, tmp_path / "full", full, "exact-int")
    report = zkllm_hf.validate(tmp_path / "full", model=model, contract=full, replay=True)
    assert report.ok and not report.skipped and not res.skipped
    assert names(res.checks) == set(entries) - replay and names(report.results) == set(entries)
    for name in entries:
        without = contract_copy(tmp_path, lambda spec, n=name: spec.update(checks=[c for c in spec["checks"]
                                                                                  if c["name"] != n]))
        res = batch_capture(model, tmp_path / f"no-{name}", without, "exact-int")
        report = zkllm_hf.validate(tmp_path / f"no-{name}", model=model, contract=without, replay=True)
        assert name not in names(res.checks) and name not in names(report.results), name
        assert names(res.checks) == set(entries) - {name} - replay, name
        assert names(report.results) == set(entries) - {name}, name


def test_changing_a_tolerance_changes_both(tmp_path):
    """bf16 adds round to half a bf16 ulp; a contract that allows none of it fails skip_1 in the gate, and a
    capture made under the original bound fails validate once its contract is tightened."""
    model = make_tiny(dtype=torch.bfloat16)
    folder = contract_copy(tmp_path, lambda spec: None)
    batch_capture(model, tmp_path / "ok", folder)
    assert zkllm_hf.validate(tmp_path / "ok", model=model, contract=folder).ok

    def tighten(spec):
        for c in spec["checks"]:
            if c["name"] == "skip_1":
                c["rounding_ulps"] = 0.0
        return spec

    (Path(folder) / "capture.yaml").write_text(yaml.safe_dump(tighten(yaml.safe_load(
        (Path(folder) / "capture.yaml").read_text()))))
    load_contract.cache_clear()
    report = zkllm_hf.validate(tmp_path / "ok", model=model, contract=folder)
    assert {f.check for f in report.failures} == {"skip_1"}
    with pytest.raises(zkllm_hf.ContractViolation) as info:
        batch_capture(model, tmp_path / "tight", folder)
    assert {f.check for f in info.value.failures} == {"skip_1"}
    assert not (tmp_path / "tight").exists()


def test_a_manifest_cannot_pick_its_own_contract(tmp_path):
    """A capture naming a contract outside the package is not validated against it unless the caller says so."""
    model = make_tiny()
    lax = contract_copy(tmp_path, lambda spec: spec.update(checks=[]))
    batch_capture(model, tmp_path / "lax", lax)
    report = zkllm_hf.validate(tmp_path / "lax")
    assert not report.ok and "not one zkllm-hf ships" in report.failures[0].message
    with pytest.raises(ValueError, match="kind 'nope'"):
        load_contract(contract_copy(tmp_path, lambda spec: spec["checks"].append({"name": "x", "kind": "nope"})))
    with pytest.raises(ValueError, match="format 2"):
        load_contract(contract_copy(tmp_path, lambda spec: spec.update(format_version=2)))


def test_the_norm_checks_read_the_right_weight(tmp_path):
    """Tiny models have distinct norm weights, so checking input_layernorm_output against the other norm fails."""
    model = make_tiny()
    swapped = contract_copy(tmp_path, lambda spec: [c.update(module="post_attention_layernorm")
                                                    for c in spec["checks"] if c["name"] == "norm_input"])
    with pytest.raises(zkllm_hf.ContractViolation) as info:
        batch_capture(model, tmp_path / "sw", swapped)
    assert {f.check for f in info.value.failures} == {"norm_input"}


def test_gate_runs_the_chain(tmp_path):
    """A foreign pre-hook that edits layer 2's input breaks only the chain: the gate must catch it."""
    model = make_tiny()
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, a, k: ((a[0] + 0.01,), k) if a else None,
                                                             with_kwargs=True, prepend=True)
    try:
        with pytest.raises(zkllm_hf.ContractViolation) as info:
            with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "c"):
                model(tiny_ids())
    finally:
        handle.remove()
    assert {(f.check, f.layer) for f in info.value.failures} == {("chain", 2)}


def test_gate_runs_the_manifest_schema(tmp_path, monkeypatch):
    rows = engine_mod.UnitRecorder.rows

    def bad_rows(self, written):
        out = rows(self, written)
        out[0]["hook"] = "backward"
        return out

    monkeypatch.setattr(engine_mod.UnitRecorder, "rows", bad_rows)
    model = make_tiny()
    with pytest.raises(zkllm_hf.ContractViolation, match="manifest_schema.*'hook'"):
        with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "s"):
            model(tiny_ids())
    assert not (tmp_path / "s").exists()


def test_gate_rehashes_the_staged_files(tmp_path, monkeypatch):
    """A byte that changes on disk after the writer hashed it is caught before the move."""
    seal = writer_mod.StagingDir._seal

    def corrupting_seal(self, name, aliases):
        written = seal(self, name, aliases)
        if name.endswith("layer-1-mlp-output.bin"):
            data = bytearray((self.path / name).read_bytes())
            data[5] ^= 0x10
            (self.path / name).write_bytes(bytes(data))
        return written

    monkeypatch.setattr(writer_mod.StagingDir, "_seal", corrupting_seal)
    model = make_tiny()
    with pytest.raises(zkllm_hf.ContractViolation) as info:
        with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "h"):
            model(tiny_ids())
    assert ("integrity", 1, "mlp_output") in {(f.check, f.layer, f.point) for f in info.value.failures}
    assert not (tmp_path / "h").exists()


def test_attach_removes_what_it_added_when_it_fails_part_way(tmp_path, monkeypatch):
    model = make_tiny()
    model(tiny_ids())
    before = count_hooks(model)
    register, calls = hooks_mod._register, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("registration failed")
        return register(*a, **k)

    monkeypatch.setattr(hooks_mod, "_register", flaky)
    with pytest.raises(RuntimeError, match="registration failed"):
        zkllm_hf.capture(model, tmp_path / "x").__enter__()
    assert calls["n"] == 9 and count_hooks(model) == before


def test_a_failed_move_puts_the_previous_capture_back(tmp_path, monkeypatch):
    model = make_tiny()
    out = tmp_path / "cap"
    with torch.no_grad(), zkllm_hf.capture(model, out, layers="0"):
        model(tiny_ids())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = writer_mod.os.rename

    def failing(src, dst):
        if Path(dst) == out and ".zkllm-staging-" in str(src):  # the final move, after the old one moved aside
            assert not out.exists()
            raise OSError(28, "No space left on device")
        return rename(src, dst)

    monkeypatch.setattr(writer_mod.os, "rename", failing)
    with pytest.raises(OSError, match="No space left"):
        with torch.no_grad(), zkllm_hf.capture(model, out, layers="1", overwrite=True):
            model(tiny_ids())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["cap"]  # no staging, no old copy left
    assert zkllm_hf.validate(out, model=model).ok


def test_unreadable_norm_weights_are_reported_as_skipped(tmp_path, monkeypatch):
    """A weight that cannot be read skips the norm checks: said in the result, the manifest and validate,
    never counted as passed."""
    model = make_tiny()
    monkeypatch.setattr(hooks_mod, "norm_params", lambda module: "weight is on the meta device")
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "n") as s:
        model(tiny_ids())
    skipped = {(c.check, c.layer) for c in s.result.skipped}
    assert skipped == {(n, layer) for n in ("norm_input", "norm_post_attention") for layer in range(3)}
    assert all("weight is on the meta device" in c.skipped and not c.passed for c in s.result.skipped)
    _, meta = read_manifest(tmp_path / "n" / "manifest.arrow")
    assert {(c["check"], c["layer"]) for c in meta["checks"]["skipped"]} == skipped
    report = zkllm_hf.validate(tmp_path / "n", model=model)
    assert report.ok and {r.check for r in report.skipped} == {"norm_input", "norm_post_attention"}
    assert report.summary()["norm_input"] == {"passed": 0, "failed": 0, "skipped": 3}
    assert "skipped (not checked)" in str(report)
    monkeypatch.undo()
    report = zkllm_hf.validate(tmp_path / "n", model=model)
    assert report.ok and not report.skipped  # the weights are readable now: the checks run and pass
    without = zkllm_hf.validate(tmp_path / "n")
    assert {r.check for r in without.skipped} == {"norm_input", "norm_post_attention", "config",
                                                  "weights_fingerprint"}
