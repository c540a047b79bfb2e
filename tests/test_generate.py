"""CaptureLogitsProcessor on tiny seeded models: steps, prefill and full captures of one generate() call,
checked against generate()'s own hidden states, plain captures and hand-computed unit lists."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, count_hooks, make_tiny, read_zkllm, tiny_ids
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import zkllm_hf
from zkllm_hf.manifest import read_manifest
from zkllm_hf.points import FILES_PER_LAYER, POINTS, POINTS_BY_NAME

K = 16
LAYERS = TINY["num_hidden_layers"]
HIDDEN = TINY["hidden_size"]
PAD = 0
EOS = 2  # the tiny config's default eos_token_id


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's spinning
    threads make each small matmul hundreds of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def q(x: torch.Tensor) -> np.ndarray:
    """round(x * 2**16), half to even, as int32: computed here from the float tensor, not by zkllm_hf."""
    return torch.round(x.double() * 2**K).to(torch.int32).numpy()


def left_padded(lengths=(7, 5), seeds=(1, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different real lengths, left-padded with PAD, and their 2-D attention mask."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (n, seed) in enumerate(zip(lengths, seeds)):
        ids[i, width - n :], mask[i, width - n :] = tiny_ids(n, seed)[0], 1
    return ids, mask


def generate(model, proc=None, **kw):
    procs = LogitsProcessorList([proc] if proc is not None else [])
    with torch.no_grad():
        return model.generate(logits_processor=procs, **kw)


def no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".zkllm-" in p.name]


def nothing_emitted(out: Path) -> bool:
    return not out.exists() and no_staging_left(out.parent)


def warm_hook_count(model) -> int:
    """Hooks on the model once transformers installed its own (on the first forward)."""
    with torch.no_grad():
        model(input_ids=tiny_ids(3))
    return count_hooks(model)


def hooks_gone(model, before: int) -> bool:
    return count_hooks(model) == before and "_get_logits_processor" not in vars(model)


def generated(seq_row: torch.Tensor, prompt_len: int, eos: set[int]) -> list[int]:
    """A row's generated tokens up to and including the first EOS."""
    gen = seq_row[prompt_len:].tolist()
    for j, t in enumerate(gen):
        if t in eos:
            return gen[: j + 1]
    return gen


def expected_steps(seq_row: torch.Tensor, prompt_len: int, eos: set[int]) -> list[int]:
    """Steps 0..K: K is the index of the first EOS among the generated tokens (the forward consuming it is not
    a step), else N - 1 (the last generated token is never forwarded)."""
    gen = seq_row[prompt_len:].tolist()
    last = next((j for j, t in enumerate(gen) if t in eos), len(gen) - 1)
    return list(range(last + 1))


def unit_steps(ds, sample: int) -> list[int]:
    return sorted(k for (s, k) in ds.units if s == sample)


def same_bytes(a, b) -> bool:
    """Two captures (units) hold the same files, byte for byte."""
    files_a = sorted(r["file"] for r in a.manifest.to_pylist())
    files_b = sorted(r["file"] for r in b.manifest.to_pylist())
    return files_a == files_b and all((a.path / f).read_bytes() == (b.path / f).read_bytes() for f in files_a)


