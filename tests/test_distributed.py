"""Several processes: ``torchrun -m equifast measure`` and ``measure`` under a Gloo process group
give the single-process result (same values, bootstrap intervals, counts) on every rank."""

import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import equifast
from equifast import Translation, distributed
from equifast.data.dali import dali_available
from equifast.distributed import Shard

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["value", "ci_low", "ci_high", "n"]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("layer", "element", "comparison", "metric") if c in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


def _assert_same(result_a, result_b):
    a, b = _sorted(result_a.frame), _sorted(result_b.frame)
    assert len(a) == len(b) > 0
    assert list(a.layer) == list(b.layer) and list(a.metric) == list(b.metric)
    for column in COLUMNS:
        np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float),
                                   rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=column)
    ma, mb = _sorted(result_a.model_frame), _sorted(result_b.model_frame)
    assert list(ma.metric) == list(mb.metric)
    for column in COLUMNS:
        np.testing.assert_allclose(ma[column].to_numpy(float), mb[column].to_numpy(float),
                                   rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=column)


# --- torchrun -m equifast measure ---------------------------------------------------------------

def _torchrun(tmp_path: Path, processes: int, out: Path, extra: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--standalone", "-m", "equifast", "measure", "--model", "resnet18", "--samples",
        "--device", "cpu", "--limit", "7", "--batch-size", "2", "--input-size", "64",
        "--group", "translate:8", "--layers", "layer1", "layer3", "--bootstrap", "50",
        "--no-plot", "--out", str(out), *extra,
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("pooled", [False, True], ids=["per-image", "pooled"])
def test_torchrun_two_processes_equal_one(tmp_path, pooled):
    extra = ["--pooled"] if pooled else []
    # 7 images in batches of 2: rank 0 measures batches 0 and 2 (4 images), rank 1 batches 1 and
    # 3 (3 images, the last one alone in its batch)
    one_out, two_out = tmp_path / "one.parquet", tmp_path / "two.parquet"
    one_printed = _torchrun(tmp_path, 1, one_out, extra)
    two_printed = _torchrun(tmp_path, 2, two_out, extra)
    one, two = equifast.Result.load(one_out), equifast.Result.load(two_out)
    _assert_same(one, two)
    assert two.config["images"] == one.config["images"] == 7
    assert two.config["world_size"] == 2 and "world_size" not in one.config
    assert repr(two.config["offsets"]) == repr(one.config["offsets"])
    corr = two.frame[(two.frame.metric == "corr") & (two.frame.element == "mean")]
    assert set(corr[corr.comparison != "chance"].n) == {7}
    # the last image is alone in its batch on rank 1, as in one process: no chance pair (and
    # not in the pooled chance statistics either)
    assert set(corr[corr.comparison == "chance"].n) == {6}
    assert corr.ci_low.notna().all() and (corr.ci_low < corr.ci_high).all()
    assert two.frame.pooled.all() == pooled
    assert list(two.model_frame.n) == [7]
    # rank 0 alone prints the table and writes the file
    assert two_printed.count("eq corr") == 1 and two_printed.count("wrote") == 1
    assert "ops, 2 processes)" in two_printed and "ops)" in one_printed


# --- measure() under a Gloo group of two spawned processes --------------------------------------

def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


def _images(count: int, size: int = 20, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)


def _write_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    (root / "a" / "2_bad.png").write_bytes(b"not a png")
    # 16-bit: decoded by Pillow where DALI reads the others, in its place in the batches
    deep = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
    Image.fromarray(deep).save(root / "a" / "3_deep.png")
    return root


def _scenarios(folder: Path) -> dict:
    images, labels = _images(7), torch.arange(7) % 5
    iterable = [(_images(3, seed=2), torch.tensor([0, 1, 2])), (_images(2, seed=3), [3, -1]),
                (_images(1, seed=4), torch.tensor([4])), (_images(4, seed=5), torch.arange(4))]
    common = {"group": Translation([2, 4]), "bootstrap": 50, "progress": False}
    return {
        # 4 batches of 2, 2, 2, 1: uneven shards
        "tensor": (images, {**common, "labels": labels, "batch_size": 2}),
        "pooled": (images, {**common, "labels": labels, "batch_size": 2, "pooled": True}),
        # one batch of 3: rank 1 measures nothing
        "one_batch": (images[:3], {**common, "batch_size": 4}),
        # batch i to rank i % 2; the limit cuts the last batch
        "iterable": (iterable, {**common, "limit": 8}),
        # 12 files (one unreadable) in batches of 3
        "folder": (str(folder), {**common, "batch_size": 3, "input_size": (32, 32),
                                 "loader": "folder", "num_workers": 0}),
    } | ({
        "dali": (str(folder), {**common, "batch_size": 3, "input_size": (32, 32),
                               "loader": "dali", "num_workers": 1}),
    } if dali_available() else {})


def _measure_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    try:
        assert distributed.rank() == rank and distributed.world_size() == world
        out = {}
        for name, (data, kwargs) in _scenarios(Path(tmp) / "folder").items():
            # different weights on every rank: the measurement uses rank 0's
            result = equifast.measure(_net(seed=rank), data, **kwargs)
            out[name] = (result.frame, result.model_frame, result.skipped, result.config)
        # distributed=False: every rank measures everything by itself
        alone = equifast.measure(_net(0), _images(7), group=Translation([2]), batch_size=2,
                                 bootstrap=0, progress=False, distributed=False)
        out["alone"] = (alone.frame, alone.model_frame, alone.skipped, alone.config)
        try:  # refused by name, on every rank, before any forward
            equifast.measure(_net(0), _images(4), group=Translation([2]), progress=False,
                             channel_map="linear")
        except ValueError as error:
            out["linear"] = str(error)
        with open(Path(tmp) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(out, handle)
    finally:
        dist.destroy_process_group()


def test_measure_under_gloo_group_equals_one_process(tmp_path):
    folder = _write_folder(tmp_path / "folder")
    mp.spawn(_measure_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as handle:
            ranks.append(pickle.load(handle))
    for name, (data, kwargs) in _scenarios(folder).items():
        single = equifast.measure(_net(seed=0), data, **kwargs)
        for rank in range(2):
            frame, model_frame, skipped, config = ranks[rank][name]
            got = SimpleNamespace(frame=frame, model_frame=model_frame)
            try:
                _assert_same(single, got)
            except AssertionError as error:
                raise AssertionError(f"{name}, rank {rank}: {error}") from None
            assert config["images"] == single.config["images"], name
            assert config["world_size"] == 2, name
            assert repr(config["offsets"]) == repr(single.config["offsets"]), name
            assert skipped == single.skipped, name
    assert single.skipped and "2_bad.png" in single.skipped[0][0]  # the folder scenario
    assert ranks[0]["tensor"][3]["images"] == 7 and ranks[1]["one_batch"][3]["images"] == 3
    assert ranks[0]["iterable"][3]["images"] == 8
    assert not ranks[0]["tensor"][1].empty  # top1, top5, consistency
    assert set(ranks[0]["tensor"][1].metric) == {"consistency", "top1", "top5"}
    for rank in range(2):
        assert "channel_map='linear' is not available with distributed=True" in ranks[rank].get(
            "linear", "no error")
        frame, _, _, config = ranks[rank]["alone"]
        assert "world_size" not in config and config["images"] == 7
        assert set(frame[(frame.metric == "corr") & (frame.comparison == "eq")].n) == {7}


# --- the combine helper under a Gloo group -------------------------------------------------------

BATCHES = {"uneven": [3, 1, 4, 2, 2], "one_batch": [2]}  # images per global batch
SKIPPED = [("f1.png", "bad", 1), ("f4.png", "bad", 4), ("f9.png", "empty", 9)]  # (path, why, pos)


def _global_batches(sizes: list[int]):
    """Per batch: score chunks (K = 2 in chunks of 1), pooled chunks, consistency, top rows."""
    rng = np.random.default_rng(7)
    out = []
    for size in sizes:
        scores = [(lo, rng.normal(size=(3, 1, size))) for lo in (0, 1)]
        pooled = [(lo, torch.from_numpy(rng.normal(size=(3, 1, 4, 6)))) for lo in (0, 1)]
        out.append((scores, pooled, rng.random((2, size)), rng.random((2, size))))
    return out


def _combine_worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    try:
        for name, sizes in BATCHES.items():
            batches = _global_batches(sizes)
            mine = [i for i in range(len(sizes)) if Shard(rank, world).owns(i)]
            layer = SimpleNamespace(
                scores={"corr": [c for i in mine for c in batches[i][0]]} if mine else {},
                pooled=[c for i in mine for c in batches[i][1]])
            state = {"layer1": layer}
            consistency = [batches[i][2] for i in mine]
            top = [batches[i][3] for i in mine]
            skipped = [(p, why) for p, why, pos in SKIPPED if pos % world == rank]
            keys = [pos for _, _, pos in SKIPPED if pos % world == rank]
            images, all_skipped = distributed.combine(
                state, consistency, top, mine, sum(sizes[i] for i in mine), skipped, keys)
            assert images == sum(sizes), (name, images)
            assert all_skipped == [(p, why) for p, why, _ in SKIPPED], all_skipped
            expected = [c for b in batches for c in b[0]]
            got = state["layer1"].scores["corr"]
            assert [lo for lo, _ in got] == [lo for lo, _ in expected], name
            for (_, a), (_, b) in zip(got, expected):
                np.testing.assert_array_equal(a, b)
            pooled = [c for batch in batches for c in batch[1]]
            for (_, a), (_, b) in zip(state["layer1"].pooled, pooled):
                assert torch.equal(a, b)
            assert len(state["layer1"].pooled) == 2 * len(sizes)
            np.testing.assert_array_equal(np.concatenate(consistency, 1),
                                          np.concatenate([b[2] for b in batches], 1))
            np.testing.assert_array_equal(np.concatenate(top, 1),
                                          np.concatenate([b[3] for b in batches], 1))
        # every rank gets rank 0's value
        assert distributed.agree({"x": (0.5, 0.0)}, "offsets") == {"x": (0.5, 0.0)}
        assert distributed.broadcast_object(f"rank {rank}") == "rank 0"
        with pytest.raises(ValueError, match="no images"):
            distributed.total_images(0)
        assert distributed.total_images(rank) == 1
        # parameters and buffers come from rank 0
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        torch.manual_seed(rank)
        for tensor in list(net.parameters()) + list(net.buffers()):
            if tensor.is_floating_point():
                tensor.data.normal_()
        distributed.sync_module(net)
        checksum = [sum(float(t.double().sum()) for t in net.state_dict().values())]
        every = [None] * world
        dist.all_gather_object(every, checksum)
        assert every[0] == every[1]
    finally:
        dist.destroy_process_group()


def test_combine_helpers_uneven_and_empty_shards(tmp_path):
    mp.spawn(_combine_worker, args=(2, str(tmp_path)), nprocs=2, join=True)


def test_shards_cover_every_item_once():
    for count in (0, 1, 5, 7, 16):
        for batch_size in (1, 2, 3):
            for world in (1, 2, 3):
                shards = [Shard(r, world) for r in range(world)]
                items = [distributed.shard_items(count, batch_size, s) for s in shards]
                assert sorted(i for part in items for i in part) == list(range(count))
                for shard, part in zip(shards, items):
                    assert len(part) == distributed.owned_images(count, batch_size, shard)
                    assert all(shard.owns(i // batch_size) for i in part)
    assert distributed.shard_items(7, 2, Shard(1, 2)) == [2, 3, 6]


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    assert distributed.setup(None, "cpu") == (None, "cpu")
    with pytest.raises(ValueError, match="torchrun"):
        distributed.setup(True, None)
    monkeypatch.setenv("RANK", "3")  # a stray RANK without a launch is not a rank
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup(None, None) == (None, None)
    assert distributed.setup(False, "cpu") == (None, "cpu")
    assert distributed.backend_for("cpu") == "gloo"
    if not torch.cuda.is_available():
        assert distributed.backend_for(None) == "gloo"
