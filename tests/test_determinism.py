"""Determinism you can state: each unit records the runtime that made its bytes, and capture-dataset fixes
torch's intra-op thread count per unit, so K ranks and one process write the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_tiny, tiny_ids
from test_capture_dataset import files, free_port, write_jsonl

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """A small Llama wide enough (hidden 256) that torch's CPU kernels give other float32 bits with 2 intra-op
    threads than with 1 (the 64-wide tiny model does not show it), with the word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("wide") / "model"
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    make_tiny(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


PROMPTS = [{"text": "the quick brown fox jumps over the lazy dog"}, {"id": 7, "text": "zero knowledge proofs a dog"}]
MODES = {"forward": [], "steps": ["--generate", "3", "--mode", "steps"]}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_equal_a_default_single_process_byte_for_byte(mode, wide_dir, tmp_path):
    """Defect: capture-dataset's bytes depended on the rank count. torch's intra-op thread count changes
    float32 results, accelerate gives each rank one thread, and a single process kept its default (2 here),
    so 2 ranks and 1 process wrote different .bin files (the issue measured 2 in forward mode and 5 in steps
    mode on SmolLM2). Now every unit runs with a fixed thread count (--threads, default 1), whoever calls."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS, blank_after=None)
    caller = torch.get_num_threads()
    torch.set_num_threads(2)  # a caller that sets nothing, on a 2-core machine
    try:
        assert main(["capture-dataset", "--model", str(wide_dir), "--prompts", str(prompts), "--out",
                     str(tmp_path / "one"), "--quiet", *MODES[mode]]) == 0
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(caller)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "zkllm_hf.cli", "capture-dataset", "--model", str(wide_dir), "--prompts", str(prompts),
           "--out", str(tmp_path / "two"), "--quiet", *MODES[mode]]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    bins = sorted(name for name in one if name.endswith(".bin"))
    assert bins and sorted(one) == sorted(two)
    differing = [name for name in bins if one[name].read_bytes() != two[name].read_bytes()]
    assert not differing, f"{len(differing)} of {len(bins)} files differ: {differing[:5]}"
    for folder in (tmp_path / "one", tmp_path / "two"):
        for manifest in folder.glob("sample-*/**/manifest.arrow"):
            assert read_manifest(manifest)[1]["runtime"]["torch_threads"] == 1, manifest


def test_threads_option_sets_the_units_thread_count_and_restores_the_callers(tiny_dir, tmp_path):
    """--threads N is the intra-op thread count each unit runs (and records) with; afterwards the caller's
    own setting is back, also when the capture fails."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS, blank_after=None)
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main(["capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts), "--out",
                     str(tmp_path / "ds"), "--quiet", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 1
        for manifest in (tmp_path / "ds").glob("sample-*/manifest.arrow"):
            assert read_manifest(manifest)[1]["runtime"]["torch_threads"] == 2
        assert main(["capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts), "--out",
                     str(tmp_path / "bad"), "--quiet", "--threads", "2", "--scale-log2", "30"]) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(caller)


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_threads_option_refuses_a_bad_count_in_one_line(tiny_dir, tmp_path, capsys, value):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS, blank_after=None)
    code = None
    try:
        code = main(["capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts), "--out",
                     str(tmp_path / "ds"), "--quiet", "--threads", value])
    except SystemExit as exc:  # argparse's own refusal of a non-integer
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--threads" in err and value in err
    assert not (tmp_path / "ds").exists()


def test_api_refuses_a_bad_thread_count(tiny, tmp_path):
    with pytest.raises(ValueError, match="threads=0"):
        zkllm_hf.capture_dataset(tiny, None, ["x"], tmp_path / "ds", threads=0)
    assert not (tmp_path / "ds").exists()


def test_a_unit_records_the_runtime_it_ran_with(tiny, tmp_path):
    """The manifest says how the bytes were made: torch's intra-op threads during the forward, whether
    deterministic algorithms were on, the attention implementation that ran, the devices, the libraries."""
    import accelerate
    import numpy
    import pyarrow
    import transformers

    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / "cap"):
            torch.set_num_threads(2)  # what counts is what the forward ran with, not the setting at the start
            tiny(input_ids=tiny_ids())
            torch.set_num_threads(1)
    finally:
        torch.set_num_threads(caller)
    meta = zkllm_hf.load_capture(tmp_path / "cap").metadata
    runtime = meta["runtime"]
    assert runtime["torch_threads"] == 2
    assert runtime["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert runtime["attn_implementation"] == tiny.config._attn_implementation
    assert meta["model"]["attn_implementation"] == tiny.config._attn_implementation
    assert runtime["devices"] == ["cpu"]
    versions = meta["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert versions["numpy"] == numpy.__version__ and versions["pyarrow"] == pyarrow.__version__
    assert versions["accelerate"] == accelerate.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    try:
        from importlib.metadata import version

        assert versions["bitsandbytes"] == version("bitsandbytes")
    except ImportError:
        pass
    assert zkllm_hf.validate(tmp_path / "cap").ok  # the digest covers it


def test_deterministic_algorithms_are_recorded_when_on(tiny, tmp_path):
    on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / "cap"):
            tiny(input_ids=tiny_ids())
    finally:
        torch.use_deterministic_algorithms(on)
    assert zkllm_hf.load_capture(tmp_path / "cap").metadata["runtime"]["deterministic_algorithms"] is True


def test_the_attention_that_ran_is_recorded(tiny, tmp_path):
    """The attention implementation is the one the forward used, even when it is changed before the commit."""
    tiny.set_attn_implementation("eager")
    with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / "cap"):
        tiny(input_ids=tiny_ids())
        tiny.set_attn_implementation("sdpa")
    meta = zkllm_hf.load_capture(tmp_path / "cap").metadata
    assert meta["runtime"]["attn_implementation"] == "eager" and meta["model"]["attn_implementation"] == "eager"


def test_inspect_shows_the_thread_count_in_one_line(tiny, tmp_path, capsys):
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / "cap"):
            tiny(input_ids=tiny_ids())
    finally:
        torch.set_num_threads(caller)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cap")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "thread" in line]
    assert len(lines) == 1 and "1 thread" in lines[0], lines
