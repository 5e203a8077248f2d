"""The residual stream the engine captures for predictors and hidden-state traces is, for every architecture,
the stream entering the MoE block as transformers' own decoder layer computes it."""

import numpy as np
import pytest
import torch

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.foresight.predictors.next_gate import NextGatePredictor, model_routers
from offload_engine.request import RoutingRecorder

PROMPT = [5, 17, 33, 9, 70, 3, 44, 101]


def _attention(layer):
    return layer.linear_attn if getattr(layer, "linear_attn", None) is not None else layer.self_attn


# The stream after the attention sub-block, from the layer's input h and its attention output a, written
# out from each decoder layer's forward in transformers (models/<name>/modeling_<name>.py).
AFTER_ATTENTION = {
    "flex_olmo": lambda layer, h, a: h + layer.post_attention_layernorm(a),  # post-norm: the attention output
    "granitemoe": lambda layer, h, a: h + a * layer.residual_multiplier,
    "granitemoeshared": lambda layer, h, a: h + a * layer.residual_multiplier,
    "minimax": lambda layer, h, a: layer.input_layernorm(h) * layer.attn_alpha_factor + a * layer.attn_beta_factor,
}


def expected_streams(model, moe_layers):
    """Per MoE layer, the stream after the attention residual add, [B, T, H], computed from the reference
    model's layer inputs and attention outputs."""
    inputs, attention = {}, {}
    layers = model.model.layers
    hooks = []
    for i in moe_layers:
        hooks.append(layers[i].register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        hooks.append(_attention(layers[i]).register_forward_hook(
            lambda m, args, out, i=i: attention.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            model(torch.tensor([PROMPT]))
            after = AFTER_ATTENTION.get(model.config.model_type, lambda layer, h, a: h + a)
            return [after(layers[i], inputs[i], attention[i]) for i in moe_layers]
    finally:
        for h in hooks:
            h.remove()


def capturing(engine) -> dict:
    """Every residual the engine's hooks capture, by MoE layer (the request drops each at its layer's call)."""
    captured, capture = {}, engine.runtime.capture_residual

    def both(i, residual):  # returns None: a forward pre-hook's return value would replace the inputs
        captured[i] = residual
        capture(i, residual)

    engine.runtime.capture_residual = both
    return captured


@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_the_captured_residual_is_the_stream_entering_each_moe_block(tmp_path, name):
    model = tm.build_reference(name)
    tm.save_checkpoint(model, tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", dtype="float32", progress=False)
    captured = capturing(engine)
    request = engine.request(1, RoutingRecorder(hidden_states=True))
    with torch.no_grad():
        engine.forward(request, input_ids=torch.tensor([PROMPT]), use_cache=False)
    expected = expected_streams(model, engine.spec.moe_layers)
    assert sorted(captured) == list(range(len(expected)))
    for pos, want in enumerate(expected):
        got = captured[pos].reshape(want.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"MoE layer {pos}: {m}")


@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_next_gate_on_a_layers_own_residual_names_the_experts_that_layer_chose(tmp_path, name):
    """next-gate reads a later layer's router through that layer's norm (or none, post-norm): applied to the
    layer's own captured residual, it must give back exactly the experts the layer routed to."""
    tm.save_checkpoint(tm.build_reference(name), tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", dtype="float32", progress=False)
    captured = capturing(engine)
    recorder = RoutingRecorder(hidden_states=True)
    request = engine.request(1, recorder)
    with torch.no_grad():
        engine.forward(request, input_ids=torch.tensor([PROMPT]), use_cache=False)
        predictor = NextGatePredictor(*model_routers(engine.model, engine.spec.experts_paths))
        assert len(recorder.calls) == engine.spec.num_moe_layers
        for pos, chosen, _ in recorder.calls:
            residual = captured[pos].reshape(len(PROMPT), -1)  # fp32, as the layer computed it
            ranked = predictor.ranking(residual, pos, engine.spec.top_k).numpy()
            assert (np.sort(ranked, axis=1) == np.sort(chosen.numpy(), axis=1)).all(), f"MoE layer {pos}"
