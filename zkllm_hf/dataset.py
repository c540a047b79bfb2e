"""``capture_dataset()``: a prompt set captured as one unit per prompt, in one process or data-parallel.

Each prompt runs alone (a batch of one), through the public adapters: ``capture()`` for a forward,
:class:`~zkllm_hf.CaptureLogitsProcessor` inside ``generate()``. So every unit is a complete capture that
the engine checked and moved into place whole, and its bytes do not depend on the other prompts or on the
rank that ran it. Under ``accelerate launch`` each rank takes the prompts at positions ``rank, rank + K,
...`` of the file; once every rank has finished, rank 0 alone writes the dataset index ``manifest.arrow``
with the engine's index builder, so ``validate``, ``inspect`` and ``load_capture`` read the result as any
other dataset.

A re-run resumes: a unit whose manifest is present and that passes every check of its contract that can run
without the model (as ``validate`` runs them: capture, file and layer checks) is kept untouched; a missing
or broken one is captured again, and a dead process's staging is removed by the target locks. The index is
written last, so a folder without it is not a finished dataset. What the run may replace or delete is
decided by manifest, never by name (:func:`zkllm_hf.writer.foreign_files`): anything else in the folder
makes it refuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .contracts import (
    INDEX_KINDS,
    ContractViolation,
    load_contract,
)
from .engine import CaptureError, build_index, index_rows
from .hooks import find_layout
from .manifest import read_manifest, table_metadata, write_manifest
from .metadata import shown
from .models import context_error, tokenize_batch
from .points import parse_layers
from .validate import _contract_of, _validate
from .writer import (
    MANIFEST_NAME,
    STEP_DIR,
    UNIT_DIR,
    WORK,
    TargetLock,
    _fsync_dir,
    foreign_files,
    leftover_name,
    remove_leftovers,
    sha256_file,
    shown_paths,
    zkllm_manifest,
)

logger = logging.getLogger(__name__)

MAX_SAMPLE = 2**31 - 1  # the manifest's sample column is int32
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_UNIT, _STEP = UNIT_DIR, STEP_DIR  # sample-N/ and its step-K/ folders


class PromptsError(ValueError):
    """The prompt set cannot be used as given (bad JSONL, a bad or repeated id)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set: its id (as given, or its line number), the sample number naming its folder."""

    id: int | str
    sample: int  # folder sample-{sample}: the id if it is an integer, else the line number
    text: str
    line: int  # 1-based line in the JSONL file (position in a Python list, from 1)

    @property
    def folder(self) -> str:
        return f"sample-{self.sample}"

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def where(self) -> str:
        return f"line {self.line} (id {self.id!r})"


@dataclass
class DatasetResult:
    """What one rank did. ``index_written`` is true on rank 0 when it wrote (or rewrote) the index."""

    out_dir: Path
    rank: int
    ranks: int
    captured: list[int | str] = field(default_factory=list)  # ids captured now, by every rank
    reused: list[int | str] = field(default_factory=list)  # ids found finished and kept, by every rank
    units: list[dict[str, Any]] = field(default_factory=list)  # the index's unit list (rank 0)
    index_written: bool = False
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# The prompt set


def read_prompts(path: str | os.PathLike[str]) -> tuple[list[Prompt], str]:
    """Parse a JSONL prompt file; return the prompts and the file's SHA-256."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PromptsError(f"--prompts {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptsError(f"--prompts {path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    records = []
    # JSON Lines ends a line at "\n" only: str.splitlines would also split at U+2028, U+0085 or a form feed,
    # which JSON allows raw inside a string.
    for number, line in enumerate(text.removesuffix("\n").split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        at = f"--prompts {path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptsError(
                f"{at}: not valid JSON ({exc.msg} at column {exc.colno}); each line "
                f'must be one JSON object such as {{"id": 1, "text": "..."}}'
            ) from None
        except RecursionError:
            raise PromptsError(
                f'{at}: nested too deeply to read; each line must be one flat JSON object such as {{"id": 1, '
                f'"text": "..."}}'
            ) from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise PromptsError(f"{at}: not readable JSON ({str(exc).splitlines()[0][:100]}); {_ONE_OBJECT}") from None
        records.append((number, obj))
    return parse_prompts(records, source=f"--prompts {path}"), hashlib.sha256(data).hexdigest()


