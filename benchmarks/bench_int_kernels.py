"""Weight-only quantized kernels for one MoE expert on the CPU, measured.

An expert is Qwen3-MoE's gated MLP:  h = x @ gate_up.T  (gate_up [2I, H], the
gate rows first, then the up rows),  a = silu(h[:, :I]) * h[:, I:],
y = a @ down.T  (down [H, I]).  Activations are bf16.  Every time printed is
one whole expert call: both matmuls AND the SiLU/gate math (and, for the
"deq" candidates, the per-call dequantization of both weights).

Candidates
  bf16        F.linear with bf16 weights (baseline)
  i8mm        torch.ops.aten._weight_int8pack_mm, int8 per-output-channel
  i8deq       int8 weights dequantized to bf16 on every call, then F.linear
  i4mm-gG     torch.ops.aten._weight_int4pack_mm_for_cpu, int4 group G
  i4deq-gG    int4 (plain nibble storage) dequantized to bf16 per call, F.linear
  tao-*       torchao's own CPU paths, when torchao imports (optional)

Run:  PYTHONPATH=. python benchmarks/bench_int_kernels.py --threads 1 2 \
          --shape qwen3-30b-a3b small --tokens 1 4 16

Findings (torch 2.13 CPU, 2-vCPU AMD EPYC with AVX-512 + avx512_bf16, no AMX; 1 thread,
us per expert call, Qwen3-30B-A3B expert, warm = weights in L3 / cold = --experts 16):
               T=1   T=4   T=16 (warm)   T=1   T=4   T=16 (cold)
  bf16         430   400   710-820       670   720-800 980-1010
  i8mm         140   260   1040          370-450 380-410 1170-1280
  i4mm (any g) 140   250   1000          165-190 275-320 1010-1080
  i8deq/i4deq  1.6-2ms / 5-6ms: never competitive.
  -> int4: _weight_int4pack_mm_for_cpu; int8: _weight_int8pack_mm; for T >= ~8-16
     tokens per expert, bf16 F.linear (oneDNN) wins; keep a bf16 path for prefill.
  The CPU int4 packed bytes depend on ATEN_CPU_CAPABILITY (AVX512/AVX2/DEFAULT
  differ; feeding another capability's pack gives garbage): store
  pack_int4_plain bytes + scales_and_zeros, repack at load.  The same plain
  bytes are CUDA's _convert_weight_to_int4pack input (uint8 [N, K/2], even k
  in the high nibble), with the same [K/g, N, 2] bf16 scales_and_zeros and
  the same (q - 8) * scale + zero.

Reusable pieces (all pure PyTorch, CPU build >= 2.6):
  quantize_int8_per_channel / int8_expert_linear / dequantize_int8
  quantize_int4_groupwise / pack_int4_plain / unpack_int4_plain /
  int4_pack_for_cpu / int4_linear_cpu / dequantize_int4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from offload_engine.experts.formats import int_weight

# --------------------------------------------------------------------------
# int8, per output channel (symmetric)
# --------------------------------------------------------------------------


def quantize_int8_per_channel(w: torch.Tensor):
    """w [N, K] (any float dtype) -> (q int8 [N, K], scales bf16 [N]): the engine's own quantizer
    (offload_engine/experts/formats/int_weight.py), so the kernels are timed on what the engine holds.
    Plain row-major int8, the same bytes on every device (``_weight_int8pack_mm`` takes it as is)."""
    return int_weight.quantize_int8(w.float(), torch.bfloat16)


def int8_expert_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [T, N] = x [T, K] @ (q * scales[:, None]).T via aten._weight_int8pack_mm.

    Signature: _weight_int8pack_mm(self [T,K] bf16|f16|f32 contiguous,
    mat2 [N,K] int8, scales [N] of the SAME dtype as self) -> [T,N] self.dtype.
    (bf16 x with fp32 scales raises "expected scalar type BFloat16 but found Float".)
    """
    return torch.ops.aten._weight_int8pack_mm(x, q, scales)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """[N, K] weight = q * scales[:, None], in ``dtype``."""
    return (q.to(dtype) * scales.to(dtype)[:, None])


