"""Cold experts computed on the CPU where they lie, and the cost model that chooses between CPU and device.

Offloading changes speed, never results: every architecture and layout gives transformers' tokens and
logits with --cold-experts cpu and auto and with --cpu-moe-layers; in bf16 on this CPU-only machine (the
same kernel on the same device as the reference) the logits are bit-identical.
"""

import pytest
import torch

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.planning.cost_model import Hardware, Need, cpu_seconds, layer_seconds, place
from test_exactness import checkpoints  # noqa: F401 (the shared fixture of tiny checkpoints)
from test_exactness import PROMPT, REL_TOL, engine_steps, max_rel_error, reference_no_eos

MODES = {
    "cpu": dict(cold_experts="cpu"),
    "auto, cheap CPU": dict(cold_experts="auto", hardware=dict(cpu_call_s=1e-9, cpu_read_bytes_per_s=1e15,
                                                               cpu_flops=1e18)),
    "cpu layer 0": dict(cpu_moe_layers=1),
    "cpu + prefetch": dict(cold_experts="cpu", policy="predictive", predictor="next-gate", prefetch_depth=1),
}


@pytest.mark.parametrize("layout", tm.LAYOUTS)
@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_cpu_experts_never_change_tokens_or_logits(checkpoints, name, layout):
    path, ref_tokens, ref_logits = checkpoints(name, layout)
    for host in ("mmap", "ram", "files"):
        for label, settings in MODES.items():
            if host != "mmap" and label != "cpu":
                continue
            engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=3,
                                                   host_memory=host, progress=False, **settings)
            tokens, logits = engine_steps(engine, PROMPT)
            where = f"{name}/{layout}/{host}/{label}"
            assert tokens.tolist() == ref_tokens.tolist(), where
            assert max_rel_error(logits, ref_logits) < REL_TOL, where


def test_cpu_experts_are_counted_and_take_no_slot(checkpoints):
    path, ref_tokens, _ = checkpoints("mixtral", "per_expert")
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, cold_experts="cpu", progress=False)
    stats = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True).stats
    assert stats.cpu_experts > 0 and stats.misses == 0 and stats.bytes_to_device == 0
    assert not engine.cache.slot_of  # nothing was ever copied into a slot
    layered = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, cpu_moe_layers=1, progress=False)
    stats = layered.generate(PROMPT, max_new_tokens=12, ignore_eos=True).stats
    assert stats.per_layer[0]["cpu_experts"] > 0 and stats.per_layer[0]["misses"] == 0
    assert stats.per_layer[1]["cpu_experts"] == 0 and stats.per_layer[1]["misses"] > 0


def test_auto_places_the_cold_experts_where_the_cost_model_says(checkpoints):
    """--cold-experts auto: with a CPU modelled as free every cold expert runs there (nothing is copied), with
    a CPU modelled as hopeless none does (every cold expert is copied, as with stream)."""
    path, _, _ = checkpoints("mixtral", "per_expert")
    counts = {}
    for label, cpu in (("free CPU", dict(cpu_call_s=1e-9, cpu_read_bytes_per_s=1e15, cpu_flops=1e18)),
                       ("hopeless CPU", dict(cpu_call_s=1.0, cpu_read_bytes_per_s=1.0, cpu_flops=1.0))):
        engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, cold_experts="auto",
                                               hardware=cpu, progress=False)
        counts[label] = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True).stats
    assert counts["free CPU"].cpu_experts > 0 and counts["free CPU"].misses == 0
    assert counts["hopeless CPU"].cpu_experts == 0 and counts["hopeless CPU"].misses > 0


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_bf16_cpu_experts_are_bit_identical_on_a_cpu_only_machine(tmp_path, name):
    from transformers import AutoModelForCausalLM

    tm.build_reference(name).to(torch.bfloat16).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref_tokens, ref_logits = reference_no_eos(ref, torch.tensor([PROMPT]))
    for settings in (dict(cold_experts="cpu"), dict(cpu_moe_layers=1, expert_slots=2),
                     dict(cold_experts="cpu", host_memory="ram")):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", progress=False,
                                               **{"expert_slots": 3, **settings})
        tokens, logits = engine_steps(engine, PROMPT)
        assert tokens.tolist() == ref_tokens.tolist()
        assert torch.equal(logits, ref_logits), f"{name} {settings}"


# -- the cost model ----------------------------------------------------------------------------------------
MB = 1 << 20
GPU = Hardware(link_bytes_per_s=25e9, cpu_read_bytes_per_s=60e9, cpu_flops=1e12, cpu_call_s=20e-6,
               device_flops=100e12, device_read_bytes_per_s=1e12, device_call_s=10e-6, parallel=True)


