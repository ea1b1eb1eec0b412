"""The whole measurement on a GPU (marker ``cuda``: skipped without one, run by ``make gpu-check``).

The kernels have their own CUDA tests (test_kernels.py); these check the engine's GPU path end to
end: the same numbers as on the CPU in float32, the default bf16 autocast + channels_last path
close to the float32 one, the naive oracle on the same device, and a survey that picks the GPU.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import equifast
from equifast import naive

pytestmark = pytest.mark.cuda

KEYS = ["layer", "element", "comparison", "metric"]
SETTINGS = dict(group="translate:8,16", input_size=(64, 64), limit=6, batch_size=3, bootstrap=0,
                progress=False)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    return timm.create_model(name, **kwargs).eval()


@pytest.fixture
def no_tf32():
    """True float32 convolutions and matmuls for the duration of a test.

    With TF32 (cuDNN's default for convolutions) the engine's stacked forward and the naive
    loop's per-element forwards pick different algorithms and round differently (about 5e-4 in
    corr on resnet10t's deep layers, seen on an H200): that is the model's arithmetic, not the
    measurement's, so the engine-against-naive comparison turns it off.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _corr(result) -> np.ndarray:
    frame = result.frame[result.frame.metric == "corr"].sort_values(KEYS)
    return frame["value"].to_numpy()


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224", "convnext_atto"])
def test_gpu_float32_equals_cpu(name):
    model = _model(name)
    cpu = equifast.measure(model, "samples", device="cpu", **SETTINGS)
    gpu = equifast.measure(model, "samples", device="cuda", dtype=torch.float32,
                           channels_last=False, **SETTINGS)
    assert gpu.config["device"].startswith("cuda") and gpu.config["backend"] == "compiled"
    # TF32 may be on for convolutions and matmuls: compare at its precision.
    np.testing.assert_allclose(_corr(gpu), _corr(cpu), atol=2e-3, equal_nan=True)


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224"])
def test_gpu_default_bf16_close_to_float32_and_to_naive(name, no_tf32):
    model = _model(name)
    full = equifast.measure(model, "samples", device="cuda", dtype=torch.float32,
                            channels_last=False, **SETTINGS)
    fast = equifast.measure(model, "samples", device="cuda", **SETTINGS)
    assert fast.config["dtype"] == "bfloat16-autocast"
    # bf16 keeps 8 bits of mantissa: scores near 1 move by about 1e-2 at most.
    np.testing.assert_allclose(_corr(fast), _corr(full), atol=3e-2, equal_nan=True)
    oracle = naive.measure(model, "samples", device="cuda", dtype=torch.float32,
                           channels_last=False, **SETTINGS)
    np.testing.assert_allclose(_corr(full), _corr(oracle), atol=1e-4, equal_nan=True)


def test_out_of_memory_on_the_gpu_shrinks_the_chunk(monkeypatch):
    model = _model("resnet10t")
    calls = {"forwards": 0}
    original = model.forward

    def forward(images):
        calls["forwards"] += 1
        if images.shape[0] > 2 * SETTINGS["batch_size"]:
            raise torch.cuda.OutOfMemoryError("test: pretend the stacked batch does not fit")
        return original(images)

    monkeypatch.setattr(model, "forward", forward)
    with pytest.warns(UserWarning, match="out of memory"):
        result = equifast.measure(model, "samples", device="cuda", dtype=torch.float32,
                                  **SETTINGS)
    assert result.config["elements_per_chunk"] == 1
    reference = equifast.measure(_model("resnet10t"), "samples", device="cuda",
                                 dtype=torch.float32, elements_per_chunk=1, **SETTINGS)
    np.testing.assert_allclose(_corr(result), _corr(reference), atol=1e-6, equal_nan=True)


def test_survey_runs_on_the_gpu_by_default(tmp_path):
    from equifast.survey import open_store, run_survey

    summary = run_survey(["resnet10t"], "samples", tmp_path / "s.sqlite", group="translate:8",
                         limit=4, input_size=(64, 64), bootstrap=10, progress=False, log=None)
    assert summary.done == ["resnet10t"]
    with open_store(tmp_path / "s.sqlite") as store:
        assert store.runs.loc[0, "device"].startswith("cuda")
        assert store.environments.loc[0, "device"].startswith("cuda")


def test_gpu_folder_of_images_equals_cpu(tmp_path, no_tf32):
    """Folder loader on a GPU (pinned batches, several of them, with labels): the CPU's numbers."""
    from equifast.data.samples import load_sample_image

    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"]):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        load_sample_image(name).convert("RGB").resize((96, 80)).save(folder / f"{name}.png")
    model = _model("resnet10t")
    kwargs = dict(group="translate:8", input_size=(64, 64), batch_size=2, num_workers=0,
                  loader="folder", progress=False, bootstrap=0)
    cpu = equifast.measure(model, tmp_path, device="cpu", **kwargs)
    gpu = equifast.measure(model, tmp_path, device="cuda", dtype=torch.float32,
                           channels_last=False, **kwargs)
    assert gpu.config["loader"] == "folder" and gpu.config["images"] == 5
    np.testing.assert_allclose(_corr(gpu), _corr(cpu), atol=1e-4, equal_nan=True)
    pd.testing.assert_frame_equal(gpu.model_frame, cpu.model_frame)
