"""capture-dataset: a JSONL prompt set, one unit per prompt, in one process or data-parallel under accelerate."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from conftest import WORDS

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.manifest import read_manifest
from zkllm_hf.writer import StagingDir

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    {"text": "the quick brown fox"},  # line 1: id 1, sample-1
    {"id": 7, "text": "zero knowledge proofs"},  # sample-7
    {"id": "q-a", "prompt": "a lazy dog jumps over the fox"},  # a string id: sample-4, its line number
    {"text": "the dog"},  # line 5: sample-5
]
FOLDERS = ["sample-1", "sample-4", "sample-5", "sample-7"]


def write_jsonl(path: Path, records, blank_after: int | None = 2) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")  # a blank line is skipped, but counts for line numbers
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS)


def run(tiny_dir: Path, prompts: Path, out: Path, *extra: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank of the accelerate run: the same kernels, the same bytes
    try:
        return main(["capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out),
                     "--quiet", *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(tiny_dir, prompts_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "ds"
    assert run(tiny_dir, prompts_file, out) == 0
    return out


def files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def stamp(folder: Path) -> dict[str, tuple[int, int]]:
    return {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in files(folder).items()}


# -- (1) one process ----------------------------------------------------------------------------------


def test_single_process_dataset_validates_and_reads_with_pyarrow_and_duckdb(single, tiny_dir, prompts_file):
    import duckdb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    report = zkllm_hf.validate(single, model=model)
    assert report.ok, str(report)
    assert report.summary()["dataset_index"]["passed"] > 0 and report.summary()["weights_fingerprint"]["passed"] == 4
    # no work folder, no locks
    assert sorted(p.name for p in single.iterdir()) == ["capture.json", "manifest.arrow", *FOLDERS]

    ds = zkllm_hf.load_capture(single)
    assert isinstance(ds, zkllm_hf.CaptureDataset) and sorted(ds.units) == [(1, 0), (4, 0), (5, 0), (7, 0)]
    meta = ds.metadata
    assert {u["folder"]: u["prompt_id"] for u in meta["units"]} == {
        "sample-1": 1, "sample-4": "q-a", "sample-5": 5, "sample-7": 7}
    prompts = meta["dataset"]["prompts"]
    assert prompts["sha256"] == zkllm_hf.dataset.read_prompts(prompts_file)[1] and prompts["count"] == 4
    assert meta["dataset"]["ranks"] == 1
    unit = ds.unit(4)
    assert unit.metadata["extra"]["dataset"]["prompt_id"] == "q-a" and unit.metadata["extra"]["dataset"]["line"] == 4
    assert unit.metadata["tokens"]["input_ids"] == [WORDS.index(w) + 3 for w in "a lazy dog jumps over the fox".split()]

    # pyarrow.dataset reads the index as it is, and DuckDB queries it through Arrow
    index = pads.dataset(single / "manifest.arrow", format="arrow")
    assert index.count_rows() == 4 * 3 * 8
    con = duckdb.connect()
    con.register("idx", index)
    per_unit = con.execute(
        "SELECT sample, count(*), sum(byte_size) FROM idx WHERE alias_of IS NULL GROUP BY sample ORDER BY sample"
    ).fetchall()
    assert [r[0] for r in per_unit] == [1, 4, 5, 7] and all(r[1] == 3 * 7 for r in per_unit)
    for sample, _, size in per_unit:
        assert size == sum(p.stat().st_size for p in (single / f"sample-{sample}").glob("*.bin")) * 7 // 8
    assert zkllm_hf.validate(single / "sample-7").ok  # each unit is a capture of its own


def test_the_python_api_matches_the_cli(single, tiny_dir, prompts_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = zkllm_hf.capture_dataset(model, tok, prompts_file, tmp_path / "api", layers="0-2")
    finally:
        torch.set_num_threads(threads)
    assert res.index_written and res.captured == [1, 7, "q-a", 5] and res.ranks == 1
    for name, path in files(single).items():
        if name.endswith(".bin"):
            assert path.read_bytes() == (tmp_path / "api" / name).read_bytes(), name


# -- (2) data-parallel under accelerate launch -----------------------------------------------------------

# Fields that may differ between a 1-rank and a 2-rank run, and why:
#   capture.created_utc       the time each manifest was written
#   manifest_digest           a digest over rows *and* metadata, so it covers created_utc
#   units[].manifest_sha256   (index) the SHA-256 of each unit's manifest file, which holds that unit's time
#   dataset.ranks             (index) how many ranks ran: the provenance the index records on purpose
# Nothing else: not the model path, the device ("cpu" on both), the prompt ids or any row.
TIME_FIELDS = {("capture", "created_utc"), ("manifest_digest",), ("sidecar", "sha256")}
INDEX_FIELDS = TIME_FIELDS | {("units", "manifest_sha256"), ("dataset", "ranks")}


def strip(meta: dict, fields: set[tuple[str, ...]]) -> dict:
    meta = json.loads(json.dumps(meta))
    for f in fields:
        node = meta
        for key in f[:-1]:
            node = node[key]
        for item in node if isinstance(node, list) else [node]:
            item.pop(f[-1])
    return meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_ranks_equal_one_process_byte_for_byte(single, tiny_dir, prompts_file, tmp_path):
    out = tmp_path / "ds2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")}  # no accelerate config: flags only
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its CPU path needs
    # mpirun); the torchrun path starts K, and zkllm-hf asks for the gloo backend when the model is on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "zkllm_hf.cli", "capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts_file),
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 unit(s); captured 4, kept 0 finished; 2 rank(s)" in proc.stdout
    assert proc.stdout.count("unit(s)") == 1  # rank 0 alone reports

    one, two = files(single), files(out)
    assert sorted(one) == sorted(two)
    for name, path in one.items():
        if name.endswith(".bin"):
            assert path.read_bytes() == two[name].read_bytes(), name
            continue
        fields = INDEX_FIELDS if name in ("manifest.arrow", "capture.json") else TIME_FIELDS
        if name.endswith("capture.json"):  # the metadata again (less the two digests, which the times change)
            ja, jb = json.loads(path.read_text()), json.loads(two[name].read_text())
            assert strip(ja, fields - {("manifest_digest",), ("sidecar", "sha256")}) == strip(
                jb, fields - {("manifest_digest",), ("sidecar", "sha256")}), name
            continue
        (ta, ma), (tb, mb) = read_manifest(path), read_manifest(two[name])
        assert ta.equals(tb), name  # every row, every column
        assert strip(ma, fields) == strip(mb, fields), name
    _, index = read_manifest(out / "manifest.arrow")
    assert index["dataset"]["ranks"] == 2 and zkllm_hf.validate(out).ok


# -- (3) resume ------------------------------------------------------------------------------------------


def test_resume_keeps_finished_units_and_redoes_the_rest(single, tiny_dir, prompts_file, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "ds"
    commits = []
    real_commit = StagingDir.commit

    def interrupted(self, write):  # Ctrl-C while the third prompt's capture is being committed
        commits.append(self.out_dir)
        if len(commits) == 3:
            raise KeyboardInterrupt
        return real_commit(self, write)

    monkeypatch.setattr(StagingDir, "commit", interrupted)
    assert run(tiny_dir, prompts_file, out) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [".zkllm-work", "sample-1", "sample-7"]  # no index
    assert not [p for p in out.rglob("*") if "staging" in p.name]
    # what a SIGKILL would have left: a dead process's staging for sample-5, and a unit folder broken since
    dead = out / ".sample-5.zkllm-staging-4194304-00ff00ff00ff"
    dead.mkdir()
    (dead / "PARTIAL").write_text("x")
    broken = out / "sample-7" / "layer-1-mlp-output.bin"
    data = bytearray(broken.read_bytes())
    data[5] ^= 1
    broken.write_bytes(bytes(data))
    kept = stamp(out / "sample-1")

    capsys.readouterr()
    assert run(tiny_dir, prompts_file, out) == 0
    assert "4 unit(s); captured 3, kept 1 finished" in capsys.readouterr().out
    assert stamp(out / "sample-1") == kept  # not rewritten: the same inodes and times
    assert not dead.exists()
    assert sorted(p.name for p in out.iterdir()) == ["capture.json", "manifest.arrow", *FOLDERS]
    for name, path in files(single).items():  # the redone and the new units are what one run writes
        if name.endswith(".bin"):
            assert path.read_bytes() == (out / name).read_bytes(), name
    assert zkllm_hf.validate(out).ok
    assert read_manifest(out / "manifest.arrow")[0].equals(read_manifest(single / "manifest.arrow")[0])

    # finished, same prompts: a no-op that touches nothing, the index included
    before = stamp(out)
    assert run(tiny_dir, prompts_file, out) == 0
    assert "captured 0, kept 4 finished" in capsys.readouterr().out and stamp(out) == before
    # a unit removed: only it is captured again, and the index rewritten
    shutil.rmtree(out / "sample-5")
    assert run(tiny_dir, prompts_file, out) == 0
    assert "captured 1, kept 3 finished" in capsys.readouterr().out
    after = stamp(out)
    index = ("sample-5/", "manifest", "capture.json")  # the index and its capture.json are rewritten
    assert {k: v for k, v in after.items() if not k.startswith(index)} == {
        k: v for k, v in before.items() if not k.startswith(index)}
    assert after["manifest.arrow"] != before["manifest.arrow"] and zkllm_hf.validate(out).ok


def test_steps_mode_units_and_a_missing_step(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [{"id": 3, "text": "the quick fox"}, {"id": 0, "text": "zero knowledge"}]
    res = zkllm_hf.capture_dataset(model, tok, prompts, tmp_path / "st", generate=3, mode="steps", layers="0-1")
    ds = zkllm_hf.load_capture(tmp_path / "st")
    steps = sorted(ds.units)
    assert res.captured == [3, 0] and {s for s, _ in steps} == {0, 3} and (3, 0) in steps and (3, 1) in steps
    assert all(ds.unit(s, k).path == tmp_path / "st" / f"sample-{s}" / f"step-{k}" for s, k in steps)
    assert ds.metadata["capture"]["mode"] == "steps" and zkllm_hf.validate(tmp_path / "st", model=model).ok
    last = max(k for s, k in steps if s == 3)
    shutil.rmtree(tmp_path / "st" / "sample-3" / f"step-{last}")  # the last step lost: the prompt is redone
    again = zkllm_hf.capture_dataset(model, tok, prompts, tmp_path / "st", generate=3, mode="steps", layers="0-1")
    assert again.captured == [3] and again.reused == [0] and zkllm_hf.validate(tmp_path / "st").ok


# -- (4) bad input and folders it may not write into -------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "the fox"'], "line 1: not valid JSON (Expecting ',' delimiter"),
        (['["the fox"]'], "line 1: a JSON list, expected an object"),
        (['{"id": 1}'], 'line 1: no "text" (or "prompt") field'),
        (['{"text": "a", "prompt": "b"}'], 'line 1: has both "text" and "prompt"; keep one'),
        (['{"text": "  "}'], 'line 1: "text" must be a non-empty string'),
        (['{"id": 3, "text": "a"}', '{"id": 3, "text": "the"}'], "line 2: id 3 repeats line 1's; every id must be"),
        (['{"id": "../x", "text": "a"}'], "line 1: id '../x' is not filesystem-safe"),
        (['{"id": -1, "text": "a"}'], "line 1: id -1 is out of range"),
        (['{"id": true, "text": "a"}'], "line 1: id true must be an integer or a string"),
        (['{"id": 2, "text": "a"}', '{"id": "b", "text": "the"}'],
         "line 2: id 'b' would be stored as sample-2 (a string id is stored under its line number), which line 1 "
         "(id 2) also names"),
        (["", "  "], "no prompts"),
    ],
)
def test_bad_jsonl_is_refused_naming_the_line(tiny_dir, tmp_path, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run(tiny_dir, path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_folders_it_may_not_write_into(single, tiny_dir, prompts_file, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    assert run(tiny_dir, prompts_file, busy) == 2
    assert "holds files capture-dataset did not write (notes.txt)" in capsys.readouterr().err
    assert run(tiny_dir, prompts_file, busy, "--overwrite") == 2  # --overwrite never deletes a foreign file
    assert "only replaces a capture or dataset holding nothing else" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    other = write_jsonl(tmp_path / "other.jsonl", [{"id": 1, "text": "the quick brown fox"}, {"id": 2, "text": "a"}])
    copy = tmp_path / "copy"
    shutil.copytree(single, copy)
    assert run(tiny_dir, other, copy) == 2  # another prompt set's units are there
    assert "holds sample-4, sample-5, sample-7, which no prompt of this set names" in capsys.readouterr().err
    changed = write_jsonl(tmp_path / "changed.jsonl", [dict(PROMPTS[0], text="the lazy fox"), *PROMPTS[1:]])
    assert run(tiny_dir, changed, copy) == 2  # the same ids, another text
    assert "sample-1 in" in (err := capsys.readouterr().err) and "captured with text_sha256" in err
    assert run(tiny_dir, prompts_file, copy, "--layers", "0-1") == 2
    assert "captured with layers [0, 1, 2], this run has [0, 1]" in capsys.readouterr().err
    assert run(tiny_dir, changed, copy, "--overwrite") == 0  # replaced as a whole
    assert zkllm_hf.validate(copy).ok and read_manifest(copy / "manifest.arrow")[1]["dataset"]["prompts"]["sha256"] == (
        zkllm_hf.dataset.read_prompts(changed)[1])
    assert not [p for p in tmp_path.iterdir() if ".zkllm-" in p.name]


def test_resume_refuses_units_made_with_another_thread_count(tiny_dir, tmp_path):
    """Defect: resume compared prompt, contract, layers, scale and model, not the intra-op thread count, so a
    unit captured with --threads 2 was kept by a --threads 1 run, and one dataset mixed units whose float32
    bytes depend on different counts (torch's kernels reduce in another order). Like any other setting that
    differs, it is refused, naming the setting; --overwrite replaces the dataset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [{"id": 0, "text": "the quick fox"}, {"id": 1, "text": "zero knowledge"}]
    out = tmp_path / "ds"
    first = zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0-1", threads=2)
    assert first.captured == [0, 1]
    assert {u.metadata["runtime"]["torch_threads"] for u in zkllm_hf.load_capture(out)} == {2}
    before = stamp(out)
    with pytest.raises(FileExistsError, match="threads 2, this run has 1"):
        zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0-1", threads=1)
    assert stamp(out) == before
    again = zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0-1", threads=1, overwrite=True)
    assert again.captured == [0, 1] and again.reused == []
    assert {u.metadata["runtime"]["torch_threads"] for u in zkllm_hf.load_capture(out)} == {1}
    same = zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0-1", threads=1)
    assert same.captured == [] and same.reused == [0, 1] and zkllm_hf.validate(out).ok


def test_a_sha256_dataset_is_kept_only_by_a_sha256_run(tiny_dir, tmp_path):
    """digest="sha256": every unit's files and the index are SHA-256 (recomputed here with hashlib); a run
    with the default BLAKE3 refuses the units, naming the digest, and a sha256 run keeps them."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [{"id": 0, "text": "the quick fox"}, {"id": 1, "text": "zero knowledge"}]
    out = tmp_path / "ds"
    assert zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0-1", digest="sha256").captured == [0, 1]
    table, meta = read_manifest(out / "manifest.arrow")
    assert meta["digest_algorithm"] == "sha256"
    for r in table.to_pylist():
        assert r["sha256"] == hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() and r["blake3"] is None
    before = stamp(out)
    with pytest.raises(FileExistsError, match="digest 'sha256', this run has 'blake3'"):
        zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0-1")
    assert stamp(out) == before
    same = zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0-1", digest="sha256")
    assert same.captured == [] and same.reused == [0, 1] and zkllm_hf.validate(out, model=model).ok
