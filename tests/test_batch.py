"""Batches in capture(): one unit per row, de-padded with the attention mask, under a dataset index."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_tiny, read_zkllm, tiny_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zkllm_hf
from zkllm_hf import fixed_point as fp
from zkllm_hf.points import POINTS, POINTS_BY_NAME

K = 16


def padded(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right- or left-padded ids (pad id 0) and the 2-D attention mask, as a tokenizer would build them."""
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - p.numel(), width) if side == "left" else slice(0, p.numel())
        ids[i, cols], mask[i, cols] = p.reshape(-1), 1
    return ids, mask


def capture_batch(model, out: Path, ids, mask, **kw):
    with torch.no_grad(), zkllm_hf.capture(model, out, **kw) as s:
        model(input_ids=ids, attention_mask=mask)
    return s.result


def solo(model, out: Path, prompt: torch.Tensor):
    with torch.no_grad(), zkllm_hf.capture(model, out):
        model(input_ids=prompt.reshape(1, -1))
    return zkllm_hf.load_capture(out)


def no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".zkllm-" in p.name]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_equals_solo_captures(side, dtype, tmp_path):
    """Each row of a padded batch is the capture of that prompt alone, within a few ulps of the model's dtype."""
    model = make_tiny(dtype=dtype)
    prompts = [tiny_ids(12)[0], tiny_ids(7, seed=2)[0], tiny_ids(3, seed=3)[0]]
    ids, mask = padded(prompts, side)
    res = capture_batch(model, tmp_path / "batch", ids, mask)
    assert [u["folder"] for u in res.units] == ["sample-0", "sample-1", "sample-2"] and res.is_dataset
    ds = zkllm_hf.load_capture(tmp_path / "batch")
    assert isinstance(ds, zkllm_hf.CaptureDataset) and len(ds) == 3
    for b, prompt in enumerate(prompts):
        unit, alone = ds.unit(b), solo(model, tmp_path / f"solo{b}", prompt)
        tokens = unit.metadata["tokens"]
        assert tokens["input_ids"] == prompt.tolist() and tokens["seq_len"] == prompt.numel()
        assert unit.metadata["unit"] == {"sample": b, "step": 0, "phase": "forward", "row": b}
        for layer in range(TINY["num_hidden_layers"]):
            for p in POINTS:
                got = torch.from_numpy(np.array(unit.codes(layer, p.name))).to(torch.int64)
                want = torch.from_numpy(np.array(alone.codes(layer, p.name))).to(torch.int64)
                # Batched kernels may round differently: a matmul's rounding scales with its row, so allow a few
                # ulps of the dtype at the row's largest magnitude.
                magnitude = (torch.maximum(got.abs(), want.abs()).amax(dim=-1, keepdim=True).double() + 0.5) / 2**K
                tol = 1 + 8 * fp.ulp(magnitude, dtype) * 2**K
                assert ((got - want).abs() <= tol).all(), (side, b, layer, p.name)
        assert zkllm_hf.validate(tmp_path / "batch" / f"sample-{b}", model=model).ok
    assert zkllm_hf.validate(tmp_path / "batch", model=model).ok


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 9), min_size=2, max_size=4), side=st.sampled_from(["left", "right"]),
       seed=st.integers(0, 2**16))
def test_depadding_property(tiny, tmp_path_factory, lengths, side, seed):
    """Whatever the lengths and padding side, unit b holds exactly row b's real tokens: its layer-0 input is
    the quantised embedding of its own tokens (embeddings are per token, so independent of the batch)."""
    out = tmp_path_factory.mktemp("prop") / "cap"
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, TINY["vocab_size"], (n,), generator=g) for n in lengths]
    ids, mask = padded(prompts, side)
    capture_batch(tiny, out, ids, mask, layers="0")
    emb = tiny.get_input_embeddings().weight.detach()
    for b, prompt in enumerate(prompts):
        path = out / f"sample-{b}" / POINTS_BY_NAME["block_input"].file_name(0)
        got = read_zkllm(path, prompt.numel(), TINY["hidden_size"])
        assert np.array_equal(got, fp.quantize(emb[prompt], K).numpy())
        meta = zkllm_hf.load_capture(out / f"sample-{b}").metadata
        assert meta["tokens"]["input_ids"] == prompt.tolist()
    shutil.rmtree(out.parent)