# --------------------------------------------------------------------------------------------------
# 1. steps against generate()'s own hidden states, bit for bit


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "nocache"])
def test_steps_match_hf_hidden_states_bit_for_bit(tiny, tmp_path, use_cache, do_sample):
    ids, mask = left_padded()
    prompt_len = ids.shape[1]
    out_dir = tmp_path / "steps"
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode="steps")
    torch.manual_seed(1234)
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=do_sample,
                   use_cache=use_cache, pad_token_id=PAD, eos_token_id=EOS, output_hidden_states=True,
                   return_dict_in_generate=True)
    res = proc.finalize(out)
    hs = out.hidden_states
    ds = zkllm_hf.load_capture(out_dir)
    assert isinstance(ds, zkllm_hf.CaptureDataset) and ds.mode == "steps"
    expected = {(r, k) for r in range(2) for k in expected_steps(out.sequences[r], prompt_len, {EOS})}
    assert set(ds.units) == expected
    assert {(u["sample"], u["step"]) for u in res.units} == expected
    no_eos = [r for r in range(2) if EOS not in out.sequences[r, prompt_len:].tolist()]
    assert no_eos  # at least one row runs to max_new_tokens, so the count check below runs
    for r in no_eos:
        assert unit_steps(ds, r) == list(range(len(hs)))
    n_real = mask.sum(dim=1).tolist()
    for (r, k), unit in ds.units.items():
        real = mask[r].bool()
        if k == 0:
            cols, tokens = real, out.sequences[r, :prompt_len][real].tolist()
            positions, phase, counts = list(range(n_real[r])), "prefill", (n_real[r], 0)
        else:
            cols, tokens = slice(-1, None), [int(out.sequences[r, prompt_len + k - 1])]
            positions, phase, counts = [n_real[r] + k - 1], "decode", (0, 1)
        meta = unit.metadata
        assert meta["tokens"]["input_ids"] == tokens, (r, k)
        assert meta["tokens"]["position_ids"] == positions, (r, k)
        assert (meta["tokens"]["prompt_token_count"], meta["tokens"]["generated_token_count"]) == counts
        assert (meta["unit"]["sample"], meta["unit"]["step"], meta["unit"]["phase"]) == (r, k, phase)
        assert unit.seq_len == len(tokens)
        if not use_cache and k:  # every forward recomputes the whole sequence: HF's hidden states are all of it
            assert hs[k][0].shape[1] == prompt_len + k
        for layer in range(LAYERS):
            want = q(hs[k][layer][r, cols])
            assert np.array_equal(np.asarray(unit.codes(layer, "block_input")), want), (r, k, layer)
            if layer:
                assert np.array_equal(np.asarray(unit.codes(layer - 1, "block_output")), want), (r, k, layer)
    assert zkllm_hf.validate(out_dir, model=tiny).ok
    assert zkllm_hf.validate(ds.unit(no_eos[0], 2).path, model=tiny).ok  # a unit on its own
    assert no_staging_left(tmp_path)


# --------------------------------------------------------------------------------------------------
# 2. EOS ends a sample's steps; full mode cuts at the first EOS


def eos_setup(model):
    """An EOS id that row 0 emits as its 2nd generated token and row 1 never emits (greedy)."""
    ids, mask = left_padded()
    plain = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                     pad_token_id=PAD, eos_token_id=EOS)
    gen0, gen1 = plain[0, ids.shape[1] :].tolist(), plain[1, ids.shape[1] :].tolist()
    eos = gen0[1]
    assert eos != gen0[0] and eos not in gen1 and eos != PAD  # the seeds make this case; check it holds
    return ids, mask, eos


def test_eos_stops_a_samples_steps(tiny, tmp_path):
    ids, mask, eos = eos_setup(tiny)
    prompt_len = ids.shape[1]
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "steps", mode="steps")
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                   pad_token_id=PAD, eos_token_id=eos, output_hidden_states=True, return_dict_in_generate=True)
    proc.finalize(out)
    seqs = out.sequences
    assert seqs[0, prompt_len + 1] == eos and eos not in seqs[1, prompt_len:].tolist()
    ds = zkllm_hf.load_capture(tmp_path / "steps")
    assert unit_steps(ds, 0) == expected_steps(seqs[0], prompt_len, {eos}) == [0, 1]
    assert unit_steps(ds, 1) == expected_steps(seqs[1], prompt_len, {eos}) == list(range(len(out.hidden_states)))
    assert len(out.hidden_states) == seqs.shape[1] - prompt_len == 5  # one forward per generated token
    assert ds.unit(1, 4).metadata["tokens"]["input_ids"] == [int(seqs[1, -2])]  # the last token is never forwarded
    assert ds.metadata["generation"]["eos_token_id"] == [eos]
    assert zkllm_hf.validate(tmp_path / "steps", model=tiny).ok

    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "full", mode="full")
    again = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                     pad_token_id=PAD, eos_token_id=eos)
    res = proc.finalize(again)
    assert torch.equal(again, seqs)
    assert [(u["folder"], u["phase"]) for u in res.units] == [("sample-0", "full"), ("sample-1", "full")]
    full = zkllm_hf.load_capture(tmp_path / "full")
    n_real = mask.sum(dim=1).tolist()
    tokens0 = full.unit(0).metadata["tokens"]
    assert tokens0["input_ids"][-1] == eos
    assert tokens0["seq_len"] == full.unit(0).seq_len == n_real[0] + 2  # prompt + (first EOS index 1) + 1
    assert tokens0["input_ids"] == ids[0, mask[0].bool()].tolist() + seqs[0, prompt_len : prompt_len + 2].tolist()
    assert (tokens0["prompt_token_count"], tokens0["generated_token_count"]) == (n_real[0], 2)
    tokens1 = full.unit(1).metadata["tokens"]
    assert tokens1["input_ids"] == ids[1, mask[1].bool()].tolist() + seqs[1, prompt_len:].tolist()
    assert zkllm_hf.validate(tmp_path / "full", model=tiny).ok


