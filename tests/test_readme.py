"""The README's Python examples run as written, on the bundled photos instead of ImageNet.

Each ```python block of README.md runs in order in one namespace (later blocks use the names
earlier ones made), inside a temporary folder. Only what this machine cannot have is replaced:
the ImageNet folder becomes the bundled ``"samples"``, pretrained weights become random init, and
the image limits shrink. A replacement that no longer matches its block fails the test, so that the
README and this test change together.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# (block index, text in the README, what runs instead). Every entry must match.
REPLACEMENTS = [
    (0, 'pretrained=True', 'pretrained=False'),
    (0, '"/imagenet/val"', '"samples"'),
    (0, 'limit=2000', 'limit=3'),
    (1, '"/imagenet/val"', '"samples", limit=2'),
    (2, '"/imagenet/val"', '"samples", limit=2'),
    (3, '"/imagenet/val"', '"samples"'),
    (3, 'limit=2000', 'limit=4'),
    (4, '"/imagenet/val"', '"samples"'),
    (4, 'limit=2000', 'limit=2'),
    # (equifast.bench.compare: one timed round on two photographs)
    (5, 'input_size=112,', 'input_size=64, limit=2,'),
    (5, 'repeats=3', 'repeats=1'),
    (6, '"/imagenet/val"', '"samples"'),
    (6, 'limit=5000', 'limit=2'),
    # The block shows ways to ask for one run among several configurations: the store of block 7
    # has none of the runs it asks for, so they are surveyed first (two quarter-turn runs, one
    # matched by channels: its label names the setting where they differ; a translation at
    # another input size), and the hash is the latest run's.
    (7, 'store.result("resnet18", "rotate:90", channel_map="match")',
     'for channel_map in ("identity", "match"):\n'
     '    run_survey(["resnet18"], "samples", "survey.sqlite", group="rotate:90", '
     'channel_map=channel_map, limit=2)\n'
     'run_survey(["resnet18"], "samples", "survey.sqlite", group="translate:8", '
     'input_size=160, limit=2)\n'
     'store = open_store("survey.sqlite")\n'
     'store.result("resnet18", "rotate:90", channel_map="match")'),
    (7, 'data="/imagenet/val"', 'data="samples"'),
    (7, '"c1bbd15e34ee0dfb"', 'store.runs.sort_values("run_id").config_hash.iloc[-1]'),
    (9, '"/imagenet/val"', '"samples", input_size=(64, 64)'),
    (9, 'limit=500', 'limit=2'),
]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 10, f"expected the README's 10 Python examples, found {len(blocks)}"
    for index, old, new in REPLACEMENTS:
        assert old in blocks[index], f"README Python block {index + 1} no longer has {old!r}"
        blocks[index] = blocks[index].replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init, few images: the examples' numbers only
        for index, block in enumerate(blocks):
            try:
                exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(
                    f"README Python block {index + 1} failed:\n{block}") from error
    result = namespace["result"]
    assert set(result.frame["layer"]) >= {"layer1", "layer2"}
    assert (tmp_path / "resnet18.parquet").is_file()
    assert (tmp_path / "report" / "index.html").is_file()
    store = namespace["store"]
    assert {"resnet18", "vit_tiny_patch16_224"} <= set(store.runs["model"])
