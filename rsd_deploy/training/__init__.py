"""RSD and baseline training: the step, the loop, recipes, resume state, DDP.

``train(TrainConfig(...)) -> run_dir`` is the whole thing; the ``rsd-deploy train``
and ``rsd-deploy eval`` commands are thin layers over it.
"""

from .config import TrainConfig, load_recipe
from .loop import evaluate, resume_config, train
from .rsd import LOSS_TERMS, CEStep, MixDraw, RSDObjective, RSDStep, StepOutput, feature_mixture

__all__ = [
    "LOSS_TERMS",
    "CEStep",
    "MixDraw",
    "RSDObjective",
    "RSDStep",
    "StepOutput",
    "TrainConfig",
    "evaluate",
    "feature_mixture",
    "load_recipe",
    "resume_config",
    "train",
]