# --------------------------------------------------------------------------------------------------
# 3. num_return_sequences: the prompt's rows are computed once


def test_num_return_sequences_share_step_0_by_hard_links(tiny, tmp_path):
    ids, mask = left_padded()
    prompt_len = ids.shape[1]
    out_dir = tmp_path / "steps"
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode="steps")
    torch.manual_seed(7)
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True,
                   num_return_sequences=2, pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True)
    proc.finalize(out)
    seqs = out.sequences
    assert seqs.shape[0] == 4
    ds = zkllm_hf.load_capture(out_dir)
    for r in range(4):
        assert unit_steps(ds, r) == expected_steps(seqs[r], prompt_len, {EOS})
        prompt = r // 2
        assert ds.unit(r, 0).metadata["tokens"]["input_ids"] == ids[prompt, mask[prompt].bool()].tolist()
        assert ds.unit(r, 0).metadata["unit"]["sample"] == r
        for k in unit_steps(ds, r)[1:]:
            assert ds.unit(r, k).metadata["tokens"]["input_ids"] == [int(seqs[r, prompt_len + k - 1])]
    assert zkllm_hf.validate(out_dir / "sample-1" / "step-0", model=tiny).ok  # a linked unit on its own
    for first, sibling in ((0, 1), (2, 3)):
        a, b = out_dir / f"sample-{first}" / "step-0", out_dir / f"sample-{sibling}" / "step-0"
        bins = sorted(p.name for p in a.glob("*.bin"))
        assert bins == sorted(p.name for p in b.glob("*.bin")) and len(bins) == LAYERS * FILES_PER_LAYER
        for name in bins:
            assert os.stat(a / name).st_ino == os.stat(b / name).st_ino, name
        assert os.stat(a / "manifest.arrow").st_ino != os.stat(b / "manifest.arrow").st_ino
        assert read_manifest(b / "manifest.arrow")[1]["unit"]["sample"] == sibling
    a, c = out_dir / "sample-0" / "step-0", out_dir / "sample-2" / "step-0"  # different prompts: different files
    assert os.stat(a / "layer-0-block-input.bin").st_ino != os.stat(c / "layer-0-block-input.bin").st_ino
    assert zkllm_hf.validate(out_dir, model=tiny).ok

    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "prefill", mode="prefill")
    torch.manual_seed(7)
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True,
                   num_return_sequences=3, pad_token_id=PAD, eos_token_id=EOS)
    res = proc.finalize(out)
    assert out.shape[0] == 6
    n_real = mask.sum(dim=1).tolist()
    assert res.units == [{"folder": f"sample-{p}", "sample": p, "step": 0, "phase": "prefill", "seq_len": n_real[p]}
                         for p in range(2)]
    pre = zkllm_hf.load_capture(tmp_path / "prefill")
    for p in range(2):
        assert pre.unit(p).metadata["tokens"]["input_ids"] == ids[p, mask[p].bool()].tolist()
        # the prompt's forward is the same whether 2 or 3 rows per prompt: step 0 of the steps capture
        assert same_bytes(pre.unit(p), ds.unit(2 * p, 0))
    assert zkllm_hf.validate(tmp_path / "prefill", model=tiny).ok


# --------------------------------------------------------------------------------------------------
# 4. full mode against plain capture() of the same tokens; pad_to


