"""The engine's seams: options resolved once, the in-memory sink, and the pipeline's stateless stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf.engine import CaptureEngine, Route
from zkllm_hf.options import CaptureOptions, check_residuals, resolve_layers
from zkllm_hf.points import POINTS
from zkllm_hf.sink import MemorySink


def test_options_check_the_layers_against_the_model(tmp_path):
    model = make_tiny()
    for bad in ("0-7", [5], "-9"):
        with pytest.raises(ValueError, match="out of range"):
            zkllm_hf.capture(model, tmp_path / "x", layers=bad)
    with pytest.raises(ValueError, match="layers is empty"):
        resolve_layers([], 3)
    with pytest.raises(ValueError, match="residuals='exact'; one of"):
        check_residuals("exact")
    opts = CaptureOptions.build(3, mode="forward", layers=[2, 0])
    assert opts.layers == (0, 2) and opts.scale_log2 == 16 and opts.paddable
    assert not (tmp_path / "x").exists()


def test_the_memory_sink_holds_the_bytes_a_capture_writes(tmp_path):
    model = make_tiny()
    ids = torch.cat([tiny_ids(12, seed=1), tiny_ids(12, seed=2)])
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "disk"):
        model(input_ids=ids)

    sink = MemorySink()
    where = tmp_path / "memory"
    engine = CaptureEngine(model, where, mode="forward", sink=lambda: sink)
    engine.attach(lambda fwd: [Route(b, fwd.real_columns(b), engine.unit(b)) for b in range(fwd.batch)])
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        engine.detach()
    for unit in engine.units.values():
        unit.seal()
    assert not where.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["disk"]  # nothing written
    codes = sink.codes
    assert sorted(sink.sealed) == sink.units() == ["sample-0", "sample-1"]
    assert len(codes) == 2 * TINY["num_hidden_layers"] * len(POINTS)
    for (folder, layer, point), got in codes.items():
        name = next(p for p in POINTS if p.name == point).file_name(layer)
        on_disk = np.fromfile(tmp_path / "disk" / folder / name, dtype="<i4").reshape(12, TINY["hidden_size"])
        assert got.dtype == np.dtype("<i4") and np.array_equal(got, on_disk), (folder, layer, point)


def test_the_gate_refuses_a_batch_whose_index_fails_its_checks(tmp_path, monkeypatch):
    """The index of a batch capture is checked as validate checks it (here: it states a wrong manifest
    digest for every unit), and a failing index emits nothing."""
    import zkllm_hf.gate as gate_mod

    monkeypatch.setattr(gate_mod, "sha256_file", lambda path: "0" * 64)
    model = make_tiny()
    ids = torch.cat([tiny_ids(8, seed=1), tiny_ids(8, seed=2)])
    with pytest.raises(zkllm_hf.ContractViolation, match="dataset_index"):
        with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "b"):
            model(input_ids=ids)
    assert list(tmp_path.iterdir()) == []
