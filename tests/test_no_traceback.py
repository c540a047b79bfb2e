"""No CLI command prints a traceback, whatever the input (issue 14).

A forger can rewrite a manifest's metadata and re-seal its digest (the digest detects edits, it is not a
signature), so validate, inspect, plan and compare must read any metadata without crashing; capture-dataset
must read any JSONL. Each command answers bad input with exactly one line on stderr and exit code 1, 2 or 3.
The CLI's last-resort handler for unexpected exceptions is switched off here (``ZKLLM_HF_TRACEBACK=1``), so a
hidden bug fails these tests instead of being reported politely.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, tiny_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.manifest import METADATA_KEY, read_manifest, rows_digest, write_manifest

# Reproducible in CI: a fixed sequence of examples, no example database.
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
INT32_MAX = 2**31 - 1


@pytest.fixture(autouse=True, scope="module")
def no_last_resort():
    """Unexpected exceptions propagate (and fail the test) instead of being turned into one line."""
    before = os.environ.get("ZKLLM_HF_TRACEBACK")
    os.environ["ZKLLM_HF_TRACEBACK"] = "1"
    yield
    if before is None:
        del os.environ["ZKLLM_HF_TRACEBACK"]
    else:
        os.environ["ZKLLM_HF_TRACEBACK"] = before


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A one-unit capture and a two-unit dataset of a tiny Llama."""
    base = tmp_path_factory.mktemp("pristine")
    model = make_tiny()
    with torch.no_grad(), zkllm_hf.capture(model, base / "unit"):
        model(tiny_ids(seed=1))
    with torch.no_grad(), zkllm_hf.capture(model, base / "dataset"):
        model(torch.cat([tiny_ids(seed=2), tiny_ids(seed=3)]))
    (base / "zkllm").mkdir()  # a fake --zkllm-root (no scripts: plan would refuse it, after reading the capture)
    return base


def copy_of(pristine: Path, which: str, into: Path) -> Path:
    out = into / which
    shutil.copytree(pristine / which, out)
    return out


def reseal(manifest: Path, edit) -> None:
    """Rewrite a manifest's metadata with ``edit`` and recompute its digest, as a careful forger would
    (by hand: build_table would also put back the format version)."""
    table, meta = read_manifest(manifest)
    edit(meta)
    meta["manifest_digest"] = rows_digest(table.to_pylist(), meta)
    write_manifest(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), manifest)


def commands(cap: Path, root: Path) -> list[list[str]]:
    """Every command that reads a capture folder, as a user would run it on ``cap``."""
    some_file = str(next(cap.rglob("layer-0-block-output.bin")))
    unit = str(next(cap.rglob("layer-0-block-output.bin")).parent)
    return [
        ["validate", str(cap)],
        ["inspect", str(cap)],
        ["plan", str(cap), "--zkllm-root", str(root / "zkllm"), "--force"],
        ["compare", some_file, some_file, "--tolerance-from", unit],
    ]


def invalid(argv: list[str]) -> tuple[int, ...]:
    """The exit code of an unreadable capture: 1 (invalid) for the commands that judge it; compare judges a
    prover's output against it, so there the capture is an input, and unreadable input is exit 2."""
    return (2,) if argv[0] == "compare" else (1,)


