"""Unusual models (TorchScript, shared modules, odd layer outputs, forwards without gradients):
the engine and the naive loop measure each alike or say the same clear thing about it."""

import warnings

import pytest
import torch
from torch import nn

import equifast
from equifast import naive

IMPLEMENTATIONS = {"engine": equifast.measure, "naive": naive.measure}
GROUP = "translate:4,8"


def _images():
    return torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _run(measure, model, **kwargs):
    return measure(model, _images(), group=GROUP, bootstrap=0, progress=False, **kwargs)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("make", ["script", "trace"])
def test_a_torchscript_model_is_refused_by_what_it_is(implementation, make):
    model = _cnn().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        scripted = (torch.jit.script(model) if make == "script"
                    else torch.jit.trace(model, torch.rand(1, 3, 32, 32)))
    # before: a traced model gave "none of the 6 selected layers can be measured: did not run
    # in the model's forward pass", a scripted one "the model failed on its probe input (...):
    # register_forward_pre_hook is not supported ... needs input_size=(H, W)"
    with pytest.raises(ValueError, match=r"TorchScript module .*forward hooks do not run.*eager"):
        _run(IMPLEMENTATIONS[implementation], scripted)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_scripted_submodule_is_an_error_when_named_and_left_out_of_a_broad_selection(
        implementation):
    measure = IMPLEMENTATIONS[implementation]
    model = _cnn().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model[2] = torch.jit.script(model[2])
    with pytest.raises(ValueError, match=r"layer '2' is a TorchScript module"):
        _run(measure, model, layers=["2"])
    with pytest.warns(UserWarning, match=r"left out .*'2\.0' is a TorchScript module"):
        result = _run(measure, model, layers="leaves")
    assert set(result.frame.layer) == {"0", "1", "3", "4", "5"}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_scripted_submodule_beside_a_fixed_grid_is_measured(implementation):
    # before: the check of a grid that does not grow with the input (adaptive pooling to 6 x 6)
    # hooked every leaf, the scripted one too: "register_forward_pre_hook is not supported on
    # ScriptModules"
    measure = IMPLEMENTATIONS[implementation]
    model = _cnn().eval()
    model[3] = nn.AdaptiveAvgPool2d(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model[1] = torch.jit.script(model[1])
    model = nn.Sequential(*list(model)[:4])
    with pytest.warns(UserWarning, match=r"keep the same grid at 32x32 and 96x96 pixels"):
        result = _run(measure, model, layers=["0", "3"])
    assert set(result.frame.layer) == {"0", "3"}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_scripted_first_convolution_still_tells_the_input_channels(implementation):
    # before: the first convolution that was an nn.Conv2d was the second one, and the model was
    # refused for "its input has 8 channels"
    measure = IMPLEMENTATIONS[implementation]
    model = _cnn().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model[0] = torch.jit.script(model[0])
    result = _run(measure, model, layers=["1", "2"])
    assert set(result.frame.layer) == {"1", "2"}


class _Quantize(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        if self.dtype.is_complex:
            return torch.fft.fft2(x)
        return (torch.sigmoid(x) * 255).to(self.dtype)


class _WithQuantized(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.q = _Quantize(dtype)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        self.q(x)
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64, torch.complex64])
@pytest.mark.parametrize("align", ["auto", "center"])
def test_a_layer_that_outputs_no_floating_point_features_is_named(implementation, dtype, align):
    # before: the engine failed in the alignment probe ("element 0 of tensors does not require
    # grad") or in its kernel ("feats must have one of the dtypes ... Convert it with .to(...)")
    # while the naive loop measured the layer (the real part of a complex map)
    measure = IMPLEMENTATIONS[implementation]
    model = _WithQuantized(dtype).eval()
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"layer 'q' outputs a {name} tensor .*floating-point"):
        _run(measure, model, layers=["q", "conv"], align=align)
    with pytest.warns(UserWarning, match=rf"1 of 2 selected layers .*'q' outputs a {name}"):
        result = _run(measure, model, layers="leaves", align=align)
    assert set(result.frame.layer) == {"conv"}


