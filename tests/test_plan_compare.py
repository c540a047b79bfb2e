"""plan --out and --scratch never touch what zkllm-hf did not write; compare trusts only the package's contracts
and the capture's own digests, and tells input errors (exit 2) from mismatches (exit 1).

A script plan wrote is known by its content: its second line is ``# zkllm-hf plan sha256:HEX``, where HEX is
the SHA-256 of the script's bytes without that line. The tests recompute that digest themselves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import digest_column, digest_of, make_tiny, tiny_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.manifest import read_manifest
from zkllm_hf.points import POINTS

MARK = b"# zkllm-hf plan sha256:"


@pytest.fixture(scope="module")
def model():
    return make_tiny()


@pytest.fixture(scope="module")
def pristine(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "cap"
    with torch.no_grad(), zkllm_hf.capture(model, out):
        model(tiny_ids())
    return out


@pytest.fixture
def cap(pristine, tmp_path) -> Path:
    out = tmp_path / "cap"
    shutil.copytree(pristine, out)
    return out


def file_of(folder: Path, layer: int, point: str) -> Path:
    return folder / next(p for p in POINTS if p.name == point).file_name(layer)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def plan(cap: Path, out: Path | None, *extra: str) -> int:
    return main(["plan", str(cap), "--zkllm-root", str(cap.parent / "zkllm"), "--force",
                 *(["--out", str(out)] if out is not None else []), *extra])


def ours(data: bytes) -> bool:
    """The test's own reading of the header: line 2 carries the SHA-256 of every other byte of the script."""
    lines = data.splitlines(keepends=True)
    if len(lines) < 2 or not lines[1].startswith(MARK):
        return False
    digest = lines[1][len(MARK):].rstrip(b"\n").decode("latin-1")
    return hashlib.sha256(lines[0] + b"".join(lines[2:])).hexdigest() == digest


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry of a folder: its kind, bytes or link target, and mode (lstat: links are not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st_ = p.lstat()
        body = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
        out[str(p.relative_to(folder))] = (stat.S_IFMT(st_.st_mode), body, stat.S_IMODE(st_.st_mode))
    return out


# --------------------------------------------------------------------------------------------------
# plan --out


def test_plan_writes_a_script_that_carries_the_digest_of_the_rest(cap, tmp_path, capsys):
    """Defect: nothing in a script marked it as plan's, so plan could not tell its own file from anyone's."""
    out = tmp_path / "prove.sh"
    assert plan(cap, out) == 0
    data = out.read_bytes()
    assert ours(data) and data.startswith(b"#!/usr/bin/env bash\n")
    assert out.stat().st_mode & 0o100  # executable
    capsys.readouterr()
    assert plan(cap, None) == 0  # the same header on standard output: `plan DIR > F` is ours as well
    assert ours(capsys.readouterr().out.encode())


def test_plan_refuses_to_replace_a_file_it_did_not_write(cap, tmp_path, capsys):
    """Defect: plan --out replaced any existing file (and made it executable)."""
    out = tmp_path / "notes.txt"
    out.write_bytes(b"my notes\n")
    out.chmod(0o640)
    before = snapshot(tmp_path)
    for extra in ((), ("--overwrite",)):
        assert plan(cap, out, *extra) == 2
        line = one_line(capsys)
        assert str(out) in line and "not a script zkllm-hf plan wrote" in line and "--out" in line
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["foreign", "ours", "dangling"])
def test_plan_never_writes_through_a_symlink(cap, tmp_path, capsys, target):
    """Defect: plan --out replaced a symlink (and wrote through a symlinked temp name); it must refuse a link
    whatever it points to, and leave the link and its target as they were."""
    victim = tmp_path / "victim.sh"
    if target == "foreign":
        victim.write_bytes(b"#!/bin/sh\necho mine\n")
        victim.chmod(0o600)
    elif target == "ours":
        assert plan(cap, victim) == 0
        capsys.readouterr()
    out = tmp_path / "prove.sh"
    out.symlink_to(victim)
    before = snapshot(tmp_path)
    for extra in ((), ("--overwrite",)):
        assert plan(cap, out, *extra) == 2
        line = one_line(capsys)
        assert str(out) in line and "symbolic link" in line
        assert snapshot(tmp_path) == before


