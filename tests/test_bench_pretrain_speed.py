"""bench.pretrain_speed: the rate read from a log, the hours and their wording, the cost table, and a tiny
end-to-end run on the CPU (a tiny ViT, one MAE epoch, no fine-tuning)."""

from __future__ import annotations

import pandas as pd
import pytest

from bench import pretrain_speed as ps


def test_steady_rate_sets_the_first_epoch_apart():
    log = pd.DataFrame({"images_per_s": [100.0, 300.0, 500.0, 400.0]})
    assert ps.steady_rate(log) == (100.0, 400.0)  # median of 300, 500, 400
    assert ps.steady_rate(log.iloc[:1]) == (100.0, 100.0)
    with pytest.raises(ValueError, match="no epochs"):
        ps.steady_rate(pd.DataFrame({"images_per_s": []}))


def test_hours_and_their_wording():
    assert ps.hours(3600, 10, 10.0) == pytest.approx(1.0)  # 36,000 images at 10/s
    with pytest.raises(ValueError, match="rate"):
        ps.hours(1, 1, 0.0)
    assert ps.fmt_hours(10 / 3600) == "10 s"
    assert ps.fmt_hours(0.5) == "30 min"
    assert ps.fmt_hours(3.44) == "3.4 h"
    assert ps.fmt_hours(60.0) == "2.5 days"


def test_cost_table_uses_the_files_epochs_and_folds():
    params = {"ssl_epochs": 400, "epochs": 30, "n_folds": 5, "folds": "all"}
    table = ps.cost_table(params, ssl_rate=1000.0, ft_rate=None).splitlines()
    assert table[0].startswith("| images | set | stage 00 (400 epochs) | stage 05 (5 fold(s) x 30 epochs) |")
    # 3,000 x 400 / 1,000 = 1,200 s = 20 min; fine-tuning not measured
    assert table[2] == "| 3,000 | Grocery-sized | 20 min | not measured |"
    one_fold = ps.cost_table({**params, "folds": "0"}, ssl_rate=1000.0, ft_rate=100.0).splitlines()
    # 3,000 x 4/5 x 30 / 100 = 720 s = 12 min
    assert one_fold[2] == "| 3,000 | Grocery-sized | 20 min | 12 min |"


@pytest.mark.usefixtures("isolated")
def test_tiny_end_to_end(tmp_path):
    res = ps.main(["--images", "40", "--epochs", "2", "--finetune-epochs", "0", "--demo-size", "64", "48",
                   "--root", str(tmp_path / "speed"), "--results", str(tmp_path / "r.md"), "--record",
                   "-p", "backbone=vit_tiny_patch16_224", "-p", "ssl_batch_size=8", "-p", "num_workers=0",
                   "-p", "ssl_decoder_dim=32", "-p", "ssl_decoder_depth=1", "-p", "ssl_epochs=400"])
    assert len(res["ssl_log"]) == 2 and res["ft_log"] is None  # --epochs wins over the file's ssl_epochs
    text = (tmp_path / "r.md").read_text()
    assert "| 00 mae pretraining |" in text and "stage 00 (400 epochs)" in text and "not measured" in text