_ONE_OBJECT = 'each line must be one JSON object such as {"id": 1, "text": "..."}'


def parse_prompts(records: Iterable[tuple[int, Any]], *, source: str = "prompts") -> list[Prompt]:
    """Check ``(line, object)`` records and turn them into prompts, with errors that name the line."""
    prompts: list[Prompt] = []
    by_id: dict[int | str, int] = {}
    by_sample: dict[int, Prompt] = {}
    for line, obj in records:
        at = f"{source} line {line}"
        if not isinstance(obj, Mapping):
            raise PromptsError(f'{at}: a JSON {type(obj).__name__}, expected an object such as {{"text": "..."}}')
        keys = [k for k in ("text", "prompt") if k in obj]
        if len(keys) != 1:
            raise PromptsError(
                f'{at}: has both "text" and "prompt"; keep one'
                if keys
                else f'{at}: no "text" (or "prompt") field; give the prompt as {{"text": "..."}}'
            )
        text = obj[keys[0]]
        if not isinstance(text, str) or not text.strip():
            raise PromptsError(f'{at}: "{keys[0]}" must be a non-empty string, got {shown(text)}')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a broken "\ud83d" escape
            raise PromptsError(
                f'{at}: "{keys[0]}" holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), which '
                f"is not text; fix its \\u escapes (a pair such as \\ud83d\\ude00 is one character)"
            ) from None
        pid = obj.get("id", line)
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise PromptsError(f'{at}: id {shown(pid)} must be an integer or a string; use e.g. 17 or "q-17"')
        if isinstance(pid, int):
            if not 0 <= pid <= MAX_SAMPLE:
                raise PromptsError(
                    f"{at}: id {shown(pid)} is out of range; an integer id names the folder sample-{{id}}: use 0 to "
                    f"{MAX_SAMPLE}, or a string id"
                )
            sample = pid
        else:
            if not _SAFE_ID.match(pid):
                raise PromptsError(
                    f"{at}: id {pid!r} is not filesystem-safe; use 1-64 letters, digits, '_', '.' or '-' "
                    f"(not starting with '.' or '-')"
                )
            sample = line
        if pid in by_id:
            raise PromptsError(f"{at}: id {pid!r} repeats line {by_id[pid]}'s; every id must be unique")
        other = by_sample.get(sample)
        if other is not None:
            raise PromptsError(
                f"{at}: id {pid!r} would be stored as sample-{sample}"
                + (" (a string id is stored under its line number)" if isinstance(pid, str) else "")
                + f", which {other.where()} also names; give every prompt an integer id, or none"
            )
        by_id[pid] = line
        prompt = Prompt(pid, sample, text, line)
        by_sample[sample] = prompt
        prompts.append(prompt)
    if not prompts:
        raise PromptsError(f'{source}: no prompts (one JSON object per line, such as {{"text": "..."}})')
    return prompts


def _as_prompts(prompts: str | os.PathLike[str] | Sequence[str | Mapping[str, Any]]) -> tuple[list[Prompt], dict]:
    if isinstance(prompts, (str, os.PathLike)):
        parsed, sha = read_prompts(prompts)
        return parsed, {"file": str(prompts), "sha256": sha}
    records = [(i, {"text": p} if isinstance(p, str) else p) for i, p in enumerate(prompts, 1)]
    return parse_prompts(records), {"file": None, "sha256": None}