def test_plan_replaces_its_own_script_only_with_overwrite(cap, tmp_path, capsys):
    """Defect: there was no --overwrite; plan silently replaced its earlier script. Ours is decided by content:
    a plan script under another name is still ours, an edited one or a foreign file with the header pasted
    in is not."""
    out = tmp_path / "renamed.sh"
    assert plan(cap, tmp_path / "first.sh") == 0
    (tmp_path / "first.sh").rename(out)
    first = out.read_bytes()
    capsys.readouterr()
    assert plan(cap, out) == 2
    line = one_line(capsys)
    assert str(out) in line and "--overwrite" in line
    assert out.read_bytes() == first
    assert plan(cap, out, "--overwrite", "--layers", "1") == 0
    assert ours(out.read_bytes()) and out.read_bytes() != first and out.stat().st_mode & 0o100
    capsys.readouterr()
    # an edited plan script, and a foreign script carrying a copied header line
    header = first.splitlines(keepends=True)[1]
    for body in (first.replace(b"set -euo pipefail", b"set -uo pipefail"),
                 b"#!/usr/bin/env bash\n" + header + b"rm -rf ~\n"):
        out.write_bytes(body)
        assert plan(cap, out, "--overwrite") == 2
        assert "not a script zkllm-hf plan wrote" in one_line(capsys)
        assert out.read_bytes() == body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_one_byte_edit_makes_a_script_not_ours(pristine, data):
    """Property: the header covers every byte: change any one byte of a plan script and it is not plan's."""
    from zkllm_hf.prove import is_plan_script

    script = _script_of(pristine).encode()
    assert is_plan_script(script) and ours(script)
    i = data.draw(st.integers(0, len(script) - 1))
    b = data.draw(st.integers(0, 255).filter(lambda b: b != script[i]))
    edited = script[:i] + bytes([b]) + script[i + 1:]
    assert not is_plan_script(edited) and not ours(edited)


_SCRIPTS: dict[Path, str] = {}


def _script_of(cap: Path) -> str:
    if cap not in _SCRIPTS:
        from zkllm_hf.prove import Plan, write_script

        c = zkllm_hf.load_capture(cap)
        plan = Plan(cap.resolve(), Path("/zk"), Path("/scratch"), Path("/model"), "0" * 64, 3, 7, c.layers, [])
        _SCRIPTS[cap] = write_script(c, plan)
    return _SCRIPTS[cap]


@pytest.mark.parametrize("existing", [False, True])
def test_plan_leaves_nothing_half_written(cap, tmp_path, capsys, monkeypatch, existing):
    """Defect: plan wrote a fixed temp name (.F.tmp) with write_text, left it behind when the move failed, and
    clobbered (or wrote through a symlink at) a file of that name that was not its own."""
    out = tmp_path / "prove.sh"
    if existing:
        assert plan(cap, out) == 0
        capsys.readouterr()
    (tmp_path / "victim").write_bytes(b"keep me\n")
    (tmp_path / f".{out.name}.tmp").symlink_to(tmp_path / "victim")
    before = snapshot(tmp_path)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(out))

    for mod in (os,):
        for name in ("replace", "rename", "link"):
            monkeypatch.setattr(mod, name, disk_full)
    monkeypatch.setattr(Path, "replace", disk_full)
    monkeypatch.setattr(Path, "rename", disk_full)
    assert plan(cap, out, *(("--overwrite",) if existing else ())) == 3
    line = one_line(capsys)
    assert "No space left on device" in line
    assert snapshot(tmp_path) == before  # no temp file left, the old script (or none) as it was


def test_plan_writes_a_new_script_and_then_its_own_replacement(cap, tmp_path, capsys):
    """The script's neighbours in its folder are never touched, on a first write and on --overwrite."""
    out = tmp_path / "prove.sh"
    (tmp_path / f".{out.name}.tmp").write_bytes(b"someone's\n")
    (tmp_path / "other.sh").write_bytes(b"x\n")
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("cap")}
    assert plan(cap, out) == 0
    assert plan(cap, out, "--overwrite") == 0
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("cap")}
    assert after.pop("prove.sh")[0] == stat.S_IFREG and after == before


