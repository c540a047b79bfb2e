"""validate --model loads what the checks need (the model, not a tokenizer), and still names broken files."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf.cli import main


def _captured_from_a_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "model"
    make_tiny().save_pretrained(folder)  # weights and config, no tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "cap"):
        model(input_ids=tiny_ids())
    return folder, tmp_path / "cap"


def test_validate_with_a_model_folder_without_tokenizer(tmp_path, capsys):
    """Defect: ``zkllm-hf validate DIR --model FOLDER`` loaded a tokenizer it never uses, so a folder holding
    only the model (save_pretrained without a tokenizer) failed with "cannot be loaded ... may be truncated
    or corrupt" instead of validating."""
    folder, cap = _captured_from_a_folder_without_tokenizer(tmp_path)
    capsys.readouterr()  # transformers' own progress bars while saving
    assert main(["validate", str(cap), "--model", str(folder)]) == 0, capsys.readouterr().err
    assert "weights_fingerprint" in capsys.readouterr().out


def test_validate_with_a_truncated_model_folder_still_says_so(tmp_path, capsys):
    """The truncation message for a truly broken folder is kept: one line, exit 3, naming the folder."""
    folder, cap = _captured_from_a_folder_without_tokenizer(tmp_path)
    capsys.readouterr()  # transformers' own progress bars while saving
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["validate", str(cap), "--model", str(folder)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated or corrupt" in err and str(folder) in err


@pytest.mark.parametrize("missing", ["config.json"])
def test_validate_with_a_model_folder_missing_its_config_is_one_line(tmp_path, capsys, missing):
    """A folder that is not a model at all is a usage error, one line."""
    folder, cap = _captured_from_a_folder_without_tokenizer(tmp_path)
    capsys.readouterr()  # transformers' own progress bars while saving
    (folder / missing).unlink()
    assert main(["validate", str(cap), "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err


def test_capture_from_a_model_folder_without_tokenizer_names_the_tokenizer(tmp_path, capsys):
    """Capture does need a tokenizer (it tokenises --text): a folder without one is told so, one line, exit 2
    (an input error), not "truncated or corrupt" weights."""
    folder, _ = _captured_from_a_folder_without_tokenizer(tmp_path)
    capsys.readouterr()
    assert main(["capture", "--model", str(folder), "--text", "the fox", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tokenizer" in err and str(folder) in err and "corrupt" not in err
    assert not (tmp_path / "o").exists()
