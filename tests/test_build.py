"""The compiled extension is built, loads, and declares the operator schemas."""

import warnings

import pytest
import torch

from equifast import _ext

TRANSFORM_IMAGES_ARGS = [
    "src",
    "source_affines",
    "protocols",
    "margin_y",
    "margin_x",
    "out_h",
    "out_w",
    "mean",
    "std",
    "out_dtype",
    "channels_last",
]
EQUIVARIANCE_STATS_ARGS = [
    "feats",
    "source_affines",
    "wrap",
    "batch",
    "layout",
    "grid_h",
    "grid_w",
    "prefix",
    "subpixel",
    "with_inv",
    "with_chance",
    "reference",
    "disc",
]


def test_extension_loads():
    assert _ext.has_ops(), f"equifast._C did not load: {_ext.load_error()}"
    assert _ext.load_error() is None


def test_build_info():
    info = _ext.build_info()
    assert info["loaded"] is True
    assert "cpu" in info["backends"]
    assert set(info["backends"]) <= {"cpu", "cuda"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (
        f"equifast._C was built against torch {info['torch_version']} but torch "
        f"{torch.__version__} is installed: rebuild it"
    )
    assert info["compiler"]
    if "cuda" in info["backends"]:
        assert info["cuda_arch_list"], "a CUDA build must record its arch list"
        assert info["cuda_version"]
    else:
        assert info["cuda_arch_list"] == []
        assert info["cuda_version"] is None
    assert _ext.has_cuda() == ("cuda" in info["backends"])


@pytest.mark.parametrize(
    ("op_name", "arg_names"),
    [
        ("transform_images", TRANSFORM_IMAGES_ARGS),
        ("equivariance_stats", EQUIVARIANCE_STATS_ARGS),
        ("score_stats", ["stats", "channel_counts", "psnr_range"]),
    ],
)
def test_schema(op_name, arg_names):
    schema = getattr(torch.ops.equifast, op_name).default._schema
    assert schema.name == f"equifast::{op_name}"
    assert [arg.name for arg in schema.arguments] == arg_names
    assert len(schema.returns) == 1
    assert str(schema.returns[0].type) == "Tensor"


def test_schema_types():
    schema = torch.ops.equifast.transform_images.default._schema
    types = {arg.name: str(arg.type) for arg in schema.arguments}
    assert types["protocols"] == "List[int]"
    assert types["margin_y"] == "int"
    assert types["mean"] == "Optional[List[float]]"
    assert "ScalarType out_dtype" in str(schema)  # its arg.type prints as int
    schema = torch.ops.equifast.equivariance_stats.default._schema
    types = {arg.name: str(arg.type) for arg in schema.arguments}
    assert types["layout"] == "str"
    assert types["wrap"] == "List[int]"
    assert types["with_chance"] == "bool"
    assert types["reference"] == "Optional[Tensor]"
    assert types["disc"] == "Optional[List[float]]"


def test_has_kernel_unknown_op_is_false():
    assert _ext.has_kernel("no_such_op", "cpu") is False
    assert _ext.has_kernel("no_such_op", torch.device("cpu")) is False


def test_warn_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ext.warn_fallback("equivariance_stats", "cpu")
        _ext.warn_fallback("equivariance_stats", torch.device("cpu"))
        _ext.warn_fallback("equivariance_stats", "cuda:0")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 2, messages
    assert "pip install --no-build-isolation" in messages[0]
    assert "equivariance_stats" in messages[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_built_where_a_gpu_is():
    info = _ext.build_info()
    assert "cuda" in info["backends"], (
        "a GPU is visible but equifast._C has no CUDA backend: build with "
        "EQUIFAST_CUDA=1 CUDA_HOME=... TORCH_CUDA_ARCH_LIST=9.0 "
        "pip install --no-build-isolation -e ."
    )
