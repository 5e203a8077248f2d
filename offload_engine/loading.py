"""From a checkpoint directory to a runnable offloaded model, in three steps.

1. inspect: read config.json and the safetensors headers, build the transformers model on the meta device,
   describe its MoE layers (nothing is loaded);
2. plan: decide how the memory budget is spent (planning/memory_plan.py);
3. load: copy the non-expert weights to the compute device, open the expert store, allocate the slot pool
   and bind every experts module to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint.directory import CheckpointTensors, read_config, resolve_checkpoint
from .checkpoint.layout import CheckpointLayout, expert_scale_dtype, refuse_unscaled
from .checkpoint.model_spec import ModelSpec, describe, dtype_from_config
from .checkpoint.quantization import read_quantization
from .errors import CheckpointError, ContextTooLongError, MemoryBudgetError, UnsupportedModelError
from .experts.cache import ExpertCache
from .experts.formats import ExpertFormat, expert_format
from .experts.formats.fp8_block import check_grid as check_fp8_grid
from .experts.formats.fp8_block import check_scales as check_fp8_scales
from .experts.formats.fp8_block import dequantize_blocks as dequantize_fp8_blocks
from .experts.offloaded_experts import IMPLEMENTATION_NAME, bind, packs, plain_mlp, register_experts_implementation
from .experts.packed_experts import PackedExperts
from .experts.policies import make_policy
from .experts.runtime import Runtime
from .experts.store import ExpertStore
from .foresight.predictors import make_predictor
from .foresight.residual_stream import first_input, residual_tap
from .planning.hardware_profile import calibrated_model, hardware_of, model_name
from .planning.host_memory import HostMemory, host_memory
from .planning.memory_plan import (MemoryPlan, cuda_allocator_bytes, growing_kv_bytes, kv_bytes_per_token, plan_memory,
                          working_bytes)
from .packed_weights import pack_linears, packing_is_exact
from .run_config import DEFAULT_MAX_CONTEXT, RunConfig, all_cores_pay, usable_cores

CPU_BUDGET_SHARE = 0.5  # of available RAM: the rest stays for the page cache the experts are read from
CUDA_BUDGET_SHARE = 0.9  # of free GPU memory
CUDA_RESERVE = 512 * 1024**2  # CUDA context, cuBLAS workspaces, fragmentation
HOST_RAM_SHARE = 0.7  # the experts "fit" (pinned with CUDA, else the page cache) below this share of what is available
DIRECT_BUDGET_SHARE = 0.85  # the direct tier on the CPU: of what is available beyond the process's own reserve
MIN_FITTED_CONTEXT = 256  # the default context is lowered to fit a tight memory limit, not below this
PROCESS_RESERVE = 768 * 1024**2  # Python, torch and transformers themselves, the loader's reads, the tokenizer


@dataclass
class Inspected:
    directory: Path
    config: object  # transformers PretrainedConfig
    model: nn.Module  # on the meta device, experts routed to the engine
    spec: ModelSpec
    tensors: CheckpointTensors
    layout: CheckpointLayout
    dtype: torch.dtype  # compute dtype
    format: ExpertFormat  # how an expert is held: plain, or a quantized format (experts/formats)
    quantization: dict | None = None  # config.json's quantization_config, where the engine reads it


def compute_dtype(config, run: RunConfig) -> torch.dtype:
    """The checkpoint's dtype unless asked otherwise: what transformers' from_pretrained (dtype="auto") uses."""
    return run.dtype if run.dtype is not None else dtype_from_config(config)


def inspect_checkpoint(name_or_path, run: RunConfig) -> Inspected:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = resolve_checkpoint(name_or_path)
    raw = read_config(directory)
    quantization = read_quantization(raw, directory / "config.json")
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not an architecture this transformers install knows ({_first_line(e)}); "
            "upgrade transformers or use a supported MoE model"
        ) from None
    except Exception as e:  # OSError, huggingface_hub's strict-dataclass errors for mistyped fields, ...
        raise CheckpointError(
            f"{directory / 'config.json'} is invalid ({_first_line(e)}); restore it from the original checkpoint"
        ) from None
    if quantization is not None and run.expert_dtype is not None:
        raise UnsupportedModelError(f"the checkpoint is quantized already ({quantization['quant_method']}); "
                                    "--expert-dtype quantizes unquantized experts only: leave it out")
    dtype = compute_dtype(config, run)
    tensors = CheckpointTensors(directory)
    register_experts_implementation()
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=IMPLEMENTATION_NAME)
    except Exception as e:  # transformers raises many types for configs it cannot build (AttributeError for dbrx)
        raise UnsupportedModelError(
            f"model type {model_type!r} cannot be built as a causal LM with offloaded experts ({_first_line(e)})"
        ) from None
    if (directory / "generation_config.json").is_file():  # extra EOS ids, sampling defaults: as from_pretrained
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{directory / 'generation_config.json'} cannot be read ({_first_line(e)})") from None
    spec = describe(model, config)
    transposed = bool(getattr(model.get_submodule(spec.experts_paths[0]), "is_transposed", False))
    splits = None
    if quantization is not None and quantization["quant_method"] == "fp8":  # each on-disk tensor has its own scales
        splits = CheckpointLayout(tensors, model, spec, layers=1).row_splits()
    fmt = expert_format(spec, dtype, quantization, run.expert_dtype, transposed,
                        expert_scale_dtype(tensors) or torch.float32, splits, on_cpu=run.device.type == "cpu")
    layout = CheckpointLayout(tensors, model, spec, fmt.sources)
    return Inspected(directory, config, model, spec, tensors, layout, dtype, fmt, quantization)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0][:200] if text else type(error).__name__)


def expert_param_names(inspected: Inspected) -> set[str]:
    return {f"{path}.{p.name}" for path in inspected.spec.experts_paths for p in inspected.spec.expert_params}


def non_expert_tensors(inspected: Inspected) -> dict[str, torch.Tensor]:
    """Runtime name -> meta tensor of every weight the engine loads itself (tied duplicates once)."""
    experts = expert_param_names(inspected)
    state = inspected.model.state_dict()  # ties share one tensor; state_dict lists both names
    seen, out = set(), {}
    for name, t in state.items():
        if name in experts or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def mapped_embedding(inspected: Inspected, device: torch.device) -> str | None:
    """The input embedding's weight name where it stays in the memory-mapped file instead of the budget: on
    the CPU, untied, stored in the compute dtype. A decode step reads one row of it, so the page cache holds
    the rows the text uses and the budget's bytes go to expert slots (Qwen3-30B-A3B: 622 MB, 66 slots); a
    tied weight is read whole by the LM head on every token, and a converted one needs a copy."""
    if device.type != "cpu":
        return None
    model = inspected.model
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        return None
    name = next((f"{n}.weight" for n, m in model.named_modules() if m is embedding), None)
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    if name is None or name in tied or name in tied.values():
        return None
    key = inspected.layout.find(name)
    if key is None or inspected.tensors.infos[key].dtype != embedding.weight.dtype:
        return None
    return name


def non_experts_expanded(inspected: Inspected) -> bool:
    """Whether some non-expert weight is stored in FP8 and expanded at load (Qwen3-*-FP8, DeepSeek-V3)."""
    if inspected.quantization is None:
        return False
    return any(inspected.layout.scale_of(key) for name in non_expert_tensors(inspected)
               if (key := inspected.layout.find(name)) is not None)


def make_plan(inspected: Inspected, run: RunConfig) -> MemoryPlan:
    spec, dtype = inspected.spec, inspected.dtype
    tensors = non_expert_tensors(inspected)
    mapped = mapped_embedding(inspected, run.device)
    mapped_bytes = 0 if mapped is None else tensors[mapped].numel() * tensors[mapped].element_size()
    sizes = [t.numel() * t.element_size() for name, t in tensors.items() if name != mapped]
    non_expert = sum(sizes)
    limit = spec.max_position_embeddings or DEFAULT_MAX_CONTEXT
    if run.max_context is not None and run.max_context > limit:
        raise ContextTooLongError(f"--max-context {run.max_context} exceeds the model's context of {limit} tokens; "
                                  "lower it", run.max_context, limit)
    config = inspected.model.config  # the built model's: it knows the attention implementation chosen
    grows = not getattr(inspected.model, "_can_compile_fullgraph", False)  # no static cache (engine._kv_cache)
    fmt = inspected.format
    expert_bytes = fmt.expert_nbytes()
    budget = run.memory_budget
    if budget is None and run.expert_slots is None:
        budget = automatic_budget(run.device, spec.total_experts * expert_bytes)
    allocator = cuda_allocator_bytes(sizes, len(fmt.stored)) if run.device.type == "cuda" else 0
    expansion = fmt.expand_bytes(run.max_batch)
    described = dict(expert_format=fmt.describe(), non_experts_expanded=non_experts_expanded(inspected))

    def plan_for(max_context: int, fitted: bool = False) -> MemoryPlan:
        if grows:
            kv = growing_kv_bytes(config, dtype, max_context, run.max_batch)
        else:
            kv = kv_bytes_per_token(config, dtype) * max_context * run.max_batch
        work = working_bytes(config, spec, dtype, max_context, run.max_batch) + expansion
        plan = plan_memory(spec, non_expert, kv, work, expert_bytes, budget, run.expert_slots, max_context,
                           run.max_batch, allocator, grows, fitted, mapped_bytes)
        return replace(plan, **described)

    default = min(limit, DEFAULT_MAX_CONTEXT)
    if run.max_context is not None or run.memory_budget is not None or run.expert_slots is not None:
        return with_packed_experts(inspected, run, plan_for(run.max_context or default))
    # Nothing asked: under a tight memory limit the default context's KV cache and prefill activations would
    # leave the slot pool too small for one token's experts (or not fit at all); halve it until they fit.
    wanted = min(spec.top_k * len(spec.moe_layers), spec.total_experts)
    max_context = default
    while True:
        last = max_context // 2 < MIN_FITTED_CONTEXT
        try:
            plan = plan_for(max_context, fitted=max_context < default)
            if plan.expert_slots >= wanted or last:
                return with_packed_experts(inspected, run, plan)
        except MemoryBudgetError:
            if last:
                raise
        max_context //= 2


def settle_threads(inspected: Inspected, run: RunConfig) -> RunConfig:
    """The run with its default thread count settled for this model, before it is planned (the packing probe
    runs at the run's threads): on a CPU device, every usable core where experts are large enough for a
    second thread to pay (run_config.all_cores_pay); one less elsewhere (run_config.default_threads). A GPU run
    keeps a core for the thread driving it and the expert loader; threads asked for stay as asked."""
    if run.threads_asked or run.device.type != "cpu" or not all_cores_pay(inspected.format.expert_nbytes()):
        return run
    return replace(run, threads=max(run.threads, usable_cores()))


def with_packed_experts(inspected: Inspected, run: RunConfig, plan: MemoryPlan) -> MemoryPlan:
    """The plan with `experts_packed` set where packs_resident_experts says so."""
    return replace(plan, experts_packed=True) if packs_resident_experts(inspected, run, plan) else plan


def packs_resident_experts(inspected: Inspected, run: RunConfig, plan: MemoryPlan,
                           memory: HostMemory | None = None) -> bool:
    """Whether a CPU device holds its experts packed for oneDNN, each computed where it lies as a CPU expert,
    instead of in a slot pool: where every expert is resident and no slot count was asked for, and packing
    gives the same bits (packed_capacity's conditions, and experts that packed_expert computes). On a CPU a
    slot is a second copy in RAM that transformers' grouped_mm reorders on every product and loops over empty
    groups for; the packed copies take the slots' bytes and decode 1.5x faster at Qwen3-30B-A3B's shape and
    1.6x at Mixtral's (BENCHMARKS.md). `--expert-slots` (a slot pool asked for: calibrate times its loads) or
    `--cpu-weights stored` keeps the slots."""
    if run.device.type != "cpu" or run.expert_slots is not None or plan.expert_slots < plan.total_experts:
        return False
    module = inspected.model.get_submodule(inspected.spec.experts_paths[0])
    if not plain_mlp(module):
        return False
    # a prefill's products (more rows than packed ones take) read the experts from the files: room for their
    # pages beside the packed copies, or every prefill would read them from the disk again
    memory = memory or host_memory()
    if not fits_in_memory(plan.total_bytes + plan.total_experts * plan.expert_bytes, memory):
        return False
    host = host_mode(run, plan, memory, encoded=not inspected.format.stored_on_disk)
    return packs_exactly(run, inspected.format, host, inspected.spec)


def automatic_budget(device: torch.device, experts_bytes: int, memory: HostMemory | None = None) -> int:
    """CUDA: a share of the free GPU memory. CPU: a share of the memory this process may use (a cgroup limit
    counted): half where the page cache is to hold the model's files, all but a reserve for the process
    itself where the model does not fit and the direct tier reads around the page cache."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * CUDA_BUDGET_SHARE) - CUDA_RESERVE)
    memory = memory or host_memory()
    if not fits_in_memory(experts_bytes, memory):
        return max(0, int((memory.available_bytes - PROCESS_RESERVE) * DIRECT_BUDGET_SHARE))
    return int(memory.available_bytes * CPU_BUDGET_SHARE)


def fits_in_memory(experts_bytes: int, memory: HostMemory) -> bool:
    return experts_bytes < HOST_RAM_SHARE * memory.available_bytes


def host_mode(run: RunConfig, plan: MemoryPlan, memory: HostMemory | None = None, encoded: bool = False) -> str:
    """As asked; otherwise, when the experts do not fit in the memory this process may use (a cgroup limit
    counted), the direct tier (read around the page cache: the slot pool is the cache); when they do, pinned
    RAM with CUDA, else copies from the memory-mapped files on demand (the CPU default: the page cache holds
    them already). Experts quantized at load (`encoded`: int8/int4) that fit are held in RAM in that form:
    the files hold them in bf16, and quantizing on every miss would cost more than the miss."""
    if run.host_memory is not None:
        return run.host_memory
    if not fits_in_memory(plan.total_experts * plan.expert_bytes, memory or host_memory()):
        return "direct"
    return "pinned" if run.device.type == "cuda" else "ram" if encoded else "mmap"


def stored_weight(inspected: Inspected, module_name: str) -> Callable[[], torch.Tensor] | None:
    """A way to a linear layer's weight as a view of the checkpoint's memory map (each call checks the file, as
    every read does), where the file holds it as the model computes with it; None where it does not (another
    dtype, FP8 blocks)."""
    key = inspected.layout.find(f"{module_name}.weight")
    if key is None or inspected.tensors.infos[key].dtype != inspected.dtype:
        return None
    if inspected.quantization is not None and inspected.layout.scale_of(key) is not None:
        return None
    return lambda: inspected.tensors.view(key)


def packed_capacity(run: RunConfig, fmt: ExpertFormat, host: str, spec: ModelSpec, plan: MemoryPlan,
                    memory: HostMemory | None = None) -> int:
    """Bytes of CPU experts' weights packed for oneDNN (packed_weights.py) this run may hold: where every expert
    weight's shape packs exactly on this machine, as many as RAM holds beside everything else (HOST_RAM_SHARE
    of what is available, less what the plan puts in RAM on a CPU device and the process's own reserve), and
    none in the direct tier (which exists because RAM does not hold the experts). Experts are packed on their
    first call on the CPU, so with --cold-experts stream (calibrate's CPU timings aside) none is."""
    if plan.experts_packed and host != "direct":  # in place of the slots, which the plan counts; the plan probed
        return plan.total_experts * plan.expert_bytes  # the shapes at this run's threads (Mixtral's: ~1.3 s)
    if not packs_exactly(run, fmt, host, spec):
        return 0
    available = int(HOST_RAM_SHARE * (memory or host_memory()).available_bytes) - PROCESS_RESERVE
    if run.device.type == "cpu":  # the slots, KV cache and working memory are RAM too, not all touched yet
        available -= plan.total_bytes
    return max(0, min(plan.total_experts * plan.expert_bytes, available))


def packs_exactly(run: RunConfig, fmt: ExpertFormat, host: str, spec: ModelSpec) -> bool:
    """Whether this run packs CPU experts: asked to, experts of the plain dtype, not the direct tier, and every
    expert weight's shape packs exactly on this machine."""
    if run.cpu_weights != "packed" or fmt.name != "plain" or host == "direct":
        return False
    # at the run's thread count, as load() runs (and probes) them: make_plan and `plan` call this before load
    # sets them, and oneDNN's choice of kernel may depend on them (a plan packing what load does not)
    with compute_threads(run.threads):
        return all(packing_is_exact(fmt.dtype, *p.shape) for p in spec.expert_params if len(p.shape) == 2)


@contextmanager
def compute_threads(threads: int):
    """torch's intra-op threads set to `threads` for the block, then set back."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


def layers_packed_at_load(run: RunConfig, plan: MemoryPlan, num_layers: int) -> range:
    """The MoE layers whose CPU experts are packed at load rather than at their first call: those whose cold
    experts all run on the CPU (--cold-experts cpu: every layer; --cpu-moe-layers N: the first N), unless every
    expert is resident in slots (none is then cold); every layer's where the plan packs the resident experts."""
    if plan.experts_packed:
        return range(num_layers)
    if plan.expert_slots >= plan.total_experts:
        return range(0)
    return range(num_layers if run.cold_experts == "cpu" else min(run.cpu_moe_layers, num_layers))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        value = nn.Parameter(value, requires_grad=False)
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value
    value._is_hf_initialized = True  # transformers' initialize_weights must not overwrite it


def load_non_experts(inspected: Inspected, device: torch.device, progress: bool) -> set[str]:
    """Copy every non-expert weight to the device (the input embedding may stay in the memory map:
    mapped_embedding); returns the on-disk keys used."""
    model, layout = inspected.model, inspected.layout
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    used = set()
    wanted = non_expert_tensors(inspected)
    mapped = mapped_embedding(inspected, device)
    for name, meta in tqdm(wanted.items(), desc="non-expert weights", disable=not progress, unit="tensor"):
        key = layout.find(name)
        if key is None:
            if name in tied:
                continue
            raise CheckpointError(
                f"tensor {name} is missing from the checkpoint in {inspected.directory}; "
                "the files are incomplete or belong to another model"
            )
        info = inspected.tensors.infos[key]
        if info.shape != tuple(meta.shape):
            raise CheckpointError(
                f"tensor {key} in {info.file.name} has shape {list(info.shape)}, the model expects "
                f"{list(meta.shape)}; config.json does not match the weights"
            )
        # meta.dtype is transformers' choice: the compute dtype, or fp32 where a model keeps routers in fp32
        scale = layout.scale_of(key) if inspected.quantization is not None else None
        if scale is None and meta.is_floating_point():
            refuse_unscaled(key, info)
        if name == mapped:  # private mapping: nothing written to it reaches the file
            value = inspected.tensors.view(key)
        elif scale is not None:  # an FP8 weight outside the experts: expanded now, as transformers' reference does
            scales = inspected.tensors.read(scale)
            check_fp8_scales(scale, scales)
            block = tuple(inspected.quantization["weight_block_size"])
            check_fp8_grid(scale, info.shape, tuple(scales.shape), block)
            value = dequantize_fp8_blocks(inspected.tensors.read(key), scales, block, meta.dtype).to(device)
            used.add(scale)
        else:
            value = inspected.tensors.read(key).to(device=device, dtype=meta.dtype)
        _set_tensor(model, name, value)
        used.add(key)
    # Non-persistent buffers (rotary frequencies) were never saved: materialise and let transformers fill them.
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = torch.empty_like(buffer, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.initialize_weights()
    if tied:
        model.tie_weights()
    return used


def load(inspected: Inspected, run: RunConfig, plan: MemoryPlan):
    """Returns (model, store, runtime): the model on run.device with every experts module bound to the
    runtime (its cache, predictor and prefetch)."""
    spec = inspected.spec
    # the one process-wide setting the engine makes: its compute threads (run_config.default_threads); first,
    # since oneDNN's choice of kernel (which packing_is_exact probes) may depend on them
    torch.set_num_threads(run.threads)
    predictor = make_predictor(run.predictor, inspected.model, spec, inspected.directory)
    used = load_non_experts(inspected, run.device, run.progress)
    used |= inspected.layout.expert_keys()
    inspected.layout.warn_unused(used, getattr(inspected.model, "_keys_to_ignore_on_load_unexpected", None))
    store = ExpertStore(inspected.tensors, inspected.layout, spec, inspected.format,
                        host_mode(run, plan, encoded=not inspected.format.stored_on_disk), run.progress)
    policy = make_policy(run.policy, spec.num_moe_layers, spec.num_experts, spec.top_k)
    capacity = packed_capacity(run, store.format, store.mode, spec, plan)
    # the plan's packed experts in place of slots, unless nothing packs now after all (the host memory measured
    # again above chose the direct tier): then the slot pool the plan's bytes were, not every expert streamed
    in_place = plan.experts_packed and capacity > 0
    cache = ExpertCache(store, 0 if in_place else plan.expert_slots, run.device, policy)
    cuda = run.device.type == "cuda"
    runtime = Runtime(cache, spec.num_moe_layers, spec.top_k, predictor, run.prefetch_depth, run.max_batch,
                      run.cold_experts, spec.num_moe_layers if in_place else run.cpu_moe_layers,
                      hardware_of(run.hardware, parallel=cuda,
                                  model=calibrated_model(run.hardware, model_name(inspected.directory),
                                                         store.expert_nbytes(), spec.num_moe_layers, spec.top_k)),
                      packed=PackedExperts(store, capacity) if capacity else None)
    reference_impl = inspected.model.get_correct_experts_implementation(None)  # what from_pretrained would use
    for layer_pos, path in enumerate(spec.experts_paths):
        module = inspected.model.get_submodule(path)
        module._offload = bind(module, layer_pos, runtime.layer_call, reference_impl)
        tap = residual_tap(inspected.model, path.rpartition(".")[0])
        if tap is not None:  # the residual stream entering the MoE block: for predictors and hidden-state traces
            tap.module.register_forward_pre_hook(
                lambda m, args, kwargs, i=layer_pos: runtime.capture_residual(i, first_input(args, kwargs)),
                with_kwargs=True)
    model = inspected.model.eval()
    if run.device.type == "cpu" and run.cpu_weights == "packed":
        pack_linears(model, inspected.dtype, lambda name: stored_weight(inspected, name))
    # forwards that bypass the engine's API (engine.model.generate) still run one at a time
    model.register_forward_pre_hook(lambda m, args: runtime.lock.acquire() and None)
    model.register_forward_hook(lambda m, args, out: runtime.lock.release(), always_call=True)
    if cache.num_slots >= plan.total_experts:  # everything fits: load it all now, decode never misses
        keys = [(i, e) for i in range(spec.num_moe_layers) for e in range(spec.num_experts)]
        cache.preload(keys, run.progress)
    if runtime.packed is not None:  # as llama.cpp repacks at load
        runtime.packed.preload([(i, e) for i in layers_packed_at_load(run, plan, spec.num_moe_layers)
                                if packs(runtime.packed, model.get_submodule(spec.experts_paths[i]))
                                for e in range(spec.num_experts)], run.progress)
    return model, store, runtime
