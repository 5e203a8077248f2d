"""Weights packed once for oneDNN (packed_weights.py, experts/packed_experts.py): the packed product against
F.linear, the probe that decides per weight shape where packing is exact, and the engine's tokens and logits
with packed CPU experts and packed layers against transformers' own model, bit for bit in bf16."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine import packed_weights as packed
from offload_engine.experts.offloaded_experts import plain_mlp
from test_exactness import PROMPT, engine_steps, reference_no_eos

EXACT = packed.packing_is_exact(torch.bfloat16, 256, 128)
needs_exact = pytest.mark.skipif(not EXACT, reason="bf16 F.linear does not run oneDNN on this CPU: nothing is packed")
F = torch.nn.functional


@needs_exact
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, packed.PACKED_MAX_ROWS), out_features=st.integers(1, 300),
       in_features=st.integers(1, 300), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_where_the_probe_packs_a_shape_its_products_are_f_linear_bit_for_bit(rows, out_features, in_features,
                                                                              bias, seed):
    """Many more inputs than the probe's own, summation-order ones included."""
    if not packed.packing_is_exact(torch.bfloat16, out_features, in_features, bias):
        return
    g = torch.Generator().manual_seed(seed)
    for weight, b, x in [packed.ordered_sum_probe(out_features, in_features, torch.bfloat16, g, bias)
                         for _ in range(8)] + \
            [packed.random_probe(out_features, in_features, torch.bfloat16, g, bias) for _ in range(20)]:
        assert torch.equal(packed.linear(x[:rows], packed.pack(weight), b), F.linear(x[:rows], weight, b))


@pytest.mark.parametrize("shape", [(1, 5), (1, 6), (1, 9), (1, 13), (2, 5), (3, 5), (8, 31)])
def test_narrow_products_are_never_packed(shape):
    """Shapes where the probe's layouts passed and other layouts of the same shape differ (measured on this
    project's VM): under MIN_PACKED_IN inputs nothing packs."""
    assert not packed.packing_is_exact(torch.bfloat16, *shape)


@needs_exact
def test_the_probe_refuses_a_kernel_that_sums_in_another_order(monkeypatch):
    """A kernel that adds the same products in reverse order is refused: the summation-order probe sees it
    where random values rarely would."""
    monkeypatch.setattr(packed, "pack", lambda w: w)
    monkeypatch.setattr(packed, "linear", lambda x, w, b=None: F.linear(x.flip(-1).float(), w.flip(-1).float(),
                                                                       None if b is None else b.float()).to(x.dtype))
    assert not packed.packing_is_exact(torch.bfloat16, 256, 128)
    monkeypatch.setattr(packed, "linear", lambda x, w, b=None: F.linear(x, w, b) * (1 + 2**-7))
    assert not packed.packing_is_exact(torch.bfloat16, 256, 128)
    monkeypatch.setattr(packed, "linear", F.linear)  # the same kernel: packs
    assert packed.packing_is_exact(torch.bfloat16, 256, 128)


def test_fp32_packs_nothing_because_its_packed_products_differ():
    """fp32 products run MKL, not oneDNN: packed, they differ in the last bits (where this build packs fp32 at
    all), so the probe refuses fp32 (and fp16, which packs only with AVX-512 FP16)."""
    weight, _, x = packed.ordered_sum_probe(512, 256, torch.float32, torch.Generator().manual_seed(0), False)
    try:
        differs = not torch.equal(packed.linear(x, packed.pack(weight)), F.linear(x, weight))
    except RuntimeError:
        differs = True  # no fp32 packing in this build
    assert differs
    assert not packed.packing_is_exact(torch.float32, 512, 256)
    assert not packed.packing_is_exact(torch.float16, 512, 256)


@needs_exact
def test_a_packed_layer_runs_what_the_probe_did_not_cover_on_the_stored_weight():
    """More rows than PACKED_MAX_ROWS (a prefill) or an input that is not contiguous: F.linear on the stored
    weight, read for the call; within the limit, the packed weight alone."""
    layer = torch.nn.Linear(256, 128, bias=True).to(torch.bfloat16)
    reads = []
    stored = layer.weight.detach().clone()
    wrapped = packed.PackedLinear(layer, lambda: reads.append(1) or stored)
    for x, read in ((torch.randn(3, 5, 256), False), (torch.randn(2, 9, 256), True),
                    (torch.randn(256, 4).t(), True)):
        x = x.to(torch.bfloat16)
        reads.clear()
        assert torch.equal(wrapped(x), F.linear(x, stored, layer.bias))
        assert bool(reads) == read


