"""Neural ODEs on a DG(0) time mesh: lift -> explicit-Euler field -> head, with the
DG(0)-consistent regulariser, and torchdiffeq evaluation of the same controls."""

from .model import LOSSES, LinearField, NeuralODE, NeuralODEProblem, make_field
from .regularizer import DG0Regularizer, JumpPenalty

__all__ = [
    "LOSSES",
    "DG0Regularizer",
    "JumpPenalty",
    "LinearField",
    "NeuralODE",
    "NeuralODEProblem",
    "make_field",
]