def test_full_equals_plain_captures_and_pads(tiny, tmp_path):
    ids, mask = left_padded()
    prompt_len = ids.shape[1]
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "full", mode="full")
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                   pad_token_id=PAD, eos_token_id=EOS)
    proc.finalize(out)
    full = zkllm_hf.load_capture(tmp_path / "full")
    assert sorted(full.units) == [(0, 0), (1, 0)]
    seqs = {}
    for r in range(2):
        seq = ids[r, mask[r].bool()].tolist() + generated(out[r], prompt_len, {EOS})
        seqs[r] = seq
        unit = full.unit(r)
        assert unit.metadata["tokens"]["input_ids"] == seq and unit.seq_len == len(seq)
        assert unit.metadata["unit"]["phase"] == "full"
        with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / f"plain{r}"):
            hs = tiny(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        plain = zkllm_hf.load_capture(tmp_path / f"plain{r}")
        assert same_bytes(plain, unit), r
        for layer in range(LAYERS):  # and both are that forward's hidden states, read the way zkLLM reads them
            path = unit.path / POINTS_BY_NAME["block_input"].file_name(layer)
            assert np.array_equal(read_zkllm(path, len(seq), HIDDEN), q(hs[layer][0])), (r, layer)
    assert zkllm_hf.validate(tmp_path / "full", model=tiny).ok

    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "padded", mode="full", pad_to=32)
    again = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                     pad_token_id=PAD, eos_token_id=EOS)
    res = proc.finalize(again)
    assert torch.equal(again, out)
    assert [u["seq_len"] for u in res.units] == [32, 32]
    padded = zkllm_hf.load_capture(tmp_path / "padded")
    for r in range(2):
        unit, n_prompt = padded.unit(r), int(mask[r].sum())
        tokens = unit.metadata["tokens"]
        assert tokens["seq_len"] == unit.seq_len == 32
        assert tokens["input_ids"] == seqs[r] + [PAD] * (32 - len(seqs[r]))
        assert (tokens["prompt_token_count"], tokens["generated_token_count"]) == (n_prompt, len(seqs[r]) - n_prompt)
        assert tokens["pad_token_id"] == PAD
        for layer in range(LAYERS):
            assert unit.codes(layer, "block_input").shape == (32, HIDDEN)
        # the embeddings of the real tokens do not depend on what follows them
        assert np.array_equal(unit.codes(0, "block_input")[: len(seqs[r])], full.unit(r).codes(0, "block_input"))
    assert zkllm_hf.validate(tmp_path / "padded", model=tiny).ok

    before = count_hooks(tiny)
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "short", mode="full", pad_to=len(seqs[0]) - 1)
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                   pad_token_id=PAD, eos_token_id=EOS)
    with pytest.raises(zkllm_hf.CaptureError, match="pad_to"):
        proc.finalize(out)
    assert nothing_emitted(tmp_path / "short") and hooks_gone(tiny, before)


# --------------------------------------------------------------------------------------------------
# 5. steps (KV cache, padded batch) against full (one unpadded forward): float32 rounding apart


def test_steps_agree_with_full_within_float32_rounding(tiny, tmp_path):
    """Tolerance per element: max(4 LSB, 1e-5 * the row's largest |code|). float32 has 24 bits; the cached,
    batched and unpadded kernels round differently by a few ulps of the row's scale, which at 2**16 is about
    6e-8 * 2**16 * |x| per ulp, far under 1e-5 relative; 4 LSB covers rows of small values."""
    ids, mask = left_padded()
    runs = {}
    for mode in ("steps", "full"):
        proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / mode, mode=mode)
        runs[mode] = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              pad_token_id=PAD, eos_token_id=EOS)
        proc.finalize(runs[mode])
    assert torch.equal(runs["steps"], runs["full"])
    steps, full = zkllm_hf.load_capture(tmp_path / "steps"), zkllm_hf.load_capture(tmp_path / "full")
    for r in range(2):
        k_all = unit_steps(steps, r)
        assert full.unit(r).seq_len == sum(steps.unit(r, k).seq_len for k in k_all) + 1  # full adds the last token
        for layer in range(LAYERS):
            for point in POINTS:
                chained = np.concatenate([np.asarray(steps.unit(r, k).codes(layer, point.name)) for k in k_all])
                whole = np.asarray(full.unit(r).codes(layer, point.name))
                assert whole.shape[0] == chained.shape[0] + 1
                whole = whole[:-1].astype(np.int64)
                tol = np.maximum(4.0, 1e-5 * np.abs(whole).max(axis=1, keepdims=True))
                dev = np.abs(chained.astype(np.int64) - whole)
                assert (dev <= tol).all(), (r, layer, point.name, dev.max())


# --------------------------------------------------------------------------------------------------
# 6. chunked prefill: the prompt's chunks make one step-0 unit


