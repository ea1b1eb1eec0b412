"""Models by name: offline weights from the local caches only, preprocessing, clear name errors."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from equifast.data.geometry import Preprocess
from equifast.models import LoadedModel, UnknownModelError, from_module, load_model, preprocess_for


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: weights must come from the cache only."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """Point torch hub and the Hugging Face hub cache at empty folders for one test.

    Returns:
        ``(torch_hub_dir, hf_hub_cache)``.
    """
    from huggingface_hub import constants

    torch_hub = tmp_path / "torch_hub"
    hf_cache = tmp_path / "hf_cache"
    torch_hub.mkdir()
    hf_cache.mkdir()
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(torch_hub))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    yield torch_hub, hf_cache
    torch.hub.set_dir(previous)


def _reference_state(arch: str) -> dict[str, torch.Tensor]:
    """A recognisable state dict: a seeded random init, so that loading it can be checked."""
    import timm

    torch.manual_seed(1234)
    return timm.create_model(arch, pretrained=False).state_dict()


def _same_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[key], value) for key, value in state.items())


def test_timm_offline_random_init_with_note(empty_caches: tuple[Path, Path]) -> None:
    loaded = load_model("resnet18")
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == "timm" and loaded.name == "resnet18"
    assert loaded.pretrained is False and loaded.weights is None
    assert loaded.note.startswith("random init") and "local cache" in loaded.note
    assert not loaded.model.training
    # resnet18's default tag (a1_in1k): 224 input, crop_pct 0.95, bicubic
    assert loaded.preprocess == Preprocess((224, 224), 0.95, "bicubic")
    with torch.inference_mode():
        assert loaded.model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_pretrained_false_and_warning(empty_caches: tuple[Path, Path]) -> None:
    loaded = load_model("resnet18", pretrained=False)
    assert loaded.pretrained is False and "pretrained=False" in loaded.note
    with pytest.warns(UserWarning, match="pretrained weights requested"):
        assert load_model("resnet18", pretrained=True).pretrained is False


def test_timm_weights_from_torch_hub_cache(empty_caches: tuple[Path, Path]) -> None:
    torch_hub, _ = empty_caches
    from timm.models import get_pretrained_cfg

    url = get_pretrained_cfg("resnet18").url
    state = _reference_state("resnet18")
    checkpoints = torch_hub / "checkpoints"
    checkpoints.mkdir()
    torch.save(state, checkpoints / Path(url).name)

    loaded = load_model("resnet18")
    assert loaded.pretrained is True and loaded.weights == str(checkpoints / Path(url).name)
    assert _same_weights(loaded.model, state)


def test_timm_weights_from_hf_cache_offline(empty_caches: tuple[Path, Path]) -> None:
    from safetensors.torch import save_file

    _, hf_cache = empty_caches
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    state = _reference_state("resnet18")
    save_file(
        {key: value.contiguous() for key, value in state.items()},
        str(snapshot / "model.safetensors"),
    )

    loaded = load_model("resnet18.a1_in1k")
    assert loaded.pretrained is True, loaded.note
    assert loaded.weights is not None and loaded.weights.startswith(str(hf_cache))
    assert _same_weights(loaded.model, state)


def test_broken_cached_weights_fall_back(empty_caches: tuple[Path, Path]) -> None:
    torch_hub, _ = empty_caches
    from timm.models import get_pretrained_cfg

    checkpoints = torch_hub / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / Path(get_pretrained_cfg("resnet18").url).name).write_bytes(b"not a checkpoint")
    loaded = load_model("resnet18")
    assert loaded.pretrained is False and "failed" in loaded.note


def test_torchvision_model(empty_caches: tuple[Path, Path]) -> None:
    loaded = load_model("tv:resnet18")
    assert loaded.source == "torchvision" and loaded.pretrained is False
    assert "random init" in loaded.note and not loaded.model.training
    # torchvision's IMAGENET1K_V1 eval: resize 256, crop 224, bilinear
    assert loaded.preprocess.input_size == (224, 224)
    assert loaded.preprocess.scale_size == (256, 256)
    assert loaded.preprocess.interpolation == "bilinear"
    # resize 232 for crop 224 must survive timm's floor(224 / crop_pct)
    assert load_model("tv:resnet50", pretrained=False).preprocess.scale_size == (232, 232)


def test_torchvision_weights_from_cache(empty_caches: tuple[Path, Path]) -> None:
    import torchvision

    torch_hub, _ = empty_caches
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    checkpoints = torch_hub / "checkpoints"
    checkpoints.mkdir()
    torch.save(state, checkpoints / Path(weights.url).name)
    loaded = load_model("tv:resnet18")
    assert loaded.pretrained is True
    assert _same_weights(loaded.model, state)


def test_kwargs_and_input_size(empty_caches: tuple[Path, Path]) -> None:
    vit = load_model("vit_tiny_patch16_224", img_size=64, pretrained=False)
    assert vit.preprocess.input_size == (64, 64)
    assert preprocess_for(vit.model).input_size == (64, 64)  # read from the patch embedding
    with torch.inference_mode():
        assert vit.model(torch.zeros(2, 3, 64, 64)).shape == (2, 1000)
    small = load_model("timm:resnet18", pretrained=False, num_classes=10)
    assert small.name == "timm:resnet18"
    with torch.inference_mode():
        assert small.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_preprocess_for_plain_module() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert preprocess_for(net) == Preprocess((224, 224), 0.875, "bilinear")
    wrapped = from_module(net, name="tiny")
    assert wrapped.source == "module" and wrapped.name == "tiny" and not wrapped.model.training


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet5O", "resnet50"), ("convnext_tinny", "convnext_tiny"), ("tv:resnet1", "tv:resnet18")],
)
def test_misspelt_names_suggest_close_matches(name: str, expected: str) -> None:
    with pytest.raises(UnknownModelError, match="Close names") as error:
        load_model(name)
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)


def test_unknown_pretrained_tag_lists_tags() -> None:
    with pytest.raises(UnknownModelError, match=r"resnet18\.a1_in1k"):
        load_model("resnet18.not_a_tag")


def test_load_model_sized_builds_torchvision_vits_for_the_input(
    empty_caches: tuple[Path, Path],
) -> None:
    from equifast.models import load_model_sized

    vit = load_model_sized("tv:vit_b_16", (64, 64))
    assert vit.model.image_size == 64
    with torch.inference_mode():
        assert vit.model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    # a CNN takes any size as it is; a side torchvision's ViT cannot take keeps its default
    assert load_model_sized("tv:resnet18", (64, 64)).name == "tv:resnet18"
    assert load_model_sized("tv:vit_b_16", (64, 96)).model.image_size == 224
    # torchvision's MaxViT lays its windows out for one size, given as input_size: built at the
    # size measured (it was built at 224 and failed in the probe with a reshape error), and a
    # size its partitions cannot take is the constructor's own error
    maxvit = load_model_sized("tv:maxvit_t", (448, 448)).model
    assert maxvit.blocks[0].grid_size == (112, 112)
    with pytest.raises(ValueError, match=r"'tv:maxvit_t' cannot be built for input size 112 x "
                                         r"112: ValueError: .*not divisible by partition size 7"):
        load_model_sized("tv:maxvit_t", (112, 112))
    # timm's NesT asserts that its patch size divides the size: the same, with the size named
    with pytest.raises(ValueError, match=r"'nest_tiny' cannot be built for input size 97 x 97: "
                                         r"AssertionError: `patch_size` must divide `img_size`"):
        load_model_sized("nest_tiny", (97, 97), pretrained=False)


def test_a_features_only_vit_keeps_the_size_it_was_built_for() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, features_only=True)
    assert preprocess_for(vit).input_size == (64, 64)


class _SizedWithABug(nn.Module):
    """Takes ``img_size``, and its constructor has a bug that raises a TypeError for any size
    other than its default (as a bad shape computation can)."""

    def __init__(self, img_size=224, **kwargs) -> None:
        super().__init__()
        if img_size != 224:
            raise TypeError("unsupported operand type(s) for //: 'tuple' and 'int' (a bug)")
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@timm.models.register_model
def eqtest_sized_with_a_bug(pretrained: bool = False, **kwargs) -> nn.Module:
    return _SizedWithABug(**kwargs)


def test_load_model_sized_retries_only_when_the_size_is_not_taken() -> None:
    """Without img_size a model (a CNN) is built again as it is; any other TypeError is raised
    with its message, not swallowed into a model built at another size."""
    from equifast.models import load_model_sized

    cnn = load_model_sized("resnet10t", (64, 64), pretrained=False)
    with torch.inference_mode():
        assert cnn.model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    # timm's VoVNet (as HRNet and MetaFormer) takes **kwargs and refuses img_size with its own
    # message ("got unexpected keyword argument(s): ['img_size']"): built without it, too
    vovnet = load_model_sized("ese_vovnet19b_slim_dw", (64, 64), pretrained=False)
    with torch.inference_mode():
        assert vovnet.model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    # the constructor takes img_size and fails on it: its own error, not a 224 px model
    with pytest.raises(TypeError, match=r"unsupported operand .* \(a bug\)"):
        load_model_sized("eqtest_sized_with_a_bug", (64, 64), pretrained=False)
    # a bad argument of the caller: one error naming it, not a second build's error on top
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_argument'") as error:
        load_model_sized("vit_tiny_patch16_224", (64, 64), pretrained=False, not_an_argument=1)
    assert error.value.__context__ is None, "raised while handling a first attempt's error"
    with pytest.raises(TypeError, match="'not_an_argument'"):
        load_model_sized("tv:resnet18", (64, 64), pretrained=False, not_an_argument=1)