class _Shared(nn.Module):
    """``block`` runs twice per forward, at stride 1 and at stride 2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.relu(self.block(torch.relu(self.stem(x))))
        return torch.relu(self.block(self.down(x))).mean((2, 3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_module_that_runs_twice_per_forward_is_named_in_a_warning(implementation):
    # before: measured at its first call without a word, the second call silently unmeasured
    measure = IMPLEMENTATIONS[implementation]
    with pytest.warns(UserWarning, match=r"1 selected layer\(s\) run more than once per forward: "
                      r"block \(2 calls\)\. Each is measured at its first call only"):
        result = _run(measure, _Shared().eval(), layers=["stem", "block"])
    assert (result.frame.query("layer == 'block'").stride == 1).all()  # the first call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(measure, _Shared().eval(), layers=["stem", "down"])  # each runs once: no warning


class _FrozenBackbone(nn.Module):
    """A linear probe: the backbone runs under ``torch.no_grad`` inside the forward."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features.mean((2, 3)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_layers_run_under_no_grad_take_centred_offsets_with_a_warning(implementation):
    # before: "RuntimeError: element 0 of tensors does not require grad and does not have a
    # grad_fn" from the align='auto' probe
    measure = IMPLEMENTATIONS[implementation]
    model = _FrozenBackbone().eval()
    with pytest.warns(UserWarning, match=r"align='auto' found no gradient through 3 layer\(s\): "
                      r"backbone\.0, backbone\.1, backbone\.2 .*torch\.no_grad.*centred"):
        result = _run(measure, model, layers=["backbone.*", "head"])
    centred = _run(measure, model, layers=["backbone.*", "head"], align="center")
    assert result.config["offsets"] == centred.config["offsets"]
    assert result.frame.value.equals(centred.frame.value)


class _SubtractsInPlace(nn.Module):
    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.net = _cnn()

    def forward(self, x):
        return self.net(x.sub_(0.1) if self.in_place else x - 0.1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_model_that_changes_its_input_in_place_is_measured(implementation):
    # before: "a leaf Variable that requires grad is being used in an in-place operation" from
    # the align='auto' probe (the engine added "A model built for another input size needs
    # input_size=(H, W)")
    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    in_place = _SubtractsInPlace(True).eval()
    out_of_place = _SubtractsInPlace(False).eval()
    out_of_place.load_state_dict(in_place.state_dict())
    group = "rotate:90 + flip:h"
    kwargs = dict(group=group, bootstrap=0, progress=False)
    result = measure(in_place, _images(), **kwargs)
    expected = measure(out_of_place, _images(), **kwargs)
    assert result.config["offsets"] == expected.config["offsets"]
    assert result.frame.value.equals(expected.frame.value)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_errors_about_wrapped_names_module_objects_and_input_channels_say_what_to_do(
        implementation):
    measure = IMPLEMENTATIONS[implementation]
    # the inner name of a wrapped model: its full name is among the close names (before: none)
    with pytest.raises(ValueError, match=r"layer '2' matches no module of DataParallel; close "
                       r"names: \['module\.2'"):
        _run(measure, nn.DataParallel(_cnn().eval()), layers=["2"])
    # a module given instead of its name (before: "found Sequential", no name)
    model = _cnn().eval()
    with pytest.raises(TypeError, match=r"found a module \(Sequential\); it is named '2' in the "
                       r"model: pass that name"):
        _run(measure, model, layers=[model[2]])
    with pytest.raises(TypeError, match=r"found a module \(Conv2d\); it is not a submodule"):
        _run(measure, model, layers=[nn.Conv2d(3, 3, 1)])
    # four input channels (timm's in_chans=4): what to do
    four = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
    with pytest.raises(ValueError, match=r"its input has 4 channels .* wrap it in a module that "
                       r"takes RGB images and makes its 4 input channels"):
        _run(measure, four)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("name", "kwargs", "size", "layer", "stride", "offset"), [
    # patch-14 tokens, 4 x 4 at 56 px: one size read them as stride 16 (the power of two
    # among 12..18), and a 14-pixel shift as 0.875 cells
    ("vit_small_patch14_dinov2", dict(img_size=56, depth=1, num_classes=10), 56, "blocks.0",
     14.0, 6.5),
    # 16-pixel patches at stride 8 without padding: 7 x 7 cells of 64 px read as stride 9
    ("pit_ti_224", dict(img_size=64), 64, "transformers.0", 8.0, 7.5),
])
def test_a_model_built_for_one_size_takes_the_strides_timm_declares(
        implementation, name, kwargs, size, layer, stride, offset):
    import timm

    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    group = equifast.Translation([int(stride)], protocol="circular")
    result = measure(model, images, group=group, layers=[layer], bootstrap=0, progress=False)
    rows = result.frame.query("layer == @layer and element != 'mean'")
    assert (rows.stride == stride).all() and (rows.offset_y == offset).all()
    assert rows.exact.all()  # a shift of one patch moves the tokens by one cell
    if implementation == "engine":  # (the naive loop does not report its probes)
        assert "strides as timm's feature_info declares them" in result.config["stride_probe"]


