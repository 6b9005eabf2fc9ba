"""bench.common_args: the options and recorded command every benchmark shares."""

from __future__ import annotations

import argparse
import os

import pytest

from bench import common_args


def test_parse_seeds_known_answers():
    assert common_args.parse_seeds("42,1, 2") == [42, 1, 2]
    assert common_args.parse_seeds("") == [] and common_args.parse_seeds(None) == []
    assert common_args.parse_seeds("3,") == [3]  # a trailing comma is harmless
    with pytest.raises(SystemExit, match="'x' is not an integer"):
        common_args.parse_seeds("1,x")


def test_parse_overrides_reads_yaml_scalars_and_names_bad_items():
    out = common_args.parse_overrides(["epochs=3", "lr=0.001", "norm_eval=true", "backbone=resnet18"],
                                      {"epochs", "lr", "norm_eval", "backbone"}, "a field")
    assert out == {"epochs": 3, "lr": 0.001, "norm_eval": True, "backbone": "resnet18"}
    with pytest.raises(SystemExit, match="-p 'nope=1': expected key=value with key a field"):
        common_args.parse_overrides(["nope=1"], {"epochs"}, "a field")
    with pytest.raises(SystemExit, match="-p 'epochs'"):
        common_args.parse_overrides(["epochs"], {"epochs"}, "a field")


def test_command_line_is_a_module_run(monkeypatch):
    assert (common_args.command_line("embedder_reid", ["--dataset", "lion", "-p", "a=b c"])
            == "HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.embedder_reid --dataset lion -p 'a=b c'")
    assert common_args.command_line("ann_speed", [], env="") == "nice -n 10 .venv/bin/python -m bench.ann_speed"
    monkeypatch.setattr("sys.argv", ["/abs/bench/ann_speed.py", "--k", "5"])
    assert common_args.command_line("ann_speed", env="").endswith("-m bench.ann_speed --k 5")


def test_record_args_and_finish_append_only_when_asked(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    common_args.add_record_args(ap)
    common_args.add_param_arg(ap, "help")
    args = ap.parse_args(["-p", "a=1", "-p", "b=2"])
    assert args.param == ["a=1", "b=2"] and not args.record and args.results == common_args.RESULTS
    results = tmp_path / "R.md"
    common_args.finish(ap.parse_args(["--results", str(results)]), "\n## one\n")
    assert not results.exists() and "## one" in capsys.readouterr().out
    results.write_text("# old\n")
    common_args.finish(ap.parse_args(["--record", "--results", str(results)]), "\n## two\n")
    assert results.read_text() == "# old\n\n## two\n"  # appended, never rewritten


def test_env_set_restores_or_removes_the_variable(monkeypatch):
    from bench.common_args import env_set

    monkeypatch.setenv("REID_T_SET", "old")
    monkeypatch.delenv("REID_T_UNSET", raising=False)
    with env_set("REID_T_SET", "new"), env_set("REID_T_UNSET", "x"):
        assert os.environ["REID_T_SET"] == "new" and os.environ["REID_T_UNSET"] == "x"
    assert os.environ["REID_T_SET"] == "old" and "REID_T_UNSET" not in os.environ
    with pytest.raises(RuntimeError), env_set("REID_T_SET", "during"):
        raise RuntimeError("a failed run restores it too")
    assert os.environ["REID_T_SET"] == "old"
