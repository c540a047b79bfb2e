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
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .contracts import load_contract
from .dataset_folder import check_out_dir, clear_work, discard, place_unit, prepare_out_dir, refuse_foreign
from .dataset_index import write_index
from .digests import check_digest
from .engine import CaptureError
from .hooks import find_layout
from .manifest import remove_manifest
from .options import PADDABLE_MODES, generation_problem, resolve_layers, threads_problem
from .profile import config_limit_warnings
from .prompts import Prompt, PromptsError, as_prompts, parse_prompts, read_prompts, tokenize_prompts
from .resume import asked_settings, run_settings, verify_unit, wanted
from .session import CaptureSession
from .writer import MANIFEST_NAME, WORK, TargetLock

logger = logging.getLogger(__name__)


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
    warnings: list[str] = field(default_factory=list)  # zkLLM limits the units do not meet (rank 0), as capture's


class _Ranks:
    """This process's place among accelerate's ranks, and the collectives every rank calls at the same point."""

    def __init__(self, state: Any):
        from accelerate.utils import gather_object

        self._gather = gather_object
        self.rank, self.count = int(state.process_index), int(state.num_processes)
        self.main = bool(state.is_main_process)

    def agree(self, mine: Exception | None) -> None:
        """Every rank learns whether any rank failed (a collective: every rank calls it at the same point)."""
        said = [(self.rank, type(mine).__name__, str(mine)) if mine is not None else None]
        heard = self._gather(said) if self.count > 1 else said
        if mine is not None:
            raise mine
        bad = [h for h in heard if h is not None]
        if bad:
            r, kind, message = bad[0]
            error = FileExistsError if kind in ("FileExistsError", "TargetBusyError") else CaptureError
            raise error(f"rank {r}: {message}" if r else message)

    def run(self, step: Callable[[], None], *, main_only: bool = False) -> None:
        """Run ``step`` (on rank 0 alone if ``main_only``, the others waiting for its word), then agree: the
        other ranks must hear of a failure, or they would wait for the failed one forever."""
        problem: Exception | None = None
        if self.main or not main_only:
            try:
                step()
            except Exception as exc:
                problem = exc
        self.agree(problem)

    def gather_ids(self, result: DatasetResult, prompts: Sequence[Prompt]) -> None:
        """Every rank's captured and reused ids, into ``result``, in prompt order."""
        if self.count > 1:
            done = self._gather([(result.captured, result.reused)])
            order = {p.id: i for i, p in enumerate(prompts)}
            result.captured = sorted((i for c, _ in done for i in c), key=order.__getitem__)
            result.reused = sorted((i for _, r in done for i in r), key=order.__getitem__)