# --------------------------------------------------------------------------------------------------
# plan --scratch


def test_plan_refuses_a_scratch_link_or_a_folder_it_did_not_make(cap, tmp_path, capsys):
    """Defect: the script wrote its logs and outputs into any --scratch: through a symlink, into a file's
    place, or among a user's own files (rm -f of names there included)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "validate.log").write_bytes(b"mine\n")
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "afile").write_bytes(b"x\n")
    before = snapshot(tmp_path)
    out = tmp_path / "prove.sh"
    for scratch, why in (("link", "symbolic link"), ("afile", "not a folder"), ("victim", "not a folder plan")):
        assert plan(cap, out, "--scratch", str(tmp_path / scratch)) == 2
        line = one_line(capsys)
        assert str(tmp_path / scratch) in line and why in line, line
        assert snapshot(tmp_path) == before and not out.exists()


def test_the_script_refuses_a_scratch_folder_that_appeared_since(cap, tmp_path, capsys):
    """Defect: the script ran `mkdir -p` on --scratch and wrote into whatever folder was there by then."""
    from zkllm_stub import install

    stub_env = install(cap.parent / "zkllm")  # a zkLLM stand-in: the script gets as far as writing logs
    out, scratch = tmp_path / "prove.sh", tmp_path / "scratch"
    assert plan(cap, out, "--scratch", str(scratch)) == 0
    scratch.mkdir()
    (scratch / "validate.log").write_bytes(b"mine\n")
    before = snapshot(scratch)
    env = {**os.environ, **stub_env, "ZKLLM_STUB_LOG": str(tmp_path / "calls.jsonl"), "ZKLLM_PYTHON": sys.executable}
    run = subprocess.run(["bash", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode != 0 and "scratch" in run.stderr and str(scratch) in run.stderr
    assert snapshot(scratch) == before


# --------------------------------------------------------------------------------------------------
# compare


def compare(produced, captured, folder, *extra) -> int:
    return main(["compare", str(produced), str(captured), "--tolerance-from", str(folder), *extra])


def test_compare_resolves_relative_and_symlinked_paths_alike(cap, tmp_path, monkeypatch, capsys):
    """Defect: a relative --tolerance-from failed an identical file ("not a file of the capture")."""
    name = file_of(cap, 0, "post_attn_residual").name
    shutil.copyfile(cap / name, tmp_path / "z.bin")
    (tmp_path / "link").symlink_to(cap)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for captured, folder in ((f"../cap/{name}", "../cap"), (f"../link/{name}", "../cap"),
                             (f"../cap/{name}", "../link"), (str(cap / name), "../link"),
                             (f"../link/{name}", str(cap))):
        assert compare("../z.bin", captured, folder) == 0, (captured, folder, capsys.readouterr().err)
    capsys.readouterr()


@pytest.fixture(scope="module")
def lax(model, tmp_path_factory) -> tuple[Path, Path]:
    """A capture whose manifest names a copy of v1 whose skip_1 allows 10,000 LSB."""
    from zkllm_hf.contracts import contracts_root

    base = tmp_path_factory.mktemp("lax")
    folder = base / "lax-v1"
    shutil.copytree(contracts_root() / "v1", folder)
    spec = folder / "capture.yaml"
    text = spec.read_text()
    assert "name: skip_1, kind: sum, scope: layer, lhs: post_attn_residual, terms: [block_input, attn_output], " \
           "quantisation_lsb: 1.5," in text
    spec.write_text(text.replace("terms: [block_input, attn_output], quantisation_lsb: 1.5,",
                                 "terms: [block_input, attn_output], quantisation_lsb: 10000,"))
    with torch.no_grad(), zkllm_hf.capture(model, base / "cap", contract=str(folder)):
        model(tiny_ids())
    return base / "cap", folder


def test_compare_uses_no_contract_the_manifest_chooses(lax, tmp_path, capsys):
    """Defect: compare loaded the contract folder the manifest names, so an output 5000 LSB off passed against
    a laxer copy of v1. Only the package's contracts, or one named by --contract, are used."""
    cap, folder = lax
    target = file_of(cap, 0, "post_attn_residual")
    z = np.fromfile(target, dtype="<i4").astype(np.int64)
    z[3] += 5000
    produced = tmp_path / "z.bin"
    z.astype("<i4").tofile(produced)
    assert compare(produced, target, cap) == 2
    line = one_line(capsys)
    assert str(folder) in line and "--contract" in line
    assert compare(produced, target, cap, "--contract", str(folder)) == 0  # the caller trusts it: its tolerance
    capsys.readouterr()


