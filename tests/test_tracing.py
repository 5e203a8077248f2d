"""Recorded routing equals the top-k that transformers' own routers compute on the same tokens."""

import json

import numpy as np
import pytest
import torch

import tiny_models as tm
from tiny_tokenizer import save_char_tokenizer
from offload_engine import OffloadEngine
from offload_engine.cli.main import main
from offload_engine.tracing.trace_file import load_trace


def router_topk_by_hooks(model, ids):
    """Run transformers' model once and catch each MoE router's top-k indices with forward hooks."""
    caught = []
    gates = [m.mlp.gate for m in model.model.layers if hasattr(getattr(m.mlp, "gate", None), "top_k")]
    hooks = [g.register_forward_hook(lambda mod, inp, out: caught.append(out[2].clone())) for g in gates]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return torch.stack(caught, dim=1).numpy()  # [T, L, k]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])  # per-expert, and a gated shared expert
def test_generation_trace_equals_router_topk(tmp_path, name):
    model = tm.build_reference(name)
    tm.save_checkpoint(model, tmp_path, "per_expert")
    prompt = [5, 17, 33, 9, 70, 3]
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=3, progress=False)
    result = engine.generate(prompt, max_new_tokens=10, ignore_eos=True, record_trace=True)
    trace = result.trace
    fed = prompt + result.token_ids[:-1]
    assert trace.expert_ids.shape == (1, len(fed), engine.spec.num_moe_layers, engine.spec.top_k)
    assert trace.token_ids[0].tolist() == fed
    assert list(trace.moe_layers) == list(engine.spec.moe_layers)
    expected = router_topk_by_hooks(model, torch.tensor([fed]))
    np.testing.assert_array_equal(trace.expert_ids[0], expected)


def test_batched_generation_trace_moves_left_padding_to_the_end(tmp_path):
    model = tm.build_reference("mixtral")
    tm.save_checkpoint(model, tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=4, max_batch=2, progress=False)
    prompts = [[5, 17, 33, 9, 70, 3], [8, 9]]
    results = engine.generate(prompts, max_new_tokens=5, ignore_eos=True, record_trace=True)
    trace = results[0].trace
    for row, (prompt, result) in enumerate(zip(prompts, results)):
        fed = prompt + result.token_ids[:-1]
        expected = router_topk_by_hooks(model, torch.tensor([fed]))
        np.testing.assert_array_equal(trace.expert_ids[row, :len(fed)], expected)
        assert (trace.expert_ids[row, len(fed):] == -1).all()


def test_corpus_trace_matches_routers_and_labels_domains(tmp_path):
    model = tm.build_reference("qwen3_moe")
    tm.save_checkpoint(model, tmp_path / "m", "per_expert")
    tokenizer = save_char_tokenizer(tmp_path / "m")
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 8)
    (tmp_path / "b.txt").write_text("The quick brown fox jumps over the lazy dog. " * 6)
    out = tmp_path / "trace.npz"
    code = main(["trace", "--model", str(tmp_path / "m"), "--input", f"code={tmp_path / 'a.txt'}",
                 f"prose={tmp_path / 'b.txt'}", "--seq-len", "32", "--max-seqs", "3", "--out", str(out), "--quiet",
                 "--expert-slots", "3"])
    assert code == 0
    trace = load_trace(out)
    assert trace.domains == ("code",) * 3 + ("prose",) * 3
    assert trace.expert_ids.shape[:2] == (6, 32)
    # the first chunk is the start of a.txt; routing equals the routers' top-k on those very tokens
    first = tokenizer((tmp_path / "a.txt").read_text(), add_special_tokens=False)["input_ids"][:32]
    assert trace.token_ids[0].tolist() == first
    expected = router_topk_by_hooks(model, torch.tensor([first]))
    np.testing.assert_array_equal(trace.expert_ids[0], expected)


def test_cli_generate_json_and_trace_out(tmp_path, capsys):
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path / "m", "per_expert")
    save_char_tokenizer(tmp_path / "m")
    out = tmp_path / "gen.npz"
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "6",
                 "--expert-slots", "2", "--json", "--quiet", "--ignore-eos", "--trace-out", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) == 6 and isinstance(result["text"], str)
    assert {"hits", "misses", "bytes_to_device", "ttft_s", "decode_tokens_per_s", "peak_device_bytes"} <= set(
        result["stats"])
    trace = load_trace(out)
    assert trace.expert_ids.shape[1] == 5 + 6 - 1  # "Hello" and the fed-back tokens


def test_cli_streams_text_and_prints_stats(tmp_path, capsys):
    tm.save_checkpoint(tm.build_reference("olmoe"), tmp_path / "m", "per_expert")
    tokenizer = save_char_tokenizer(tmp_path / "m")
    engine = OffloadEngine.from_pretrained(tmp_path / "m", device="cpu", expert_slots=2, progress=False)
    expected = engine.generate("Hi", max_new_tokens=8, chat=True, ignore_eos=True).text
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "8",
                 "--expert-slots", "2", "--chat", "--quiet", "--ignore-eos"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == expected + "\n"  # with --chat, the continuation alone
    plain = engine.generate("Hi", max_new_tokens=8, ignore_eos=True).text
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "8",
                 "--expert-slots", "2", "--quiet", "--ignore-eos"]) == 0
    assert capsys.readouterr().out == "Hi" + plain + "\n"
    assert "TTFT" in captured.err and "hit rate" in captured.err and "tok/s" in captured.err
    assert tokenizer is not None


def test_cli_plan_json(tmp_path, capsys):
    tm.save_checkpoint(tm.build_reference("deepseek_v3"), tmp_path, "per_expert")
    assert main(["plan", "--model", str(tmp_path), "--memory-budget", "64MiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model_type"] == "deepseek_v3"
    assert plan["total_bytes"] <= 64 * 1024**2
    assert plan["expert_slots"] == plan["total_experts"]  # a tiny model fits whole


def test_documents_are_split_on_form_feeds_and_eos_lines():
    from offload_engine.tracing.recording import split_documents

    text = "first doc\nline two\n<|endoftext|>\nsecond\fthird\n<|endoftext|>  \n\n"
    assert split_documents(text, "<|endoftext|>") == ["first doc\nline two", "second", "third"]
    assert split_documents("one <|endoftext|> inline", "<|endoftext|>") == ["one <|endoftext|> inline"]
    assert split_documents("a\fb", None) == ["a", "b"]
