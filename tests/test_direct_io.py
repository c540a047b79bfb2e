"""Issue 17, durability off the hot path: appends that go around the page cache where the filesystem allows
it, each read back as it lands, and the gate judging those read-backs instead of reading the capture again.

Every expected value is recomputed here: file bytes with numpy, digests with hashlib or the blake3 package.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import digest_of, make_tiny, tiny_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from test_capture import run_capture

import zkllm_hf
from zkllm_hf import direct_io
from zkllm_hf.buffers import HostBufferPool, aligned_empty
from zkllm_hf.contracts import ContractViolation
from zkllm_hf.contracts import file_checks as fc
from zkllm_hf.direct_io import BLOCK, FileAppender


def _direct_works(folder: Path) -> bool:
    """Whether this filesystem takes an O_DIRECT write of one aligned block (tmpfs, for one, may not)."""
    if not direct_io.O_DIRECT:
        return False
    path, buf = folder / ".probe", mmap.mmap(-1, BLOCK)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | direct_io.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, buf)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink()


def _aligned_array(values: np.ndarray, skew: int = 0) -> np.ndarray:
    """``values`` (int32) copied into page-aligned memory, starting ``skew`` int32 past the boundary."""
    buf = mmap.mmap(-1, 4 * (len(values) + skew) + BLOCK)
    out = np.frombuffer(buf, dtype="<i4", count=len(values) + skew)[skew:]
    out[:] = values
    return out


appends = st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3)), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(parts=appends, seed=st.integers(0, 2**31 - 1), algorithm=st.sampled_from(["blake3", "sha256"]))
def test_appends_hold_the_bytes_and_their_read_back(tmp_path_factory, parts, seed, algorithm):
    """Whatever the lengths, alignment and number of appends: the file holds their bytes in order, and the
    read-back's size, digest and int32 range are those of the file, recomputed from its bytes."""
    folder = tmp_path_factory.mktemp("appends")
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(-(2**31) + 1, 2**31 - 1, size=n, dtype=np.int64).astype("<i4") for n, _ in parts]
    f = FileAppender(folder / "x.bin", algorithm)
    for chunk, (_, skew) in zip(chunks, parts):
        f.append(memoryview(_aligned_array(chunk, skew)).cast("B"))
    data = (folder / "x.bin").read_bytes()
    whole = np.concatenate(chunks).astype("<i4")
    assert data == whole.tobytes()
    rb = f.read_back(len(data))
    assert rb is not None and rb.size == len(data) and rb.algorithm == algorithm
    assert rb.digest == digest_of(algorithm, data) == f.sent.hexdigest()
    if whole.size:
        assert (rb.int_min, rb.int_max) == (int(whole.min()), int(whole.max()))
    else:
        assert rb.int_min is None and rb.int_max is None


def test_a_long_append_is_read_back_in_chunks(tmp_path, monkeypatch):
    """The read-back goes through one buffer of READ_CHUNK bytes (memory stays bounded for any append): an
    append of many chunks, direct part and cached tail, reads back whole."""
    monkeypatch.setattr(direct_io, "READ_CHUNK", 2 * BLOCK)
    reads = []
    real = direct_io._read_at
    monkeypatch.setattr(direct_io, "_read_at", lambda fh, out, offset: reads.append(len(out)) or real(fh, out, offset))
    values = np.random.default_rng(3).integers(-(2**31) + 1, 2**31 - 1, size=7 * BLOCK // 4 + 3).astype("<i4")
    f = FileAppender(tmp_path / "x.bin", "blake3")
    f.append(memoryview(_aligned_array(values)).cast("B"))
    rb = f.read_back(values.nbytes)
    assert rb.digest == digest_of("blake3", values.tobytes())
    assert (rb.int_min, rb.int_max) == (int(values.min()), int(values.max()))
    assert max(reads) <= 2 * BLOCK and sum(reads) == values.nbytes
    if f.direct_bytes:  # four chunks of the 7 direct blocks, then the 12-byte tail through the cache
        assert reads == [2 * BLOCK] * 3 + [BLOCK, 12]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=100), flip=st.integers(0, 99), skew=st.integers(0, 7))
def test_the_byte_comparison_finds_any_difference(data, flip, skew):
    """The read-back's comparison (eight bytes at a time, then the tail) equals bytes equality, wherever the
    one changed byte is and however the views sit in memory."""
    a = bytearray(skew) + bytearray(data)
    b = bytearray(data)
    if flip < len(b):
        b[flip] ^= 0x01
    assert direct_io._same(memoryview(a)[skew:], memoryview(b)) == (bytes(a[skew:]) == bytes(b))


