"""Issue 2's benchmarks on a Mixtral-shaped model of about 200M parameters (random weights, made here).

(a) decode tokens/s, every expert resident, against transformers' own model on the same checkpoint
    (same dtype, same threads, runs interleaved, medians; the ratio is what to read on a shared machine);
(b) a quarter of the experts cached: tokens/s, hit rate, bytes moved per token, achieved copy bandwidth
    against this machine's measured memcpy bandwidth (and the (1 - h) * B / BW bound);
(c) peak host memory while loading against the size of the non-expert weights (a fresh process each);
(d) on a GPU (when one is present): (a) and (b) there, and the time per token against (1 - h) * B / BW_h2d.

    python benchmarks/bench_offload.py [--device cpu|cuda] [--threads 2] [--repeats 3] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, dtype="float32",
    )


def make_checkpoint(path: Path, dtype: torch.dtype) -> None:
    if (path / "config.json").is_file():
        return
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mixtral_config(), dtype=dtype)
    model.save_pretrained(path)


def parameter_count(path: Path) -> int:
    from offload_engine.checkpoint.directory import CheckpointTensors

    return sum(info.nbytes // info.dtype.itemsize for info in CheckpointTensors(path).infos.values())


def timed_decode(model, prompt: list[int], tokens: int, device) -> tuple[float, float]:
    """(prefill+first token s, decode tokens/s) through the engine's own decode loop."""
    from offload_engine.generation import SamplingConfig, decode_stream

    ids = torch.tensor([prompt], device=device)
    cfg = SamplingConfig(max_new_tokens=tokens, ignore_eos=True)
    steps = list(decode_stream(model, ids, torch.ones_like(ids), cfg, set(), 0))
    return steps[0].time_s, (len(steps) - 1) / (steps[-1].time_s - steps[0].time_s)


def hf_generate_rate(model, prompt, tokens, device) -> float:
    """transformers' generate, decode tokens/s from two lengths (prefill cancels out)."""
    ids = torch.tensor([prompt], device=device)
    model.generation_config.eos_token_id = None

    def run(n):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    return (tokens - 1) / (run(tokens) - run(1))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def memcpy_bandwidth(device, nbytes=256 * 1024**2) -> dict:
    """Bytes per second of plain copies: host to host, and host to device when there is a GPU."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = min(_time(lambda: dst.copy_(src)) for _ in range(5))
    out = {"host_to_host": nbytes / best}
    if torch.device(device).type == "cuda":
        pinned = src.pin_memory()
        gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)

        def h2d():
            gpu.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()

        out["host_to_device_pinned"] = nbytes / min(_time(h2d) for _ in range(5))
    return out


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_load_memory(path: Path, device: str, slots: int) -> dict:
    """Peak RSS growth while loading, in a fresh process; the baseline is taken once the code is imported and
    the model built on the meta device (no weights), so only weight memory is counted."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from the parent's high-water mark (kept across exec)
    hwm = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024"
    code = f"""
import json, torch
from offload_engine.engine import OffloadEngine, load_tokenizer
from offload_engine.loading import inspect_checkpoint, make_plan
from offload_engine.run_config import RunConfig
run = RunConfig.build(device={device!r}, expert_slots={slots}, progress=False)
inspected = inspect_checkpoint({str(path)!r}, run)
plan = make_plan(inspected, run)
base = {hwm}
engine = OffloadEngine(inspected, run, plan)
peak = {hwm}
print(json.dumps(dict(base=base, peak=peak, non_expert=plan.non_expert_bytes, slots=engine.cache.nbytes)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    engine = json.loads(out.stdout.strip().splitlines()[-1])
    code_hf = f"""
