"""What zkLLM's kernels accept (docs/architecture.md §5), as pure functions of the capture's shape."""

from __future__ import annotations

ATTENTION_MIN_SEQ_LEN = 1024  # zkLLM's self-attention proof: seq_len a power of two, at least this
FFN_MIN_SEQ_LEN_7B = 191  # the FFN lookup table on LLaMA-2-7B


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def zkllm_limit_warnings(
    seq_len: int, hidden_size: int, intermediate_size: int | None = None, *, paddable: bool = True
) -> list[str]:
    """The zkLLM limits a capture of this shape does not meet, as readable warnings (empty if none).

    ``paddable`` is False for captures of generate()'s own forwards (prefill, steps), which cannot be padded.
    """
    out = []
    if not is_power_of_two(seq_len) or seq_len < ATTENTION_MIN_SEQ_LEN:
        target = max(ATTENTION_MIN_SEQ_LEN, next_power_of_two(seq_len))
        fix = (
            f"capture again with --pad-to {target}"
            if paddable
            else f"generate()'s own forwards cannot be padded: capture with --mode full --pad-to {target}"
        )
        out.append(
            f"seq_len {seq_len} is not a power of two >= {ATTENTION_MIN_SEQ_LEN}, which zkLLM's "
            f"self-attention proof needs; {fix}"
        )
    if seq_len < FFN_MIN_SEQ_LEN_7B:
        out.append(f"seq_len {seq_len} is below {FFN_MIN_SEQ_LEN_7B}, the FFN table's minimum on LLaMA-2-7B")
    for name, dim in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if dim is not None and not is_power_of_two(dim):
            out.append(
                f"{name} {dim} is not a power of two; zkLLM's kernels pad dimensions to powers of two "
                f"({next_power_of_two(dim)}), which its scripts for LLaMA-2 do not do for you"
            )
    return out
