"""`moe-offload calibrate`: measure this machine for the cost model and write a profile's [hardware] table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .run_options import DEFAULT_MODEL, EXPERT_DTYPES, output_path


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="measure copy bandwidths, CPU and device expert times and the engine's "
                                         "costs (under a minute); write them to a profile", description=__doc__)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--model", help="the model whose expert shape and dtype to measure (default: the bundled model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: the model's)")
    p.add_argument("--host-memory", choices=["mmap", "files", "ram", "pinned", "direct"],
                   help="where cold experts wait (default: as the engine chooses)")
    p.add_argument("--expert-dtype", choices=EXPERT_DTYPES, default="auto",
                   help="measure experts quantized at load, as --expert-dtype runs them (default: as stored)")
    p.add_argument("--expert-slots", type=int, default=None,
                   help="slots to load the model with (default: every expert, which the resident decode step needs)")
    p.add_argument("--out", type=Path, required=True, help="the profile to write, e.g. profiles/my-machine.toml")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (shown only when stderr is a terminal)")
    return p


def run(args: argparse.Namespace) -> int:
    from offload_engine.atomic_write import atomic_output, check_not_an_input
    from offload_engine.engine import OffloadEngine
    from offload_engine.loading import inspect_checkpoint
    from offload_engine.planning.calibration import busy_note, calibrate
    from offload_engine.planning.hardware_profile import profile_text
    from offload_engine.run_config import RunConfig

    output_path(args.out)
    model = args.model or str(DEFAULT_MODEL)
    check_not_an_input(args.out, "--out", [("the model in", model)])
    probe = RunConfig.build(device=args.device, dtype=args.dtype, expert_slots=1 << 20, progress=False,
                            expert_dtype=args.expert_dtype)
    slots = args.expert_slots or inspect_checkpoint(model, probe).spec.total_experts
    engine = OffloadEngine.from_pretrained(model, device=args.device, dtype=args.dtype, expert_slots=slots,
                                           host_memory=args.host_memory, max_context=128, progress=not args.quiet,
                                           expert_dtype=args.expert_dtype)
    table = calibrate(engine, progress=not args.quiet)
    busy = busy_note(table)  # the profile is written all the same, spreads included, and says so
    comment = (f"Measured by `moe-offload calibrate` on {table['measured_on']}, {table['date']}: {table['description']}.\n"
               f"Model {table['model']['name']} ({table['dtype']}, host memory {table['host_memory']}). "
               "Add flag defaults above [hardware] to use it as a run profile."
               + (f"\nCaution: {busy}." if busy else ""))
    with atomic_output(args.out) as f:
        f.write(profile_text(table, comment).encode())
    print(f"wrote {args.out}: link {table['link_bytes_per_s'] / 1e9:.2f} GB/s, CPU expert "
          f"{table['cpu_expert_s']['1'] * 1e6:.0f} us at 1 token, device expert {table['device_expert_s']['1'] * 1e6:.0f} "
          f"us, resident decode step {table['model']['resident_decode_s'] * 1e3:.2f} ms")
    if busy:
        print(f"warning: {busy}; rerun calibrate when the machine is idle", file=sys.stderr)
    return 0
