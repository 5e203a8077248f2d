"""Where each runtime tensor of the model lives on disk: the only place that knows checkpoint layouts.

transformers' runtime format keeps one experts module per MoE layer with fused 3-D parameters
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, optional biases). On disk an expert is stored either
per expert (`experts.{e}.gate_proj/up_proj/down_proj.weight` or Mixtral's `w1/w3/w2`), or fused under the
runtime name (`save_original_format=False`, gpt-oss, GraniteMoE's `input_linear` after renaming).
Module-path renames (Mixtral's `block_sparse_moe` -> `mlp`, GraniteMoE's `router.layer` -> `router`) are
taken from transformers' own conversion mapping, so the engine names tensors exactly as transformers does.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
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
class StoredTensor:
    """One tensor a slot and the host store hold per expert, and what the layout finds of each expert:
    `name` (the pool's key), the runtime parameter it makes (`param`), what it is on disk (`kind`: weight, bias,
    blocks, scales, scale_inv), its per-expert shape and dtype (None: whatever the files hold, unchecked).
    `rows_per_row`: runtime rows one stored row covers (an FP8 scale row covers a block of rows); `as_stored`:
    read exactly as the file has it (quantized values and scales: another dtype on disk is another format),
    where a plain tensor is converted to the compute dtype."""

    name: str
    param: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    rows_per_row: int = 1
    as_stored: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plain_sources(spec: ModelSpec, dtype: torch.dtype | None) -> tuple[StoredTensor, ...]:
    """The runtime expert tensors themselves, in `dtype` (None: as the files hold them)."""
    return tuple(StoredTensor(p.name, p.name, "bias" if p.name.endswith("_bias") else "weight", p.shape, dtype)
                 for p in spec.expert_params)


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor, or one expert's slice of a fused one, filling rows [start, stop) of a runtime tensor."""

    key: str
    index: int | None  # the expert's index into a fused [E, ...] tensor; None for a per-expert tensor
    start: int
    stop: int


def expert_scale_dtype(tensors: CheckpointTensors):
    """The dtype of the experts' FP8 block scales as the files store them (fp32, bf16 or E8M0); None if none."""
    key = next((k for k in tensors.keys() if ".experts." in k and k.endswith("weight_scale_inv")), None)
    return None if key is None else tensors.infos[key].dtype


QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8, torch.int32)


