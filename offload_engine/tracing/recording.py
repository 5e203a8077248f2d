"""Recording routing traces: from a generation, or from a text corpus the way the consistency paper does.

The experts forward hands every MoE layer call's top-k to a RoutingRecorder; here those calls become a
RoutingTrace [N sequences, T tokens, L MoE layers, k] (ids in descending router-score order, -1 padding).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import GenerationInputError
from ..request import RoutingRecorder
from .trace_file import RoutingTrace


def calls_to_arrays(recorder: RoutingRecorder, num_layers: int, batch: int):
    """Stack the recorded calls into ids [B, T, L, k] and scores [B, T, L, k], T = tokens run through the model.

    Calls arrive forward by forward, MoE layer by layer; each call's rows are the forward's tokens, batch-major.
    """
    if len(recorder.calls) % num_layers:
        raise RuntimeError(f"{len(recorder.calls)} recorded MoE calls do not divide into {num_layers} layers")
    ids_per_forward, scores_per_forward = [], []
    for start in range(0, len(recorder.calls), num_layers):
        calls = recorder.calls[start:start + num_layers]
        if [c[0] for c in calls] != list(range(num_layers)):
            raise RuntimeError("MoE layers were recorded out of order")
        ids_per_forward.append(torch.stack([c[1].reshape(batch, -1, c[1].shape[-1]) for c in calls], dim=2))
        scores_per_forward.append(torch.stack([c[2].reshape(batch, -1, c[2].shape[-1]) for c in calls], dim=2))
    return torch.cat(ids_per_forward, dim=1).numpy(), torch.cat(scores_per_forward, dim=1).numpy()


def residuals_to_array(recorder: RoutingRecorder, num_layers: int, batch: int) -> np.ndarray:
    """The recorded residuals of one forward as float16 [B, T, L, H]."""
    per_layer = [r.reshape(batch, -1, r.shape[-1]) for r in recorder.residuals[-num_layers:]]
    return torch.stack(per_layer, dim=2).numpy()


def generation_trace(recorder: RoutingRecorder, prompts: list[list[int]], generated: list[list[int]],
                     num_experts: int, moe_layers: Sequence[int], model_name: str) -> RoutingTrace:
    """The routing of a (batched, left-padded) generation, each sequence moved to start at position 0.

    A sequence covers its prompt and the generated tokens that were fed back (the last one never was).
    """
    ids, scores = calls_to_arrays(recorder, len(moe_layers), len(prompts))
    width = ids.shape[1]
    padded = max(map(len, prompts))
    out_ids = np.full_like(ids, -1)
    out_scores = np.zeros_like(scores)
    token_ids = np.full((len(prompts), width), -1, dtype=np.int32)
    for row, (prompt, new) in enumerate(zip(prompts, generated)):
        tokens = (list(prompt) + list(new))[:len(prompt) + max(0, len(new) - 1)]
        begin = padded - len(prompt)  # left padding
        out_ids[row, :len(tokens)] = ids[row, begin:begin + len(tokens)]
        out_scores[row, :len(tokens)] = scores[row, begin:begin + len(tokens)]
        token_ids[row, :len(tokens)] = tokens
    return RoutingTrace(expert_ids=out_ids.astype(np.int16), num_experts=num_experts,
                        moe_layers=np.asarray(moe_layers), scores=out_scores.astype(np.float32),
                        token_ids=token_ids, model=model_name)


@dataclass(frozen=True)
class CorpusInput:
    domain: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> "CorpusInput":
        """`code=a.txt` (a domain label) or `a.txt` (labelled by its file name)."""
        domain, sep, path = text.partition("=")
        if not sep:
            domain, path = Path(text).stem, text
        if not domain or not Path(path).is_file():
            raise GenerationInputError(f"corpus input {text!r}: no such file; use FILE or DOMAIN=FILE")
        return cls(domain, Path(path))


def split_documents(text: str, eos_text: str | None) -> list[str]:
    """A file's documents: separated by form feeds, or by lines holding only the EOS token's text (as
    benchmarks/corpus.py writes them, `<|endoftext|>`); a file without either is one document."""
    parts = text.split("\f")
    if eos_text:
        parts = [doc for part in parts for doc in re.split(rf"^{re.escape(eos_text)}[ \t]*$", part, flags=re.M)]
    return [doc.strip("\n") for doc in parts if doc.strip()]


def corpus_chunks(tokenizer, text: str, eos_id: int, seq_len: int, max_seqs: int | None) -> list[list[int]]:
    """The paper's recipe: documents joined with EOS, cut into consecutive seq_len chunks (tail dropped)."""
    ids: list[int] = []
    for document in split_documents(text, tokenizer.eos_token):
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        ids.append(eos_id)
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return chunks[:max_seqs] if max_seqs else chunks