def _digest(prompts: Sequence[Prompt]) -> str:
    canon = json.dumps([[p.id, p.text] for p in prompts], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# The output folder


def check_out_dir(out: str | os.PathLike[str], prompts: Sequence[Prompt], overwrite: bool) -> None:
    """Refuse an output folder that holds anything zkllm-hf does not own, by manifest (read-only).

    Without ``overwrite`` it may hold this set's units, its index and an interrupted run's leftovers; with
    it, any zkllm-hf capture or dataset holding nothing else, which is replaced. Ownership is
    :func:`~zkllm_hf.writer.foreign_files`, the rule ``capture`` applies too.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output path '{out}' exists and is not a directory; choose another --out")
    foreign = foreign_files(out)
    if foreign and overwrite:
        raise FileExistsError(
            f"output directory '{out}' holds files zkllm-hf did not write ({shown_paths(foreign)}); --overwrite "
            f"only replaces a capture or dataset holding nothing else. Move them away or choose another --out"
        )
    if foreign:
        raise FileExistsError(
            f"output directory '{out}' holds files capture-dataset did not write ({shown_paths(foreign)}); it "
            f"resumes only its own dataset. Move them away, pass --overwrite to replace a zkllm-hf capture, or "
            f"choose another --out"
        )
    if overwrite:
        return
    index = zkllm_manifest(out / MANIFEST_NAME)
    if index is not None and index[1].get("kind") != "dataset":
        raise FileExistsError(
            f"output directory '{out}' holds a zkllm-hf capture of one unit ({MANIFEST_NAME} is a unit's), not a "
            f"dataset; pass --overwrite to replace it, or choose another --out"
        )
    samples = {p.sample for p in prompts}
    stray = [e.name for e in sorted(out.iterdir()) if (m := _UNIT.match(e.name)) and int(m[1]) not in samples]
    if stray:
        raise FileExistsError(
            f"output directory '{out}' holds {shown_paths(stray)}, which no prompt of this set names (another "
            f"prompt set was captured there); pass --overwrite to replace it, or choose another --out"
        )


def _refuse_foreign(out: Path, name: str) -> None:
    """Before replacing ``out/name``: refuse if anything in it is not zkllm-hf's (it may have changed since
    the folder was checked)."""
    foreign = foreign_files(out, only=name)
    if foreign:
        raise FileExistsError(
            f"{out / name} holds files zkllm-hf did not write ({shown_paths(foreign)}); move them away"
        )


def _discard(path: Path) -> None:
    """Delete an entry of ours: first renamed to a pid-named leftover, so a half-deleted one is never taken
    for a unit (or for anyone's), then removed."""
    if path.is_dir() and not path.is_symlink():
        old = leftover_name(path, "old")
        os.rename(path, old)
        shutil.rmtree(old, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clear_work(out: Path) -> None:
    """Remove the work folder's entries that are ours, then the folder if that empties it."""
    work = out / WORK
    if not work.is_dir() or work.is_symlink():
        return
    foreign = foreign_files(out, only=WORK)
    for entry in list(work.iterdir()):
        name = f"{WORK}/{entry.name}"
        if not any(f == name or f.startswith(name + "/") for f in foreign):
            _discard(entry)
    try:
        work.rmdir()
    except OSError:  # something not ours is left there: it stays, and so does the folder
        pass


def _unit_manifests(folder: Path) -> list[Path]:
    """The manifests of one prompt's units: ``sample-N/manifest.arrow`` or ``sample-N/step-K/manifest.arrow``."""
    if (folder / MANIFEST_NAME).is_file():
        return [folder / MANIFEST_NAME]
    steps = sorted((int(m[1]), p) for p in folder.glob("step-*") if (m := _STEP.match(p.name)))
    return [p / MANIFEST_NAME for _, p in steps]


def _settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a unit must share with this run to be kept: the prompt, how it was captured, the model."""
    model, capture = meta.get("model") or {}, meta.get("capture") or {}
    asked = dict((meta.get("extra") or {}).get("dataset") or {})
    asked.pop("line", None)
    return {
        "prompt": asked,
        "contract": meta.get("contract"),
        "mode": capture.get("mode"),
        "layers": capture.get("layers"),
        "scale_log2": capture.get("scale_log2"),
        "residuals": capture.get("residuals", "model"),
        "threads": (meta.get("runtime") or {}).get("torch_threads"),  # float32 bytes depend on it
        "model": {k: model.get(k) for k in ("config_sha256", "weights_fingerprint", "dtype", "quantization")},
    }


def _difference(got: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    for key in want:
        if got.get(key) != want[key]:
            if key == "prompt":
                for k in want[key]:
                    if got[key].get(k) != want[key][k]:
                        return f"with {k} {got[key].get(k)!r}, this run has {want[key][k]!r}"
            return f"with {key} {got.get(key)!r}, this run has {want[key]!r}"
    return None


def _verify(folder: Path, prompt: Prompt, want: Mapping[str, Any]) -> str | None:
    """None if ``folder`` holds this prompt's finished, intact units captured as this run asks; else why not."""
    manifests = _unit_manifests(folder)
    if not manifests:
        return "no manifest.arrow"
    steps = None
    for i, path in enumerate(manifests):
        try:
            meta = read_manifest(path)[1]
            _contract_of(meta, None)  # a contract outside the package is not this run's
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{path.relative_to(folder.parent)} cannot be read ({exc})"
        unit = meta.get("unit") or {}
        if meta.get("kind") != "unit" or unit.get("sample") != prompt.sample:
            return f"{path.relative_to(folder.parent)} is not the unit of sample {prompt.sample}"
        why = _difference(_settings(meta), want)
        if why is not None:
            return f"captured {why}"
        if len(manifests) > 1 or path.parent != folder:  # steps: exactly step-0 .. step-(S-1)
            steps = (meta.get("generation") or {}).get("steps") if steps is None else steps
            if unit.get("step") != i or path.parent.name != f"step-{i}":
                return f"step {i} is missing"
        failed = _validate(path.parent, None, progress=False).failures  # every check that runs without the model
        if failed:
            return f"{path.parent.relative_to(folder.parent)} fails {failed[0].describe()}"
    if steps is not None and len(manifests) != steps:
        return f"{len(manifests)} step folders, the generation ran {steps} steps"
    return None


def _mismatch(folder: Path, want: Mapping[str, Any]) -> str | None:
    """Why the units in ``folder`` were captured otherwise than this run asks (their manifests only)."""
    for path in _unit_manifests(folder)[:1]:
        try:
            meta = read_manifest(path)[1]
        except (OSError, ValueError):
            return None  # unreadable: broken, captured again
        return _difference(_settings(meta), want)
    return None


# --------------------------------------------------------------------------------------------------
# Capture


def _state(state: Any, cpu: bool) -> Any:
    if state is not None:
        return state
    from accelerate import PartialState

    return PartialState(cpu=cpu)


class _Progress:
    """On the main process: one bar over every rank's units, counted from the finished unit folders."""

    def __init__(self, out: Path, prompts: Sequence[Prompt], enabled: bool):
        self.out, self.prompts, self._bar, self._stop = out, prompts, None, threading.Event()
        if not enabled:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=len(prompts), desc="units (all ranks)", unit="unit", initial=self._count())
        self._thread = threading.Thread(target=self._poll, name="zkllm-dataset-progress", daemon=True)
        self._thread.start()

    def _count(self) -> int:
        return sum((self.out / p.folder).is_dir() for p in self.prompts)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._update()

    def _update(self) -> None:
        if self._bar is not None:
            self._bar.n = self._count()
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._stop.set()
            self._thread.join()
            self._update()
            self._bar.close()
            self._bar = None


def capture_dataset(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | os.PathLike[str] | Sequence[str | Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    layers: Sequence[int] | str | None = None,
    scale_log2: int = 16,
    pad_to: int | None = None,
    generate: int | None = None,
    mode: str = "prefill",
    residuals: str = "model",
    overwrite: bool = False,
    progress: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
    state: Any = None,
    threads: int | None = 1,
) -> DatasetResult:
    """Capture each prompt as a unit ``sample-{id}/`` under ``out_dir``, then write the dataset index.

    ``prompts`` is a JSONL file (one ``{"text": ..., "id": ...}`` object per line; ``"prompt"`` may stand
    for ``"text"``; the id defaults to the line number) or a list of strings or such objects. An integer
    id names the folder, ``sample-{id}``; a string id (letters, digits, ``_.-``) is recorded and its line
    number names the folder. Each prompt runs alone: a forward (right-padded to ``pad_to`` if given), or
    with ``generate=N`` a greedy ``generate()`` captured in ``mode`` (``prefill``, ``full`` with
    ``pad_to``, or ``steps``: ``sample-{id}/step-{k}/``). ``residuals`` is as for :func:`zkllm_hf.capture`.

    Run it on every rank under ``accelerate launch`` (``state`` is an ``accelerate.PartialState``; by
    default one is made): rank ``r`` of ``K`` captures the prompts at positions ``r, r + K, ...``, and
    rank 0 writes the index once every rank has finished. A re-run keeps the finished units and captures
    the rest; with every unit finished and the index current, it changes nothing. ``overwrite`` replaces a
    dataset (or a zkllm-hf capture) that is there.

    ``threads`` is torch's intra-op thread count for each unit's capture (set around it, the caller's own
    restored after; ``None`` leaves it alone). torch's CPU kernels give other float32 bits with another
    count and accelerate gives each rank one thread, so the default 1 is what makes a unit's bytes the same
    in one process and in K ranks. Each unit's manifest records the count (``runtime.torch_threads``).
    """
    t0 = time.perf_counter()
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r}: give a positive intra-op thread count (1, the default, or None)")
    if generate is None and mode != "prefill":
        raise ValueError(f"mode={mode!r} applies to generate=N; pass generate, or leave mode")
    if generate is not None and generate < 1:
        raise ValueError(f"generate={generate}: give a positive number of new tokens")
    if generate is not None and mode not in ("prefill", "full", "steps"):
        raise ValueError(f"mode={mode!r}: one of prefill, full, steps")
    if generate is not None and pad_to is not None and mode != "full":
        raise ValueError(f"pad_to applies to mode 'full' with generate (the {mode} forwards are generate()'s own)")
    parsed, source = _as_prompts(prompts)
    out = Path(out_dir).absolute()
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    st = _state(state, cpu=device.type == "cpu")
    from accelerate.utils import gather_object

    rank, ranks, main = int(st.process_index), int(st.num_processes), bool(st.is_main_process)
    side = "left" if generate is not None else "right"
    batches = {}
    for p in parsed:  # every rank checks every prompt: the same error everywhere, before anything is written
        try:
            batches[p.sample] = tokenize_batch(tokenizer, [p.text], pad_to if generate is None else None, side=side)
        except ValueError as exc:
            raise PromptsError(f"{p.where()}: {exc}") from None
        why = context_error(model, batches[p.sample].prompt_lengths, generate=generate, pad_to=pad_to)
        if why is not None:
            raise PromptsError(f"{p.where()}: {why}")
    capture_mode = "forward" if generate is None else mode
    asked = {"generate": generate, "mode": capture_mode, "pad_to": pad_to}
    n_layers = len(find_layout(model).layers)
    layer_list = (
        parse_layers(layers, n_layers)
        if layers is None or isinstance(layers, str)
        else parse_layers(",".join(str(int(i)) for i in layers), n_layers)
    )
    info = provenance.model_info(model)  # the weights fingerprint, once per rank
    fixed = {
        "contract": load_contract("v1").identity,
        "mode": capture_mode,
        "layers": layer_list,
        "scale_log2": scale_log2,
        "residuals": residuals,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "model": {k: info.get(k) for k in ("config_sha256", "weights_fingerprint", "dtype", "quantization")},
    }

    def want(p: Prompt) -> dict[str, Any]:
        return {"prompt": {"prompt_id": p.id, "text_sha256": p.text_sha256, **asked}, **fixed}

    def agree(mine: Exception | None) -> None:
        """Every rank learns whether any rank failed (a collective: every rank calls it at the same point)."""
        said = [(rank, type(mine).__name__, str(mine)) if mine is not None else None]
        heard = gather_object(said) if ranks > 1 else said
        if mine is not None:
            raise mine
        bad = [h for h in heard if h is not None]
        if bad:
            r, kind, message = bad[0]
            error = FileExistsError if kind in ("FileExistsError", "TargetBusyError") else CaptureError
            raise error(f"rank {r}: {message}" if r else message)

    lock: TargetLock | None = None
    bar: _Progress | None = None
    result = DatasetResult(out, rank, ranks)
    try:
        problem: Exception | None = None
        if main:  # rank 0 checks the folder (and clears it for overwrite) while the others wait for its word
            try:
                lock = TargetLock(out)  # one run per folder; a dead run's leftovers beside it are removed
                _prepare(out, parsed, overwrite, want)
            except Exception as exc:
                problem = exc
        agree(problem)
        bar = _Progress(out, parsed, progress and main)
        problem = None
        try:
            for p in parsed[rank::ranks]:
                folder = out / p.folder
                if folder.is_dir():
                    why = _verify(folder, p, want(p))
                    if why is None:
                        result.reused.append(p.id)
                        continue
                    logger.warning("%s: %s; capturing it again", p.folder, why)
                (out / MANIFEST_NAME).unlink(missing_ok=True)  # the index is stale from here on
                dataset = {"prompt_id": p.id, "line": p.line, "text_sha256": p.text_sha256, **asked}
                extra = {**dict(extra_metadata or {}), "dataset": dataset}
                with _intra_op_threads(threads):  # the same count in one process and in K ranks
                    _capture_one(
                        model,
                        tokenizer,
                        p,
                        batches[p.sample],
                        out,
                        generate,
                        mode,
                        {"layers": layers, "scale_log2": scale_log2, "residuals": residuals, "extra_metadata": extra},
                        pad_to,
                    )
                result.captured.append(p.id)
        except Exception as exc:  # the other ranks must hear of it, or they would wait for this one forever
            problem = exc
        agree(problem)
        bar.close()
        if ranks > 1:  # every rank's ids, in prompt order
            done = gather_object([(result.captured, result.reused)])
            order = {p.id: i for i, p in enumerate(parsed)}
            result.captured = sorted((i for c, _ in done for i in c), key=order.__getitem__)
            result.reused = sorted((i for _, r in done for i in r), key=order.__getitem__)
        problem = None
        if main:
            try:
                rebuild = bool(result.captured)
                result.units, result.index_written = _write_index(out, parsed, source, ranks, rebuild=rebuild)
                _clear_work(out)
            except Exception as exc:
                problem = exc
        agree(problem)
    finally:
        if bar is not None:
            bar.close()
        if lock is not None:
            lock.release()
    result.seconds = time.perf_counter() - t0
    return result


def _prepare(out: Path, prompts: Sequence[Prompt], overwrite: bool, want: Any) -> None:
    """Rank 0, before any capture: refuse a folder this run may not write into; clear it for overwrite."""
    check_out_dir(out, prompts, overwrite)
    if overwrite and out.exists() and any(out.iterdir()):
        old = leftover_name(out, "old")
        os.rename(out, old)
        if foreign := foreign_files(old):  # arrived since the check: put everything back as it was
            os.rename(old, out)
            raise FileExistsError(
                f"output directory '{out}' holds files zkllm-hf did not write ({shown_paths(foreign)}); --overwrite "
                f"only replaces a capture or dataset holding nothing else. Move them away or choose another --out"
            )
        shutil.rmtree(old, ignore_errors=True)
    elif out.exists():
        remove_leftovers(out / MANIFEST_NAME)  # a dead run's temporary index (we hold the folder's lock)
        for p in prompts:
            if (out / p.folder).is_dir() and (why := _mismatch(out / p.folder, want(p))) is not None:
                raise FileExistsError(
                    f"{p.folder} in '{out}' was captured {why}; pass --overwrite (overwrite=True) to replace the "
                    f"dataset, or choose another --out"
                )
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside, the caller's back after (None: unchanged)."""
    if threads is None:
        yield
        return
    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(caller)


def _capture_one(
    model: nn.Module,
    tokenizer: Any,
    p: Prompt,
    batch: Any,
    out: Path,
    generate: int | None,
    mode: str,
    options: Mapping[str, Any],
    pad_to: int | None,
) -> None:
    """Capture one prompt with the public adapters into a work folder, then move its unit(s) into place."""
    from . import capture

    target = out / p.folder
    lock = TargetLock(target)  # no other process works on this unit; a dead one's leftovers are removed
    try:
        work = out / WORK / p.folder
        if work.exists():  # an interrupted run finished the capture but not the move
            _refuse_foreign(out / WORK, p.folder)
            _discard(work)
        device = next(p_.device for p_ in model.parameters())
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        if generate is None:
            with (
                torch.inference_mode(),
                capture(
                    model, work, prompt_length=batch.prompt_lengths, pad_token_id=batch.pad_token_id, **options
                ) as session,
            ):
                session.engine.sample_offset = p.sample
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            from transformers import LogitsProcessorList

            from .integrations.generation import CaptureLogitsProcessor

            with (
                CaptureLogitsProcessor(model, work, mode=mode, pad_to=pad_to, **options) as proc,
                torch.inference_mode(),
            ):
                proc.engine.sample_offset = p.sample
                pad = batch.pad_token_id if batch.pad_token_id is not None else tokenizer.eos_token_id
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    logits_processor=LogitsProcessorList([proc]),
                    max_new_tokens=generate,
                    do_sample=False,
                    pad_token_id=pad,
                )
                proc.finalize(generated)
        tree = work / p.folder if mode == "steps" and generate is not None else work
        old = None
        if target.exists():  # a broken unit being replaced: ours by its manifest, holding nothing else
            _refuse_foreign(out, p.folder)
            old = leftover_name(target, "old")
            os.rename(target, old)
        os.rename(tree, target)
        _fsync_dir(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if work.exists():
            _discard(work)
    finally:
        lock.release()


def _write_index(
    out: Path, prompts: Sequence[Prompt], source: Mapping[str, Any], ranks: int, *, rebuild: bool
) -> tuple[list[dict[str, Any]], bool]:
    """Rank 0, once every rank has finished: the index over every prompt's units (the engine's builder)."""
    entries, tables, rows = [], [], []
    first: dict[str, Any] | None = None
    for p in sorted(prompts, key=lambda p: p.sample):
        for path in _unit_manifests(out / p.folder):
            table, meta = read_manifest(path)
            folder = path.parent.relative_to(out).as_posix()
            unit = meta["unit"]
            entry = {
                "folder": folder,
                "sample": unit["sample"],
                "step": unit["step"],
                "phase": unit["phase"],
                "seq_len": meta["tokens"]["seq_len"],
                "prompt_id": p.id,
            }
            if first is None:
                first = meta
            elif _settings(meta) | {"prompt": None} != _settings(first) | {"prompt": None}:
                raise CaptureError(f"{folder} was captured with other settings than {entries[0]['folder']}")
            entries.append(entry)
            tables.append(table)
            rows += index_rows(table.to_pylist(), folder + "/")
    assert first is not None
    dataset = {
        "prompts": {**source, "count": len(prompts), "digest": _digest(prompts)},
        "ranks": ranks,
        "sharding": "rank r of K captures the prompts at positions r, r + K, ... (one prompt per forward)",
    }
    existing = out / MANIFEST_NAME
    if not rebuild and existing.is_file():
        try:
            _, old = read_manifest(existing)
            same = [{k: u.get(k) for k in (*entries[0], "manifest_sha256")} for u in old.get("units", [])]
            now = [dict(e, manifest_sha256=sha256_file(out / e["folder"] / MANIFEST_NAME)) for e in entries]
            if same == now and (old.get("dataset") or {}).get("prompts") == dataset["prompts"]:
                return old["units"], False  # a finished dataset of these prompts: nothing to do
        except (OSError, ValueError, KeyError):
            pass
    extra = {k: v for k, v in (first.get("extra") or {}).items() if k != "dataset"}
    common = {k: first[k] for k in ("contract", "versions", "model") if k in first}
    common["capture"] = dict(first["capture"], created_utc=provenance.utc_now())
    common["extra"] = extra
    if "generation" in first:  # the generation config; prompt_length, steps and rows are each unit's own
        common["generation"] = {
            k: v for k, v in first["generation"].items() if k not in ("prompt_length", "steps", "rows")
        }
    common["dataset"] = dataset
    contract = _contract_of(first, None)
    index, results = build_index(out, contract, rows, common, list(zip(entries, tables)), kinds=INDEX_KINDS)
    failed = [r for r in results if r.failed]
    if failed:
        raise ContractViolation(failed, context=f"dataset index of '{out}'")
    write_manifest(index, existing)
    _fsync_dir(out)
    return table_metadata(index)["units"], True


__all__ = [
    "DatasetResult",
    "Prompt",
    "PromptsError",
    "capture_dataset",
    "check_out_dir",
    "parse_prompts",
    "read_prompts",
]
