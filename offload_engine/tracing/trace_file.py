"""Routing traces: which experts each token was routed to, as an `.npz` file.

File format (numpy `.npz`, `allow_pickle=False`):

- `expert_ids`  integer (stored int16) `[N sequences, T tokens, L MoE layers, k]`: each token's routed
  experts in descending router-score order. `-1` marks "no expert": a padded token or a missing cell.
- `num_experts` integer scalar E: routed experts per layer (ids are in [0, E)).
- `moe_layers`  integer `[L]`: the model's layer index of each MoE layer.
- optional `scores` float32 like `expert_ids`; `token_ids` int32 `[N, T]` (-1 = unknown);
  `domains` str `[N]` (a label per sequence); `model` str scalar; `hidden_states` float16 `[N, T, L, H]`:
  the residual stream entering each MoE block (`moe-offload trace --hidden-states`, to train predictors).

Aliases accepted on load: `router_scores` for `scores`, `moe_layer_ids` for `moe_layers` (the FLAME trace
in data/flame-moe-290m/ uses them). Other arrays are ignored, not even read; members that are not `.npy`
arrays, pickled objects and headers that disagree with a member's size are refused. A file without
`num_experts` needs it from the caller:
`load_trace(path, num_experts=64)`, `moe-offload consistency --num-experts 64`, or once for all
`python -m offload_engine.tracing.trace_file convert IN.npz OUT.npz --num-experts 64`.

How -1 is read: a sequence's length is 1 + the last token that has any expert id in any layer; the tokens
after it are padding and end the sequence. A -1 inside that length is a missing cell: it requests nothing
and activates nothing, but its token still counts as a position of the sequence.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic_write import atomic_output
from ..errors import TraceFormatError, one_line, short_repr

_ALIASES = {"router_scores": "scores", "moe_layer_ids": "moe_layers"}
TRACE_KEYS = frozenset({"expert_ids", "num_experts", "moe_layers", "scores", "token_ids", "domains", "model",
                        "hidden_states"})
DEFLATE_MAX_RATIO = 1032  # deflate expands data by at most this factor
MAX_EXPERTS = 32767  # expert ids are int16


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """A validated routing trace; see the module docstring for the meaning of each field.

    >>> ids = np.array([[[[0, 1]], [[1, 2]], [[-1, -1]]]], dtype=np.int16)  # N=1, T=3, L=1, k=2
    >>> t = RoutingTrace(expert_ids=ids, num_experts=4, moe_layers=np.array([0]))
    >>> t.lengths().tolist(), t.k, t.num_layers
    ([2], 2, 1)
    """

    expert_ids: np.ndarray  # int16 [N, T, L, k], -1 = padding / missing
    num_experts: int
    moe_layers: np.ndarray  # int64 [L]
    scores: np.ndarray | None = None  # float32 [N, T, L, k]
    token_ids: np.ndarray | None = None  # int32 [N, T], -1 = unknown
    domains: tuple[str, ...] | None = None  # [N]
    model: str | None = None
    hidden_states: np.ndarray | None = None  # float16 [N, T, L, H]
    _lengths: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)
        has_any = (self.expert_ids >= 0).any(axis=(2, 3))  # [N, T]
        last = self.num_tokens - np.argmax(has_any[:, ::-1], axis=1)
        lengths = np.where(has_any.any(axis=1), last, 0).astype(np.int64)
        lengths.flags.writeable = False
        object.__setattr__(self, "_lengths", lengths)  # computed once: every metric needs it

    @property
    def num_sequences(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def k(self) -> int:
        return self.expert_ids.shape[3]

    def lengths(self) -> np.ndarray:
        """int64 [N] (read-only): 1 + the last token with any expert id (0 for an all-padding sequence)."""
        return self._lengths


def _fail(msg: str) -> None:
    raise TraceFormatError(msg)


def _validate(t: RoutingTrace) -> None:
    ids = t.expert_ids
    if not isinstance(ids, np.ndarray) or not np.issubdtype(ids.dtype, np.integer):
        _fail(f"expert_ids must be an integer array, got {getattr(ids, 'dtype', type(ids).__name__)}; "
              "store routed expert ids as int16")
    if ids.ndim != 4:
        _fail(f"expert_ids must have 4 dims [sequences, tokens, layers, k], got shape {ids.shape}")
    if ids.dtype != np.int16:
        _fail(f"expert_ids must be int16, got {ids.dtype}; convert with ids.astype(np.int16)")
    if min(ids.shape) < 1:
        _fail(f"expert_ids has an empty axis, shape {ids.shape}; record at least one token of one layer")
    e = t.num_experts
    if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 1 <= e <= MAX_EXPERTS:
        _fail(f"num_experts must be an integer in 1..{MAX_EXPERTS}, got {short_repr(e)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1:
        _fail(f"expert_ids holds {lo}; ids must be in [0, num_experts) with -1 for padding/missing")
    if hi >= e:
        _fail(f"expert_ids holds {hi} but num_experts is {e}; fix num_experts or the ids")
    srt = np.sort(ids, axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if dup.any():
        n, tok, lay, _ = np.argwhere(dup)[0]
        _fail(f"expert_ids repeats an expert within one token (sequence {n}, token {tok}, layer {lay}); "
              "each token's k ids must be distinct")
    ml = t.moe_layers
    if not isinstance(ml, np.ndarray) or not np.issubdtype(ml.dtype, np.integer) or ml.shape != (ids.shape[2],):
        _fail(f"moe_layers must be an integer array of shape ({ids.shape[2]},), one per layer of expert_ids, "
              f"got {getattr(ml, 'dtype', type(ml).__name__)} {getattr(ml, 'shape', '')}")
    if t.scores is not None:
        s = t.scores
        if not isinstance(s, np.ndarray) or not np.issubdtype(s.dtype, np.floating) or s.shape != ids.shape:
            _fail(f"scores must be a float array of shape {ids.shape} like expert_ids, got "
                  f"{getattr(s, 'dtype', type(s).__name__)} {getattr(s, 'shape', '')}")
    if t.token_ids is not None:
        ti = t.token_ids
        if not isinstance(ti, np.ndarray) or not np.issubdtype(ti.dtype, np.integer) or ti.shape != ids.shape[:2]:
            _fail(f"token_ids must be an integer array of shape {ids.shape[:2]} [sequences, tokens], got "
                  f"{getattr(ti, 'dtype', type(ti).__name__)} {getattr(ti, 'shape', '')}")
        if ti.size and int(ti.min()) < -1:
            _fail(f"token_ids holds {int(ti.min())}; use -1 for an unknown token id")
    if t.domains is not None:
        if not isinstance(t.domains, tuple) or len(t.domains) != ids.shape[0] or not all(
                isinstance(d, str) for d in t.domains):
            _fail(f"domains must be {ids.shape[0]} strings, one per sequence")
    if t.model is not None and not isinstance(t.model, str):
        _fail(f"model must be a string, got {type(t.model).__name__}")
    if t.hidden_states is not None:
        h = t.hidden_states
        if not isinstance(h, np.ndarray) or not np.issubdtype(h.dtype, np.floating) or h.ndim != 4 \
                or h.shape[:3] != ids.shape[:3]:
            _fail(f"hidden_states must be a float array of shape {ids.shape[:3]} + (hidden size,), got "
                  f"{getattr(h, 'dtype', type(h).__name__)} {getattr(h, 'shape', '')}")


def load_trace(path: str | Path, num_experts: int | None = None) -> RoutingTrace:
    """Read and validate a trace `.npz`; `num_experts` is needed when the file has no `num_experts` key.

    Raises TraceFormatError with one line naming the problem and the fix.
    """
    path = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the name
        _fail(f"trace file {path} does not exist; check the path")
    except OSError as e:
        _fail(f"trace file {path} cannot be read ({e.strerror}); check the path and its permissions")
    if not regular:  # a FIFO would block the zip reader, a directory fail inside it
        _fail(f"trace file {path} is not a regular file; pass the .npz file itself")
    raw = _read_arrays(path)
    for key in ("expert_ids", "moe_layers"):
        if key not in raw:
            _fail(f"{path} has no '{key}' array (keys: {', '.join(sorted(raw)) or 'none'}); "
                  "see the trace format in offload_engine/tracing/trace_file.py")
    if "num_experts" in raw:
        stored = raw["num_experts"]
        if stored.ndim != 0 or not np.issubdtype(stored.dtype, np.integer):
            _fail(f"{path}: num_experts must be an integer scalar, got {stored.dtype} shape {stored.shape}")
        if num_experts is not None and int(stored) != num_experts:
            _fail(f"{path} says num_experts={int(stored)} but {num_experts} was given; drop --num-experts")
        num_experts = int(stored)
    elif num_experts is None:
        _fail(f"{path} has no 'num_experts'; pass --num-experts E (num_experts=E in Python) or convert it once: "
              f"python -m offload_engine.tracing.trace_file convert {path} OUT.npz --num-experts E")
    ids = raw["expert_ids"]
    if np.issubdtype(ids.dtype, np.integer) and ids.dtype != np.int16:
        if ids.size and (int(ids.min()) < -1 or int(ids.max()) > 32767):
            _fail(f"{path}: expert_ids values {int(ids.min())}..{int(ids.max())} do not fit int16")
        ids = ids.astype(np.int16)
    domains = raw.get("domains")
    model = raw.get("model")
    if domains is not None and (domains.ndim != 1 or domains.dtype.kind != "U"):
        _fail(f"{path}: domains must be a 1-d string array, got {domains.dtype} shape {domains.shape}")
    if model is not None and (model.ndim != 0 or model.dtype.kind != "U"):
        _fail(f"{path}: model must be a string scalar, got {model.dtype} shape {model.shape}")
    return RoutingTrace(
        expert_ids=ids,
        num_experts=num_experts,
        moe_layers=raw["moe_layers"],
        scores=raw.get("scores"),
        token_ids=raw.get("token_ids"),
        domains=None if domains is None else tuple(str(d) for d in domains),
        model=None if model is None else str(model),
        hidden_states=raw.get("hidden_states"),
    )


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The trace's arrays in an .npz, by canonical key; other arrays are not read at all."""
    if not zipfile.is_zipfile(path):  # np.load would otherwise guess a pickle and talk about that
        _fail(f"{path} is not an .npz file (not a zip archive); write traces with "
              "offload_engine.tracing.trace_file.save_trace or `moe-offload trace`")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = member.filename
                if member.is_dir() or not name.endswith(".npy"):
                    _fail(f"{path}: member {name!r} is not a .npy array; an .npz trace holds numpy arrays only "
                          "(write it with offload_engine.tracing.trace_file.save_trace)")
                key = _ALIASES.get(name[:-4], name[:-4])
                if key not in TRACE_KEYS:
                    continue
                if key in arrays:
                    _fail(f"{path} holds '{key}' twice (under its name and an alias); keep one")
                arrays[key] = _read_member(archive, member, key, path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        # zipfile raises RuntimeError for an encrypted member, NotImplementedError for an unknown compression
        reason = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"{path} is not a readable .npz trace ({type(exc).__name__}: {reason}); "
              "write traces with offload_engine.tracing.trace_file.save_trace")
    return arrays


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, key: str, path: Path) -> np.ndarray:
    """One .npy member, its header checked against the member's real size before anything is allocated: a
    forged shape must not make numpy reserve terabytes."""
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        _fail(f"{path}: '{key}' is compressed with zip method {member.compress_type}, which numpy never writes; "
              "re-save the trace with save_trace")
    most = member.compress_size * (1 if member.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO)
    if member.file_size > most:
        _fail(f"{path}: '{key}' claims {member.file_size} bytes, more than its {member.compress_size} compressed "
              "bytes can hold; the file is corrupt")
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            _fail(f"{path}: '{key}' is a .npy file of version {version}, which traces never use; re-save it")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if dtype.hasobject:
            _fail(f"{path}: '{key}' holds pickled Python objects, which are never loaded; store plain numeric "
                  "or string arrays")
        needed = math.prod(shape) * dtype.itemsize
        held = member.file_size - f.tell()
        if needed != held:
            _fail(f"{path}: '{key}' declares shape {shape} of {dtype} ({needed} bytes) but holds {held} bytes; "
                  "the file is corrupt")
        data = f.read(needed)
    if len(data) != needed:
        _fail(f"{path}: '{key}' ends early; the file is truncated")
    array = np.frombuffer(bytearray(data), dtype=dtype)  # a bytearray: the array stays writable, as np.load's
    return array.reshape(shape, order="F" if fortran_order else "C")