def trace_corpus(engine, inputs: list[CorpusInput], seq_len: int, max_seqs: int | None, batch_size: int = 4,
                 progress: bool = True, hidden_states: bool = False) -> RoutingTrace:
    """One plain forward pass per chunk (teacher forcing, no generation), recording every MoE layer's top-k
    (and, with hidden_states, the residual stream entering each MoE block, for training predictors)."""
    if engine.tokenizer is None:
        raise GenerationInputError(f"{engine.directory} has no tokenizer; tracing a text corpus needs one")
    if seq_len < 1 or (engine.spec.max_position_embeddings and seq_len > engine.spec.max_position_embeddings):
        raise GenerationInputError(
            f"--seq-len {seq_len} must be between 1 and the model's context ({engine.spec.max_position_embeddings})"
        )
    if seq_len > engine.plan.max_context or batch_size > engine.run.max_batch:
        raise GenerationInputError(
            f"{batch_size} sequences of {seq_len} tokens exceed the memory plan ({engine.run.max_batch} of "
            f"{engine.plan.max_context}); load with max_batch and max_context at least that large"
        )
    eos_ids = engine.eos_ids()
    eos = engine.tokenizer.eos_token_id if engine.tokenizer.eos_token_id is not None else min(eos_ids, default=None)
    if eos is None:
        raise GenerationInputError("the model has no end-of-sequence token to join documents with")
    chunks, domains = [], []
    for item in inputs:
        found = corpus_chunks(engine.tokenizer, item.path.read_text(encoding="utf-8", errors="replace"), eos,
                              seq_len, max_seqs)
        if not found:
            raise GenerationInputError(f"{item.path} holds fewer than {seq_len} tokens; lower --seq-len")
        chunks += found
        domains += [item.domain] * len(found)
    ids_parts, score_parts, hidden_parts = [], [], []
    bar = tqdm(total=len(chunks), desc="tracing", unit="seq", disable=not progress)
    for start in range(0, len(chunks), batch_size):
        batch = torch.tensor(chunks[start:start + batch_size], device=engine.run.device)
        recorder = RoutingRecorder(hidden_states=hidden_states)
        with torch.inference_mode():
            engine.forward(engine.request(0, recorder), input_ids=batch, use_cache=False, logits_to_keep=1)
        ids, scores = calls_to_arrays(recorder, engine.spec.num_moe_layers, batch.shape[0])
        ids_parts.append(ids)
        score_parts.append(scores)
        if hidden_states:
            hidden_parts.append(residuals_to_array(recorder, engine.spec.num_moe_layers, batch.shape[0]))
        bar.update(batch.shape[0])
    bar.close()
    return RoutingTrace(
        expert_ids=np.concatenate(ids_parts).astype(np.int16), num_experts=engine.spec.num_experts,
        moe_layers=np.asarray(engine.spec.moe_layers), scores=np.concatenate(score_parts).astype(np.float32),
        token_ids=np.asarray(chunks, dtype=np.int32), domains=tuple(domains), model=str(engine.directory.name),
        hidden_states=np.concatenate(hidden_parts) if hidden_states else None,
    )