def test_prompt_lengths_per_row_and_flat_single_row(tiny, tmp_path):
    ids, mask = padded([tiny_ids(6)[0], tiny_ids(4, seed=2)[0]], "right")
    capture_batch(tiny, tmp_path / "b", ids, mask, prompt_length=[5, 3], pad_token_id=0)
    ds = zkllm_hf.load_capture(tmp_path / "b")
    assert [ds.unit(b).metadata["tokens"]["prompt_token_count"] for b in (0, 1)] == [5, 3]
    with pytest.raises(ValueError, match="prompt_length has 3 entries for a batch of 2"):
        capture_batch(tiny, tmp_path / "c", ids, mask, prompt_length=[1, 2, 3])
    res = capture_batch(tiny, tmp_path / "one", ids[:1], mask[:1])
    assert not res.is_dataset and (tmp_path / "one" / "manifest.arrow").is_file()
    assert not list((tmp_path / "one").glob("sample-*"))


def test_one_bad_row_emits_nothing(tiny, tmp_path):
    """A foreign hook that shifts row 1 only breaks that sample's identities: the error names the unit, and
    the whole dataset is withheld."""

    def shift_row_1(module, args):
        x = args[0].clone()
        x[1] += 0.01
        return (x,)

    ids, mask = padded([tiny_ids(6)[0], tiny_ids(6, seed=2)[0]], "right")
    handle = tiny.model.layers[1].post_attention_layernorm.register_forward_pre_hook(shift_row_1, prepend=True)
    try:
        with pytest.raises(zkllm_hf.ContractViolation) as info:
            capture_batch(tiny, tmp_path / "bad", ids, mask)
    finally:
        handle.remove()
    assert {f.unit for f in info.value.failures} == {"sample-1"}
    assert "sample-1 layer 1 post_attn_residual" in str(info.value)
    assert not (tmp_path / "bad").exists() and no_staging_left(tmp_path)


def test_four_d_mask_on_a_batch_is_refused(tiny, tmp_path):
    ids = torch.cat([tiny_ids(4), tiny_ids(4, seed=2)])
    mask = torch.ones(2, 1, 4, 4)
    with pytest.raises(zkllm_hf.CaptureError, match=r"attention_mask has shape \(2, 1, 4, 4\).*2-D padding mask"):
        capture_batch(tiny, tmp_path / "m", ids, mask)
    assert not (tmp_path / "m").exists() and no_staging_left(tmp_path)


@pytest.fixture
def dataset(tiny, tmp_path):
    ids, mask = padded([tiny_ids(6)[0], tiny_ids(4, seed=2)[0]], "left")
    capture_batch(tiny, tmp_path / "ds", ids, mask)
    return tmp_path / "ds"


def failed(path: Path, model=None) -> set[tuple[str, str | None]]:
    return {(f.check, f.unit) for f in zkllm_hf.validate(path, model=model).failures}


def test_dataset_tamper_cases(tiny, dataset):
    assert zkllm_hf.validate(dataset, model=tiny).ok
    # a changed byte in a unit's file: that unit's integrity, named
    target = dataset / "sample-1" / POINTS_BY_NAME["mlp_output"].file_name(2)
    data = bytearray(target.read_bytes())
    data[0] ^= 1
    target.write_bytes(bytes(data))
    assert ("integrity", "sample-1") in failed(dataset)
    data[0] ^= 1  # put it back
    target.write_bytes(bytes(data))
    assert zkllm_hf.validate(dataset).ok
    # a unit's manifest swapped for another's: the index no longer agrees
    saved = (dataset / "sample-1" / "manifest.arrow").read_bytes()
    shutil.copy(dataset / "sample-0" / "manifest.arrow", dataset / "sample-1" / "manifest.arrow")
    assert ("dataset_index", ".") in failed(dataset)
    (dataset / "sample-1" / "manifest.arrow").write_bytes(saved)
    # a stray folder, and a missing unit
    (dataset / "sample-7").mkdir()
    assert ("dataset_index", ".") in failed(dataset)
    os.rmdir(dataset / "sample-7")
    shutil.rmtree(dataset / "sample-0")
    report = zkllm_hf.validate(dataset)
    assert not report.ok and any(f.unit == "sample-0" and f.check == "manifest" for f in report.failures)


def test_load_capture_on_a_dataset(dataset):
    ds = zkllm_hf.load_capture(dataset)
    assert sorted(ds.units) == [(0, 0), (1, 0)] and ds.mode == "forward"
    assert ds.metadata["kind"] == "dataset" and [u["folder"] for u in ds.metadata["units"]] == ["sample-0", "sample-1"]
    files = set(ds.manifest.column("file").to_pylist())
    assert files == {p.relative_to(dataset).as_posix() for p in dataset.glob("sample-*/*.bin")}
    with pytest.raises(KeyError, match="no unit for sample 5, step 0"):
        ds.unit(5)
    assert ds.unit(1).codes(0, "block_input").shape == (4, TINY["hidden_size"])
