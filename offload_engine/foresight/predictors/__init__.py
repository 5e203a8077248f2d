"""Routing predictors: guess which experts the next MoE layers will use, so the cache can keep and fetch them.

- `next-gate`: the next layers' own routers on the current residual stream (no training);
- `learned`: small heads trained on the engine's traces (`moe-offload predictor train`);
- `history`: routing history only (runs on traces without hidden states, e.g. real models' traces).
"""

from .base import LayerContext, Paths, Prediction, Predictor
from .history import HistoryPredictor
from .learned import LearnedPredictor
from .next_gate import NextGatePredictor

PREDICTOR_NAMES = ("none", "next-gate", "history", "learned")

__all__ = ["LayerContext", "Paths", "Prediction", "Predictor", "HistoryPredictor", "LearnedPredictor",
           "NextGatePredictor", "PREDICTOR_NAMES"]


def make_predictor(name: str, model, spec, model_dir):
    """The predictor `name` for a loaded model: a name of PREDICTOR_NAMES, or a trained predictor's folder.
    "learned" is the one shipped in the model's own folder (<model>/predictor)."""
    from pathlib import Path

    from ...errors import ConfigError

    if name == "none":
        return None
    if name == "history":
        return HistoryPredictor(spec.num_moe_layers, spec.num_experts, spec.top_k)
    if name == "next-gate":
        from .next_gate import model_routers

        try:
            return NextGatePredictor(*model_routers(model, spec.experts_paths))
        except ValueError as e:
            raise ConfigError(f"the next-gate predictor cannot run on {spec.model_type}: {e}") from None
    path = Path(model_dir) / "predictor" if name == "learned" else Path(name).expanduser()
    if not path.is_dir():
        hint = (f"{model_dir} ships no trained predictor (predictor/)" if name == "learned"
                else f"no such predictor {name!r}")
        raise ConfigError(f"{hint}; choose one of {PREDICTOR_NAMES}, or train one with `moe-offload predictor "
                          "train` and pass its folder")
    return LearnedPredictor.load(path, spec.num_moe_layers, spec.num_experts, spec.hidden_size)
