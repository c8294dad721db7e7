"""pdmp-optim: Performance-Dominant Modality Prioritization as a drop-in PyTorch optimizer wrapper.

>>> from pdmp_optim import PDMPOptimizer, rank_modalities
>>> rank_modalities({"audio": [0.55, 0.62], "visual": [0.35, 0.71]}).performance_dominant
'visual'
"""

from .analysis import analyze_modalities, unimodal_histories
from .backward import EncoderGradScaling, scale_encoder_grads
from .coefficients import pdmp_gammas
from .diagnostics import logit_ratio, modality_grad_norms
from .modes import is_scale_invariant, resolve_mode
from .optimizer import PDMPOptimizer
from .ranking import ModalityRanking, rank_modalities

__version__ = "0.1.0"

__all__ = [
    "EncoderGradScaling",
    "ModalityRanking",
    "PDMPOptimizer",
    "__version__",
    "analyze_modalities",
    "is_scale_invariant",
    "logit_ratio",
    "modality_grad_norms",
    "pdmp_gammas",
    "rank_modalities",
    "resolve_mode",
    "scale_encoder_grads",
    "unimodal_histories",
]
