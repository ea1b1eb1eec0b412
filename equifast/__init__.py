"""equifast: measure the learned equivariance of image models, layer by layer.

Example:
    >>> import equifast
    >>> result = equifast.measure("resnet18", "samples", group="translate:8,16")  # doctest: +SKIP
    >>> print(result.format_summary())                                            # doctest: +SKIP
"""

from .arguments import UnnormalizedImagesWarning
from .data.folder import SkippedFilesWarning
from .engine import measure
from .groups import Element, Flip, Group, Rotation, Translation, parse_group
from .lie import LieResult, lie_derivative
from .result import Result
from .scores import METRICS
from .survey import open_store, run_survey

__all__ = [
    "Element",
    "Flip",
    "Group",
    "LieResult",
    "METRICS",
    "Result",
    "Rotation",
    "SkippedFilesWarning",
    "Translation",
    "UnnormalizedImagesWarning",
    "lie_derivative",
    "measure",
    "open_store",
    "parse_group",
    "run_survey",
]
__version__ = "0.1.0"