def scaled(name: str, factor: int = 8):
    """The tiny config of `name` with its widths (hidden, intermediate, head and LoRA sizes) x factor: wide
    enough that oneDNN's packed products are exact (the tiny widths of 24-64 are not, and stay as stored)."""
    config = tm.ARCHITECTURES[name]()
    for key, value in list(config.to_dict().items()):
        if isinstance(value, int) and not isinstance(value, bool) and value > 1 and (
                key == "hidden_size" or "intermediate_size" in key or key.endswith("head_dim")
                or key.endswith("lora_rank")):
            setattr(config, key, value * factor)
    return config


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("qwen3_moe_bf16")
    tm.build_reference("qwen3_moe", config=scaled("qwen3_moe")).to(torch.bfloat16).save_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    return path, *reference_no_eos(ref, torch.tensor([PROMPT]))


@needs_exact
@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_every_architecture_keeps_transformers_bits_with_packed_weights(tmp_path, name):
    """bf16 on this CPU, every architecture at widths that pack, with CPU experts (packed) and with every
    expert resident (packed layers): logits bit for bit transformers', and something was packed."""
    from transformers import AutoModelForCausalLM

    tm.build_reference(name, config=scaled(name)).to(torch.bfloat16).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref_tokens, ref_logits = reference_no_eos(ref, torch.tensor([PROMPT]))
    for run in (dict(cold_experts="cpu", expert_slots=2), dict()):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", progress=False, **run)
        tokens, logits = engine_steps(engine, PROMPT)
        assert packed_names(engine), f"{name}: no layer packed"
        if run:
            assert engine.runtime.packed is not None, f"{name}: CPU experts not packed"
        else:  # every expert fits: packed in place of slots where packed_expert computes them
            module = engine.model.get_submodule(engine.spec.experts_paths[0])
            assert engine.plan.experts_packed == plain_mlp(module), name
            assert engine.cache.num_slots == (0 if engine.plan.experts_packed else engine.spec.total_experts)
        assert tokens.tolist() == ref_tokens.tolist(), f"{name} {run}"
        assert torch.equal(logits, ref_logits), f"{name} {run}"


@needs_exact
@pytest.mark.parametrize("settings", [dict(cold_experts="cpu"), dict(cold_experts="cpu", host_memory="ram"),
                                      dict(cpu_moe_layers=1, expert_slots=2)])
def test_packed_cpu_experts_give_transformers_bits(bf16_model, settings):
    path, ref_tokens, ref_logits = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", progress=False, **{"expert_slots": 3, **settings})
    tokens, logits = engine_steps(engine, PROMPT)
    assert engine.runtime.packed.experts > 0, "no expert was packed"
    assert engine.runtime.packed.bytes == engine.runtime.packed.experts * engine.cache.store.expert_nbytes()
    assert tokens.tolist() == ref_tokens.tolist()
    assert torch.equal(logits, ref_logits)


CHEAP_CPU = dict(cold_experts="auto", hardware=dict(cpu_call_s=1e-9, cpu_read_bytes_per_s=1e15, cpu_flops=1e18))


@needs_exact
def test_with_cold_experts_cpu_every_expert_is_packed_at_load(bf16_model):
    """Where every cold expert of a layer runs on the CPU, its experts are packed at load (a first call would
    pack mid-token); with auto, as they first run."""
    path, _, _ = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, cold_experts="cpu", progress=False)
    spec = engine.spec
    assert engine.runtime.packed.experts == spec.num_moe_layers * spec.num_experts
    assert engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True).stats.cpu_packed == 0
    layered = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, cpu_moe_layers=1, progress=False)
    assert layered.runtime.packed.experts == spec.num_experts
    lazy = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, progress=False, **CHEAP_CPU)
    assert lazy.runtime.packed.experts == 0


