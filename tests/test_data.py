"""Data sources: embedded samples, timm-exact geometry, the folder reader and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equifast.data.folder import ImageFolderSource, find_images
from equifast.data.geometry import Preprocess, crop_plan, resize_and_crop, source_size, to_rgb
from equifast.data.samples import load_sample_image, load_samples, sample_names

# Configurations met among timm/torchvision models: square and non-square inputs, crop_pct below
# and at 1, bilinear/bicubic, squash mode, and a small ViT input.
PREPROCESSES = [
    Preprocess((224, 224), 0.875, "bilinear"),
    Preprocess((224, 224), 0.95, "bicubic"),
    Preprocess((384, 384), 1.0, "bicubic"),
    Preprocess((256, 192), 0.9, "bicubic"),
    Preprocess((64, 64), 0.9, "bicubic"),
    Preprocess((224, 224), 0.9, "bicubic", crop_mode="squash"),
]


def _timm_uint8(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """timm's eval transform of ``img`` brought back to uint8 0..255, (3, H, W)."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, *pre.input_size),
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        is_training=False,
    )
    normalized = transform(img)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (normalized * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# samples


def test_sample_names_fixed_order() -> None:
    assert sample_names() == [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "retina",
        "hubble_deep_field",
        "immunohistochemistry",
        "stereo_motorcycle",
    ]


def test_samples_are_small_rgb_photos() -> None:
    for name in sample_names():
        img = load_sample_image(name)
        assert img.mode == "RGB"
        assert max(img.size) <= 512
        assert min(img.size) >= 256  # enough for 224-pixel models without upscaling


def test_load_samples_shapes_and_content() -> None:
    pre = Preprocess((224, 224))
    sources, names = load_samples(pre, margin=(8, 16))
    assert names == sample_names()
    assert sources.dtype == torch.uint8
    assert sources.shape == (8, 3, 240, 256)
    # not blank: every photograph has real spatial and colour variation
    flat = sources.float().flatten(1)
    assert (flat.std(dim=1) > 20).all()
    # the photographs differ from each other
    assert len({tuple(s.float().mean(dim=(1, 2)).round().tolist()) for s in sources}) == 8


def test_load_samples_subset_and_unknown() -> None:
    sources, names = load_samples(Preprocess((32, 48)), names=["coffee", "astronaut"])
    assert sources.shape == (2, 3, 32, 48) and names == ["coffee", "astronaut"]
    with pytest.raises(KeyError, match="astronaut"):
        load_samples(Preprocess((32, 32)), names=["nope"])


# --------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize(
    "pre",
    PREPROCESSES,
    ids=lambda p: f"{p.input_size}-{p.crop_pct}-{p.interpolation}-{p.crop_mode}",
)
def test_margin_zero_equals_timm_eval(pre: Preprocess) -> None:
    # Tolerance: mean |difference| <= 0.5 grey levels and max <= 1. The pixels are produced by the
    # same Pillow resize and crop, so they agree exactly in practice; the only slack is the float
    # round trip of timm's normalization (x / 255 - mean) / std and back.
    for name in sample_names():
        img = load_sample_image(name)
        ours = resize_and_crop(img, pre)
        ref = _timm_uint8(img, pre)
        assert ours.shape == ref.shape == (3, *pre.input_size)
        diff = (ours.float() - ref.float()).abs()
        assert diff.mean() <= 0.5 and diff.max() <= 1, (name, diff.mean().item(), diff.max().item())


@pytest.mark.parametrize(
    "pre", PREPROCESSES, ids=lambda p: f"{p.input_size}-{p.crop_pct}-{p.crop_mode}"
)
@pytest.mark.parametrize("margin", [(1, 1), (4, 8), (16, 16), (32, 32)])
def test_margin_central_window_is_identity(pre: Preprocess, margin: tuple[int, int]) -> None:
    my, mx = margin
    h, w = pre.input_size
    for name in sample_names():
        img = load_sample_image(name)
        source = resize_and_crop(img, pre, margin)
        assert source.shape == (3, *source_size(pre, margin))
        window = source[:, my : my + h, mx : mx + w]
        if crop_plan((img.height, img.width), pre, margin).upscaled:
            # resized larger to hold the margin: a slightly zoomed view, still the same photo
            continue
        # where it fits, the central window is timm's view pixel for pixel (tolerance 0)
        assert torch.equal(window, resize_and_crop(img, pre)), (name, margin)


