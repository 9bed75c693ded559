"""Stage dynamics: network layers, vector fields, the DG(0) time mesh and explicit Euler."""

from .activations import ACTIVATION_MODULES, ACTIVATIONS, activation, activation_module
from .blocks import AffineModule, PadFeatures, ResidualBlock
from .fields import ActivationField, AntisymmetricField, VectorField
from .layers import Conv2d, Dense, Flatten, LinearQuadratic, Residual, ZeroPad, residual
from .mesh import EulerStage, TimeMesh, euler_stages

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_MODULES",
    "AffineModule",
    "PadFeatures",
    "ResidualBlock",
    "activation_module",
    "residual",
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
