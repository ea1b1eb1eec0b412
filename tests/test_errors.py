"""Bad input gets a clear error naming what was expected and what was found."""

import re
import warnings

import pytest
import torch
from torch import nn

import equifast
from equifast import naive
from equifast.layouts import detect_layout


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


def test_unknown_layer_lists_close_names():
    import torchvision

    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match=r"'layer5'.*close names: \[.*'layer1'"):
        equifast.measure(model, torch.rand(2, 3, 64, 64), layers=["layer5"],
                         group="translate:4", progress=False)


# (2, 1, H, W) is greyscale, measured since the session of 2026-11-27 (test_engine)
@pytest.mark.parametrize("shape", [(2, 2, 32, 32), (2, 32, 32), (32,), (2, 4, 3, 32, 32)])
def test_wrong_image_shape(shape):
    # the shape as given (not as a single (C, H, W) image becomes after adding the batch axis)
    found = re.escape(f"found {shape}")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\).*" + found):
        equifast.measure(_net(), torch.rand(*shape), progress=False)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\).*" + found):
        naive.measure(_net(), torch.rand(*shape), progress=False)


def test_empty_data():
    with pytest.raises(ValueError, match="no images"):
        equifast.measure(_net(), [], progress=False)
    with pytest.raises(ValueError, match="holds no images"):
        equifast.measure(_net(), torch.rand(0, 3, 32, 32), progress=False)


def test_sources_too_small_for_shifts():
    with pytest.raises(ValueError, match=r"smaller than the 48x48"):
        equifast.measure(_net(), torch.rand(2, 3, 20, 20), input_size=(32, 32),
                         group=equifast.Translation([8]), progress=False)


def test_grid_cannot_be_inferred():
    with pytest.raises(
        ValueError, match=r"cannot infer the feature grid of layer 'odd'.*\(2, 5, 7, 9\)"
    ):
        detect_layout((2, 5, 7, 9), (64, 64), name="odd")
    with pytest.raises(
        ValueError, match=r"output shape \(2, 3, 5, 6, 7\), expected 2-D, 3-D or 4-D"
    ):
        detect_layout((2, 3, 5, 6, 7), (64, 64), name="odd")

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = nn.Identity()

        def forward(self, x):
            return self.odd(x[:, :, :7, :9].reshape(x.shape[0], 3, 7, 9))

    with pytest.raises(ValueError, match="cannot infer the feature grid of layer 'odd'"):
        equifast.measure(Odd(), torch.rand(2, 3, 14, 14), layers=["odd"],
                         group=equifast.Translation([1], protocol="circular"), progress=False)


def test_bad_arguments():
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown metrics"):
        equifast.measure(_net(), images, metrics=["accuracy"], progress=False)
    with pytest.raises(ValueError, match="subpixel"):
        equifast.measure(_net(), images, subpixel="nearest", progress=False)
    with pytest.raises(ValueError, match=r"bootstrap: expected 0 \(no intervals\) or at least 2"):
        equifast.measure(_net(), images, bootstrap=1, progress=False)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        equifast.measure(42, images, progress=False)
    with pytest.raises(ValueError, match="layout of 'x'"):
        detect_layout((2, 4, 4, 4), (16, 16), layout="CHW", name="x")


@pytest.mark.parametrize("data", ["samples", "tensor", "iterable"])
@pytest.mark.parametrize("loader", ["dali", "folder"])
def test_a_loader_is_refused_for_data_it_does_not_read(data, loader):
    """A loader reads files; given for other data it was ignored without a word."""
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    given = {"samples": "samples", "tensor": images, "iterable": [(images, None)]}[data]
    found = {"samples": "the sample photographs", "tensor": "a Tensor", "iterable": "a list"}
    with pytest.raises(ValueError, match=rf"loader='{loader}': a loader reads an image folder"
                                         rf".*the data is {found[data]}; expected loader='auto'"):
        equifast.measure(_net(), given, loader=loader, input_size=32, progress=False)
    with pytest.raises(ValueError, match=r"loader must be 'auto', 'dali' or 'folder', got 'pil'"):
        equifast.measure(_net(), given, loader="pil", input_size=32, progress=False)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_comparisons_must_name_at_least_one(implementation):
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    images = torch.rand(2, 3, 16, 16)
    group = equifast.Translation([1], protocol="circular")
    with pytest.raises(ValueError, match="comparisons: expected at least one of"):
        measure(_net(), images, group=group, comparisons=[], progress=False)
    with pytest.raises(ValueError, match=r"comparisons: expected some of .* found \['equi'\]"):
        measure(_net(), images, group=group, comparisons=["eq", "equi"], progress=False)



