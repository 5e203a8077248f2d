"""Where the residual stream entering a MoE block can be read, and which norm turns it into the router's input.

Predictors (next-gate, learned) and `trace --hidden-states` read the residual stream after the attention
sub-block: the sum the MoE sub-block reads from (through a norm or not) and adds its output back to. Decoder
layers place their norms around the MoE block in three ways (transformers' module names):

- pre-norm (Mixtral, Qwen, DeepSeek, OLMoE, GPT-OSS, Granite, MiniMax...): `post_attention_layernorm`
  normalises the stream for the MoE block; its input is the stream;
- sandwich (Gemma-style): `post_attention_layernorm` normalises the attention output before the add and
  `pre_feedforward_layernorm` normalises the stream for the MoE block; its input is the stream;
- post-norm (OLMo2-style, FlexOlmo): `post_attention_layernorm` normalises the attention output before the
  add, `post_feedforward_layernorm` the MoE block's output; the MoE block reads the stream as it is.

MiniMax then names its normalised tensor `residual` (it adds the MoE output back to it); the stream read here
is the norm's input, as for every pre-norm model, so that a later layer's own norm applies to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ResidualTap:
    module: nn.Module  # the first input of its forward is the residual stream entering the MoE block
    norm: nn.Module | None  # what the MoE block's router reads is norm(stream); None: the stream itself


def residual_tap(model: nn.Module, block_path: str) -> ResidualTap | None:
    """The tap of the MoE block at `block_path` (e.g. model.layers.3.mlp), or None if its decoder layer has
    none of the norms above."""
    layer = model.get_submodule(block_path.rpartition(".")[0])
    pre_feedforward = getattr(layer, "pre_feedforward_layernorm", None)
    if pre_feedforward is not None:
        return ResidualTap(pre_feedforward, pre_feedforward)
    if getattr(layer, "post_feedforward_layernorm", None) is not None:
        return ResidualTap(model.get_submodule(block_path), None)
    post_attention = getattr(layer, "post_attention_layernorm", None)
    return ResidualTap(post_attention, post_attention) if post_attention is not None else None


def first_input(args: tuple, kwargs: dict):
    """The tensor a forward was called with (a MoE block may be called with hidden_states=...)."""
    return args[0] if args else kwargs["hidden_states"]
