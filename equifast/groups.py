"""Group elements as affine maps of the image plane.

Convention:
    Every element is an affine map of the image plane, a ``2 x 3`` matrix acting on ``(x, y, 1)`` in
    pixel coordinates: pixel centres sit at integer coordinates, the origin is the centre of the
    top-left pixel, ``x`` points right and ``y`` down. Angles are in degrees, counter-clockwise as
    seen on screen (so ``Rotation([90])`` equals ``torch.rot90(img, 1, dims=(-2, -1))``).
    Rotations and flips act about the image centre ``((W - 1) / 2, (H - 1) / 2)``.
    A translation ``(dy, dx)`` moves the content ``dy`` pixels down and ``dx`` right, like
    ``torch.roll(img, (dy, dx), dims=(-2, -1))``.
    The matrix of an element is its *forward* map: content at ``p`` moves to ``M @ p``; the
    transformed image is ``(T_g x)(p) = x(M^-1 p)``.

Protocols decide what enters the image where content leaves it:
    ``"crop"``: the image is a window of a larger source; content comes from the source (real
    pixels).
    ``"circular"``: the image wraps around (for translations, flips and quarter turns of a square
    image, the maps of the wrapped image onto itself; a measurement refuses other maps by
    name: :func:`check_circular`).
    ``"zero"``: the per-channel mean (zero after normalization) comes in.

Example:
    >>> from equifast.groups import Translation, Rotation, Flip
    >>> group = Translation([(0, 8), (8, 0)]) * Flip()
    >>> [e.name for e in group]
    ['translate(0,8)', 'translate(8,0)', 'flip(horizontal)', 'translate(0,8)*flip(horizontal)', ...]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

PROTOCOLS = ("crop", "circular", "zero")
PROTOCOL_CODES = {name: code for code, name in enumerate(PROTOCOLS)}

# Entries of a matrix closer than this to an integer are treated as integers: the element is then
# applied by index arithmetic, exactly, and feature maps re-align without interpolation.
INTEGER_TOLERANCE = 1e-6
# A linear part whose determinant is smaller than this has no usable inverse (the source of an
# output pixel): such an element is refused.
SINGULAR_TOLERANCE = 1e-12

MatrixFn = Callable[[int, int], np.ndarray]


def is_integer_affine(matrix: np.ndarray, tolerance: float = INTEGER_TOLERANCE) -> bool:
    """Whether all entries of ``matrix`` are integers (within ``tolerance``)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return bool(np.all(np.abs(matrix - np.round(matrix)) <= tolerance))


def to_homogeneous(matrix: np.ndarray) -> np.ndarray:
    """``(2, 3)`` affine -> ``(3, 3)`` homogeneous matrix."""
    out = np.eye(3, dtype=np.float64)
    out[:2] = matrix
    return out


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a ``(2, 3)`` affine map, as a ``(2, 3)`` matrix."""
    return np.linalg.inv(to_homogeneous(matrix))[:2]


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer o inner`` (apply ``inner`` first) for ``(2, 3)`` affines."""
    return (to_homogeneous(outer) @ to_homogeneous(inner))[:2]


def _translation_matrix(dy: float, dx: float, circular: bool = False) -> MatrixFn:
    # (partials of module-level functions, not closures, so that elements can be pickled: sent
    # to a spawned process or a Ray worker)
    return functools.partial(_translation_map, dy, dx, circular)


def _translation_map(dy: float, dx: float, circular: bool, height: int,
                     width: int) -> np.ndarray:
    if not circular:
        return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
    # A circular shift by d and by d +- size is the same image; the feature grid is moved by the
    # shortest of them, so that they score the same also where a layer's grid does not tile the
    # image (there its wrapped band is masked, and a shift by -32 of a 34-pixel image would
    # otherwise move the grid by 8 cells instead of half a cell).
    return np.array([[1.0, 0.0, _shortest_shift(dx, width)],
                     [0.0, 1.0, _shortest_shift(dy, height)]])


def _shortest_shift(shift: float, size: int) -> float:
    """``shift`` modulo ``size``, taken in ``[-size / 2, size / 2]`` (unchanged when it is)."""
    if abs(shift) <= size / 2:
        return shift
    return shift - size * round(shift / size)