class _GridEncoding(nn.Module):
    """A positional encoding made from the grid size alone, one copy per image, as EdgeNeXt's
    ``pos_embd`` (``(B, C, h, w)``: batch first, yet the same for every image)."""

    def __init__(self, channels):
        super().__init__()
        self.proj = nn.Conv2d(2, channels, 1)

    def forward(self, batch, height, width):
        ys = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
        xs = torch.linspace(0, 1, width).view(1, width).expand(height, width)
        grid = torch.stack([ys, xs]).expand(batch, 2, height, width)
        return self.proj(grid.to(self.proj.weight.dtype))


class _WithGridEncoding(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = _GridEncoding(8)

    def forward(self, x):
        x = self.conv(x)
        return (x + self.pos(x.shape[0], *x.shape[2:])).mean((2, 3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("align", ["auto", "center"])
def test_a_layer_that_does_not_depend_on_the_input_is_named(implementation, align):
    # before: align='auto' failed the whole measurement ("RuntimeError: layer 'pos' does not
    # depend on the input"), also for a broad selection; align='center' scored the fixed map
    # against itself as if it were a feature map (EdgeNeXt's leaves: eq 0.90, inv 1)
    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    model = _WithGridEncoding().eval()
    with pytest.raises(ValueError, match=r"layer 'pos' gives the same features .* does not "
                                         r"depend on the input"):
        _run(measure, model, layers=["conv", "pos"], align=align)
    with pytest.warns(UserWarning, match=r"2 of 3 selected layers .*'pos' gives the same"):
        result = _run(measure, model, layers="**", align=align)
    assert set(result.frame.layer) == {"conv"}


class _PaddedWindows(nn.Module):
    """Window attention that pads the grid to whole 7 x 7 windows and stacks the windows on the
    batch axis, as DaViT's and EfficientViT-M's: on a 4 x 4 grid one padded window per image is
    batch first, (B, C, 7, 7)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.window = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return _in_windows(self.window, self.stem(x)).mean((2, 3))


def _in_windows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` applied to each 7 x 7 window of the grid, padded at its bottom and right end to
    whole windows (the windows of all images along the batch axis); the padding cut off again."""
    batch, channels, height, width = x.shape
    pad_h, pad_w = -height % 7, -width % 7
    x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // 7, (width + pad_w) // 7
    windows = x.view(batch, channels, rows, 7, cols, 7).permute(0, 2, 4, 1, 3, 5)
    windows = module(windows.reshape(-1, channels, 7, 7))
    x = windows.view(batch, rows, cols, channels, 7, 7).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, rows * 7, cols * 7)[:, :, :height, :width]


def _windowed_layer_is_named(measure, build, size: int, shift: int, named: list[str],
                             error: str, warning: str):
    """Of the model ``build()`` makes, naming the windowed layer (last of ``named``) is an
    error, a broad selection leaves it out with a warning and keeps the stem, and a layout given
    for it keeps it, at the user's word; returns that last result."""
    windowed = named[-1]
    torch.manual_seed(0)
    model = build().eval()
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    settings = dict(group=f"translate[circular]:{shift}", bootstrap=0, progress=False)
    with pytest.raises(ValueError, match=error):
        measure(model, images, layers=named, **settings)
    with pytest.warns(UserWarning, match=warning):
        result = measure(model, images, layers="leaves", **settings)
    assert set(result.frame.layer) == {"stem"}
    kept = measure(model, images, layers=named, layouts={windowed: "NCHW"}, **settings)
    assert set(kept.frame.layer) == set(named)
    return kept


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_layer_of_padded_windows_is_named(implementation):
    # before: the window of one image, padded from 4 x 4 to 7 x 7 cells, was measured as a 7 x 7
    # grid of stride 2 (16 px), padding and all (DaViT's and EfficientViT-M's attention
    # internals at 64 px: 7 x 7 at stride 9)
    _windowed_layer_is_named(
        IMPLEMENTATIONS[implementation], _PaddedWindows, 16, 4, ["stem", "window"],
        r"layer 'window' is batch first at 16x16 pixels but not at 80x80 \(it outputs shape "
        r"\(9, 8, 7, 7\) for one image\): it splits the grid into windows",
        r"1 of 2 selected layers .*'window' is batch first")


class _WindowBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.window = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + _in_windows(self.window, x)


class _OneWindowAtBothSizes(nn.Module):
    """A stride-16 stem and a block of 7 x 7 windows: at 32 and at 96 px (2 x 2 and 6 x 6 cells)
    each image is one padded window, batch first at both probe sizes, as the last stage of DaViT
    and EfficientViT-M at 64 px."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 16, stride=16)
        self.block = _WindowBlock()

    def forward(self, x):
        return self.block(self.stem(x)).mean((2, 3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_layer_of_one_padded_window_at_both_probe_sizes_is_named(implementation):
    # before: the window, 7 x 7 cells at 32 and at 96 px, was measured as a grid of the image
    # (DaViT's and EfficientViT-M's last-stage attention internals at 64 px: stride 9)
    kept = _windowed_layer_is_named(
        IMPLEMENTATIONS[implementation], _OneWindowAtBothSizes, 32, 16,
        ["block", "block.window"],
        r"layer 'block.window' keeps a 7x7 grid at 32x32 and 96x96 pixels, while 'block', which "
        r"holds it, outputs 2x2 cells: it works on windows padded",
        r"1 of 2 selected layers .*'block.window' keeps a 7x7")
    # the block itself is the image's grid
    assert kept.frame.set_index("layer").loc["block", "stride"].iloc[0] == 16.0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_undeclared_layers_of_a_one_size_model_take_the_reduction_that_gives_their_grid(
        implementation):
    # PiT at 64 px declares 8, 16 and 32 for its three stages: the patch embedding and the
    # leaves inside the first stage (7 x 7 cells, declared by no module) read as stride 9
    import timm

    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    model = timm.create_model("pit_ti_224", pretrained=False, img_size=64, num_classes=10).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    layers = ["patch_embed", "transformers.0.blocks.0.mlp.fc1", "transformers.1.pool"]
    result = measure(model, images, group=equifast.Translation([8], protocol="circular"),
                     layers=layers, bootstrap=0, progress=False)
    rows = result.frame.drop_duplicates("layer").set_index("layer")
    assert rows.loc[layers, "stride"].tolist() == [8.0, 8.0, 16.0]
    assert rows.loc[layers[:2], "offset_y"].tolist() == [7.5, 7.5]


class _TokenMixer(nn.Module):
    """An MLP-Mixer block: the token-mixing MLP works on transposed tokens, (B, C, L)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 20, 4, stride=4)
        self.norm = nn.LayerNorm(20)
        self.mix = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64))
        self.head = nn.Linear(20, 10)

    def forward(self, x):
        x = self.norm(self.embed(x).flatten(2).transpose(1, 2))  # (B, 64, 20): 8 x 8 tokens
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x.mean(1))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_transposed_tokens_of_a_token_mixing_mlp_are_named(implementation):
    # before: (B, 20, 64) was read as 4 prefix tokens and a 4 x 4 grid of stride 8 (channels
    # as positions); timm's Mixer at 224 px: (B, 512, 196) as 6 + 22 x 23 cells of stride 10
    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    model = _TokenMixer().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    settings = dict(group="translate[circular]:4", bootstrap=0, progress=False)
    with pytest.raises(ValueError, match=r"layer 'mix' outputs shape \(2, 20, 64\) with its "
                                         r"channels first .* the transpose of 'norm'"):
        measure(model, images, layers=["norm", "mix"], **settings)
    with pytest.warns(UserWarning, match=r"3 of 6 selected layers .*'mix\.0' outputs shape "
                                         r"\(2, 20, 32\) with its channels first"):
        result = measure(model, images, layers="leaves", **settings)
    assert set(result.frame.layer) == {"embed", "norm", "head"}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mixer_tokens_whose_grid_fits_worse_than_the_channel_count(implementation):
    # timm's Mixer at 112 px with patch 32: 3 x 3 tokens (stride 32, the last 16 px of each axis
    # dropped) of 64 channels. Counts alone read 64 as the closer grid (8 x 8 of stride 14) and
    # took the blocks' (B, 9, 64) for transposed tokens; the patch embedding's (B, 64, 3, 3)
    # says which axis holds the positions.
    from timm.models.mlp_mixer import MlpMixer

    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    model = MlpMixer(num_classes=10, img_size=112, patch_size=32, num_blocks=1,
                     embed_dim=64).eval()
    images = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    settings = dict(group="flip", bootstrap=0, progress=False)
    rows = measure(model, images, **settings).frame.groupby("layer").first()
    assert list(rows.index) == ["blocks.0"]
    assert rows.loc["blocks.0", ["layout", "grid_h", "grid_w", "channels", "prefix"]].tolist() == [
        "NLC", 3, 3, 64, 0]
    with pytest.warns(UserWarning, match=r"'blocks\.0\.mlp_tokens\.fc1' outputs shape "
                                         r"\(2, 64, 32\) with its channels first"):
        leaves = measure(model, images, layers="leaves", **settings).frame
    assert not leaves.layer.str.contains("mlp_tokens").any()
    assert set(leaves.query("layer.str.startswith('blocks')").layout) == {"NLC"}


