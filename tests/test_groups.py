"""Group elements against torch.roll / rot90 / flip, and the transform reference against them."""

import re

import numpy as np
import pytest
import torch

from equifast.groups import (
    Flip,
    Rotation,
    Translation,
    check_circular,
    check_mask,
    feature_disc,
    feature_source_affines,
    invert_affine,
    is_integer_affine,
    parse_group,
)
from equifast.ops import _reference


def _apply(element, images, margin=(0, 0), protocol_code=None):
    height, width = images.shape[-2] - 2 * margin[0], images.shape[-1] - 2 * margin[1]
    source = torch.from_numpy(invert_affine(element.matrix(height, width)))[None]
    code = {"crop": 0, "circular": 1, "zero": 2}[element.protocol]
    return _reference.transform_images(images, source, [code], margin[0], margin[1], height,
                                       width, None, None, torch.float64, False)


@pytest.mark.parametrize("shape", [(5, 7), (6, 6), (9, 4)])
@pytest.mark.parametrize("shift", [(0, 1), (2, 0), (-3, 2), (1, -1)])
def test_circular_translation_is_roll(shape, shift):
    images = torch.rand(2, 3, *shape, dtype=torch.float64)
    (element,) = Translation([shift], protocol="circular")
    expected = torch.roll(images, shift, dims=(-2, -1))
    torch.testing.assert_close(_apply(element, images), expected, rtol=0, atol=0)


