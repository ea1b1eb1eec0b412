"""Engine behaviour: data forms, chunking, labels, pooled scores, sub-pixel handling."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import equifast
from equifast import SkippedFilesWarning, Translation, naive


def _net(num_classes=5):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    ).eval()


def _values(result):
    frame = result.frame.sort_values(["layer", "element", "comparison", "metric"])
    return frame.reset_index(drop=True)


def test_chunking_does_not_change_results():
    net = _net()
    images = torch.rand(6, 3, 24, 24)
    group = Translation([2, 4])
    whole = equifast.measure(net, images, group=group, progress=False, bootstrap=100,
                             elements_per_chunk=4)
    chunked = equifast.measure(net, images, group=group, progress=False, bootstrap=100,
                               elements_per_chunk=1)
    pd.testing.assert_frame_equal(_values(whole), _values(chunked), rtol=1e-6, atol=1e-6)
    assert chunked.config["elements_per_chunk"] == 1
    pd.testing.assert_frame_equal(whole.model_frame, chunked.model_frame)  # logits per element


@pytest.mark.parametrize("elements_per_chunk", [None, 2])
def test_element_order_does_not_change_an_elements_scores(elements_per_chunk):
    """A group is a list: listing its elements in another order changes how they are chunked
    and how the kernels' tasks fall to threads, never an element's scores. The elements mix
    every kind of image row (a bilinear rotation, shifts under the zero and circular protocols,
    a flip); uint8 pixels go through the compiled transform's byte paths."""
    torch.manual_seed(0)
    net = _net().double()
    elements = (list(equifast.Rotation([30]))
                + list(Translation([(0, 3)], protocol="zero"))
                + list(Translation([(2, -3)], protocol="circular"))
                + list(equifast.Flip()))
    size = 20
    margin_y, margin_x = equifast.Group(elements).margin(size, size)
    images = torch.randint(0, 256, (4, 3, size + 2 * margin_y, size + 2 * margin_x),
                           dtype=torch.uint8)
    kwargs = dict(input_size=(size, size), progress=False, bootstrap=0, dtype=torch.float64,
                  elements_per_chunk=elements_per_chunk, batch_size=4)
    forward = equifast.measure(net, images, group=equifast.Group(elements), **kwargs)
    backward = equifast.measure(net, images, group=equifast.Group(elements[::-1]), **kwargs)
    keys = ["layer", "element", "comparison", "metric"]
    merged = forward.frame.merge(backward.frame, on=keys, suffixes=("_a", "_b"))
    assert len(merged) == len(forward.frame) == len(backward.frame)
    assert set(merged.element) == {e.name for e in elements} | {"mean"}
    np.testing.assert_allclose(merged.value_a, merged.value_b, rtol=0, atol=1e-12)


def test_identity_block_is_forwarded_once_per_batch():
    """Later chunks reuse the identity features of the first forward instead of recomputing."""
    net = _net()
    seen = []
    handle = net[0].register_forward_hook(lambda m, inputs, out: seen.append(out.shape[0]))
    images = torch.rand(4, 3, 24, 24)
    group = Translation([2, 4])
    count = len(list(group))
    try:
        result = equifast.measure(net, images, group=group, progress=False, bootstrap=0,
                                  batch_size=4, elements_per_chunk=3, align="center")
    finally:
        handle.remove()
    # the layout probe (two images, so that an output that ignores the batch shows it) and the
    # stride probe at a larger size (one image; align="center" needs no gradients)
    assert seen[:2] == [2, 1]
    # 4 elements, at most 3 per forward: two forwards, their 5 blocks of 4 images spread evenly
    # (identity + 2 elements, then 2 elements; not 4 blocks, then 1); the identity block once
    assert count == 4 and seen[2:] == [3 * 4, 2 * 4]
    timings = result.config["timings"]
    assert set(timings) == {"setup", "probe", "batches", "frame"}
    assert all(value >= 0 for value in timings.values())
    assert timings["setup"] + timings["batches"] + timings["frame"] <= result.config["seconds"]


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_later_larger_batch_is_cut_to_the_first_with_a_warning(implementation):
    """The first batch of an iterable sets the input size; a later, larger one is measured on
    its central window, as the same images cut beforehand, and a warning says so (once)."""
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    torch.manual_seed(0)
    first, larger, third = (torch.rand(2, 3, 40, 40), torch.rand(2, 3, 48, 44),
                            torch.rand(2, 3, 46, 46))
    kwargs = dict(group=Translation([4]), layers=["1"], progress=False, bootstrap=0)
    net = _net()
    with pytest.warns(UserWarning, match=r"data batch 1: sources of 48x44, larger than the "
                                         r"40x40 of the first batch.*central 40x40 window") as got:
        cut_here = measure(net, [first, larger, third], **kwargs)
    assert sum("larger than the" in str(w.message) for w in got) == 1
    cut_before = measure(net, [first, larger[..., 4:44, 2:42], third[..., 3:43, 3:43]], **kwargs)
    pd.testing.assert_frame_equal(cut_here.frame, cut_before.frame)


def test_batches_vs_iterable_and_uint8():
    net = _net()
    images = (torch.rand(6, 3, 20, 20) * 255).to(torch.uint8)
    group = Translation([2])
    as_tensor = equifast.measure(net, images, group=group, batch_size=3, progress=False,
                                 bootstrap=0)
    as_batches = equifast.measure(net, [images[:3], images[3:]], group=group, progress=False,
                                  bootstrap=0)
    pd.testing.assert_frame_equal(_values(as_tensor), _values(as_batches))
    assert as_tensor.config["input_size"] == [16, 16] and as_tensor.config["margin"] == [2, 2]


