"""What capture and capture-dataset pass to ``generate()`` from the command line: the sampling options as
``generate()`` names them, checked together; the chat template applied to a prompt; and a progress bar that
ticks once per new token."""

from __future__ import annotations

import argparse
from typing import Any

from transformers import LogitsProcessor

SAMPLING_FLAGS = (("temperature", "--temperature"), ("top_p", "--top-p"), ("top_k", "--top-k"))


def sampling_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --do-sample, --temperature, --top-p, --top-k, --seed and --chat together, else None."""
    given = [flag for name, flag in SAMPLING_FLAGS if getattr(args, name, None) is not None]
    if args.generate is None:
        for flag in (["--do-sample"] if args.do_sample else []) + given + (["--seed"] if args.seed is not None else []):
            return f"{flag} applies to --max-new-tokens N (generation); add --max-new-tokens, or drop {flag}"
    if given and not args.do_sample:
        return f"{given[0]} shapes sampling; add --do-sample, or drop {given[0]} (decoding is greedy without it)"
    if args.temperature is not None and not args.temperature > 0:
        return f"--temperature {args.temperature}: give a positive number, such as 0.7"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return f"--top-p {args.top_p}: give a number in (0, 1], such as 0.9"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k {args.top_k}: give a positive token count, such as 50"
    if args.seed is not None and not 0 <= args.seed < 2**63:
        return f"--seed {args.seed}: give a non-negative integer below 2**63"
    return None


def generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``generate()`` the options give: max_new_tokens, do_sample and the sampling
    parameters that were set (the model's generation config keeps the rest)."""
    kwargs: dict[str, Any] = {"max_new_tokens": args.generate, "do_sample": bool(args.do_sample)}
    kwargs.update({name: getattr(args, name) for name, _ in SAMPLING_FLAGS if getattr(args, name) is not None})
    return kwargs


def recorded_options(args: argparse.Namespace) -> dict[str, Any]:
    """How generation was asked for, as the manifest's ``extra.cli`` records it."""
    return {
        "max_new_tokens": args.generate,
        "do_sample": bool(args.do_sample),
        **{name: getattr(args, name) for name, _ in SAMPLING_FLAGS},
        "seed": args.seed,
        "chat": bool(args.chat),
    }


def apply_chat(tokenizer: Any, prompts: list[str], model: str | None) -> list[str]:
    """Each prompt as the tokenizer's chat template renders one user message, ready for a reply; raises
    ValueError if the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"--chat: the tokenizer of --model {model or 'default'} has no chat template; drop --chat, or save a "
            f"tokenizer with one (tokenizer.chat_template)"
        )
    for i, text in enumerate(prompts):
        if not text.strip():
            where = f"prompt {i + 1}" if len(prompts) > 1 else "the text"
            raise ValueError(f"{where} is {'only whitespace' if text else 'empty'}; give some text")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in prompts
    ]


class TokenProgress(LogitsProcessor):
    """A tqdm bar that ticks once per new token: generate() calls its processors once per decode step."""

    def __init__(self, total: int, rows: int = 1):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="new tokens", unit="tok", leave=False)
        self.rows = rows

    def __call__(self, input_ids, scores):
        if self.bar.n < self.bar.total:
            self.bar.update(1)
        return scores

    def close(self) -> None:
        self.bar.close()