def test_margin_too_large_upscales_to_fit() -> None:
    pre = Preprocess((224, 224), 0.875, "bilinear")  # shorter side resized to 256
    plan = crop_plan((375, 500), pre, (32, 32))  # needs 288
    assert plan.upscaled and min(plan.resize_hw) == 288
    assert plan.top == 0 and plan.top + 288 <= plan.resize_hw[0]
    assert plan.left + 288 <= plan.resize_hw[1]
    fits = crop_plan((375, 500), pre, (16, 16))
    assert not fits.upscaled and fits.resize_hw == (256, 341)
    img = load_sample_image("coffee")
    assert resize_and_crop(img, pre, (32, 32)).shape == (3, 288, 288)


def test_source_size_and_bad_margin() -> None:
    pre = Preprocess((224, 160))
    assert source_size(pre, (8, 16)) == (240, 192)
    assert source_size(pre, 4) == (232, 168)
    with pytest.raises(ValueError, match="margin"):
        source_size(pre, (-1, 0))


def test_preprocess_validation() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess((224, 224), interpolation="cubic")
    with pytest.raises(ValueError, match="input_size"):
        Preprocess((224,))  # type: ignore[arg-type]
    assert Preprocess([224, 224], mean=[0.5, 0.5, 0.5]) == Preprocess(
        (224, 224), mean=(0.5, 0.5, 0.5)
    )


def test_to_rgb_modes() -> None:
    grey16 = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))
    assert grey16.mode == "I;16"
    rgb = np.asarray(to_rgb(grey16))
    assert rgb.shape == (4, 5, 3) and (rgb == 255).all()
    mid16 = Image.fromarray(np.full((4, 5), 32896, dtype=np.uint16))  # 128 * 257
    assert (np.asarray(to_rgb(mid16)) == 128).all()  # scaled, not clipped to 255
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]  # alpha dropped like torchvision
    floaty = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert np.asarray(to_rgb(floaty))[0, 0, 0] == 128


# --------------------------------------------------------------------------------------------
# folder reader


