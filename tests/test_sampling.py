"""The sampler against transformers' own: its temperature, top-k and top-p warpers in generate's order, then
torch.multinomial with a generator seeded alike. The same logits must give the same filtered scores and the
same token for every seed, and a seeded generation the tokens of transformers' sampling generate."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.generation import SamplingConfig, filter_logits, sample
from test_exactness import PROMPT
from test_exactness import checkpoints  # noqa: F401 (the shared fixture of tiny checkpoints)

SETTINGS = [  # (temperature, top_k, top_p): each filter alone, then together
    (0.6, 0, 1.0),
    (1.0, 6, 1.0),
    (1.0, 0, 0.7),
    (1.7, 20, 0.9),
    (0.8, 3, 0.95),
]


def reference_scores(logits, temperature, top_k, top_p):
    """transformers' warpers, as generate builds them (temperature, then top-k, then top-p; each only if set)."""
    scores = logits.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_sampler_equals_transformers_warpers_and_multinomial(temperature, top_k, top_p):
    # B=rows, V=vocabulary
    logits = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 2  # [B, V]
    want = reference_scores(logits, temperature, top_k, top_p)
    kept = torch.isfinite(want)
    if top_k or top_p < 1.0:  # the filters act on every row, and mostly leave a choice
        assert kept.sum(-1).max() < logits.shape[-1] and (kept.sum(-1) > 1).float().mean() > 0.8
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(filtered), kept), "the filters keep other tokens"
    assert torch.equal(filtered, want)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    for seed in range(4):
        got = sample(logits, cfg, torch.Generator().manual_seed(seed))
        drawn = torch.multinomial(want.softmax(dim=-1), 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, drawn.squeeze(-1)), f"seed {seed}: {(got != drawn.squeeze(-1)).sum()} rows differ"
        assert kept.gather(-1, got[:, None]).all()  # never a token the warpers removed


def test_seeded_generation_equals_transformers_sampling_generate(checkpoints):
    """Transformers samples from the global generator: seeded with the engine's seed, it draws the same. The tiny
    model's logits are flat (std ~0.1), so the temperatures are low enough for each setting to matter."""
    path, _, _ = checkpoints("mixtral", "per_expert")
    model = tm.build_reference("mixtral")
    model.generation_config.eos_token_id = None
    engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=4, progress=False)
    settings = [(0.05, 0, 1.0), (0.1, 6, 1.0), (0.1, 0, 0.7), (0.08, 20, 0.9)]
    for seed, (temperature, top_k, top_p) in enumerate(settings):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(torch.tensor([PROMPT]), do_sample=True, temperature=temperature, top_k=top_k,
                                 top_p=top_p, max_new_tokens=16, pad_token_id=model.config.pad_token_id)
        want = out[0, len(PROMPT):].tolist()
        got = engine.generate(PROMPT, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, ignore_eos=True).token_ids
        assert got == want, (temperature, top_k, top_p)
