"""capture() on tiny seeded models: files, format, identities, hook lifetime, refusals, streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import count_hooks, make_tiny, read_zkllm, tiny_ids

import zkllm_hf
from zkllm_hf import engine as engine_mod
from zkllm_hf.points import FILES_PER_LAYER, POINTS
from zkllm_hf.provenance import weights_fingerprint

K = 16


def run_capture(model, out: Path, ids=None, **kw):
    ids = tiny_ids() if ids is None else ids
    with torch.no_grad(), zkllm_hf.capture(model, out, **kw) as s:
        result = model(input_ids=ids, output_hidden_states=True)
    return s.result, result


def no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".zkllm-" in p.name]


def test_files_format_and_hidden_states(tiny, tmp_path):
    out = tmp_path / "cap"
    res, model_out = run_capture(tiny, out)
    n_layers, seq, hidden = 3, tiny_ids().shape[1], 64
    assert (res.seq_len, res.hidden_size, res.layers) == (seq, hidden, [0, 1, 2])
    bins = sorted(p.name for p in out.glob("*.bin"))
    assert len(bins) == n_layers * FILES_PER_LAYER == 24
    for layer in range(n_layers):
        for p in POINTS:
            for name in (p.file_name(layer), *p.alias_names(layer)):
                assert (out / name).stat().st_size == seq * hidden * 4
        a = read_zkllm(out / f"layer-{layer}-input-rmsnorm-activation.bin", seq, hidden)
        b = read_zkllm(out / f"layer-{layer}-block-input.bin", seq, hidden)
        assert np.array_equal(a, b)
    hs = model_out.hidden_states  # hs[L] is layer L's input; the last entry is after the final norm
    for layer in range(n_layers):
        got = read_zkllm(out / f"layer-{layer}-input-rmsnorm-activation.bin", seq, hidden) / 2.0**K
        assert np.abs(got - hs[layer][0].double().numpy()).max() <= 2.0 ** -(K + 1)
        if layer + 1 < n_layers:
            got = read_zkllm(out / f"layer-{layer}-block-output.bin", seq, hidden) / 2.0**K
            assert np.abs(got - hs[layer + 1][0].double().numpy()).max() <= 2.0 ** -(K + 1)
    assert (out / "manifest.arrow").is_file() and not (out / "PARTIAL").exists()
    assert no_staging_left(tmp_path)


def test_identities_hold_on_the_files(tiny, tmp_path):
    """Recompute skip #1, skip #2 and the chain from the files alone, with numpy."""
    out = tmp_path / "cap"
    res, _ = run_capture(tiny, out)
    seq, hidden = res.seq_len, res.hidden_size

    def q(layer, point):
        return read_zkllm(out / zkllm_hf.points.POINTS_BY_NAME[point].file_name(layer), seq, hidden).astype(np.int64)

    for layer in range(3):
        # float32 adds: 1.5 LSB plus half a float32 ulp of the sum at 2**16
        for s, x, y in (("post_attn_residual", "block_input", "attn_output"),
                        ("block_output", "post_attn_residual", "mlp_output")):
            total = q(layer, s)
            bound = 1.5 + 0.5 * np.spacing(((np.abs(total) + 0.5) / 2.0**K).astype(np.float32)) * 2.0**K
            assert (np.abs(total - q(layer, x) - q(layer, y)) <= bound).all()
        if layer:
            assert np.array_equal(q(layer, "block_input"), q(layer - 1, "block_output"))


def test_hooks_removed_after_block_and_after_exception(tiny, tmp_path):
    tiny(tiny_ids())  # transformers installs its own output-capturing hooks on the first forward
    before = count_hooks(tiny)
    with zkllm_hf.capture(tiny, tmp_path / "a"):
        # the model's pre and post hooks, and per layer the points plus the gate_proj probe
        assert count_hooks(tiny) == before + 2 + 3 * (len(POINTS) + 1)
        tiny(tiny_ids())
    assert count_hooks(tiny) == before
    with pytest.raises(RuntimeError, match="boom"):
        with zkllm_hf.capture(tiny, tmp_path / "b"):
            tiny(tiny_ids())
            raise RuntimeError("boom")
    assert count_hooks(tiny) == before
    assert not (tmp_path / "b").exists() and no_staging_left(tmp_path)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_llama_shaped_architectures(arch, tmp_path):
    model = make_tiny(arch)
    res, _ = run_capture(model, tmp_path / arch)
    assert zkllm_hf.validate(tmp_path / arch, model=model).ok
    assert res.layers == [0, 1, 2]


