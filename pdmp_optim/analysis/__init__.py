"""Stage 1 of PDMP, apart from the optimizer: find the performance- and optimization-dominant modalities.

Hand :func:`analyze_modalities` your encoders and your data; for each modality it trains a deep copy of the
encoder with a fresh linear head, scores it after every epoch, and ranks the modalities with
:func:`~pdmp_optim.rank_modalities`. Its result plugs straight into ``PDMPOptimizer(..., ranking=...)``.
Classification, regression and multi-label tasks are built in (``task=``); samples that lack a modality are left
out of that modality's model.

>>> import torch
>>> from torch import nn
>>> from torch.nn.functional import one_hot
>>> g = torch.Generator().manual_seed(0)
>>> def batch(n=32):  # audio: loud but right only 70% of the time; visual: always right but faint (slow)
...     y = torch.randint(0, 4, (n,), generator=g)
...     shown = torch.where(torch.rand(n, generator=g) < 0.7, y, torch.randint(0, 4, (n,), generator=g))
...     audio = 4.0 * one_hot(shown, 4) + torch.randn(n, 4, generator=g)
...     visual = 0.2 * (2.0 * one_hot(y, 4) + 0.5 * torch.randn(n, 4, generator=g))
...     return {"audio": audio, "visual": visual}, y
>>> train, val = [batch() for _ in range(8)], [batch() for _ in range(4)]
>>> _ = torch.manual_seed(0)
>>> groups = {"audio": nn.Linear(4, 8), "visual": nn.Linear(4, 8)}
>>> sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
>>> ranking = analyze_modalities(groups, train, val, num_classes=4, epochs=6, seeds=3, optimizer=sgd)
>>> ranking.performance_dominant, ranking.optimization_dominant, ranking.agreement
('visual', 'audio', 1.0)
>>> ranking.gammas(gamma_p=15)  # what PDMPOptimizer(..., ranking=ranking) applies
{'visual': 15.0, 'audio': 0.06666666666666667}
>>> ranking.num_samples["visual"]  # what the scores rest on: training samples per epoch, evaluation samples
{'train': 256, 'eval': 128}

The modules: :mod:`~pdmp_optim.analysis.ranking` (:func:`~pdmp_optim.rank_modalities`, for scores of unimodal
models you trained yourself, :class:`~pdmp_optim.ModalityRanking`, and :class:`PremiseCheck`, the answer of
``ModalityRanking.check_premise``), :mod:`~pdmp_optim.analysis.probes` (:func:`analyze_modalities`,
:func:`unimodal_histories`) and :mod:`~pdmp_optim.analysis.tasks` (the built-in tasks and their metrics). Every
name is importable from here.
"""

from .probes import analyze_modalities, unimodal_histories
from .ranking import ModalityRanking, PremiseCheck, rank_modalities
from .tasks import accuracy, mean_absolute_error, mean_average_precision

__all__ = ["ModalityRanking", "PremiseCheck", "accuracy", "analyze_modalities", "mean_absolute_error",
           "mean_average_precision", "rank_modalities", "unimodal_histories"]  # fmt: skip