def test_aligned_appends_go_around_the_page_cache(tmp_path):
    """A page-aligned buffer at an aligned offset is written with O_DIRECT where the filesystem takes it
    (its whole blocks; the unaligned tail through the cache); elsewhere, all of it through the cache."""
    works = _direct_works(tmp_path)
    f = FileAppender(tmp_path / "x.bin", "blake3")
    values = np.arange(3 * BLOCK // 4 + 5, dtype="<i4")  # three blocks and 20 bytes
    f.append(memoryview(_aligned_array(values)).cast("B"))
    assert f.direct_bytes == (3 * BLOCK if works else 0)
    f.append(memoryview(_aligned_array(values)).cast("B"))  # now at an unaligned offset: through the cache
    assert f.direct_bytes == (3 * BLOCK if works else 0)
    assert (tmp_path / "x.bin").read_bytes() == values.tobytes() * 2


def test_a_filesystem_that_refuses_o_direct_gets_ordinary_writes(tmp_path, monkeypatch):
    """EINVAL on an O_DIRECT open (tmpfs, some network filesystems): the same bytes, through the cache."""
    real_open = os.open

    def refusing(path, flags, *a):
        if flags & direct_io.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_io, "O_DIRECT", direct_io.O_DIRECT or 0x4000)
    monkeypatch.setattr(direct_io.os, "open", refusing)
    f = FileAppender(tmp_path / "x.bin", "sha256")
    values = np.arange(BLOCK, dtype="<i4")
    f.append(memoryview(_aligned_array(values)).cast("B"))
    assert not f.direct and f.direct_bytes == 0
    assert (tmp_path / "x.bin").read_bytes() == values.tobytes()
    assert f.read_back(values.nbytes).digest == digest_of("sha256", values.tobytes())


def test_a_short_read_back_leaves_the_file_to_the_gate(tmp_path, monkeypatch):
    """A read-back that comes up short is not a read-back: the file gets no ReadBack, and is read again."""
    monkeypatch.setattr(direct_io, "_read_at", lambda fh, out, offset: max(0, len(out) - 4))
    f = FileAppender(tmp_path / "x.bin", "blake3")
    f.append(memoryview(_aligned_array(np.arange(64, dtype="<i4"))).cast("B"))
    assert f.read_back(256) is None


@pytest.mark.parametrize("shape", [(1,), (16, 64), (37, 576), (3, 5)])
def test_pool_buffers_start_on_a_page(shape):
    pool = HostBufferPool(64 << 20)
    bufs = [pool.acquire(shape) for _ in range(3)]
    assert all(b.data_ptr() % BLOCK == 0 and b.shape == shape and b.dtype == torch.int32 for b in bufs)
    pool.release(bufs[0])
    again = pool.acquire(shape)  # reused
    assert again.data_ptr() == bufs[0].data_ptr()
    assert aligned_empty(7).data_ptr() % BLOCK == 0 and aligned_empty(7).numel() == 7


def test_the_gate_judges_the_read_backs_and_reads_nothing_again(tmp_path, monkeypatch):
    """A capture's gate runs the integrity and range checks on what the writer read back as each file landed:
    no data file is read again at commit. validate, later, reads every one of them."""
    reads = []
    real = fc._read
    monkeypatch.setattr(fc, "_read", lambda path, local: reads.append(path.name) or real(path, local))
    model = make_tiny()
    run_capture(model, tmp_path / "cap")
    assert [n for n in reads if n.endswith(".bin")] == []
    report = zkllm_hf.validate(tmp_path / "cap", model=model)
    assert report.ok
    # validate reads every file once: an alias (a hard link of its point's file) is not read again
    inode = {p.name: p.stat().st_ino for p in (tmp_path / "cap").glob("*.bin")}
    got = [n for n in reads if n.endswith(".bin")]
    assert len(got) == len({inode[n] for n in got}) == len(set(inode.values())) < len(inode)


def test_bytes_the_disk_got_wrong_fail_the_gate(tmp_path, monkeypatch):
    """The read-back is what the gate judges, so a file that does not hold what was written (here one byte
    flipped on disk between the write and the read-back) fails the integrity check, and nothing is emitted."""
    real = FileAppender._read_back
    hit = []

    def corrupt_then_read(self, view, start, aligned):
        if not hit and self.path.name.startswith("layer-1-"):
            hit.append(self.path.name)
            with open(self.path, "r+b") as fh:
                fh.seek(start + 7)
                b = fh.read(1)
                fh.seek(start + 7)
                fh.write(bytes([b[0] ^ 0x10]))
        return real(self, view, start, aligned)

    monkeypatch.setattr(FileAppender, "_read_back", corrupt_then_read)
    with pytest.raises(ContractViolation) as e:
        run_capture(make_tiny(), tmp_path / "cap", ids=tiny_ids())
    assert hit and not (tmp_path / "cap").exists()
    failed = {(r.check, r.file) for r in e.value.failures}
    assert ("integrity", hit[0]) in failed
    assert {check for check, _ in failed} <= {"integrity", "range"}  # the range, where the flip moved an extreme
    assert all(f.startswith("layer-1-") for _, f in failed)  # that file, and its aliases (hard links of it)


def test_validate_reads_an_alias_that_is_no_longer_a_link(tmp_path):
    """An alias read once with its point's file is a hard link of it; an alias replaced by a different file
    (same size, one byte changed) is read on its own, and fails its integrity check alone."""
    model = make_tiny()
    run_capture(model, tmp_path / "cap")
    rows = zkllm_hf.load_capture(tmp_path / "cap").manifest.to_pylist()
    alias = next(r for r in rows if r["alias_of"])
    path = tmp_path / "cap" / alias["file"]
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))
    report = zkllm_hf.validate(tmp_path / "cap", model=model)
    assert [(r.check, r.file) for r in report.failures if r.check == "integrity"] == [("integrity", alias["file"])]
