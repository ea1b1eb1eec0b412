"""align="auto": grid offsets from the probe's input gradients (equifast.align)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import equifast
from equifast import align, naive
from equifast.align import GridAnchors, find_offsets
from equifast.layouts import detect_layout, grid_view

SEEDS = range(8)


def _offsets(net: nn.Module, names: list[str], size: int,
             readings: dict[str, str] | None = None) -> dict[str, tuple[float, float]]:
    shapes: dict[str, torch.Size] = {}
    modules = dict(net.named_modules())

    def keep(name: str):
        def hook(module, inputs, output) -> None:
            shapes.setdefault(name, output.shape)
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    layouts = {n: detect_layout(shapes[n], (size, size)) for n in names}
    return find_offsets(net, layouts, (size, size), "auto", readings=readings)


def _seeds_missed(build, expected: dict[str, tuple[float, float]], size: int) -> int:
    """On how many of ``SEEDS`` the offsets of the layers of ``expected`` in ``build()`` differ
    from it (each net built after seeding)."""
    missed = 0
    for seed in SEEDS:
        torch.manual_seed(seed)
        missed += _offsets(build(), list(expected), size) != expected
    return missed


def _spy_on(monkeypatch, name: str) -> list:
    """What each call of ``equifast.align.<name>`` returns, in order, as the calls happen."""
    returned = []
    original = getattr(align, name)

    def spy(*args):
        returned.append(original(*args))
        return returned[-1]

    monkeypatch.setattr(align, name, spy)
    return returned


def _convnext_like() -> nn.Sequential:
    # A 4x4 stride-4 patch stem (o = 1.5), a 7x7 depthwise convolution (o kept), a 2x2 stride-2
    # downsampling (o = 1.5 + 4 * 0.5 = 3.5).
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=4), nn.Conv2d(16, 16, 7, padding=3, groups=16), nn.GELU(),
        nn.Conv2d(16, 32, 2, stride=2), nn.GELU(),
    ).eval()


def _pooled() -> nn.Sequential:
    # 3x3 convolutions keep o = 0; 2x2 average pooling sits between its pixels (o + s * 0.5).
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(), nn.AvgPool2d(2),
    ).eval()


def _unpadded() -> nn.Sequential:
    # Valid 3x3 stride-2 convolutions: pixel i of each sits at 2i + 1 of the one before.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
    ).eval()


def _patches() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 24, 16, stride=16), nn.ReLU()).eval()


def _stride_one() -> nn.Sequential:
    # Few channels and wide kernels: the centroid of a stride-1 layer leans by up to a pixel.
    return nn.Sequential(
        nn.Conv2d(3, 4, 7, padding=3), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2), nn.ReLU(),
    ).eval()


@pytest.mark.parametrize(("build", "size", "expected"), [
    (_convnext_like, 96, {"1": 1.5, "4": 3.5}),
    (_pooled, 64, {"1": 0.0, "2": 0.5, "5": 1.5}),
    (_unpadded, 96, {"1": 1.0, "3": 3.0, "5": 7.0}),
    (_patches, 128, {"1": 7.5}),
    (_stride_one, 48, {"1": 0.0, "3": 0.0}),
])
def test_auto_offsets_are_exact_for_convolutions_whatever_the_weights(build, size, expected):
    """Random weights lean the gradient's centroid; the footprint of a receptive field inside the
    image does not: every seed gives the geometric offsets."""
    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(build(), list(expected), size)
        assert found == {name: (o, o) for name, o in expected.items()}, f"seed {seed}"


def test_the_centroid_alone_leans_with_random_weights(monkeypatch):
    """Why the footprint is used: without it, some seeds miss ConvNeXt's 1.5."""
    monkeypatch.setattr(align, "_footprint_centre", lambda magnitude: None)
    monkeypatch.setattr(align, "_offset_from_borders", lambda *args: None)
    assert _seeds_missed(_convnext_like, {"1": (1.5, 1.5)}, 96) > 0


