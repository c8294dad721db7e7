"""Kept for imports written before 0.3: the ranking lives in :mod:`pdmp_optim.analysis.ranking`;
``from pdmp_optim.ranking import ModalityRanking, PremiseCheck, rank_modalities`` keeps working."""

from .analysis.ranking import ModalityRanking, PremiseCheck, rank_modalities

__all__ = ["ModalityRanking", "PremiseCheck", "rank_modalities"]
