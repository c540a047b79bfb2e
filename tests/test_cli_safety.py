"""The CLI under bad input and faults: one line, the documented exit code, nothing half-written left."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import zkllm_hf
from zkllm_hf import engine as engine_mod
from zkllm_hf import writer as writer_mod
from zkllm_hf.cli import main


def capture(tiny_dir, out, *extra) -> int:
    return main(["capture", "--model", str(tiny_dir), "--out", str(out), "--quiet", *extra])


def nothing_left(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if ".zkllm-" in p.name]


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_byte_order_mark_is_not_part_of_the_prompt(tiny_dir, tmp_path):
    text = "the quick brown fox"
    (tmp_path / "p.txt").write_text("\ufeff" + text, encoding="utf-8")
    assert capture(tiny_dir, tmp_path / "bom", "--text-file", str(tmp_path / "p.txt")) == 0
    assert capture(tiny_dir, tmp_path / "plain", "--text", text) == 0
    ids = [zkllm_hf.load_capture(tmp_path / d).metadata["tokens"]["input_ids"] for d in ("bom", "plain")]
    assert ids[0] == ids[1] and 0 not in ids[0]  # no [UNK] for the mark


def test_bad_arguments_are_refused_before_the_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    import zkllm_hf.models as models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert capture(tiny_dir, tmp_path / "a", "--text", "the fox", "--layers", "") == 2
    assert "--layers '' is empty" in one_line(capsys)
    assert capture(tiny_dir, tmp_path / "b", "--text", "the fox", "--layers", "3-1") == 2
    assert "cannot read '3-1'" in one_line(capsys)
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe bad")
    assert capture(tiny_dir, tmp_path / "c", "--text-file", str(tmp_path / "p.txt")) == 2
    assert "not UTF-8 text" in one_line(capsys)
    assert nothing_left(tmp_path / "a") and nothing_left(tmp_path / "c")


def test_a_prompt_longer_than_the_context_is_refused_before_the_forward(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine_mod.UnitRecorder, "add", lambda *a: pytest.fail("a forward ran"))
    assert capture(tiny_dir, tmp_path / "long", "--text", "the fox", "--pad-to", "300") == 2
    assert "exceed the model's context of 256 positions" in one_line(capsys)
    assert nothing_left(tmp_path / "long")


def test_disk_full_is_an_environment_error(tiny_dir, tmp_path, capsys, monkeypatch):
    def full(self, name, data):
        raise OSError(28, "No space left on device", str(self.path / name))

    monkeypatch.setattr(writer_mod.StagingDir, "_append", full)
    assert capture(tiny_dir, tmp_path / "full", "--text", "the quick brown fox") == 3
    line = one_line(capsys)
    assert "No space left on device" in line and "nothing was emitted" in line
    assert nothing_left(tmp_path / "full")


@pytest.mark.parametrize("how, code", [("sigint", 130), ("sigterm", 143)])
def test_interrupts_clean_up_and_exit_with_the_signal_code(tiny_dir, tmp_path, capsys, monkeypatch, how, code):
    add, fired = engine_mod.UnitRecorder.add, {"n": 0}

    def interrupted(self, layer, point, x):
        fired["n"] += 1
        if fired["n"] == 10:  # part-way through the capture, with files already staged
            if how == "sigint":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return add(self, layer, point, x)

    monkeypatch.setattr(engine_mod.UnitRecorder, "add", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert capture(tiny_dir, tmp_path / "int", "--text", "the quick brown fox") == code
    assert "nothing was emitted" in one_line(capsys)
    assert nothing_left(tmp_path / "int") and signal.getsignal(signal.SIGTERM) == before


def test_validate_loads_the_model_as_the_capture_ran_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert capture(tiny_dir, out, "--text", "the quick brown fox", "--dtype", "bfloat16") == 0
    assert main(["validate", str(out), "--model", str(tiny_dir)]) == 0  # bfloat16, from the manifest
    capsys.readouterr()
    assert main(["validate", str(out), "--model", str(tiny_dir), "--dtype", "float32"]) == 1
    assert "weights_fingerprint" in capsys.readouterr().out


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    codes = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()[0].isdigit()}
    assert codes == {"0", "1", "2", "3", "130", "143"}


def test_corrupt_model_files_are_one_line_and_exit_3(tiny_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert capture(broken, tmp_path / "out", "--text", "the fox") == 3
    line = one_line(capsys)
    assert "cannot be loaded" in line and "truncated or corrupt" in line and str(broken) in line
    assert nothing_left(tmp_path / "out")


def test_a_manifest_missing_a_column_is_one_line(tiny_dir, tmp_path, capsys):
    from zkllm_hf.manifest import read_manifest, write_manifest

    out = tmp_path / "cap"
    assert capture(tiny_dir, out, "--text", "the fox") == 0
    table, _ = read_manifest(out / "manifest.arrow")
    write_manifest(table.drop_columns(["sha256"]).replace_schema_metadata(table.schema.metadata),
                   out / "manifest.arrow")
    capsys.readouterr()
    assert main(["validate", str(out)]) == 1
    report = capsys.readouterr().out
    assert "lacks column(s) ['sha256']" in report and "Traceback" not in report
    assert main(["inspect", str(out)]) == 1
    assert "lacks column(s) ['sha256']" in one_line(capsys)


def test_four_bit_capture_validates_end_to_end(tiny_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q4"
    assert capture(tiny_dir, out, "--text", "the quick brown fox", "--load-in-4bit") == 0
    meta = zkllm_hf.load_capture(out).metadata
    assert meta["model"]["quantization"]["load_in_4bit"] is True
    assert main(["validate", str(out), "--model", str(tiny_dir)]) == 0  # loaded in 4-bit, from the manifest
    capsys.readouterr()
    assert main(["validate", str(out), "--model", str(tiny_dir), "--dtype", "float32"]) == 1


def test_a_layer_out_of_range_is_refused_before_the_weights_load(tiny_dir, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    assert capture(tiny_dir, tmp_path / "l", "--text", "the fox", "--layers", "0-7") == 2
    line = one_line(capsys)
    assert "--layers '0-7'" in line and "[3, 4, 5, 6, 7] out of range" in line and "3 layers" in line


def test_a_read_only_output_folder_is_an_environment_error(tiny_dir, tmp_path, capsys, monkeypatch):
    """Simulated (root writes anywhere here): creating anything beside the target fails with EROFS."""
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / ".ro")) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(writer_mod.os, "open", read_only)
    assert capture(tiny_dir, tmp_path / "ro", "--text", "the fox") == 3
    line = one_line(capsys)
    assert "Read-only file system" in line and str(tmp_path / ".ro") in line
    assert nothing_left(tmp_path / "ro")