class _RoundingGate(nn.Module):
    """A squeeze-and-excitation gate at random init, in miniature: a sigmoid of values near
    1e-16, so 0.5 give or take an ulp in every channel (float64)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return self.gate(1e-15 * self.conv(x)).mean((2, 3))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_pooled_maps_constant_to_rounding_have_no_correlation(implementation):
    # before: the pooled corr was one of rounding errors (the merge of the images' means, each
    # rounded to an ulp of 0.5), and the engine and the naive loop differed by 0.007 on an SE
    # gate of torchvision's EfficientNet-B3 (float64)
    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    model = _RoundingGate().double().eval()
    settings = dict(layers=["conv", "gate"], group=GROUP, bootstrap=0, progress=False,
                    dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"gate: spatially constant features"):
        frame = measure(model, _images(), pooled=True, **settings).frame
    corr = frame.query("metric == 'corr'")
    gate = corr.query("layer == 'gate'")
    assert len(gate) and gate.value.isna().all()
    assert frame.query("layer == 'gate' and metric == 'flat_frac'").value.eq(1).all()
    assert corr.query("layer == 'conv'").value.notna().all()  # the same maps, 1e15 times larger
    assert frame.query("layer == 'gate' and metric == 'cosine'").value.notna().all()
    # image by image the statistics are exact about one of the values: the correlation of the
    # rounded maps themselves, which stays defined
    per_image = measure(model, _images(), **settings).frame
    assert per_image.query("layer == 'gate' and metric == 'corr'").value.notna().all()


def _hiera(size: int = 64):
    """A small timm Hiera (its four stages of one block: 16 x 16, 8 x 8, 4 x 4 and 2 x 2 tokens
    at 64 px, mask-unit attention in the first two) that is exactly equivariant to circular
    shifts by multiples of 32 px: circular padding in the patch embedding and no position
    embedding. Its attention windows (8 x 8 tokens of 4 px) and pooling windows then move onto
    windows, and everything else acts on each token alone or on all tokens alike."""
    from timm.models.hiera import Hiera

    torch.manual_seed(0)
    model = Hiera(img_size=(size, size), embed_dim=8, num_heads=1, stages=(1, 1, 1, 1),
                  num_classes=10).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
    model.patch_embed.proj.padding_mode = "circular"
    return model


def test_hiera_tokens_are_put_back_in_raster_order():
    """Each hooked layer after Hiera's Unroll sees its tokens in raster order: the Unroll's own
    output is the patch embedding's grid, and each stage's last block is what timm's
    forward_intermediates rerolls for that stage."""
    from equifast.layers import LayerHooks

    model = _hiera()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ends = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    seen = {}
    with torch.no_grad(), LayerHooks(model, ["patch_embed", "unroll", *ends],
                                     lambda name, tensor: seen.setdefault(name, tensor)):
        model(images)
        expected = model.forward_intermediates(images, intermediates_only=True)
    # the patch embedding's (B, 16 * 16, C) raster tokens, before the Unroll: left as they are
    # (the position embedding that is added to them is zero here)
    assert seen["patch_embed"].shape == (2, 256, 8)
    torch.testing.assert_close(seen["unroll"], seen["patch_embed"])
    for name, stage in zip(ends, expected, strict=True):  # (B, C, h, w) of each stage
        torch.testing.assert_close(seen[name], stage.flatten(2).transpose(1, 2))
    assert [seen[name].shape[1] for name in ends] == [256, 64, 16, 4]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_hiera_is_measured_exactly_equivariant_where_it_is(implementation):
    # before: every layer after the Unroll was left out ("its tokens are in the unrolled order
    # of 'unroll'"), and measure raised "none of the 4 selected layers can be measured"; read
    # in the unrolled order, these shifts score about 0
    measure = IMPLEMENTATIONS[implementation]
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    settings = dict(group="translate[circular]:32", bootstrap=0, progress=False,
                    dtype=torch.float64, input_size=(64, 64), device="cpu")
    model = _hiera().double()
    for layers in (None, ["blocks.1.attn.qkv", "blocks.2.proj", "blocks.3.mlp.fc1"]):
        frame = measure(model, images, layers=layers, **settings).frame
        eq = frame.query("comparison == 'eq' and metric == 'corr' and element != 'mean'")
        expected = (["blocks.0", "blocks.1", "blocks.2", "blocks.3"] if layers is None
                    else layers)
        assert sorted(eq.layer.unique()) == sorted(expected)
        grids = frame.groupby("layer")[["layout", "grid_h", "grid_w"]].first()
        assert set(grids.layout) == {"NLC"}
        assert len(eq) == 2 * len(expected)  # both axes, every layer
        assert (eq.value > 1 - 1e-9).all(), eq[["layer", "element", "value"]]


class _Unfolds(nn.Module):
    """VOLO's outlook attention unfolds 3 x 3 neighbourhoods: (B, C * 9, L)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.unfold = nn.Unfold(3, padding=1)

    def forward(self, x):
        x = self.embed(x)
        return self.unfold(x).mean(2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_unfolded_patches_are_named(implementation):
    # before: (B, 36, 64) was read as 36 tokens of 64 channels, a 6 x 6 grid of stride 5
    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"layer 'unfold' outputs shape \(2, 36, 64\) with its "
                                         r"channels first .*nn\.Unfold"):
        measure(_Unfolds().eval(), images, layers=["embed", "unfold"],
                group="translate[circular]:4", bootstrap=0, progress=False)


