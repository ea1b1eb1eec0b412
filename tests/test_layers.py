"""Layer selection (defaults for models without timm's feature_info) and layout detection."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import equifast
from equifast.layers import default_layers, is_broad_selection, refine_layouts, select_layers
from equifast.layouts import detect_layout, grown_grid_of, stride_from_growth


@pytest.mark.parametrize(
    ("name", "expected_start", "stage"),
    [
        # The trunk of torchvision's MobileNet / EfficientNet is one `features` Sequential:
        # its blocks are the layers, the classifier head stays whole.
        ("mobilenet_v2", ["features.0", "features.1"], "features.18"),
        ("efficientnet_b0", ["features.0", "features.1"], "features.8"),
        # ViT: the encoder's layers, through two containers.
        ("vit_b_16", ["conv_proj", "encoder.dropout", "encoder.layers.encoder_layer_0"],
         "encoder.layers.encoder_layer_11"),
        # Enough top-level children already: kept as they are.
        ("resnet18", ["conv1", "bn1", "relu", "maxpool", "layer1"], "layer4"),
    ],
)
def test_default_layers_open_the_trunk(name, expected_start, stage):
    model = torchvision.models.get_model(name)
    layers = default_layers(model)
    assert layers[: len(expected_start)] == expected_start
    assert stage in layers
    assert len(layers) >= 8
    heads = [n for n in layers if n.split(".")[0] in ("classifier", "heads", "fc")]
    assert len(heads) == 1 and "." not in heads[0]  # the head is one layer, never opened
    modules = dict(model.named_modules())
    assert all(n in modules for n in layers)
    # No layer sits inside another: every position is measured once.
    assert not any(a != b and b.startswith(a + ".") for a in layers for b in layers)


@pytest.mark.parametrize(("name", "stages"), [
    ("regnet_y_400mf", [f"trunk_output.block{i}" for i in range(1, 5)]),
    ("maxvit_t", [f"blocks.{i}" for i in range(4)]),
])
def test_default_layers_keep_a_series_of_stages_whole(name, stages):
    # RegNet's trunk holds four AnyStage modules: opening the largest (block4) to reach eight
    # layers had measured block4's six blocks beside three whole stages.
    model = torchvision.models.get_model(name)
    layers = default_layers(model)
    assert [n for n in layers if n.startswith(stages[0].rsplit(".", 1)[0] + ".")] == stages


def test_default_layers_open_a_container_but_not_one_of_a_series():
    class Stage(nn.Sequential):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.first = Stage(nn.Conv2d(4, 4, 3), nn.ReLU())
            self.second = Stage(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
            self.head = nn.Linear(4, 2)

    # Below eight layers: the stem (a plain Sequential) is opened, the two Stages are not.
    assert default_layers(Net()) == ["stem.0", "stem.1", "first", "second", "head"]


def test_default_layers_leave_out_modules_that_only_reshape():
    # torchvision's Swin: norm (NHWC) then Permute (the same values as NCHW), avgpool then
    # Flatten (the same vector): one row each, not two.
    layers = default_layers(torchvision.models.swin_t())
    assert layers[-3:] == ["norm", "avgpool", "head"]
    # A model of reshapes alone keeps them (there is nothing else to measure).
    assert default_layers(nn.Sequential(nn.Flatten(), nn.Identity())) == ["0", "1"]


def test_globs_stay_within_one_part_of_a_name_unless_doubled():
    """'layer*' is a ResNet's four stages (with fnmatch, whose * crosses dots, it was every one
    of the 60-odd modules under them); '**' crosses the dots."""
    model = torchvision.models.resnet18()
    assert select_layers(model, "layer*") == ["layer1", "layer2", "layer3", "layer4"]
    assert select_layers(model, ["layer*.1"]) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert select_layers(model, "layer?.0.conv?") == [
        f"layer{i}.0.conv{j}" for i in range(1, 5) for j in (1, 2)]
    assert select_layers(model, "*") == [name for name, _ in model.named_children()]
    under_layer1 = [name for name, _ in model.layer1.named_modules() if name]
    assert select_layers(model, "layer1.**") == [f"layer1.{name}" for name in under_layer1]
    conv1 = [name for name, _ in model.named_modules() if name.endswith("conv1")]
    assert select_layers(model, "**conv1") == conv1 and len(conv1) == 9
    assert select_layers(model, "layer[12]") == ["layer1", "layer2"]
    assert select_layers(model, "layer[!12]") == ["layer3", "layer4"]
    with pytest.raises(ValueError, match=r"'layer\*\.conv1' matches no module"):
        select_layers(model, "layer*.conv1")  # conv1 sits one part deeper: layer*.*.conv1
    assert select_layers(model, "layer*.*.conv1") == [n for n in conv1 if n != "conv1"]


def test_default_layers_open_module_lists_and_keep_feature_info():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.blocks = nn.ModuleList(nn.Conv2d(4, 4, 3) for _ in range(3))

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return x

    # A ModuleList has no forward: its members are the layers.
    assert default_layers(Blocks()) == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    timm_model = timm.create_model("resnet10t")
    assert default_layers(timm_model) == [info["module"] for info in timm_model.feature_info]
    with pytest.raises(ValueError, match="no submodules"):
        default_layers(nn.ReLU())
    assert select_layers(timm_model, "default") == default_layers(timm_model)


@pytest.mark.parametrize(
    ("shape", "input_size", "expected"),
    [
        ((2, 64, 14, 14), (224, 224), ("NCHW", 14, 14, 64, 0)),
        ((2, 14, 14, 64), (224, 224), ("NHWC", 14, 14, 64, 0)),
        ((2, 197, 192), (224, 224), ("NLC", 14, 14, 192, 1)),
        ((2, 16, 128), (64, 64), ("NLC", 4, 4, 128, 0)),
        ((2, 7, 5, 32), (112, 80), ("NHWC", 7, 5, 32, 0)),
        # One position is a pooled vector, whatever the layout: channels become the vector.
        ((2, 384, 1, 1), (64, 64), ("NC", 1, 384, 1, 0)),
        ((2, 1, 384), (64, 64), ("NC", 1, 384, 1, 0)),
        ((2, 1000), (224, 224), ("NC", 1, 1000, 1, 0)),
        # Both readings fit some stride: 7x8 cells (stride 29..31) or 7x7 (exactly 32).
        ((2, 7, 7, 8), (224, 224), ("NHWC", 7, 7, 8, 0)),
        # Odd, non-square inputs with rounding up (padded convolutions).
        ((2, 64, 8, 9), (57, 71), ("NCHW", 8, 9, 64, 0)),
    ],
)
def test_detect_layout(shape, input_size, expected):
    layout = detect_layout(shape, input_size)
    assert (layout.layout, layout.grid_h, layout.grid_w, layout.channels,
            layout.prefix) == expected


@pytest.mark.parametrize(
    ("shape", "input_size", "stride"),
    [
        ((2, 64, 8, 8), (57, 57), 8.0),  # ceil(57 / 8) = 8, but also floor(57 / 7): 8 wins
        ((2, 64, 2, 2), (57, 57), 32.0),  # anything from 20 to 56 gives 2 cells: a CNN's 32
        ((2, 64, 8, 9), (57, 71), 8.0),  # 8 explains both axes (7 explains only 57)
        ((2, 64, 7, 7), (224, 224), 32.0),
        ((2, 64, 16, 16), (225, 225), 14.0),  # a patch-14 ViT: not a power of two
        ((2, 1370, 384), (518, 518), 14.0),  # DINOv2-like: 1 prefix token, 37 x 37 patches
        ((2, 64, 111, 111), (224, 224), 2.0),  # SqueezeNet's unpadded 3x3 stride-2 convolution
        ((2, 64, 109, 109), (224, 224), 224 / 109),  # no integer explains it: the ratio
    ],
)
def test_layout_strides(shape, input_size, stride):
    assert detect_layout(shape, input_size).stride == (stride, stride)


@pytest.mark.parametrize(
    ("grid", "grown", "input_size", "stride"),
    [
        ((5, 5), (7, 7), (224, 224), 32.0),  # Inception v3: 44.8 px per cell, a stride of 32
        ((25, 25), (33, 33), (223, 223), 8.0),  # its stride-8 stage on an odd input
        ((2, 2), (4, 4), (33, 33), 32.0),  # one size fits 16 as well
        ((1, 2), (3, 4), (17, 33), 32.0),  # and here only 9..17
        ((1, 1), (3, 3), (24, 24), 32.0),
        ((16, 16), (20, 20), (224, 224), 14.0),  # a patch-14 ViT gains 4 or 5 cells: not 16
        ((37, 37), (41, 41), (518, 518), 14.0),
        ((8, 9), (16, 17), (57, 71), 8.0),
        ((2, 3), (4, 5), (57, 71), 32.0),
        ((111, 111), (143, 143), (224, 224), 2.0),  # unpadded 3x3 stride-2 convolution
    ],
)
def test_stride_from_growth(grid, grown, input_size, stride):
    assert stride_from_growth(grid, grown, input_size) == (stride, stride)


@pytest.mark.parametrize(
    ("grid", "grown", "input_size"),
    [
        ((7, 7), (7, 7), (224, 224)),  # adaptive pooling: the grid does not grow
        ((7, 7), (9, 7), (224, 224)),  # one axis only: no stride explains both
        ((8, 8), (6, 6), (64, 64)),
    ],
)
def test_stride_from_growth_needs_both_axes_to_grow(grid, grown, input_size):
    assert stride_from_growth(grid, grown, input_size) is None


def test_grown_grid_of_reads_each_layout():
    tokens = detect_layout((2, 197, 192), (224, 224))
    assert grown_grid_of(tokens, (1, 1 + 18 * 18, 192), (288, 288)) == (18, 18)
    assert grown_grid_of(tokens, (1, 1 + 12 * 20, 192), (192, 320)) == (12, 20)
    channels_last = detect_layout((2, 56, 56, 96), (224, 224))
    assert channels_last.layout == "NHWC"
    assert grown_grid_of(channels_last, (1, 72, 72, 96), (288, 288)) == (72, 72)
    maps = detect_layout((2, 8, 7, 7), (224, 224))
    assert grown_grid_of(maps, (1, 8, 9, 9), (288, 288)) == (9, 9)
    assert grown_grid_of(tokens, (1, 4, 4, 192), (288, 288)) is None  # not tokens any more


def _unpadded_net():
    # Valid convolutions: 48 px give 23, 11, 5 cells (9.6 px per cell at the last); the strides
    # are 2, 4 and 8, and the maps move by exactly one cell per stride of shift.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
    ).eval()


def test_refine_layouts_reads_strides_from_a_larger_input():
    torch.manual_seed(0)
    net = _unpadded_net()
    shapes = {"1": (2, 8, 23, 23), "3": (2, 8, 11, 11), "5": (2, 8, 5, 5)}
    one_size = {name: detect_layout(shape, (48, 48)) for name, shape in shapes.items()}
    assert one_size["5"].stride != (8.0, 8.0)  # what the single size says: the test can fail
    report = {}
    refined = refine_layouts(net, one_size, (48, 48), "cpu", torch.float32, report=report)
    assert {name: layout.stride for name, layout in refined.items()} == {
        "1": (2.0, 2.0), "3": (4.0, 4.0), "5": (8.0, 8.0)}
    assert report == {"stride_probe": "two input sizes: 48x48 and 112x112"}
    assert all(refined[n].grid_h == one_size[n].grid_h for n in shapes)
    # A model that refuses another input size keeps the single size's reading.

    class FixedSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _unpadded_net()

        def forward(self, x):
            if x.shape[-2:] != (48, 48):
                raise AssertionError(f"input size {tuple(x.shape[-2:])} does not match (48, 48)")
            return self.body(x)

    fixed = FixedSize().eval()
    kept = refine_layouts(fixed, {f"body.{n}": v for n, v in one_size.items()}, (48, 48), "cpu",
                          torch.float32, report=report)
    assert kept == {f"body.{n}": v for n, v in one_size.items()}
    assert report["stride_probe"] == (
        "one input size: the model did not run at 112x112 (AssertionError: input size "
        "(112, 112) does not match (48, 48))")
    # The engine records it.
    import equifast

    result = equifast.measure(fixed, torch.rand(2, 3, 48, 48), group="translate[circular]:8",
                              layers=["body.5"], bootstrap=0, progress=False)
    assert result.config["stride_probe"].startswith("one input size: the model did not run")


def test_refine_layouts_tells_channels_from_grid_axes():
    # (N, 32, 17, 9) at 33 x 17 px: a 32 x 17 grid of 9 channels (stride 1) fits the aspect better
    # than a 17 x 9 grid of 32 channels (stride 2); at 97 x 81 px only the latter grows as a grid.
    net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1)).eval()
    one_size = {"0": detect_layout((2, 32, 17, 9), (33, 17))}
    assert one_size["0"].layout == "NHWC"
    refined = refine_layouts(net, one_size, (33, 17), "cpu", torch.float32)["0"]
    assert (refined.layout, refined.grid_h, refined.grid_w, refined.channels) == ("NCHW", 17, 9, 32)
    assert refined.stride == (2.0, 2.0)
    # A layout the user gave keeps its reading (its stride is still refined).
    forced = {"0": detect_layout((2, 32, 17, 9), (33, 17), layout="NHWC")}
    kept = refine_layouts(net, forced, (33, 17), "cpu", torch.float32, overrides={"0": "NHWC"})
    assert kept["0"].layout == "NHWC"


def _stage_layouts(name: str, group: str, input_size: tuple[int, int], limit: int):
    """One row per default layer of a random-init timm model measured on the samples."""
    import equifast

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    result = equifast.measure(model, "samples", group=group, input_size=input_size, limit=limit,
                              bootstrap=0, progress=False)
    return result.frame.drop_duplicates("layer").set_index("layer")


def test_real_models_on_odd_inputs():
    # resnet10t on 57x71: stage grids 29x36, 15x18, 8x9, 4x5, 2x3 (padded convs round up).
    layers = _stage_layouts("resnet10t", "translate:4", (57, 71), limit=2)
    assert list(layers.stride) == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert (layers.layout == "NCHW").all()


def test_unpadded_real_model_strides():
    # Inception v3's valid convolutions: 107 px give 51, 23, 11, 5, 2 cells; read off the one
    # size, the strides would be 2.1, 4.65, 10, 21 and 64.
    layers = _stage_layouts("inception_v3", "translate:8", (107, 107), limit=1)
    assert list(layers.grid_h) == [51, 23, 11, 5, 2]
    assert list(layers.stride) == [2.0, 4.0, 8.0, 16.0, 32.0]


def test_a_one_token_stage_is_measured_as_a_vector():
    import equifast

    torch.manual_seed(0)
    # LeViT on 64x64: its last stage has a single token.
    model = timm.create_model("levit_128s", img_size=64).eval()
    result = equifast.measure(model, "samples", group="translate:8", input_size=(64, 64),
                              limit=2, bootstrap=0, progress=False)
    last = result.frame[(result.frame.layer == "stages.2") & (result.frame.metric == "corr")
                        & (result.frame.element == "mean")].set_index("comparison")
    assert last.loc["eq", "layout"] == "NC"
    # A vector does not move with the image: equivariance is invariance, and a number.
    assert last.loc["eq", "value"] == pytest.approx(last.loc["inv", "value"])
    assert torch.isfinite(torch.tensor(last.loc["eq", "value"]))


class _TupleBlock(nn.Module):
    """Returns (per-patch pixel tokens, patch tokens) as TNT's blocks do."""

    def forward(self, x):
        patches = x.flatten(2).transpose(1, 2)  # (B, h*w, C): batch first
        pixels = patches.reshape(-1, 1, x.shape[1])  # (B * h * w, 1, C): not batch first
        return pixels, patches