@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_metric_given_as_a_string_is_one_metric(implementation):
    """metrics="psnr" was read as the metrics 'p', 's', 'n', 'r' (an unknown-metrics error),
    while comparisons="eq" is one comparison."""
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    result = measure(_net(), torch.rand(2, 3, 16, 16), metrics="psnr", progress=False,
                     group=equifast.Translation([1], protocol="circular"), bootstrap=0)
    assert set(result.frame.metric) == {"corr", "psnr", "corr_vs_chance"}


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_chance_undefined_for_every_image_is_named(implementation):
    """With batch_size=1 (or one image) no image has a chance partner: chance and
    corr_vs_chance are NaN everywhere while eq has numbers. That passed without a warning."""
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    kwargs = dict(group=equifast.Translation([1], protocol="circular"), bootstrap=0,
                  progress=False)
    images = torch.rand(3, 3, 16, 16)
    for data, batch_size in ((images, 1), (images[:1], 16)):
        with pytest.warns(UserWarning, match=r"the chance comparison is undefined for every "
                                             r"image .* batch_size >= 2"):
            result = measure(_net(), data, batch_size=batch_size, **kwargs)
        summary = result.summary()
        assert summary.chance.isna().all() and summary.vs_chance.isna().all()
        assert (summary.n == data.shape[0]).all()
    # a last batch of one image leaves out only that image's chance: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = measure(_net(), images, batch_size=2, **kwargs)
    assert result.summary().chance.notna().all()


def test_summary_without_eq():
    """Only inv (or chance) measured: the summary's n comes from it, and the printed table has
    '-' where eq would be (it raised on a NaN n before)."""
    result = equifast.measure(_net(), torch.rand(3, 3, 16, 16), comparisons="inv",
                              group=equifast.Translation([1], protocol="circular"),
                              layers=["0", "2"], progress=False, bootstrap=0)
    table = result.summary()
    assert "eq" not in table and (table["n"] == 3).all()
    lines = result.format_summary().splitlines()
    assert len(lines) == 3 and all(line.split()[-1] == "3" for line in lines[1:])


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_folder_of_unreadable_files_says_why(implementation, tmp_path):
    from equifast import naive

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a png")
    measure = equifast.measure if implementation == "engine" else naive.measure
    with pytest.raises(ValueError, match=r"every file of the source was skipped, 2 in all "
                                         r"\(.*empty.jpg: empty file.*text.png: not an image"):
        measure(_net(), str(tmp_path), input_size=16, progress=False)


