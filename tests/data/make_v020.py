"""Write ``v020_checkpoints.pt``: checkpoints that pdmp-optim 0.2.0 saved, for the tests that load them.

Run with the 0.2.0 package first on the path (its ``PDMPOptimizer`` writes them), from the repository root::

    PYTHONPATH=/path/to/pdmp-optim-0.2.0 python tests/data/make_v020.py

For each case (SGD and AdamW, grad and lr mode) the file holds the model and optimizer state dicts after two steps
with gammas ``{"audio": 0.5, "visual": 3.0}``, and the model's parameters after two more steps of the same run.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
GAMMAS = {"audio": 0.5, "visual": 3.0}
CASES = {
    "sgd-grad": ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}, "grad"),
    "sgd-lr": ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}, "lr"),
    "adamw-grad": ("AdamW", {"lr": 1e-2}, "grad"),
    "adamw-lr": ("AdamW", {"lr": 1e-2}, "lr"),
}


def main() -> None:
    import torch

    import pdmp_optim
    import pdmp_optim.reference

    if pdmp_optim.__version__ != "0.2.0" or hasattr(pdmp_optim.reference, "PDMPReference"):
        sys.exit(f"run this with pdmp-optim 0.2.0 on PYTHONPATH, not {pdmp_optim.__file__}")
    pdmp_optim.reference.PDMPReference = None  # type: ignore[attr-defined]  # _helpers imports it; 0.2.0 has none
    sys.path.insert(0, str(HERE.parent))
    from _helpers import TwoModal, loss_of

    out = {}
    for name, (optimizer, settings, mode) in CASES.items():
        model = TwoModal()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mode="grad" with AdamW warns
            opt = pdmp_optim.PDMPOptimizer(
                getattr(torch.optim, optimizer)(model.trained(), **settings), model.groups(), gammas=GAMMAS, mode=mode
            )
        for step in range(4):
            if step == 2:
                saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
            loss_of(model, step).backward()
            opt.step()
            opt.zero_grad()
        out[name] = {**saved, "after": copy.deepcopy(model.state_dict())}
    torch.save(out, HERE / "v020_checkpoints.pt")
    print(f"wrote {HERE / 'v020_checkpoints.pt'}: {', '.join(out)}")


if __name__ == "__main__":
    main()