def test_a_slow_link_sends_cold_experts_to_the_cpu():
    slow = Hardware(**{**GPU.as_dict(), "link_bytes_per_s": 2e9})
    needs = [Need(e, 1, resident=False) for e in range(4)]
    assert place(needs, 352 * MB, 2 * 176e6, slow) == {0, 1, 2, 3}  # decode: 4 experts of 352 MB, 1 token each


def test_a_long_prompt_sends_experts_to_the_device():
    needs = [Need(e, 2000, resident=False) for e in range(8)]
    on_cpu = place(needs, 352 * MB, 2 * 176e6, GPU)  # 2000 tokens: 0.7 TFLOP per expert on a 1 TFLOP/s CPU
    assert len(on_cpu) <= 1


def test_the_two_ended_greedy_balances_both_sides():
    """Decode on a fast link: resident experts keep the device busy, so the lightest cold experts go to the CPU
    while the busiest are copied; the placement beats all-device and all-CPU."""
    needs = [Need(0, 30, True), Need(1, 30, True), Need(2, 12, False), Need(3, 6, False), Need(4, 1, False),
             Need(5, 1, False)]
    size, flops = 64 * MB, 2 * 32e6
    on_cpu = place(needs, size, flops, GPU)
    assert 5 in on_cpu and 2 not in on_cpu
    chosen = layer_seconds(needs, on_cpu, size, flops, GPU)
    assert chosen <= layer_seconds(needs, set(), size, flops, GPU)
    assert chosen <= layer_seconds(needs, {2, 3, 4, 5}, size, flops, GPU)


def test_expected_reuse_makes_a_copy_worth_it():
    cpu_only = Hardware(link_bytes_per_s=10e9, cpu_read_bytes_per_s=10e9, cpu_flops=50e9, cpu_call_s=5e-6,
                        device_flops=50e9, device_call_s=5e-6, parallel=False)
    once = [Need(0, 1, resident=False, reuse=0.0)]
    again = [Need(0, 1, resident=False, reuse=9.0)]
    assert place(once, 8 * MB, 16e6, cpu_only) == {0}  # read once in place beats copy + compute
    assert place(again, 8 * MB, 16e6, cpu_only) == set()  # used ten times: copy it into a slot
    assert cpu_seconds(cpu_only, 1, 8 * MB, 16e6) == pytest.approx(5e-6 + 8 * MB / 10e9)


def test_calibrated_miss_costs_decide_without_a_gpu():
    """Where calibrate measured this model's per-miss costs, a cold expert goes where they say, whatever the
    rates and however many tokens it has (the same kernel on the same cores either way). hardware_of gets
    them only from a profile calibrated on the same model: folder name, expert size, layers and top-k."""
    from offload_engine.planning.hardware_profile import calibrated_model, hardware_of, model_name

    rates = dict(link_bytes_per_s=10e9, cpu_read_bytes_per_s=10e9, cpu_flops=50e9, cpu_call_s=5e-6,
                 device_flops=50e9, device_call_s=5e-6)
    cold = [Need(0, 1, resident=False)]
    assert place(cold, 8 * MB, 16e6, Hardware(**rates)) == {0}  # by the rates: in place
    copying_is_cheaper = Hardware(**rates, miss_s=0.1e-3, cpu_miss_s=0.2e-3)
    assert place(cold, 8 * MB, 16e6, copying_is_cheaper) == set()
    assert place([Need(0, 64, resident=False)], 8 * MB, 16e6, copying_is_cheaper) == set()  # a prompt too
    cpu_is_cheaper = Hardware(**rates, miss_s=0.2e-3, cpu_miss_s=0.15e-3)
    assert place(cold, 8 * MB, 16e6, cpu_is_cheaper) == {0}
    assert place([Need(0, 1, resident=False, reuse=1.0)], 8 * MB, 16e6, cpu_is_cheaper) == set()  # copy halved
    measured = {"name": "m", "expert_bytes": 8 * MB, "moe_layers": 4, "top_k": 2, "miss_s": 0.1e-3,
                "cpu_miss_s": 0.2e-3}
    table = {**rates, "model": measured}
    assert hardware_of(table, False, calibrated_model(table, "m", 8 * MB, 4, 2)).cpu_miss_s == 0.2e-3
    for other in (("other", 8 * MB, 4, 2), ("m", 4 * MB, 4, 2), ("m", 8 * MB, 5, 2), ("m", 8 * MB, 4, 1)):
        assert calibrated_model(table, *other) == {}, other
    assert hardware_of(table, parallel=False).miss_s == 0.0
    assert hardware_of({**rates, "model": {**measured, "miss_s": "fast"}}, False, {**measured, "miss_s": "fast"}).miss_s == 0
    assert model_name(".") == model_name(".").strip() != ""  # `--model .` has a name too
