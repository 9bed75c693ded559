"""Stage dynamics: network layers, vector fields, the DG(0) time mesh and explicit Euler."""

from .activations import ACTIVATIONS, activation
from .fields import ActivationField, AntisymmetricField, VectorField
from .layers import Conv2d, Dense, Flatten, LinearQuadratic, Residual, ZeroPad
from .mesh import EulerStage, TimeMesh, euler_stages

__all__ = [
    "ACTIVATIONS",
    "ActivationField",
    "AntisymmetricField",
    "Conv2d",
    "Dense",
    "EulerStage",
    "Flatten",
    "LinearQuadratic",
    "Residual",
    "TimeMesh",
    "VectorField",
    "ZeroPad",
    "activation",
    "euler_stages",
]