def one_error(capsys, argv, codes=(1, 2, 3)) -> str:
    """Run the CLI in-process: exactly one line on stderr, an error exit code, no traceback anywhere."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code in codes, (argv, code, err)
    assert len(lines) == 1, (argv, lines)
    assert "Traceback" not in out + err
    assert lines[0].startswith("zkllm-hf: error: ")
    return lines[0]


# --------------------------------------------------------------------------------------------------
# What zkllm-hf writes into a unit's metadata and every reader relies on (from docs/architecture.md §3 and
# what inspect and plan show): a field, whether every capture has it, and which values are its kind.


def _int(lo, hi):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _opt(test):
    return lambda v: v is None or test(v)


_str = lambda v: isinstance(v, str)  # noqa: E731
_obj = lambda v: isinstance(v, dict)  # noqa: E731
_positive = _int(1, INT32_MAX)

UNIT_FIELDS = {  # path: (required, test of a good value)
    "format_version": (True, lambda v: v == 1 and not isinstance(v, bool)),
    "kind": (True, lambda v: v == "unit"),
    "contract": (True, _obj),
    "contract.folder": (True, lambda v: v == "v1"),
    "contract.version": (True, _str),
    "capture": (True, _obj),
    "capture.scale_log2": (True, _int(0, 30)),
    "capture.hidden_size": (True, _positive),
    "capture.layers": (True, lambda v: isinstance(v, list) and v and all(_int(0, INT32_MAX)(x) for x in v)),
    "capture.mode": (True, _str),
    "capture.created_utc": (True, _str),
    "capture.residuals": (False, lambda v: v in ("model", "exact-int")),
    "tokens": (True, _obj),
    "tokens.seq_len": (True, _positive),
    "tokens.prompt_token_count": (True, _int(0, INT32_MAX)),
    "tokens.input_ids": (False, _opt(lambda v: isinstance(v, list) and all(_int(0, 2**63)(x) for x in v))),
    "model": (True, _obj),
    "model.class": (True, _str),
    "model.dtype": (True, _str),
    "model.quantization": (False, _opt(_obj)),
    "model.intermediate_size": (False, _opt(_positive)),
    "model.num_attention_heads": (False, _opt(_positive)),
    "model.num_key_value_heads": (False, _opt(_positive)),
    "model.rms_norm_eps": (False, _opt(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)),
    "versions": (True, _obj),
    "versions.zkllm_hf": (True, _str),
    "versions.transformers": (True, _str),
    "versions.torch": (True, _str),
    "unit": (True, _obj),
    "unit.phase": (True, _str),
    "unit.sample": (True, _int(0, INT32_MAX)),
    "unit.step": (True, _int(0, INT32_MAX)),
    "ffn": (False, _opt(_obj)),
    "ffn.gate_abs_max": (False, _opt(lambda v: isinstance(v, list))),
    "residuals": (False, _opt(_obj)),
    "residuals.drift": (False, _opt(lambda v: isinstance(v, list))),
}
GATE_FIELDS = {"layer": _int(0, INT32_MAX), "value": lambda v: isinstance(v, (int, float)) and not v < 0}
INDEX_FIELDS = {"folder", "sample", "step", "manifest_sha256"}  # every unit entry of a dataset index has them


def _deep(depth: int):
    value: object = 0
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


# Values of every JSON kind, and the edges of numbers: a wrong value for any field is among them.
ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, -(2**31), 2**31, 2**63, 10**30, 16.5, -0.0, math.inf, -math.inf, math.nan]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "16", "x", "-1", "v2", "../v1", "\n", "\ud800"]),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["layer", "value", "folder", "x"]), st.integers(-2, 2), max_size=2),
    st.integers(2, 60).map(_deep),
)


def _parent(meta: dict, path: str):
    *head, last = path.split(".")
    node = meta
    for key in head:
        node = node[key]
    return node, last


def _get(meta: dict, path: str):
    node, last = _parent(meta, path)
    return node[last]


@st.composite
def unit_mutations(draw, meta: dict):
    """An edit that makes a unit's metadata wrong by what zkllm-hf writes, and the field it breaks."""
    present = [p for p in UNIT_FIELDS if _has(meta, p)]
    path = draw(st.sampled_from(present))
    required, good = UNIT_FIELDS[path]
    kind = draw(st.sampled_from(["delete", "replace", "item"] if path in ("ffn.gate_abs_max", "capture.layers")
                                else ["delete", "replace"]))
    if kind == "delete" and required:
        return (lambda m: _parent(m, path)[0].pop(_parent(m, path)[1])), path
    if kind == "item" and _get(meta, path):
        i = draw(st.integers(0, len(_get(meta, path)) - 1))
        if path == "capture.layers":
            bad = draw(ODD.filter(lambda v: not _int(0, INT32_MAX)(v)))
            return (lambda m: _get(m, path).__setitem__(i, bad)), path
        key = draw(st.sampled_from(sorted(GATE_FIELDS)))
        if draw(st.booleans()):
            return (lambda m: _get(m, path)[i].pop(key)), f"{path}[{i}].{key}"
        bad = draw(ODD.filter(lambda v: not GATE_FIELDS[key](v)))
        return (lambda m: _get(m, path)[i].__setitem__(key, bad)), f"{path}[{i}].{key}"
    bad = draw(ODD.filter(lambda v: not good(v)))
    return (lambda m: _parent(m, path)[0].__setitem__(_parent(m, path)[1], copy.deepcopy(bad))), path


