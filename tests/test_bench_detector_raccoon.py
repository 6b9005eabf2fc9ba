"""bench.detector_raccoon: the ``--multi-test`` split holds out exactly the images with several boxes and draws
the development images from the others, deterministically per seed."""

from __future__ import annotations

import pandas as pd
import pytest

from bench import detector_raccoon


def _labels() -> pd.DataFrame:
    images = ["a", "b", "b", "c", "d", "d", "d", "e", "f"]
    return pd.DataFrame({"image": images, "xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1})


def test_multi_split_holds_out_the_images_with_several_boxes():
    dev, test = detector_raccoon.split_multi(_labels(), 3, seed=0)
    assert test == ["b", "d"]
    assert len(dev) == 3 and set(dev) < {"a", "c", "e", "f"} and dev == sorted(dev)
    assert detector_raccoon.split_multi(_labels(), 3, seed=0) == (dev, test)
    draws = {tuple(detector_raccoon.split_multi(_labels(), 3, seed=s)[0]) for s in range(10)}
    assert len(draws) > 1  # the seed draws the development images
    assert detector_raccoon.split_multi(_labels(), 4, seed=1)[0] == ["a", "c", "e", "f"]


def test_multi_split_refuses_what_it_cannot_draw():
    with pytest.raises(SystemExit, match="--n-dev 5"):
        detector_raccoon.split_multi(_labels(), 5, seed=0)
    single = _labels().drop_duplicates("image")
    with pytest.raises(SystemExit, match="0 images with 2\\+ boxes"):
        detector_raccoon.split_multi(single, 2, seed=0)