def _rotation_matrix(angle: float) -> MatrixFn:
    return functools.partial(_rotation_map, angle)


def _rotation_map(angle: float, height: int, width: int) -> np.ndarray:
    theta = math.radians(angle)
    # Snap cos/sin of multiples of 90 degrees to exact integers so they stay exact maps.
    cos, sin = math.cos(theta), math.sin(theta)
    cos = float(round(cos)) if abs(cos - round(cos)) < 1e-12 else cos
    sin = float(round(sin)) if abs(sin - round(sin)) < 1e-12 else sin
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    # Counter-clockwise on screen with y pointing down: (1, 0) -> (cos, -sin).
    linear = np.array([[cos, sin], [-sin, cos]])
    centre = np.array([cx, cy])
    return np.concatenate([linear, (centre - linear @ centre)[:, None]], axis=1)


def _flip_matrix(axis: str) -> MatrixFn:
    return functools.partial(_flip_map, axis)


def _flip_map(axis: str, height: int, width: int) -> np.ndarray:
    if axis == "horizontal":
        return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])
    return np.array([[1.0, 0.0, 0.0], [0.0, -1.0, height - 1.0]])


@dataclass(frozen=True)
class Element:
    """One group element: a named affine map of the image plane with a protocol.

    Attributes:
        name: Unique, readable name (``"translate(0,8)"``, ``"rotate(90)"``).
        matrix_fn: ``(height, width) -> (2, 3)`` forward affine in pixel coordinates (depends on the
            image size for maps about the centre).
        protocol: ``"crop"``, ``"circular"`` or ``"zero"`` (module docstring).
        kind: ``"translation"``, ``"rotation"``, ``"flip"``, ``"product"`` or ``"affine"``.
        params: The parameters that made it (for records).
    """

    name: str
    matrix_fn: MatrixFn = field(repr=False, compare=False)
    protocol: str = "crop"
    kind: str = "affine"
    params: tuple = ()

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol of element {self.name!r}: expected one of {PROTOCOLS}, "
                f"found {self.protocol!r}"
            )

    def matrix(self, height: int, width: int) -> np.ndarray:
        """The ``(2, 3)`` float64 forward map for an image of ``height x width`` pixels."""
        matrix = np.asarray(self.matrix_fn(height, width), dtype=np.float64)
        if matrix.shape != (2, 3):
            raise ValueError(
                f"element {self.name!r}: matrix must have shape (2, 3), found {matrix.shape}"
            )
        if not np.all(np.isfinite(matrix)):
            raise ValueError(
                f"element {self.name!r}: expected a matrix of finite numbers, found "
                f"{matrix.tolist()} at {height}x{width} pixels"
            )
        # An element moves every pixel somewhere and back: its inverse gives the source of each
        # output pixel. A singular map (a projection, all zeros) has none.
        determinant = float(np.linalg.det(matrix[:, :2]))
        if abs(determinant) < SINGULAR_TOLERANCE:
            raise ValueError(
                f"element {self.name!r}: expected an invertible affine map (a shift, rotation, "
                f"flip, zoom or shear), found {matrix.tolist()} at {height}x{width} pixels, whose "
                f"linear part has determinant {determinant:g}"
            )
        return matrix

    def is_exact(self, height: int, width: int) -> bool:
        """Whether the element maps pixels to pixels (index arithmetic, no interpolation)."""
        return is_integer_affine(self.matrix(height, width))

    def margin(self, height: int, width: int) -> tuple[int, int]:
        """Pixels of source needed beyond the image on each side, ``(margin_y, margin_x)``.

        Only ``crop`` elements ask for a margin: they are windows of a larger source, moved by the
        element's translation relative to the same map taken about the image centre. So a margin
        depends on the shifts only, never on the image size (a rotation about the centre asks for
        none: what it cannot take from the source is filled with the mean and masked in the
        comparison). A fractional shift asks for the whole pixels its bilinear samples reach
        (2.5 px: 3), so that it, too, moves real image content in.
        """
        if self.protocol != "crop":
            return (0, 0)
        matrix = self.matrix(height, width)
        linear, translation = matrix[:, :2], matrix[:, 2]
        centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
        extra = translation - (centre - linear @ centre)
        # The source window moves by L^-1 d for an extra translation d applied after L.
        shift = np.abs(np.linalg.solve(linear, extra))
        # (a tolerance, so that an integer shift computed as 7.999999999 or 8.000000001 asks for 8)
        return (int(np.ceil(shift[1] - 1e-6)), int(np.ceil(shift[0] - 1e-6)))

    def __mul__(self, other: Element) -> Element:
        """``self * other``: apply ``other`` first, then ``self``."""
        return _product(self, other)