class _SequenceFirst(nn.Module):
    def forward(self, x):
        return x.flatten(2).permute(2, 0, 1)  # (h*w, B, C)


def test_hooks_take_the_batch_first_output_and_refuse_others():
    import equifast

    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    images = torch.rand(3, 3, 8, 8)
    group = equifast.Translation([1, 2], protocol="circular")
    model = nn.Sequential(conv, _TupleBlock()).eval()
    with pytest.warns(UserWarning, match="output is a tuple, not"):  # no logits
        result = equifast.measure(model, images, group=group, layers=["1"], bootstrap=0,
                                  progress=False)
    eq = result.frame.query("metric == 'corr' and comparison == 'eq' and element == 'mean'")
    assert eq.layout.tolist() == ["NLC"] and eq.value.iloc[0] == pytest.approx(1.0, abs=1e-6)

    sequence_first = nn.Sequential(conv, _SequenceFirst()).eval()
    # (the layout probe, a forward of 2 images, is the first to see it)
    with pytest.raises(ValueError, match=r"^layer '1' outputs shape \(64, 2, 4\).*not the"):
        equifast.measure(sequence_first, images, group=group, layers=["1"], bootstrap=0,
                         progress=False)


class _WithAuxiliaryHead(nn.Module):
    """An auxiliary classifier that only runs in training, as GoogLeNet's and Inception's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Linear(4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        pooled = x.mean((2, 3))
        if self.training:
            return self.head(pooled), self.aux(pooled)
        return self.head(pooled)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_default_layers_that_never_run_are_left_out(implementation):
    import equifast
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    model = _WithAuxiliaryHead().eval()
    images = torch.rand(2, 3, 16, 16)
    group = equifast.Translation([1], protocol="circular")
    assert default_layers(model) == ["conv", "aux", "head"]
    with pytest.warns(UserWarning, match=r"1 of 3 selected layers .* \(aux: did not run"):
        result = measure(model, images, group=group, bootstrap=0, progress=False)
    assert sorted(result.frame.layer.unique()) == ["conv", "head"]
    with pytest.raises(ValueError, match=r"\['aux'\] did not run"):
        measure(model, images, group=group, layers=["conv", "aux"], bootstrap=0, progress=False)


@pytest.mark.parametrize(("name", "against_naive"), [("vit_tiny_patch16_224", True),
                                                     ("swin_tiny_patch4_window7_224", False),
                                                     ("efficientnet_b0", False)])
def test_leaves_leave_out_what_cannot_be_measured(name, against_naive):
    import equifast
    from equifast import naive

    # Leaves catch dropout that fused attention skips (ViT), drop paths that are identities in
    # eval (EfficientNet) and window-attention internals, (B * windows, 49, C) (Swin).
    torch.manual_seed(0)
    kwargs = {"img_size": 64} if name.startswith(("vit", "swin")) else {}
    model = timm.create_model(name, **kwargs).eval()
    settings = dict(group="translate:8", input_size=(64, 64), layers="leaves", limit=2,
                    bootstrap=0, progress=False)
    with pytest.warns(UserWarning, match="selected layers cannot be measured"):
        result = equifast.measure(model, "samples", **settings)
    layers = result.frame.layer.unique()
    leaves = select_layers(model, "leaves")
    assert len(layers) > 20 and set(layers) < set(leaves)  # some left out (the warning says which)
    if not against_naive:  # the naive loop over all leaves is slow: one model is enough
        return
    with pytest.warns(UserWarning, match="selected layers cannot be measured"):
        oracle = naive.measure(model, "samples", **settings)
    assert sorted(layers) == sorted(oracle.frame.layer.unique())
    merged = result.frame.merge(oracle.frame, on=["layer", "element", "comparison", "metric"])
    corr = merged[merged.metric == "corr"]
    assert (corr.value_x - corr.value_y).abs().max() < 1e-4


class _DictOutput(nn.Module):
    def forward(self, x):
        return {"features": x}


def test_a_layer_without_a_tensor_output_is_named():
    import equifast

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _DictOutput(), nn.Identity()).eval()
    model[2].forward = lambda d: d["features"]
    with pytest.raises(ValueError, match=r"^layer '1' outputs dict, expected a tensor"):
        equifast.measure(model, torch.rand(2, 3, 8, 8), group="translate[circular]:1",
                         layers=["1"], bootstrap=0, progress=False)


def test_class_names_select_modules_of_that_class():
    model = torchvision.models.resnet18()
    by_type = select_layers(model, nn.BatchNorm2d)
    assert select_layers(model, "BatchNorm2d") == by_type
    assert select_layers(model, "nn.BatchNorm2d") == select_layers(model, "torch.nn.BatchNorm2d")
    assert select_layers(model, "nn.BatchNorm2d") == by_type and len(by_type) == 20
    assert select_layers(model, ["BasicBlock", "fc"]) == [
        "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
        "layer4.1", "fc"]
    # As isinstance has it: a subclass of the class named is caught too.

    class Gate(nn.ReLU):
        pass

    gated = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Gate())
    assert select_layers(gated, "ReLU") == ["1", "2"] and select_layers(gated, "Gate") == ["2"]
    # A module name wins over a class name; a class name is a broad selection, a name is not.
    named = nn.Sequential()
    named.add_module("Conv2d", nn.Identity())
    named.add_module("body", nn.Conv2d(3, 4, 3))
    assert select_layers(named, "Conv2d") == ["Conv2d"]
    assert not is_broad_selection("Conv2d", named)
    assert is_broad_selection("Conv2d", gated) and is_broad_selection(["0", "ReLU"], gated)
    assert not is_broad_selection(["0", "2"], gated)
    with pytest.raises(ValueError, match=r"matches no module.*'BatchNorm2d'"):
        select_layers(model, "BatchNorm")


def test_a_class_name_selection_leaves_out_what_cannot_be_measured():
    import equifast

    class Pair(nn.Module):  # its output is not a tensor: left out of a broad selection
        def forward(self, x):
            return {"x": x}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.pair = Pair()

        def forward(self, x):
            self.pair(x)
            return self.relu(self.conv(x))

    images = torch.rand(2, 3, 12, 12)
    kwargs = dict(group="translate[circular]:1", progress=False, bootstrap=0)
    with pytest.warns(UserWarning, match="1 of 3 selected layers cannot be measured"):
        result = equifast.measure(Net().eval(), images, layers=["Conv2d", "ReLU", "Pair"],
                                  **kwargs)
    assert set(result.frame.layer) == {"conv", "relu"}
    with pytest.raises(Exception, match="outputs dict"):
        equifast.measure(Net().eval(), images, layers=["conv", "pair"], **kwargs)


def test_an_empty_selection_is_a_clear_error():
    import equifast

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    with pytest.raises(ValueError, match="selection is empty"):
        equifast.measure(model, torch.rand(2, 3, 8, 8), group="translate[circular]:1", layers=[],
                         progress=False)


def test_default_layers_of_a_wrapped_timm_model_are_its_stages():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = nn.Identity()
            self.net = timm.create_model("resnet10t")
            self.extra = nn.Linear(1000, 3)

        def forward(self, x):
            return self.extra(self.net(self.normalize(x)))

    wrapper = Wrapper()
    stages = [info["module"] for info in wrapper.net.feature_info]
    assert default_layers(wrapper) == [f"net.{name}" for name in stages]


def _layouts_of(model, layers, size, **kwargs):
    import equifast

    group = equifast.Translation([16])
    my, mx = group.margin(*size)
    images = torch.randint(0, 256, (2, 3, size[0] + 2 * my, size[1] + 2 * mx), dtype=torch.uint8)
    result = equifast.measure(model, images, group=group, layers=layers, input_size=size,
                              bootstrap=0, progress=False, batch_size=2, **kwargs)
    rows = result.frame.drop_duplicates("layer").set_index("layer")
    return {name: (row.layout, int(row.prefix), int(row.grid_h), int(row.grid_w), row.stride_y)
            for name, row in rows.iterrows()}


@pytest.mark.parametrize(
    ("kwargs", "size", "expected"),
    [
        # 1 + 7 x 9 = 64 tokens also pass for an 8 x 8 grid of stride 15 without a class token
        (dict(img_size=(112, 144)), (112, 144), ("NLC", 1, 7, 9, 16.0)),
        # 5 + 4 x 4 = 21 tokens: 1 + 4 x 5 of stride 14 is the fewest-prefix reading
        (dict(img_size=64, reg_tokens=4), (64, 64), ("NLC", 5, 4, 4, 16.0)),
        # the patch embedding's 196 tokens also pass for 1 + 13 x 15 of stride 15 (or 16)
        (dict(), (224, 224), ("NLC", 1, 14, 14, 16.0)),
    ],
)
def test_prefix_tokens_come_from_the_model(kwargs, size, expected):
    """timm's num_prefix_tokens decides the prefix where the token count fits several readings;
    a layer without those tokens (the patch embedding) still reads without them."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    found = _layouts_of(model, ["patch_embed", "blocks.0", "blocks.11"], size)
    assert found["blocks.0"] == expected and found["blocks.11"] == expected
    assert found["patch_embed"] == ("NLC", 0, *expected[2:])


