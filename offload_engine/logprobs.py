"""Log-probabilities of each chosen token and of its top alternatives, for the rows of a step that ask.

The values are the model's raw distribution: log_softmax of the logits in fp32, before temperature, top-k or
top-p (what vLLM returns by default). They are computed on the device for the asking rows only, and the
caller reads them in the step's one read of the device, beside the tokens (`read_to_host` takes a list);
no row asking computes and reads nothing.

    # B=rows of the step, m=rows that ask, V=vocabulary, K=the most alternatives any asking row wants
    values, ids = on_device(logits, tokens, asks)        # [m, 1 + K] float32, [m, K] long, on the device
    host_values, host_ids = read_to_host([values, ids])  # with the step's tokens, in one read
    per_row(host_values, host_ids, asks)                 # [(chosen's logprob, {id: logprob} top first) | None]

>>> import torch
>>> logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
>>> values, ids = on_device(logits, torch.tensor([2, 1]), [None, 1])
>>> none, (chosen, top) = per_row(values, ids, [None, 1])
>>> none, round(chosen, 4), {t: round(v, 4) for t, v in top.items()}
(None, -3.0949, {0: -0.0949})
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import GenerationInputError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs (completions' logprobs: 5)

TokenLogprobs = tuple[float, dict[int, float]]  # the chosen token's logprob, and the top K's (most likely first)


def on_device(logits: torch.Tensor, tokens: torch.Tensor,
              asks: Sequence[int | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """logits [B, V] (raw), tokens [B] chosen, asks[b]: row b's K (None: the row asks nothing) -> (values
    [m, 1 + K]: the chosen token's logprob, then the top K's; ids [m, K]) for the m asking rows, on the
    device; None when no row asks."""
    rows = [b for b, k in enumerate(asks) if k is not None]
    if not rows:
        return None
    k = max(asks[b] for b in rows)
    if len(rows) < len(asks):  # slices, not an index tensor: a host-to-device copy here would wait for the step
        logits = torch.cat([logits[b:b + 1] for b in rows])
        tokens = torch.cat([tokens[b:b + 1] for b in rows])
    logp = logits.float().log_softmax(dim=-1)  # [m, V]
    chosen = logp.gather(-1, tokens[:, None])  # [m, 1]
    top = logp.topk(k, dim=-1)  # sorted, most likely first; k=0 gives [m, 0]
    return torch.cat([chosen, top.values], dim=-1), top.indices


def per_row(values: torch.Tensor | None, ids: torch.Tensor | None,
            asks: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """The host copies of on_device's tensors (None, None where it gave None), as each row's (chosen logprob,
    {id: logprob} of its own top K), None for a row that did not ask."""
    if values is None:
        return [None] * len(asks)
    values, ids = values.tolist(), ids.tolist()
    out: list[TokenLogprobs | None] = []
    i = 0
    for k in asks:
        if k is None:
            out.append(None)
            continue
        out.append((values[i][0], dict(zip(ids[i][:k], values[i][1:1 + k]))))
        i += 1
    return out


def check_ask(logprobs) -> None:
    """`logprobs` of submit: None (none), or the alternatives to return beside the chosen token, 0..MAX."""
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise GenerationInputError(f"logprobs must be None or a whole number from 0 to {MAX_TOP_LOGPROBS}, "
                                   f"not {logprobs!r}")
