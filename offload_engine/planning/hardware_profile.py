"""A machine's figures for the cost model: the [hardware] table of a profile (profiles/*.toml).

A profile is a TOML file of flag defaults (see cli/run_options.py); its optional [hardware] table says what
the machine does: written by `moe-offload calibrate` (measured, with where and when) or by hand from
published specifications (marked as such). Keys:

    link_bytes_per_s      host -> device copy bandwidth for the host mode in use (B/s)
    cpu_read_bytes_per_s  the CPU streaming expert weights from host memory (B/s)
    cpu_flops             the CPU's expert throughput at the compute dtype (FLOP/s)
    cpu_call_s            fixed cost of one CPU expert call (s)
    device_flops          the device's expert throughput (FLOP/s)
    device_read_bytes_per_s  the device streaming a resident expert's weights (B/s; a GPU: its memory)
    device_call_s         fixed cost of one device expert group (s)
    parallel              true when a separate device (GPU) computes while the CPU does
    layer_call_s          the engine's fixed cost per MoE layer call (s), for estimates
    source                "measured" or "spec"; description, measured_on, date: free text

calibrate also records measurement details the cost model does not read: per-mode link rates, expert times by
token count, and beside them how much their repetitions disagreed (`*_spread`, calibration.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError
from .cost_model import Hardware

NUMBERS = ("link_bytes_per_s", "cpu_read_bytes_per_s", "cpu_flops", "cpu_call_s", "device_flops", "device_call_s",
           "device_read_bytes_per_s", "layer_call_s")
TEXT = ("source", "description", "measured_on", "date", "device", "cpu", "dtype", "host_memory")
# [hardware.model]: what calibrate measured on one model (the estimate and the CPU-only placement read them)
MODEL_NUMBERS = ("expert_bytes", "flops_per_token", "resident_decode_s", "prefill_s_per_token", "miss_s",
                 "cpu_miss_s", "moe_layers", "top_k")


def check_hardware(table, where: str) -> dict:
    """The [hardware] table, checked: positive finite numbers, booleans and short strings; other keys are
    measurement details (kept, not used by the cost model) and must be numbers, strings or tables of them."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [hardware] must be a table of figures, not {type(table).__name__}")
    for key, value in table.items():
        if key in NUMBERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{where}: hardware.{key} must be a positive number, not {value!r}")
        elif key == "parallel":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: hardware.parallel must be true or false, not {value!r}")
        elif key in TEXT:
            if not isinstance(value, str) or len(value) > 500:
                raise ConfigError(f"{where}: hardware.{key} must be a short string")
        elif key == "model":
            _check_model(value, where)
        elif not _detail(value):
            raise ConfigError(f"{where}: hardware.{key} must be a number, a string or a table of them")
    return dict(table)


def _check_model(table, where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [hardware.model] must be a table of what calibrate measured on a model")
    for key in MODEL_NUMBERS:
        value = table.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < math.inf):
            raise ConfigError(f"{where}: hardware.model.{key} must be a number, 0 or more, not {value!r}")
    if ("miss_s" in table) != ("cpu_miss_s" in table):
        raise ConfigError(f"{where}: hardware.model needs miss_s and cpu_miss_s together (moe-offload calibrate "
                          "writes both)")
    if not isinstance(table.get("name", ""), str):
        raise ConfigError(f"{where}: hardware.model.name must be the model folder's name")


def _detail(value, depth: int = 0) -> bool:
    if isinstance(value, (int, float, str, bool)):
        return True
    if isinstance(value, dict) and depth < 3:
        return all(isinstance(k, str) and _detail(v, depth + 1) for k, v in value.items())
    if isinstance(value, list) and depth < 3:
        return all(_detail(v, depth + 1) for v in value)
    return False


def model_name(directory) -> str:
    """The name calibrate records for a model: its folder's, resolved (so `--model .` has one too)."""
    return Path(directory).resolve().name


def calibrated_model(table: dict | None, name: str, expert_bytes: int, moe_layers: int, top_k: int) -> dict:
    """The [hardware.model] figures if calibrate measured them on this model: its folder's name, its expert
    size (which covers the dtype), MoE layers and top-k all agree; else {}."""
    model = (table or {}).get("model")
    if not isinstance(model, dict):
        return {}
    same = (model.get("name") == name and model.get("expert_bytes") == expert_bytes
            and model.get("moe_layers") == moe_layers and model.get("top_k") == top_k)
    return model if same else {}


def hardware_of(table: dict | None, parallel: bool, model: dict | None = None) -> Hardware:
    """The cost model's Hardware from a checked table (defaults where a figure is missing), with the per-miss
    costs of `model` (calibrated_model's figures for the model being run) where they are positive numbers."""
    base = Hardware(parallel=parallel)
    if not table:
        return base
    values = {k: float(v) for k, v in table.items() if k in NUMBERS and k != "layer_call_s"}
    for key in ("miss_s", "cpu_miss_s"):
        value = (model or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
            values[key] = float(value)
    return Hardware.from_dict({**base.as_dict(), **values, "parallel": bool(table.get("parallel", parallel))})


def read_profile_hardware(path: Path) -> dict:
    """The checked [hardware] table of a profile file (ConfigError if it has none)."""
    import tomllib

    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read profile {path}: {e}") from None
    if "hardware" not in values:
        raise ConfigError(f"profile {path} has no [hardware] table; make one with `moe-offload calibrate --out "
                          f"{path}` or pick one of profiles/hw/")
    return check_hardware(values["hardware"], f"profile {path}")


def profile_text(hardware: dict, comment: str) -> str:
    """TOML for a profile holding only a [hardware] table (flag defaults may be added above it by hand)."""
    lines = [f"# {line}" for line in comment.splitlines()] + ["", "[hardware]"]
    tables = []
    for key, value in hardware.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml(value)}")
    for key, table in tables:
        lines += ["", f"[hardware.{key}]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return f"{value:.6g}" if "e" in f"{value:.6g}" or "." in f"{value:.6g}" else f"{value:.6g}.0"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)