def test_labels_give_accuracy_and_consistency():
    net = _net(num_classes=4)
    images = torch.rand(8, 3, 20, 20)
    with torch.no_grad():
        predicted = net(images[:, :, 2:18, 2:18]).argmax(-1)
    labels = predicted.clone()
    labels[:2] = (labels[:2] + 1) % 4  # two wrong
    result = equifast.measure(net, images, labels=labels, group=Translation([2]), progress=False,
                              bootstrap=50)
    scores = result.model_frame.set_index("metric")
    assert scores.loc["top1", "value"] == pytest.approx(6 / 8)
    assert scores.loc["top5", "value"] == pytest.approx(1.0)
    assert 0 <= scores.loc["consistency", "value"] <= 1
    assert scores.loc["top1", "n"] == 8


def test_subpixel_skip_gives_nan_for_fractional_realignment():
    net = _net()
    images = torch.rand(4, 3, 20, 20)
    group = Translation([(0, 1), (0, 2)])
    result = equifast.measure(net, images, group=group, layers=["1", "3"], subpixel="skip",
                              progress=False, bootstrap=0)
    eq = result.frame[(result.frame.metric == "corr") & (result.frame.comparison == "eq")]
    at_stride2 = eq[eq.layer == "3"].set_index("element")
    assert np.isnan(at_stride2.loc["translate(0,1)", "value"])
    assert not at_stride2.loc["translate(0,1)", "exact"]
    assert np.isfinite(at_stride2.loc["translate(0,2)", "value"])
    assert at_stride2.loc["translate(0,2)", "n"] == 4


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_layer_left_out_by_subpixel_skip_is_named_as_such(implementation):
    """A stride-2 layer under odd shifts only: every element is skipped there. The warning says
    so (it used to blame 'no position where both exist, or constant features')."""
    from equifast import naive

    measure = equifast.measure if implementation == "engine" else naive.measure
    group = Translation([(0, 1), (0, 3)])
    with pytest.warns(UserWarning, match=r"layer\(s\) have no defined correlations.*3: every "
                                         r"element moves them by a fraction of a feature pixel, "
                                         r"which subpixel='skip' leaves out") as caught:
        result = measure(_net(), torch.rand(4, 3, 20, 20), group=group, layers=["1", "3"],
                         subpixel="skip", progress=False, bootstrap=0)
    assert not any("constant features" in str(w.message) for w in caught)
    corr = result.frame.query("metric == 'corr' and element != 'mean'")
    assert corr[corr.layer == "3"].value.isna().all()
    assert corr[corr.layer == "1"].value.notna().all()


def test_pooled_scores_for_identical_images_match_per_image():
    net = _net()
    image = torch.rand(1, 3, 20, 20)
    images = image.repeat(4, 1, 1, 1)
    group = Translation([2])
    per_image = equifast.measure(net, images, group=group, layers=["1"], comparisons=("eq",),
                                 progress=False, bootstrap=0, batch_size=2)
    pooled = equifast.measure(net, images, group=group, layers=["1"], comparisons=("eq",),
                              pooled=True, progress=False, bootstrap=50, batch_size=2)
    # Identical images: merging their statistics changes no score.
    a = per_image.frame.set_index(["element", "metric"]).value
    b = pooled.frame.set_index(["element", "metric"]).value
    np.testing.assert_allclose(a.loc[b.index], b, rtol=1e-6)
    assert pooled.frame.pooled.all()


def test_pooled_differs_from_mean_for_different_images():
    net = _net()
    images = torch.rand(6, 3, 20, 20) * torch.linspace(0.1, 3, 6).view(-1, 1, 1, 1)
    kwargs = dict(group=Translation([2]), layers=["3"], progress=False, bootstrap=20, batch_size=2)
    pooled = equifast.measure(net, images, pooled=True, **kwargs).frame
    mean = equifast.measure(net, images, **kwargs).frame
    key = (pooled.metric == "corr") & (pooled.comparison == "inv") & (pooled.element == "mean")
    assert np.isfinite(pooled[key].ci_low).all()
    assert abs(pooled[key].value.item() - mean[key].value.item()) > 1e-6


