"""`moe-offload trace`: record a model's routing over a text corpus (plain forward passes, no generation)."""

from __future__ import annotations

import sys
from pathlib import Path

from offload_engine.atomic_write import check_not_an_input

from .model_inputs import model_inputs
from .run_options import add_model_options, model_path, output_path, positive_int, run_config


def add_parser(subparsers, name: str):
    p = subparsers.add_parser(name, help="record routing traces over a text corpus")
    add_model_options(p)
    p.add_argument("--input", nargs="+", required=True, metavar="[DOMAIN=]FILE",
                   help="text files; DOMAIN= labels a file's sequences (default label: the file name)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--max-seqs", type=positive_int, help="sequences per input at most (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per forward pass")
    p.add_argument("--hidden-states", action="store_true",
                   help="also record the residual stream entering each MoE block (float16), to train predictors")
    p.add_argument("--out", type=Path, required=True, help="the .npz trace to write")
    return p


def run(args) -> int:
    from offload_engine.engine import OffloadEngine
    from offload_engine.errors import ContextTooLongError
    from offload_engine.tracing.recording import CorpusInput, trace_corpus
    from offload_engine.tracing.trace_file import save_trace

    inputs = [CorpusInput.parse(item) for item in args.input]
    # plan the KV cache and working memory for the batches this command runs
    args.max_batch = max(args.max_batch, args.batch_size)
    context_from_seq_len = args.max_context is None
    args.max_context = args.max_context or args.seq_len
    run_cfg = run_config(args)
    output_path(args.out)
    check_not_an_input(args.out, "--out", model_inputs(args) + [("the input", item.path) for item in inputs])
    try:
        engine = OffloadEngine.from_run_config(model_path(args), run_cfg)
    except ContextTooLongError as e:
        if not context_from_seq_len:
            raise
        raise ContextTooLongError(f"--seq-len {args.seq_len} exceeds the model's context of {e.limit} tokens; "
                                  f"use --seq-len {e.limit} or less", e.asked, e.limit) from None
    trace = trace_corpus(engine, inputs, args.seq_len, args.max_seqs, args.batch_size, progress=not args.quiet,
                         hidden_states=args.hidden_states)
    save_trace(args.out, trace)
    print(f"wrote {args.out}: {trace.num_sequences} sequences x {trace.num_tokens} tokens, "
          f"{trace.num_layers} MoE layers, top-{trace.k} of {trace.num_experts}", file=sys.stderr)
    return 0