def test_a_feature_info_that_names_no_module_of_the_model_is_named():
    # stages 'block.0'... where no container of the model is named as them or as stages (timm's
    # MViTv2 and Twins, whose are, find theirs: the test after the next): before, the default
    # layers fell back to the top-level children without a word
    from equifast.layers import default_layers

    model = _cnn()
    model.feature_info = [{"module": "block.0", "reduction": 1, "num_chs": 8},
                          {"module": "block.1", "reduction": 2, "num_chs": 8}]
    with pytest.warns(UserWarning, match=r"Sequential's feature_info names modules it does not "
                                         r"have \(block\.0, block\.1\), so its stage outputs are "
                                         r"not known: the default layers are the model's "
                                         r"top-level children, opened \(6: 0, 1, 2\.0, 2\.1, "
                                         r"3, 5\)"):
        # (4, the Flatten, only reshapes 3's output: left out)
        assert default_layers(model) == ["0", "1", "2.0", "2.1", "3", "5"]


class _StagesUnderAnotherName(nn.Module):
    """A network whose feature_info names its stages ``block.0``, ``block.1`` as timm's Twins and
    MViTv2 do; the stages are the children of ``container`` (Twins: ``blocks``, a ModuleList of
    ModuleLists; MViTv2: ``stages``), beside a ModuleList of as many patch embeddings."""

    def __init__(self, container: str, nested: bool):
        super().__init__()
        self.embeds = nn.ModuleList([nn.Conv2d(3, 8, 2, stride=2), nn.Conv2d(8, 8, 2, stride=2)])

        def stage(depth):
            convs = [nn.Conv2d(8, 8, 3, padding=1) for _ in range(depth)]
            return nn.ModuleList(convs) if nested else nn.Sequential(*convs)

        self.container, self.nested = container, nested
        setattr(self, container, nn.ModuleList([stage(2), stage(1)]))
        self.head = nn.Linear(8, 10)
        self.feature_info = [{"module": "block.0", "reduction": 2, "num_chs": 8},
                             {"module": "block.1", "reduction": 4, "num_chs": 8}]

    def forward(self, x):
        for embed, stage in zip(self.embeds, getattr(self, self.container)):
            x = embed(x)
            if self.nested:  # a ModuleList has no forward: its blocks run one by one
                for block in stage:
                    x = block(x)
            else:
                x = stage(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(("container", "nested", "expected"), [
    ("blocks", True, ["blocks.0.1", "blocks.1.0"]),  # Twins: the plural of the stem
    ("stages", False, ["stages.0", "stages.1"]),  # MViTv2: the one container named as stages
])
def test_a_feature_info_that_names_its_stages_otherwise_finds_them(container, nested, expected):
    from equifast.layers import declared_reductions, default_layers

    model = _StagesUnderAnotherName(container, nested)
    with pytest.warns(UserWarning, match=rf"names modules it does not have \(block\.0, block\.1\): "
                                         rf"taken as the children of its '{container}' "
                                         rf"\({', '.join(expected)}\)"):
        assert default_layers(model) == expected
    assert declared_reductions(model) == dict(zip(expected, [2.0, 4.0]))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="taken as the children"):
        result = equifast.measure(model.eval(), images, group="translate[circular]:4",
                                  bootstrap=0, progress=False)
    assert [result.config["layouts"][name] for name in expected] == ["NCHW", "NCHW"]
    assert result.summary()["stride"].tolist() == [2.0, 4.0]


