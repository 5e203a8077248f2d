"""The side-by-side benchmarks' parsers: llama.cpp's own timer, sizes on the command line, each program's rate;
the quantized-experts benchmark's agreement measure and a tiny run of it end to end."""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_larger_than_ram import parse_bytes  # noqa: E402
from benchmarks import bench_quantized  # noqa: E402
from benchmarks.bench_vs_llamacpp import rate_of  # noqa: E402
from benchmarks.llamacpp.bench import llama_timer  # noqa: E402

PERF = """llama_perf_sampler_print:    sampling time =       3.01 ms /    48 runs   (    0.06 ms per token, 15946.84 tokens per second)
llama_perf_context_print:        load time =     812.40 ms
llama_perf_context_print: prompt eval time =     250.00 ms /    16 tokens (   15.62 ms per token,    64.00 tokens per second)
llama_perf_context_print:        eval time =    1550.00 ms /    31 runs   (   50.00 ms per token,    20.00 tokens per second)
llama_perf_context_print:       total time =    1900.12 ms /    47 tokens
"""


def test_llama_timer_reads_prompt_and_decode_apart():
    t = llama_timer(PERF)
    assert (t["prompt_ms"], t["prompt_n"], t["decode_ms"], t["decode_n"]) == (250.0, 16, 1550.0, 31)
    assert t["decode_tokens_per_s"] == pytest.approx(20.0) and t["ttft_s"] == pytest.approx(0.25)
    assert llama_timer("no timer here") == {}


@given(st.integers(0, 1 << 40), st.sampled_from(["", "B", "K", "KiB", "M", "MiB", "G", "GiB", "gib", "T"]))
def test_parse_bytes_counts_binary_units(n, unit):
    scale = 1024 ** " KMGT".index((unit.upper().rstrip("B").rstrip("I")) or " ")
    assert parse_bytes(f"{n}{unit}") == n * scale


@pytest.mark.parametrize("text", ["", "GiB", "3 XB", "-1G", "1.2.3G"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_each_programs_rate_is_read_from_its_own_output():
    bench = json.dumps([{"samples_ts": [10.0, 30.0, 20.0], "avg_ts": 20.0}])
    assert rate_of("llama-bench", bench, "") == 20.0
    assert rate_of("llama-completion", "", PERF) == pytest.approx(20.0)
    assert rate_of("engine", json.dumps({"stats": {"decode_tokens_per_s": 7.5, "misses": 0}}), "") == 7.5
    # a program meant to hold every expert resident that loaded some is refused, not timed
    with pytest.raises(SystemExit):
        rate_of("engine", json.dumps({"stats": {"decode_tokens_per_s": 7.5, "misses": 3}}), "")
    assert rate_of("engine-cpu-experts", json.dumps({"stats": {"decode_tokens_per_s": 5.0, "misses": 3}}), "") == 5.0
    assert rate_of("transformers", "log line\n" + json.dumps({"decode_tokens_per_s": 3.0}), "") == 3.0


def test_agreement_counts_equal_positions_and_the_prefix_before_the_first_difference():
    a = bench_quantized.agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
    assert a.share == pytest.approx(5 / 6) and a.prefix == pytest.approx(2.0)
    assert bench_quantized.agreement([[1, 2]], [[7, 2]]).prefix == 0.0


def test_quantized_benchmark_runs_end_to_end_on_a_tiny_input(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 8
    (tmp_path / "en.txt").write_text(f"{text}\n{bench_quantized.EOS_SEPARATOR}\n{text}\n", "utf-8")
    out = tmp_path / "q.json"
    res = bench_quantized.main(["--heldout", str(tmp_path), "--windows", "1", "--seq-len", "8", "--prompts", "1",
                                "--prompt-len", "4", "--new-tokens", "3", "--threads", "1", "--json", str(out)])
    f = res["formats"]
    assert set(f) == {"auto", "bf16-by-expert", "int8", "int4"} and json.loads(out.read_text())["formats"]["int4"]["expert_bytes"]
    assert f["auto"]["domains"]["en"]["delta"] == 0.0 and f["auto"]["domains"]["en"]["share"] == 1.0
    assert f["auto"]["expert_bytes"] > f["int8"]["expert_bytes"] > f["int4"]["expert_bytes"]
    assert f["int4"]["domains"]["all"]["scored_tokens"] == 8