class _Constant(nn.Module):
    """Spatially constant features (a collapsed stage): every correlation is undefined."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True).expand_as(x).contiguous()


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_layer_without_defined_correlations_is_named(implementation):
    from equifast import naive

    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), _Constant()).eval()
    measure = equifast.measure if implementation == "engine" else naive.measure
    with pytest.warns(UserWarning, match=r"1 layer\(s\) have no defined correlations \(NaN for "
                                         r"every element\): 1: spatially constant features"):
        result = measure(net, torch.rand(2, 3, 32, 32), layers=["0", "1"], progress=False,
                         group=equifast.Translation([2], protocol="circular"), bootstrap=0)
    corr = result.frame.query("metric == 'corr'")
    assert corr[corr.layer == "1"].value.isna().all()
    assert corr[corr.layer == "0"].value.notna().all()


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_model_sized_sources_warn_that_the_margin_shrinks_the_input(implementation):
    """Tensors are crop-protocol sources: images cut to the model's size (its config says 48 x 48
    here), or larger but short of its margin, leave a smaller input after the group's margin.
    That used to pass silently."""
    from equifast import naive
    from equifast.models import preprocess_for

    measure = equifast.measure if implementation == "engine" else naive.measure
    net = _net()
    net.pretrained_cfg = {"input_size": (3, 48, 48)}  # timm's config, as a timm model has it
    assert preprocess_for(net).input_size == (48, 48)
    group = equifast.Translation([8])
    with pytest.warns(UserWarning, match=r"sources are 48x48, the model's input size.*the model "
                                         r"sees 32x32 inputs.*sources of 64x64.*margin=\(8, 8\)"
                                         r".*input_size=\(32, 32\)") as caught:
        result = measure(net, torch.rand(2, 3, 48, 48), group=group, layers=["0"],
                         progress=False, bootstrap=0)
    assert result.config["input_size"] == [32, 32]
    assert all(w.filename == __file__ for w in caught if "sources are" in str(w.message))
    # Larger than the model's size, still short of its margin (a 256 resize for a 224 model).
    with pytest.warns(UserWarning, match=r"sources are 56x52, at least the model's input size "
                                         r"\(48x48\).*sees 40x36 inputs.*sources of 64x64"):
        measure(net, torch.rand(2, 3, 56, 52), group=group, layers=["0"], progress=False,
                bootstrap=0)
    # Sources with the margin, an explicit input size, a group without margin, or sources
    # smaller than the model's size (chosen small): no warning.
    for data, extra in ((torch.rand(2, 3, 64, 64), {}),
                        (torch.rand(2, 3, 40, 40), {}),
                        (torch.rand(2, 3, 48, 48), {"input_size": (32, 32)}),
                        (torch.rand(2, 3, 48, 48),
                         {"group": equifast.Translation([8], protocol="circular")})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            measure(net, data, **{"group": group, **extra}, layers=["0"], progress=False,
                    bootstrap=0)
        assert not [w for w in caught if "sources are" in str(w.message)], extra


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_raw_pixels_as_floats_are_named(implementation):
    """Floating images are taken as normalized; 0..255 pixels cast to float used to pass
    silently, unnormalized. Normalized ones, [0, 1] ones (as synthetic data often is) and uint8
    give no warning; an iterable warns once, not once per batch."""
    from equifast.arguments import UnnormalizedImagesWarning

    measure = equifast.measure if implementation == "engine" else naive.measure
    kwargs = dict(group=equifast.Translation([2]), layers=["0"], progress=False, bootstrap=0)
    pixels = torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8)
    with pytest.warns(UnnormalizedImagesWarning, match=r"taken as already normalized.*no "
                                                       r"negative value.*pass them as uint8"):
        measure(_net(), pixels.float(), **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        measure(_net(), [pixels[:2].float(), pixels[2:].float()], **kwargs)
    assert len([w for w in caught if w.category is UnnormalizedImagesWarning]) == 1
    for data in (pixels, torch.randn(4, 3, 36, 36), torch.rand(4, 3, 36, 36)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            measure(_net(), data, **kwargs)
        assert not [w for w in caught if w.category is UnnormalizedImagesWarning], data.dtype


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_batches_as_numpy_arrays_are_tensors(implementation):
    """An iterable of numpy batches is read as the tensors they hold (one array already was);
    anything else in a batch is still refused by name."""
    import numpy as np

    measure = equifast.measure if implementation == "engine" else naive.measure
    kwargs = dict(group=equifast.Translation([2]), layers=["0"], progress=False, bootstrap=0)
    pixels = torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8)
    net = _net()
    want = measure(net, pixels, batch_size=2, **kwargs).frame
    flipped = np.flip(np.flip(pixels.numpy(), 2).copy(), 2)  # the same pixels, negative strides
    assert flipped.strides[2] < 0
    got = measure(net, [(pixels[:2].numpy(), [0, 1]), (flipped[2:], [1, 0])], **kwargs).frame
    keys = ["layer", "element", "comparison", "metric"]
    merged = want.merge(got, on=keys)
    assert len(merged) == len(want) and np.allclose(merged.value_x, merged.value_y,
                                                    equal_nan=True)
    whole = measure(net, flipped, batch_size=2, **kwargs).frame  # one array, negative strides
    assert np.allclose(want.value, whole.value, equal_nan=True)
    with pytest.raises(TypeError, match=r"data batch 0: expected a tensor of images, found list"):
        measure(_net(), [([[1, 2]], None)], **kwargs)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_channels_last_arrays_are_refused_with_the_permutation(implementation):
    """Arrays from Pillow or OpenCV hold channels last: the error names the shape found and the
    transpose that makes it (B, C, H, W); a shape with no such reading gets no such advice, and
    an empty batch is named as one in both loops."""
    import numpy as np

    measure = equifast.measure if implementation == "engine" else naive.measure
    kwargs = dict(group=equifast.Translation([2]), layers=["0"], progress=False, bootstrap=0)
    batch = np.zeros((4, 36, 36, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"found \(4, 36, 36, 3\), which looks channels-last "
                                         r"\(B, H, W, C\).*transpose\(0, 3, 1, 2\)"):
        measure(_net(), batch, **kwargs)
    with pytest.raises(ValueError, match=r"found \(36, 36, 1\), which looks channels-last "
                                         r"\(H, W, C\).*permute\(2, 0, 1\)"):
        measure(_net(), torch.zeros(36, 36, 1, dtype=torch.uint8), **kwargs)
    with pytest.raises(ValueError, match=r"found \(4, 5, 36, 36\)$"):
        measure(_net(), torch.zeros(4, 5, 36, 36, dtype=torch.uint8), **kwargs)
    with pytest.raises(ValueError, match=r"the batch holds no images \(shape \(0, 3, 36, 36\)\)"):
        measure(_net(), torch.zeros(0, 3, 36, 36, dtype=torch.uint8), **kwargs)


def test_sources_leave_no_image():
    with pytest.raises(ValueError, match=r"leave no image.*smaller shifts"):
        equifast.measure(_net(), torch.rand(2, 3, 40, 40), progress=False)


@pytest.mark.parametrize("measure", ["engine", "naive"])
def test_a_model_runs_in_its_own_dtype_by_default(measure):
    """A float64 model needs no dtype argument (before, float32 probe inputs failed in the first
    convolution with a message about the input size); dtype converts the model in place."""
    from equifast import naive

    fn = equifast.measure if measure == "engine" else naive.measure
    images = torch.rand(3, 3, 24, 24)
    kwargs = dict(group=equifast.Translation([2]), progress=False, bootstrap=0)
    net = _net().double()
    result = fn(net, images, **kwargs)
    assert result.config["dtype"] == "float64"
    converted = _net()
    fn(converted, images, dtype=torch.float64, **kwargs)
    assert next(converted.parameters()).dtype == torch.float64  # as Module.to(dtype)
    again = fn(converted, images, **kwargs)  # a later call without dtype keeps working
    assert again.config["dtype"] == "float64"


@pytest.mark.parametrize("bad", ["float64", torch.int32, 64])
def test_dtype_must_be_a_floating_torch_dtype(bad):
    net = _net()
    with pytest.raises(TypeError, match=r"dtype: expected a floating torch.dtype .* found"):
        equifast.measure(net, torch.rand(2, 3, 24, 24), dtype=bad, progress=False)
    assert next(net.parameters()).dtype == torch.float32  # nothing converted before the check


def test_a_model_that_fails_on_the_probe_input_names_the_input():
    class Needs24Pixels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).view(len(x), 4 * 22 * 22)  # built for 24 x 24 inputs

    with pytest.raises(RuntimeError, match=r"probe input \(2 x 3 x 20 x 20, float32 on cpu\): "
                                           r"RuntimeError: .*input_size=\(H, W\).*dtype="):
        equifast.measure(Needs24Pixels(), torch.rand(2, 3, 24, 24), layers=["conv"],
                         group=equifast.Translation([2]), input_size=(20, 20), progress=False)


@pytest.mark.parametrize("measure", ["engine", "naive"])
def test_input_size_is_a_pair_or_one_integer(measure):
    from equifast import naive

    fn = equifast.measure if measure == "engine" else naive.measure
    kwargs = dict(group=equifast.Translation([2]), progress=False, bootstrap=0)
    images = torch.rand(2, 3, 24, 24)
    square = fn(_net(), images, input_size=20, **kwargs)
    assert square.config["input_size"] == [20, 20]
    for bad in [(20, 20, 3), (20,), 0, (20, -1), "20", (20.5, 20), True]:
        with pytest.raises(ValueError, match=r"input_size: expected \(H, W\).* found"):
            fn(_net(), images, input_size=bad, **kwargs)


@pytest.mark.parametrize("measure", ["engine", "naive"])
def test_silent_failures_are_named(measure):
    """Non-finite pixels are refused; elements without any defined score and models whose output
    is not logits are named in a warning."""
    from equifast import naive

    fn = equifast.measure if measure == "engine" else naive.measure
    kwargs = dict(progress=False, bootstrap=0)
    images = torch.rand(2, 3, 24, 24)
    poisoned = images.clone()
    poisoned[1, 0, 3, 4] = float("nan")
    poisoned[0, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"expected finite pixel values, found 2 NaN or infinite"):
        fn(_net(), poisoned, group=equifast.Translation([2]), **kwargs)
    # a shift of the whole input: the moved and the original features share no position
    with pytest.warns(UserWarning, match=r"\['translate\(0,24\)', 'translate\(24,0\)'\]: every "
                                         r"score is NaN"):
        fn(_net(), torch.rand(2, 3, 72, 72), group=equifast.Translation([2, 24]),
           input_size=(24, 24), **kwargs)

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _net()

        def forward(self, x):
            return self.body(x), x.mean()

    with pytest.warns(UserWarning, match=r"output is a tuple, not \(batch, classes\) logits"):
        result = fn(TupleOut(), images, group=equifast.Translation([2]), layers=["body.0"],
                    **kwargs)
    assert result.model_frame.empty and not result.frame.empty


@pytest.mark.parametrize("measure", ["engine", "naive"])
@pytest.mark.parametrize("argument,bad,message", [
    ("limit", 0, r"limit: expected a positive integer or None, found 0"),
    ("bootstrap", -1, r"bootstrap: expected a number of resamples >= 0, found -1"),
    ("align", float("nan"), r"align: expected 'auto', 'center', 'corner', a finite number"),
    ("align", {"0": "middle"}, r"align: expected .* found \{'0': 'middle'\}"),
    ("device", "bogus", r"device: expected 'cpu', 'cuda' or 'cuda:N', found 'bogus'"),
    # a per-layer key that names no module was ignored without a word (the layer kept its
    # estimated offset / detected layout)
    ("align", {"2": 0.0, "3": 0.5}, r"align: \['3'\] name no module of Sequential; its "
                                    r"modules: \['0', '1', '2'\]"),
    ("layouts", {"conv": "NCHW"}, r"layouts: \['conv'\] name no module of Sequential"),
])
def test_arguments_are_checked_before_the_model_runs(measure, argument, bad, message):
    from equifast import naive

    fn = equifast.measure if measure == "engine" else naive.measure
    with pytest.raises(ValueError, match=message):
        fn(_net(), torch.rand(2, 3, 24, 24), group=equifast.Translation([2]), progress=False,
           **{argument: bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without")
def test_cuda_without_a_gpu_is_named():
    with pytest.raises(ValueError, match=r"device 'cuda': no CUDA GPU is available here"):
        equifast.measure(_net(), torch.rand(2, 3, 24, 24), group=equifast.Translation([2]),
                         device="cuda", progress=False)


class _FixedSize(torch.nn.Module):
    """A model that accepts one input size only (as a ViT with a fixed position table does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)

    def forward(self, x):
        assert x.shape[-1] == 32, f"input width {x.shape[-1]} does not match the model (32)"
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_model_failing_on_the_probe_is_one_clear_error(implementation):
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    message = (r"(?s)the model failed on its probe input \(2 x 3 x 48 x 48, float32 on cpu\): "
               r"AssertionError: input width 48 .*input_size=\(H, W\)")
    with pytest.raises(RuntimeError, match=message):
        measure(_FixedSize().eval(), torch.rand(2, 3, 48, 48), group="rotation",
                bootstrap=0, progress=False, align="center")


