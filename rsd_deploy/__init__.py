"""rsd-deploy: train CNNs with Restructured Self-Distillation, ship them as plain networks."""

from .blocks import Affine2d, ConvBN, Reparameterizable, RSDConv, conv_block, set_branch_drop
from .errors import RSDError
from .fuse import fuse_model
from .restructure import RestructureReport, restructure

__version__ = "0.1.0"

__all__ = [
    "Affine2d",
    "ConvBN",
    "RSDConv",
    "RSDError",
    "Reparameterizable",
    "RestructureReport",
    "__version__",
    "conv_block",
    "fuse_model",
    "restructure",
    "set_branch_drop",
]