class _DatasetRun:
    """One rank's part of one ``capture_dataset`` call: what every unit shares, and the steps it takes."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        out: Path,
        prompts: list[Prompt],
        batches: Mapping[int, Any],
        *,
        generate: int | None,
        mode: str,
        pad_to: int | None,
        options: Mapping[str, Any],
        extra_metadata: Mapping[str, Any] | None,
        threads: int | None,
        asked: Mapping[str, Any],
        fixed: Mapping[str, Any],
    ):
        self.model, self.tokenizer, self.out, self.prompts, self.batches = model, tokenizer, out, prompts, batches
        self.generate, self.mode, self.pad_to, self.options = generate, mode, pad_to, options
        self.extra_metadata, self.threads, self.asked, self.fixed = extra_metadata, threads, asked, fixed
        self.lock: TargetLock | None = None

    def want(self, p: Prompt) -> dict[str, Any]:
        """What this run asks of ``p``'s unit (the resume decision compares a unit on disk with it)."""
        return wanted(p, self.asked, self.fixed)

    def open(self, overwrite: bool) -> None:
        """Rank 0, first: lock the folder (one run per folder; a dead run's leftovers beside it are removed),
        refuse it if this run may not write into it, clear it for overwrite."""
        self.lock = TargetLock(self.out)
        prepare_out_dir(self.out, self.prompts, overwrite, self.want)

    def capture_share(self, share: Sequence[Prompt], result: DatasetResult) -> None:
        """Keep each finished, intact unit of ``share`` captured as this run asks; capture the others."""
        for p in share:
            folder = self.out / p.folder
            if folder.is_dir():
                why = verify_unit(folder, p, self.want(p))
                if why is None:
                    result.reused.append(p.id)
                    continue
                logger.warning("%s: %s; capturing it again", p.folder, why)
            remove_manifest(self.out / MANIFEST_NAME)  # the index (and its capture.json) is stale from here on
            with _intra_op_threads(self.threads):  # the same count in one process and in K ranks
                self._capture_one(p)
            result.captured.append(p.id)

    def _capture_one(self, p: Prompt) -> None:
        """Capture one prompt with the public adapters into a work folder, then move its unit(s) into place."""
        dataset = {"prompt_id": p.id, "line": p.line, "text_sha256": p.text_sha256, **self.asked}
        options = {**self.options, "extra_metadata": {**dict(self.extra_metadata or {}), "dataset": dataset}}
        lock = TargetLock(self.out / p.folder)  # no other process works on this unit; a dead one's leftovers go
        try:
            work = self.out / WORK / p.folder
            if work.exists():  # an interrupted run finished the capture but not the move
                refuse_foreign(self.out / WORK, p.folder)
                discard(work)
            _capture_into(
                self.model,
                self.tokenizer,
                self.batches[p.sample],
                work,
                p.sample,
                generate=self.generate,
                mode=self.mode,
                pad_to=self.pad_to,
                options=options,
                sampling=self.asked.get("sampling"),
                seed=self.asked.get("seed"),
            )
            tree = work / p.folder if self.mode == "steps" and self.generate is not None else work
            place_unit(self.out, p.folder, tree, work)
        finally:
            lock.release()

    def finish(self, source: Mapping[str, Any], ranks: int, result: DatasetResult) -> None:
        """Rank 0, once every rank has finished: the index (rewritten if anything was captured), then the work
        folder's remains."""
        rebuild = bool(result.captured)
        result.units, result.index_written = write_index(self.out, self.prompts, source, ranks, rebuild=rebuild)
        seq_lens = [int(u["seq_len"]) for u in result.units]  # the zkLLM limits the units miss, as capture says them
        paddable = self.asked["mode"] in PADDABLE_MODES
        result.warnings = config_limit_warnings(seq_lens, getattr(self.model, "config", None), paddable=paddable)
        clear_work(self.out)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


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
    sampling: Mapping[str, Any] | None = None,
    seed: int | None = None,
    store_text: bool = True,
    digest: str = "blake3",
    fingerprint: str = "cached",
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

    ``sampling`` holds ``generate()``'s sampling arguments (``do_sample``, ``temperature``, ``top_p``,
    ``top_k``), greedy without it; ``seed`` seeds torch's generator before each prompt's ``generate()``, so a
    sampled unit is the same whichever rank ran it. Both are recorded with each unit (``extra.dataset``).
    Each unit records ``tokenizer``'s fingerprint and its prompt (and generated) text, unless ``store_text=False``.
    ``digest`` and ``fingerprint`` are as for :func:`zkllm_hf.capture` (the fingerprint is computed once per
    rank and reused by each prompt's capture while the weights are unchanged).
    """
    t0 = time.perf_counter()
    _check_options(threads=threads, generate=generate, mode=mode, pad_to=pad_to, digest=digest)
    parsed, source = as_prompts(prompts)
    out = Path(out_dir).absolute()
    ranks = _Ranks(_state(state, cpu=_device(model).type == "cpu"))
    batches = tokenize_prompts(model, tokenizer, parsed, generate=generate, pad_to=pad_to)
    capture_mode = "forward" if generate is None else mode
    run = _DatasetRun(
        model, tokenizer, out, parsed, batches,
        generate=generate,
        mode=mode,
        pad_to=pad_to,
        options=_engine_options(layers, scale_log2, residuals, digest, fingerprint, tokenizer, store_text),
        extra_metadata=extra_metadata,
        threads=threads,
        asked=asked_settings(generate, capture_mode, pad_to, sampling, seed),
        fixed=_fixed_settings(
            model, mode=capture_mode, layers=layers, scale_log2=scale_log2, residuals=residuals, threads=threads,
            digest=digest, fingerprint=fingerprint,
        ),
    )
    bar: _Progress | None = None
    result = DatasetResult(out, ranks.rank, ranks.count)
    try:
        ranks.run(lambda: run.open(overwrite), main_only=True)  # the others wait for rank 0's word on the folder
        bar = _Progress(out, parsed, progress and ranks.main)
        ranks.run(lambda: run.capture_share(parsed[ranks.rank :: ranks.count], result))
        bar.close()
        ranks.gather_ids(result, parsed)
        ranks.run(lambda: run.finish(source, ranks.count, result), main_only=True)
    finally:
        if bar is not None:
            bar.close()
        run.release()
    result.seconds = time.perf_counter() - t0
    return result



def _device(model: nn.Module) -> torch.device:
    """Where the model's first placed parameter is (the CPU for a model all on the meta device)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _engine_options(
    layers: Any, scale_log2: int, residuals: str, digest: str, fingerprint: str, tokenizer: Any, store_text: bool
) -> dict[str, Any]:
    """The options each prompt's capture engine gets (the tokenizer and text are recorded with each unit)."""
    return dict(layers=layers, scale_log2=scale_log2, residuals=residuals, digest=digest, fingerprint=fingerprint,
                tokenizer=tokenizer, store_text=store_text)