def test_folder_data_and_skipped_files(tmp_path):
    from equifast.data.samples import load_sample_image

    for i, name in enumerate(["astronaut", "coffee", "chelsea"]):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        load_sample_image(name).resize((80, 60)).save(folder / f"{name}.jpg")
    (tmp_path / "class0" / "broken.jpg").write_text("not an image")
    with pytest.warns(SkippedFilesWarning, match=r"^1 file\(s\) .* left out \(3 image\(s\) "
                                                 r"measured.*broken.jpg: not an image file"):
        result = equifast.measure(_net(2), tmp_path, group=Translation([4]),
                                  input_size=(32, 32), batch_size=2, num_workers=0,
                                  progress=False, bootstrap=0)
    assert result.config["images"] == 3 and result.config["loader"] == "folder"
    assert [p.endswith("broken.jpg") for p, _ in result.skipped] == [True]
    assert set(result.model_frame.metric) == {"consistency", "top1", "top5"}


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_list_of_image_paths_is_a_data_source(tmp_path, implementation):
    """A list of paths (or of (path, label) pairs) reads those files, in that order, as a .txt
    file list would; it is not taken for an iterable of image batches."""
    from equifast import naive
    from equifast.data.samples import load_sample_image

    measure = equifast.measure if implementation == "engine" else naive.measure
    paths = []
    for name in ["astronaut", "coffee", "chelsea"]:
        paths.append(tmp_path / f"{name}.png")
        load_sample_image(name).resize((80, 60)).save(paths[-1])
    kwargs = dict(group=Translation([4]), input_size=(32, 32), batch_size=2, num_workers=0,
                  progress=False, bootstrap=0, layers=["1"])
    net = _net(2)
    listed = tmp_path / "files.txt"
    listed.write_text("".join(f"{p.name} {label}\n" for label, p in enumerate(paths)))
    want = measure(net, listed, **kwargs)
    for data in ([str(p) for p in paths], tuple(paths), np.array([str(p) for p in paths])):
        got = measure(net, data, **kwargs)
        assert got.config["images"] == 3
        pd.testing.assert_frame_equal(got.frame, want.frame)
    pairs = measure(net, [(str(p), label) for label, p in enumerate(paths)], **kwargs)
    pd.testing.assert_frame_equal(pairs.model_frame, want.model_frame)
    assert "top1" in set(pairs.model_frame.metric)
    with pytest.raises(ValueError, match=r"labels: .*a list of files those of its \(path, label\)"):
        measure(net, [str(p) for p in paths], labels=[0, 1, 2], **kwargs)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_pillow_images_and_numpy_arrays_are_data_sources(tmp_path, implementation):
    """Decoded Pillow images (any mode and size) are resized and cropped as the same images
    read from files; a numpy array of images is a tensor of them."""
    from equifast import naive
    from equifast.data.samples import load_sample_image

    measure = equifast.measure if implementation == "engine" else naive.measure
    images = [load_sample_image("astronaut").resize((80, 60)),
              load_sample_image("coffee").resize((50, 70)).convert("L"),
              load_sample_image("chelsea").resize((64, 64)).convert("RGBA")]
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    kwargs = dict(group=Translation([4]), input_size=(32, 32), batch_size=2, num_workers=0,
                  progress=False, bootstrap=0, layers=["1"])
    net = _net(2)
    from_files = measure(net, [(str(p), label) for label, p in enumerate(paths)], **kwargs)
    from_images = measure(net, images, labels=[0, 1, 2], **kwargs)
    assert from_images.config["images"] == 3
    pd.testing.assert_frame_equal(from_images.frame, from_files.frame)
    pd.testing.assert_frame_equal(from_images.model_frame, from_files.model_frame)
    first = measure(net, images, limit=1, **kwargs)
    one = measure(net, images[0], **kwargs)
    assert one.config["images"] == first.config["images"] == 1
    pd.testing.assert_frame_equal(one.frame, first.frame)
    with pytest.raises(ValueError, match=r"labels: expected .*\(3,\).* found \(2,\)"):
        measure(net, images, labels=[0, 1], **kwargs)
    tensor = torch.rand(3, 3, 40, 40, dtype=torch.float64)
    del kwargs["input_size"]
    pd.testing.assert_frame_equal(measure(net, tensor.numpy(), **kwargs).frame,
                                  measure(net, tensor, **kwargs).frame)


def test_vector_and_nhwc_layers():
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular")
            self.to_nhwc = nn.Identity()
            self.pool = nn.Identity()

        def forward(self, x):
            y = self.to_nhwc(self.conv(x).permute(0, 2, 3, 1))
            return self.pool(y.mean((1, 2)))

    images = torch.rand(3, 3, 12, 12)
    result = equifast.measure(ChannelsLast(), images, layers=["to_nhwc", "pool"],
                              group=Translation([1, 3], protocol="circular"), progress=False,
                              bootstrap=0)
    layouts = result.frame.drop_duplicates("layer").set_index("layer").layout
    assert layouts["to_nhwc"] == "NHWC" and layouts["pool"] == "NC"
    eq = result.frame[(result.frame.metric == "corr") & (result.frame.comparison == "eq")]
    np.testing.assert_allclose(eq[eq.layer == "to_nhwc"].value, 1.0, atol=1e-5)
    # Global average pooling of a circularly equivariant map is invariant: the vector is unchanged.
    np.testing.assert_allclose(eq[eq.layer == "pool"].value, 1.0, atol=1e-5)


def test_module_called_twice_counts_each_image_once():
    act = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 4, 3, padding=1), act)
    result = equifast.measure(net, torch.rand(4, 3, 20, 20), group=Translation([2]),
                              layers=["1"], progress=False, bootstrap=0)
    assert set(result.frame[result.frame.comparison == "eq"].n) == {4}


def test_rotation_of_non_square_images_needs_no_margin():
    net = _net()
    result = equifast.measure(net, torch.rand(2, 3, 24, 32), group=equifast.Rotation([90]),
                              progress=False, bootstrap=0)
    assert result.config["input_size"] == [24, 32] and result.config["margin"] == [0, 0]


def test_labels_are_trimmed_with_limit():
    images = torch.rand(6, 3, 20, 20)
    result = equifast.measure(_net(), images, labels=torch.arange(6) % 5, limit=4,
                              group=Translation([2]), progress=False, bootstrap=0)
    assert result.model_frame.set_index("metric").loc["top1", "n"] == 4


def test_heap_trimmer_trims_only_past_the_slack(monkeypatch):
    # On the CPU the engine trims the heap only when the resident size has grown by the slack
    # since the first batch (a trim costs page faults in the next forwards), and after a trim
    # measures again from where the trim left it.
    from equifast import engine

    resident = iter([1000, 1050, 1100, 1300, 1200, 1250, 1400, 1500, 1550]).__next__
    trims = []
    monkeypatch.setattr(engine, "_TRIM_SLACK", 200)
    monkeypatch.setattr(engine, "_resident_bytes", resident)
    monkeypatch.setattr(engine, "_malloc_trim", lambda: trims.append(True) or True)
    trimmer = engine._HeapTrimmer()
    trimmer.after_batch()  # first batch: 1000, limit 1200
    assert trimmer.limit == 1200 and not trims
    trimmer.after_batch()  # 1050
    trimmer.after_batch()  # 1100
    assert not trims
    trimmer.after_batch()  # 1300 > 1200: trim, 1200 resident after it, limit 1400
    assert len(trims) == 1 and trimmer.limit == 1400
    trimmer.after_batch()  # 1250
    trimmer.after_batch()  # 1400: not past the limit
    assert len(trims) == 1
    trimmer.after_batch()  # 1500: trim, 1550 after it (memory really held), limit 1750
    assert len(trims) == 2 and trimmer.limit == 1750