def test_global_mixing_falls_back_to_the_centroid():
    """A squeeze-excitation gate reaches every pixel: the footprint is the whole image, and the
    centroid (above the flat floor) still finds the local convolution's centre."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Sigmoid())
            self.out = nn.Identity()

        def forward(self, x):
            x = self.conv(x)
            return self.out(x * self.gate(x))

    torch.manual_seed(0)
    net = Gated().eval()
    magnitude = torch.ones(32, 32)
    assert align._footprint_centre(magnitude) is None  # reaches the borders: not used
    assert _offsets(net, ["out"], 32) == {"out": (0.0, 0.0)}


def _squeeze_excited(kind: str) -> nn.Sequential:
    # Stride-2 3x3 convolutions (o = 0), each followed by a squeeze-and-excitation block: its
    # gate, from the global mean, reaches every pixel.
    def gate(channels: int) -> nn.Module:
        if kind == "torchvision":
            from torchvision.ops import SqueezeExcitation

            return SqueezeExcitation(channels, 4)
        from timm.layers import SEModule

        return SEModule(channels)

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), gate(16), nn.ReLU(),
        nn.Conv2d(16, 16, 5, stride=2, padding=2), gate(16), nn.ReLU(),
    ).eval()


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_squeeze_excitation_gates_do_not_hide_the_footprint(kind):
    """The probe stops the gradient at the gates of squeeze-and-excitation blocks: the layers
    after one keep the footprint of their convolutions (every seed exact), where the centroid of
    random weights missed by half a pixel and more on some seeds."""
    expected = {"1": (0.0, 0.0), "5": (0.0, 0.0)}
    for seed in SEEDS:
        torch.manual_seed(seed)
        net = _squeeze_excited(kind)
        assert _offsets(net, list(expected), 64) == expected, f"seed {seed}"
    # the measure itself takes them (engine and naive alike), and the forward is untouched; on
    # a seed whose centroid misses by half a pixel at "3" without the cut, for both kinds
    torch.manual_seed(1)
    net = _squeeze_excited(kind)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(images)
    for measure in (equifast.measure, naive.measure):
        result = measure(net, images, group="rotate:90", layers=list(expected), bootstrap=0,
                         progress=False)
        assert {k: tuple(v) for k, v in result.config["offsets"].items()} == expected
    with torch.no_grad():
        assert torch.equal(net(images), before)  # no hook left behind
    # measuring every leaf, the gates' own modules included (vectors, without an offset)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="align='auto' found no gradient")
        leaves = equifast.measure(net, images, group="rotate:90", layers="leaves", bootstrap=0,
                                  progress=False)
    assert {k: tuple(v) for k, v in leaves.config["offsets"].items()
            if k in ("0", "3")} == {"0": (0.0, 0.0), "3": (0.0, 0.0)}
    with align.global_gates_cut(net):
        assert len(list(net[1].children())) == sum(
            len(child._forward_hooks) for child in net[1].children())


def test_footprint_centre():
    magnitude = torch.zeros(10, 12)
    magnitude[2:7, 3:6] = torch.rand(5, 3) + 0.1
    assert align._footprint_centre(magnitude) == (4.0, 4.0)
    magnitude[0, 4] = 1.0  # reaches the top border: cut there, so not a centre
    assert align._footprint_centre(magnitude) is None
    assert align._footprint_centre(torch.zeros(5, 5)) is None


class _ChannelNorm(nn.Module):
    """A LayerNorm over the channels of an NCHW map (timm's LayerNorm2d), untrained: weight 1,
    bias 0, so that the channels of every position sum to exactly 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_layer_norm_at_init_does_not_blind_the_probe():
    """The probe mixes the channels with random weights: their plain sum after an untrained
    LayerNorm is 0 at every position and its gradient round-off noise. Behind global mixing (a
    gate: the centroid decides) that put a stride-8 stage's offset up to 7.5 px off over these
    seeds; now it stays within 1 px of the geometric 3.5."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stem_norm = nn.Conv2d(3, 32, 4, stride=4), _ChannelNorm(32)
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 32, 1), nn.Sigmoid())
            self.mix = nn.Conv2d(32, 32, 3, padding=1)
            self.down, self.down_norm = nn.Conv2d(32, 64, 2, stride=2), _ChannelNorm(64)

        def forward(self, x):
            x = self.stem_norm(self.stem(x))
            x = x + self.mix(x * self.gate(x))
            return self.down_norm(self.down(x))

    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(Net().eval(), ["stem_norm", "down_norm"], 96)
        assert found["stem_norm"] == (1.5, 1.5), seed
        assert max(abs(o - 3.5) for o in found["down_norm"]) <= 1.0, (seed, found)


def _wide_fields(depth: int = 4, channels: int = 16) -> nn.Sequential:
    # 2x2 average pooling (o = 0.5, s = 2), then 5x5 convolutions: at 40 px the field of the
    # central block (radius about 17.5 px) reaches every border, the border cells' fields do not.
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.AvgPool2d(2)]
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 5, padding=2), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def test_border_fields_give_the_offset_when_the_central_field_reaches_the_borders(monkeypatch):
    """Deep layers whose central receptive field is wider than the image (MobileNetV2's or
    EfficientNet's stride-16 stages at 224 px) took the centroid of random weights, which leans;
    the inner edges of the border cells' fields give the geometric offset on every seed."""
    last = "9"
    for seed in SEEDS:
        torch.manual_seed(seed)
        assert _offsets(_wide_fields(), [last], 40) == {last: (0.5, 0.5)}, f"seed {seed}"
    # the engine and the naive loop take it too
    torch.manual_seed(0)
    net = _wide_fields()
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    for measure in (equifast.measure, naive.measure):
        result = measure(net, images, group="flip", layers=[last], bootstrap=0, progress=False)
        assert tuple(result.config["offsets"][last]) == (0.5, 0.5)
    # without the border fields (and the anchor's offset, which the pooling's grid shares),
    # the centroid misses on most of these seeds
    monkeypatch.setattr(align, "_offset_from_borders", lambda *args: None)
    monkeypatch.setattr(align, "_same_grid_offset", lambda *args: None)
    assert _seeds_missed(_wide_fields, {last: (0.5, 0.5)}, 40) >= 4


class _PaddedWindows(nn.Module):
    """A 3x3 convolution, then each 6 x 6 window of the grid (padded at its bottom and right end
    to whole windows) adds its mean to its cells, as window attention mixes a window: the
    fields of neighbouring cells end at one window edge, not one cell apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Identity()

    def forward(self, x):
        x = self.conv(x)
        height, width = x.shape[-2:]
        padded = nn.functional.pad(x, (0, -width % 6, 0, -height % 6))
        means = nn.functional.avg_pool2d(padded, 6)
        means = means.repeat_interleave(6, -2).repeat_interleave(6, -1)
        return self.out(x + means[..., :height, :width])


def test_border_fields_that_are_no_translates_are_not_read(monkeypatch):
    """Windows padded at one end (a 10-cell grid in 6-cell windows, the central block's field
    reaching the borders): the border cells' fields end at the windows' edges, not one cell
    apart as translates would: nothing is read from them."""
    read = _spy_on(monkeypatch, "_offset_from_borders")
    # the borders alone: on the convolution's grid the windows' cells read right (see below)
    monkeypatch.setattr(align, "_relayed_offset", lambda *args: None)
    for seed in SEEDS:
        torch.manual_seed(seed)
        _offsets(_PaddedWindows().eval(), ["out"], 10)
    assert read and all(found is None for found in read)
    # windows tiling the grid exactly (two of 6 cells in 12) are symmetric, but a first and a
    # second cell still share a window: not read either
    read.clear()
    torch.manual_seed(0)
    _offsets(_PaddedWindows().eval(), ["out"], 12)
    assert read == [None]


def test_a_gradient_near_underflow_is_not_read_for_its_support():
    """Paths that come near the smallest normal number may have rounded to 0 elsewhere: a
    support read from them can end short (timm's ConvNeXt at init, 1e-6 per residual branch)."""
    normal = torch.tensor([0.0, 1e-20, 3.0])
    assert not align._underflows(normal)
    assert align._underflows(torch.tensor([0.0, 1e-44, 3.0]))  # a float32 subnormal
    assert not align._underflows(torch.tensor([0.0, 1e-44, 3.0], dtype=torch.float64))
    assert not align._underflows(torch.zeros(3))


class _ScaledBranches(nn.Module):
    """Residual 5x5 convolutions, each scaled by ``scale``, after a 2x2 average pooling
    (o = 0.5), as timm's ConvNeXt scales its branches by 1e-6 at init."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.AvgPool2d(2))
        self.branches = nn.ModuleList(nn.Conv2d(16, 16, 5, padding=2) for _ in range(4))
        self.out = nn.Identity()

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            x = x + self.scale * branch(x)
        return self.out(x)


def test_supports_are_read_in_float64_and_not_near_underflow(monkeypatch):
    """At 40 px the field of the central block reaches every border; in float64 the border
    fields give the exact offset even where paths through four branches are 1e-60. In float32
    at 3e-11 per branch the outermost paths fall among the subnormal numbers, some round to 0
    and the supports end short, unevenly: read anyway, they missed by a pixel and more; not
    read, the centroid stays within half a pixel."""
    layout = detect_layout((1, 16, 20, 20), (40, 40))
    for seed in SEEDS:
        torch.manual_seed(seed)
        net = _ScaledBranches(1e-15).eval().double()
        found = find_offsets(net, {"out": layout}, (40, 40), dtype=torch.float64)
        assert found == {"out": (0.5, 0.5)}, f"seed {seed}"

    def largest_miss() -> float:
        misses = []
        for seed in SEEDS:
            torch.manual_seed(seed)
            found = find_offsets(_ScaledBranches(3e-11).eval(), {"out": layout}, (40, 40))
            misses += [abs(offset - 0.5) for offset in found["out"]]
        return max(misses)

    # the input's supports alone (on the stem's grid the paths are not as small)
    monkeypatch.setattr(align, "_relayed_offset", lambda *args: None)
    assert largest_miss() <= 0.5
    monkeypatch.setattr(align, "_underflows", lambda gradient: False)
    assert largest_miss() >= 1.0


class _GlobalMix(nn.Module):
    """A residual update from the mean over every position, as attention reaches every token."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Linear(channels, channels)

    def forward(self, x):
        return x + self.mix(x.mean((2, 3)))[:, :, None, None]


def _tiny_vit() -> nn.Sequential:
    # 8-pixel patches (o = 3.5), then global mixing: the footprint of every block is the image
    return nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), _GlobalMix(16), nn.GELU(),
                         _GlobalMix(16)).eval()


def test_layers_after_global_mixing_take_the_offset_of_the_patches_they_carry(monkeypatch):
    """Attention reaches every pixel: the centroid of random weights read a ViT's blocks as 7 and
    8 instead of 7.5. The blocks' strongest cells on the patch grid are their own: they carry
    the patches along the residual path, and take the patch embedding's exact offset."""
    for seed in SEEDS:
        torch.manual_seed(seed)
        assert _offsets(_tiny_vit(), ["3"], 64) == {"3": (3.5, 3.5)}, f"seed {seed}"
    # without the relay and the later readings from the patch grid, the centroid misses
    for reading in ("_relayed_offset", "_carried_offset", "_same_grid_offset"):
        monkeypatch.setattr(align, reading, lambda *args: None)
    assert _seeds_missed(_tiny_vit, {"3": (3.5, 3.5)}, 64) > 0


class _LayerScaled(nn.Module):
    """ConvNeXt's shape at init: a 4x4 patch stem (o = 1.5), residual 5x5 convolutions scaled by
    1e-6, a 2x2 downsampling (o = 3.5), more of them, a 3x3 stride-2 head (o = 3.5). In float32
    the input-gradient's paths through six branches underflow, so no footprint is read from it;
    on the downsampling's grid the head's footprint lies inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.stage0 = nn.ModuleList(nn.Conv2d(16, 16, 5, padding=2) for _ in range(3))
        self.down = nn.Conv2d(16, 16, 2, stride=2)
        self.stage1 = nn.ModuleList(nn.Conv2d(16, 16, 5, padding=2) for _ in range(3))
        self.head = nn.Conv2d(16, 16, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.stage0:
            x = x + 1e-6 * branch(x)
        x = self.down(x)
        for branch in self.stage1:
            x = x + 1e-6 * branch(x)
        return self.head(x)


def test_a_footprint_on_the_grid_of_the_downsampling_before_gives_the_offset(monkeypatch):
    relayed = _spy_on(monkeypatch, "_relayed_offset")
    for seed in SEEDS:
        torch.manual_seed(seed)
        assert _offsets(_LayerScaled().eval(), ["head"], 192) == {"head": (3.5, 3.5)}, seed
    assert relayed and all(found == (3.5, 3.5) for found in relayed)


def _window_means(x: torch.Tensor, window: int = 6) -> torch.Tensor:
    """Each ``window`` x ``window`` window of the grid (padded at its bottom and right end) adds
    its mean to its cells, as window attention mixes a window."""
    height, width = x.shape[-2:]
    padded = nn.functional.pad(x, (0, -width % window, 0, -height % window))
    means = nn.functional.avg_pool2d(padded, window).repeat_interleave(window, -2)
    return x + means.repeat_interleave(window, -1)[..., :height, :width]


def test_footprints_of_windows_on_an_anchor_grid_are_not_read():
    """A 2x2 patch merging (o = 1.5 on a stride-2 anchor of o = 0.5) reads its offset off its
    footprint on the anchor's grid; behind windows padded at one end (Swin at 128 px) that
    footprint ends at window edges, not one cell further for the next block, and is not read:
    taken, it had put timm's Swin-T's second stage at 9.5 pixels instead of 3.5."""
    torch.manual_seed(0)
    anchor = torch.randn(2, 8, 20, 20, requires_grad=True)
    anchor_layout = detect_layout(anchor.shape, (40, 40))
    merge = nn.Conv2d(8, 8, 2, stride=2)
    sources = [(anchor, anchor_layout, (0.5, 0.5))]
    mix = torch.randn(8)
    block = (align._central_block(10), align._central_block(10))
    for windows, expected in ((False, (1.5, 1.5)), (True, None)):
        merged = merge(_window_means(anchor) if windows else anchor)
        layout = detect_layout(merged.shape, (40, 40))
        assert layout.stride == (4.0, 4.0)
        found = align._relayed_offset(grid_view(merged, layout), mix, layout, block, sources,
                                      (1.5, 1.5))
        assert found == expected, windows


class _LocalWindows(nn.Module):
    """4x4 patches (o = 1.5), then each 3 x 3 window of cells (padded at the end) adds its mean
    to its cells, as NesT's and Twins' local attention: the footprint of a block of cells is
    the windows that hold it, inside the image, and its centre is the windows' centre."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(_window_means(self.patch(x), window=3))


def test_a_footprint_of_windows_is_not_taken_for_a_field(monkeypatch):
    """At 40 px the central block (cells 4 and 5) lies in one window (cells 3 to 5): its
    footprint's centre put the offset at -0.5, within the half stride of the centroid that a
    footprint was trusted in. The next block's footprint does not move by one stride: it is
    not taken, and the cells carried on the patches' grid give their exact 1.5."""
    for seed in SEEDS:
        torch.manual_seed(seed)
        assert _offsets(_LocalWindows().eval(), ["out"], 40) == {"out": (1.5, 1.5)}, seed
    monkeypatch.setattr(align, "_footprint_translates", lambda *args: True)
    assert _seeds_missed(lambda: _LocalWindows().eval(), {"out": (1.5, 1.5)}, 40) > 0


class _MergedWindows(nn.Module):
    """Swin's shape: 4x4 patches (o = 1.5), windows of 6 cells padded at the end (each adds its
    mean to its cells, as window attention mixes a window), a 2x2 patch merging as timm's
    (cells stacked into channels, then a linear map: o = 3.5, stride 8), windows again. Every
    footprint is windows (on the input and on the patches' grid): none moves by one stride when
    its block moves by one cell, and the merging's module takes its input on its own grid."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.merge = nn.Conv2d(64, 16, 1)
        self.out = nn.Identity()

    def forward(self, x):
        cells = _window_means(_window_means(self.patch(x)))
        merged = self.merge(nn.functional.pixel_unshuffle(cells, 2))
        return self.out(_window_means(merged, window=3))


def test_a_patch_merging_behind_windows_is_read_from_the_cells_it_carries(monkeypatch):
    """Behind windows the merging's strongest cells on the patches' grid are its own 2x2 cells
    per cell, carried along the residual path, and they move by two cells with the block: the
    merging takes 1.5 + 4 * 0.5 = 3.5, and the windows after it its offset (timm's Swin-T at
    224 px read 4.5 / 4.0, 5.5 and 15.0 for its last three stages instead of 3.5, 7.5, 15.5)."""
    carried = _spy_on(monkeypatch, "_carried_offset")
    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(_MergedWindows().eval(), ["merge", "out"], 96)
        assert found == {"merge": (3.5, 3.5), "out": (3.5, 3.5)}, (seed, found)
    assert (3.5, 3.5) in carried
    monkeypatch.setattr(align, "_carried_offset", lambda *args: None)
    assert _seeds_missed(lambda: _MergedWindows().eval(), {"merge": (3.5, 3.5)}, 96) > 0


def test_direct_cells_need_a_clear_gap():
    magnitude = torch.full((8, 8), 0.2)
    magnitude[2:4, 3:5] = 1.0
    assert align._direct_cells(magnitude, (2, 2)) == (range(2, 4), range(3, 5))
    assert align._direct_cells(magnitude, (1, 2)) is None  # four cells tie
    magnitude[5, 5] = 0.9  # a fifth cell about as strong: no clear gap
    assert align._direct_cells(magnitude, (2, 2)) is None
    magnitude[5, 5] = 0.2
    magnitude[3, 4] = 0.1  # the four strongest cells are no rectangle
    magnitude[6, 6] = 1.0
    assert align._direct_cells(magnitude, (2, 2)) is None


class _Reductions(nn.Module):
    """Inception's shape: a stride-2 stem (o = 0), convolutions padded to keep the grid whose
    fields span the image even from its border cells, an unpadded 3x3 stride-2 reduction
    (o = 0 + 2 * 1 = 2, stride 4) and more wide convolutions after it. No path carries a cell as
    it is, and no footprint of a later layer lies inside the input or the stem's grid."""

    def __init__(self, depth: int = 10, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.wide = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 5, padding=2),
                                                  nn.ReLU()) for _ in range(depth)])
        self.reduce = nn.Conv2d(channels, channels, 3, stride=2)
        self.after = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 5, padding=2),
                                                   nn.ReLU()) for _ in range(3)])

    def forward(self, x):
        return self.after(self.reduce(self.wide(self.stem(x))))