def _make_jpeg(path: Path, name: str, size: int = 96) -> None:
    img = load_sample_image(name).resize((size * 4 // 3, size))
    img.save(path, quality=90)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """An ImageNet-style folder with good, convertible and broken files."""
    root = tmp_path / "val"
    cat, space, empty = root / "n001_cat", root / "n002_space", root / "n003_empty"
    for folder in (cat, space, empty):
        folder.mkdir(parents=True)
    (root / ".hidden").mkdir()  # ignored, not a class
    _make_jpeg(cat / "chelsea.jpg", "chelsea")
    _make_jpeg(cat / "coffee.JPEG", "coffee")  # upper-case extension
    sub = cat / "nested"
    sub.mkdir()
    _make_jpeg(sub / "astronaut.jpg", "astronaut")  # class folders are read recursively
    base = load_sample_image("rocket").resize((128, 96))
    base.convert("L").save(space / "grey.jpg")
    base.convert("CMYK").save(space / "cmyk.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(space / "alpha.png")
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(space / "deep16.png")
    base.convert("P").save(space / "palette.png")
    # broken files
    good_bytes = (cat / "chelsea.jpg").read_bytes()
    (space / "truncated.jpg").write_bytes(good_bytes[: len(good_bytes) // 3])
    (space / "garbage.jpg").write_bytes(good_bytes[:200] + bytes(range(256)) * 8)
    (space / "zero.jpg").write_bytes(b"")
    (space / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (space / "readme.txt").write_text("not an image extension: never looked at\n")
    return root


BAD = {"truncated.jpg", "garbage.jpg", "zero.jpg", "notes.jpg"}
GOOD = {
    "chelsea.jpg",
    "coffee.JPEG",
    "astronaut.jpg",
    "grey.jpg",
    "cmyk.jpg",
    "alpha.png",
    "deep16.png",
    "palette.png",
}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_reader_good_and_bad(messy_folder: Path, num_workers: int) -> None:
    pre = Preprocess((64, 64), 0.875, "bilinear")
    data = ImageFolderSource(
        messy_folder, pre, margin=(4, 4), batch_size=3, num_workers=num_workers
    )
    assert data.classes == ["n001_cat", "n002_space", "n003_empty"]
    assert len(data) == len(GOOD) + len(BAD)

    seen: dict[str, int] = {}
    for sources, labels, paths in data:
        assert sources.dtype == torch.uint8 and sources.shape[1:] == (3, 72, 72)
        assert labels is not None and labels.dtype == torch.long
        assert sources.shape[0] == labels.shape[0] == len(paths)
        for source, label, path in zip(sources, labels, paths, strict=True):
            assert source.float().std() > 1, path  # not blank
            seen[Path(path).name] = int(label)
    assert set(seen) == GOOD
    assert seen["chelsea.jpg"] == 0 and seen["astronaut.jpg"] == 0 and seen["cmyk.jpg"] == 1

    skipped = {Path(path).name: reason for path, reason in data.skipped}
    assert set(skipped) == BAD
    assert "0 bytes" in skipped["zero.jpg"]
    assert all(reason for reason in skipped.values())

    # a second pass starts a fresh list instead of doubling it
    assert sum(len(paths) for _, _, paths in data) == len(GOOD)
    assert len(data.skipped) == len(BAD)


def test_folder_reader_converts_without_saturating(messy_folder: Path) -> None:
    pre = Preprocess((64, 64))
    data = ImageFolderSource(
        [messy_folder / "n002_space" / "grey.jpg", messy_folder / "n002_space" / "deep16.png"],
        pre,
        num_workers=0,
    )
    ((sources, labels, _),) = list(data)
    assert labels is None
    grey, deep = sources.float()
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()  # greyscale replicated
    # the 16-bit image holds the same picture as the 8-bit one (scaled, not clipped to white)
    assert (grey - deep).abs().mean() < 2


def test_flat_folder_and_file_list(tmp_path: Path) -> None:
    for name in ("coffee", "rocket", "chelsea"):
        _make_jpeg(tmp_path / f"{name}.jpg", name)
    pre = Preprocess((32, 32))
    data = ImageFolderSource(tmp_path, pre, batch_size=2, num_workers=0)
    assert data.classes is None and len(data) == 3
    batches = list(data)
    assert [len(paths) for _, _, paths in batches] == [2, 1]
    assert all(labels is None for _, labels, _ in batches)
    assert [Path(p).name for _, _, paths in batches for p in paths] == [
        "chelsea.jpg",
        "coffee.jpg",
        "rocket.jpg",
    ]

    (tmp_path / "list.txt").write_text("coffee.jpg 7\n# comment\n\nrocket.jpg 3\n")
    listed = ImageFolderSource(tmp_path / "list.txt", pre, num_workers=0)
    ((_, labels, paths),) = list(listed)
    assert labels.tolist() == [7, 3] and [Path(p).name for p in paths] == [
        "coffee.jpg",
        "rocket.jpg",
    ]

    pairs = ImageFolderSource([(tmp_path / "coffee.jpg", 5)], pre, num_workers=0)
    ((_, labels, _),) = list(pairs)
    assert labels.tolist() == [5]


def test_limit_spreads_over_classes_and_shards(messy_folder: Path) -> None:
    pre = Preprocess((32, 32))
    items, _ = find_images(messy_folder)
    limited = ImageFolderSource(messy_folder, pre, limit=4, num_workers=0)
    assert len(limited) == 4
    assert {label for _, label in limited.items} == {0, 1}  # not just the first class
    shards = [
        ImageFolderSource(messy_folder, pre, shard_id=k, num_shards=3, num_workers=0)
        for k in range(3)
    ]
    assert sorted(p for s in shards for p, _ in s.items) == sorted(p for p, _ in items)


def test_images_beside_class_folders_are_named_in_a_warning(messy_folder: Path) -> None:
    _make_jpeg(messy_folder / "stray.jpg", "chelsea")
    with pytest.warns(UserWarning, match=r"1 image file\(s\) outside them \(e.g. 'stray.jpg'\)"):
        items, classes = find_images(messy_folder)
    assert classes == ["n001_cat", "n002_space", "n003_empty"]
    assert all("stray" not in path for path, _ in items)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    pre = Preprocess((32, 32))
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ImageFolderSource(missing, pre)
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"empty.*\.jpg"):
        ImageFolderSource(empty, pre)


@pytest.mark.parametrize("channel_map", ["identity", "linear"])
def test_progress_bar_counts_unreadable_files(messy_folder: Path, recorded_bars,
                                              channel_map: str) -> None:
    """The bar's total is every file of the folder (each pass over it: linear reads it twice); an
    unreadable file is done too, so the bar ends at its total and names how many were skipped,
    also when a whole batch, the last one, is unreadable."""
    import warnings

    import equifast

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    files = len(GOOD) + len(BAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped files' warning, the linear fit's own
        result = equifast.measure(net, messy_folder, group="translate:2", layers=["1"],
                                  batch_size=3, input_size=(32, 32), bootstrap=0, num_workers=0,
                                  channel_map=channel_map)
    assert len(result.skipped) == len(BAD)
    passes = 2 if channel_map == "linear" else 1
    # (not the align probe's bar)
    (bar,) = [bar for bar in recorded_bars if bar.desc.startswith("measure")]
    done, total, postfix = bar.closed_at
    assert done == total == passes * files
    assert postfix == f"skipped={len(BAD)}"