def _has(meta: dict, path: str) -> bool:
    try:
        _get(meta, path)
    except (KeyError, TypeError):
        return False
    return True


@given(data=st.data())
@FUZZ
def test_any_resealed_unit_metadata_error_is_one_line(pristine, capsys, data):
    """Defect: manifest metadata with missing or mistyped fields (tokens, seq_len, model, class, gate_abs_max,
    intermediate_size, negative shapes ...), re-sealed, made validate/inspect/plan/compare raise KeyError,
    TypeError or AttributeError tracebacks. Now each names the field and exits 1 (an invalid capture)."""
    _, meta = read_manifest(pristine / "unit" / "manifest.arrow")
    edit, field = data.draw(unit_mutations(meta))
    with tempfile.TemporaryDirectory() as tmp:
        cap = copy_of(pristine, "unit", Path(tmp))
        reseal(cap / "manifest.arrow", edit)
        for argv in commands(cap, pristine):
            line = one_error(capsys, argv, codes=invalid(argv))
            assert field.split(".")[-1].split("[")[0] in line, (argv, field, line)


@st.composite
def index_mutations(draw, meta: dict):
    """An edit of a dataset index's unit list, or of a field the index shares with units, that breaks it."""
    what = draw(st.sampled_from(["entry", "key", "units", "shared"]))
    units = meta["units"]
    i = draw(st.integers(0, len(units) - 1))
    if what == "entry":  # the entry itself is not an object
        bad = draw(ODD.filter(lambda v: not isinstance(v, dict)))
        return (lambda m: m["units"].__setitem__(i, copy.deepcopy(bad))), "units"
    if what == "key":
        key = draw(st.sampled_from(sorted(INDEX_FIELDS)))
        if draw(st.booleans()):
            return (lambda m: m["units"][i].pop(key)), key
        good = {"folder": lambda v: isinstance(v, str) and v == units[i]["folder"], "manifest_sha256": _str}.get(
            key, _int(0, INT32_MAX))
        bad = draw(ODD.filter(lambda v: not good(v)))
        return (lambda m: m["units"][i].__setitem__(key, copy.deepcopy(bad))), key
    if what == "units":
        bad = draw(st.one_of(st.just([]), ODD.filter(lambda v: not isinstance(v, list))))
        return (lambda m: m.__setitem__("units", copy.deepcopy(bad))), "units"
    path = draw(st.sampled_from(["capture", "capture.mode", "capture.layers", "capture.scale_log2", "model",
                                 "model.class", "contract", "contract.folder", "versions"]))
    required, good = UNIT_FIELDS[path]
    if draw(st.booleans()):
        return (lambda m: _parent(m, path)[0].pop(_parent(m, path)[1])), path
    bad = draw(ODD.filter(lambda v: not good(v)))
    return (lambda m: _parent(m, path)[0].__setitem__(_parent(m, path)[1], copy.deepcopy(bad))), path


@given(data=st.data())
@FUZZ
def test_any_resealed_index_error_is_one_line(pristine, capsys, data):
    """Defect: a dataset index whose `units` entry is not an object (or lacks its folder, sample, step)
    made validate and inspect raise AttributeError: 'int' object has no attribute 'get'."""
    _, meta = read_manifest(pristine / "dataset" / "manifest.arrow")
    edit, field = data.draw(index_mutations(meta))
    with tempfile.TemporaryDirectory() as tmp:
        cap = copy_of(pristine, "dataset", Path(tmp))
        reseal(cap / "manifest.arrow", edit)
        for argv in commands(cap, pristine)[:3]:  # compare reads a unit, not the index
            line = one_error(capsys, argv, codes=invalid(argv))
            assert field.split(".")[-1] in line, (argv, field, line)