def test_compare_checks_the_captured_file_against_the_manifest(cap, tmp_path, capsys):
    """Defect: compare never checked the captured file's sha256 and size, so a file edited after capture (and
    a prover output equal to the edit) passed."""
    target = file_of(cap, 0, "post_attn_residual")
    z = np.fromfile(target, dtype="<i4")
    z[0] += 5000
    z.tofile(target)  # same size, other bytes
    shutil.copyfile(target, tmp_path / "z.bin")
    assert compare(tmp_path / "z.bin", target, cap) == 1
    line = one_line(capsys)
    algorithm = digest_column(read_manifest(cap / "manifest.arrow")[1])
    assert str(target) in line and algorithm in line and "validate" in line
    with open(target, "ab") as fh:  # and a longer file, whose size is wrong
        fh.write(b"\0\0\0\0")
    assert compare(tmp_path / "z.bin", target, cap) == 1
    assert "bytes" in one_line(capsys)


def test_compare_refuses_a_file_whose_manifest_row_was_edited_to_match(cap, tmp_path, capsys):
    """Defect: with the captured file edited and its manifest row's sha256 edited to match, compare passed; the
    manifest's digest over its rows no longer matches, so compare must fail."""
    import pyarrow as pa

    from zkllm_hf.manifest import METADATA_KEY, read_manifest, write_manifest

    target = file_of(cap, 1, "block_output")
    z = np.fromfile(target, dtype="<i4")
    z[7] -= 3000
    z.tofile(target)
    shutil.copyfile(target, tmp_path / "z.bin")
    table, meta = read_manifest(cap / "manifest.arrow")
    rows = table.to_pylist()
    column = digest_column(meta)
    next(r for r in rows if r["file"] == target.name)[column] = digest_of(column, target.read_bytes())
    new = pa.Table.from_pylist(rows, schema=table.schema).replace_schema_metadata(
        {METADATA_KEY: __import__("json").dumps(meta).encode()})
    write_manifest(new, cap / "manifest.arrow")
    assert compare(tmp_path / "z.bin", target, cap) == 1
    line = one_line(capsys)
    assert "digest" in line and "validate" in line


def test_compare_input_errors_exit_2_with_one_line(cap, tmp_path, capsys):
    """Defect: a missing or wrong-sized prover output, a folder that is not a capture and a file outside the
    capture all exited 1, as if the prover had produced different numbers."""
    target = file_of(cap, 0, "post_attn_residual")
    good = tmp_path / "z.bin"
    shutil.copyfile(target, good)
    short = tmp_path / "short.bin"
    short.write_bytes(target.read_bytes()[:-4])
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # never opened for a blocking read
    (tmp_path / "notcap").mkdir()
    outside = tmp_path / "outside.bin"
    shutil.copyfile(target, outside)
    cases = [
        (tmp_path / "missing.bin", target, cap, "does not exist"),
        (short, target, cap, "bytes"),
        (tmp_path / "adir", target, cap, "not a file"),
        (tmp_path / "fifo", target, cap, "not a file"),
        (good, target, tmp_path / "notcap", "not a finished capture"),
        (good, outside, cap, "not a file of the capture"),
        (good, cap / "missing.bin", cap, "not a file of the capture"),
    ]
    for produced, captured, folder, text in cases:
        assert compare(produced, captured, folder) == 2, (produced, captured, folder)
        line = one_line(capsys)
        assert text in line, line
    assert compare(good, target, cap) == 0  # and the same files, given well, agree
    capsys.readouterr()
    target.unlink()
    assert compare(good, target, cap) == 2
    assert "does not exist" in one_line(capsys)