def _check_options(*, threads: int | None, generate: int | None, mode: str, pad_to: int | None, digest: str) -> None:
    """Refuse a combination of options capture_dataset cannot run, naming the value and the fix."""
    check_digest(digest)
    if (problem := threads_problem(threads)) is not None:
        raise ValueError(problem)
    problem = generation_problem(generate, None if mode == "prefill" else mode, pad_to)
    if problem is not None:
        raise ValueError(problem)


def _fixed_settings(
    model: nn.Module,
    *,
    mode: str,
    layers: Sequence[int] | str | None,
    scale_log2: int,
    residuals: str,
    threads: int | None,
    digest: str = "blake3",
    fingerprint: str = "cached",
) -> dict[str, Any]:
    """What every unit of this run shares whatever its prompt (a unit on disk is kept only if it matches)."""
    layer_list = _layer_list(model, layers)
    info = provenance.model_info(model, fingerprint=False, digest=digest)
    info["weights_fingerprint"] = provenance.cached_fingerprint(model, digest=digest, mode=fingerprint)[0]
    return run_settings(
        contract=load_contract("v1").identity,
        mode=mode,
        layers=layer_list,
        scale_log2=scale_log2,
        residuals=residuals,
        threads=threads if threads is not None else torch.get_num_threads(),
        model_info=info,
        digest=digest,
    )


def _layer_list(model: nn.Module, layers: Sequence[int] | str | None) -> list[int]:
    """The layer indices ``layers`` names (a spec such as ``"0-2"``, a list, or None for all)."""
    return resolve_layers(layers, len(find_layout(model).layers))


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


def _capture_into(
    model: nn.Module,
    tokenizer: Any,
    batch: Any,
    work: Path,
    sample: int,
    *,
    generate: int | None,
    mode: str,
    pad_to: int | None,
    options: Mapping[str, Any],
    sampling: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> None:
    """One prompt's capture into ``work``, numbered ``sample``: ``capture()``'s session around a forward, or
    ``generate()`` (greedy unless ``sampling`` says, seeded with ``seed``) with a CaptureLogitsProcessor."""
    device = next(p_.device for p_ in model.parameters())
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    if generate is None:
        with (
            torch.inference_mode(),
            CaptureSession(
                model, work, prompt_length=batch.prompt_lengths, pad_token_id=batch.pad_token_id, **options
            ) as session,
        ):
            session.engine.sample_offset = sample
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return
    from transformers import LogitsProcessorList

    from .integrations.generation import CaptureLogitsProcessor

    with (
        CaptureLogitsProcessor(model, work, mode=mode, pad_to=pad_to, **options) as proc,
        torch.inference_mode(),
    ):
        proc.engine.sample_offset = sample
        pad = batch.pad_token_id if batch.pad_token_id is not None else tokenizer.eos_token_id
        if seed is not None:
            torch.manual_seed(seed)  # per prompt: the unit does not depend on which rank ran it, or after what
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            logits_processor=LogitsProcessorList([proc]),
            max_new_tokens=generate,
            pad_token_id=pad,
            **{"do_sample": False, **dict(sampling or {})},
        )
        proc.finalize(generated)


__all__ = [
    "DatasetResult",
    "Prompt",
    "PromptsError",
    "capture_dataset",
    "check_out_dir",
    "parse_prompts",
    "read_prompts",
]
