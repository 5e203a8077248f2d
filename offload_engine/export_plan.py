"""What a run measured and planned, in the forms other engines read: expert activation counts in SGLang's
expert-distribution layout, and launch lines for llama-server, vLLM and SGLang with kTransformers' CPU
experts, with our memory budget translated into each one's flags (`moe-offload export-plan`).

Pure functions over numbers: the CLI builds the plan (as `moe-offload plan` does) and writes the files.

What each engine's flag means, as read in its source (the commit read in brackets):

- SGLang's expert distribution recorder (`--expert-distribution-recorder-mode stat`, then POST
  `/start_expert_distribution_record`, `/stop_expert_distribution_record`, `/dump_expert_distribution_record`)
  torch.saves `dict(rank=int, logical_count=int32 [buffer steps, num_hidden_layers, num_logical_experts],
  average_utilization_rate_over_window=float or None)`, one row per model layer (dense layers stay zero)
  (sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py, `_StatAccumulator.dump`, 02295fe).
  `--init-expert-location FILE.pt` reads it back with `torch.load(weights_only=True)` and, finding
  `logical_count`, places experts with EPLB (`init_by_eplb`, which also takes a 2-d count)
  (python/sglang/srt/eplb/expert_location.py, 01fec5c).
- kTransformers' SGLang (kvcache-ai/sglang python/sglang/srt/layers/moe/kt_utils.py, 36a8e7b):
  `--kt-num-gpu-experts` is per MoE layer (multiplied by the MoE layers for the total);
  `--kt-expert-placement-strategy frequency` reads `logical_count` from `--init-expert-location X.pt` and
  requires it 3-d with num_hidden_layers rows and num_experts columns, summing over the first axis.
- vLLM `--cpu-offload-gb`: GiB of weights per GPU kept in CPU memory and read over UVA in every forward pass;
  `--cpu-offload-params experts` limits it to parameters with an `experts` name segment
  (vllm-project/vllm vllm/config/offload.py, 00593fa).
- llama.cpp `-ncmoe N` / `--n-cpu-moe N` keeps the expert tensors of blocks 0..N-1 on the CPU, as the
  overrides `blk\\.i\\.ffn_(up|down|gate|gate_up)_(ch|)exps` -> CPU that `-ot` / `--override-tensor
  "<pattern>=<buffer type>"` takes (ggml-org/llama.cpp common/common.h LLM_FFN_EXPS_REGEX and
  llm_add_n_cpu_ffn_overrides, 001d906; the flags in common/arg.cpp).

>>> fig = PlanFigures(model="m", device="cuda", dtype="bfloat16", budget_bytes=100, fixed_bytes=40,
...                   mapped_bytes=0, expert_bytes=5, expert_slots=12, experts_per_layer=4, top_k=2,
...                   moe_layers=(1, 2, 3), num_layers=4)
>>> t = translate(fig)
>>> t.gpu_moe_layers, t.cpu_blocks, t.n_cpu_moe, t.kt_gpu_experts_per_layer
(3, (), 0, 4)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import numpy as np

# llama.cpp's expert-tensor pattern after the block index (common/common.h, LLM_FFN_EXPS_REGEX)
LLAMA_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
SGLANG_KEYS = ("rank", "logical_count", "average_utilization_rate_over_window")
GIB = 1 << 30
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class PlanFigures:
    """Our memory plan's numbers for one model (what `moe-offload plan --json` prints), plus its layer map."""

    model: str  # the model's folder or hub id
    device: str
    dtype: str
    budget_bytes: int  # the cap (or, with only --expert-slots, what the slots need)
    fixed_bytes: int  # non-expert weights + KV cache + working memory (+ CUDA allocator rounding)
    mapped_bytes: int  # the input embedding left memory-mapped, outside the budget (CPU only)
    expert_bytes: int  # one expert
    expert_slots: int
    experts_per_layer: int
    top_k: int
    moe_layers: tuple[int, ...]  # the model's layer index of each MoE layer
    num_layers: int  # all decoder layers (config.json num_hidden_layers)

    @property
    def total_experts(self) -> int:
        return self.experts_per_layer * len(self.moe_layers)

    @property
    def layer_expert_bytes(self) -> int:
        return self.experts_per_layer * self.expert_bytes


