"""The bundled default model: it loads, generates under an offloading budget exactly what transformers
generates with it, and its loss on the committed validation sample stays below the model card's bound."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import offload_engine
from offload_engine import OffloadEngine
from offload_engine.cli.main import main

MODEL = Path(offload_engine.__file__).parent / "default_model"
SAMPLE = Path(__file__).parent / "data" / "val_sample"
# The model card's bounds (offload_engine/default_model/README.md): measured loss + 0.3 nats per token.
BOUNDS = {"all": 3.98, "en": 3.86, "es": 4.42, "de": 4.38, "fr": 3.94, "ja": 3.53, "py": 4.19}
THIRD = 64  # expert slots: a third of the model's 192 experts
PROMPTS = ["The history of the", "import os\n\n\ndef ", "And God said to Moses,"]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL).eval(), AutoTokenizer.from_pretrained(MODEL)


def test_the_bundled_model_is_complete_and_small():
    assert (MODEL / "config.json").is_file() and (MODEL / "README.md").is_file()
    assert (MODEL / "model.safetensors").stat().st_size <= 50 * 1000**2
    config = json.loads((MODEL / "config.json").read_text())
    # fine-grained, MoE in every layer, no shared experts (issue 7)
    assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] >= 32
    assert config["num_experts_per_tok"] >= 4 and config["mlp_only_layers"] == [] and config["decoder_sparse_step"] == 1


def test_the_demo_profile_keeps_about_a_third_of_the_experts_resident(capsys):
    assert main(["plan", "--profile", str(Path(__file__).parents[1] / "profiles" / "demo.toml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(plan["expert_slots"] / plan["total_experts"] - 1 / 3) < 0.02


def test_the_shipped_predictor_loads_and_never_changes_tokens(reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:].tolist()
    card = json.loads((MODEL / "predictor" / "predictor.json").read_text())
    assert card["kind"] == "learned" and card["num_experts"] == model.config.num_local_experts
    engine = OffloadEngine.from_pretrained(MODEL, device="cpu", expert_slots=THIRD, policy="predictive",
                                           predictor="learned", progress=False)
    result = engine.generate(PROMPTS[1], max_new_tokens=24)
    assert result.token_ids == expected and result.stats.prefetches > 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_offloaded_generation_is_exactly_transformers(reference, prompt):
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=32, output_logits=True,
                             return_dict_in_generate=True)
    expected = out.sequences[0, ids.shape[1]:].tolist()
    engine = OffloadEngine.from_pretrained(MODEL, device="cpu", expert_slots=THIRD, progress=False)
    assert engine.plan.expert_slots < engine.plan.total_experts
    result = engine.generate(prompt, max_new_tokens=32)
    assert result.token_ids == expected
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert result.stats.misses > 0  # experts really were streamed in


def test_cli_default_model_under_a_budget(capsys):
    """No --model: the bundled checkpoint, under a budget that forces offloading."""
    code = main(["generate", "--profile", str(Path(__file__).parents[1] / "profiles" / "demo.toml"),
                 "--max-new-tokens", "12", "--json", "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) > 0 and result["text"].strip()
    assert result["stats"]["misses"] > 0


def sample_loss(model, tokenizer, seq_len: int = 256) -> dict[str, float]:
    """As benchmarks/eval_model.py: [EOS] + the file's tokens, windows of seq_len + 1 (stride seq_len)."""
    per, every = {}, []
    for path in sorted(SAMPLE.glob("*.txt")):
        ids = [tokenizer.eos_token_id] + tokenizer(path.read_text("utf-8"), add_special_tokens=False)["input_ids"]
        nll = []
        for start in range(0, len(ids) - 1, seq_len):
            window = torch.tensor(ids[start:start + seq_len + 1])[None]
            if window.shape[1] < 2:
                break
            with torch.inference_mode():
                logits = model(input_ids=window[:, :-1], output_router_logits=False).logits.float()
            nll.append(F.cross_entropy(logits[0], window[0, 1:], reduction="none"))
        nll = torch.cat(nll)
        per[path.stem] = nll.mean().item()
        every.append(nll)
    per["all"] = torch.cat(every).mean().item()
    return per


def test_offloaded_loss_on_the_validation_sample_is_below_the_bound():
    engine = OffloadEngine.from_pretrained(MODEL, device="cpu", dtype="float32", expert_slots=THIRD, progress=False)
    losses = sample_loss(engine.model, engine.tokenizer)
    assert set(losses) == set(BOUNDS)
    for domain, bound in BOUNDS.items():
        assert losses[domain] < bound, f"{domain}: loss {losses[domain]:.3f} >= bound {bound}"


def test_transformers_generation_features_work_on_the_offloaded_model(reference):
    """engine.model is transformers' model: a streamer and logits processing behave as on the reference."""
    from transformers import TextIteratorStreamer

    model, tokenizer = reference
    ids = tokenizer("In the beginning", return_tensors="pt")["input_ids"]
    kwargs = dict(do_sample=False, max_new_tokens=24, no_repeat_ngram_size=2, repetition_penalty=1.3)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    engine = OffloadEngine.from_pretrained(MODEL, device="cpu", expert_slots=THIRD, progress=False)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    with torch.no_grad():
        got = engine.model.generate(ids, streamer=streamer, **kwargs)
    assert got.tolist() == expected.tolist()
    assert "".join(streamer) == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_padded_batch_on_the_bundled_model(reference):
    """A batch of prompts of different lengths equals transformers' left-padded batch generate."""
    model, tokenizer = reference
    prompts = ["In the beginning", "import os\n\n\ndef "]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=16)
    engine = OffloadEngine.from_pretrained(MODEL, device="cpu", expert_slots=THIRD, max_batch=2, progress=False)
    results = engine.generate(prompts, max_new_tokens=16)
    width = batch["input_ids"].shape[1]
    for row, result in enumerate(results):
        expected = out[row, width:].tolist()
        if engine.eos_ids() & set(expected):
            expected = expected[:min(expected.index(e) for e in engine.eos_ids() if e in expected) + 1]
        assert result.token_ids == expected


def test_stream_yields_tokens_as_they_come():
    engine = OffloadEngine.from_pretrained(MODEL, device="cpu", expert_slots=THIRD, progress=False)
    events = list(engine.stream("In the beginning", max_new_tokens=12))
    result = engine.generate("In the beginning", max_new_tokens=12)
    assert [e.index for e in events] == list(range(len(events)))
    assert [e.token_id for e in events] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    assert all(e.stats is None for e in events[:-1]) and events[-1].stats.generated_tokens == len(events)
    assert events[-1].stats.ttft_s > 0 and events[-1].stats.decode_tokens_per_s > 0