@needs_exact
def test_past_the_capacity_experts_run_as_stored(bf16_model):
    path, ref_tokens, ref_logits = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, progress=False, **CHEAP_CPU)
    engine.runtime.packed.capacity_bytes = engine.cache.store.expert_nbytes()  # room for one
    tokens, logits = engine_steps(engine, PROMPT)
    assert engine.runtime.packed.experts == 1 and engine.cache.store.expert_nbytes() == engine.runtime.packed.bytes
    assert stats_cpu_experts(engine) > 1
    assert torch.equal(logits, ref_logits)


def stats_cpu_experts(engine) -> int:
    return engine.generate(PROMPT, max_new_tokens=2, ignore_eos=True).stats.cpu_experts


def test_with_stream_nothing_is_packed(bf16_model):
    path, _, ref_logits = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, progress=False)
    _, logits = engine_steps(engine, PROMPT)
    assert engine.runtime.packed.experts == 0 and engine.runtime.packed.bytes == 0
    assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("settings", [dict(cold_experts="cpu", dtype="float32"),
                                      dict(cold_experts="cpu", cpu_weights="stored"),
                                      dict(cold_experts="cpu", host_memory="direct")])
def test_no_packing_where_it_does_not_apply(bf16_model, settings):
    """Packing would change the bits (fp32), the user said so, or RAM is what the run lacks (the direct
    tier)."""
    path, _, ref_logits = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, progress=False, **settings)
    assert engine.runtime.packed is None
    if settings.get("dtype") is None:
        _, logits = engine_steps(engine, PROMPT)
        assert torch.equal(logits, ref_logits)


def test_a_wrong_setting_is_refused():
    from offload_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu_weights must be one of"):
        OffloadEngine.from_pretrained(tm.__file__, cpu_weights="fast", progress=False)


def packed_names(engine) -> set[str]:
    return {name for name, m in engine.model.named_modules() if isinstance(m, packed.PackedLinear)}


@needs_exact
def test_a_bf16_cpu_run_packs_its_linear_layers_and_keeps_the_bits(bf16_model):
    """Every attention projection and the (untied) LM head packed, nothing left as nn.Linear in bf16, and the
    logits of every step bit for bit transformers' own."""
    path, ref_tokens, ref_logits = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", progress=False)
    names = packed_names(engine)
    assert "lm_head" in names and any(n.endswith("self_attn.q_proj") for n in names)
    assert not [n for n, m in engine.model.named_modules() if type(m) is torch.nn.Linear]
    tokens, logits = engine_steps(engine, PROMPT)
    assert tokens.tolist() == ref_tokens.tolist()
    assert torch.equal(logits, ref_logits)


@needs_exact
def test_a_tied_lm_head_is_not_packed(tmp_path):
    """Packing the LM head would hold the embedding twice: a weight another module shares stays as it is."""
    config = scaled("qwen3_moe")
    config.tie_word_embeddings = True
    model = tm.build_reference("qwen3_moe", config=config).to(torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert packed.pack_linears(model, torch.bfloat16, lambda name: (lambda: model.get_submodule(name).weight)) > 0
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("settings", [dict(dtype="float32"), dict(cpu_weights="stored")])
def test_no_linear_is_packed_where_it_does_not_apply(bf16_model, settings):
    path, _, _ = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", progress=False, **settings)
    assert not packed_names(engine)


@needs_exact
def test_calibrate_times_the_cpu_experts_as_the_engine_computes_them(bf16_model):
    """A bf16 engine packs its CPU experts, so calibrate times packed experts (the cost model's CPU rate); one
    told to keep weights as stored is timed as stored."""
    from offload_engine.planning.calibration import calibrate

    path, _, _ = bf16_model
    for weights in ("packed", "stored"):
        engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, cpu_weights=weights, progress=False)
        table = calibrate(engine, progress=False)
        assert table["cpu_weights"] == weights and table["cpu_read_bytes_per_s"] > 0


