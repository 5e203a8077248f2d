"""`moe-offload generate`: stream text to stdout, stats to stderr (or one JSON object with --json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offload_engine.atomic_write import check_not_an_input

from .model_inputs import model_inputs
from .run_options import add_model_options, model_path, output_path, positive_int, run_config


def add_parser(subparsers, name: str):
    p = subparsers.add_parser(name, help="generate text with offloaded experts (the prompt, then the "
                                         "continuation as it is produced, on stdout; figures on stderr)")
    add_model_options(p)
    p.add_argument("--prompt", default="The", help="the prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the most likely tokens up to this total probability; 1 = all")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, help="sampling seed (default: a new one each run)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object {text, token_ids, stats}")
    p.add_argument("--trace-out", type=Path, help="write the generation's routing trace (.npz) here")
    return p


def stats_line(stats) -> str:
    from offload_engine.planning.memory_plan import format_bytes

    prefetched = f", {stats.prefetches} prefetched" if stats.prefetches else ""
    if stats.prefetches_dropped:  # queued prefetches the routing proved wrong before they moved
        prefetched += f", {stats.prefetches_dropped} dropped"
    # with --cold-experts cpu the misses are computed where they lie: without this the line read "0 misses"
    on_cpu = ""
    if stats.cpu_experts:  # the packed ones hold RAM from now on: plan shows the most it may come to
        packed = f", {stats.cpu_packed} packed for oneDNN" if stats.cpu_packed else ""
        on_cpu = f" | {stats.cpu_experts} experts on CPU ({stats.cpu_s:.3f} s{packed})"
    # every expert computed where it lies (a CPU device's packed experts, which have no slot; or --cold-experts cpu
    # or --cpu-moe-layers with slots that none of them used): no slot was looked up
    lookups = f"hit rate {100 * stats.hit_rate:.1f}% ({stats.hits} hits, {stats.misses} misses{prefetched})" \
        if stats.hits + stats.misses or not stats.cpu_experts else "no expert slot looked up"
    return (f"TTFT {stats.ttft_s:.3f} s | decode {stats.decode_tokens_per_s:.1f} tok/s | {lookups} | "
            f"moved {format_bytes(stats.bytes_to_device)}{on_cpu} | "
            f"peak device {format_bytes(stats.peak_device_bytes)}")


def run(args: argparse.Namespace) -> int:
    from offload_engine.engine import OffloadEngine, check_chat_prompt
    from offload_engine.generation import SamplingConfig
    from offload_engine.tracing.trace_file import save_trace

    # check sampling flags before the model is loaded, not after
    SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.ignore_eos)
    run_cfg = run_config(args)
    if output_path(args.trace_out) is not None:
        check_not_an_input(args.trace_out, "--trace-out", model_inputs(args))
    if args.chat:
        check_chat_prompt(model_path(args))
    engine = OffloadEngine.from_run_config(model_path(args), run_cfg)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, chat=args.chat, ignore_eos=args.ignore_eos)
    if args.json or args.trace_out:
        result = engine.generate(args.prompt, record_trace=args.trace_out is not None, **kwargs)
        if args.trace_out:
            save_trace(args.trace_out, result.trace)
        if args.json:
            print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats.as_dict()}))
        else:  # the same output as streaming, all at once
            print(("" if args.chat else args.prompt) + result.text)
            print(stats_line(result.stats), file=sys.stderr)
        return 0
    stats = None
    for event in engine.stream(args.prompt, **kwargs):
        if event.index == 0 and not args.chat:  # once the prompt is accepted: the continuation reads after it
            sys.stdout.write(args.prompt)
        sys.stdout.write(event.text)
        sys.stdout.flush()
        stats = event.stats or stats
    sys.stdout.write("\n")
    print(stats_line(stats), file=sys.stderr)
    return 0
