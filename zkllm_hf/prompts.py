"""The prompt set of ``capture_dataset``: a JSONL file or a list, checked into :class:`Prompt` records.

Every error names the line and the fix (:class:`PromptsError`); an integer id names the unit's folder
``sample-{id}``, a string id is recorded and its line number names the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .errors import PromptsError
from .metadata import shown
from .models import context_error, tokenize_batch

MAX_SAMPLE = 2**31 - 1  # the manifest's sample column is int32
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")


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


def as_prompts(prompts: str | os.PathLike[str] | Sequence[str | Mapping[str, Any]]) -> tuple[list[Prompt], dict]:
    """The prompts of a JSONL file or a list (of strings or objects), and where they came from (file, SHA-256)."""
    if isinstance(prompts, (str, os.PathLike)):
        parsed, sha = read_prompts(prompts)
        return parsed, {"file": str(prompts), "sha256": sha}
    records = [(i, {"text": p} if isinstance(p, str) else p) for i, p in enumerate(prompts, 1)]
    return parse_prompts(records), {"file": None, "sha256": None}


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    """SHA-256 over the set's ids and texts, in order: what the dataset index records of the prompts."""
    canon = json.dumps([[p.id, p.text] for p in prompts], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def tokenize_prompts(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], *, generate: int | None, pad_to: int | None
) -> dict[int, Any]:
    """Each prompt's batch of one, by sample, every prompt checked to fit the model's context.

    Every rank checks every prompt, so each raises the same error, before anything is written.
    """
    side = "left" if generate is not None else "right"
    batches = {}
    for p in prompts:
        try:
            batches[p.sample] = tokenize_batch(tokenizer, [p.text], pad_to if generate is None else None, side=side)
        except ValueError as exc:
            raise PromptsError(f"{p.where()}: {exc}") from None
        why = context_error(model, batches[p.sample].prompt_lengths, generate=generate, pad_to=pad_to)
        if why is not None:
            raise PromptsError(f"{p.where()}: {why}")
    return batches


__all__ = [
    "MAX_SAMPLE",
    "Prompt",
    "PromptsError",
    "as_prompts",
    "parse_prompts",
    "prompts_digest",
    "read_prompts",
    "tokenize_prompts",
]
