"""pdmp-optim: Performance-Dominant Modality Prioritization as a drop-in PyTorch optimizer wrapper.

>>> from pdmp_optim import PDMPOptimizer, rank_modalities
>>> rank_modalities({"audio": [0.55, 0.62], "visual": [0.35, 0.71]}).performance_dominant
'visual'

Day-one names live here; helpers live in their submodules: :mod:`pdmp_optim.modes` (how a coefficient is
applied), :mod:`pdmp_optim.diagnostics` (``logit_ratio``, ``modality_grad_norms``), :mod:`pdmp_optim.analysis`
(``unimodal_histories``), :mod:`pdmp_optim.backward` (``EncoderGradScaling``) and :mod:`pdmp_optim.reference`
(the slow, obviously right twin the tests compare against).
"""

from .analysis import ModalityRanking, analyze_modalities, rank_modalities
from .backward import scale_encoder_grads
from .coefficients import pdmp_gammas
from .optimizer import PDMPOptimizer

__version__ = "0.3.0"

__all__ = ["ModalityRanking", "PDMPOptimizer", "__version__", "analyze_modalities", "pdmp_gammas", "rank_modalities",
           "scale_encoder_grads"]  # fmt: skip