@needs_exact
def test_plan_says_what_packed_cpu_experts_may_hold(bf16_model, capsys):
    import json

    from offload_engine.cli.main import main

    path, _, _ = bf16_model
    held = {}
    for cold in ("cpu", "stream"):
        assert main(["plan", "--model", str(path), "--expert-slots", "3", "--cold-experts", cold, "--json"]) == 0
        held[cold] = json.loads(capsys.readouterr().out)
    assert held["cpu"]["cpu_experts_packed_max_bytes"] == held["cpu"]["experts_total_bytes"]  # all of them fit
    assert held["stream"]["cpu_experts_packed_max_bytes"] == 0
    assert main(["plan", "--model", str(path), "--expert-slots", "3", "--cold-experts", "cpu"]) == 0
    assert "packed for oneDNN" in capsys.readouterr().out


@needs_exact
def test_packing_is_counted_once_per_expert_and_close_drops_it(bf16_model):
    path, _, _ = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, progress=False, **CHEAP_CPU)
    first = engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True).stats
    again = engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True).stats
    assert first.cpu_packed == engine.runtime.packed.experts > 0
    assert again.cpu_packed == 0 and again.cpu_experts == first.cpu_experts  # the same experts, packed already
    engine.close()
    assert engine.runtime.packed.experts == 0 and engine.runtime.packed.bytes == 0
    assert engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True).stats.cpu_packed == first.cpu_packed


@needs_exact
def test_a_cpu_device_holding_every_expert_packs_them_in_place_of_slots(bf16_model):
    """No slot count asked for and every expert fits: no slot pool, every expert packed at load and computed
    where it lies, transformers' bits; the stats count CPU experts, not lookups, and the packed bytes."""
    path, ref_tokens, ref_logits = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", progress=False)
    spec, plan = engine.spec, engine.plan
    assert plan.experts_packed and plan.expert_slots == spec.total_experts and engine.cache.num_slots == 0
    assert engine.runtime.packed.experts == spec.total_experts
    tokens, logits = engine_steps(engine, PROMPT)
    assert tokens.tolist() == ref_tokens.tolist() and torch.equal(logits, ref_logits)
    stats = engine.generate(PROMPT, max_new_tokens=3, ignore_eos=True).stats
    assert stats.hits == stats.misses == stats.bytes_to_device == stats.cpu_packed == 0
    assert stats.cpu_experts >= 3 * spec.top_k * spec.num_moe_layers
    assert stats.peak_device_bytes >= plan.non_expert_bytes + spec.total_experts * plan.expert_bytes


@needs_exact
@pytest.mark.parametrize("settings", [dict(expert_slots=10**6), dict(cpu_weights="stored"),
                                      dict(memory_budget="1GiB", cold_experts="cpu")])
def test_slots_stay_where_asked_for_or_where_nothing_packs(bf16_model, settings):
    """A slot count asked for (calibrate times slot loads) or weights as stored keep the slot pool; a budget
    that holds every expert packs them whatever --cold-experts says."""
    path, _, ref_logits = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", progress=False, **settings)
    packs = "memory_budget" in settings
    assert engine.plan.experts_packed == packs
    assert engine.cache.num_slots == (0 if packs else engine.spec.total_experts)
    _, logits = engine_steps(engine, PROMPT)
    assert torch.equal(logits, ref_logits)


@needs_exact
def test_a_predictor_prefetches_nothing_into_slots_that_cpu_layers_never_use(bf16_model):
    """Predicted experts of layers computed on the CPU (all of them here; --cpu-moe-layers' first N) are not
    copied into slots they would never be read from."""
    path, ref_tokens, _ = bf16_model
    for settings in (dict(), dict(expert_slots=3, cpu_moe_layers=10)):
        engine = OffloadEngine.from_pretrained(path, device="cpu", predictor="history", prefetch_depth=2,
                                               progress=False, **settings)
        result = engine.generate(PROMPT, max_new_tokens=ref_tokens.shape[1], ignore_eos=True)
        assert result.stats.prefetches == 0 and result.stats.misses == 0, settings
        assert result.token_ids == ref_tokens[0].tolist(), settings