def test_token_layers_before_the_class_token_have_no_prefix():
    """CaiT adds its class token only in the last blocks, though the model declares one prefix
    token: its first blocks' 196 tokens are a 14 x 14 grid (read as 1 + 13 x 15 before)."""
    model = timm.create_model("cait_xxs24_224", pretrained=False, depth=2).eval()
    assert model.num_prefix_tokens == 1
    found = _layouts_of(model, ["blocks.0", "blocks.1", "blocks_token_only.1", "norm"],
                        (224, 224))
    assert found["blocks.0"] == found["blocks.1"] == ("NLC", 0, 14, 14, 16.0)
    assert found["norm"] == ("NLC", 1, 14, 14, 16.0)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_adaptive_pooling_that_resamples_is_named(implementation):
    """A grid that keeps its size when the input grows (adaptive pooling) is a grid of input
    positions only where it receives a grid of its own size (VGG at 224 px); elsewhere it
    resamples and a warning names it."""
    from equifast import naive

    net = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.AdaptiveAvgPool2d((4, 4))).eval()
    measure = equifast.measure if implementation == "engine" else naive.measure
    group = equifast.Translation([8], protocol="circular")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 32 px: 4 x 4 cells in, 4 x 4 out, one to one
        one_to_one = measure(net, torch.rand(2, 3, 32, 32), group=group, layers=["0", "1"],
                             progress=False, bootstrap=0)
    if implementation == "engine":
        assert "did not grow" not in one_to_one.config["stride_probe"]
    with pytest.warns(UserWarning, match=r"resample the grid they receive: 1 \(4x4, stride 12\)"):
        resampled = measure(net, torch.rand(2, 3, 48, 48), group=group, layers=["0", "1"],
                            progress=False, bootstrap=0)
    if implementation == "engine":
        assert "grid did not grow: 1 (4x4" in resampled.config["stride_probe"]