def test_chunked_prefill_makes_one_step_0(tiny, tmp_path):
    prompt = tiny_ids(8, seed=5)
    runs = {}
    for name, extra in (("chunked", {"prefill_chunk_size": 3}), ("whole", {})):
        proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / name, mode="steps")
        runs[name] = generate(tiny, proc, input_ids=prompt, max_new_tokens=4, do_sample=False, eos_token_id=EOS,
                              pad_token_id=PAD, output_hidden_states=True, return_dict_in_generate=True, **extra)
        proc.finalize(runs[name])
    out = runs["chunked"]
    assert torch.equal(out.sequences, runs["whole"].sequences)
    assert out.hidden_states[0][0].shape[1] == 2  # HF keeps only the last chunk (8 = 3 + 3 + 2)
    chunked, whole = zkllm_hf.load_capture(tmp_path / "chunked"), zkllm_hf.load_capture(tmp_path / "whole")
    step0 = chunked.unit(0, 0)
    assert step0.seq_len == 8 and step0.metadata["tokens"]["input_ids"] == prompt[0].tolist()
    assert step0.metadata["tokens"]["position_ids"] == list(range(8))
    assert sorted(chunked.units) == sorted(whole.units)
    for layer in range(LAYERS):
        want = q(out.hidden_states[0][layer][0])
        assert np.array_equal(np.asarray(step0.codes(layer, "block_input"))[-2:], want)
        if layer:
            assert np.array_equal(np.asarray(step0.codes(layer - 1, "block_output"))[-2:], want)
        for point in POINTS:
            a = np.asarray(step0.codes(layer, point.name)).astype(np.int64)
            b = np.asarray(whole.unit(0, 0).codes(layer, point.name)).astype(np.int64)
            tol = np.maximum(4.0, 1e-5 * np.abs(b).max(axis=1, keepdims=True))
            assert (np.abs(a - b) <= tol).all(), (layer, point.name)
        for k in range(1, len(out.hidden_states)):
            assert np.array_equal(np.asarray(chunked.unit(0, k).codes(layer, "block_input")),
                                  q(out.hidden_states[k][layer][0]))
    assert np.array_equal(step0.codes(0, "block_input"), whole.unit(0, 0).codes(0, "block_input"))  # embeddings
    assert zkllm_hf.validate(tmp_path / "chunked", model=tiny).ok
    assert zkllm_hf.validate(tmp_path / "chunked" / "sample-0" / "step-0", model=tiny).ok


# --------------------------------------------------------------------------------------------------
# 7. a forward no processor call followed (synced_gpus) is dropped


def test_forward_after_the_last_step_is_dropped(tiny, tmp_path):
    ids, mask = left_padded()
    runs = {}
    for name in ("extra", "plain"):
        proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / name, mode="steps")
        out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                       pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True)
        if name == "extra":
            cache = out.cache
            assert cache is not None and cache.get_seq_length() == out.sequences.shape[1] - 1
            full_mask = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - ids.shape[1])], dim=1)
            with torch.no_grad():
                tiny(input_ids=out.sequences[:, -1:], attention_mask=full_mask.long(), cache=cache, use_cache=True)
        runs[name] = (out.sequences, proc.finalize(out))
    assert torch.equal(runs["extra"][0], runs["plain"][0])
    assert runs["extra"][1].units == runs["plain"][1].units
    n = runs["plain"][0].shape[1] - ids.shape[1]
    for r in range(2):
        assert not (tmp_path / "extra" / f"sample-{r}" / f"step-{n}").exists()
    a, b = zkllm_hf.load_capture(tmp_path / "extra"), zkllm_hf.load_capture(tmp_path / "plain")
    assert [u["folder"] for u in a.metadata["units"]] == [u["folder"] for u in b.metadata["units"]]
    assert a.manifest.column("blake3").to_pylist() == b.manifest.column("blake3").to_pylist()
    assert a.metadata["generation"]["steps"] == b.metadata["generation"]["steps"]
    assert zkllm_hf.validate(tmp_path / "extra", model=tiny).ok


# --------------------------------------------------------------------------------------------------
# 8. refusals: nothing emitted, hooks removed


def test_steps_with_beam_search_is_refused_before_any_forward(tiny, tmp_path):
    before = warm_hook_count(tiny)
    out_dir = tmp_path / "beams"
    forwards = []
    with pytest.raises(zkllm_hf.CaptureError, match="beam search"):
        with zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode="steps") as proc:
            handle = tiny.register_forward_pre_hook(lambda m, a: forwards.append(1))
            try:
                generate(tiny, proc, input_ids=tiny_ids(6), max_new_tokens=3, num_beams=2, pad_token_id=PAD)
            finally:
                handle.remove()
    assert forwards == []
    assert nothing_emitted(out_dir) and hooks_gone(tiny, before)