@needs_exact
def test_plan_says_the_experts_are_packed_in_place_of_slots(bf16_model, capsys):
    import json

    from offload_engine.cli.main import main

    path, _, _ = bf16_model
    assert main(["plan", "--model", str(path), "--json"]) == 0
    held = json.loads(capsys.readouterr().out)
    assert held["experts_packed"] and held["cpu_experts_packed_max_bytes"] == held["experts_total_bytes"]
    assert main(["plan", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "experts packed for oneDNN" in out and "computed where they lie on the CPU" in out
    assert main(["plan", "--model", str(path), "--expert-slots", "3", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["experts_packed"]


@needs_exact
@pytest.mark.parametrize("exact_at", [1, 2])
def test_the_plan_packs_what_load_packs_whatever_the_threads_before_load(bf16_model, monkeypatch, exact_at):
    """make_plan runs before load sets the run's threads; packing is decided at the run's threads in both (a
    shape whose packed product is exact at one thread count only: the plan said packed, load packed nothing,
    and the stats' peak read runtime.packed.bytes of None)."""
    import offload_engine.loading as loading

    path, ref_tokens, _ = bf16_model
    real = loading.packing_is_exact
    monkeypatch.setattr(loading, "packing_is_exact",
                        lambda *a, **k: torch.get_num_threads() == exact_at and real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(3 - exact_at)  # the process's threads: not the ones packing is exact at
    try:
        engine = OffloadEngine.from_pretrained(path, device="cpu", threads=exact_at, progress=False)
        assert engine.plan.experts_packed and engine.runtime.packed is not None
        engine = OffloadEngine.from_pretrained(path, device="cpu", threads=3 - exact_at, progress=False)
        assert not engine.plan.experts_packed and engine.runtime.packed is None
        assert engine.cache.num_slots == engine.spec.total_experts
        result = engine.generate(PROMPT, max_new_tokens=ref_tokens.shape[1], ignore_eos=True)
        assert result.token_ids == ref_tokens[0].tolist()
    finally:
        torch.set_num_threads(before)


@needs_exact
def test_a_plan_of_packed_experts_keeps_slots_where_load_finds_the_direct_tier(bf16_model, monkeypatch):
    """The host memory is measured again at load (after the non-expert weights took theirs): where that turns
    to the direct tier, nothing packs, and the plan's bytes become the slot pool rather than no slot at all
    (every expert read around the page cache on every call)."""
    import offload_engine.loading as loading
    from offload_engine.run_config import RunConfig

    path, ref_tokens, _ = bf16_model
    run = RunConfig.build(device="cpu", progress=False)
    inspected = loading.inspect_checkpoint(path, run)
    plan = loading.make_plan(inspected, run)
    assert plan.experts_packed
    monkeypatch.setattr(loading, "host_mode", lambda *a, **k: "direct")
    engine = OffloadEngine(inspected, run, plan, None)
    assert engine.store.mode == "direct" and engine.runtime.packed is None
    assert engine.cache.num_slots == engine.spec.total_experts
    result = engine.generate(PROMPT, max_new_tokens=ref_tokens.shape[1], ignore_eos=True)
    assert result.token_ids == ref_tokens[0].tolist() and result.stats.misses == 0


@needs_exact
def test_calibrate_refuses_an_engine_without_slots_in_one_line(bf16_model):
    from offload_engine.errors import ConfigError
    from offload_engine.planning.calibration import calibrate

    path, _, _ = bf16_model
    engine = OffloadEngine.from_pretrained(path, device="cpu", progress=False)
    assert engine.cache.num_slots == 0
    with pytest.raises(ConfigError, match="expert_slots=N"):
        calibrate(engine, progress=False)


@needs_exact
def test_no_packing_in_place_where_ram_holds_the_packed_copies_but_not_the_files_pages_beside_them(bf16_model):
    """A prefill reads the experts from the files: the packed copies in place of slots only where RAM holds both
    (else every prefill would read the experts from the disk again)."""
    from offload_engine import loading
    from offload_engine.planning.host_memory import HostMemory

    path, _, _ = bf16_model
    run = loading.RunConfig.build(device="cpu", progress=False)
    inspected = loading.inspect_checkpoint(path, run)
    plan = loading.make_plan(inspected, run)
    assert plan.experts_packed
    experts = plan.total_experts * plan.expert_bytes
    for total, packs in ((plan.total_bytes + experts, False), (10 * (plan.total_bytes + experts), True)):
        memory = HostMemory(available_bytes=total, machine_available_bytes=total, limit_bytes=None)
        assert loading.packs_resident_experts(inspected, run, plan, memory) == packs
