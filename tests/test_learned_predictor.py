"""The learned predictor: traces with hidden states, training, its card and files, its recall, and generation
with it (exactly transformers' tokens)."""

import json

import numpy as np
import pytest
import torch

import tiny_models as tm
from tiny_tokenizer import save_char_tokenizer
from offload_engine import ConfigError, OffloadEngine
from offload_engine.cli.main import main
from offload_engine.foresight.predictors.evaluate import evaluate
from offload_engine.foresight.predictors.learned import (CARD_FILE, WEIGHTS_FILE, LearnedPredictor, TrainSettings,
                                                         train_learned)
from offload_engine.tracing.trace_file import load_trace
from test_exactness import PROMPT, REL_TOL, engine_steps, max_rel_error, reference_no_eos


def synthetic(seed=0, N=16, T=64, L=4, E=16, k=2, H=32):
    """Routing a predictor can learn: layer l+1's experts are a fixed permutation of layer l's (the path table's
    job), and layer 0's experts are read off the residual (the linear head's job: one direction per expert)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(E)
    directions = rng.standard_normal((E, H)).astype(np.float32)
    ids = np.zeros((N, T, L, k), np.int16)
    hidden = rng.standard_normal((N, T, L, H)).astype(np.float32) * 0.1
    for n in range(N):
        for t in range(T):
            first = rng.choice(E, k, replace=False)
            for layer in range(L):
                chosen = first if layer == 0 else perm[ids[n, t, layer - 1]]
                ids[n, t, layer] = chosen
                hidden[n, t, layer] += directions[perm[chosen]].sum(0)  # names the next layer's experts
    return ids, hidden, E


def test_heads_learn_a_learnable_routing_far_above_chance():
    ids, hidden, E = synthetic()
    predictor = train_learned(ids, hidden, E, TrainSettings(max_depth=2, epochs=30, lr=3e-2), progress=False)
    accuracy = evaluate(predictor, ids, hidden, depth=2)
    k = ids.shape[-1]
    assert accuracy.overall[1]["recall"][k] > 0.95  # chance: k / E = 0.125
    assert accuracy.overall[2]["recall"][k] > 0.95
    assert predictor.card["final_loss"]["0+1"] < predictor.card["uniform_loss"]


def test_a_trained_predictor_saves_and_loads_whole(tmp_path):
    ids, hidden, E = synthetic(N=4, T=16)
    predictor = train_learned(ids, hidden, E, TrainSettings(max_depth=2, epochs=2), progress=False)
    predictor.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted([CARD_FILE, WEIGHTS_FILE])
    again = LearnedPredictor.load(tmp_path / "p", num_layers=4, num_experts=E, hidden_size=32)
    assert torch.equal(again.weight, predictor.weight.half().float())
    assert again.wraps and all(torch.equal(a, b.half().float()) for a, b in
                               zip(again.next_call[::2], predictor.next_call[::2]))  # the fp16-stored ones
    assert again.card == json.loads(json.dumps(predictor.card))
    with pytest.raises(ConfigError, match="trained for 4 MoE layers of 16 experts"):
        LearnedPredictor.load(tmp_path / "p", num_layers=4, num_experts=8, hidden_size=32)
    with pytest.raises(ConfigError, match="not a trained predictor"):
        LearnedPredictor.load(tmp_path, num_layers=4, num_experts=E, hidden_size=32)
    from safetensors.torch import load_file, save_file

    for name, bad in (("next_call_weight", torch.zeros(4, E, 7)), ("next_call_bias", torch.zeros(3, E))):
        tensors = load_file(str(tmp_path / "p" / WEIGHTS_FILE))
        tensors[name] = bad  # a damaged file: a tensor of the wrong shape
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / WEIGHTS_FILE))
        (tmp_path / name / CARD_FILE).write_text((tmp_path / "p" / CARD_FILE).read_text())
        with pytest.raises(ConfigError, match="not a trained predictor"):
            LearnedPredictor.load(tmp_path / name, num_layers=4, num_experts=E, hidden_size=32)


def test_trace_train_eval_and_generate_with_a_learned_predictor(tmp_path, capsys):
    """The README's path: trace with hidden states, train, evaluate, generate with the predictor's folder; the
    tokens and logits are transformers' at the smallest cache and the deepest prefetch."""
    model = tm.build_reference("qwen3_moe")
    ckpt = tmp_path / "m"
    tm.save_checkpoint(model, ckpt, "per_expert")
    save_char_tokenizer(ckpt)
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 10)
    trace_path, out = tmp_path / "trace.npz", tmp_path / "pred"
    assert main(["trace", "--model", str(ckpt), "--input", f"code={tmp_path / 'a.txt'}", "--seq-len", "32",
                 "--max-seqs", "4", "--hidden-states", "--out", str(trace_path), "--quiet"]) == 0
    trace = load_trace(trace_path)
    spec = OffloadEngine.from_pretrained(ckpt, device="cpu", progress=False).spec
    assert trace.hidden_states.shape == (*trace.expert_ids.shape[:3], model.config.hidden_size)
    assert main(["predictor", "train", "--trace", str(trace_path), "--out", str(out), "--epochs", "2",
                 "--depth", "1", "--quiet"]) == 0
    card = json.loads((out / CARD_FILE).read_text())
    assert card["num_layers"] == spec.num_moe_layers and card["train_tokens"] == 4 * 32
    capsys.readouterr()
    assert main(["predictor", "eval", "--trace", str(trace_path), "--predictor", str(out), "--model", str(ckpt),
                 "--depth", "1", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["overall"]["1"]["recall"][str(spec.top_k)] <= 1

    ref_tokens, ref_logits = reference_no_eos(model, torch.tensor([PROMPT]))
    for slots in (spec.top_k, 2 * spec.top_k):  # at top_k slots a prefetch has no slot it may take
        engine = OffloadEngine.from_pretrained(ckpt, device="cpu", dtype="float32", expert_slots=slots,
                                               policy="predictive", predictor=str(out), prefetch_depth=3,
                                               progress=False)
        tokens, logits = engine_steps(engine, PROMPT)
        assert tokens.tolist() == ref_tokens.tolist()
        assert max_rel_error(logits, ref_logits) < REL_TOL
        stats = engine.generate(PROMPT, max_new_tokens=8).stats
        assert stats.predict_s > 0 and (slots == spec.top_k or stats.prefetches > 0)

def test_trace_hidden_states_are_the_residual_entering_each_moe_block(tmp_path):
    """The stored residual is the input of each MoE layer's post-attention norm, as the model computes it."""
    model = tm.build_reference("qwen3_moe")
    tm.save_checkpoint(model, tmp_path / "m", "per_expert")
    tokenizer = save_char_tokenizer(tmp_path / "m")
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (tmp_path / "b.txt").write_text(text)
    assert main(["trace", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "b.txt"), "--seq-len", "24",
                 "--max-seqs", "1", "--hidden-states", "--out", str(tmp_path / "t.npz"), "--quiet"]) == 0
    trace = load_trace(tmp_path / "t.npz")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:24]
    caught = []
    norms = [layer.post_attention_layernorm for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    hooks = [n.register_forward_hook(lambda mod, inp, out: caught.append(inp[0][0].clone())) for n in norms]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    expected = torch.stack(caught, dim=1).numpy()  # [T, L, H]
    np.testing.assert_allclose(trace.hidden_states[0].astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_the_compiled_heads_rank_as_the_plain_scores_do():
    """predict() runs every head of a layer in one compiled call; it must rank as the heads' formula
    (W x + b + sum of U over the layer's experts, then ranked()) does, for every layer, depth and row, at n below
    and above k (random weights: no near-ties for float rounding to swap)."""
    from offload_engine.foresight.predictors.base import LayerContext, Paths, ranked

    ids, hidden, E = synthetic(N=4, T=16)
    predictor = train_learned(ids, hidden, E, TrainSettings(max_depth=3, epochs=2), progress=False)
    rng = np.random.default_rng(1)
    L, H = predictor.num_layers, predictor.hidden_size
    for layer in range(L):
        x = rng.standard_normal((3, H)).astype(np.float32)
        experts = rng.integers(0, E, size=(3, 2)).astype(np.int64)
        ctx = LayerContext(layer, experts, torch.from_numpy(x), Paths.empty(3, L, 2))
        normalised = x / np.sqrt(np.square(x).mean(-1, keepdims=True) + 1e-6)
        for n in (2, 5):
            within = list(range(1, min(3, L - 1 - layer) + 1))
            assert [p.depth for p in predictor.predict(ctx, 3, n)] == within
            got = predictor.predict(ctx, L, n)  # the engine's horizon: also the layer's own next call
            assert [(p.depth, p.layer) for p in got] == [(d, layer + d) for d in within] + [(L, layer)]
            for p in got:  # the heads' formula, from the saved tensors, not from the stacked matrices
                if p.depth == L:
                    W, b, U = (t[layer].numpy() for t in predictor.next_call)
                else:
                    d = p.depth - 1
                    W, b, U = predictor.weight[layer, d].numpy(), predictor.bias[layer, d].numpy(), predictor.path_weight[layer, d].numpy()
                want = ranked(normalised @ W.T + b + U[experts].sum(1), n)
                assert np.array_equal(p.experts, want), (layer, p.depth, n)


def test_the_next_call_heads_learn_the_next_tokens_routing():
    """Routing where the residual at (token t, layer l) names the experts token t + 1 will use at l: each
    layer's own next-call head learns it (chance: k / E = 0.125); a predictor trained without those heads
    makes no such prediction."""
    from offload_engine.foresight.predictors.base import LayerContext, Paths

    rng = np.random.default_rng(0)
    N, T, L, E, k, H = 16, 64, 2, 16, 2, 32
    directions = rng.standard_normal((E, H)).astype(np.float32)
    ids = np.stack([[[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(T)] for _ in range(N)])
    hidden = rng.standard_normal((N, T, L, H)).astype(np.float32) * 0.1
    hidden[:, :-1] += directions[ids[:, 1:]].sum(-2)
    predictor = train_learned(ids.astype(np.int16), hidden, E, TrainSettings(max_depth=1, epochs=30, lr=3e-2),
                              progress=False)
    hits = total = 0
    for n in range(N):
        for t in range(T - 1):
            for layer in range(L):
                ctx = LayerContext(layer, ids[n, t, layer][None].astype(np.int64),
                                   torch.from_numpy(hidden[n, t, layer][None]), Paths.empty(1, L, k))
                (own,) = [p for p in predictor.predict(ctx, L, k) if p.depth == L]
                hits += len(set(own.experts[0].tolist()) & set(ids[n, t + 1, layer].tolist()))
                total += k
    assert hits / total > 0.9
    plain = train_learned(ids.astype(np.int16), hidden, E, TrainSettings(max_depth=1, epochs=1, next_call=False),
                          progress=False)
    ctx = LayerContext(0, ids[0, 0, 0][None].astype(np.int64), torch.from_numpy(hidden[0, 0, 0][None]),
                       Paths.empty(1, L, k))
    assert not plain.wraps and [p.depth for p in plain.predict(ctx, L, k)] == [1]