def test_reductions_behind_fields_wider_than_the_image_compose_their_offsets(monkeypatch):
    """Layers that keep their grid's size take the offset of the grid's first layer, and an
    unpadded stride-2 reduction is read on its own input, one kernel wide: exact where every
    field spans the image (timm's Inception v3 at 224 px read 20.5-23.5 for its later
    stride-16 blocks and 43-45 for its stride-32 ones instead of 21 and 37)."""
    expected = {"wide": (0.0, 0.0), "reduce": (2.0, 2.0), "after": (2.0, 2.0)}
    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(_Reductions().eval(), list(expected), 40)
        assert found == expected, (seed, found)
    for reading in ("_local_source", "_same_grid_offset"):
        monkeypatch.setattr(align, reading, lambda *args: None)
    assert _seeds_missed(lambda: _Reductions().eval(), expected, 40) > 0


class _ReducedKeys(nn.Module):
    """PVT's shape: 4x4 patches (o = 1.5), attention whose keys and values are reduced by a
    4x4 stride-4 convolution (o = 7.5, stride 16) and mixed into every cell, two 3x3 stride-2
    downsamplings (o = 1.5, the stride-16 grid again), convolutions whose fields span the
    image. The keys' grid and the last stage's have one size and two offsets."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, channels, 4, stride=4)
        self.keys = nn.Conv2d(channels, channels, 4, stride=4)
        self.down1 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.wide = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                                  nn.ReLU()) for _ in range(3)])

    def forward(self, x):
        x = self.patch(x)
        x = x + self.keys(x).mean((2, 3), keepdim=True)
        return self.wide(self.down2(self.down1(x)))


def test_a_grid_of_one_size_made_again_is_an_anchor_of_its_own():
    """The downsampling to the stride-16 grid begins a grid of its own although the keys'
    reduction made one of that size before: the layers after it take its offset, not the
    keys' (PVT-v2-b0's last stage read 14 instead of 0 at 224 px, the offset of its first
    attention's keys)."""
    net = _ReducedKeys().eval()
    with GridAnchors(net, (64, 64), 1) as anchors:
        net(torch.zeros(1, 3, 64, 64, requires_grad=True))
    assert [anchor.name for anchor in anchors.anchors] == ["patch", "keys", "down1", "down2"]
    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(_ReducedKeys().eval(), ["down2", "wide"], 64)
        assert found == {"down2": (1.5, 1.5), "wide": (1.5, 1.5)}, (seed, found)