# The manifest's rows: what zkllm-hf writes in every column (docs/architecture.md §3).
NOT_NULL = ["sample", "step", "phase", "layer", "point", "file", "rows", "cols", "dtype", "scale_log2", "byte_size",
            "blake3", "source_dtype", "int_min", "int_max", "headroom", "hf_module", "hook"]  # blake3: the digest
AT_LEAST = {"rows": 1, "cols": 1, "byte_size": 0, "layer": 0, "sample": 0, "step": 0}


@st.composite
def row_mutations(draw, table):
    """A manifest table with one column made wrong: another type, a null, or a negative shape or index."""
    import pyarrow as pa

    kind = draw(st.sampled_from(["type", "null", "range"]))
    row = draw(st.integers(0, table.num_rows - 1))
    if kind == "type":
        name = draw(st.sampled_from(table.column_names))
        other = pa.string() if table.schema.field(name).type != pa.string() else pa.int64()
        values = [str(v) if other == pa.string() else len(str(v)) for v in table.column(name).to_pylist()]
        return table.set_column(table.column_names.index(name), name, pa.array(values, other)), name
    if kind == "null":
        name = draw(st.sampled_from(NOT_NULL))
        values = table.column(name).to_pylist()
        values[row] = None
    else:
        name = draw(st.sampled_from(sorted(AT_LEAST)))
        values = table.column(name).to_pylist()
        values[row] = draw(st.integers(-(2**31), AT_LEAST[name] - 1))
    field = table.schema.field(name)
    return table.set_column(table.column_names.index(name), field, pa.array(values, field.type)), name


@given(data=st.data())
@FUZZ
def test_any_resealed_manifest_row_error_is_one_line(pristine, capsys, data):
    """Defect: a re-sealed manifest whose rows hold a null (file, rows, headroom), a column of another type
    (layer as text) or a negative shape crashed validate, inspect and plan (TypeError in a sort or a product,
    OverflowError from memmap). The loader now names the column and the row: exit 1."""
    with tempfile.TemporaryDirectory() as tmp:
        cap = copy_of(pristine, "unit", Path(tmp))
        table, meta = read_manifest(cap / "manifest.arrow")
        table, name = data.draw(row_mutations(table))
        meta["manifest_digest"] = rows_digest(table.to_pylist(), meta)
        write_manifest(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), cap / "manifest.arrow")
        for argv in commands(cap, pristine):
            line = one_error(capsys, argv, codes=invalid(argv))
            assert f"'{name}'" in line, (argv, line)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100000,  # nested beyond what json (and Python's recursion limit) reads
        json.dumps({"kind": "unit", "extra": _deep(500)}).encode(),  # readable, but deeper than any capture
        b"[1, 2]",  # JSON, but not an object
        b"\xff\xfe",  # not UTF-8
        b'{"kind": "unit", "tokens": {"seq_len": 1' + b"0" * 5000 + b"}}",  # an int json refuses to read
    ],
    ids=["100k-deep", "500-deep", "array", "not-utf8", "5000-digits"],
)
def test_unreadable_metadata_is_one_line(pristine, tmp_path, capsys, raw):
    """Defect: metadata nested 100000 deep raised RecursionError from read_manifest; metadata that is not a
    JSON object raised AttributeError. The digest cannot even be computed: no reader may crash either way."""
    cap = copy_of(pristine, "unit", tmp_path)
    table, _ = read_manifest(cap / "manifest.arrow")
    write_manifest(table.replace_schema_metadata({METADATA_KEY: raw}), cap / "manifest.arrow")
    for argv in commands(cap, pristine):
        assert "metadata" in one_error(capsys, argv, codes=invalid(argv))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.pop("tokens"), "tokens"),
        (lambda m: m["tokens"].__setitem__("seq_len", "16"), "seq_len"),
        (lambda m: m["tokens"].__setitem__("seq_len", -16), "seq_len"),
        (lambda m: m.pop("model"), "model"),
        (lambda m: m["model"].pop("class"), "class"),
        (lambda m: m["ffn"].__setitem__("gate_abs_max", "x"), "gate_abs_max"),
        (lambda m: m["ffn"]["gate_abs_max"][0].__setitem__("layer", "a"), "layer"),
        (lambda m: m["model"].__setitem__("intermediate_size", "x"), "intermediate_size"),
        (lambda m: m["capture"].__setitem__("hidden_size", -64), "hidden_size"),
        (lambda m: m["capture"].__setitem__("layers", "abc"), "layers"),
        (lambda m: m.__setitem__("capture", []), "capture"),
        (lambda m: m.__setitem__("format_version", 2), "format_version"),
    ],
    ids=["no-tokens", "seq_len-str", "seq_len-neg", "no-model", "no-class", "gate-str", "gate-layer-str",
         "intermediate-str", "hidden-neg", "layers-str", "capture-list", "format-2"],
)
def test_named_metadata_defects(pristine, tmp_path, capsys, edit, field):
    """The defects issue 14 lists, one by one: each command names the field, exits 1, no traceback."""
    cap = copy_of(pristine, "unit", tmp_path)
    reseal(cap / "manifest.arrow", edit)
    for argv in commands(cap, pristine):
        line = one_error(capsys, argv, codes=invalid(argv))
        assert f"'{field}" in line or f".{field}" in line, (argv, line)
    report = zkllm_hf.validate(cap)
    assert not report.ok and report.failures[0].check == ("format_version" if field == "format_version" else "manifest")