def test_second_generate_is_refused(tiny, tmp_path):
    before = warm_hook_count(tiny)
    out_dir = tmp_path / "twice"
    with zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode="steps") as proc:
        out = generate(tiny, proc, input_ids=tiny_ids(6), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        with pytest.raises(zkllm_hf.CaptureError, match="already captured"):
            generate(tiny, proc, input_ids=tiny_ids(6), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        with pytest.raises(zkllm_hf.CaptureError):
            proc.finalize(out)
    assert nothing_emitted(out_dir) and hooks_gone(tiny, before)


@pytest.mark.parametrize("mode", ["steps", "prefill"])
def test_assisted_decoding_is_refused(tiny, tmp_path, mode):
    before = warm_hook_count(tiny)
    out_dir = tmp_path / "assisted"
    with pytest.raises(zkllm_hf.CaptureError, match="assist"):
        with zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode=mode) as proc:
            generate(tiny, proc, input_ids=tiny_ids(6), max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                     assistant_model=make_tiny(seed=1))
    assert nothing_emitted(out_dir) and hooks_gone(tiny, before)


def test_prompt_lookup_decoding_is_refused_in_steps(tiny, tmp_path):
    before = warm_hook_count(tiny)
    with pytest.raises(zkllm_hf.CaptureError, match="prompt-lookup"):
        with zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "lookup", mode="steps") as proc:
            generate(tiny, proc, input_ids=tiny_ids(8), max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                     prompt_lookup_num_tokens=2)
    assert nothing_emitted(tmp_path / "lookup") and hooks_gone(tiny, before)


def test_assisted_decoding_in_full_mode_equals_a_plain_capture(tiny, tmp_path):
    """full mode ignores how the tokens were chosen: its forward is the returned sequence's own."""
    prompt = tiny_ids(6)
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "full", mode="full")
    out = generate(tiny, proc, input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                   eos_token_id=EOS, assistant_model=make_tiny(seed=1))
    proc.finalize(out)
    seq = prompt[0].tolist() + generated(out[0], prompt.shape[1], {EOS})
    with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / "plain"):
        tiny(input_ids=torch.tensor([seq]))
    unit = zkllm_hf.load_capture(tmp_path / "full")
    assert unit.metadata["tokens"]["input_ids"] == seq
    assert same_bytes(zkllm_hf.load_capture(tmp_path / "plain"), unit)


def test_finalize_without_generate_is_refused(tiny, tmp_path):
    before = warm_hook_count(tiny)
    out_dir = tmp_path / "never"
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode="prefill")
    out = generate(tiny, None, input_ids=tiny_ids(6), max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    with pytest.raises(zkllm_hf.CaptureError, match="never called this processor"):
        proc.finalize(out)
    assert nothing_emitted(out_dir) and hooks_gone(tiny, before)


@pytest.mark.parametrize("mode", ["prefill", "steps"])
def test_pad_to_outside_full_is_refused_at_construction(tiny, tmp_path, mode):
    before = warm_hook_count(tiny)
    with pytest.raises(ValueError, match="pad_to"):
        zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "x", mode=mode, pad_to=16)
    assert nothing_emitted(tmp_path / "x") and hooks_gone(tiny, before)


class Boom(StoppingCriteria):
    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("mode", ["steps", "prefill", "full"])