class _ResizedTokens(nn.Module):
    """Tokens of an input first resized to 32 x 32 (CrossViT's scale_image), with a class token;
    its block takes a list of token tensors (CrossViT's multi-scale blocks) or one tensor."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        self.as_list = as_list
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.block = _ListLinear() if as_list else nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[-2:] != (32, 32):
            x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear")
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        if self.as_list:
            return self.block([tokens, tokens[:, :1]])[0].mean(1)
        return self.block(tokens).mean(1)


class _ListLinear(nn.Linear):
    def __init__(self) -> None:
        super().__init__(8, 8)

    def forward(self, tokens):
        return [super(_ListLinear, self).forward(t) for t in tokens]


@pytest.mark.parametrize("as_list", [False, True])
def test_token_grid_of_a_resized_input_is_not_called_resampled_at_its_size(as_list):
    """A token layer whose grid does not grow because the model resizes its input (CrossViT) is
    one to one with the input at the size it resizes to: no warning there (there was one for
    every NLC layer, and for every layer whose input is a list), one at another size."""
    torch.manual_seed(0)
    net = _ResizedTokens(as_list).eval()
    group = equifast.Translation([8], protocol="circular")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (the list's second branch, the class token alone, is a map of another size: that it is
        # not the one measured is said, truly)
        warnings.filterwarnings("ignore", message=".*feature maps of different sizes")
        native = equifast.measure(net, torch.rand(2, 3, 32, 32), group=group, layers=["block"],
                                  progress=False, bootstrap=0)
    assert "did not grow" not in native.config["stride_probe"]
    resampled = r"resample the grid they receive: block \(4x4, stride 12\)"
    with pytest.warns(UserWarning, match=resampled):
        equifast.measure(net, torch.rand(2, 3, 48, 48), group=group, layers=["block"],
                         progress=False, bootstrap=0)


class _BatchlessPosition(nn.Module):
    """A positional encoding computed for one image and broadcast over the batch (XCiT's
    pos_embed: (1, C, h, w) whatever the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.pos = nn.Conv2d(2, 8, 1)

    def forward(self, x):
        x = self.proj(x)
        return x + self.pos(torch.zeros(1, 2, *x.shape[-2:]))


@pytest.mark.parametrize("implementation,align", [("engine", "center"), ("engine", "auto"),
                                                  ("naive", "auto")])
def test_broad_selection_leaves_out_a_layer_that_ignores_the_batch(implementation, align):
    """The layers were probed with one image, whose output (1, C, h, w) passed for batch first:
    the measurement then failed on it (naive, and the engine without align="auto", whose probe
    has two images) instead of leaving it out with a warning."""
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"1 of 2 selected layers cannot be measured .*'pos'"):
        result = measure(_BatchlessPosition().eval(), torch.rand(2, 3, 32, 32),
                         group=equifast.Flip(), layers="leaves", align=align, progress=False,
                         bootstrap=0)
    assert set(result.frame.layer) == {"proj"}