def check_circular(elements: Sequence[Element], height: int, width: int) -> None:
    """Refuse, by name, elements that the circular protocol cannot measure at this image size.

    The circular protocol wraps the image around its borders (a torus). Only maps of the torus
    onto itself give a transformed image without seams: translations, flips, and quarter turns
    and transposes of a square image (a linear part that permutes the axes, with signs). A
    45-degree turn, a zoom or a shear would wrap content across the borders at an angle, and the
    comparison would count those seams as valid content (DESIGN 1.2 masks the corners of other
    angles instead). The measurement checks its group with this; the ops themselves wrap any map.

    Raises:
        ValueError: a circular element is not such a map (the message says what to use).
    """
    for element in elements:
        if element.protocol == "circular":
            _check_circular_map(element.name, element.matrix(height, width), height, width)


def _check_circular_map(name: str, matrix: np.ndarray, height: int, width: int) -> None:
    linear = matrix[:, :2]
    rounded = np.round(linear)
    signed_permutation = (np.all(np.abs(linear - rounded) <= INTEGER_TOLERANCE)
                          and np.all(np.abs(rounded).sum(0) == 1)
                          and np.all(np.abs(rounded).sum(1) == 1))
    if signed_permutation and (rounded[0, 0] != 0 or height == width):
        return
    what = ("a quarter turn of a non-square image" if signed_permutation
            else f"the linear part {np.round(linear, 6).tolist()}")
    raise ValueError(
        f"element {name!r}: the circular protocol wraps the image around its borders, which only "
        "translations, flips and quarter turns of a square image map onto themselves; found "
        f"{what} at {height}x{width} pixels. Use protocol='crop' (or 'zero'): content that "
        "leaves the image is then masked in the comparison"
    )


def _product(outer: Element, inner: Element) -> Element:
    # Translations decide the protocol of a product: they are what moves content across the border.
    protocols = [e.protocol for e in (outer, inner) if e.kind == "translation"]
    protocol = protocols[0] if protocols else outer.protocol
    return Element(
        name=f"{outer.name}*{inner.name}",
        matrix_fn=functools.partial(_product_map, outer.matrix_fn, inner.matrix_fn),
        protocol=protocol,
        kind="product",
        params=(outer.params, inner.params),
    )


def _product_map(outer_fn: MatrixFn, inner_fn: MatrixFn, height: int, width: int) -> np.ndarray:
    return compose(outer_fn(height, width), inner_fn(height, width))


IDENTITY = Element("identity", _translation_matrix(0, 0), protocol="crop", kind="identity")