@pytest.mark.parametrize("angle,k", [(90, 1), (180, 2), (270, 3), (-90, 3)])
@pytest.mark.parametrize("size", [5, 6])
def test_rotation_is_rot90(angle, k, size):
    images = torch.rand(2, 3, size, size, dtype=torch.float64)
    (element,) = Rotation([angle])
    assert element.is_exact(size, size)
    torch.testing.assert_close(_apply(element, images), torch.rot90(images, k, dims=(-2, -1)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("axis,dim", [("horizontal", -1), ("vertical", -2)])
def test_flip_is_flip(axis, dim):
    images = torch.rand(2, 3, 5, 8, dtype=torch.float64)
    (element,) = Flip(axis)
    torch.testing.assert_close(_apply(element, images), torch.flip(images, (dim,)), rtol=0, atol=0)


def test_crop_translation_is_window_of_source():
    source = torch.rand(1, 3, 12, 14, dtype=torch.float64)
    (element,) = Translation([(2, -3)])
    margin = (2, 3)
    out = _apply(element, source, margin)
    # Content moves 2 down and 3 left: output (y, x) reads window (y - 2, x + 3).
    window_top, window_left = margin[0] - 2, margin[1] + 3
    window = source[..., window_top : window_top + 8, window_left : window_left + 8]
    torch.testing.assert_close(out, window)


def test_zero_translation_fills_band():
    images = torch.rand(1, 3, 6, 6, dtype=torch.float64)
    (element,) = Translation([(0, 2)], protocol="zero")
    out = _apply(element, images)
    assert torch.all(out[..., :2] == 0)
    torch.testing.assert_close(out[..., 2:], images[..., :4])


def test_margin_and_products():
    group = Translation([4, 8]) * Flip()
    assert group.margin(32, 32) == (8, 8)
    assert len(group) == 4 + 1 + 4
    assert all(e.is_exact(32, 32) for e in group)
    assert Rotation([30]).margin(32, 32) == (0, 0)
    # A fractional shift asks for the whole pixels its bilinear samples reach (DESIGN 1.5: no
    # artificial border enters the image under crop); other protocols ask for none.
    assert Translation([2.5]).margin(32, 32) == (3, 3)
    assert Translation([(0.25, -7.5)]).margin(33, 40) == (1, 8)
    assert Translation([4, 7.5]).margin(32, 32) == (8, 8)
    assert Translation([2.5], protocol="zero").margin(32, 32) == (0, 0)
    assert (Rotation([30]) * Translation([(0, 6)])).margin(32, 32) == (0, 6)


def test_feature_affines_exact_at_stride_multiples():
    group = Translation([(0, 8), (0, 4)])
    affines = feature_source_affines(group.matrices(64, 64, with_identity=False), (8, 8), (0, 0))
    assert is_integer_affine(affines[0]) and affines[0][0, 2] == -1
    assert not is_integer_affine(affines[1])
    # A rotation about the image centre is exact on a centred grid, not on a corner grid.
    rotation = Rotation([90]).matrices(64, 64, with_identity=False)
    assert is_integer_affine(feature_source_affines(rotation, (2, 2), (0.5, 0.5))[0])
    assert not is_integer_affine(feature_source_affines(rotation, (2, 2), (0, 0))[0])


def test_parse_group():
    assert parse_group("translate:8,16").names == [
        "translate(0,8)", "translate(8,0)", "translate(0,16)", "translate(16,0)"]
    assert parse_group("translate[circular]:0/4").elements[0].protocol == "circular"
    assert parse_group("rotate:90,180+flip").names[-1] == "flip(horizontal)"
    with pytest.raises(ValueError, match="unknown kind 'spin'"):
        parse_group("spin:3")
    with pytest.raises(ValueError, match="protocol"):
        Translation([1], protocol="mirror")


@pytest.mark.parametrize("spec,message", [
    ("translate:1/2/3", r"a shift 'dy/dx' of two numbers, found '1/2/3'"),
    ("translate:8,,16", r"found an empty one"),
    ("rotate:", r"found an empty one"),
    ("rotate:ninety", r"expected a number, found 'ninety'$"),
    ("translate:8;rotate:90", r"found '8;rotate:90'; terms of a group are joined by '\+' "
                              r"\(union\) or '\*' \(product\), e.g. "
                              r"'translate:8\+rotate:90\+flip'"),
    ("translate:8 flip", r"found '8 flip'; terms of a group are joined by '\+'"),
    ("flip[mirror]", r"protocol 'mirror' is not one of \('crop', 'circular', 'zero'\)"),
    ("rotate[]:90", r"protocol '' is not one of"),
])
def test_parse_group_names_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=rf"group spec {re.escape(repr(spec))}: .*{message}"):
        parse_group(spec)


def test_a_flip_is_the_same_under_any_protocol():
    """Why the parser lets a flip take any protocol: the flipped window never leaves itself."""
    sources = torch.rand(2, 3, 7 + 4, 9 + 6, dtype=torch.float64)  # margins 2 and 3
    window = sources[..., 2:9, 3:12]
    for axis, dim in (("vertical", -2), ("horizontal", -1)):
        (element,) = parse_group(f"flip[zero]:{axis}")
        source = torch.from_numpy(invert_affine(element.matrix(7, 9)))[None]
        for code in (0, 1, 2):
            out = _reference.transform_images(sources, source, [code], 2, 3, 7, 9, None, None,
                                              torch.float64, False)
            torch.testing.assert_close(out, window.flip(dim))


def test_a_zero_shift_is_one_element():
    assert Translation([0, 8]).names == ["translate(0,0)", "translate(0,8)", "translate(8,0)"]
    assert parse_group("translate:0").names == ["translate(0,0)"]


def test_bilinear_rotation_keeps_centre_and_masks_corners():
    images = torch.rand(1, 3, 9, 9, dtype=torch.float64)
    (element,) = Rotation([30])
    out = _apply(element, images)
    torch.testing.assert_close(out[..., 4, 4], images[..., 4, 4])
    assert torch.all(out[..., 0, 0] == 0)  # the corner's source lies outside: fill
    assert np.isfinite(out.numpy()).all()


def test_single_numbers_and_non_finite_values():
    assert Translation(8).names == Translation([8]).names
    assert Rotation(90).names == ["rotate(90)"]
    for bad, what in ((float("nan"), "rotation angle"), (float("inf"), "rotation angle")):
        with pytest.raises(ValueError, match=f"{what}: expected a finite number, found {bad}"):
            Rotation([bad])
    with pytest.raises(ValueError, match="translation shift: expected a finite number"):
        Translation([(0, float("-inf"))])
    with pytest.raises(ValueError, match="translation shift: expected a number, found 'x'"):
        Translation([(0, "x")])
    for spec in ("rotate:nan", "translate:inf", "translate:1e400"):
        with pytest.raises(ValueError, match=f"group spec '{spec}'.*expected a finite number"):
            parse_group(spec)


def test_flip_axes_take_their_abbreviations():
    assert parse_group("flip:h,v").names == ["flip(horizontal)", "flip(vertical)"]
    assert Flip(["LR", "ud"]).names == ["flip(horizontal)", "flip(vertical)"]
    assert parse_group("rotate:90*flip:h").names == parse_group("rotate:90*flip:horizontal").names
    assert parse_group("FLIP:H").names == ["flip(horizontal)"]
    assert parse_group("Translate[Circular]:8").names == parse_group("translate[circular]:8").names
    with pytest.raises(ValueError, match=r"flip axis: expected 'horizontal' or 'vertical' .*"
                                         r"found 'diagonal'"):
        parse_group("flip:diagonal")


@pytest.mark.parametrize("matrix,message", [
    ([[1, 1, 0], [1, 1, 0]], r"expected an invertible affine map .* determinant 0"),
    (np.zeros((2, 3)), r"expected an invertible affine map .* determinant 0"),
    ([[1, 0, np.nan], [0, 1, 0]], r"expected a matrix of finite numbers, found \[\[1.0, 0.0, nan"),
    ([[1, 0, 0], [0, np.inf, 0]], r"expected a matrix of finite numbers"),
])
def test_a_custom_element_without_an_inverse_is_named(matrix, message):
    """A singular or non-finite matrix used to fail deep inside as numpy's 'Singular matrix' or
    'cannot convert float NaN to integer' (from the margin), naming neither the element nor
    what was wrong. A zoom or a shear is invertible and stays accepted."""
    from equifast.groups import Element, Group

    group = Group([Element("mine", lambda h, w: np.asarray(matrix, dtype=float))])
    with pytest.raises(ValueError, match=rf"element 'mine': {message}"):
        group.margin(32, 32)
    zoom = Element("zoom", lambda h, w: np.array([[1.1, 0, -1.55], [0, 1.1, -1.55]]))
    shear = Element("shear", lambda h, w: np.array([[1, 0.2, 0], [0, 1, 0]]))
    assert Group([zoom, shear]).margin(32, 32) == (0, 4)


def test_parameters_are_lists_not_strings():
    """Rotation('90') iterated the string: it measured rotations by 9 and 0 degrees, silently.
    A tensor of shifts (Rotation took it) failed as 'len() of a 0-d tensor'."""
    with pytest.raises(TypeError, match=r"angles: expected a number or a list of numbers, found "
                                        r"'90' \(a spec string goes to equifast.parse_group"):
        Rotation("90")
    with pytest.raises(TypeError, match=r"shifts: expected .* found '8'"):
        Translation("8")
    with pytest.raises(TypeError, match=r"axis: expected .* found None"):
        Flip(None)
    with pytest.raises(ValueError, match=r"a shift is a number or a pair \(dy, dx\), found None"):
        Translation([None])
    assert Translation(torch.tensor([8, 16])).names == Translation([8, 16]).names
    assert Translation(torch.tensor(8)).names == Translation(8).names
    assert Translation([(torch.tensor(1), 2)]).names == ["translate(1,2)"]


@pytest.mark.parametrize("spec,message", [
    ("translate:8*", r"an empty term before or after '\*'"),
    ("translate:8++rotate", r"an empty term before or after '\+'"),
    ("flip*flip", r"group element names must be unique, found repeated \['flip\(horizontal\)'\]: "
                  r"each element is measured once"),
])
def test_parse_group_names_the_spec_of_a_bad_term(spec, message):
    """These said 'empty group spec' or only 'names must be unique', without the spec."""
    with pytest.raises(ValueError, match=rf"group spec {re.escape(repr(spec))}: {message}"):
        parse_group(spec)
    # spaces are allowed around a protocol as around the other parts of a spec
    assert parse_group("translate [ circular ]:8").names == parse_group("translate:8").names
    assert parse_group("translate [ circular ]:8")[0].protocol == "circular"


def test_one_map_under_two_protocols_is_named_as_such():
    """A shift under the crop and the circular protocol are two elements with one name: refused
    (their rows could not be told apart), saying which protocols met, not 'list it once'."""
    with pytest.raises(ValueError, match=r"found 'translate\(3,8\)' under the protocols 'circular' "
                                         r"and 'crop'.*separate runs"):
        Translation([(3, 8)]) + Translation([(3, 8), (1, 1)], protocol="circular")
    with pytest.raises(ValueError, match=r"'translate\(0,4\)' under.*'circular' and 'zero'"):
        parse_group("translate[zero]:4 + translate[circular]:4")


def test_circular_protocol_only_for_maps_of_the_torus_onto_itself():
    """Wrapping a 45-degree turn (or a quarter turn of a non-square image) would count seams as
    content; the measurement refuses such an element by name, with what to use instead (the ops
    themselves wrap any map: test_kernels)."""
    import equifast
    from equifast import naive

    square, wide = (32, 32), (32, 40)
    allowed = (list(Rotation([90, 180, 270], protocol="circular"))
               + list(Translation([4], protocol="circular") * Flip(["horizontal", "vertical"])))
    check_circular(allowed, *square)
    check_circular(list(Rotation([180], protocol="circular")), *wide)
    check_circular(list(Rotation([45])), *square)  # the crop protocol masks instead
    for element, size, found in [
        (Rotation([45], protocol="circular")[0], square, r"the linear part \[\["),
        (Rotation([90], protocol="circular")[0], wide, "a quarter turn of a non-square image"),
        (parse_group("translate[circular]:4*rotate:30")[-1], square, r"the linear part"),
    ]:
        with pytest.raises(ValueError, match=rf"element '{re.escape(element.name)}': the "
                                             rf"circular protocol.*found {found}.*"
                                             r"protocol='crop'"):
            check_circular([element], *size)
    net = torch.nn.Conv2d(3, 4, 3, padding=1)
    for measure in (equifast.measure, naive.measure):
        with pytest.raises(ValueError, match=r"element 'rotate\(45\)': the circular protocol"):
            measure(net, torch.rand(2, 3, 16, 16), group=Rotation([45], protocol="circular"),
                    progress=False)


@pytest.mark.parametrize("size,stride,offset", [((224, 224), (32, 32), (15.5, 15.5)),
                                                ((97, 131), (4, 2), (0.0, 1.5)),
                                                ((9, 9), (1, 1), (0.0, 0.0))])
def test_feature_disc_is_the_inscribed_disc_on_the_grid(size, stride, offset):
    # Grid position (i, j) sits at input pixel (offset_x + stride_x i, offset_y + stride_y j): it
    # lies in the feature disc exactly when that pixel lies within (min(H, W) - 1) / 2 of the
    # image centre.
    height, width = size
    cx, cy, rx, ry = feature_disc(size, stride, offset)
    grid_h, grid_w = height // stride[0] + 2, width // stride[1] + 2
    j, i = np.mgrid[-1:grid_h, -1:grid_w].astype(float)
    on_grid = ((i - cx) / rx) ** 2 + ((j - cy) / ry) ** 2 <= 1
    px, py = offset[1] + stride[1] * i, offset[0] + stride[0] * j
    radius = (min(size) - 1) / 2
    in_image = (px - (width - 1) / 2) ** 2 + (py - (height - 1) / 2) ** 2 <= radius**2 * (1 + 1e-12)
    np.testing.assert_array_equal(on_grid, in_image)
    assert on_grid.any() and not on_grid.all()


def test_check_mask():
    assert check_mask(None) is None
    assert check_mask("disc", Rotation([30]).elements + Translation([4], "zero").elements) == "disc"
    with pytest.raises(ValueError, match=r"mask: expected None or 'disc', found 'circle'"):
        check_mask("circle")
    with pytest.raises(ValueError, match=r"circular elements \['rotate\(90\)'\]"):
        check_mask("disc", Rotation([90], protocol="circular").elements + Flip().elements)


@pytest.mark.parametrize("group", [
    Translation(),
    Translation([(3, -5), (40, 0)], protocol="circular"),
    Translation([(1.5, 0.25)], protocol="zero"),
    Rotation([90, 180, 15.5]),
    Flip(["horizontal", "vertical"]),
    (Translation([8]) + Rotation([90, 30])) * Flip(),
    parse_group("translate[circular]:4*flip:vertical"),
])
def test_groups_pickle_with_their_maps(group):
    # A group reaches spawned processes (equifast.bench.peak_memory) and Ray workers pickled:
    # its elements' maps are partials of module-level functions, not closures.
    import pickle

    copy = pickle.loads(pickle.dumps(group))
    assert copy.names == group.names
    assert [e.protocol for e in copy] == [e.protocol for e in group]
    for height, width in ((64, 64), (33, 50)):
        np.testing.assert_array_equal(copy.matrices(height, width), group.matrices(height, width))
