"""What a command that runs a model reads, for checking that no output of it replaces one of them."""

from __future__ import annotations

from pathlib import Path

from .run_options import model_path


def model_inputs(args) -> list[tuple[str, str | Path | None]]:
    """The model's folder (weights, config, tokenizer, its own predictor), the profile, a trained predictor's
    folder: (how an error names it, path) pairs for atomic_write.check_not_an_input."""
    predictor = args.predictor if Path(args.predictor).is_dir() else None  # else a name: none, next-gate...
    return [("the model in", model_path(args)), ("the profile", args.profile), ("the predictor in", predictor)]