# A model that checks its input with asserts carrying no message, as timm's halo attention does
# (`_assert(H % self.block_size == 0, '')`). Written to a file of its own and imported from it:
# pytest would give the bare assert of a test module a message.
_BLOCKED_SIZE = """
import torch


class BlockedSize(torch.nn.Module):
    def __init__(self, bare):
        super().__init__()
        self.bare = bare
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)

    def forward(self, x):
        if self.bare:
            assert x.shape[-1] % 7 == 0
        else:
            torch._assert(x.shape[-2] % 7 == 0, "")
        return self.conv(x).mean((2, 3))
"""


@pytest.mark.parametrize("implementation", ["engine", "naive"])
@pytest.mark.parametrize("bare", [True, False])
def test_an_assert_without_a_message_is_named_by_its_line(implementation, bare, tmp_path):
    """An empty AssertionError used to read "AssertionError: ." : the error now shows the line
    that raised it (the caller of torch._assert, not torch's own raise)."""
    import importlib.util

    path = tmp_path / "blocked_size.py"
    path.write_text(_BLOCKED_SIZE)
    spec = importlib.util.spec_from_file_location("blocked_size", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    measure = equifast.measure if implementation == "engine" else naive.measure
    line = (r"assert x\.shape\[-1\] % 7 == 0" if bare
            else r"torch\._assert\(x\.shape\[-2\] % 7 == 0, \"\"\)")
    message = (r"(?s)probe input \(2 x 3 x 48 x 48, float32 on cpu\): AssertionError at "
               r"\S*blocked_size\.py:1[35]: " + line + r"\. If the model")
    with pytest.raises(RuntimeError, match=message):
        measure(module.BlockedSize(bare).eval(), torch.rand(2, 3, 48, 48), group="rotation",
                bootstrap=0, progress=False, align="center")


@pytest.mark.parametrize("implementation", ["engine", "naive"])
@pytest.mark.parametrize("configured", [True, False])
def test_an_input_too_small_for_the_model_says_so(implementation, configured):
    """A network whose downsampling leaves less than a kernel (Inception v3 at 56 px): torch
    names kernel and input sizes; the advice says the input is too small, with the size timm's
    configuration gives where there is one."""
    measure = equifast.measure if implementation == "engine" else naive.measure
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.MaxPool2d(5), nn.Flatten()).eval()
    if configured:
        model.pretrained_cfg = {"input_size": (3, 96, 80)}
    size = r" \(timm's configuration of this model: 96 x 80\)" if configured else ""
    message = (r"(?s)probe input \(2 x 3 x 16 x 16, float32 on cpu\): RuntimeError: .*"
               r"The input is too small for the model: after its downsampling a kernel is wider "
               r"than what is left of the image\. Measure at a larger size" + size + r"\. If")
    with pytest.raises(RuntimeError, match=message):
        measure(model, torch.rand(2, 3, 16, 16), group="rotation", bootstrap=0,
                progress=False, align="center")


