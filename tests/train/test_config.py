"""Config: layering (defaults < file < flags), validation, strict config files."""

from __future__ import annotations

import json

import pytest

from train.config import Config, OptimConfig, build_parser, load_config_file, parse_args

BASE = ["--data", "/d", "--out", "/r"]


def test_defaults_and_flags():
    cfg = parse_args(
        BASE + ["--lr", "0.05", "--no-nesterov", "--model", "resnet18", "--batch-size", "512"]
    )
    assert cfg.data.data == "/d" and cfg.run.out == "/r"
    assert cfg.optim.lr == 0.05 and cfg.optim.nesterov is False
    assert cfg.model.model == "resnet18" and cfg.run.batch_size == 512
    assert cfg.optim.momentum == OptimConfig().momentum  # untouched default


def test_toml_preset_then_flags_win(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(
        '[optim]\nlr = 1\nschedule = "onecycle"\n[run]\nepochs = 7\nbatch_size = 64\n'
    )
    cfg = parse_args(BASE + ["--config", str(preset), "--epochs", "3"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for a float
    assert cfg.optim.schedule == "onecycle"
    assert cfg.run.epochs == 3  # the flag beats the file
    assert cfg.run.batch_size == 64


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[optim]\nlrr = 0.1\n", "unknown key optim.lrr"),
        ("[optimizer]\nlr = 0.1\n", r"unknown section \[optimizer\]"),
        ('[run]\nepochs = "ten"\n', "run.epochs must be a int"),
        ("[run]\nepochs = 1.5\n", "run.epochs must be a int"),
        ("[model]\ncompile = 1\n", "model.compile must be a bool"),
        ("lr = 0.1\n", r"unknown section \[lr\]"),
        ("[optim\n", "not valid TOML"),
    ],
)
def test_config_file_errors(tmp_path, text, match):
    preset = tmp_path / "bad.toml"
    preset.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_args(BASE + ["--config", str(preset)])


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read --config"):
        parse_args(BASE + ["--config", str(tmp_path / "none.toml")])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--out", "/r"], "--data is required"),
        (["--data", "/d"], "--out is required"),
        (BASE + ["--lr", "0"], "--lr must be > 0"),
        (BASE + ["--epochs", "0"], "--epochs must be >= 1"),
        (BASE + ["--label-smoothing", "1.5"], "--label-smoothing must be in"),
        (BASE + ["--ema-decay", "1"], "--ema-decay must be < 1"),
        (BASE + ["--momentum", "0"], "--nesterov needs --momentum > 0"),
        (["--backend", "synthetic", "--out", "/r"], "needs --num-classes"),
    ],
)
def test_validation(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--backend", "pil"], "invalid choice: 'pil'"),
        (["--epochs", "ten"], "invalid int value: 'ten'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flag_is_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        parse_args(BASE + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_unknown_model():
    with pytest.raises(ValueError, match="--model must be one of seed_cnn, cifar_fast"):
        parse_args(BASE + ["--model", "vgg"])


def test_per_rank_batch_checked():
    cfg = parse_args(BASE + ["--batch-size", "96", "--grad-accum", "2"])
    assert cfg.per_rank_batch(4) == 12
    assert cfg.per_rank_batch(1) == 48
    with pytest.raises(ValueError, match="not divisible by world_size 5"):
        cfg.per_rank_batch(5)


def test_resolved_config_json_round_trips(tmp_path):
    cfg = parse_args(BASE + ["--lr", "0.2", "--model", "cifar_fast", "--ema-decay", "0.99"])
    cfg.write_json(str(tmp_path / "config.json"))
    data = json.loads((tmp_path / "config.json").read_text())
    assert set(data) == {"data", "model", "optim", "run"}
    again = parse_args(["--config", str(tmp_path / "config.json")])
    assert again == cfg
    assert isinstance(again, Config)


def test_every_field_is_a_flag_with_help():
    from train.config import build_parser

    text = build_parser().format_help()
    for flag in (
        "--batch-size",
        "--resume",
        "--val-data",
        "--dist-backend",
        "--audit-keys",
        "--compile",
    ):
        assert flag in text
    assert "GLOBAL batch size" in text
    from train.models import MODELS

    assert all(name in text for name in MODELS)  # the --model help lists the registry


def test_load_config_file_types(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[data]\nhflip = 0\n")
    assert load_config_file(str(p)) == {"data": {"hflip": 0.0}}


def test_fault_injection_is_an_environment_variable_not_a_flag():
    from train.faults import KillAt

    assert KillAt.from_env({}) is None and KillAt.from_env({"SHARDFLOW_FAULT_KILL": ""}) is None
    assert KillAt.from_env({"SHARDFLOW_FAULT_KILL": "1:18"}) == KillAt(rank=1, step=18)
    for bad in ("18", "a:3", "1:0", "1:-2"):
        with pytest.raises(ValueError, match="RANK:STEP"):
            KillAt.from_env({"SHARDFLOW_FAULT_KILL": bad})
    help_text = build_parser().format_help()
    assert "--fault" not in help_text and "fault injection" not in help_text
