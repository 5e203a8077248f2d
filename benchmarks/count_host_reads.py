"""The engine's reads of the device per decode step, per configuration, on the bundled model.

A read is anything that would make the host wait for a GPU: `.tolist()`, `.cpu()`, `.item()`, `bool()`, a
data-dependent shape (`torch.where(mask)`, `unique`, `nonzero`) of a tensor the model computed, from the
engine's own code (the detector of tests/device_reads.py, under a TorchFunctionMode; on this CPU a read costs
nothing, on CUDA each is a synchronisation). Counted over the decode steps of a generation (prefill excluded).
Runs against whatever `offload_engine` imports, so an older checkout counts too:

    python benchmarks/count_host_reads.py
    PYTHONPATH=../base python benchmarks/count_host_reads.py      # a checkout of an earlier commit
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CONFIGS = [  # (name, engine settings)
    ("lru, all resident", dict(policy="lru")),
    ("lru, 24 slots", dict(policy="lru", expert_slots=24)),
    ("predictive + next-gate, 24 slots", dict(policy="predictive", predictor="next-gate", expert_slots=24)),
    ("predictive + history, 24 slots", dict(policy="predictive", predictor="history", expert_slots=24)),
    ("predictive + learned, 24 slots", dict(policy="predictive", predictor="learned", expert_slots=24)),
    ("lru, --cold-experts cpu, 24 slots", dict(policy="lru", cold_experts="cpu", expert_slots=24)),
    ("predictive + next-gate, auto, 24 slots", dict(policy="predictive", predictor="next-gate", cold_experts="auto",
                                                    expert_slots=24)),
    ("lru, 5 slots, batch 2 (split calls)", dict(policy="lru", expert_slots=5, max_batch=2)),
]


def main() -> None:
    import offload_engine
    from device_reads import counting_reads
    from offload_engine import DEFAULT_MODEL, OffloadEngine

    tokens = 9
    print(f"engine: {Path(offload_engine.__file__).parent}")
    print(f"{'configuration':<42} {'reads/step':>10} {'of which read_to_host':>22}   stray reads by place")
    for name, settings in CONFIGS:
        batch = settings.get("max_batch", 1)
        prompts = ["The history of", "import os"][:batch] if batch > 1 else "The history of"
        engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, progress=False, **settings)
        # prefill alone, then prefill + decode: the difference is the decode steps'
        counts = []
        for n in (1, tokens):
            with counting_reads() as mode:
                engine.generate(prompts, max_new_tokens=n, ignore_eos=True)
            counts.append((mode.reads, Counter(place.rsplit(":", 1)[0] for place in mode.stray)))
        engine.close()
        (reads1, stray1), (reads9, stray9) = counts
        steps = tokens - 1
        stray = stray9 - stray1
        total = (reads9 - reads1 + sum(stray.values())) / steps
        places = ", ".join(f"{k} {v / steps:.1f}" for k, v in stray.most_common())
        print(f"{name:<42} {total:10.1f} {(reads9 - reads1) / steps:22.1f}   {places}")


if __name__ == "__main__":
    main()
