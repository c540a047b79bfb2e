"""What zkLLM's kernels accept (docs/architecture.md §5), as pure functions of the capture's shape."""

from __future__ import annotations

ATTENTION_MIN_SEQ_LEN = 1024  # zkLLM's self-attention proof: seq_len a power of two, at least this
FFN_TABLE_LOG2 = 22  # zkLLM's SwiGLU lookup needs next_pow2(seq_len * intermediate_size) >= 2**22


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def ffn_min_seq_len(intermediate_size: int) -> int:
    """The smallest seq_len whose FFN lookup zkLLM accepts: next_pow2(seq_len * intermediate) >= 2**22."""
    n = 1
    while next_power_of_two(n * intermediate_size) < 2**FFN_TABLE_LOG2:
        n += 1
    return n


def zkllm_limit_warnings(
    seq_len: int,
    hidden_size: int,
    intermediate_size: int | None = None,
    *,
    paddable: bool = True,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    flags: bool = False,
) -> list[str]:
    """The zkLLM limits a capture of this shape does not meet, as readable warnings (empty if none).

    ``paddable`` is False for captures of generate()'s own forwards (prefill, steps), which cannot be padded.
    Hidden and intermediate sizes need not be powers of two: zkLLM pads them (Llama-2-7B's 11008 is not one).
    The fixes name the API's parameters (``pad_to=``), or with ``flags`` the CLI's options (``--pad-to``).
    """
    out = []
    pad, full = ("--pad-to {n}", "--mode full --pad-to {n}") if flags else ("pad_to={n}", "mode='full', pad_to={n}")
    pad_fix = (
        f"capture again with {pad}" if paddable else f"generate()'s own forwards cannot be padded: capture with {full}"
    )
    if not is_power_of_two(seq_len) or seq_len < ATTENTION_MIN_SEQ_LEN:
        target = max(ATTENTION_MIN_SEQ_LEN, next_power_of_two(seq_len))
        out.append(
            f"seq_len {seq_len} is not a power of two >= {ATTENTION_MIN_SEQ_LEN}, which zkLLM's "
            f"self-attention proof needs; {pad_fix.format(n=target)}"
        )
    if intermediate_size:
        need = ffn_min_seq_len(intermediate_size)
        if seq_len < need:
            target = max(ATTENTION_MIN_SEQ_LEN, next_power_of_two(need))
            out.append(
                f"seq_len {seq_len} is below {need}: zkLLM's FFN lookup needs next_pow2(seq_len x intermediate_size "
                f"{intermediate_size}) >= 2**{FFN_TABLE_LOG2}; {pad_fix.format(n=target)}"
            )
    if num_attention_heads and num_key_value_heads and num_key_value_heads != num_attention_heads:
        out.append(
            f"the model has {num_key_value_heads} key/value heads for {num_attention_heads} query heads "
            f"(grouped-query attention); zkLLM's attention kernel builds K and V as hidden x hidden and rejects it, so "
            "zkllm-hf plan proves its exactly equivalent MHA expansion (export-zkllm-model)"
        )
    return out


def config_limit_warnings(
    seq_lens: list[int], config: object, *, paddable: bool = True, flags: bool = False
) -> list[str]:
    """:func:`zkllm_limit_warnings` for units of ``seq_lens`` tokens of a model of ``config``: the longest
    unit's (whose padding fixes every unit), then what the shortest adds, each once."""
    if not seq_lens:
        return []

    def of(n: int) -> list[str]:
        return zkllm_limit_warnings(
            n,
            int(getattr(config, "hidden_size", 0) or 0),
            getattr(config, "intermediate_size", None),
            paddable=paddable,
            num_attention_heads=getattr(config, "num_attention_heads", None),
            num_key_value_heads=getattr(config, "num_key_value_heads", None),
            flags=flags,
        )

    out = of(max(seq_lens))
    return out + [w for w in of(min(seq_lens)) if w not in out]