@dataclass(frozen=True)
class Translation:
    """Our budget in other engines' terms (see `translate`)."""

    gpu_moe_layers: int  # whole MoE layers whose experts fit beside the fixed parts (llama-server)
    cpu_blocks: tuple[int, ...]  # model layer index of each MoE layer left on the CPU (the first ones)
    n_cpu_moe: int  # llama-server --n-cpu-moe: blocks 0..N-1 keep their experts on the CPU
    ngl: int  # llama-server -ngl: every layer on the GPU
    offload_bytes: int  # weights beyond the budget (vLLM)
    cpu_offload_gib: str  # offload_bytes in GiB, rounded up to 0.01
    kt_gpu_experts_per_layer: int  # our slots spread over the MoE layers, rounded down

    @property
    def override_tensor(self) -> str | None:
        """The -ot rule naming the CPU blocks' expert tensors (the rules --n-cpu-moe adds, in one)."""
        if not self.cpu_blocks:
            return None
        return rf"blk\.({'|'.join(map(str, self.cpu_blocks))}){LLAMA_EXPS_REGEX}=CPU"


def translate(fig: PlanFigures) -> Translation:
    """Our budget as llama-server, vLLM and kTransformers flags: the same bytes on the device.

    llama-server keeps every non-expert weight on the GPU and whole layers' experts on the CPU: the room the
    budget leaves after the fixed parts holds `room // (E x expert bytes)` layers, the last ones (llama.cpp's
    --n-cpu-moe names the first). vLLM offloads what the weights and fixed parts need beyond the budget.
    kTransformers takes GPU experts per MoE layer: our slots over the MoE layers, rounded down.
    """
    layers = len(fig.moe_layers)
    room = max(0, fig.budget_bytes - fig.fixed_bytes)
    gpu_layers = min(layers, room // fig.layer_expert_bytes)
    cpu_blocks = tuple(fig.moe_layers[:layers - gpu_layers])
    weights = fig.fixed_bytes + fig.mapped_bytes + fig.total_experts * fig.expert_bytes
    offload = max(0, weights - fig.budget_bytes)
    hundredths = -(-offload * 100 // GIB)  # ceil: never offload less than the budget asks
    return Translation(
        gpu_moe_layers=gpu_layers, cpu_blocks=cpu_blocks, n_cpu_moe=cpu_blocks[-1] + 1 if cpu_blocks else 0,
        ngl=max(99, fig.num_layers + 1), offload_bytes=offload,
        cpu_offload_gib=f"{hundredths // 100}.{hundredths % 100:02d}",
        kt_gpu_experts_per_layer=fig.expert_slots // layers,
    )


def activation_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [L, E]: how many tokens each layer routed to each expert (-1, padding or missing, counts nothing).

    # N=sequences, T=tokens, L=MoE layers, k=active, E=experts
    >>> ids = np.array([[[[0, 1]], [[1, 2]], [[-1, -1]]]], dtype=np.int16)  # [N=1, T=3, L=1, k=2]
    >>> activation_counts(ids, 4).tolist()
    [[1, 2, 1, 0]]
    """
    layers = expert_ids.shape[2]
    per_layer = np.moveaxis(expert_ids, 2, 0).reshape(layers, -1)  # [L, N*T*k]
    counts = np.zeros((layers, num_experts), dtype=np.int64)
    for layer, ids in enumerate(per_layer):
        counts[layer] = np.bincount(ids[ids >= 0], minlength=num_experts)
    return counts


def sglang_logical_count(counts: np.ndarray, moe_layers: tuple[int, ...], num_layers: int) -> np.ndarray:
    """int32 [1, num_layers, E]: SGLang's `logical_count` (one buffer step; a row per model layer, dense
    layers zero). Raises ValueError when a count does not fit int32, SGLang's dtype.

    >>> sglang_logical_count(np.array([[3, 1]]), (1,), 2).tolist()
    [[[0, 0], [3, 1]]]
    """
    if counts.size and int(counts.max()) > INT32_MAX:
        raise ValueError(f"an expert was activated {int(counts.max())} times, more than SGLang's int32 counts hold")
    out = np.zeros((1, num_layers, counts.shape[1]), dtype=np.int32)
    out[0, list(moe_layers)] = counts
    return out


def sglang_record(logical_count: np.ndarray) -> dict:
    """The dict SGLang's recorder dumps in `stat` mode (torch.save it; `--init-expert-location` reads it)."""
    import torch

    return {"rank": 0, "logical_count": torch.from_numpy(np.ascontiguousarray(logical_count, dtype=np.int32)),
            "average_utilization_rate_over_window": None}


def counts_csv(counts: np.ndarray, moe_layers: tuple[int, ...]) -> str:
    """One row per MoE layer (its model layer index), one column per expert.

    >>> print(counts_csv(np.array([[3, 1]]), (5,)), end="")
    layer,expert_0,expert_1
    5,3,1
    """
    header = ",".join(["layer", *(f"expert_{e}" for e in range(counts.shape[1]))])
    rows = [",".join(map(str, [layer, *row.tolist()])) for layer, row in zip(moe_layers, counts)]
    return "\n".join([header, *rows]) + "\n"


def most_activated(counts: np.ndarray, per_layer: int) -> list[list[int]]:
    """Each layer's `per_layer` most activated experts, busiest first (ties: the lower id).

    >>> most_activated(np.array([[1, 5, 5, 0]]), 2)
    [[1, 2]]
    """
    order = np.argsort(-counts, axis=1, kind="stable")
    return [row[:per_layer].tolist() for row in order]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass(frozen=True)
class LaunchLine:
    engine: str
    command: str
    why: str  # what it does and where our number came from


def launch_lines(fig: PlanFigures, tr: Translation, distribution: str | None) -> list[LaunchLine]:
    """The commands, with the model's folder or hub id filled in and `$GGUF` (llama.cpp's conversion of it),
    `$KT_WEIGHTS` (kTransformers' CPU weights, for a model not in bf16), `$CPU_CORES` and `$GPUS` for what only
    the user knows. `distribution`: the path of
    the SGLang-layout counts, if a trace was given."""
    layers = len(fig.moe_layers)
    room = max(0, fig.budget_bytes - fig.fixed_bytes)
    model = shlex.quote(fig.model)  # a folder or hub id both work for vLLM and SGLang
    # kTransformers' BF16 method reads the checkpoint's own bf16 safetensors; other dtypes need its conversion
    kt_weights = model if fig.dtype == "bfloat16" else "$KT_WEIGHTS"
    lines = [LaunchLine(
        "llama-server", f"llama-server -m $GGUF -ngl {tr.ngl}" + (f" --n-cpu-moe {tr.n_cpu_moe}" if tr.n_cpu_moe else ""),
        f"Every layer goes to the GPU (-ngl {tr.ngl}) except the expert tensors of blocks 0 to {tr.n_cpu_moe - 1}, "
        f"which stay in host memory and run on the CPU: our budget leaves {_mib(room)} after the non-expert "
        f"weights, KV cache and working memory, room for the experts of {tr.gpu_moe_layers} of {layers} MoE "
        f"layers ({_mib(fig.layer_expert_bytes)} each), so the first {layers - tr.gpu_moe_layers} keep theirs "
        "on the CPU." if tr.n_cpu_moe else
        f"Every layer, experts included, goes to the GPU: our budget holds all {layers} MoE layers' experts.")]
    if tr.override_tensor:
        lines.append(LaunchLine(
            "llama-server (-ot)", f"llama-server -m $GGUF -ngl {tr.ngl} -ot '{tr.override_tensor}'",
            "The same placement written as the tensor override --n-cpu-moe expands to, naming the CPU blocks "
            "one by one: edit the list to move other layers."))
    offload = f" --cpu-offload-gb {tr.cpu_offload_gib} --cpu-offload-params experts" if tr.offload_bytes else ""
    lines.append(LaunchLine(
        "vLLM", f"vllm serve {model}{offload}",
        (f"Keeps {tr.cpu_offload_gib} GiB of expert weights in CPU memory (vLLM reads the value as GiB per GPU): "
         f"our weights and fixed parts exceed the budget by {_mib(tr.offload_bytes)}, rounded up to 0.01 GiB; "
         "vLLM reads them over the link in every forward pass instead of caching the hot ones, and "
         "--cpu-offload-params (newer vLLMs only; drop it on older ones) limits the offload to the experts.")
        if tr.offload_bytes else "The whole model fits in our budget: nothing to offload."))
    placement = (f" --kt-expert-placement-strategy frequency --init-expert-location {distribution}"
                 if distribution else "")
    lines.append(LaunchLine(
        "SGLang + kTransformers",
        f"python -m sglang.launch_server --model-path {model} --kt-weight-path {kt_weights} --kt-method BF16 "
        f"--kt-cpuinfer $CPU_CORES --kt-threadpool-count 1 --kt-num-gpu-experts {tr.kt_gpu_experts_per_layer}"
        + placement,
        f"Runs {tr.kt_gpu_experts_per_layer} experts per MoE layer on the GPU and the rest on the CPU: our "
        f"{fig.expert_slots} slots over {layers} MoE layers, rounded down "
        f"({tr.kt_gpu_experts_per_layer * layers} in all)"
        + ("; the frequency strategy puts the most activated experts of our trace there."
           if distribution else "; with a trace (--trace) the GPU ones would be the most activated.")))
    if distribution:
        lines.append(LaunchLine(
            "SGLang, several GPUs",
            f"python -m sglang.launch_server --model-path {model} --tp-size $GPUS --ep-size $GPUS "
            f"--init-expert-location {distribution}",
            "Spreads the experts over the GPUs with SGLang's initial placement computed by its EPLB algorithm "
            "from our trace's counts (the file its own recorder dumps with --expert-distribution-recorder-mode "
            "stat) instead of in id order."))
    return lines


def launch_markdown(fig: PlanFigures, tr: Translation, distribution: str | None) -> str:
    """launch.md: our plan in one paragraph, then each command with its one-sentence reason."""
    head = [
        f"# Launch lines for {fig.model}",
        "",
        f"From `moe-offload export-plan`. Our plan ({fig.device}, {fig.dtype}): a budget of "
        f"{_mib(fig.budget_bytes)}, of which {_mib(fig.fixed_bytes)} for the non-expert weights, KV cache and "
        f"working memory, and {fig.expert_slots} expert slots of {_mib(fig.expert_bytes)} out of "
        f"{fig.total_experts} experts ({len(fig.moe_layers)} MoE layers of {fig.experts_per_layer}, "
        f"top-{fig.top_k}). Replace `$GGUF` with a GGUF conversion of `{fig.model}` (llama.cpp's "
        "convert_hf_to_gguf.py), the model's folder with its hub id if you serve it elsewhere, and the other `$` "
        "names with your own. The other engines count their "
        "KV cache and working memory their own way: treat the numbers as a first try.",
    ]
    body = []
    for line in launch_lines(fig, tr, distribution):
        body += ["", f"## {line.engine}", "", "```sh", line.command, "```", "", line.why]
    return "\n".join(head + body) + "\n"


def plan_json(fig: PlanFigures, tr: Translation, distribution: str | None,
              hottest: list[list[int]] | None = None) -> dict:
    """plan.json: the figures the lines came from, and the lines; `hottest`: with a trace, each MoE layer's
    most activated experts, as many as --kt-num-gpu-experts (kTransformers chooses its own from the .pt file:
    this list is for reading, and for engines that take a list)."""
    return {
        "model": fig.model, "device": fig.device, "dtype": fig.dtype, "budget_bytes": fig.budget_bytes,
        "fixed_bytes": fig.fixed_bytes, "mapped_embedding_bytes": fig.mapped_bytes,
        "expert_bytes": fig.expert_bytes, "expert_slots": fig.expert_slots, "total_experts": fig.total_experts,
        "experts_per_layer": fig.experts_per_layer, "top_k": fig.top_k, "moe_layers": list(fig.moe_layers),
        "num_hidden_layers": fig.num_layers,
        "llama_server": {"gpu_moe_layers": tr.gpu_moe_layers, "n_cpu_moe": tr.n_cpu_moe, "ngl": tr.ngl,
                         "override_tensor": tr.override_tensor},
        "vllm": {"offload_bytes": tr.offload_bytes, "cpu_offload_gb": float(tr.cpu_offload_gib)},
        "ktransformers": {"kt_num_gpu_experts": tr.kt_gpu_experts_per_layer,
                          "most_activated_by_layer": hottest},
        "expert_distribution": distribution,
        "commands": [{"engine": line.engine, "command": line.command}
                     for line in launch_lines(fig, tr, distribution)],
    }


def trace_matches(counts_shape: tuple[int, int], trace_layers: tuple[int, ...], fig: PlanFigures) -> str | None:
    """Why a trace cannot be the model's (None when it can): its experts and MoE layers must be the model's."""
    if counts_shape[1] != fig.experts_per_layer:
        return f"the trace has {counts_shape[1]} experts per layer, the model {fig.experts_per_layer}"
    if tuple(trace_layers) != fig.moe_layers:
        return (f"the trace's MoE layers {list(trace_layers)[:8]} are not the model's {list(fig.moe_layers)[:8]}")
    return None