def test_validate_names_the_first_failure_on_stderr(pristine, tmp_path, capsys):
    """validate's exit 1 comes with one line on stderr (the report stays on stdout), as every command's does."""
    cap = copy_of(pristine, "unit", tmp_path)
    (cap / "layer-0-mlp-output.bin").unlink()
    line = one_error(capsys, ["validate", str(cap)], codes=(1,))
    assert "INVALID" in line and "layer-0-mlp-output.bin" in line


# --------------------------------------------------------------------------------------------------
# capture-dataset's JSONL


@pytest.fixture(scope="module")
def no_model(tmp_path_factory):
    """A --model folder without config.json: a prompt set that reads fine ends in a one-line model error."""
    return tmp_path_factory.mktemp("no-model")


def capture_dataset(prompts: Path, out: Path, model: Path) -> list[str]:
    return ["capture-dataset", "--prompts", str(prompts), "--out", str(out), "--model", str(model), "--quiet"]


@pytest.mark.parametrize(
    "line",
    [
        "[" * 100000,
        '{"text": "a", "id": ' + "[" * 100000 + "]" * 100000 + "}",
        '{"text": ' + "[" * 3000 + "]" * 3000 + "}",
        '{"text": "a", "id": ' + "[" * 900 + "]" * 900 + "}",
        '{"text": "a", "id": ' + "9" * 5000 + "}",
        '{"text": "the \\ud800 fox"}',
    ],
    ids=["100k-deep", "deep-id", "deep-text", "900-deep-id", "5000-digit-id", "lone-surrogate"],
)
def test_named_jsonl_defects(tmp_path, no_model, capsys, line):
    """Defect: a JSONL line nested 100000 (or 3000) deep raised RecursionError; an id of 5000 digits gave
    Python's int-conversion message without the line; a lone surrogate reached the tokenizer (TypeError).
    Each is now one line naming --prompts and the line number, exit 2, before any model loads."""
    (tmp_path / "p.jsonl").write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    err = one_error(capsys, capture_dataset(tmp_path / "p.jsonl", tmp_path / "out", no_model), codes=(2,))
    assert "--prompts" in err and "line 2" in err, err
    assert not (tmp_path / "out").exists()