def test_a_feature_info_whose_stages_could_be_in_two_containers_is_not_guessed():
    model = _StagesUnderAnotherName("stages", False)
    model.layers = nn.ModuleList([nn.Identity(), nn.Identity()])  # two stage-named containers
    from equifast.layers import default_layers

    with pytest.warns(UserWarning, match=r"so its stage outputs are not known"):
        default_layers(model)


class _DetachedNeck(nn.Module):
    """A trainable neck on a backbone's detached features: its outputs have a graph through its
    own parameters, none back to the input."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.neck = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x).detach()).mean((2, 3)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_layer_after_a_detached_tensor_takes_the_centred_offset_with_a_warning(
        implementation):
    # before: "RuntimeError: layer 'neck' does not depend on the input" from align='auto'
    measure = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)
    model = _DetachedNeck().eval()
    with pytest.warns(UserWarning, match=r"align='auto' found no gradient through 1 layer\(s\): "
                                         r"neck .*detached tensor.*centred"):
        result = measure(model, _images(), group="rotate:90", layers=["backbone", "neck"],
                         bootstrap=0, progress=False)
    centred = measure(model, _images(), group="rotate:90", layers=["backbone", "neck"],
                      align={"backbone": "auto", "neck": "center"}, bootstrap=0, progress=False)
    assert result.config["offsets"] == centred.config["offsets"]
    assert result.frame.value.equals(centred.frame.value)
