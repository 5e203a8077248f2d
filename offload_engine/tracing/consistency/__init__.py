"""Local routing consistency of a routing trace: SRP, SCH, its companion LRU/LFU/Belady hit rates (under SCH's
rules, not the engine's cache: see sch_simulator.py) and specialisation.

Every function takes a loaded `offload_engine.tracing.trace_file.RoutingTrace` and returns a frozen dataclass.
"""

from .companion_rates import belady, lfu, lru
from .report import ConsistencyReport, consistency_report, format_report, plot_report, report_to_json
from .sch_simulator import HitRate, capacity_for_ratio, hit_rate, hit_rates
from .segment_cache import sch
from .specialisation import (
    DomainSpecialisation,
    LoadBalance,
    VocabularySpecialisation,
    domain_specialisation,
    expert_act_r,
    load_balance,
    vocabulary_specialisation,
)
from .srp import SrpResult, srp, srp_from_histogram, srp_histograms

__all__ = [
    "ConsistencyReport", "DomainSpecialisation", "HitRate", "LoadBalance", "SrpResult",
    "VocabularySpecialisation", "belady", "capacity_for_ratio", "consistency_report", "domain_specialisation",
    "expert_act_r", "format_report", "hit_rate", "hit_rates", "lfu", "load_balance", "lru", "plot_report", "report_to_json",
    "sch", "srp", "srp_from_histogram", "srp_histograms", "vocabulary_specialisation",
]