@pytest.mark.parametrize("group_bytes", [1, 1 << 30])  # every layer alone / a forward at once
@pytest.mark.parametrize("batch_size, pooled", [(3, False), (1, False), (4, True)])
def test_layers_scored_together_give_the_per_layer_scores(monkeypatch, group_bytes, batch_size,
                                                          pooled):
    """The GPU's way of scoring (a forward's layers in one call), run here: the same frame."""
    from equifast import engine
    from equifast.scores import METRICS

    calls = []
    score_stats = engine.score_stats

    def counted(stats, metrics, channel_counts=None, **kwargs):
        calls.append(channel_counts)
        return score_stats(stats, metrics, channel_counts=channel_counts, **kwargs)

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).eval()
    images = torch.rand(5, 3, 20, 20)
    kwargs = dict(group=Translation([2, 4, 6]), layers="leaves", metrics=METRICS, pooled=pooled,
                  progress=False, bootstrap=20, batch_size=batch_size, elements_per_chunk=2)
    monkeypatch.setattr(engine, "score_stats", counted)
    monkeypatch.setattr(engine, "_SCORE_LAYERS_TOGETHER", False)
    alone = equifast.measure(net, images, **kwargs)
    assert calls and all(counts is None for counts in calls)
    calls.clear()
    monkeypatch.setattr(engine, "_SCORE_LAYERS_TOGETHER", True)
    monkeypatch.setattr(engine, "_SCORE_GROUP_BYTES", group_bytes)
    together = equifast.measure(net, images, **kwargs)
    layers = len(set(together.frame.layer))
    assert layers >= 5
    # The pooled scores are computed after the batches, one layer per call (no channel_counts).
    grouped = [counts for counts in calls if counts is not None]
    assert grouped and (pooled or len(grouped) == len(calls))
    assert sorted(set(len(counts) for counts in grouped)) == ([1] if group_bytes == 1 else [layers])
    pd.testing.assert_frame_equal(_values(together), _values(alone), rtol=1e-12, atol=1e-12)
    pd.testing.assert_frame_equal(together.model_frame, alone.model_frame)


def test_batches_finish_in_order():
    """Each batch's results reach the host after the next batch is launched: in batch order."""
    net = _net()
    images = torch.rand(7, 3, 24, 24)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    kwargs = dict(labels=labels, group=Translation([2, 4]), progress=False, bootstrap=200,
                  elements_per_chunk=1)
    whole = equifast.measure(net, images, batch_size=7, **kwargs)
    batched = equifast.measure(net, images, batch_size=2, **kwargs)
    # Bootstrap intervals resample per-image scores and hits: they match only in the same order.
    frame = _values(batched)
    for column in ("value", "ci_low", "ci_high"):
        a, b = frame[column].to_numpy(), _values(whole)[column].to_numpy()
        # chance pairs images within a batch (corr_vs_chance uses it)
        ours = (frame.comparison != "chance") & (frame.metric != "corr_vs_chance")
        np.testing.assert_allclose(a[ours], b[ours], rtol=1e-6, atol=1e-6, err_msg=column)
    pd.testing.assert_frame_equal(batched.model_frame, whole.model_frame)


