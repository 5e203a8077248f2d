"""Where each runtime tensor of the model lives on disk: the only place that knows checkpoint layouts.

transformers' runtime format keeps one experts module per MoE layer with fused 3-D parameters
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, optional biases). On disk an expert is stored either
per expert (`experts.{e}.gate_proj/up_proj/down_proj.weight` or Mixtral's `w1/w3/w2`), or fused under the
runtime name (`save_original_format=False`, gpt-oss, GraniteMoE's `input_linear` after renaming).
Module-path renames (Mixtral's `block_sparse_moe` -> `mlp`, GraniteMoE's `router.layer` -> `router`) are
taken from transformers' own conversion mapping, so the engine names tensors exactly as transformers does.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import CheckpointError, UnsupportedModelError
from .directory import CheckpointTensors
from .model_spec import ModelSpec

# Per-expert on-disk projection names for each runtime parameter, in concatenation order (gate rows first).
PER_EXPERT_SOURCES = {
    "gate_up_proj": (("gate_proj", "w1"), ("up_proj", "w3")),
    "up_proj": (("up_proj", "w1", "fc1"),),
    "down_proj": (("down_proj", "w2", "fc2"),),
}
QUANTIZED_SUFFIXES = {
    "_blocks": "MXFP4 blocks", "_scales": "MXFP4 scales", "weight_scale_inv": "FP8 block-scaled",
    "weight_scale": "FP8 scaled", "qweight": "GPTQ/AWQ packed", "qzeros": "GPTQ/AWQ packed", "scales": "quantized",
}


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor, or one expert's slice of a fused one, filling rows [start, stop) of a runtime tensor."""

    key: str
    index: int | None  # the expert's index into a fused [E, ...] tensor; None for a per-expert tensor
    start: int
    stop: int


def _renamings(model: nn.Module):
    """transformers' own key renames for this model (converters are handled by the explicit table above)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings
    except ImportError:  # an older transformers without conversion mappings renames nothing
        return lambda key: key
    renames = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)
               and not isinstance(t, WeightConverter)]
    return lambda key: apply_renamings(key, renames)


class CheckpointLayout:
    """Maps runtime tensor names of `model` to the checkpoint's tensors, and checks that all are there."""

    def __init__(self, tensors: CheckpointTensors, model: nn.Module, spec: ModelSpec):
        self.tensors = tensors
        self.spec = spec
        rename = _renamings(model)
        self.disk_key = {rename(k): k for k in tensors.keys()}
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.experts = [model.get_submodule(p) for p in spec.experts_paths]
        self.pieces = [self._layer_pieces(i) for i in range(spec.num_moe_layers)]

    # -- non-expert tensors -------------------------------------------------------------------------------
    def find(self, runtime_key: str) -> str | None:
        """The on-disk key of a runtime tensor, allowing for a checkpoint saved without/with the base prefix."""
        for candidate in (runtime_key, runtime_key.removeprefix(self.prefix + "."), f"{self.prefix}.{runtime_key}"):
            if candidate in self.disk_key:
                return self.disk_key[candidate]
        return None

    # -- experts ------------------------------------------------------------------------------------------
    def _layer_pieces(self, layer_pos: int) -> list[dict[str, list[Piece]]]:
        path = self.spec.experts_paths[layer_pos]
        module = self.experts[layer_pos]
        per_param = {p.name: self._param_pieces(path, module, p.name, p.shape) for p in self.spec.expert_params}
        return [{name: fn(e) for name, fn in per_param.items()} for e in range(self.spec.num_experts)]

    def _param_pieces(self, path: str, module: nn.Module, name: str, shape: tuple[int, ...]):
        fused = self.find(f"{path}.{name}")
        if fused is not None:
            info = self.tensors.infos[fused]
            if info.shape != (self.spec.num_experts, *shape):
                raise CheckpointError(
                    f"tensor {fused} in {info.file.name} has shape {list(info.shape)}, but config.json implies "
                    f"{[self.spec.num_experts, *shape]}; the checkpoint does not match its config"
                )
            return lambda e: [Piece(fused, e, 0, shape[0])]
        base, _, suffix = name.partition("_proj")
        kind = "bias" if suffix == "_bias" else "weight"
        sources = PER_EXPERT_SOURCES.get(f"{base}_proj")
        if sources is None or getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
            self._missing(f"{path}.{name}")
        return lambda e: self._per_expert(path, e, sources, kind, name, shape)

    def _per_expert(self, path, e, sources, kind, name, shape) -> list[Piece]:
        pieces, row = [], 0
        for alternatives in sources:
            keys = [self.find(f"{path}.{e}.{proj}.{kind}") for proj in alternatives]
            key = next((k for k in keys if k is not None), None)
            if key is None:
                self._missing(f"{path}.{e}.{alternatives[0]}.{kind}")
            rows = self.tensors.infos[key].shape[0]
            pieces.append(Piece(key, None, row, row + rows))
            row += rows
        if row != shape[0] or any(self.tensors.infos[p.key].shape[1:] != shape[1:] for p in pieces):
            got = [list(self.tensors.infos[p.key].shape) for p in pieces]
            raise CheckpointError(
                f"expert {e} of {path}: on-disk shapes {got} do not make {name} {list(shape)}; "
                "the checkpoint does not match its config.json"
            )
        return pieces

    def _missing(self, runtime_key: str):
        stem = runtime_key.rsplit(".", 1)[0]
        for disk in self.disk_key:
            if disk.startswith(stem.rsplit(".", 1)[0]):
                for suffix, fmt in QUANTIZED_SUFFIXES.items():
                    if disk.endswith(suffix) or disk.endswith(suffix + ".weight"):
                        raise UnsupportedModelError(
                            f"model type {self.spec.model_type!r} stores its experts as {fmt} tensors "
                            f"({self.disk_key[disk]}); the engine reads unquantized bf16/fp16/fp32 experts only"
                        )
        raise CheckpointError(
            f"expert tensor {runtime_key} is missing from the checkpoint in {self.tensors.directory}; "
            "the files are incomplete or from another model: re-download them"
        )

    def expert_pieces(self, layer_pos: int, expert: int) -> dict[str, list[Piece]]:
        return self.pieces[layer_pos][expert]

    def expert_keys(self) -> set[str]:
        return {p.key for layer in self.pieces for expert in layer for ps in expert.values() for p in ps}

    def warn_unused(self, used: set[str], ignore_patterns) -> None:
        unused = [k for k in self.tensors.keys() if k not in used]
        patterns = [re.compile(p) for p in (ignore_patterns or [])]
        unused = [k for k in unused if not any(p.search(k) for p in patterns)]
        if unused:
            warnings.warn(
                f"{len(unused)} checkpoint tensors are not used by the model (first: {unused[0]}); "
                "check that config.json belongs to these weights",
                stacklevel=3,
            )
