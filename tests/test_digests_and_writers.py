"""Issue 17: one fast digest (BLAKE3, SHA-256 on request, captures made before BLAKE3 still read), several
writer threads with the same files, every file durable before the rename, and the replaced capture deleted
off the critical path. Every digest here is recomputed with hashlib or the blake3 package."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import digest_of, make_tiny, tiny_ids
from test_capture import run_capture

import zkllm_hf
from zkllm_hf import writer as writer_mod
from zkllm_hf.manifest import METADATA_KEY, read_manifest, write_manifest
from zkllm_hf.provenance import FINGERPRINT_ALGORITHMS
from zkllm_hf.writer import StagingDir


def _rows(cap: Path) -> tuple[list[dict], dict]:
    table, meta = read_manifest(cap / "manifest.arrow")
    return table.to_pylist(), meta


def _state_dict_fingerprint(model, algorithm: str) -> str:
    lines = []
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().contiguous().reshape(-1)
        digest = digest_of(algorithm, flat.view(torch.uint8).numpy().tobytes())
        lines.append(f"{name}|{t.dtype}|{list(t.shape)}|{digest}")
    return digest_of(algorithm, "\n".join(lines).encode())


def _canonical_digest(algorithm: str, rows: list[dict], meta: dict) -> str:
    """The manifest digest as docs/architecture.md §3 defines it, recomputed here."""
    body = {"rows": rows, "metadata": {k: v for k, v in meta.items() if k != "manifest_digest"}}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    return digest_of(algorithm, canon.encode())


@pytest.mark.parametrize("digest", ["blake3", "sha256"])
def test_each_digest_is_recorded_and_recomputes(tiny, tmp_path, digest):
    """Every file's digest is in the column its algorithm names (the other null), the manifest digest and
    the weights fingerprint are made by the same algorithm, and validate passes with the model."""
    run_capture(tiny, tmp_path / "cap", digest=digest)
    rows, meta = _rows(tmp_path / "cap")
    other = "sha256" if digest == "blake3" else "blake3"
    assert meta["digest_algorithm"] == digest
    for r in rows:
        assert r[digest] == digest_of(digest, (tmp_path / "cap" / r["file"]).read_bytes()) and r[other] is None
    assert meta["manifest_digest"] == _canonical_digest(digest, rows, meta)
    assert meta["model"]["weights_fingerprint_algorithm"] == FINGERPRINT_ALGORITHMS[digest]
    assert meta["model"]["weights_fingerprint"] == _state_dict_fingerprint(tiny, digest)
    report = zkllm_hf.validate(tmp_path / "cap", model=tiny)
    assert report.ok, str(report)


def test_a_capture_written_before_blake3_still_validates_and_loads(tiny, tmp_path):
    """A manifest as 1.4 wrote it (no blake3 column, no digest_algorithm, sha256 fingerprint v2, its digest
    over those rows) keeps validating, with the model, and loading."""
    cap = tmp_path / "cap"
    run_capture(tiny, cap, digest="sha256")
    table, meta = read_manifest(cap / "manifest.arrow")
    table = table.drop_columns(["blake3"])
    del meta["digest_algorithm"]
    meta["model"].pop("weights_fingerprint_mode")
    meta.pop("sidecar")  # 1.4 wrote no capture.json either
    meta["contract"]["version"] = "1.4.0"
    (cap / "capture.json").unlink()
    meta["manifest_digest"] = _canonical_digest("sha256", table.to_pylist(), meta)
    write_manifest(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), cap / "manifest.arrow")
    assert "blake3" not in pa.ipc.open_file(pa.memory_map(str(cap / "manifest.arrow"))).read_all().column_names
    report = zkllm_hf.validate(cap, model=tiny)
    assert report.ok, str(report)
    assert {"integrity", "manifest_digest", "weights_fingerprint"} <= {r.check for r in report.results if r.passed}
    assert zkllm_hf.load_capture(cap).manifest.num_rows == table.num_rows
    data = bytearray((cap / "layer-1-mlp-output.bin").read_bytes())
    data[9] ^= 1
    (cap / "layer-1-mlp-output.bin").write_bytes(bytes(data))
    bad = [f for f in zkllm_hf.validate(cap).failures if f.check == "integrity"]
    assert [f.file for f in bad] == ["layer-1-mlp-output.bin"] and "sha256" in bad[0].message


@pytest.mark.parametrize("edit", ["both", "neither"])
def test_a_row_carries_exactly_one_digest(tiny, tmp_path, edit):
    cap = tmp_path / "cap"
    run_capture(tiny, cap)
    from test_validate import rewrite_manifest

    def rows_edit(rows):
        r = rows[3]
        if edit == "both":
            r["sha256"] = digest_of("sha256", (cap / r["file"]).read_bytes())
        else:
            r["blake3"] = None

    rewrite_manifest(cap, rows_edit, keep_digest=True)
    report = zkllm_hf.validate(cap)
    assert not report.ok
    if edit == "both":
        assert any("zkllm_one_digest" in f.message for f in report.failures if f.check == "manifest_schema")


def test_several_writer_threads_write_the_same_capture(tmp_path):
    """writers=3 on the CPU: the same files, digests and rows as one writer thread, and every file synced."""
    model = make_tiny(num_hidden_layers=4)
    run_capture(model, tmp_path / "one", writers=1)
    run_capture(model, tmp_path / "three", writers=3)
    a, meta_a = _rows(tmp_path / "one")
    b, meta_b = _rows(tmp_path / "three")
    keep = ("file", "blake3", "byte_size", "int_min", "int_max", "max_dev_ratio")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b]
    for r in b:
        assert (tmp_path / "one" / r["file"]).read_bytes() == (tmp_path / "three" / r["file"]).read_bytes()
    assert zkllm_hf.validate(tmp_path / "three", model=model).ok


def test_writer_threads_keep_each_files_order_and_removals(tmp_path):
    """Parts of one file queued in turn land in that order whatever thread writes it; a removed folder's
    earlier writes are gone and later ones into it are kept; digests are those of the final bytes."""
    staging = StagingDir(tmp_path / "out", writers=3, max_in_flight_bytes=1 << 12)
    rng = np.random.default_rng(0)
    want: dict[str, list[np.ndarray]] = {}
    names = [f"sample-{s}/layer-{i}-mlp-output.bin" for s in range(2) for i in range(5)]
    for _ in range(4):  # four forwards' worth of appends to every file
        items = [(n, rng.integers(-1000, 1000, size=(3, 64), dtype=np.int32)) for n in names]
        for n, codes in items:
            want.setdefault(n, []).append(codes.copy())
        staging.append_many(items)
    staging.remove("sample-1")
    for n in [n for n in want if n.startswith("sample-1/")]:
        del want[n]
    late = "sample-1/layer-0-mlp-output.bin"
    late_codes = rng.integers(0, 9, size=(2, 64), dtype=np.int32)
    staging.append_many([(late, late_codes)])
    want[late] = [late_codes]
    staging.seal_many([(n, ()) for n in want])
    written = {w.name: w for w in staging.wait()}
    assert set(written) == set(want)
    for n, parts in want.items():
        data = (staging.path / n).read_bytes()
        assert data == np.concatenate(parts).astype("<i4").tobytes()
        assert written[n].digest == digest_of("blake3", data) and written[n].byte_size == len(data)
    staging.abort()
    assert not staging.path.exists()


@pytest.mark.parametrize("durability", ["append", "seal", "syncfs"])
def test_every_file_is_synced_before_the_rename(tmp_path, monkeypatch, durability):
    """Whatever the durability mode, each staged file's data reaches the disk before the commit's rename
    (recorded: the syncs that ran, by file, and the moment of the rename)."""
    events: list[tuple[str, str]] = []
    real_fdatasync, real_fsync, real_rename = os.fdatasync, os.fsync, os.rename
    lock = threading.Lock()

    def name_of(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fdatasync(fd):
        with lock:
            events.append(("sync", name_of(fd)))
        return real_fdatasync(fd)

    def fsync(fd):
        with lock:
            events.append(("sync", name_of(fd)))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(a)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    real_syncfs = writer_mod._syncfs

    def syncfs():
        sync = real_syncfs()
        return None if sync is None else (lambda path: (events.append(("syncfs", str(path))), sync(path)))

    monkeypatch.setattr(writer_mod, "_syncfs", syncfs)
    staging = StagingDir(tmp_path / "out", durability=durability)
    names = [f"layer-{i}-mlp-output.bin" for i in range(3)]
    staging.append_many([(n, np.arange(64, dtype=np.int32)) for n in names])
    staging.seal_many([(n, ()) for n in names])
    root = str(staging.path)
    staging.commit(lambda path: None)
    at = next(i for i, (kind, path) in enumerate(events) if kind == "rename" and path == root)
    synced = {p for kind, p in events[:at] if kind == "sync"}
    if staging.durability == "syncfs":  # one pass over the staging folder's filesystem
        assert ("syncfs", root) in events[:at]
    else:
        assert {f"{root}/{n}" for n in names} <= synced
    assert root in synced  # the folder's entries too


def test_the_replaced_capture_is_deleted_in_the_background(tmp_path, monkeypatch):
    """--overwrite: the old capture is renamed aside (pid-named, unmarked as finished) before capture()
    returns and deleted by a thread; waiting for it leaves nothing behind."""
    out = tmp_path / "cap"
    model = make_tiny()
    run_capture(model, out, layers="0")
    started = threading.Event()
    release = threading.Event()
    rmtree = writer_mod.shutil.rmtree

    def slow_rmtree(path, *a, **k):
        if ".zkllm-old-" in str(path):
            started.set()
            assert release.wait(20)
        return rmtree(path, *a, **k)

    monkeypatch.setattr(writer_mod.shutil, "rmtree", slow_rmtree)
    run_capture(model, out, layers="1", overwrite=True)  # returns while the deletion waits
    assert started.wait(20)
    [old] = [p for p in tmp_path.iterdir() if ".zkllm-old-" in p.name]
    assert (old / "PARTIAL").exists() and not (old / "manifest.arrow").exists()
    assert zkllm_hf.load_capture(out).metadata["capture"]["layers"] == [1]
    release.set()
    assert zkllm_hf.validate(out).ok  # validate's leftover sweep waits for the deletion instead of racing it
    writer_mod.wait_for_deletions()
    assert not [p for p in tmp_path.iterdir() if ".zkllm-" in p.name]


def test_bad_digest_and_writers_are_one_line(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"digest='md5': one of blake3, sha256"):
        zkllm_hf.capture(tiny, tmp_path / "a", digest="md5")
    with pytest.raises(ValueError, match=r"writers=0"):
        zkllm_hf.capture(tiny, tmp_path / "b", writers=0)
    with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / "c", writers=2):
        tiny(tiny_ids())
    assert zkllm_hf.validate(tmp_path / "c").ok


def test_the_cli_flags(tiny_dir, tmp_path):
    """capture --digest sha256 --fingerprint full: SHA-256 files (recomputed here) and a full fingerprint."""
    from zkllm_hf.cli import main

    out = tmp_path / "cap"
    argv = ["capture", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--text", "the fox"]
    assert main([*argv, "--digest", "sha256", "--fingerprint", "full"]) == 0
    rows, meta = _rows(out)
    assert meta["digest_algorithm"] == "sha256" and meta["model"]["weights_fingerprint_mode"] == "full"
    assert all(r["sha256"] == digest_of("sha256", (out / r["file"]).read_bytes()) for r in rows)
    assert main(["validate", str(out)]) == 0
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices: usage error, exit 2
        main([*argv[:4], str(tmp_path / "b"), *argv[5:], "--digest", "md5"])
    assert exit_info.value.code == 2