@settings(max_examples=300, deadline=None)
@given(count=st.integers(0, 60), chunk=st.integers(1, 20), blocks=st.none() | st.integers(1, 21))
def test_forward_bounds_spread_the_blocks_evenly(count, chunk, blocks):
    from equifast.engine import _forward_bounds

    bounds = _forward_bounds(count, chunk, blocks)
    most_blocks = chunk + 1 if blocks is None else blocks
    first_most, later_most = min(chunk, most_blocks - 1), min(chunk, most_blocks)
    # As few forwards as the limits allow: the first as full as it may be, then the later ones.
    forwards = 0 if count == 0 else 1 + -(-max(0, count - first_most) // later_most)
    assert len(bounds) == forwards
    assert [lo for lo, _ in bounds] == [0, *(hi for _, hi in bounds[:-1])][:len(bounds)]
    assert (bounds[-1][1] if bounds else 0) == count
    sizes = [hi - lo for lo, hi in bounds]
    assert all(size <= chunk for size in sizes)
    assert all(size >= 1 for size in sizes[1:])  # only the first may be the identity block alone
    if bounds:
        per_forward = [sizes[0] + 1] + sizes[1:]  # the identity block rides with the first
        assert max(per_forward) <= most_blocks
        # as even as the number of forwards allows: the first forward full, the others within
        # one block of each other and of it
        assert max(per_forward) == -(-(count + 1) // forwards)
        assert min(per_forward) >= max(per_forward) - 1


def test_forward_bounds_reject_empty_forwards():
    from equifast.engine import _forward_bounds

    with pytest.raises(ValueError, match="at least one element and one block"):
        _forward_bounds(4, 0)
    with pytest.raises(ValueError, match="at least one element and one block"):
        _forward_bounds(4, 2, 0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_elements_per_chunk_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=r"elements_per_chunk: expected a positive integer"):
        equifast.measure(_net(), torch.rand(2, 3, 24, 24), group=Translation([2]),
                         progress=False, elements_per_chunk=bad)


@pytest.mark.parametrize("batch,size,expected", [
    (8, 112, (4, 4)),    # 32 images of 112 px: four blocks per forward
    (16, 112, (2, 2)),
    (4, 112, (6, 7)),    # every block in one forward
    (8, 224, (1, 1)),    # one block per forward: the identity block alone first
    (32, 224, (1, 1)),
    (64, 48, (2, 2)),
])
def test_default_cpu_plan_bounds_the_pixels_per_forward(batch, size, expected):
    from equifast.engine import CPU_PIXELS_PER_FORWARD, _default_plan, _forward_bounds

    chunk, blocks = _default_plan(batch, 6, size * size, torch.device("cpu"))
    assert (chunk, blocks) == expected
    bounds = _forward_bounds(6, chunk, blocks)
    images = [(hi - lo + (i == 0)) * batch for i, (lo, hi) in enumerate(bounds)]
    assert max(images) * size * size <= max(CPU_PIXELS_PER_FORWARD, batch * size * size)


def test_kept_identity_features_of_any_layout_give_the_same_results(monkeypatch):
    """Later forwards pass the kept identity features beside their own to the stats op; where the
    kept copy is laid out otherwise (a clone of a strided view is dense), they are stacked
    instead. Both give the single forward's numbers."""
    from equifast import engine, ops

    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.every_other = nn.Identity()  # a strided view: its clone is laid out otherwise
            self.channels_last = nn.Identity()
            self.vector = nn.Identity()

        def forward(self, x):
            x = torch.relu(self.conv(x))
            self.every_other(x[:, ::2])
            self.channels_last(x.contiguous(memory_format=torch.channels_last))
            return self.vector(x.mean((2, 3)))

    torch.manual_seed(0)
    net = Views().eval()
    images = torch.rand(5, 3, 12, 12)
    kwargs = dict(group=Translation([1, 2], protocol="circular"), progress=False, bootstrap=0,
                  batch_size=3, align="center",
                  layers=["conv", "every_other", "channels_last", "vector"])
    whole = equifast.measure(net, images, elements_per_chunk=4, **kwargs)
    calls = []
    real = ops.equivariance_stats

    def spy(feats, *args, reference=None, **kw):
        calls.append(reference is not None)
        return real(feats, *args, reference=reference, **kw)

    monkeypatch.setattr(ops, "equivariance_stats", spy)
    monkeypatch.setattr(engine, "CPU_PIXELS_PER_FORWARD", 1)  # the identity block alone first
    alone = equifast.measure(net, images, **kwargs)
    assert alone.config["blocks_per_forward"] == 1
    assert any(calls) and not all(calls)  # the strided view's kept copy was stacked
    pd.testing.assert_frame_equal(_values(alone), _values(whole), rtol=1e-12, atol=1e-12)


def test_identity_block_alone_gives_the_same_results(monkeypatch):
    """One block per forward (large images): the identity block gets a forward of its own, and
    its kept features are compared in every later forward."""
    from equifast import engine

    net = _net()
    seen = []
    handle = net[0].register_forward_hook(lambda m, inputs, out: seen.append(out.shape[0]))
    images = torch.rand(5, 3, 24, 24)
    labels = torch.tensor([0, 1, 2, 3, 4])
    kwargs = dict(labels=labels, group=Translation([2, 4]), progress=False, bootstrap=50,
                  batch_size=3, align="center")
    monkeypatch.setattr(engine, "CPU_PIXELS_PER_FORWARD", 1)
    try:
        alone = equifast.measure(net, images, **kwargs)
    finally:
        handle.remove()
    assert alone.config["blocks_per_forward"] == 1
    # the layout and stride probes, then per batch (3 and 2 images) five forwards of one block each
    assert seen[2:] == [3] * 5 + [2] * 5
    whole = equifast.measure(net, images, elements_per_chunk=4, **kwargs)
    assert whole.config["blocks_per_forward"] == 5
    pd.testing.assert_frame_equal(_values(alone), _values(whole), rtol=1e-12, atol=1e-12)
    pd.testing.assert_frame_equal(alone.model_frame, whole.model_frame)


def test_out_of_memory_shrinks_the_forwards_down_to_one_block(monkeypatch):
    """The engine's out-of-memory path (a GPU's, raised here on the CPU): the elements per forward
    halve, then the identity block gets a forward of its own; the results are those of a run that
    fitted at once."""
    net = _net()
    images = torch.rand(5, 3, 24, 24)
    kwargs = dict(group=Translation([2, 4, 6]), progress=False, bootstrap=20, batch_size=3,
                  align="center")
    fitted = equifast.measure(net, images, elements_per_chunk=6, **kwargs)
    sizes = []
    original = net.forward

    def forward(x):
        sizes.append(x.shape[0])
        if x.shape[0] > 3:  # more than one block of the batch of 3
            raise torch.cuda.OutOfMemoryError("test: pretend the stacked batch does not fit")
        return original(x)

    monkeypatch.setattr(net, "forward", forward)
    with pytest.warns(UserWarning, match="out of memory: retrying with at most") as caught:
        shrunk = equifast.measure(net, images, elements_per_chunk=6, **kwargs)
    # 6 elements + identity in one forward, then at most 3 + 1 blocks, 1 + 1, then one block
    assert [str(w.message) for w in caught] == [
        f"out of memory: retrying with at most {chunk} elements and {blocks} blocks of images "
        "per forward" for chunk, blocks in [(3, 4), (1, 2), (1, 1)]
    ]
    assert shrunk.config["elements_per_chunk"] == 1 and shrunk.config["blocks_per_forward"] == 1
    # after the shrinking, both batches (3 and 2 images) run one block per forward, 7 each
    assert sizes[-14:] == [3] * 7 + [2] * 7
    pd.testing.assert_frame_equal(_values(shrunk), _values(fitted), rtol=1e-12, atol=1e-12)
    pd.testing.assert_frame_equal(shrunk.model_frame, fitted.model_frame)


def test_a_fixed_size_model_given_by_name_is_built_for_input_size():
    # a timm ViT fixes its input size when built: by name, it (and its init copy) is built for
    # input_size, as on the command line
    images = torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8)
    result = equifast.measure("vit_tiny_patch16_224", images, group="translate:16",
                              layers=["blocks.0"], input_size=(64, 64), bootstrap=0,
                              baseline="init", progress=False)
    assert result.config["input_size"] == [64, 64]
    assert "built again with pretrained=False" in result.config["baseline"]["how"]
    assert result.frame["init"].notna().any()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_saved_results_keep_numeric_layer_names_as_text(tmp_path, suffix):
    net = _net()  # an nn.Sequential: its layers are named "0", "2", ...
    result = equifast.measure(net, torch.rand(3, 3, 20, 20), group=Translation([2]),
                              layers=["0", "2"], bootstrap=10, progress=False)
    path = result.save(tmp_path / f"r{suffix}")
    loaded = equifast.Result.load(path)
    assert loaded.frame["layer"].tolist() == result.frame["layer"].tolist()
    assert set(loaded.summary()["layer"]) == {"0", "2"}
    pd.testing.assert_frame_equal(loaded.frame, result.frame)


@pytest.mark.parametrize("labelled_first", [True, False])
def test_batches_with_and_without_labels_fail_at_the_first_that_differs(labelled_first):
    images = torch.rand(2, 3, 20, 20)
    with_labels, without = (images, torch.tensor([0, 1])), images
    first, other = (with_labels, without) if labelled_first else (without, with_labels)
    read = []

    def batches():
        for index, batch in enumerate([first, first, other, first]):
            read.append(index)
            yield batch

    found = "no labels, but the batches before it have labels" if labelled_first else (
        "has labels, but the batches before it have none")
    with pytest.raises(ValueError, match=rf"data batch 2: {found}; expected every batch as "
                                         r"\(images, labels\) or every one without labels"):
        equifast.measure(_net(num_classes=4), batches(), group=Translation([2]),
                         progress=False, bootstrap=0)
    assert read == [0, 1, 2]  # at that batch, not after all of them


@pytest.mark.parametrize("measure", [equifast.measure, naive.measure])
def test_labels_are_for_tensors_and_samples_and_refused_elsewhere(measure, tmp_path):
    net = _net(num_classes=4)
    settings = dict(group=Translation([2]), progress=False, bootstrap=0)
    # a folder and an iterable carry their own labels: labels= there was silently ignored
    with pytest.raises(ValueError, match=r"labels: given for data of type list, which takes no "
                                         r"separate labels: an iterable gives them with each "
                                         r"batch, as \(images, labels\)"):
        measure(net, [torch.rand(2, 3, 20, 20)], labels=[0, 1], **settings)
    with pytest.raises(ValueError, match=r"labels: given for data of type str.*class "
                                         r"subfolders \(ImageNet layout\)"):
        measure(net, str(tmp_path), labels=[0], **settings)
    # the sample photographs: one label per photograph, in their order
    result = measure(net, "samples", labels=[0, 1, 2, 3, 0, 1, 2, 3], limit=3,
                     input_size=(24, 24), **settings)
    assert result.model_frame.set_index("metric").loc["top1", "n"] == 3


@pytest.mark.parametrize("measure", [equifast.measure, naive.measure])
def test_pooled_n_counts_only_the_images_in_the_statistics(measure):
    # 5 images in batches of 2: the last one is alone, so it has no chance partner; at stride 2
    # the shift by 1 is not re-aligned (subpixel="skip"): no image is in its statistics
    group = Translation([(0, 1), (0, 2)])
    kwargs = dict(group=group, layers=["1", "3"], subpixel="skip", batch_size=2, bootstrap=0,
                  progress=False)
    images = torch.rand(5, 3, 20, 20)
    per_image = measure(_net(), images, **kwargs).frame
    pooled = measure(_net(), images, pooled=True, **kwargs).frame
    corr = pooled[pooled.metric == "corr"].set_index(["layer", "element", "comparison"]).n
    assert corr.loc[("1", "translate(0,1)", "eq")] == 5
    assert corr.loc[("1", "translate(0,1)", "chance")] == 4
    assert corr.loc[("3", "translate(0,1)", "eq")] == 0
    assert corr.loc[("3", "translate(0,2)", "eq")] == 5
    assert corr.loc[("3", "mean", "eq")] == 5 and corr.loc[("3", "mean", "chance")] == 4
    # the images behind each row, as without pooling (whose rows hold no flat features here)
    key = ["layer", "element", "comparison", "metric"]
    np.testing.assert_array_equal(pooled.sort_values(key).n, per_image.sort_values(key).n)


def test_summary_text_shows_long_layer_names_whole_or_with_their_ends():
    result = equifast.measure(_net(), torch.rand(2, 3, 20, 20), group=Translation([2]),
                              layers=["0", "1", "2"], bootstrap=0, progress=False)
    # timm-like names that the first 24 characters do not tell apart, and one past the cap
    long = "stages.3.blocks.2.token_mixer.attention.relative_position_bias.proj_out"
    names = {"0": "stages.2.blocks.11.attn.proj", "1": "stages.2.blocks.11.attn.qkv", "2": long}
    result.frame["layer"] = result.frame["layer"].map(names)
    lines = result.format_summary().splitlines()
    width = lines[0].index("stride") - 1  # the layer column, then a space
    assert len("stages.2.blocks.11.attn.proj") < width < len(long)  # up to a cap
    assert lines[1].startswith("stages.2.blocks.11.attn.proj ")
    assert lines[2].startswith("stages.2.blocks.11.attn.qkv ")
    shown = lines[3][:width]
    assert "..." in shown and lines[3][width] == " "
    assert shown.startswith("stages.3.blocks") and shown.endswith("bias.proj_out")
    # the columns stay aligned: every row's stride ends under the header's
    stride_end = lines[0].index("stride") + len("stride")
    assert all(line[stride_end - 1] in "12" and line[stride_end] == " " for line in lines[1:4])
    # short names keep a column just wide enough for them
    result.frame["layer"] = result.frame["layer"].map({v: k for k, v in names.items()})
    assert result.format_summary().splitlines()[1].startswith("0     ")


def test_summary_text_shows_intervals_only_where_there_are_some():
    net, images = _net(), torch.rand(4, 3, 20, 20)
    kwargs = dict(group=Translation([2]), layers=["0", "2"], progress=False)
    bare = equifast.measure(net, images, bootstrap=0, **kwargs).format_summary()
    assert "nan" not in bare and "[" not in bare
    result = equifast.measure(net, images, bootstrap=50, **kwargs)
    summary, with_intervals = result.summary(), result.format_summary()
    row = with_intervals.splitlines()[1]
    assert row.count("[") == 3 and "nan" not in row
    assert f"{summary['eq'][0]:7.4f} [{summary['eq_lo'][0]:6.3f},{summary['eq_hi'][0]:6.3f}]" in row
    # the same values either way, in the same columns
    assert [line.split()[:3] for line in bare.splitlines()[1:]] == [
        line.split()[:3] for line in with_intervals.splitlines()[1:]]


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_compiled_model_is_measured_through_the_module_it_wraps(implementation):
    """Forward hooks cannot run inside a torch.compile graph (dynamo traced the statistics into
    it and failed on a guard): the wrapped module is measured, in eager mode, with a warning; the
    compiled module's layer names (`_orig_mod.` + name) are understood."""
    measure = equifast.measure if implementation == "engine" else naive.measure
    net = _net(2)
    images = torch.rand(3, 3, 24, 24)
    kwargs = dict(group=Translation([2], protocol="circular"), bootstrap=0, progress=False)
    want = measure(net, images, layers=["1", "3"], align={"1": 1.0, "3": "center"},
                   layouts={"3": "NCHW"}, **kwargs)
    compiled = torch.compile(net)
    with pytest.warns(UserWarning, match=r"torch.compile'd module is measured through the "
                                         r"module it wraps \(Sequential"):
        got = measure(compiled, images, layers=["_orig_mod.1", "3"],
                      align={"_orig_mod.1": 1.0, "3": "center"},
                      layouts={"_orig_mod.3": "NCHW"}, **kwargs)
    pd.testing.assert_frame_equal(got.frame, want.frame)
    if implementation == "engine":
        assert got.config["offsets"]["1"] == [1.0, 1.0]


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_headless_model_has_no_consistency(implementation):
    """timm's num_classes=0 returns pooled features (batch, C): not logits, so no consistency or
    top-1 (their argmax is meaningless); a warning says so, once."""
    import timm

    measure = equifast.measure if implementation == "engine" else naive.measure
    model = timm.create_model("resnet18", num_classes=0).eval()
    message = (r"headless model's \(num_classes=0\) pooled features \(512 per image\), not "
               r"\(batch, classes\) logits")
    with pytest.warns(UserWarning, match=message) as record:
        result = measure(model, torch.rand(2, 3, 40, 40), group=Translation([4]),
                         layers=["layer1"], bootstrap=0, progress=False)
    assert sum("logits" in str(w.message) for w in record) == 1
    assert result.model_frame.empty
    assert result.frame.value.notna().any()


def _grey_net() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("group", ["translate:2,4", "rotate:90,30", "translate[zero]:3"])
def test_a_greyscale_model_sees_the_luma_of_the_images(group):
    """A model whose first convolution takes one channel is fed the normalized luma (ITU-R
    BT.601) of RGB sources: the same scores as its float grey images given directly, and as the
    naive loop's (which converts before transforming, the engine after)."""
    from equifast.data.geometry import LUMA_WEIGHTS, Preprocess, channel_normalization

    torch.manual_seed(0)
    sources = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    settings = dict(group=group, layers=["1", "3"], bootstrap=0, progress=False,
                    input_size=(20, 20))
    engine = equifast.measure(_grey_net(), sources, **settings).frame
    reference = naive.measure(_grey_net(), sources, **settings).frame
    np.testing.assert_allclose(engine.value, reference.value, atol=1e-6, rtol=0)
    (mean,), (std,) = channel_normalization(Preprocess((20, 20)), 1)
    luma = torch.einsum("bchw,c->bhw", sources.double(), torch.tensor(LUMA_WEIGHTS).double())
    grey = ((luma / 255 - mean) / std)[:, None].float()
    given = equifast.measure(_grey_net(), grey, **settings).frame
    np.testing.assert_allclose(engine.value, given.value, atol=1e-5, rtol=0)


def test_grey_images_and_models_of_other_channel_counts():
    torch.manual_seed(0)
    grey = torch.randint(0, 256, (3, 1, 20, 20), dtype=torch.uint8)
    settings = dict(group="translate:2", layers=["1"], bootstrap=0, progress=False)
    for measure in (equifast.measure, naive.measure):
        # grey images for an RGB model: each channel the grey image
        rgb = _net(2)
        pd.testing.assert_frame_equal(measure(rgb, grey, **settings).frame,
                                      measure(rgb, grey.expand(-1, 3, -1, -1), **settings).frame)
        four = nn.Sequential(nn.Conv2d(4, 2, 3), nn.ReLU()).eval()
        with pytest.raises(ValueError, match=r"its input has 4 channels .*RGB \(3\) or "
                                             r"greyscale \(1\)"):
            measure(four, grey, **settings)
    from equifast.data.geometry import Preprocess

    assert Preprocess((8, 8), mean=(0.5,), std=(0.25,)).mean == (0.5,)
    with pytest.raises(ValueError, match="3 values .RGB. or 1 .greyscale."):
        Preprocess((8, 8), mean=(0.5, 0.5), std=(0.25, 0.25))


def test_a_lazy_first_convolution_is_not_a_model_of_no_channels():
    from equifast.layers import input_channels

    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU())
    assert input_channels(lazy) == 3
    result = equifast.measure(lazy, torch.rand(2, 3, 16, 16), group=Translation([2]),
                              layers=["1"], bootstrap=0, progress=False)
    assert result.frame.value.notna().any()