# --------------------------------------------------------------------------
# int4, groupwise along K (asymmetric, "tinygemm" convention)
# --------------------------------------------------------------------------


def quantize_int4_groupwise(w: torch.Tensor, group: int):
    """w [N, K] -> (q uint8 [N, K] values 0..15, scales_and_zeros bf16 [K/group, N, 2]): the engine's own
    quantizer (int_weight.quantize_int4). Dequantization, what both aten int4 kernels compute (CPU and CUDA):
    w ~= (q - 8) * scale + zero, with scale = (max - min) / 15 and zero = min + 8 * scale per group."""
    return int_weight.quantize_int4(w.float(), group, torch.bfloat16)


def pack_int4_plain(q: torch.Tensor) -> torch.Tensor:
    """q uint8/int [N, K] (0..15) -> uint8 [N, K/2], byte j of row n =
    (q[n, 2j] << 4) | q[n, 2j+1]   (even k in the HIGH nibble).

    This is the storable, device-independent form, and it is exactly the input
    that CUDA's aten._convert_weight_to_int4pack(uint8 [N, K/2], innerKTiles) wants.
    """
    q = q.to(torch.uint8)
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def unpack_int4_plain(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_plain: uint8 [N, K/2] -> uint8 [N, K] (0..15)."""
    hi = p >> 4
    lo = p & 0xF
    return torch.stack([hi, lo], dim=-1).reshape(p.shape[0], p.shape[1] * 2)


def int4_pack_for_cpu(q: torch.Tensor, inner_k_tiles: int = 2) -> torch.Tensor:
    """q [N, K] values 0..15 -> the CPU kernel's packed weight (uint8 [N, K/2]).

    aten._convert_weight_to_int4pack_for_cpu(self int32 [N, K] (0..15, kInt
    required; uint8 is refused), innerKTiles int) -> uint8 [N, K/2].
    innerKTiles is accepted but unused on CPU.  The byte order is NOT plain: it
    depends on the CPU capability the kernel was dispatched for
    (ATEN_CPU_CAPABILITY).  AVX-512: rows in blocks of 64, block b is
    [K, 32] bytes, byte (k, d<16) = q[64b+32+d, k] << 4 | q[64b+d, k],
    byte (k, 16+d) = q[64b+48+d, k] << 4 | q[64b+16+d, k]; AVX2: blocks of 32,
    byte (k, d) = q[32b+16+d, k] << 4 | q[32b+d, k]; a partial last block pairs
    adjacent rows.  So: store pack_int4_plain bytes, repack at load.
    """
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), inner_k_tiles)


def model_cpu_pack(q: torch.Tensor, capability: str | None = None) -> torch.Tensor:
    """Python model of _convert_weight_to_int4pack_for_cpu's byte order (see
    int4_pack_for_cpu), for capability AVX512 / AVX2 / anything else (DEFAULT)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    q = q.to(torch.uint8)
    N, K = q.shape
    bn = {"AVX512": 64, "AVX2": 32}.get(capability, 32)
    out = torch.empty(N, K // 2, dtype=torch.uint8)
    flat = out.view(-1)
    for b0 in range(0, N, bn):
        nb = min(bn, N - b0)
        blk = q[b0:b0 + nb].T  # [K, nb]
        if nb == bn and capability == "AVX512":
            dst = torch.cat([(blk[:, 32:48] << 4) | blk[:, 0:16], (blk[:, 48:64] << 4) | blk[:, 16:32]], 1)
        elif nb == bn and capability == "AVX2":
            dst = (blk[:, 16:32] << 4) | blk[:, 0:16]
        else:
            dst = (blk[:, 1::2] << 4) | blk[:, 0::2]
        flat[b0 * K // 2:(b0 + nb) * K // 2] = dst.reshape(-1)
    return out


def int4_linear_cpu(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """y [T, N] = x [T, K] @ dequantize_int4(...).T via aten._weight_int4pack_mm_for_cpu.

    Signature: _weight_int4pack_mm_for_cpu(self [T,K] bf16|f16|f32, mat2 packed
    uint8 [N, K/2] from int4_pack_for_cpu, qGroupSize int (32/64/128/256),
    qScaleAndZeros [K/group, N, 2] of self's dtype) -> [T, N] self.dtype.
    """
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group: int, dtype=torch.bfloat16) -> torch.Tensor:
    """q [N, K] (0..15), sz [K/g, N, 2] -> [N, K] = (q - 8) * scale + zero, in dtype."""
    N, K = q.shape
    s = sz[..., 0].transpose(0, 1).to(dtype)[..., None]   # [N, K/g, 1]
    z = sz[..., 1].transpose(0, 1).to(dtype)[..., None]
    w = (q.reshape(N, K // group, group).to(dtype) - 8) * s + z
    return w.reshape(N, K)


def dequantize_int4_plain(p: torch.Tensor, sz: torch.Tensor, group: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Dequantize straight from the stored pack_int4_plain bytes (per-call path)."""
    return dequantize_int4(unpack_int4_plain(p), sz, group, dtype)


# --------------------------------------------------------------------------
# the expert
# --------------------------------------------------------------------------


def expert(x, lin_gu, lin_d):
    h = lin_gu(x)
    I = h.shape[-1] // 2
    return lin_d(F.silu(h[:, :I]) * h[:, I:])


SHAPES = {"qwen3-30b-a3b": (2048, 768)}


def small_shape():
    cfg = json.loads((Path(__file__).resolve().parents[1] / "offload_engine/default_model/config.json").read_text())
    return cfg["hidden_size"], cfg["moe_intermediate_size"]


def rel_err(a, b):
    a = a.float(); b = b.float()
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def make_candidates(H, I, groups, with_tao, n_experts=1):
    """n_experts > 1: each candidate cycles over that many distinct experts, so
    with enough of them the weights come from RAM, not from the caches."""
    per = []
    for e in range(n_experts):
        torch.manual_seed(e)
        gu = (torch.randn(2 * I, H) * 0.02).to(torch.bfloat16)
        dn = (torch.randn(H, I) * 0.02).to(torch.bfloat16)
        per.append(_candidates_for(gu, dn, groups, with_tao and e == 0 and n_experts == 1, e == 0))
    cands0, errs, checks = per[0]

    def cycler(fns):
        state = [0]

        def f(x):
            i = state[0]
            state[0] = (i + 1) % len(fns)
            return fns[i](x)
        return f
    cands = {n: (cycler([p[0][n] for p in per]) if n_experts > 1 else cands0[n]) for n in cands0}
    return cands, errs, checks


def _candidates_for(gu, dn, groups, with_tao, do_checks):
    cands, errs = {}, {}
    cands["bf16"] = (lambda x: expert(x, lambda t: F.linear(t, gu), lambda t: F.linear(t, dn)))

    q1, s1 = quantize_int8_per_channel(gu)
    q2, s2 = quantize_int8_per_channel(dn)
    errs["int8/ch"] = (rel_err(dequantize_int8(q1, s1, torch.float32), gu),
                       rel_err(dequantize_int8(q2, s2, torch.float32), dn))
    cands["i8mm"] = (lambda x: expert(x, lambda t: int8_expert_linear(t, q1, s1),
                                      lambda t: int8_expert_linear(t, q2, s2)))
    cands["i8deq"] = (lambda x: expert(x, lambda t: F.linear(t, dequantize_int8(q1, s1)),
                                       lambda t: F.linear(t, dequantize_int8(q2, s2))))
    checks = {}
    for g in groups:
        if gu.shape[1] % g or dn.shape[1] % g:
            continue
        a1, z1 = quantize_int4_groupwise(gu, g)
        a2, z2 = quantize_int4_groupwise(dn, g)
        p1, p2 = int4_pack_for_cpu(a1), int4_pack_for_cpu(a2)
        st1, st2 = pack_int4_plain(a1), pack_int4_plain(a2)
        assert torch.equal(unpack_int4_plain(st1), a1)
        errs[f"int4/g{g}"] = (rel_err(dequantize_int4(a1, z1, g, torch.float32), gu),
                              rel_err(dequantize_int4(a2, z2, g, torch.float32), dn))
        cands[f"i4mm-g{g}"] = (lambda x, p1=p1, p2=p2, z1=z1, z2=z2, g=g: expert(
            x, lambda t: int4_linear_cpu(t, p1, g, z1), lambda t: int4_linear_cpu(t, p2, g, z2)))
        cands[f"i4deq-g{g}"] = (lambda x, st1=st1, st2=st2, z1=z1, z2=z2, g=g: expert(
            x, lambda t: F.linear(t, dequantize_int4_plain(st1, z1, g)),
            lambda t: F.linear(t, dequantize_int4_plain(st2, z2, g))))
        if not do_checks:
            continue
        # kernel vs an fp32 dequantize-then-matmul twin
        xt = torch.randn(16, gu.shape[1]).to(torch.bfloat16)
        ref = xt.float() @ dequantize_int4(a1, z1, g, torch.float32).T
        checks[f"cpu pack == model_cpu_pack ({torch.backends.cpu.get_cpu_capability()}), g{g}"] = float(
            not (torch.equal(p1, model_cpu_pack(a1)) and torch.equal(p2, model_cpu_pack(a2))))
        checks[f"i4mm-g{g} vs fp32 twin"] = rel_err(int4_linear_cpu(xt, p1, g, z1), ref)
        alt = xt.float() @ (a1.float() * z1[..., 0].T.float().repeat_interleave(g, 1)
                            + z1[..., 1].T.float().repeat_interleave(g, 1)).T
        checks[f"i4mm-g{g} vs q*scale+zero (wrong formula)"] = rel_err(int4_linear_cpu(xt, p1, g, z1), alt)
    if not do_checks:
        return cands, errs, checks
    H = gu.shape[1]
    xt = torch.randn(16, H).to(torch.bfloat16)
    checks["i8mm vs fp32 twin"] = rel_err(int8_expert_linear(xt, q1, s1),
                                          xt.float() @ dequantize_int8(q1, s1, torch.float32).T)
    checks["bf16 F.linear vs fp32"] = rel_err(F.linear(xt, gu), xt.float() @ gu.float().T)
    if with_tao:
        cands.update(tao_candidates(gu, dn, groups, errs))
    return cands, errs, checks


def tao_candidates(gu, dn, groups, errs):
    out = {}
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_, Int8WeightOnlyConfig
    except Exception as e:  # pragma: no cover
        print(f"# torchao unusable: {type(e).__name__}: {e}")
        return out

    def lin(w):
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        m.weight.data.copy_(w)
        return m

    try:
        m1, m2 = lin(gu), lin(dn)
        quantize_(m1, Int8WeightOnlyConfig()); quantize_(m2, Int8WeightOnlyConfig())
        with torch.no_grad():
            out["tao-i8wo"] = (lambda x: expert(x, m1, m2))
            out["tao-i8wo"](torch.randn(1, gu.shape[1]).to(torch.bfloat16))
    except Exception as e:
        out.pop("tao-i8wo", None)
        print(f"# torchao Int8WeightOnlyConfig failed: {type(e).__name__}: {str(e)[:200]}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        g = 128 if 128 in groups else groups[-1]
        errs_fmt = []
        for fmt in ("opaque", "plain", "plain_int32", "tile_packed_to_4d"):
            try:
                m3, m4 = lin(gu), lin(dn)
                cfg = Int4WeightOnlyConfig(group_size=g, int4_packing_format=fmt)
                quantize_(m3, cfg); quantize_(m4, cfg)
                with torch.no_grad():
                    expert(torch.randn(1, gu.shape[1]).to(torch.bfloat16), m3, m4)
                break
            except Exception as e:
                errs_fmt.append(f"{fmt}: {type(e).__name__}: {str(e)[:120]}")
        else:
            raise RuntimeError(" | ".join(errs_fmt))
        out[f"tao-i4wo-g{g}"] = (lambda x: expert(x, m3, m4))
        out[f"tao-i4wo-g{g}"](torch.randn(1, gu.shape[1]).to(torch.bfloat16))
    except Exception as e:
        out = {k: v for k, v in out.items() if not k.startswith("tao-i4")}
        print(f"# torchao Int4WeightOnlyConfig failed: {type(e).__name__}: {str(e)[:600]}")
    return out


def bench(cands, x, rounds, target_s):
    """Interleaved: each round runs every candidate for ~target_s; median of rounds."""
    names = list(cands)
    with torch.no_grad():
        reps = {}
        for n in names:  # warm-up + calibration
            f = cands[n]
            for _ in range(3):
                f(x)
            t0 = time.perf_counter(); f(x); dt = time.perf_counter() - t0
            reps[n] = max(3, min(2000, int(target_s / max(dt, 1e-7))))
        res = {n: [] for n in names}
        for _ in range(rounds):
            for n in names:
                f = cands[n]; r = reps[n]
                t0 = time.perf_counter()
                for _ in range(r):
                    f(x)
                res[n].append((time.perf_counter() - t0) / r * 1e6)
    return {n: statistics.median(v) for n, v in res.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shape", nargs="+", default=["qwen3-30b-a3b", "small"],
                    help="qwen3-30b-a3b, small (from default_model/config.json) or HxI")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--target-ms", type=float, default=10.0, help="time per candidate per round")
    ap.add_argument("--experts", type=int, default=1,
                    help="cycle over this many distinct experts (16 x 9.4 MB bf16 > 32 MB L3: cold weights); torchao only with 1")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="candidate names to keep")
    args = ap.parse_args()

    print(f"# torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"loadavg {os.getloadavg()}")
    for shape in args.shape:
        if shape == "small":
            H, I = small_shape()
        elif shape in SHAPES:
            H, I = SHAPES[shape]
        else:
            H, I = map(int, shape.split("x"))
        cands, errs, checks = make_candidates(H, I, args.groups, not args.no_torchao, args.experts)
        if args.only:
            cands = {k: v for k, v in cands.items() if k in args.only}
        print(f"\n## {shape}: H={H} I={I}  (gate_up [{2*I},{H}], down [{H},{I}]), "
              f"cycling over {args.experts} distinct expert(s)")
        print("# round-trip rel. Frobenius error vs bf16 weight, N(0,0.02): (gate_up, down)")
        for k, (e1, e2) in errs.items():
            print(f"#   {k:10s} {e1:.4f} {e2:.4f}")
        print("# kernel checks (rel. error of kernel output vs fp32 reference; pack check: 0 = identical):")
        for k, v in checks.items():
            print(f"#   {k:40s} {v:.2e}")
        names = list(cands)
        print("# us per expert call (gate_up + SiLU*up + down), median of rounds")
        print(f"{'thr':>3} {'T':>3} " + " ".join(f"{n:>10}" for n in names))
        for thr in args.threads:
            torch.set_num_threads(thr)
            for T in args.tokens:
                x = torch.randn(T, H).to(torch.bfloat16)
                r = bench(cands, x, args.rounds, args.target_ms / 1e3)
                print(f"{thr:>3} {T:>3} " + " ".join(f"{r[n]:10.1f}" for n in names), flush=True)
    print(f"# loadavg at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