def test_exception_inside_generate_emits_nothing(tiny, tmp_path, mode):
    before = warm_hook_count(tiny)
    out_dir = tmp_path / "boom"
    with pytest.raises(RuntimeError, match="boom"):
        with zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode=mode) as proc:
            generate(tiny, proc, input_ids=tiny_ids(6), max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                     stopping_criteria=StoppingCriteriaList([Boom(after=2)]))
    assert nothing_emitted(out_dir) and hooks_gone(tiny, before)

    with pytest.raises(RuntimeError, match="user code"):  # after generate, before finalize
        with zkllm_hf.CaptureLogitsProcessor(tiny, out_dir, mode=mode) as proc:
            generate(tiny, proc, input_ids=tiny_ids(6), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
            raise RuntimeError("user code")
    assert nothing_emitted(out_dir) and hooks_gone(tiny, before)


def test_close_removes_every_hook_and_the_probe(tiny, tmp_path):
    before = warm_hook_count(tiny)
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "x", mode="steps")
    assert count_hooks(tiny) > before and "_get_logits_processor" in vars(tiny)
    proc.close()
    proc.close()  # idempotent
    assert hooks_gone(tiny, before) and nothing_emitted(tmp_path / "x")
    # generate after close: the model is untouched, and the closed processor refuses to capture
    with pytest.raises(zkllm_hf.CaptureError, match="closed"):
        proc.finalize(generate(tiny, None, input_ids=tiny_ids(6), max_new_tokens=2, pad_token_id=PAD))
    assert nothing_emitted(tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# 9. disable_compile is forced and recorded; the generation config is recorded as passed


def test_generation_metadata_and_forced_disable_compile(tiny, tmp_path, monkeypatch):
    ids, mask = left_padded()
    seen = []  # disable_compile of the config each decode step's compile decision reads
    decide = tiny._valid_auto_compile_criteria
    monkeypatch.setattr(tiny, "_valid_auto_compile_criteria",
                        lambda kwargs, config: seen.append(config.disable_compile) or decide(kwargs, config))
    user_config = GenerationConfig(do_sample=True, num_return_sequences=2, max_new_tokens=3, top_p=0.9,
                                   temperature=0.7, eos_token_id=[5, 7], pad_token_id=PAD)
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "forced", mode="prefill")
    torch.manual_seed(4321)
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, generation_config=user_config)
    proc.finalize(out)
    assert seen and all(v is True for v in seen)  # generate really ran with compilation disabled
    seen.clear()
    generate(tiny, None, input_ids=ids, attention_mask=mask, generation_config=user_config)
    assert seen and not any(seen)  # and a later generate() without the processor is left alone
    assert not user_config.disable_compile and not tiny.generation_config.disable_compile  # neither is mutated
    gen = zkllm_hf.load_capture(tmp_path / "forced").metadata["generation"]
    assert gen["disable_compile"] is True and gen["disable_compile_forced"] is True
    assert (gen["do_sample"], gen["num_return_sequences"], gen["num_beams"]) == (True, 2, 1)
    assert (gen["top_p"], gen["temperature"], gen["max_new_tokens"]) == (0.9, 0.7, 3)
    assert gen["eos_token_id"] == [5, 7] and gen["pad_token_id"] == PAD
    assert gen["seed"] == 4321 and gen["prompt_length"] == ids.shape[1] and gen["rows"] == 4

    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "asked", mode="prefill")
    out = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                   disable_compile=True, pad_token_id=PAD, eos_token_id=EOS)
    proc.finalize(out)
    gen = zkllm_hf.load_capture(tmp_path / "asked").metadata["generation"]
    assert gen["disable_compile"] is True and gen["disable_compile_forced"] is False
    assert gen["do_sample"] is False and "seed" not in gen and gen["eos_token_id"] == [EOS]


# --------------------------------------------------------------------------------------------------
# 10. beam search in full and prefill modes


def test_beam_search_full_and_prefill(tiny, tmp_path):
    ids, mask = left_padded()
    prompt_len = ids.shape[1]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, num_return_sequences=2,
              do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "full", mode="full")
    out = generate(tiny, proc, **kw)
    res = proc.finalize(out)
    assert out.shape[0] == 4
    assert [u["folder"] for u in res.units] == [f"sample-{r}" for r in range(4)]
    full = zkllm_hf.load_capture(tmp_path / "full")
    for r in range(4):
        prompt = r // 2
        seq = ids[prompt, mask[prompt].bool()].tolist() + generated(out[r], prompt_len, {EOS})
        assert full.unit(r).metadata["tokens"]["input_ids"] == seq
        assert full.unit(r).metadata["tokens"]["prompt_token_count"] == int(mask[prompt].sum())
    assert zkllm_hf.validate(tmp_path / "full", model=tiny).ok  # every unit and the index

    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "prefill", mode="prefill")
    again = generate(tiny, proc, **kw)
    res = proc.finalize(again)
    assert torch.equal(again, out)
    n_real = mask.sum(dim=1).tolist()
    assert res.units == [{"folder": f"sample-{p}", "sample": p, "step": 0, "phase": "prefill", "seq_len": n_real[p]}
                         for p in range(2)]
    pre = zkllm_hf.load_capture(tmp_path / "prefill")
    for p in range(2):
        assert pre.unit(p).metadata["tokens"]["input_ids"] == ids[p, mask[p].bool()].tolist()
        assert pre.unit(p).metadata["unit"]["row"] == 2 * p
    assert zkllm_hf.validate(tmp_path / "prefill", model=tiny).ok


# --------------------------------------------------------------------------------------------------
# Several processors on one model


