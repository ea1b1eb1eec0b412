"""Small timm-registered models for the survey tests: a healthy one and ones that fail on purpose.

Imported by tests/test_survey.py (and by Ray workers through PYTHONPATH), registering the models
with timm as a user's plugin module would.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


class TinyNet(nn.Module):
    """conv - relu - strided conv - pool - linear: two measured stages."""

    def __init__(self, num_classes: int = 10, fail: str = "", max_forward_batch: int = 0, **_):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, num_classes)
        self.fail = fail
        self.max_forward_batch = max_forward_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_forward_batch and x.shape[0] > self.max_forward_batch:
            # what a device that cannot hold the stacked batch raises
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (test model: forward batch {x.shape[0]} > "
                f"{self.max_forward_batch})"
            )
        if self.fail == "raise":
            raise RuntimeError("test model: this architecture is broken on purpose")
        dark = x.mean((1, 2, 3)) < -0.5  # of the first four samples, the fourth (all crops)
        x = torch.relu(self.conv1(x))
        if self.fail == "nan":
            x = x * float("nan")
        if self.fail == "nan_dark":
            x = torch.where(dark[:, None, None, None], float("nan"), x)
        x = self.conv2(x)
        return self.head(x.mean((2, 3)))


@register_model
def eqtest_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    return TinyNet(**kwargs)


@register_model
def eqtest_tiny_b(pretrained: bool = False, **kwargs) -> nn.Module:
    """Another healthy model (a second name for surveys of two models)."""
    return TinyNet(**kwargs)


@register_model
def eqtest_raises(pretrained: bool = False, **kwargs) -> nn.Module:
    return TinyNet(fail="raise", **kwargs)


@register_model
def eqtest_nan(pretrained: bool = False, **kwargs) -> nn.Module:
    return TinyNet(fail="nan", **kwargs)


@register_model
def eqtest_nan_dark(pretrained: bool = False, **kwargs) -> nn.Module:
    """NaN features for dark images only: the fourth sample photo, of the first four."""
    return TinyNet(fail="nan_dark", **kwargs)


@register_model
def eqtest_oom_above_4(pretrained: bool = False, **kwargs) -> nn.Module:
    """Out of memory for forward batches above 4 images: fits at batch 4 with one block of images
    per forward (the identity block alone, then one element at a time)."""
    return TinyNet(max_forward_batch=4, **kwargs)


@register_model
def eqtest_oom_always(pretrained: bool = False, **kwargs) -> nn.Module:
    return TinyNet(max_forward_batch=1, **kwargs)


class _CastsToBfloat16(TinyNet):
    """Weights in bfloat16, and its input cast to them in its forward: it fails in float32, so
    the ``align="auto"`` probe runs in bfloat16 and can only estimate the grid offsets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.bfloat16)).float()


@register_model
def eqtest_bf16_cast(pretrained: bool = False, **kwargs) -> nn.Module:
    return _CastsToBfloat16(**kwargs).to(torch.bfloat16)
