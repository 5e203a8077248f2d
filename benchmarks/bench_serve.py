"""The server under load: the official `openai` client against `moe-offload serve` on 127.0.0.1.

For each number of concurrent clients, a fresh server (the bundled model at the demo budget, `--max-batch`
rows) and that many client threads, each sending streamed completions of held-out text one after another
until the run's request count or time is spent. Prints, per client count: aggregate completion tokens/s,
time to first token and per-token latency (the gaps between streamed chunks) at p50 and p99, and from the
server's /metrics: decode steps, distinct experts per decode step (what its layer calls looked up: a batch's
union, layer by layer), bytes of experts moved per generated token (prefills included), hit rate, and the
admissions that skipped the queue's head.

With `--schedule fifo,routing` each client count runs a server of each schedule (`serve --schedule`), in the
order A B B A (`--repeats 2`: A B B A A B B A, ...), the same prompts for every run; the medians per schedule
are printed after the runs.

    python benchmarks/heldout.py --max-chars 40000           # the prompts (.cache/heldout), once
    python benchmarks/bench_serve.py [--clients 1,4,16] [--max-batch 4] [--requests 24] [--max-tokens 32]
        [--schedule fifo] [--schedule-max-skips N] [--repeats 1] [--time-limit 300] [--out runs/bench_serve.json]

Run it on an otherwise idle machine: the server and the clients share its cores.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.atomic_write import atomic_output  # noqa: E402

HELDOUT = ROOT / ".cache" / "heldout"
DOMAINS = ("en", "es", "de", "fr", "py")
EOS_LINE = "<|endoftext|>"


def prompts(count: int, tokens: int, seed: int = 0) -> list[str]:
    """`count` prompts: the start of held-out documents, the domains in turn, each cut to `tokens` tokens of
    the bundled model's tokenizer or shorter (a fortune can be a line; the server may count a token or two more)."""
    from transformers import AutoTokenizer

    from offload_engine import DEFAULT_MODEL

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    docs = {}
    for domain in DOMAINS:
        path = HELDOUT / f"{domain}.txt"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python benchmarks/heldout.py --max-chars 40000` first")
        docs[domain] = [d.strip() for d in path.read_text("utf-8").split(EOS_LINE) if len(d.strip()) >= 40]
    rng = random.Random(seed)
    chosen = [rng.choice(docs[DOMAINS[i % len(DOMAINS)]])[:16 * tokens] for i in range(count)]
    return [tokenizer.decode(tokenizer(text)["input_ids"][:tokens]) for text in chosen]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(base: str) -> dict[str, float]:
    """The server's counters (Prometheus text; sample name -> value, unlabelled samples only)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def start_server(port: int, max_batch: int, max_context: int, profile: Path, schedule: str,
                 max_skips: int | None, prefill_chunk: int | None = None) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("moe-offload")), "serve", "--profile", str(profile),
               "--port", str(port), "--max-batch", str(max_batch), "--max-context", str(max_context),
               "--max-queue", "1024", "--schedule", schedule]
    if max_skips is not None:
        command += ["--schedule-max-skips", str(max_skips)]
    if prefill_chunk is not None:
        command += ["--prefill-chunk", str(prefill_chunk)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): {server.stderr.read()[-1500:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("the server did not come up within 120 s")


def client_loop(base: str, model: str, queue: list[str], lock: threading.Lock, max_tokens: int, stop_at: float,
                results: list[dict]) -> None:
    from openai import APIError, OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    while time.monotonic() < stop_at:
        with lock:
            if not queue:
                return
            prompt = queue.pop()
        start = time.perf_counter()
        stamps, text = [], []
        usage = None
        try:
            stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
                    text.append(chunk.choices[0].text)
                if chunk.usage is not None:
                    usage = chunk.usage
        except APIError as e:  # counted, and the client goes on with its next prompt
            results.append({"error": str(e)[:200]})
            continue
        if not stamps:
            continue
        results.append({"ttft_s": stamps[0] - start, "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
                        "completion_tokens": usage.completion_tokens if usage else len(stamps),
                        "end": stamps[-1]})


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(clients: int, schedule: str, args, prefill_chunk: int | None = None) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port, args.max_batch, args.max_context, args.profile, schedule, args.schedule_max_skips,
                          prefill_chunk)
    try:
        model = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=10).read())["data"][0]["id"]
        queue = prompts(max(args.requests, 3 * clients), args.prompt_tokens, seed=clients + 1000 * args.prompt_seed)
        before = metrics(base)
        results: list[dict] = []
        lock = threading.Lock()
        start = time.perf_counter()
        stop_at = time.monotonic() + args.time_limit
        threads = [threading.Thread(target=client_loop, args=(base, model, queue, lock, args.max_tokens, stop_at,
                                                               results)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [r["error"] for r in results if "error" in r]
        results = [r for r in results if "error" not in r]
        wall = max((r["end"] for r in results), default=time.perf_counter()) - start
        after = metrics(base)
    finally:
        server.terminate()
        server.wait(timeout=60)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    generated = delta.get("moe_offload_generated_tokens_total", 0.0)
    steps = delta.get("moe_offload_decode_steps_total", 0.0)
    decode_lookups = delta.get("moe_offload_decode_expert_lookups_total", 0.0)
    lookups = delta.get("moe_offload_expert_cache_hits_total", 0.0) + delta.get("moe_offload_expert_cache_misses_total", 0.0)
    tokens = sum(r["completion_tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps_s"]]
    ttft = [r["ttft_s"] for r in results]
    return {
        "clients": clients, "schedule": schedule, "prefill_chunk": prefill_chunk, "requests": len(results), "errors": errors, "completion_tokens": tokens, "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "token_latency_p50_s": percentile(gaps, 0.5), "token_latency_p99_s": percentile(gaps, 0.99),
        "decode_steps": steps, "distinct_experts_per_step": decode_lookups / steps if steps else None,
        "bytes_per_generated_token": delta.get("moe_offload_expert_bytes_to_device_total", 0.0) / generated
        if generated else None,
        "hit_rate": delta.get("moe_offload_expert_cache_hits_total", 0.0) / lookups if lookups else None,
        "generated_tokens": generated, "schedule_skips": delta.get("moe_offload_schedule_skips_total", 0.0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (rows of one batch)")
    p.add_argument("--max-context", type=int, default=128,
                   help="the server's --max-context: the demo budget holds 4 rows of 128 tokens as it holds 1 of 512")
    p.add_argument("--profile", type=Path, default=ROOT / "profiles" / "demo.toml")
    p.add_argument("--requests", type=int, default=24, help="requests per client count (at least 3 per client)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--prompt-seed", type=int, default=0,
                   help="another draw of prompts (a check on settings chosen with the default draw)")
    p.add_argument("--schedule", default="fifo",
                   help="the server's --schedule, or several (fifo,routing): run in the order A B B A per client count")
    p.add_argument("--schedule-max-skips", type=int, default=None,
                   help="the server's --schedule-max-skips (default: the server's, 1.5 x --max-batch)")
    p.add_argument("--prefill-chunk", default=None,
                   help="the server's --prefill-chunk (default: the server's), or several (0,32): run in the order "
                        "A B B A per client count, as several schedules are (one schedule then)")
    p.add_argument("--repeats", type=int, default=1, help="with several schedules or chunks: how many A B B A rounds")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per client count")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_serve.json")
    args = p.parse_args()
    schedules = args.schedule.split(",")
    if not set(schedules) <= {"fifo", "routing"} or len(set(schedules)) != len(schedules):
        p.error(f"--schedule: fifo, routing or fifo,routing, not {args.schedule!r}")
    chunks = [None] if args.prefill_chunk is None else [int(c) for c in args.prefill_chunk.split(",")]
    if len(chunks) > 1 and len(schedules) > 1:
        p.error("--prefill-chunk: several chunk sizes run with one --schedule")
    variants = [(s, chunks[0]) for s in schedules] if len(chunks) == 1 else [(schedules[0], c) for c in chunks]
    order = variants + variants[::-1] if len(variants) > 1 else variants  # A B B A
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        for schedule, chunk in order * args.repeats:
            row = run(clients, schedule, args, chunk)
            rows.append(row)
            print(f"{label(schedule, chunk):>16} " + line(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "max_batch": args.max_batch,
                            "max_tokens": args.max_tokens, "rows": rows}, indent=1).encode())
    if len(variants) > 1:
        print("medians of the runs:")
        for clients in dict.fromkeys(r["clients"] for r in rows):
            for schedule, chunk in variants:
                runs = [r for r in rows if r["clients"] == clients and (r["schedule"], r["prefill_chunk"]) == (schedule, chunk)]
                kept = ("clients", "schedule", "prefill_chunk", "errors")
                print(f"{label(schedule, chunk):>16} " + line({k: runs[0][k] if k in kept else median([r[k] for r in runs])
                                                 for k in runs[0]}) + f" (medians of {len(runs)} runs)", flush=True)
    elif len(rows) > 1 and rows[0]["clients"] == 1:
        for row in rows[1:]:
            print(f"aggregate tokens/s at {row['clients']} clients / 1 client: "
                  f"{row['aggregate_tokens_per_s'] / rows[0]['aggregate_tokens_per_s']:.2f}x")
    return 0


def label(schedule: str, chunk: int | None) -> str:
    return schedule if chunk is None else f"{schedule} chunk {chunk}"


def median(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def line(row: dict) -> str:
    experts = row["distinct_experts_per_step"]
    return (f"{row['clients']:>3} clients: {row['requests']:.0f} requests ({len(row['errors'])} refused), "
            f"{row['aggregate_tokens_per_s']:7.1f} tok/s aggregate, "
            f"TTFT p50 {1e3 * row['ttft_p50_s']:7.1f} ms p99 {1e3 * row['ttft_p99_s']:7.1f} ms, per token p50 "
            f"{1e3 * row['token_latency_p50_s']:6.1f} ms p99 {1e3 * row['token_latency_p99_s']:6.1f} ms, "
            f"{'-' if experts is None else f'{experts:.1f}'} distinct experts/step, "
            f"{(row['bytes_per_generated_token'] or 0) / 1e6:.2f} MB moved/token, hit rate "
            f"{row['hit_rate'] if row['hit_rate'] is not None else float('nan'):.3f}, "
            f"{row['schedule_skips']:.0f} schedule skips")


if __name__ == "__main__":
    sys.exit(main())