def test_two_processors_in_one_generate(tiny, tmp_path):
    """A steps and a full capture of the same generate() call; the full forwards run in finalize() while the
    steps processor's hooks are still on, and must not leak into its capture."""
    ids, mask = left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
              eos_token_id=EOS)
    solo = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "solo", mode="steps")
    solo.finalize(generate(tiny, solo, **kw))
    before = warm_hook_count(tiny)
    steps = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "steps", mode="steps")
    full = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "full", mode="full")
    with torch.no_grad():
        out = tiny.generate(logits_processor=LogitsProcessorList([steps, full]), **kw)
    full.finalize(out)  # last built, first finalized
    steps.finalize(out)
    assert hooks_gone(tiny, before)
    a, b = zkllm_hf.load_capture(tmp_path / "steps"), zkllm_hf.load_capture(tmp_path / "solo")
    assert sorted(a.units) == sorted(b.units)
    assert a.manifest.column("blake3").to_pylist() == b.manifest.column("blake3").to_pylist()
    assert sorted(zkllm_hf.load_capture(tmp_path / "full").units) == [(0, 0), (1, 0)]
    assert zkllm_hf.validate(tmp_path / "full", model=tiny).ok and zkllm_hf.validate(tmp_path / "steps").ok


def test_closing_processors_in_build_order_removes_every_probe(tiny, tmp_path):
    before = warm_hook_count(tiny)
    first = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "a", mode="steps")
    second = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "b", mode="full")
    first.close()
    second.close()
    assert count_hooks(tiny) == before
    assert "_get_logits_processor" not in vars(tiny), vars(tiny)["_get_logits_processor"]


# --------------------------------------------------------------------------------------------------
# Found while writing these tests: each was a bug, fixed since


@pytest.mark.parametrize("mode", ["steps", "prefill"])
def test_chunked_prefill_with_a_chunk_of_padding_only(tiny, tmp_path, mode):
    ids, mask = left_padded((7, 4))  # row 1: 3 pads, exactly the first chunk of 3
    runs = {}
    for name, extra in (("chunked", {"prefill_chunk_size": 3}), ("whole", {})):
        proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / name, mode=mode)
        runs[name] = generate(tiny, proc, input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              pad_token_id=PAD, eos_token_id=EOS, **extra)
        try:
            proc.finalize(runs[name])
        finally:
            assert tmp_path.joinpath(name).exists() or nothing_emitted(tmp_path / name)
    chunked, whole = zkllm_hf.load_capture(tmp_path / "chunked"), zkllm_hf.load_capture(tmp_path / "whole")
    assert sorted(chunked.units) == sorted(whole.units)
    for r in range(2):
        assert chunked.unit(r, 0).metadata["tokens"]["input_ids"] == ids[r, mask[r].bool()].tolist()
        assert np.array_equal(chunked.unit(r, 0).codes(0, "block_input"), whole.unit(r, 0).codes(0, "block_input"))
    assert zkllm_hf.validate(tmp_path / "chunked", model=tiny).ok


def test_inputs_embeds_in_steps_and_prefill_is_refused(tiny, tmp_path):
    """generate(inputs_embeds=...) returns only the generated tokens: refused, nothing emitted."""
    before = warm_hook_count(tiny)
    embeds = tiny.get_input_embeddings()(tiny_ids(6)).detach()
    for mode in ("steps", "prefill"):
        with pytest.raises(zkllm_hf.CaptureError):
            with zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / mode, mode=mode) as proc:
                out = generate(tiny, proc, inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
                proc.finalize(out)
        assert nothing_emitted(tmp_path / mode) and hooks_gone(tiny, before)


def test_full_mode_with_inputs_embeds_does_not_drop_the_prompt(tiny, tmp_path):
    prompt = tiny_ids(6)
    embeds = tiny.get_input_embeddings()(prompt).detach()
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "full", mode="full")
    out = generate(tiny, proc, inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                   eos_token_id=EOS)
    try:
        proc.finalize(out)
    except zkllm_hf.CaptureError:  # refusing is a fix too
        assert nothing_emitted(tmp_path / "full")
        return
    unit = zkllm_hf.load_capture(tmp_path / "full")
    assert unit.metadata["tokens"]["prompt_token_count"] == 6
    assert unit.seq_len == 6 + out.shape[1]


def test_one_prompt_capture_records_the_generation_config(tiny, tmp_path):
    proc = zkllm_hf.CaptureLogitsProcessor(tiny, tmp_path / "one", mode="prefill")
    torch.manual_seed(99)
    out = generate(tiny, proc, input_ids=tiny_ids(6), max_new_tokens=2, do_sample=True, pad_token_id=PAD,
                   eos_token_id=EOS)
    res = proc.finalize(out)
    assert not res.is_dataset
    meta = zkllm_hf.load_capture(tmp_path / "one").metadata
    assert "generation" in meta, sorted(meta)
    assert meta["generation"]["seed"] == 99 and meta["generation"]["disable_compile_forced"] is True