class _TokenMixer(nn.Module):
    """Patchify to tokens with a class token, then self-attention whose probabilities pass an
    attn_drop module: (B, heads, L, L), which fits a grid as well as a feature map does."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.qkv = nn.Linear(8, 24)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        return _attend(self, tokens)  # attention weights (B, 2, 17, 17)


def _attend(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Two-head self-attention of (B, L, 8) tokens through ``module``'s qkv, attn_drop (which
    sees the (B, 2, L, L) weights) and proj."""
    q, k, v = module.qkv(tokens).reshape(len(tokens), -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
    attention = module.attn_drop((q @ k.transpose(-2, -1)).softmax(-1))
    return module.proj((attention @ v).transpose(1, 2).flatten(2))


def test_attention_maps_are_not_grids():
    model = _TokenMixer().eval()
    with pytest.warns(UserWarning, match=r"attn_drop: output \(2, 2, 17, 17\) is an attention map"):
        found = _layouts_of(model, "leaves", (32, 32))
    assert "attn_drop" not in found
    assert found["proj"] == ("NLC", 1, 4, 4, 8.0)


class _ConvStemThenTokens(nn.Module):
    """LeViT in miniature at 64 px: a convolution stem whose maps are 16 x 16 (stride 4), then
    16 tokens (4 x 4, stride 16) through attention whose weights pass an attn_drop module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.Hardswish())
        self.down = nn.Conv2d(8, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        tokens = self.down(self.stem(x)).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return _attend(self, tokens)  # attention weights (B, 2, 16, 16)


def test_convolution_maps_as_wide_as_a_token_count_are_grids():
    # before: the stem's (B, 8, 16, 16) maps were read as attention maps over the 16 tokens, and
    # left out, as LeViT's stem at 128 px was (64 x 64 and 16 x 16 maps, stages of 64 and 16
    # tokens)
    model = _ConvStemThenTokens().eval()
    with pytest.warns(UserWarning, match=r"attn_drop: output \(2, 2, 16, 16\) is an attention map"):
        found = _layouts_of(model, "leaves", (64, 64))
    for name in ("stem.0", "stem.1", "stem.2"):
        assert found[name] == ("NCHW", 0, 16, 16, 4.0), name
    assert "attn_drop" not in found
    assert found["proj"] == ("NLC", 0, 4, 4, 16.0)
    # a block (a container) outputs features, never its attention weights
    assert _layouts_of(model, ["st*"], (64, 64))["stem"] == ("NCHW", 0, 16, 16, 4.0)  # a glob


def test_feature_info_module_lists_stand_for_their_last_module():
    """A stage that is a ModuleList (CoaT's serial_blocks) never runs itself: its last block's
    output is the stage's."""
    model = timm.create_model("coat_lite_tiny", pretrained=False)
    layers = default_layers(model)
    assert layers[0] == "serial_blocks1.1" and len(layers) == 4
    modules = dict(model.named_modules())
    assert not any(isinstance(modules[name], nn.ModuleList) for name in layers)


class Unroll(nn.Module):
    """Hiera's token reordering (a stand-in with its class name): raster order -> windows."""

    def forward(self, tokens):
        b, n, c = tokens.shape
        side = int(n**0.5)
        grid = tokens.reshape(b, side // 2, 2, side // 2, 2, c)
        return grid.permute(0, 2, 4, 1, 3, 5).reshape(b, n, c)


class _Unrolled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.embed = nn.Identity()
        self.unroll = Unroll()
        self.block = nn.Linear(8, 8)

    def forward(self, x):
        tokens = self.embed(self.patch(x).flatten(2).transpose(1, 2))
        return self.block(self.unroll(tokens))


def test_unrolled_tokens_are_refused():
    model = _Unrolled().eval()
    found = _layouts_of(model, ["patch", "embed"], (32, 32))
    assert found["embed"] == ("NLC", 0, 8, 8, 4.0)  # before the reordering: a raster grid
    with pytest.raises(ValueError, match=r"'block' outputs tokens .* unrolled order of 'unroll'"):
        _layouts_of(model, ["block"], (32, 32))
    with pytest.warns(UserWarning, match="unrolled order"):
        assert set(_layouts_of(model, "leaves", (32, 32))) == {"patch", "embed"}


class _TwoResolutions(nn.Module):
    """A stage that returns its branches highest resolution first, as HRNet's stages do: stride 2
    and stride 4. ``feature_info`` (when given) declares the stage's stride, as timm's HRNet
    declares that of its lowest-resolution branch."""

    def __init__(self, declared: int | None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular")
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular")
        self.stage = _Branches()
        if declared is not None:
            self.feature_info = [{"module": "stage", "reduction": declared,
                                  "num_chs": {2: 4, 4: 6}[declared]}]

    def forward(self, x):
        high = self.stem(x)
        return self.stage([high, self.down(high)])[1].mean((2, 3))


class _Branches(nn.Module):
    def forward(self, branches):
        return [branch.relu() for branch in branches]


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_multi_resolution_stage_is_measured_at_its_declared_stride(implementation):
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    images = torch.rand(3, 3, 32, 32)
    group = equifast.Translation([4], protocol="circular")
    for declared, stride, channels in ((4, 4, 6), (2, 2, 4)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*feature maps of different sizes")
            result = measure(_TwoResolutions(declared).eval(), images, group=group,
                             layers=["stage"], bootstrap=0, progress=False)
        row = result.frame.query("metric == 'corr' and comparison == 'eq' and element == 'mean'")
        assert row.stride.tolist() == [stride] and row.channels.tolist() == [channels]
        # shifts by a multiple of the stride re-align exactly on a circular network
        assert row.value.iloc[0] == pytest.approx(1.0, abs=1e-5)
    # Without a declared stride the first map is measured, and a warning says so.
    with pytest.warns(UserWarning, match=r"'stage' outputs 2 feature maps of different sizes "
                                         r"\(4 channels, 6 channels;.*\); the first is measured"):
        result = measure(_TwoResolutions(None).eval(), images, group=group, layers=["stage"],
                         bootstrap=0, progress=False)
    assert result.frame.stride.unique().tolist() == [2]


class _TwoTokenBranches(nn.Module):
    """Two token branches (stride 4 and 8 patches, 8 x 8 and 4 x 4 tokens) through one block that
    returns both, as CrossViT's multi-scale blocks do."""

    def __init__(self, declared: int | None = None) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 5, 4, stride=4)
        self.large = nn.Conv2d(3, 7, 8, stride=8)
        self.block = _Branches()
        if declared is not None:  # CrossViT declares its blocks' strides, one per branch
            self.feature_info = [{"module": "block", "reduction": declared, "num_chs": 5}]

    def forward(self, x):
        small = self.small(x).flatten(2).transpose(1, 2)
        return self.block([small, self.large(x).flatten(2).transpose(1, 2)])[0].mean(1)


@pytest.mark.parametrize("declared", [None, 8])
@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_token_branches_of_several_sizes_warn_that_the_first_is_measured(implementation,
                                                                         declared):
    """Also where the model declares a stride for the block: it chooses among 4-D maps only,
    and CrossViT's second branch was left out without a word."""
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    with pytest.warns(UserWarning, match=r"'block' outputs 2 feature maps of different sizes "
                                         r"\(5 channels, 7 channels;.*\); the first is measured"):
        result = measure(_TwoTokenBranches(declared).eval(), torch.rand(2, 3, 32, 32),
                         group="rotation", layers=["block"], bootstrap=0, progress=False)
    assert result.frame.channels.unique().tolist() == [5]


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet18", {}, ["act1", "layer1", "layer2", "layer3", "layer4"]),
        ("resnet18", {"out_indices": (1, 3)}, ["layer1", "layer3"]),
        # FeatureListNet flattens dotted names into its own children
        ("convnext_atto", {}, ["stages_0", "stages_1", "stages_2", "stages_3"]),
        # FeatureGetterNet keeps the model whole, as its child `model`
        ("vit_tiny_patch16_224", {"out_indices": (2, 5)}, ["model.blocks.2", "model.blocks.5"]),
    ],
)
def test_default_layers_of_a_features_only_model_are_its_features(name, kwargs, expected):
    """timm's features_only wrappers keep a FeatureInfo (not a list) of the out_indices they
    return, under their own module names; the default layers were their children, opened."""
    from equifast.layers import declared_reductions

    model = timm.create_model(name, features_only=True, **kwargs)
    assert default_layers(model) == expected
    assert set(declared_reductions(model)) >= set(expected)


def test_feature_info_entries_without_a_module_are_named():
    """timm's HRNet declares `stem` and `stage1`, which its classification model does not have:
    the default layers leave them out, and a warning says so."""
    model = _TwoResolutions(4)
    model.feature_info = [{"module": "stem_block", "reduction": 2},
                          {"module": "stage", "reduction": 4}]
    with pytest.warns(UserWarning, match=r"feature_info names modules it does not have "
                                         r"\(stem_block\)"):
        assert default_layers(model) == ["stage"]


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_layers_of_other_channels_than_feature_info_declares_are_named(implementation):
    """timm's HRNet declares its incre_modules' features under its stages' names: the stages'
    own outputs, which are measured, have other channels, and a warning says so."""
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    images = torch.rand(2, 3, 32, 32)
    settings = dict(group=equifast.Translation([4], protocol="circular"), layers=["stage"],
                    bootstrap=0, progress=False)
    declared = _TwoResolutions(4)  # declares 6 channels at stride 4: what the stage gives
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other channels than timm's feature_info")
        measure(declared.eval(), images, **settings)
    other = _TwoResolutions(4)
    other.feature_info = [{"module": "stage", "reduction": 4, "num_chs": 64}]
    with pytest.warns(UserWarning, match=r"1 layer\(s\) have other channels than timm's "
                                         r"feature_info declares for them: stage \(6, declared "
                                         r"64\)"):
        measure(other.eval(), images, **settings)


def test_a_stride_that_growth_leaves_open_is_a_multiple_of_the_one_before():
    """Sequencer at 128 px: a stride-7 stem (18 x 18), then 9 x 9 grids, which gain 4 cells at
    192 px: strides 13, 14 and 15 all fit, and 14 = 2 x 7 is the one a network downsampling by
    integer factors has."""
    assert stride_from_growth((9, 9), (13, 13), (128, 128)) == (15.0, 15.0)
    assert stride_from_growth((9, 9), (13, 13), (128, 128), multiple_of=7) == (14.0, 14.0)
    # no candidate is a multiple: the rule before it applies
    assert stride_from_growth((16, 16), (20, 20), (224, 224), multiple_of=8) == (14.0, 14.0)
    model = timm.create_model("sequencer2d_s").eval()
    found = _layouts_of(model, ["stages.0", "stages.1", "stages.3"], (128, 128))
    assert [found[n][4] for n in ("stages.0", "stages.1", "stages.3")] == [7.0, 14.0, 14.0]