class Group(Sequence[Element]):
    """A list of named group elements (the identity is implied and always evaluated too).

    Args:
        elements: The elements; names must be unique. The identity is dropped if given.
        name: Readable name of the group (for records and plots).

    Example:
        >>> import numpy as np
        >>> shear = Element("shear", lambda h, w: np.array([[1, 0.2, 0], [0, 1, 0]]))
        >>> Group([shear], name="shear").names
        ['shear']
    """

    def __init__(self, elements: Iterable[Element], name: str | None = None) -> None:
        self.elements: list[Element] = [e for e in elements if e.kind != "identity"]
        if not self.elements:
            raise ValueError("a group needs at least one element besides the identity")
        names = [e.name for e in self.elements]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            protocols = {n: sorted({e.protocol for e in self.elements if e.name == n})
                         for n in duplicates}
            mixed = {n: p for n, p in protocols.items() if len(p) > 1}
            if mixed:
                # The same map under two protocols: two elements, but the frame's rows name them
                # alike, so their scores could not be told apart.
                name, given = next(iter(mixed.items()))
                raise ValueError(
                    f"group element names must be unique, found {name!r} under the protocols "
                    f"{' and '.join(map(repr, given))}: result rows are named by element, so a "
                    "group measures each element under one protocol; measure the protocols in "
                    "separate runs"
                )
            raise ValueError(
                f"group element names must be unique, found repeated {duplicates}: each element "
                "is measured once, so list it once (a union or product of a group with itself, "
                "such as Flip() * Flip(), repeats its elements; a custom Element needs a name of "
                "its own)"
            )
        self.name = name or "+".join(dict.fromkeys(e.kind for e in self.elements))

    def __len__(self) -> int:
        return len(self.elements)

    def __getitem__(self, index):  # type: ignore[override]
        return self.elements[index]

    def __iter__(self) -> Iterator[Element]:
        return iter(self.elements)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, {self.names})"

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.elements]

    def __mul__(self, other: Group) -> Group:
        """Product: every element of ``self`` after every one of ``other``, plus both factors."""
        if not isinstance(other, Group):
            return NotImplemented
        products = [a * b for a in self.elements for b in other.elements]
        return Group(self.elements + other.elements + products, name=f"{self.name}*{other.name}")

    def __add__(self, other: Group) -> Group:
        """Union of the elements of two groups (a measurement over both sets)."""
        return Group(self.elements + other.elements, name=f"{self.name}+{other.name}")

    def margin(self, height: int, width: int) -> tuple[int, int]:
        """Largest source margin ``(margin_y, margin_x)`` any element needs (crop protocol)."""
        margins = [e.margin(height, width) for e in self.elements] or [(0, 0)]
        return (max(m[0] for m in margins), max(m[1] for m in margins))

    def matrices(self, height: int, width: int, with_identity: bool = True) -> np.ndarray:
        """``(K + 1, 2, 3)`` forward maps, the identity first (or ``(K, 2, 3)`` without it)."""
        elements = ([IDENTITY] if with_identity else []) + self.elements
        return np.stack([e.matrix(height, width) for e in elements])


def Translation(  # noqa: N802 - reads as a class, like torchvision's transforms
    shifts: Sequence[tuple[float, float]] | Sequence[float] | None = None,
    protocol: str = "crop",
) -> Group:
    """Translations by ``(dy, dx)`` pixels.

    Args:
        shifts: ``[(dy, dx), ...]``, or a list of numbers ``d`` meaning ``(0, d)`` and ``(d, 0)``
            (one number alone is such a list).
            Default: 8, 16 and 32 pixels along each axis (most layers then re-align exactly). A
            number 0 gives one element, ``(0, 0)``.
        protocol: ``"crop"`` (default, for real data), ``"circular"`` or ``"zero"``. A circular
            shift is taken modulo the image size, as the shortest equivalent one (by -32 pixels
            on a 34-pixel image is by 2): the same image, the same scores.

    Example:
        >>> Translation([8, 16]).names
        ['translate(0,8)', 'translate(8,0)', 'translate(0,16)', 'translate(16,0)']
    """
    if shifts is None:
        shifts = [8, 16, 32]
    elif _is_scalar(shifts):
        shifts = [shifts]  # Translation(8): one distance, along both axes
    _check_sequence(shifts, "shifts", "a number, a list of numbers or of (dy, dx) pairs",
                    "translate:8,16")
    pairs: list[tuple[float, float]] = []
    for shift in shifts:
        if _is_scalar(shift):
            # d = 0 is one element (a control: the identity moved by nothing), not the same twice
            shift = _clean_number(shift, "translation shift")
            pairs += [(0, shift), (shift, 0)] if shift != 0 else [(0, 0)]
        else:
            if isinstance(shift, str) or not hasattr(shift, "__len__") or len(shift) != 2:
                raise ValueError(f"a shift is a number or a pair (dy, dx), found {shift!r}")
            pairs.append((shift[0], shift[1]))
    elements = []
    for dy, dx in pairs:
        dy, dx = _clean_number(dy, "translation shift"), _clean_number(dx, "translation shift")
        elements.append(
            Element(
                f"translate({dy},{dx})",
                _translation_matrix(dy, dx, circular=protocol == "circular"),
                protocol=protocol,
                kind="translation",
                params=(("dy", dy), ("dx", dx)),
            )
        )
    return Group(elements, name="translation")