def save_trace(path: str | Path, trace: RoutingTrace) -> None:
    """Write `trace` as a compressed `.npz` in the format `load_trace` reads (canonical key names), atomically:
    a failed write leaves an earlier file at `path` as it was."""
    arrays = {
        "expert_ids": trace.expert_ids.astype(np.int16),
        "num_experts": np.int64(trace.num_experts),
        "moe_layers": np.asarray(trace.moe_layers, dtype=np.int64),
    }
    if trace.scores is not None:
        arrays["scores"] = trace.scores.astype(np.float32)
    if trace.token_ids is not None:
        arrays["token_ids"] = trace.token_ids.astype(np.int32)
    if trace.domains is not None:
        arrays["domains"] = np.array(trace.domains, dtype=str)
    if trace.model is not None:
        arrays["model"] = np.array(trace.model)
    if trace.hidden_states is not None:
        arrays["hidden_states"] = trace.hidden_states.astype(np.float16)
    with atomic_output(path) as f:  # a file object also keeps numpy from appending ".npz" to the name
        np.savez_compressed(f, **arrays)


def _convert_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload_engine.tracing.trace_file",
                                     description="Rewrite a trace in the canonical format.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="add num_experts, rename alias keys, drop unknown keys")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--num-experts", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        trace = load_trace(args.src, num_experts=args.num_experts)
        save_trace(args.dst, trace)
    except TraceFormatError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # save_trace names the file
        print(f"error: {one_line(f'{exc.strerror}: {exc.filename}')}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(_convert_main())
