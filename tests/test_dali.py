"""DALI folder loading against the Pillow fallback (skipped where DALI is not installed).

Decoder tolerance: DALI (libjpeg-turbo / nvImageCodec, float resize) and Pillow (libjpeg-turbo,
fixed-point resize) give sources whose mean absolute difference is below 1 on 0..255 (measured about
0.1 to 0.2) and whose largest difference per pixel is at most 16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("nvidia.dali")

import equifast  # noqa: E402
import equifast.naive  # noqa: E402
from equifast import Translation  # noqa: E402
from equifast.data.dali import DaliFolderSource  # noqa: E402
from equifast.data.folder import ImageFolderSource  # noqa: E402
from equifast.data.geometry import Preprocess  # noqa: E402
from equifast.data.samples import load_sample_image, sample_names  # noqa: E402

MEAN_TOL = 1.0
MAX_TOL = 16


def _net(num_classes=3):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    ).eval()


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    names = sample_names()
    for c in range(3):
        (root / f"class_{c}").mkdir()
        for k in range(3):
            img = load_sample_image(names[(3 * c + k) % len(names)]).convert("RGB")
            img = img.resize((160 + 37 * k + 11 * c, 120 + 41 * k))  # varied sizes and aspects
            img.save(root / f"class_{c}" / f"img_{k}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, good_folder: Path) -> Path:
    root = tmp_path_factory.mktemp("messy")
    (root / "a").mkdir()
    (root / "b").mkdir()
    photo = load_sample_image("chelsea").convert("RGB").resize((180, 120))
    photo.save(root / "a" / "good.jpg", quality=90)
    data = (root / "a" / "good.jpg").read_bytes()
    (root / "a" / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("not an image")
    photo.convert("RGBA").save(root / "b" / "alpha.png")
    photo.convert("L").save(root / "b" / "grey.jpg")
    photo.convert("CMYK").save(root / "b" / "cmyk.jpg")
    deep = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    Image.fromarray(deep).save(root / "b" / "deep16.png")
    return root


def _by_path(source):
    out = {}
    for sources, labels, paths in source:
        assert sources.dtype == torch.uint8 and sources.shape[1] == 3
        for i, path in enumerate(paths):
            out[path] = (sources[i].cpu(), None if labels is None else int(labels[i]))
    return out


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_dali_matches_fallback(good_folder: Path, interpolation: str) -> None:
    pre = Preprocess((48, 48), interpolation=interpolation)
    dali = DaliFolderSource(good_folder, pre, margin=8, batch_size=4, device="cpu")
    pil = ImageFolderSource(good_folder, pre, margin=8, batch_size=4, num_workers=0)
    assert len(dali) == len(pil) == 9 and dali.classes == pil.classes
    batches = list(dali)
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]  # the last partial batch is kept
    got = _by_path(iter(batches))
    want = _by_path(pil)
    assert list(got) == list(want)  # same order
    for path, (image, label) in got.items():
        ref, ref_label = want[path]
        assert label == ref_label
        assert image.shape == ref.shape == (3, 64, 64)
        diff = (image.float() - ref.float()).abs()
        assert diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL, path
    assert dali.skipped == []


def test_dali_bad_files(bad_folder: Path) -> None:
    pre = Preprocess((32, 32))
    dali = DaliFolderSource(bad_folder, pre, margin=4, batch_size=3, device="cpu")
    got = _by_path(dali)
    names = sorted(Path(p).name for p in got)
    assert names == ["alpha.png", "cmyk.jpg", "deep16.png", "good.jpg", "grey.jpg"]
    skipped = {Path(p).name: reason for p, reason in dali.skipped}
    assert set(skipped) == {"corrupt.jpg", "zero.jpg", "text.jpg"}
    assert all(skipped.values())
    want = _by_path(ImageFolderSource(bad_folder, pre, margin=4, batch_size=3, num_workers=0))
    for path, (image, label) in got.items():
        diff = (image.float() - want[path][0].float()).abs()
        assert label == want[path][1]
        assert diff.mean() < MEAN_TOL, path
    # 16-bit is scaled, not clipped to white
    deep = next(v for p, v in got.items() if p.endswith("deep16.png"))[0]
    assert deep.float().mean() < 230


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_dali_batches_as_the_fallback(bad_folder: Path, batch_size: int) -> None:
    # Pillow-decoded and skipped files among DALI's: the batches still hold the same files in the
    # same order as the fallback's, whose chance comparison (the next image of the batch) the
    # scores of both loaders share
    pre = Preprocess((32, 32))
    dali = DaliFolderSource(bad_folder, pre, margin=4, batch_size=batch_size, device="cpu")
    pil = ImageFolderSource(bad_folder, pre, margin=4, batch_size=batch_size, num_workers=0)
    assert dali.num_batches == pil.num_batches
    want = [(paths, labels) for _, labels, paths in pil]
    got = []
    for sources, labels, paths in dali:
        assert sources.shape == (len(paths), 3, 40, 40) and sources.is_contiguous()
        got.append((paths, labels))
    assert [paths for paths, _ in got] == [paths for paths, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert torch.equal(a, b)
    assert [path for path, _ in dali.skipped] == [path for path, _ in pil.skipped]


def test_measure_dali_vs_naive_on_mixed_files(bad_folder: Path) -> None:
    # equifast.naive reads with Pillow: with DALI the engine must compare the same pairs of
    # images for chance (formerly the Pillow-decoded files came in batches of their own)
    kwargs = dict(group=Translation([2, 4]), input_size=(32, 32), progress=False, bootstrap=0,
                  batch_size=3)
    torch.manual_seed(0)
    net = _net()
    fast = equifast.measure(net, str(bad_folder), loader="dali", **kwargs)
    slow = equifast.naive.measure(net, str(bad_folder), **kwargs)
    keys = ["layer", "element", "comparison", "metric"]
    both = fast.frame[keys + ["value", "n"]].merge(slow.frame[keys + ["value", "n"]], on=keys)
    assert len(both) == len(fast.frame) == len(slow.frame)
    assert (both["n_x"] == both["n_y"]).all()
    chance = both[both["comparison"] == "chance"]
    assert len(chance) and np.nanmax(np.abs(chance["value_x"] - chance["value_y"])) < 1e-2


def test_missing_and_empty(tmp_path: Path) -> None:
    pre = Preprocess((32, 32))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        DaliFolderSource(tmp_path / "no_such_dir", pre)
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        DaliFolderSource(empty, pre)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        equifast.measure(_net(), str(tmp_path / "no_such_dir"), group=Translation([2]),
                         progress=False, loader="dali")


def _frame(result):
    frame = result.frame.sort_values(["layer", "element", "comparison", "metric"])
    return frame.reset_index(drop=True)


def test_measure_dali_vs_folder(good_folder: Path, bad_folder: Path) -> None:
    kwargs = dict(group=Translation([2, 4]), input_size=(32, 32), progress=False, bootstrap=50,
                  batch_size=4)
    torch.manual_seed(0)
    net = _net()
    dali = equifast.measure(net, str(good_folder), loader="dali", **kwargs)
    pil = equifast.measure(net, str(good_folder), loader="folder", **kwargs)
    assert dali.config["loader"] == "dali" and pil.config["loader"] == "folder"
    a, b = _frame(dali), _frame(pil)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    numeric = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric),
                                  check_dtype=False)
    # same scores within 1e-2 (sources differ only by the decoders' rounding)
    diff = np.abs(a[numeric].to_numpy(float) - b[numeric].to_numpy(float))
    assert np.nanmax(diff) < 1e-2
    # auto reads with Pillow on the CPU: the folder loader's pixels and scores, exactly
    auto = equifast.measure(net, str(good_folder), **kwargs)
    assert auto.config["loader"] == "folder"
    pd.testing.assert_frame_equal(_frame(auto), b)

    messy = equifast.measure(net, str(bad_folder), loader="dali", **kwargs)
    assert {Path(p).name for p, _ in messy.skipped} == {"corrupt.jpg", "zero.jpg", "text.jpg"}


def test_auto_reads_a_folder_on_the_cpu_as_naive_does(tmp_path: Path) -> None:
    # Photographs and drawings of other sizes (an RGBA icon upscaled: DALI's resize puts its
    # edges up to 20 levels from Pillow's): equifast on the CPU reads Pillow's pixels, as the
    # naive loop does, and gives its scores to rounding; DALI's decoding moves them by ~1e-3.
    photo = load_sample_image("coffee").convert("RGB")
    photo.resize((300, 170)).save(tmp_path / "a.jpg", quality=85)
    icon = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    icon.paste((250, 30, 30, 255), (8, 8, 32, 32))
    icon.save(tmp_path / "b.png")
    load_sample_image("rocket").convert("L").resize((90, 140)).save(tmp_path / "c.png")
    photo.resize((64, 64)).save(tmp_path / "d.jpg", quality=95)
    kwargs = dict(group="translate:2,4", input_size=(48, 48), progress=False, bootstrap=0,
                  batch_size=2)
    torch.manual_seed(0)
    net = _net().double()
    auto = equifast.measure(net, str(tmp_path), **kwargs)
    naive = equifast.naive.measure(net, str(tmp_path), **kwargs)
    dali = equifast.measure(net, str(tmp_path), loader="dali", **kwargs)
    assert auto.config["loader"] == "folder" and dali.config["loader"] == "dali"
    keys = ["layer", "element", "comparison", "metric"]
    both = auto.frame.merge(naive.frame, on=keys, suffixes=("_auto", "_naive"))
    assert len(both) == len(auto.frame) == len(naive.frame)
    np.testing.assert_allclose(both["value_auto"], both["value_naive"], rtol=0, atol=1e-10)
    apart = auto.frame.merge(dali.frame, on=keys, suffixes=("_auto", "_dali"))
    assert np.nanmax(np.abs(apart["value_auto"] - apart["value_dali"])) > 1e-6


def test_auto_decodes_with_dali_for_a_cuda_engine() -> None:
    from equifast.engine import folder_uses_dali

    assert folder_uses_dali("auto", torch.device("cuda", 1), None)
    assert folder_uses_dali("auto", "cuda", 2)
    assert not folder_uses_dali("auto", "cuda", 0)  # num_workers=0: decode in this process
    assert not folder_uses_dali("auto", torch.device("cpu"), None)
    assert not folder_uses_dali("auto", None, None)
    assert folder_uses_dali("dali", "cpu", 0) and not folder_uses_dali("folder", "cuda", None)


def test_dali_failure_mid_pass_falls_back(bad_folder: Path, monkeypatch) -> None:
    # a corrupt file that slips past the checks makes DALI fail: the pass is finished with Pillow
    from equifast.data import dali as dali_module

    check = dali_module._check_file

    def lenient(path):
        route, hw, reason = check(path)
        return ("dali", (120, 180), None) if path.endswith("corrupt.jpg") else (route, hw, reason)

    monkeypatch.setattr(dali_module, "_check_file", lenient)
    source = DaliFolderSource(bad_folder / "a", Preprocess((32, 32)), batch_size=1, device="cpu")
    with pytest.warns(RuntimeWarning, match="DALI failed"):
        got = _by_path(source)
    assert sorted(Path(p).name for p in got) == ["good.jpg"]
    assert {Path(p).name for p, _ in source.skipped} == {"corrupt.jpg", "zero.jpg", "text.jpg"}


def test_dali_decodes_where_the_engine_runs(good_folder: Path, monkeypatch) -> None:
    # A machine with a GPU, measuring on the CPU: DALI must decode on the CPU too (not "mixed"
    # on a GPU the engine does not use). Pretend CUDA is there; a GPU pipeline would fail here.
    seen = []
    original = DaliFolderSource.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.device)

    monkeypatch.setattr(DaliFolderSource, "__init__", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = equifast.measure(_net(), good_folder, group=Translation([2]), device="cpu",
                              loader="dali", input_size=(32, 32), bootstrap=0, progress=False)
    assert result.config["loader"] == "dali" and result.config["images"] == 9
    assert seen == [torch.device("cpu")]