def Rotation(angles: Sequence[float] = (90, 180, 270), protocol: str = "crop") -> Group:  # noqa: N802
    """Rotations about the image centre by ``angles`` degrees, counter-clockwise on screen.

    Multiples of 90 degrees are exact on square images; other angles are bilinear, and the corners
    whose content left the image are masked in the comparison.

    Example:
        >>> Rotation().names
        ['rotate(90)', 'rotate(180)', 'rotate(270)']
    """
    if _is_scalar(angles):
        angles = [angles]  # Rotation(90)
    _check_sequence(angles, "angles", "a number or a list of numbers", "rotate:90,180")
    elements = []
    for angle in angles:
        angle = _clean_number(angle, "rotation angle")
        elements.append(
            Element(
                f"rotate({angle})",
                _rotation_matrix(float(angle)),
                protocol=protocol,
                kind="rotation",
                params=(("angle", angle),),
            )
        )
    return Group(elements, name="rotation")


# Abbreviations of the flip axes: numpy's fliplr / flipud, and the first letters.
_FLIP_AXES = {"horizontal": "horizontal", "h": "horizontal", "lr": "horizontal",
              "vertical": "vertical", "v": "vertical", "ud": "vertical"}


def Flip(axis: str | Sequence[str] = "horizontal") -> Group:  # noqa: N802
    """Mirror images about the vertical centre line (``"horizontal"``, ``"h"``, ``"lr"``) or the
    horizontal one (``"vertical"``, ``"v"``, ``"ud"``); elements are named by the full word.

    Example:
        >>> Flip(["horizontal", "vertical"]).names
        ['flip(horizontal)', 'flip(vertical)']
    """
    if not isinstance(axis, str):
        _check_sequence(axis, "axis", "'horizontal', 'vertical' or a list of them", "flip:h,v")
    axes = [axis] if isinstance(axis, str) else list(axis)
    elements = []
    for given in axes:
        name = _FLIP_AXES.get(given.strip().lower()) if isinstance(given, str) else None
        if name is None:
            raise ValueError(
                f"flip axis: expected 'horizontal' or 'vertical' (or 'h', 'v', 'lr', 'ud'), "
                f"found {given!r}"
            )
        elements.append(
            Element(f"flip({name})", _flip_matrix(name), kind="flip", params=(("axis", name),))
        )
    return Group(elements, name="flip")


def _is_scalar(value) -> bool:
    """A plain number, a numpy scalar or a 0-d array or tensor (``torch.tensor(8)``)."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    return getattr(value, "ndim", None) == 0 and not isinstance(value, (str, bytes))


def _check_sequence(values, what: str, expected: str, spec: str) -> None:
    """``values`` must be a list-like of parameters: a string (iterated, ``'90'`` would be 9
    and 0 degrees) or a non-iterable is a TypeError that names the spec string it might be."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(
            f"{what}: expected {expected}, found {values!r}"
            + (f" (a spec string goes to equifast.parse_group, e.g. {spec!r})"
               if isinstance(values, str) else "")
        )


