"""Faults: a killed capture, a concurrent one, a half-deleted old capture, a damaged model cache."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf import models as models_mod
from zkllm_hf import writer as writer_mod
from zkllm_hf.writer import TargetBusyError, TargetLock


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".zkllm-" in p.name)


def capture(model, out: Path, **kw):
    with torch.no_grad(), zkllm_hf.capture(model, out, **kw) as s:
        model(tiny_ids())
    return s.result


def test_a_killed_capture_is_cleaned_up_by_the_next_one(tmp_path, caplog):
    """SIGKILL mid-capture leaves a staging folder (with its PARTIAL marker); the next capture of that
    target removes it, saying so, and the next capture succeeds."""
    out = tmp_path / "cap"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch, zkllm_hf
        from zkllm_hf import writer
        from conftest import make_tiny, tiny_ids
        append = writer.StagingDir._append_many
        def slow(self, items):
            append(self, items)
            print("STAGED", flush=True)
            time.sleep(60)
        writer.StagingDir._append_many = slow
        model = make_tiny()
        with torch.no_grad(), zkllm_hf.capture(model, {str(out)!r}):
            model(tiny_ids())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert proc.stdout.readline().strip() == "STAGED"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    left = hidden(tmp_path)
    assert any(".zkllm-staging-" in n for n in left) and not out.exists()
    staging = next(tmp_path.glob(".cap.zkllm-staging-*"))
    assert (staging / "PARTIAL").exists() and not (staging / "manifest.arrow").exists()
    with caplog.at_level(logging.WARNING, logger="zkllm_hf.writer"):
        capture(make_tiny(), out)
    assert f"removed {staging}, left by an interrupted zkllm-hf process (pid {proc.pid})" in caplog.text
    assert hidden(tmp_path) == [] and zkllm_hf.validate(out).ok


def test_validate_removes_a_dead_captures_leftovers(tmp_path, caplog):
    out = tmp_path / "cap"
    capture(make_tiny(), out)
    dead = tmp_path / ".cap.zkllm-old-4194304-0123456789ab"  # a pid that is not running
    dead.mkdir()
    (dead / "manifest.arrow").write_bytes((out / "manifest.arrow").read_bytes())
    with caplog.at_level(logging.WARNING, logger="zkllm_hf.writer"):
        assert zkllm_hf.validate(out).ok
    assert "pid 4194304" in caplog.text and hidden(tmp_path) == []


def test_a_concurrent_capture_fails_fast(tmp_path, capsys):
    out = tmp_path / "cap"
    lock = TargetLock(out)  # another process writing there, as far as anyone can tell
    try:
        model = make_tiny()
        with pytest.raises(TargetBusyError, match=rf"another capture is writing to '{out}' \(process {os.getpid()}\)"):
            capture(model, out)
        from zkllm_hf.cli import main

        assert main(["capture", "--text", "x", "--out", str(out), "--model", "nonexistent", "--quiet"]) == 2
        assert "another capture is writing to" in capsys.readouterr().err
    finally:
        lock.release()
    assert not out.exists() and hidden(tmp_path) == []
    capture(make_tiny(), out)  # free again
    assert zkllm_hf.validate(out).ok


def test_a_replaced_capture_never_looks_finished_while_it_is_deleted(tmp_path, monkeypatch):
    """If the process dies while deleting the capture it replaced, what is left is marked unfinished."""
    out = tmp_path / "cap"
    model = make_tiny()
    capture(model, out, layers="0")
    rmtree = writer_mod.shutil.rmtree
    monkeypatch.setattr(writer_mod.shutil, "rmtree",
                        lambda p, *a, **k: None if ".zkllm-old-" in str(p) else rmtree(p, *a, **k))
    capture(model, out, layers="1", overwrite=True)
    old = next(tmp_path.glob(".cap.zkllm-old-*"))
    assert (old / "PARTIAL").exists() and not (old / "manifest.arrow").exists()
    with pytest.raises(zkllm_hf.CaptureNotFinished, match="interrupted"):
        zkllm_hf.load_capture(old)
    monkeypatch.undo()
    capture(model, out, layers="2", overwrite=True)  # the next capture of this target removes it
    writer_mod.wait_for_deletions()  # the capture layers="2" replaced is deleted in the background
    assert hidden(tmp_path) == []


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF and converter (the real one takes ~25 s): writes a tiny model's folder."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    calls = []

    def convert(src, folder, digest):
        calls.append(folder)
        make_tiny().save_pretrained(folder)

    monkeypatch.setattr(models_mod, "_convert_into", convert)
    return gguf, calls, convert


def test_a_damaged_cache_is_converted_again(fake_gguf, tmp_path, caplog):
    gguf, calls, _ = fake_gguf
    cache = tmp_path / "cache"
    folder, digest = models_mod.convert_gguf(gguf, cache=cache)
    assert len(calls) == 1 and models_mod.verify_cache(folder) is None
    assert models_mod.convert_gguf(gguf, cache=cache) == (folder, digest) and len(calls) == 1  # reused
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # 4 KB zeroed in the middle
    weights.write_bytes(bytes(data))
    assert "model.safetensors changed" in models_mod.verify_cache(folder)
    with caplog.at_level(logging.WARNING, logger="zkllm_hf.models"):
        assert models_mod.convert_gguf(gguf, cache=cache) == (folder, digest)
    assert len(calls) == 2 and "is unusable (model.safetensors changed" in caplog.text
    assert models_mod.verify_cache(folder) is None and hidden(cache) == []
    (folder / models_mod.CACHE_RECORD).write_text("{not json")  # an unreadable record
    models_mod.convert_gguf(gguf, cache=cache)
    assert len(calls) == 3 and models_mod.verify_cache(folder) is None


def test_an_interrupted_conversion_leaves_nothing_that_is_used(fake_gguf, tmp_path, monkeypatch):
    gguf, calls, convert = fake_gguf
    cache = tmp_path / "cache"

    def dies(src, folder, digest):
        make_tiny().save_pretrained(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(models_mod, "_convert_into", dies)
    with pytest.raises(KeyboardInterrupt):
        models_mod.convert_gguf(gguf, cache=cache)
    assert list(cache.iterdir()) == []  # the temp folder is gone, and nothing else was written
    dead = cache / f".tiny-{models_mod.sha256_file(gguf)[:16]}.zkllm-tmp-4194304-00ff00ff00ff"
    dead.mkdir()  # what a SIGKILL would have left: removed by the next conversion
    monkeypatch.setattr(models_mod, "_convert_into", convert)
    models_mod.convert_gguf(gguf, cache=cache)
    assert not dead.exists() and hidden(cache) == [] and len(calls) == 1
