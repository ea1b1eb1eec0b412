"""equifast: measure the learned equivariance of image models, layer by layer.

Example:
    >>> import equifast
    >>> result = equifast.measure("resnet18", "samples", group="translate:8,16")  # doctest: +SKIP
    >>> print(result.format_summary())                                            # doctest: +SKIP
"""

from .engine import measure
from .groups import Element, Flip, Group, Rotation, Translation, parse_group
from .result import Result
from .scores import METRICS

__all__ = [
    "Element",
    "Flip",
    "Group",
    "METRICS",
    "Result",
    "Rotation",
    "Translation",
    "measure",
    "parse_group",
]
__version__ = "0.1.0"