def _clean_number(value: float, what: str = "value") -> float | int:
    """``8.0 -> 8`` so names read naturally; fractional values stay floats. A value that is not
    a finite number is a ValueError naming ``what`` it was meant to be."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number, found {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what}: expected a finite number, found {value!r}")
    return int(number) if number.is_integer() else number


def parse_group(spec: str) -> Group:
    """Parse a command-line group spec.

    Grammar: terms joined by ``+`` (union) or ``*`` (product); a term is
    ``translate:8,16,32`` (both axes), ``translate:0/8,8/0`` (``dy/dx`` pairs),
    ``translate[circular]:8``, ``rotate:90,180,270``, ``flip`` / ``flip:horizontal,vertical``.
    A protocol in brackets is one of ``crop``, ``circular``, ``zero``; a flip accepts any, as all
    are the same for it.

    Example:
        >>> parse_group("translate:8,16+rotate:90").names
        ['translate(0,8)', 'translate(8,0)', 'translate(0,16)', 'translate(16,0)', 'rotate(90)']
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty group spec: expected e.g. 'translate:8,16,32' or 'rotate:90'")
    for operator in ("+", "*"):
        if operator in spec:
            terms = spec.split(operator)
            if not all(term.strip() for term in terms):
                raise ValueError(
                    f"group spec {spec!r}: an empty term before or after {operator!r}; expected "
                    "terms joined by '+' (union) or '*' (product), e.g. 'translate:8*flip'"
                )
            try:
                parts = [parse_group(term) for term in terms]
                group = parts[0]
                for part in parts[1:]:
                    group = group + part if operator == "+" else group * part
            except ValueError as error:
                message = str(error)
                if message.startswith("group spec "):
                    raise  # names its own term
                raise ValueError(f"group spec {spec!r}: {message}") from None
            return group
    head, colon, args = spec.partition(":")
    kind, protocol = head.strip().lower(), None  # FLIP:H is flip:h
    if "[" in kind and kind.endswith("]"):
        kind, protocol = kind[:-1].split("[", 1)
        kind, protocol = kind.strip(), protocol.strip()  # 'translate [ circular ]:8'
        if protocol not in PROTOCOLS:
            raise ValueError(f"group spec {spec!r}: protocol {protocol!r} is not one of "
                             f"{PROTOCOLS} (e.g. 'translate[circular]:8')")
    values = [v.strip() for v in args.split(",")] if colon else []
    if colon and not all(values):
        raise ValueError(
            f"group spec {spec!r}: expected comma-separated values after ':', found an empty one "
            "(e.g. 'translate:8,16,32', 'rotate:90,180')"
        )

    def number(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            # 'translate:8;rotate:90' or 'translate:8 flip': a second term joined the wrong way
            joined = ":" in text or any(word in text.lower()
                                        for word in ("translat", "shift", "rotat", "flip"))
            hint = ("; terms of a group are joined by '+' (union) or '*' (product), e.g. "
                    "'translate:8+rotate:90+flip'") if joined else ""
            raise ValueError(f"expected a number, found {text!r}{hint}") from None

    try:
        if kind in ("translate", "translation", "shift"):
            shifts: list = []
            for value in values:
                if "/" in value:
                    pair = value.split("/")
                    if len(pair) != 2:
                        raise ValueError(
                            f"expected a shift 'dy/dx' of two numbers, found {value!r}")
                    shifts.append((number(pair[0]), number(pair[1])))
                else:
                    shifts.append(number(value))
            return Translation(shifts or None, protocol=protocol or "crop")
        if kind in ("rotate", "rotation"):
            angles = [number(v) for v in values] or [90, 180, 270]
            return Rotation(angles, protocol=protocol or "crop")
        if kind == "flip":
            # Any protocol is the same for a flip: it maps the image onto itself, so nothing
            # comes from outside it.
            return Flip([v.strip() for v in values] or "horizontal")
    except ValueError as error:
        raise ValueError(f"group spec {spec!r}: {error}") from None
    raise ValueError(
        f"group spec {spec!r}: unknown kind {kind!r}; expected 'translate', 'rotate' or 'flip' "
        "(e.g. 'translate:8,16,32', 'rotate:90,180,270', 'flip')"
    )


def default_group() -> Group:
    """The default: translations by 8, 16 and 32 pixels along each axis, crop protocol."""
    return Translation()


def feature_source_affines(
    matrices: np.ndarray,
    stride: tuple[float, float],
    offset: tuple[float, float],
) -> np.ndarray:
    """Express image maps on a feature grid, as *source* maps (output position -> source position).

    A feature pixel ``(i, j)`` (column ``i``, row ``j``) sits at image coordinate
    ``P(i, j) = (offset_x + stride_x * i, offset_y + stride_y * j)``. The element acts on the grid
    as ``M_l = P^-1 M P``; re-aligning the identity features reads, for output position ``u``, the
    source position ``M_l^-1 u``, which is what this returns.

    Args:
        matrices: ``(K, 2, 3)`` forward maps in image pixel coordinates (``(x, y)`` order).
        stride: ``(stride_y, stride_x)`` input pixels per feature pixel.
        offset: ``(offset_y, offset_x)`` input coordinate of the centre of feature pixel 0.

    Returns:
        ``(K, 2, 3)`` float64 source maps in feature-grid coordinates (``(x, y)`` order).
    """
    stride_y, stride_x = float(stride[0]), float(stride[1])
    offset_y, offset_x = float(offset[0]), float(offset[1])
    grid_to_image = np.array(
        [[stride_x, 0.0, offset_x], [0.0, stride_y, offset_y], [0.0, 0.0, 1.0]]
    )
    image_to_grid = np.linalg.inv(grid_to_image)
    out = []
    for matrix in np.asarray(matrices, dtype=np.float64):
        inverse = np.linalg.inv(to_homogeneous(matrix))
        source = image_to_grid @ inverse @ grid_to_image
        # Clean rounding noise so that exact maps are recognized as exact.
        rounded = np.round(source)
        source = np.where(np.abs(source - rounded) <= 1e-9, rounded, source)
        out.append(source[:2])
    return np.stack(out) if out else np.zeros((0, 2, 3))


# Regions a comparison may be restricted to (``measure(mask=...)``): None, every valid position;
# "disc", the positions inside the disc inscribed in the model input (DESIGN.md 1.5).
MASKS = (None, "disc")


def check_mask(mask: str | None, elements: Sequence[Element] = ()) -> str | None:
    """``mask`` when it is one of :data:`MASKS` and suits ``elements``, else a ``ValueError``.

    A disc masks the corners that rotations bring in from outside the image; the circular
    protocol brings nothing in (the image wraps around), so a disc with it is refused by name.
    """
    if mask not in MASKS:
        raise ValueError(f"mask: expected None or 'disc', found {mask!r}")
    if mask == "disc":
        circular = [e.name for e in elements if e.protocol == "circular"]
        if circular:
            raise ValueError(
                f"mask='disc' keeps the positions inside the disc of the image, which the "
                f"circular protocol has no border for (it wraps the image around); found "
                f"circular elements {circular}: use the crop or zero protocol, or no mask"
            )
    return mask


def feature_disc(
    input_size: tuple[int, int],
    stride: tuple[float, float],
    offset: tuple[float, float],
) -> tuple[float, float, float, float]:
    """The disc inscribed in the model input, on a feature grid: ``(cx, cy, rx, ry)``.

    The disc is centred on the image centre ``((W - 1) / 2, (H - 1) / 2)`` and passes through the
    centres of the outermost pixels of the shorter side (radius ``(min(H, W) - 1) / 2``, at least
    half a pixel), so that every rotation about the centre keeps it inside the sampled image: with
    ``mask="disc"`` each rotation compares the same positions. On a grid whose feature pixel
    ``(i, j)`` sits at ``(offset_x + stride_x * i, offset_y + stride_y * j)`` (see
    :func:`feature_source_affines`) it is an ellipse when the two strides differ.

    Args:
        input_size: ``(H, W)`` of the model input.
        stride: ``(stride_y, stride_x)``.
        offset: ``(offset_y, offset_x)``.

    Returns:
        ``(centre_x, centre_y, radius_x, radius_y)`` in grid coordinates, the ``disc`` of
        :func:`equifast.ops.equivariance_stats`.

    Example:
        >>> feature_disc((224, 224), (32, 32), (15.5, 15.5))
        (3.0, 3.0, 3.484375, 3.484375)
    """
    height, width = int(input_size[0]), int(input_size[1])
    stride_y, stride_x = float(stride[0]), float(stride[1])
    offset_y, offset_x = float(offset[0]), float(offset[1])
    radius = max((min(height, width) - 1) / 2, 0.5)
    return (((width - 1) / 2 - offset_x) / stride_x, ((height - 1) / 2 - offset_y) / stride_y,
            radius / stride_x, radius / stride_y)
