"""residuals="exact-int": the residual stream derived in int32, its drift bounded and recorded, and validate
judging the files as written (exact sums, norms widened by the recorded drift)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import digest_column, digest_of, make_tiny, tiny_ids
from test_validate import rewrite_manifest

import zkllm_hf
from zkllm_hf.contracts import ContractViolation, contracts_root
from zkllm_hf.manifest import read_manifest
from zkllm_hf.validate import load_capture


@pytest.fixture(scope="module")
def model():
    return make_tiny()


@pytest.fixture(scope="module")
def pristine(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("exact")
    for mode in ("model", "exact-int"):
        with torch.no_grad(), zkllm_hf.capture(model, base / mode, residuals=mode):
            model(tiny_ids(48))
    return base


def codes(folder: Path, layer: int, point: str) -> np.ndarray:
    cap = load_capture(folder)
    return np.array(cap.codes(layer, point), dtype=np.int64)


def test_exact_int_differs_from_the_model_only_in_the_residual_points(pristine):
    """The sublayer outputs and norm outputs are the model's own bytes; the residual points are the int
    sums, which differ from the model's somewhere (else the test would prove nothing), within the recorded
    drift, and the recorded drift is the true maximum."""
    model_dir, exact_dir = pristine / "model", pristine / "exact-int"
    meta = load_capture(exact_dir).metadata
    assert meta["capture"]["residuals"] == "exact-int"
    drift = {(e["layer"], e["point"]): e for e in meta["residuals"]["drift"]}
    differs = False
    for layer in range(3):
        for point in ("attn_output", "mlp_output", "input_layernorm_output", "ffn_input"):
            assert np.array_equal(codes(model_dir, layer, point), codes(exact_dir, layer, point))
        for point in ("block_input", "post_attn_residual", "block_output"):
            dev = np.abs(codes(model_dir, layer, point) - codes(exact_dir, layer, point))
            differs |= bool(dev.any())
            assert dev.max() == drift[(layer, point)]["max_dev_lsb"]
            assert 0 <= drift[(layer, point)]["max_ratio"] <= 1
        assert np.array_equal(
            codes(exact_dir, layer, "post_attn_residual"),
            codes(exact_dir, layer, "block_input") + codes(exact_dir, layer, "attn_output"),
        )
    assert differs
    assert load_capture(model_dir).metadata["residuals"] == {"mode": "model", "drift": []}


def test_validate_holds_exact_int_sums_to_zero_tolerance(pristine, model, tmp_path):
    """One LSB off in a derived residual passes the default mode's tolerance but not exact-int's."""
    for mode, should_pass in (("model", True), ("exact-int", False)):
        cap = tmp_path / mode
        shutil.copytree(pristine / mode, cap)
        name = "layer-1-block-output.bin"
        data = np.fromfile(cap / name, dtype=np.int32)
        data[10] += 1
        data.tofile(cap / name)
        column = digest_column(read_manifest(cap / "manifest.arrow")[1])
        digest = digest_of(column, data.tobytes())

        def edit(rows, name=name, digest=digest, data=data, column=column):
            for r in rows:
                if r["file"] == name:
                    r[column] = digest
                    r["int_min"], r["int_max"] = int(data.min()), int(data.max())

        rewrite_manifest(cap, edit_rows=edit, keep_digest=True)
        report = zkllm_hf.validate(cap, model=model)
        bad = {f.check for f in report.failures}
        if should_pass:
            assert "skip_2" not in bad, str(report)
        else:
            assert "skip_2" in bad, str(report)


def test_validate_judges_the_recorded_drift(pristine, model, tmp_path):
    cap = tmp_path / "cap"
    shutil.copytree(pristine / "exact-int", cap)

    target = load_capture(cap).metadata["residuals"]["drift"][4]

    def inflate(meta):
        meta["residuals"]["drift"][4]["max_ratio"] = 1.5

    rewrite_manifest(cap, edit_meta=inflate, keep_digest=True)
    report = zkllm_hf.validate(cap, model=model)
    assert [(f.check, f.layer) for f in report.failures] == [(f"drift_{target['point']}", target["layer"])]

    def drop(meta):
        meta["residuals"]["drift"] = []

    shutil.rmtree(cap)
    shutil.copytree(pristine / "exact-int", cap)
    rewrite_manifest(cap, edit_meta=drop, keep_digest=True)
    report = zkllm_hf.validate(cap, model=model)
    # no record: each drift check fails, and the norms, no longer widened by the drift, fail on derived inputs
    assert {f.check for f in report.failures} == {
        "drift_block_input",
        "drift_post_attn_residual",
        "drift_block_output",
        "norm_input",
        "norm_post_attention",
    }


def test_drift_beyond_the_contract_bound_is_refused_and_nothing_is_emitted(model, tmp_path):
    folder = tmp_path / "strict"
    shutil.copytree(contracts_root() / "v1", folder)
    spec = yaml.safe_load((folder / "capture.yaml").read_text())
    for check in spec["checks"]:
        if check["kind"] == "drift":
            check["drift_lsb"], check["drift_ulps"] = 0, 0
    (folder / "capture.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    with pytest.raises(ContractViolation) as err, torch.no_grad():
        with zkllm_hf.capture(model, out, residuals="exact-int", contract=str(folder)):
            model(tiny_ids(48))
    assert "drift_" in str(err.value) and "layer" in str(err.value)
    assert not out.exists()
    # the same contract accepts the default mode, where nothing is derived
    with torch.no_grad(), zkllm_hf.capture(model, out, contract=str(folder)):
        model(tiny_ids(48))
    assert (out / "manifest.arrow").is_file()


def test_bad_residuals_mode_is_refused_with_the_choices(model, tmp_path):
    with pytest.raises(ValueError, match="exact-int"):
        zkllm_hf.capture(model, tmp_path / "x", residuals="exact")


def test_exact_int_chains_over_generate_steps(model, tmp_path):
    """A unit fed by several forwards (generate's steps): each forward derives its rows; the files still sum
    exactly and validate."""
    from transformers import LogitsProcessorList

    proc = zkllm_hf.CaptureLogitsProcessor(model, tmp_path / "gen", mode="steps", residuals="exact-int")
    with proc, torch.no_grad():
        out = model.generate(
            tiny_ids(8),
            logits_processor=LogitsProcessorList([proc]),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
        result = proc.finalize(out)
    assert zkllm_hf.validate(result.out_dir, model=model).ok
    unit = result.out_dir / "sample-0" / "step-2"
    assert np.array_equal(
        codes(unit, 2, "block_output"), codes(unit, 2, "post_attn_residual") + codes(unit, 2, "mlp_output")
    )


def test_exact_int_writes_the_same_capture_on_the_asynchronous_path(model, tmp_path, monkeypatch):
    """On CUDA the engine quantises on the device and reads ranges back a layer later; exact-int reads them at
    once and takes the synchronous copy path. Run that path on the CPU: the same bytes and the same drift."""
    from zkllm_hf import engine as engine_mod

    ids = tiny_ids(48)
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "direct", residuals="exact-int"):
        model(ids)
    monkeypatch.setattr(engine_mod.CaptureEngine, "asynchronous", staticmethod(lambda device: True))
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "deferred", residuals="exact-int"):
        model(ids)
    a, b = load_capture(tmp_path / "direct"), load_capture(tmp_path / "deferred")
    cols = ["file", "sha256", "blake3", "int_min", "int_max", "max_dev_lsb"]
    assert a.manifest.select(cols).to_pylist() == b.manifest.select(cols).to_pylist()
    assert a.metadata["residuals"] == b.metadata["residuals"]
    assert zkllm_hf.validate(tmp_path / "deferred", model=model).ok


def test_validate_caps_a_recorded_drift_that_would_loosen_the_norm_checks(pristine, model, tmp_path):
    """The recorded drift widens the norm checks; a forged one (ratio kept small, deviation huge) is held to
    the largest bound the contract could have allowed and fails, instead of making the norm checks vacuous."""
    cap = tmp_path / "cap"
    shutil.copytree(pristine / "exact-int", cap)

    def forge(meta):
        for d in meta["residuals"]["drift"]:
            if d["layer"] == 1 and d["point"] == "post_attn_residual":
                d["max_dev_lsb"] = 1e9

    rewrite_manifest(cap, edit_meta=forge, keep_digest=True)
    report = zkllm_hf.validate(cap, model=model)
    bad = [f for f in report.failures if f.check == "drift_post_attn_residual"]
    assert len(bad) == 1 and bad[0].layer == 1 and "exceeds the largest bound" in bad[0].message
