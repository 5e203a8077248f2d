"""A KV cache with one row per running request, each at its own length: continuous batching's cache.

Every layer holds keys and values [max_rows, kv heads, max_context, head dim], allocated up front (the
memory plan's max_batch x max_context). Row r's tokens sit at columns 0..len_r-1, so a column is the token's
position, exactly as when the request runs alone. A decode step writes each row's new token at its own
column, len_r, and the attention mask lets row r see columns 0..len_r and nothing after: a 2D padding mask
([rows, width], `mask`) that transformers' create_causal_mask combines with its causal part, which this
cache keeps open to the longest row (query offset = the longest row's length, kv length = `width`).

Decode steps only (one token per row): a prompt is prefilled alone, with the cache `generate` alone uses,
and its keys and values are copied into its row (`put`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..planning.memory_plan import kv_head_dims


def fits(model) -> bool:
    """Whether the model can decode from a RowCache: every layer a full-attention layer with transformers'
    standard cache (no sliding window, no linear-attention state, no cache of the model's own)."""
    if not getattr(model, "_can_compile_fullgraph", False):  # a cache of its own (MiniMax's)
        return False
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config transformers' cache cannot read: not a standard cache
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class RowLayer(CacheLayerMixin):
    """One layer's keys and values for every row; the row lengths and the step's columns are the RowCache's."""

    is_sliding = False

    def __init__(self, owner: "RowCache", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.owner, self.keys, self.values = owner, keys, values
        self.device = keys.device
        self.is_initialized = True
        self.is_compileable = owner.full_width  # as StaticCache: transformers then never skips the mask

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RowCache is allocated whole when it is made")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # n=rows, H=kv heads, D=head dim; key_states [n, H, 1, D]
        o = self.owner
        if key_states.shape[0] != len(o.step_cols) or key_states.shape[2] != 1:
            raise RuntimeError(f"a RowCache takes one new token for each of the step's {len(o.step_cols)} rows, "
                               f"not keys of shape {tuple(key_states.shape)}")
        self.keys[o.step_rows, :, o.step_cols] = key_states[:, :, 0]  # [n, H, D] at (row r, column len_r)
        self.values[o.step_rows, :, o.step_cols] = value_states[:, :, 0]
        n, width = key_states.shape[0], o.width()
        return self.keys[:n, :, :width], self.values[:n, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width(), 0

    def get_seq_length(self) -> int:
        return self.owner.longest()

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RowCache(Cache):
    """Rows 0..n-1 are the running requests; `lengths[r]` tokens of row r are cached.

    full_width: attend over every column (max_context) as transformers' StaticCache does (CUDA, where the
    engine alone decodes from a StaticCache); otherwise over the longest row's columns, as a DynamicCache
    holding that row would (the CPU)."""

    def __init__(self, config, max_rows: int, max_context: int, dtype: torch.dtype, device: torch.device,
                 full_width: bool = False):
        heads, k_dim, v_dim = kv_head_dims(config)
        self.max_rows, self.max_context, self.full_width = max_rows, max_context, full_width
        self.lengths: list[int] = [0] * max_rows
        self.step_rows = self.step_cols = torch.empty(0, dtype=torch.long, device=device)
        layers = [RowLayer(self, torch.zeros((max_rows, heads, max_context, k_dim), dtype=dtype, device=device),
                           torch.zeros((max_rows, heads, max_context, v_dim), dtype=dtype, device=device))
                  for _ in range(_num_layers(config))]
        super().__init__(layers=layers)
        self.device = device

    def longest(self) -> int:
        """The longest of the step's rows (its query offset)."""
        return max(self.lengths[:len(self.step_cols)], default=0)

    def width(self) -> int:
        """Columns a decode step attends over (its new tokens included)."""
        return self.max_context if self.full_width else self.longest() + 1

    def begin(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a decode step of rows 0..rows-1; returns its (position_ids [rows, 1], mask [rows, width])."""
        if max(self.lengths[:rows]) >= self.max_context:
            raise RuntimeError("a row's KV cache is full (the plan's max_context)")
        cols = torch.tensor(self.lengths[:rows], dtype=torch.long, device=self.device)
        self.step_rows, self.step_cols = torch.arange(rows, device=self.device), cols
        mask = (torch.arange(self.width(), device=self.device)[None, :] <= cols[:, None]).long()
        return cols[:, None], mask

    def advance(self) -> None:
        """The step's tokens are written: every row one longer."""
        for r in range(len(self.step_cols)):
            self.lengths[r] += 1
        self.step_rows = self.step_cols = self.step_rows[:0]

    def put(self, row: int, source: Cache) -> None:
        """Copy a prefilled cache of one sequence (batch 1, its tokens at columns 0..P-1) into `row`."""
        length = int(source.get_seq_length())
        for layer, src in zip(self.layers, source.layers):
            layer.keys[row, :, :length] = src.keys[0, :, :length]
            layer.values[row, :, :length] = src.values[0, :, :length]
        self.lengths[row] = length

    def row_static_cache(self, row: int, config):
        """transformers' StaticCache of one sequence whose keys and values are `row` of this cache (views): a
        prefill into it writes the row in place, and computes exactly as it would into a StaticCache of its
        own (the columns past its prompt are masked, whatever an earlier row left there)."""
        from transformers import StaticCache

        cache = StaticCache(config=config, max_cache_len=self.max_context)
        for layer, mine in zip(cache.layers, self.layers, strict=True):
            if not layer.supports_early_init:
                raise RuntimeError(f"{type(layer).__name__} cannot be placed over a RowCache row")
            layer.device = self.device
            layer.keys, layer.values = mine.keys[row:row + 1], mine.values[row:row + 1]
            layer.batch_size, layer.num_heads = 1, mine.keys.shape[1]
            layer.k_head_dim, layer.v_head_dim = mine.keys.shape[-1], mine.values.shape[-1]
            layer.cumulative_length = layer.cumulative_length.to(self.device)
            layer.is_initialized = True
        return cache

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s tokens and length into row `dst` (compaction: the last row fills a freed one)."""
        length = self.lengths[src]
        if src != dst:
            for layer in self.layers:
                layer.keys[dst, :, :length] = layer.keys[src, :, :length]
                layer.values[dst, :, :length] = layer.values[src, :, :length]
        self.lengths[dst], self.lengths[src] = length, 0


def _num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.num_hidden_layers