def test_bare_llama_model(tiny, tmp_path):
    res, _ = run_capture(tiny.model, tmp_path / "bare")
    assert res.layers == [0, 1, 2]
    meta = zkllm_hf.load_capture(tmp_path / "bare").metadata
    assert meta["model"]["class"] == "LlamaModel"
    assert meta["tokens"]["input_ids"] == tiny_ids()[0].tolist()


def test_missing_module_is_named(tiny, tmp_path):
    del tiny.model.layers[1].post_attention_layernorm
    with pytest.raises(zkllm_hf.UnsupportedModelError, match=r"layers\[1\].*'post_attention_layernorm'"):
        zkllm_hf.capture(tiny, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_model_without_decoder_layers(tmp_path):
    with pytest.raises(zkllm_hf.UnsupportedModelError, match="no decoder layers"):
        zkllm_hf.capture(torch.nn.Linear(4, 4), tmp_path / "x")


def test_layer_subset(tiny, tmp_path):
    res, _ = run_capture(tiny, tmp_path / "sub", layers="0,2")
    names = {p.name for p in (tmp_path / "sub").glob("*.bin")}
    assert {n.split("-")[1] for n in names} == {"0", "2"}
    chain = [c for c in res.checks if c.check == "chain"]  # layer 1 was not captured: layer 2's chain is skipped
    assert [(c.layer, c.skipped) for c in chain] == [(2, "layer 1 is not in the capture")] and not chain[0].passed
    assert zkllm_hf.validate(tmp_path / "sub", model=tiny).ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_passes_contracts_with_dtype_tolerances(dtype, tmp_path):
    model = make_tiny(dtype=dtype)
    res, _ = run_capture(model, tmp_path / "half")
    table = zkllm_hf.load_capture(tmp_path / "half").manifest.to_pandas()
    assert set(table["source_dtype"]) == {str(dtype).removeprefix("torch.")}
    assert zkllm_hf.validate(tmp_path / "half", model=model).ok
    # the float32 bound would be far too tight for these adds: the recorded deviation exceeds 1.5 LSB
    assert table["max_dev_lsb"].max() > 1.5


def test_overflow_names_layer_point_value_and_fix(tiny, tmp_path):
    with pytest.raises(zkllm_hf.FixedPointError, match=r"layer 0 block_input: value .* exceeds int32 at scale "
                                                       r"2\*\*30 .*lower --scale-log2 to \d+"):
        run_capture(tiny, tmp_path / "ovf", scale_log2=30)
    assert not (tmp_path / "ovf").exists() and no_staging_left(tmp_path)


def test_nan_is_refused(tiny, tmp_path):
    with torch.no_grad():
        tiny.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(zkllm_hf.FixedPointError, match="layer 1 mlp_output: value nan at token 0, dim 0"):
        run_capture(tiny, tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and no_staging_left(tmp_path)


def test_existing_output_is_refused_and_untouched(tiny, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        zkllm_hf.capture(tiny, out).__enter__()
    with pytest.raises(FileExistsError, match="not a finished zkllm-hf capture"):
        zkllm_hf.capture(tiny, out, overwrite=True).__enter__()
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and no_staging_left(tmp_path)
    (out / "PARTIAL").write_text("")  # a stray marker does not make a user's folder a capture
    with pytest.raises(FileExistsError, match="not a finished zkllm-hf capture"):
        zkllm_hf.capture(tiny, out, overwrite=True).__enter__()
    assert sorted(p.name for p in out.iterdir()) == ["PARTIAL", "keep.txt"]


def test_overwrite_never_deletes_a_file_the_capture_did_not_write(tiny, tmp_path):
    out = tmp_path / "cap"
    run_capture(tiny, out, layers="0")
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    with pytest.raises(FileExistsError, match=r"does not list \(extra/, notes.txt\).*--overwrite only"):
        run_capture(tiny, out, layers="1", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and zkllm_hf.validate(out).ok and no_staging_left(tmp_path)
    (out / "notes.txt").unlink()
    (out / "extra").rmdir()
    ids = torch.cat([tiny_ids(), tiny_ids(seed=2)])  # a dataset replaces a capture, and is replaced in turn
    with torch.no_grad(), zkllm_hf.capture(tiny, out, overwrite=True):
        tiny(input_ids=ids)
    (out / "sample-1" / "mine.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="sample-1/mine.bin"):
        run_capture(tiny, out, overwrite=True)
    (out / "sample-1" / "mine.bin").unlink()
    run_capture(tiny, out, overwrite=True)
    assert zkllm_hf.validate(out).ok and not list(out.glob("sample-*"))


def test_overwrite_replaces_a_capture(tiny, tmp_path):
    out = tmp_path / "cap"
    run_capture(tiny, out, layers="0")
    run_capture(tiny, out, layers="1-2", overwrite=True)
    assert {p.name.split("-")[1] for p in out.glob("*.bin")} == {"1", "2"}
    assert zkllm_hf.validate(out).ok and no_staging_left(tmp_path)


def test_second_forward_is_refused(tiny, tmp_path):
    with pytest.raises(zkllm_hf.CaptureError, match="exactly one forward"):
        with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / "two"):
            tiny(tiny_ids())
            tiny(tiny_ids())
    assert not (tmp_path / "two").exists()


def test_no_forward_is_refused(tiny, tmp_path):
    with pytest.raises(zkllm_hf.CaptureError, match="no forward ran"):
        with zkllm_hf.capture(tiny, tmp_path / "none"):
            pass
    assert not (tmp_path / "none").exists() and no_staging_left(tmp_path)


def test_inconsistent_hook_is_never_emitted(tiny, tmp_path):
    """A foreign pre-hook that edits what post_attention_layernorm sees breaks both skip identities."""
    norm = tiny.model.layers[1].post_attention_layernorm
    handle = norm.register_forward_pre_hook(lambda m, args: (args[0] + 0.01,), prepend=True)
    try:
        with pytest.raises(zkllm_hf.ContractViolation) as info:
            run_capture(tiny, tmp_path / "bad")
    finally:
        handle.remove()
    failed = {(f.check, f.layer, f.point) for f in info.value.failures}
    assert ("skip_1", 1, "post_attn_residual") in failed and ("skip_2", 1, "block_output") in failed
    assert all(f.layer == 1 for f in info.value.failures)
    msg = str(info.value)
    assert "layer 1 post_attn_residual" in msg and "allowed" in msg and "LSB" in msg and "nothing was emitted" in msg
    assert not (tmp_path / "bad").exists() and no_staging_left(tmp_path)


def _capture_with_slowest_disk(model, out: Path, monkeypatch):
    """Capture with a writer that writes a layer only when the capture is blocked on its memory bound (or
    is finishing): the worst case for memory, reached the same way on every run. Returns the engine's host
    buffer pool and every array handed to the writer, as (address, pooled) pairs."""
    import threading

    pools, handed = [], []
    may_write, finishing = threading.Event(), threading.Event()

    class Pool(engine_mod.HostBufferPool):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.on_wait = may_write.set  # the capture waits for room: let the writer take one layer
            pools.append(self)

    append, write_layer, wait = (engine_mod.StagingDir.append_many, engine_mod.StagingDir._append_many,
                                 engine_mod.StagingDir.wait)

    def tracked_append(self, items, **kw):
        pool = pools[-1]
        handed.extend((a.__array_interface__["data"][0] in pool._refs) for _, a in items)
        return append(self, items, **kw)

    def slowest_disk(self, items):
        assert may_write.wait(120) or finishing.is_set(), "the capture never waited for memory"
        if not finishing.is_set():
            may_write.clear()
        return write_layer(self, items)

    def finish(self):
        finishing.set()
        may_write.set()
        return wait(self)

    monkeypatch.setattr(engine_mod, "HostBufferPool", Pool)
    monkeypatch.setattr(engine_mod.StagingDir, "append_many", tracked_append)
    monkeypatch.setattr(engine_mod.StagingDir, "_append_many", slowest_disk)
    monkeypatch.setattr(engine_mod.StagingDir, "wait", finish)
    monkeypatch.setattr(engine_mod.CaptureEngine, "MIN_IN_FLIGHT_BYTES", 0)  # the bound in layers, not the floor
    run_capture(model, out)
    assert len(pools) == 1
    return pools[0], handed


@pytest.mark.parametrize("depth", [4, 12])
def test_memory_stays_bounded_by_a_few_layers(tmp_path, monkeypatch, depth):
    """However deep the model and however slow the disk, the capture's codes live in pooled host buffers that
    never hold more than two layers and a point: the layer in progress, the layer being written (whose
    block_output also waits for the next chain check) and one more buffer. Exact, on every run: the pool's
    high-water mark is its accounting of the bytes it held, not a timing."""
    model = make_tiny(num_hidden_layers=depth)
    pool, handed = _capture_with_slowest_disk(model, tmp_path / "big", monkeypatch)
    seq, hidden = tiny_ids().shape[1], 64
    point = 4 * seq * hidden
    assert handed and all(handed), "every array the writer gets is a pooled buffer (so the pool sees all memory)"
    assert len(handed) == depth * len(POINTS)
    assert pool.waits > 0, "the bound was reached: the capture waited for the writer"
    assert pool.high_water_bytes == (2 * len(POINTS) + 1) * point < 3 * len(POINTS) * point
    assert pool.in_use_bytes == 0, "every buffer was given back"
    assert zkllm_hf.validate(tmp_path / "big").ok


def test_quantized_models_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny().save_pretrained(tmp_path / "tiny")
    for name, cfg in (("4bit", BitsAndBytesConfig(load_in_4bit=True)), ("8bit", BitsAndBytesConfig(load_in_8bit=True))):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=cfg, device_map={"": "cpu"})
        run_capture(model, tmp_path / name)
        meta = zkllm_hf.load_capture(tmp_path / name).metadata
        assert meta["model"]["quantization"]["quant_method"] == "bitsandbytes"
        assert meta["model"]["quantization"][f"load_in_{name}"] is True
        assert zkllm_hf.validate(tmp_path / name, model=model).ok


def test_device_map_with_offloaded_layer(tmp_path):
    """accelerate's device_map hooks and disk offload coexist with ours; offloaded norm weights are read."""
    from transformers import AutoModelForCausalLM

    make_tiny().save_pretrained(tmp_path / "tiny")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    res, _ = run_capture(model, tmp_path / "dm")
    assert {c.check for c in res.checks if c.layer == 1} >= {"norm_input", "norm_post_attention"}
    meta = zkllm_hf.load_capture(tmp_path / "dm").metadata
    assert meta["model"]["device_map"]["model.layers.1"] == "disk"
    # the fingerprint reads offloaded weights: it equals the same weights' fingerprint fully in memory
    assert meta["model"]["weights_fingerprint"] == weights_fingerprint(make_tiny())


def test_python_dash_m_and_text_file(tmp_path):
    """`python -m zkllm_hf` is the CLI; --text-file reads the prompt (a local model folder, offline)."""
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "zkllm_hf", "capture", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--text-file" in help_text and "--pad-to" in help_text and "--scale-log2" in help_text
    missing = subprocess.run([sys.executable, "-m", "zkllm_hf", "capture", "--text-file", str(tmp_path / "nope.txt"),
                              "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_decoder_with_other_maths_is_refused_by_the_contracts(arch, tmp_path, caplog):
    """Gemma's modules have Llama's names, but its norm is x * (1 + w) and Gemma 2 norms the sublayer
    outputs before the residual add: the recomputed identities catch both, and nothing is emitted."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM

    config_cls, model_cls = {"gemma": (GemmaConfig, GemmaForCausalLM),
                             "gemma2": (Gemma2Config, Gemma2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    with pytest.raises(zkllm_hf.ContractViolation) as info:
        run_capture(model, tmp_path / arch)
    failed = {f.check for f in info.value.failures}
    assert {"norm_input", "norm_post_attention"} <= failed
    if arch == "gemma2":
        assert {"skip_1", "skip_2"} <= failed
    assert f"model_type '{arch}' is not one zkllm_hf knows" in caplog.text
    assert not (tmp_path / arch).exists() and no_staging_left(tmp_path)


def test_data_parallel_and_other_threads_are_refused(tiny, tmp_path):
    """DataParallel runs replicas in worker threads, calling our hooks there: refused up front, and a forward
    from another thread is refused too (nothing emitted)."""
    import threading

    for make in (lambda: zkllm_hf.capture(torch.nn.DataParallel(tiny), tmp_path / "dp"),
                 lambda: zkllm_hf.CaptureLogitsProcessor(torch.nn.DataParallel(tiny), tmp_path / "dp")):
        with pytest.raises(zkllm_hf.CaptureError, match="DataParallel.*one device"):
            make()
    errors = []

    def forward():
        try:
            with torch.no_grad():
                tiny(tiny_ids())
        except zkllm_hf.CaptureError as exc:
            errors.append(str(exc))

    with pytest.raises(zkllm_hf.CaptureError, match="no forward"):
        with zkllm_hf.capture(tiny, tmp_path / "thread"):
            worker = threading.Thread(target=forward)
            worker.start()
            worker.join()
    assert errors and "another thread" in errors[0]
    assert not (tmp_path / "thread").exists() and no_staging_left(tmp_path)


def _asynchronous_everywhere(monkeypatch):
    """Run the CUDA copy path (device-side quantisation and checks, copies into pooled buffers, results read
    back a layer later) on the CPU."""
    monkeypatch.setattr(engine_mod.CaptureEngine, "asynchronous", staticmethod(lambda device: True))


def test_asynchronous_path_writes_the_same_capture(tmp_path, monkeypatch):
    model = make_tiny()
    direct, _ = run_capture(model, tmp_path / "direct")
    _asynchronous_everywhere(monkeypatch)
    deferred, _ = run_capture(model, tmp_path / "deferred")
    a, b = zkllm_hf.load_capture(tmp_path / "direct"), zkllm_hf.load_capture(tmp_path / "deferred")
    cols = ["file", "sha256", "blake3", "int_min", "int_max", "check", "max_dev_lsb", "max_dev_ratio"]
    assert a.manifest.select(cols).to_pylist() == b.manifest.select(cols).to_pylist()
    assert [(c.check, c.layer, c.passed, c.max_ratio) for c in direct.checks] == [
        (c.check, c.layer, c.passed, c.max_ratio) for c in deferred.checks
    ]
    assert zkllm_hf.validate(tmp_path / "deferred", model=model).ok


def test_asynchronous_path_still_refuses_what_breaks_the_contract(tmp_path, monkeypatch):
    _asynchronous_everywhere(monkeypatch)
    model = make_tiny()
    norm = model.model.layers[1].post_attention_layernorm
    handle = norm.register_forward_pre_hook(lambda m, args: (args[0] + 0.01,), prepend=True)
    try:
        with pytest.raises(zkllm_hf.ContractViolation) as info:
            run_capture(model, tmp_path / "bad")
    finally:
        handle.remove()
    assert ("skip_1", 1, "post_attn_residual") in {(f.check, f.layer, f.point) for f in info.value.failures}
    assert not (tmp_path / "bad").exists() and no_staging_left(tmp_path)


def test_asynchronous_path_reports_overflow_and_nan_like_the_direct_path(tmp_path, monkeypatch):
    model = make_tiny()
    messages = []
    for asynchronous in (False, True):
        if asynchronous:
            _asynchronous_everywhere(monkeypatch)
        with pytest.raises(zkllm_hf.FixedPointError) as overflow:
            run_capture(model, tmp_path / f"ovf-{asynchronous}", scale_log2=30)
        broken = make_tiny()
        with torch.no_grad():
            broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        with pytest.raises(zkllm_hf.FixedPointError) as nan:
            run_capture(broken, tmp_path / f"nan-{asynchronous}")
        messages.append((str(overflow.value), str(nan.value)))
    assert messages[0] == messages[1]
    assert "lower --scale-log2 to" in messages[1][0] and "layer 1 mlp_output: value nan" in messages[1][1]
    assert no_staging_left(tmp_path) and not list(tmp_path.iterdir())