def test_a_line_separator_inside_a_json_string_does_not_split_the_line():
    """Defect: read_prompts split lines with str.splitlines, which also breaks at U+2028, U+0085 and form
    feeds, all of which JSON allows raw inside a string: a valid prompt was refused as 'not valid JSON'."""
    from zkllm_hf.dataset import read_prompts

    texts = ["one\u2028two", "three\x85four", "five\x0csix", "seven\x1ceight"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
        prompts, _ = read_prompts(path)
    assert [p.text for p in prompts] == texts
    assert [p.line for p in prompts] == [1, 2, 3, 4]


JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def bad_lines(draw):
    """One JSONL line that is not a usable prompt: broken JSON, deep nesting, wrong types, bad ids."""
    kind = draw(st.sampled_from(["deep", "value", "text", "id", "bytes", "both"]))
    if kind == "deep":
        depth = draw(st.sampled_from([2, 500, 990, 1000, 5000, 100000]))
        inner = "[" * depth + "]" * depth
        return draw(st.sampled_from([inner, '{"text": ' + inner + "}", '{"text": "a", "id": ' + inner + "}"]))
    if kind == "value":  # JSON, but not an object
        return json.dumps(draw(JSON_VALUE.filter(lambda v: not isinstance(v, dict))))
    if kind == "text":  # no usable text
        text = draw(st.one_of(JSON_VALUE.filter(lambda v: not (isinstance(v, str) and v.strip())),
                              st.just("\ud800"), st.text(max_size=3).map(lambda s: s + "\udfff")))
        return json.dumps({draw(st.sampled_from(["text", "prompt", "txt"])): text})
    if kind == "id":
        pid = draw(st.one_of(JSON_VALUE.filter(lambda v: not isinstance(v, (int, str)) or isinstance(v, bool)),
                             st.integers().filter(lambda i: not 0 <= i < 2**31), st.sampled_from(["", ".x", "a/b",
                                                                                                    "x" * 65])))
        return json.dumps({"text": "fine", "id": pid})
    if kind == "both":
        return json.dumps({"text": "a", "prompt": "b"})
    return draw(st.binary(min_size=1, max_size=12)).decode("latin-1") + "\x00{"  # not JSON


@given(lines=st.lists(st.one_of(bad_lines(), st.just('{"text": "fine"}')), min_size=1, max_size=4))
@FUZZ
def test_any_jsonl_is_one_line(tmp_path, no_model, capsys, lines):
    """No JSONL file makes capture-dataset print a traceback: a bad line is named (--prompts, its number),
    a good file goes on to the (absent) model and fails there, in one line either way."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "p.jsonl"
        prompts.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        err = one_error(capsys, capture_dataset(prompts, Path(tmp) / "out", no_model), codes=(2,))
        if any(line != '{"text": "fine"}' for line in lines):
            assert "--prompts" in err, err
        assert not (Path(tmp) / "out").exists()


# --------------------------------------------------------------------------------------------------
# validate --model of a model that is not Llama-shaped


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_validate_refuses_a_model_that_is_not_llama_shaped(pristine, tmp_path, capsys, arch):
    """Defect: `validate --model` of a GPT-2 or BERT folder raised UnsupportedModelError with a traceback.
    Now one line names --model, the class, and the families zkllm-hf captures (points.ARCHITECTURES)."""
    import transformers

    from zkllm_hf.points import SUPPORTED_MODEL_TYPES

    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
                                                                     n_positions=32))
    else:
        model = transformers.BertLMHeadModel(transformers.BertConfig(
            num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=64,
            is_decoder=True))
    model.save_pretrained(tmp_path / arch)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the loading bar is not an error line (validate has no --quiet)
    try:
        line = one_error(capsys, ["validate", str(pristine / "unit"), "--model", str(tmp_path / arch)], codes=(2,))
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    assert f"--model {tmp_path / arch}" in line and type(model).__name__ in line
    assert all(t in line for t in SUPPORTED_MODEL_TYPES), line


# --------------------------------------------------------------------------------------------------
# The last resort


def test_an_unexpected_exception_is_one_line_and_exit_3(pristine, capsys, monkeypatch):
    """A bug zkllm-hf does not foresee still gives one line (the exception's type, a request to report it)
    and exit 3; ZKLLM_HF_TRACEBACK=1 shows the traceback instead (as every other test here runs)."""
    import zkllm_hf.cli.check as check

    def broken(args):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(check, "cmd_inspect", broken)
    monkeypatch.delenv("ZKLLM_HF_TRACEBACK")
    line = one_error(capsys, ["inspect", str(pristine / "unit")], codes=(3,))
    assert "RuntimeError" in line and "something nobody foresaw" in line and "report" in line
    assert "ZKLLM_HF_TRACEBACK=1" in line
    monkeypatch.setenv("ZKLLM_HF_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        main(["inspect", str(pristine / "unit")])