def refuse_unscaled(key: str, info) -> None:
    """A tensor read as a plain weight must not be quantized: FP8 values or packed codes cast without their
    scales would run as garbage (a config.json that lost its quantization_config)."""
    if info.dtype in QUANTIZED_DTYPES:
        raise CheckpointError(
            f"{key} in {info.file.name} is {str(info.dtype).removeprefix('torch.')}, a quantized tensor, but "
            "config.json has no quantization_config that says how to read it; restore config.json")


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

    def __init__(self, tensors: CheckpointTensors, model: nn.Module, spec: ModelSpec, sources=None,
                 layers: int | None = None):
        """`sources`: what to find of each expert (StoredTensor); by default the runtime tensors themselves, in
        whatever dtype the files hold them (unchecked). `layers`: map only the first so many MoE layers (a
        look at how experts are stored, before the format that holds them is chosen)."""
        self.tensors = tensors
        self.spec = spec
        rename = _renamings(model)
        self.disk_key = {rename(k): k for k in tensors.keys()}
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.experts = [model.get_submodule(p) for p in spec.experts_paths]
        self.sources = sources if sources is not None else plain_sources(spec, None)
        self.pieces = [self._layer_pieces(i) for i in range(spec.num_moe_layers if layers is None else layers)]

    # -- non-expert tensors -------------------------------------------------------------------------------
    def find(self, runtime_key: str) -> str | None:
        """The on-disk key of a runtime tensor, allowing for a checkpoint saved without/with the base prefix."""
        for candidate in (runtime_key, runtime_key.removeprefix(self.prefix + "."), f"{self.prefix}.{runtime_key}"):
            if candidate in self.disk_key:
                return self.disk_key[candidate]
        return None

    def scale_of(self, weight_key: str) -> str | None:
        """The on-disk key of an FP8 weight's block scales (`...weight_scale_inv`), if the file has them."""
        scale = weight_key.removesuffix("weight") + "weight_scale_inv"
        return scale if weight_key.endswith("weight") and scale in self.tensors else None

    # -- experts ------------------------------------------------------------------------------------------
    def _layer_pieces(self, layer_pos: int) -> list[dict[str, list[Piece]]]:
        path = self.spec.experts_paths[layer_pos]
        module = self.experts[layer_pos]
        per_source = {s.name: self._source_pieces(path, module, s) for s in self.sources}
        return [{name: fn(e) for name, fn in per_source.items()} for e in range(self.spec.num_experts)]

    def _source_pieces(self, path: str, module: nn.Module, source):
        suffix = {"weight": "", "bias": "", "blocks": "_blocks", "scales": "_scales", "scale_inv": "_scale_inv"}
        fused = self.find(f"{path}.{source.param}{suffix[source.kind]}")
        if fused is not None and source.as_stored and source.kind in ("weight", "scale_inv"):
            raise UnsupportedModelError(
                f"{fused}: FP8 experts fused into one [E, ...] tensor, which transformers' FP8 loader does not "
                "read (it would run them unscaled); the engine reads FP8 experts stored per expert, as published")
        if fused is not None:
            info = self.tensors.infos[fused]
            if info.shape != (self.spec.num_experts, *source.shape):
                raise CheckpointError(
                    f"tensor {fused} in {info.file.name} has shape {list(info.shape)}, but config.json implies "
                    f"{[self.spec.num_experts, *source.shape]}; the checkpoint does not match its config"
                )
            self._check_dtype(fused, source)
            return lambda e: [Piece(fused, e, 0, source.shape[0])]
        base, _, rest = source.param.partition("_proj")
        sources = PER_EXPERT_SOURCES.get(f"{base}_proj")
        if (source.kind in ("blocks", "scales") or sources is None or getattr(module, "is_transposed", False)
                or not getattr(module, "is_concatenated", True)):
            self._missing(f"{path}.{source.param}{suffix[source.kind]}")
        kind = {"weight": "weight", "bias": "bias", "scale_inv": "weight_scale_inv"}[source.kind]
        return lambda e: self._per_expert(path, e, sources, kind, source)

    def _per_expert(self, path, e, sources, kind, source) -> list[Piece]:
        pieces, row = [], 0
        for alternatives in sources:
            keys = [self.find(f"{path}.{e}.{proj}.{kind}") for proj in alternatives]
            key = next((k for k in keys if k is not None), None)
            if key is None:
                self._missing(f"{path}.{e}.{alternatives[0]}.{kind}")
            rows = self.tensors.infos[key].shape[0]
            if source.rows_per_row > 1:  # block scales: each of their rows covers rows_per_row of the weight's
                weight = self.tensors.infos[key.removesuffix("_scale_inv")]
                if weight.shape[0] != rows * source.rows_per_row:
                    raise CheckpointError(
                        f"{key} has {rows} rows of block scales for the {weight.shape[0]} rows of its weight, "
                        f"whose blocks are {source.rows_per_row} rows (weight_block_size): the blocks do not "
                        "divide the weight, or the file does not match its config")
            self._check_dtype(key, source)
            pieces.append(Piece(key, None, row, row + rows))
            row += rows
        if row != source.shape[0] or any(self.tensors.infos[p.key].shape[1:] != source.shape[1:] for p in pieces):
            got = [list(self.tensors.infos[p.key].shape) for p in pieces]
            raise CheckpointError(
                f"expert {e} of {path}: on-disk shapes {got} do not make {source.name} {list(source.shape)}; "
                "the checkpoint does not match its config.json"
            )
        return pieces

    def _check_dtype(self, key: str, source) -> None:
        """Quantized tensors are kept as stored: a value or scale of another dtype is another format."""
        if source.dtype is None:
            return
        info = self.tensors.infos[key]
        if not source.as_stored:
            refuse_unscaled(key, info)
            return
        if info.dtype != source.dtype:
            raise CheckpointError(
                f"{key} in {info.file.name} is {str(info.dtype).removeprefix('torch.')}, where the checkpoint's "
                f"quantization ({source.kind}) needs {str(source.dtype).removeprefix('torch.')}; the file does not "
                "match its config.json")

    def _missing(self, runtime_key: str):
        if runtime_key.endswith(("_scale_inv", "_scales", "_blocks")):
            raise CheckpointError(
                f"tensor {runtime_key} is missing from the checkpoint in {self.tensors.directory}; the files are "
                "incomplete or do not match their config.json's quantization_config: re-download them")
        stem = runtime_key.rsplit(".", 1)[0]
        for disk in self.disk_key:
            if disk.startswith(stem.rsplit(".", 1)[0]):
                for suffix, fmt in QUANTIZED_SUFFIXES.items():
                    if disk.endswith(suffix) or disk.endswith(suffix + ".weight"):
                        raise UnsupportedModelError(
                            f"model type {self.spec.model_type!r} stores its experts as {fmt} tensors "
                            f"({self.disk_key[disk]}), which its config.json's quantization_config does not "
                            "describe; the engine reads MXFP4 and block-scaled FP8 checkpoints with their config"
                        )
        raise CheckpointError(
            f"expert tensor {runtime_key} is missing from the checkpoint in {self.tensors.directory}; "
            "the files are incomplete or from another model: re-download them"
        )

    def expert_pieces(self, layer_pos: int, expert: int) -> dict[str, list[Piece]]:
        return self.pieces[layer_pos][expert]

    def row_splits(self) -> dict[str, list[int]]:
        """Rows of each on-disk tensor a runtime expert tensor is made of (the first expert's: all alike)."""
        return {name: [p.stop - p.start for p in pieces] for name, pieces in self.expert_pieces(0, 0).items()}

    def scale_keys(self) -> dict[str, str]:
        """On-disk key -> stored name of every expert scale tensor (checked once at load)."""
        return {p.key: name for layer in self.pieces for expert in layer for name, ps in expert.items()
                if name.endswith(("_scales", "_scale_inv")) for p in ps}

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