import json, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({str(path)!r}))
base = {hwm}
m = AutoModelForCausalLM.from_pretrained({str(path)!r})
print(json.dumps(dict(base=base, peak={hwm})))
"""
    out = subprocess.run([sys.executable, "-c", code_hf], capture_output=True, text=True, check=True)
    hf = json.loads(out.stdout.strip().splitlines()[-1])
    return {"engine": engine, "transformers": hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-offload-bench/mixtral-200m"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM

    from offload_engine import OffloadEngine

    make_checkpoint(args.dir, dtype)
    device = args.device
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}{' ' + torch.cuda.get_device_name() if device.startswith('cuda') else ''}, "
          f"torch {torch.__version__}, dtype {args.dtype}")
    print(f"checkpoint: {args.dir} ({parameter_count(args.dir) / 1e6:.0f}M parameters)")
    prompt = list(range(100, 132))

    reference = AutoModelForCausalLM.from_pretrained(args.dir, dtype=dtype).to(device).eval()
    resident = OffloadEngine.from_pretrained(args.dir, device=device, dtype=args.dtype, expert_slots=64,
                                             progress=False)
    quarter = OffloadEngine.from_pretrained(args.dir, device=device, dtype=args.dtype, expert_slots=16,
                                            progress=False)
    timed_decode(reference, prompt, 4, device)  # warm-up
    timed_decode(resident.model, prompt, 4, device)
    ref_rates, eng_rates, ratio, hf_rates, q_rates, q_stats = [], [], [], [], [], []
    for repeat in range(args.repeats):  # interleaved, alternating who goes first: both see the same load
        if repeat % 2 == 0:
            r = timed_decode(reference, prompt, args.tokens, device)[1]
            e = timed_decode(resident.model, prompt, args.tokens, device)[1]
        else:
            e = timed_decode(resident.model, prompt, args.tokens, device)[1]
            r = timed_decode(reference, prompt, args.tokens, device)[1]
        ref_rates.append(r)
        eng_rates.append(e)
        ratio.append(e / r)
        hf_rates.append(hf_generate_rate(reference, prompt, args.tokens // 2, device))
        before = quarter.cache.stats()
        q_rates.append(timed_decode(quarter.model, prompt, args.tokens, device)[1])
        q_stats.append(quarter.cache.stats().minus(before))
    med = statistics.median
    print("\n(a) decode tokens/s, every expert resident (median of interleaved runs)")
    print(f"    transformers (same decode loop)     {med(ref_rates):8.2f} tok/s   runs {[round(x, 2) for x in ref_rates]}")
    print(f"    transformers generate()             {med(hf_rates):8.2f} tok/s   runs {[round(x, 2) for x in hf_rates]}")
    print(f"    engine                              {med(eng_rates):8.2f} tok/s   runs {[round(x, 2) for x in eng_rates]}")
    print(f"    ratio engine / transformers         {med(ratio):8.3f}        runs {[round(x, 3) for x in ratio]}")

    stats = q_stats[-1]
    steps = args.tokens  # prefill + tokens-1 decode forwards, per run
    per_token_bytes = stats.bytes_to_device / steps
    expert_bytes = quarter.store.expert_nbytes()
    touched = quarter.spec.num_moe_layers * quarter.spec.top_k * expert_bytes
    bw = memcpy_bandwidth(device)
    achieved = stats.bytes_to_device / stats.copy_s if stats.copy_s else float("nan")
    link = bw.get("host_to_device_pinned", bw["host_to_host"])
    print(f"\n(b) {quarter.plan.expert_slots} of {quarter.plan.total_experts} experts cached "
          f"({100 * quarter.plan.resident_share:.0f}%), host memory '{quarter.store.mode}'")
    print(f"    decode tokens/s                     {med(q_rates):8.2f}  ({med(q_rates) / med(eng_rates):.3f} of all-resident)")
    print(f"    hit rate                            {stats.hit_rate:8.3f}  ({stats.hits} hits, {stats.misses} misses)")
    print(f"    bytes moved per token               {per_token_bytes / 1e6:8.2f} MB  (B = {touched / 1e6:.1f} MB touched per token)")
    print(f"    achieved copy bandwidth             {achieved / 1e9:8.2f} GB/s (copy time {stats.copy_s:.3f} s)")
    for name, value in bw.items():
        print(f"    measured memcpy {name:<19} {value / 1e9:8.2f} GB/s")
    bound = (1 - stats.hit_rate) * touched / link
    print(f"    bound (1-h)*B/BW                    {bound * 1e3:8.2f} ms/token; measured {1e3 / med(q_rates):.2f} ms/token")

    mem = peak_load_memory(args.dir, device, 16)
    e, h = mem["engine"], mem["transformers"]
    print("\n(c) peak host memory while loading (fresh process, growth over the imports)")
    print(f"    non-expert weights                  {e['non_expert'] / 1e6:8.1f} MB   (expert slots {e['slots'] / 1e6:.1f} MB)")
    print(f"    engine peak RSS growth              {(e['peak'] - e['base']) / 1e6:8.1f} MB")
    print(f"    transformers from_pretrained        {(h['peak'] - h['base']) / 1e6:8.1f} MB (loads every expert)")


if __name__ == "__main__":
    main()