def test_a_model_with_compiled_submodules_is_a_clear_error():
    net = _net(2)
    net[2] = torch.compile(net[2])
    with pytest.raises(ValueError, match=r"submodules \['2'\] are torch.compile'd"):
        equifast.measure(net, torch.rand(2, 3, 16, 16), group=Translation([2]), progress=False)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_the_offsets_of_a_result_repeat_its_measurement(implementation):
    """config['offsets'] passed back as align= gives the same frame (vector layers, which have
    no offset, are left out of it rather than recorded as NaN, which align= refuses)."""
    measure = equifast.measure if implementation == "engine" else naive.measure
    net = _net(3)
    images = torch.rand(3, 3, 24, 24)
    settings = dict(group=Translation([2, 3]), layers=["1", "3", "6"], bootstrap=0,
                    progress=False)
    first = measure(net, images, **settings)
    assert set(first.config["offsets"]) == {"1", "3"}
    again = measure(net, images, align=first.config["offsets"], **settings)
    pd.testing.assert_frame_equal(again.frame, first.frame)


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_labels_under_limit_are_one_per_image_or_one_per_measured_image(implementation):
    """With limit=3 of 5 images, labels for all 5 (the first 3 kept) or for the 3 measured are
    taken, and the engine and the naive loop refuse the same others (7 labels were cut to 3 by
    the engine, refused by the naive loop)."""
    measure = equifast.measure if implementation == "engine" else naive.measure
    net = _net(3)
    images = torch.rand(5, 3, 20, 20)
    settings = dict(group=Translation([2]), layers=["1"], bootstrap=0, progress=False, limit=3)
    every = measure(net, images, labels=[0, 1, 2, 0, 1], **settings).model_frame
    measured = measure(net, images, labels=[0, 1, 2], **settings).model_frame
    pd.testing.assert_frame_equal(every, measured)
    with pytest.raises(ValueError, match=r"labels: expected .*\(3,\).*found \(7,\)"):
        measure(net, images, labels=list(range(7)), **settings)