class _SidePath(nn.Module):
    """NASNet's shape: a stride-2 stem, a stride-2 reduction of it, and beside the reduction the
    stem's map shifted by a cell (a crop and a pad) and pooled 1 x 1 with stride 2: the
    reduction's grid size again, from an older grid, with another offset (2 instead of 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shift = nn.ZeroPad2d((-1, 1, -1, 1))
        self.side = nn.AvgPool2d(1, stride=2)

    def forward(self, x):
        x = self.stem(x)
        return self.down(x) + self.side(self.shift(x))


def test_a_side_path_from_an_older_grid_is_no_anchor():
    net = _SidePath().eval()
    with GridAnchors(net, (32, 32), 1) as anchors:
        net(torch.zeros(1, 3, 32, 32, requires_grad=True))
    assert [anchor.name for anchor in anchors.anchors] == ["stem", "down"]
    assert [anchor.again for anchor in anchors.anchors] == [False, False]


class _PooledGate(nn.Module):
    """GhostNetV2's shape: a stride-2 stem (o = 0), a gate computed on the stem's map pooled
    2x2 by functional code (the stride-4 grid's size first appears there, o = 1), multiplied
    back into the stem's map, then the stage's own 3x3 stride-2 downsampling (o = 0) and
    convolutions whose fields span the image."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.gate = nn.Conv2d(channels, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.wide = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                                  nn.ReLU()) for _ in range(4)])

    def forward(self, x):
        x = self.stem(x)
        gate = torch.sigmoid(self.gate(nn.functional.avg_pool2d(x, 2)))
        x = x * nn.functional.interpolate(gate, scale_factor=2.0, mode="nearest")
        return self.wide(self.down(x))


def test_a_grid_made_by_functional_code_gives_no_offset_to_its_layers(monkeypatch):
    """The gate's convolution is the first output of the stride-4 grid's size, but functional
    pooling made its grid: its offset (1) is not handed to the stage's layers, whose grid the
    downsampling made (GhostNetV2's last stage read 6 for 0 at 224 px)."""
    shared = _spy_on(monkeypatch, "_same_grid_offset")
    net = _PooledGate().eval()
    with GridAnchors(net, (32, 32), 1) as anchors:
        net(torch.zeros(1, 3, 32, 32, requires_grad=True))
    gate = [anchor for anchor in anchors.anchors if anchor.name == "gate"]
    assert gate and gate[0].input is None and not gate[0].again
    for seed in SEEDS:
        torch.manual_seed(seed)
        _offsets(_PooledGate().eval(), ["wide"], 32)
    assert shared and (1.0, 1.0) not in shared


@pytest.mark.parametrize(("build", "size", "expected"), [
    (_convnext_like, 96, {"1": "footprint", "4": "footprint"}),
    (_wide_fields, 40, {"9": "borders"}),
    (_tiny_vit, 64, {"3": "anchor"}),
    (lambda: _Reductions().eval(), 40, {"wide": "anchor grid", "reduce": "anchor",
                                        "after": "anchor grid"}),
])
def test_readings_say_how_each_offset_was_found(build, size, expected):
    torch.manual_seed(0)
    readings: dict[str, str] = {}
    _offsets(build(), list(expected), size, readings)
    assert readings == expected
    assert set(readings.values()) <= set(align.READINGS)


def test_the_config_says_how_each_offset_was_found():
    torch.manual_seed(0)
    net = nn.Sequential(_convnext_like(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    for measure in (equifast.measure, naive.measure):
        result = measure(net, images, group="flip", layers=["0.1", "0.4", "2"], bootstrap=0,
                         progress=False, align={"0.4": "corner"})
        # the vector layer has no grid, hence no offset and no reading
        assert result.config["offset_readings"] == {"0.1": "footprint", "0.4": "given"}
        assert set(result.config["offsets"]) == {"0.1", "0.4"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_probed_in_float32_and_left_as_it_was(dtype):
    """In 16-bit floats the gradients round small contributions to 0: no footprint was read,
    and every offset leaned with the centroid (bfloat16: 1.5 / 0.0 for 1.5, 4.5 / 3.5 for 3.5).
    The probe widens the parameters to float32 and narrows them back, bit for bit."""
    expected = {"1": [1.5, 1.5], "4": [3.5, 3.5]}
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    for measure, model_dtype in ((equifast.measure, None), (equifast.measure, dtype),
                                 (naive.measure, dtype)):
        torch.manual_seed(0)
        net = _convnext_like().to(dtype)
        before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
        parameters = list(net.parameters())
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="align='auto' could only estimate")
            result = measure(net, images, group="flip", layers=list(expected), bootstrap=0,
                             progress=False, dtype=model_dtype)
        assert result.config["offsets"] == expected, measure
        assert result.config["offset_readings"] == {"1": "footprint", "4": "footprint"}
        assert all(now is then for now, then in zip(net.parameters(), parameters, strict=True))
        for name, tensor in net.state_dict().items():
            assert tensor.dtype == dtype and torch.equal(tensor, before[name]), name


class _CastsToBfloat16(nn.Module):
    """A model that casts its input to bfloat16 itself: it fails in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _convnext_like().to(torch.bfloat16)

    def forward(self, x):
        return self.body(x.to(torch.bfloat16))


def test_a_model_that_fails_in_float32_is_probed_in_its_dtype_and_its_estimates_are_said():
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    for measure in (equifast.measure, naive.measure):
        torch.manual_seed(0)
        net = _CastsToBfloat16().eval()
        before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
        with pytest.warns(UserWarning, match=r"could only estimate the grid offsets of 2 layer"
                                             r"\(s\), from the centroid .*: body\.1, body\.4\. "
                                             r"The scores of rotations and flips"):
            result = measure(net, images, group="flip", layers=["body.1", "body.4"],
                             bootstrap=0, progress=False, dtype=torch.bfloat16)
        assert result.config["offset_readings"] == {"body.1": "centroid", "body.4": "centroid"}
        for name, tensor in net.state_dict().items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, before[name]), name
        # translations do not depend on the offsets: nothing to warn about
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="align='auto' could only estimate")
            shifted = measure(net, images, group="translate:4", layers=["body.1", "body.4"],
                              bootstrap=0, progress=False, dtype=torch.bfloat16)
        assert shifted.config["offset_readings"] == result.config["offset_readings"]


class _SmallGrid(nn.Module):
    """EfficientNet's stride-32 stage at 128 px: behind a grid whose fields span the image, a
    6x6 depthwise stride-2 reduction (o = 1 + 4 * (2.5 - 2) = 3) to a grid of 4 x 4 cells, where
    the footprint of the central block on the reduction's input reaches that grid's borders."""

    def __init__(self, depth: int = 6, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2)  # unpadded: o = 1
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.wide = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 5, padding=2),
                                                  nn.ReLU()) for _ in range(depth)])
        self.reduce = nn.Conv2d(channels, channels, 6, stride=2, padding=2, groups=channels)
        self.after = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                                   nn.ReLU()) for _ in range(2)])

    def forward(self, x):
        return self.after(self.reduce(self.wide(self.down(self.stem(x)))))


def test_a_reduction_to_a_small_grid_is_read_from_its_border_fields_on_its_input(monkeypatch):
    expected = {"wide": (1.0, 1.0), "reduce": (3.0, 3.0), "after": (3.0, 3.0)}
    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(_SmallGrid().eval(), list(expected), 32)
        assert found == expected, (seed, found)
    monkeypatch.setattr(align, "_local_borders", lambda *args, **kwargs: None)
    assert _seeds_missed(lambda: _SmallGrid().eval(), expected, 32) > 0


def _window_sums(x: torch.Tensor, window: int) -> torch.Tensor:
    """Each cell plus the sum of its window (padded at the end): a post-norm block, whose
    normalized attention branch outweighs the residual path (torchvision's Swin V2)."""
    return x + window * window * (_window_means(x, window) - x)


class _SlicedMerging(nn.Module):
    """torchvision's ``PatchMergingV2``: 2 x 2 cells stacked into channels by code in its
    forward (o = 1.5 + 4 * 0.5 = 3.5), then its leaf, a linear reduction, on the merged grid."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(64, 16, 1)

    def forward(self, x):
        return self.reduction(nn.functional.pixel_unshuffle(x, 2))


class _PostNormWindows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.merge = _SlicedMerging()
        self.out = nn.Identity()

    def forward(self, x):
        cells = _window_sums(_window_sums(self.patch(x), 5), 5)
        return self.out(_window_sums(self.merge(cells), 5))


def test_a_grid_made_inside_a_module_is_read_on_that_modules_input(monkeypatch):
    """The merged grid's first leaf (the reduction) takes its input on that grid already, and
    no cell stands out behind the windows: the merging's module, which made the grid from the
    patches', is read on its own input instead (torchvision's Swin V2 had every stage after the
    first left to the centroid: -3.5 / -0.5 for 15.5 at 224 px)."""
    expected = {"merge": (3.5, 3.5), "out": (3.5, 3.5)}
    net = _PostNormWindows().eval()
    with GridAnchors(net, (96, 96), 1) as anchors:
        net(torch.zeros(1, 3, 96, 96, requires_grad=True))
    reduction = [anchor for anchor in anchors.anchors if anchor.name == "merge.reduction"]
    assert reduction and reduction[0].input_layout.grid_h == 24
    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(_PostNormWindows().eval(), list(expected), 96)
        assert found == expected, (seed, found)
    monkeypatch.setattr(GridAnchors, "_made_inside", lambda *args: None)
    assert _seeds_missed(lambda: _PostNormWindows().eval(), expected, 96) > 0


class _GatedDownsampling(nn.Module):
    """GhostNetV2's strided block: a gate from functionally pooled input (o = 0.5 + ...) beside
    the strided convolution that makes the block's grid (o = 0)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 1)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        gate = torch.sigmoid(self.gate(nn.functional.avg_pool2d(x, 2)))  # first, as GhostNetV2's
        return self.down(x) * gate


def test_a_grid_a_leaf_made_inside_a_module_leaves_the_side_paths_anchor_alone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _GatedDownsampling()).eval()
    with GridAnchors(net, (32, 32), 1) as anchors:
        net(torch.zeros(1, 3, 32, 32, requires_grad=True))
    gate = [anchor for anchor in anchors.anchors if anchor.name == "1.gate"]
    assert gate and gate[0].input is None


class _TokenMix(nn.Module):
    """Tokens ``(B, L, C)``, each updated from the mean of all: attention's global reach."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Linear(channels, channels)

    def forward(self, x):
        return x + self.mix(x.mean(1, keepdim=True))


class _Subsample(nn.Module):
    """LeViT's subsampling of a token grid by slicing, here from its second cell: o + s."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x):
        batch, _, channels = x.shape
        grid = x.view(batch, self.size, self.size, channels)[:, 1::2, 1::2]
        return grid.reshape(batch, -1, channels)


class _SubsampledTokens(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, channels, 4, stride=4)  # o = 1.5
        self.mix = _TokenMix(channels)
        self.subsample = _Subsample(16)  # o = 1.5 + 4 = 5.5, stride 8
        self.proj = nn.Linear(channels, channels)
        self.after = _TokenMix(channels)

    def forward(self, x):
        tokens = self.mix(self.patch(x).flatten(2).transpose(1, 2))
        return self.after(self.proj(self.subsample(tokens)))


def test_a_token_grid_subsampled_by_a_module_is_an_anchor(monkeypatch):
    """Token grids (B, L, C) begin grids too: LeViT's stride-32 and stride-64 stages read the
    centroid's 10.5 / 11.0 and 10.0 / 11.0 at 224 px instead of 0."""
    expected = {"mix": (1.5, 1.5), "proj": (5.5, 5.5), "after": (5.5, 5.5)}
    for seed in SEEDS:
        torch.manual_seed(seed)
        found = _offsets(_SubsampledTokens().eval(), list(expected), 64)
        assert found == expected, (seed, found)
    grids_only = GridAnchors._feature_map

    def four_dimensional(self, tensor):
        return (None, None) if tensor is not None and tensor.dim() == 3 else grids_only(self,
                                                                                       tensor)

    monkeypatch.setattr(GridAnchors, "_feature_map", four_dimensional)
    assert _seeds_missed(lambda: _SubsampledTokens().eval(), expected, 64) > 0


def _count_layer_reads(monkeypatch) -> list[int]:
    """The ids of the tensors the probe reads for layers (not for anchors), in order, from now on
    (align._read_offset wrapped)."""
    reads: list[int] = []
    read_offset = align._read_offset

    def counted(tensor, *args, **kwargs):
        if kwargs["seed"] < 10_000:  # the layers', not the anchors' (seeds from 10_000)
            reads.append(id(tensor))
        return read_offset(tensor, *args, **kwargs)

    monkeypatch.setattr(align, "_read_offset", counted)
    return reads


def test_layers_with_the_fields_of_a_layer_before_them_share_its_reading(monkeypatch):
    """An nn.Identity, an eval-mode Dropout and an in-place activation output the very tensor of
    the layer before them, and an activation or an eval-mode BatchNorm act on each position
    alone: they take the offset and reading of the layer before them instead of a backward pass
    of their own, so that the same cells are never re-aligned two ways (a centroid estimate
    differs from one probe seed to the next). A BatchNorm that normalizes by the batch's
    statistics (no running statistics) mixes the positions, and is read."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Identity(), nn.Dropout(0.5),
        nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.GELU(),
        nn.BatchNorm2d(8, track_running_stats=False),
    ).eval()
    reads = _count_layer_reads(monkeypatch)
    readings: dict[str, str] = {}
    names = [str(i) for i in range(8)]
    found = _offsets(net, names, 40, readings)
    # the layers "0" (whose tensor "1", "2" and "3" output too), "4" (whose fields "5" and "6"
    # have) and "7"
    assert len(reads) == 3
    assert found["1"] == found["2"] == found["3"] == found["0"] == (0.0, 0.0)
    assert readings["1"] == readings["2"] == readings["3"] == readings["0"] == "footprint"
    assert found["4"] == found["5"] == found["6"] == (2.0, 2.0)
    assert readings["4"] == readings["5"] == readings["6"] == "footprint"


def _strided_then_global() -> nn.Sequential:
    # two grids (stride 2, offset 0; stride 8, offset 3), then global mixing on the second
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 4, stride=4), nn.ReLU(), _GlobalMix(16)).eval()


@pytest.mark.parametrize("names, anchor_reads", [(["1", "3"], 0), (["1", "3", "4"], 2)])
def test_anchors_are_read_only_where_a_footprint_does_not_give_the_offset(monkeypatch, names,
                                                                         anchor_reads):
    """Each anchor read costs backward passes (its own and a translate check), so the anchors
    are read when a layer needs them, not as they finish: the convolutions' layers read their
    footprints and need none; the layer after global mixing has both anchors before it read
    then, once each. The offsets and readings are those of reading every anchor as it
    finishes (the anchors' reader called before each layer's backward pass)."""
    read_offset = align._read_offset

    def run(read_first: bool):
        anchors: list[int] = []

        def counted(tensor, *args, read_unread=None, **kwargs):
            if kwargs["seed"] >= 10_000:  # the anchors' seeds
                anchors.append(id(tensor))
            if read_first and read_unread is not None:
                read_unread()
                kwargs["unread"] = ()
            return read_offset(tensor, *args, read_unread=read_unread, **kwargs)

        monkeypatch.setattr(align, "_read_offset", counted)
        readings: dict[str, str] = {}
        torch.manual_seed(0)
        found = _offsets(_strided_then_global(), names, 64, readings)
        return found, readings, anchors

    found, readings, anchors = run(read_first=False)
    assert len(anchors) == len(set(anchors)) == anchor_reads
    assert found["1"] == (0.0, 0.0) and found["3"] == (3.0, 3.0)
    assert readings["1"] == readings["3"] == "footprint"
    if "4" in names:
        assert found["4"] == (3.0, 3.0) and readings["4"] != "centroid"
    eager_found, eager_readings, eager_anchors = run(read_first=True)
    assert (eager_found, eager_readings) == (found, readings)
    assert len(eager_anchors) == 2


class _PooledShortcut(nn.Module):
    """A ResNet-D downsampling block in small: the shortcut average-pools 2 x 2 (offset 0.5 at
    stride 2) where the main path's strided 1 x 1 convolution reads the top-left pixel (offset
    0); the shortcut is added in place to the main path's output, then a ReLU runs in place.
    A BatchNorm after the next convolution is written in place by a ReLU alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.proj = nn.Conv2d(3, 8, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv(x)
        out += self.proj(self.pool(x))
        out = self.act(out)
        return self.act2(self.bn2(self.conv2(out)))


def test_an_output_the_model_writes_in_place_later_is_read_as_its_layer_made_it(monkeypatch):
    """The probe reads each layer's output after the forward. An output that the block then
    adds its shortcut to, in place, is the sum by then, and its gradient that of the sum: a
    residual block's last layer had been read at the sum's offset (ResNet-D at 96 px:
    layer2.0.bn3 2 px off its convolution, at stride 8). It is read from a copy taken as it was
    made, in the probe the engine runs and in the naive loop's. An in-place ReLU alone leaves
    the fields as they were: its layer still takes the reading of the layer before it."""
    names = ["conv", "act", "conv2", "bn2", "act2"]
    expected = {"conv": (0.0, 0.0), "act": (0.5, 0.5), "conv2": (0.5, 0.5), "bn2": (0.5, 0.5),
                "act2": (0.5, 0.5)}
    reads = _count_layer_reads(monkeypatch)
    for seed in SEEDS:
        torch.manual_seed(seed)
        net = _PooledShortcut().eval()
        reads.clear()
        readings: dict[str, str] = {}
        assert _offsets(net, names, 32, readings) == expected, f"seed {seed}"
        assert all(readings[name] == "footprint" for name in names)
        assert len(reads) == 3  # bn2 and act2 take conv2's reading
        _, _, offsets = equifast.engine.probe_layers(
            net, names, (32, 32), {}, "auto", torch.device("cpu"), torch.float32, seed)
        assert offsets == expected, f"seed {seed}"
    # written in place, but nothing read as the layer made it: the convolution reads the sum
    monkeypatch.setattr(align, "drop_unwritten", lambda captured, made: [
        setattr(as_made, "copy", None) for as_made in made.values()])
    torch.manual_seed(SEEDS[0])
    assert _offsets(_PooledShortcut().eval(), names, 32)["conv"] == (0.5, 0.5)


class _Node:
    """A stand-in for an autograd node: its name, inputs and, for BatchNorm, its saved flag."""

    def __init__(self, name: str, *inputs, training: bool | None = None) -> None:
        self._name, self.next_functions = name, tuple((node, 0) for node in inputs)
        if training is not None:
            self._saved_training = training

    def name(self) -> str:
        return self._name


@pytest.mark.parametrize("batch_norm", ["NativeBatchNormBackward0", "CudnnBatchNormBackward0",
                                        "MiopenBatchNormBackward0"])
def test_batch_norm_nodes_are_pointwise_only_on_running_statistics(batch_norm):
    """BatchNorm's node differs by backend (the probe of a model on a GPU runs cuDNN's), and
    each says whether it normalized by the batch's statistics, which mix the positions."""
    conv = _Node("ConvolutionBackward0")
    weight = type("AccumulateGrad", (), {})()  # a parameter: not an input that moves
    assert align._pointwise_input(_Node(batch_norm, conv, weight, weight,
                                        training=False)) is conv
    assert align._pointwise_input(_Node(batch_norm, conv, weight, weight, training=True)) is None
    assert align._pointwise_input(_Node(batch_norm, conv)) is None  # no flag: not known
    assert align._pointwise_input(_Node("NativeBatchNormLegitNoTrainingBackward0", conv)) is conv
    # two inputs that move (a sum with a shortcut), or an op that moves positions
    assert align._pointwise_input(_Node("AddBackward0", conv, _Node("MulBackward0"))) is None
    assert align._pointwise_input(_Node("AddBackward0", conv, None)) is conv
    assert align._pointwise_input(_Node("PermuteBackward0", conv)) is None
    relu = _Node("ReluBackward0", _Node(batch_norm, conv, training=False))
    assert list(align._pointwise_chain(relu))[-1] is conv


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_the_probe_shows_a_bar_over_the_layers_it_reads(implementation, recorded_bars):
    """With progress=True the gradient probe reads its layers under a progress bar that shows
    only after a delay (a short probe shows none): one step per layer, closed when done."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                        nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)).eval()
    measure = equifast.measure if implementation == "engine" else naive.measure
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    measure(net, images, group="flip", layers="leaves", bootstrap=0, progress=True)
    (probe,) = [bar for bar in recorded_bars if bar.desc.startswith("align probe")]
    assert probe.delay == align.PROBE_BAR_DELAY > 0
    assert probe.closed_at[:2] == (5, 5)  # the five leaves, shared readings included
    made = len(recorded_bars)
    measure(net, images, group="flip", layers="leaves", bootstrap=0, progress=False)
    assert len(recorded_bars) == made  # no bar at all


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_an_adaptive_pooling_to_the_size_it_receives_is_the_grid_before_it(implementation):
    """torchvision's AlexNet pools its 6 x 6 cells of stride 32 to 6 x 6 at 224 px: the identity.
    One input size reads its grid as stride 37 and the probe's centroid as another offset, so
    its rotations and flips re-aligned otherwise than the identical layer before it. It takes
    the stride of the grid it receives (from how that grows) and that layer's offset and
    reading: the same scores. Here 4 x 4 cells of stride 8 at 40 px (one size: stride 10)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.MaxPool2d(3, 2),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    measure = equifast.measure if implementation == "engine" else naive.measure
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no centroid estimate, no resampling warning
        result = measure(net, images, group="rotate:90,180+flip", layers=["2", "3"],
                         bootstrap=0, progress=False, dtype=torch.float64)
    assert result.config["offsets"]["3"] == result.config["offsets"]["2"] == [6.0, 6.0]
    assert result.config["offset_readings"] == {"2": "footprint", "3": "footprint"}
    summary = result.summary().set_index("layer")
    assert summary.loc["3", "stride"] == summary.loc["2", "stride"] == 8.0
    assert summary.loc["3", "eq"] == pytest.approx(summary.loc["2", "eq"], abs=1e-12)
    # pooled to another size it resamples: its own reading, and the warning that says so
    resampled = nn.Sequential(*list(net)[:3], nn.AdaptiveAvgPool2d(3)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measure(resampled, images, group="flip", layers=["2", "3"], bootstrap=0,
                progress=False)
    assert any("resample the grid they receive" in str(w.message) for w in caught)


def test_adaptive_pooling_nodes_are_pointwise_only_to_the_size_they_receive():
    conv = _Node("ConvolutionBackward0")
    pool = _Node("AdaptiveAvgPool2DBackward0", conv)
    pool._saved_self = torch.zeros(2, 8, 6, 6)
    assert align._pointwise_input(pool, (2, 8, 6, 6)) is conv
    assert align._pointwise_input(pool, (2, 8, 3, 3)) is None  # pooled to another size
    assert align._pointwise_input(pool) is None  # the output's size not known
    assert list(align._pointwise_chain(_Node("ReluBackward0", pool), (2, 8, 6, 6)))[-1] is conv