class _TwoBranches(nn.Module):
    """Two stride-2 branches that round an odd size apart (a padded convolution rounds up,
    pooling down) and meet again, as DLA's and HRNet's do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 4, 1))

    def forward(self, x):
        return self.conv(x) + self.pool(x)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_branches_that_meet_at_different_sizes_advise_a_multiple_of_the_stride(implementation):
    measure = equifast.measure if implementation == "engine" else naive.measure
    message = (r"(?s)probe input \(2 x 3 x 17 x 17, float32 on cpu\): RuntimeError: The size of "
               r"tensor a \(9\) must match the size of tensor b \(8\).*Feature maps of different "
               r"sizes met: .*not a multiple of the model's total stride")
    with pytest.raises(RuntimeError, match=message):
        measure(_TwoBranches().eval(), torch.rand(2, 3, 17, 17), group="rotation", bootstrap=0,
                progress=False, align="center")
    # at an even size the branches meet
    measure(_TwoBranches().eval(), torch.rand(2, 3, 16, 16), group="rotation", bootstrap=0,
            progress=False, align="center")


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_vit_built_for_another_size_names_the_size_it_takes(implementation):
    """A ViT module built at 32 px measured at 48 px: the advice names the size the patch
    embedding checks and how to build the model for another (input_size= alone cannot help)."""
    import timm

    measure = equifast.measure if implementation == "engine" else naive.measure
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              depth=1).eval()
    message = (r"(?s)probe input \(2 x 3 x 48 x 48, float32 on cpu\): AssertionError: .*"
               r"The model takes only 32 x 32 inputs .*img_size=\(H, W\).*measure at 32 x 32")
    with pytest.raises(RuntimeError, match=message) as caught:
        measure(model, torch.rand(2, 3, 48, 48) - 0.5, group="rotation", bootstrap=0,
                progress=False, align="center")
    assert "(32).. " not in str(caught.value)  # timm's own full stop is not doubled
    # A model that checks nothing gets the usual advice only.
    with pytest.raises(RuntimeError) as caught:
        measure(_FixedSize().eval(), torch.rand(2, 3, 48, 48), group="rotation",
                bootstrap=0, progress=False, align="center")
    assert "takes only" not in str(caught.value)
    assert "fixed_input_size" not in str(caught.value)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_model_given_by_name_is_not_told_to_be_given_by_name(implementation):
    """A model given by name is built for the input size where it takes one (img_size); when
    it still fails there (EfficientFormer's attention biases take no img_size, CoAtNet's
    windows only some sizes), the advice is a size it takes, not to build it by name or with
    img_size, which was done."""
    measure = equifast.measure if implementation == "engine" else naive.measure
    kwargs = dict(group="rotation", bootstrap=0, progress=False, align="center", limit=2)
    for name, size in [("efficientformer_l1", 64), ("coatnet_nano_rw_224", (64, 57))]:
        with pytest.raises(RuntimeError, match=r"(?s)probe input .*built by name for this input "
                                               r"size.*its configuration: 224 x 224") as caught:
            measure(name, "samples", input_size=size, **kwargs)
        assert "give the model by name" not in str(caught.value)
        assert "img_size=" not in str(caught.value)
    # torchvision's ViT, built by name for square sizes only: told to measure at one
    with pytest.raises(RuntimeError, match=r"(?s)Wrong image height.*takes square inputs only.*"
                                           r"measure at a square size") as caught:
        measure("tv:vit_b_32", "samples", input_size=(64, 48), **kwargs)
    assert "give the model by name" not in str(caught.value)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_levit_built_for_another_size_says_timm_fixes_its_size(implementation):
    """LeViT's attention biases fix its input size, which no patch embedding names: the advice
    comes from timm's configuration (fixed_input_size), without a size."""
    import timm

    measure = equifast.measure if implementation == "engine" else naive.measure
    model = timm.create_model("levit_128s", pretrained=False).eval()
    message = (r"(?s)probe input \(2 x 3 x 48 x 48, float32 on cpu\): RuntimeError: .*"
               r"timm builds this model for one input size \(its pretrained_cfg says "
               r"fixed_input_size\): .*img_size=\(H, W\).*give the model by name")
    with pytest.raises(RuntimeError, match=message) as caught:
        measure(model, torch.rand(2, 3, 48, 48) - 0.5, group="rotation", bootstrap=0,
                progress=False, align="center")
    assert "takes only" not in str(caught.value)