class _PassThroughs(nn.Module):
    """Layers that output the very tensor of the layer before them (an nn.Identity, a Dropout in
    eval mode), unchanged or written in place since (an in-place ReLU, an in-place op between
    two leaves)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.same = nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.act = nn.ReLU(inplace=True)
        self.after = nn.Identity()
        self.shifted = nn.Identity()

    def forward(self, x):
        x = self.after(self.act(self.drop(self.same(self.conv(x)))))
        x.add_(1.0)  # in place between two leaves: "shifted" sees new values in the same tensor
        return self.shifted(x).mean((2, 3))


@pytest.mark.parametrize("plan", ["one forward", "elements_per_chunk=1", "one block per forward"])
def test_an_unchanged_output_of_the_layer_before_is_not_measured_again(monkeypatch, plan):
    """Its statistics are the layer's before it, bit for bit, so they are taken, not computed:
    the kernel runs for "conv", the in-place "act" (a new version of the tensor) and "shifted"
    (written in place by the forward's own code), not for "same", "drop" and "after". Later
    forwards compare against the identity features of the first, which the pass-throughs share,
    also where the identity block has a forward of its own (one block per forward: the CPU plan
    for large images). Every score agrees with the naive loop, which measures each."""
    from equifast import engine, ops

    if plan == "one block per forward":
        monkeypatch.setattr(engine, "CPU_PIXELS_PER_FORWARD", 1)
    elements_per_chunk = 1 if plan == "elements_per_chunk=1" else None
    torch.manual_seed(0)
    net = _PassThroughs().eval()
    images = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    computed = []
    equivariance_stats = ops.equivariance_stats

    def counted(feats, *args, **kwargs):
        computed.append(feats.shape)
        return equivariance_stats(feats, *args, **kwargs)

    monkeypatch.setattr(ops, "equivariance_stats", counted)
    layers = ["conv", "same", "drop", "act", "after", "shifted"]
    kwargs = dict(group="rotate:90,180", layers=layers, bootstrap=0, progress=False,
                  batch_size=4, metrics=["corr", "cosine"], elements_per_chunk=elements_per_chunk,
                  align="center")  # (the gradient probe cannot pass the in-place add after a ReLU)
    fast = equifast.measure(net, images, **kwargs)
    # (with one block per forward the identity block's own forward computes nothing)
    forwards = {"one forward": 1, "elements_per_chunk=1": 2, "one block per forward": 2}[plan]
    assert len(computed) == 3 * forwards
    blocks = {"one forward": 3, "elements_per_chunk=1": 2, "one block per forward": 1}[plan]
    assert fast.config["blocks_per_forward"] == blocks
    slow = naive.measure(net, images, **kwargs)
    keys = ["layer", "element", "comparison", "metric"]
    merged = fast.frame.merge(slow.frame, on=keys, suffixes=("_fast", "_naive"))
    assert len(merged) == len(fast.frame) == len(slow.frame)
    np.testing.assert_allclose(merged.value_fast, merged.value_naive, rtol=0, atol=1e-6)
    values = fast.frame.set_index(["element", "comparison", "metric", "layer"])["value"].unstack()
    for twin, source in [("same", "conv"), ("drop", "conv"), ("after", "act")]:
        assert values[twin].equals(values[source])
    cosine = values.xs("cosine", level="metric")
    assert not cosine["shifted"].equals(cosine["after"])  # a shift moves the cosine
