"""The flag vocabulary: validation, the original's spellings, --resume."""
import json
from pathlib import Path

import pytest

from util import flags


def common_parser():
    parser = flags.parser(None)
    parser.add_argument("--flag", default="a")
    flags.add_data_args(parser, root="data", what="data")
    flags.add_method_args(parser, head_lr=None)
    flags.add_eval_args(parser, dense_after=79)
    flags.add_run_args(parser, epochs=5, batch_size=4, lr=0.1)
    return parser


@pytest.mark.parametrize("argv, flag", [
    (["--batch_size", "0"], "--batch_size"), (["--epochs", "-1"], "--epochs"), (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--temperature", "0"], "--temperature"), (["--data_ratio", "1.5"], "--data_ratio"),
    (["--data_ratio", "nan"], "--data_ratio"), (["--seed", str(2**32)], "--seed"), (["--eval_batch_size", "0"], "--eval_batch_size"),
    (["--sup_weight", "inf"], "--sup_weight"), (["--ce_weight", "-1"], "--ce_weight"), (["--head_lr", "x"], "--head_lr"),
])
def test_impossible_flag_values_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common_parser().parse_args(argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_original_spellings_are_aliases():
    args = common_parser().parse_args(["--sup_delta", "0.5", "--cross_delta", "2", "--classifier_lr", "3e-6", "--n_epochs", "7"])
    assert (args.sup_weight, args.ce_weight, args.head_lr, args.epochs) == (0.5, 2.0, 3e-6, 7)
    args = common_parser().parse_args(["--delta_sup", "0.25", "--delta_lin", "4"])
    assert (args.sup_weight, args.ce_weight) == (0.25, 4.0)


def test_resolve_args_resume_keeps_config_and_refuses_other_flags(tmp_path, capsys):
    parser = common_parser()
    (tmp_path / "config.json").write_text('{"flag": "saved", "epochs": 5, "batch_size": 8, "lr": 0.5, "device": "cuda:3"}')
    args = flags.resolve(parser, ["--resume", str(tmp_path), "--epochs", "7", "--workers", "0"])
    assert (args.flag, args.epochs, args.batch_size, args.lr, args.workers) == ("saved", 7, 8, 0.5, 0)
    assert args.device is None  # hardware is this machine's, not the saved run's
    assert args.save_path == tmp_path
    with pytest.raises(SystemExit):
        flags.resolve(parser, ["--resume", str(tmp_path), "--lr", "0.1", "--flag=b"])
    err = capsys.readouterr().err
    assert "cannot change: --flag, --lr" in err
    with pytest.raises(SystemExit):
        flags.resolve(parser, ["--resume", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        flags.resolve(parser, ["--resume", str(tmp_path), "--overwrite"])


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common_parser().parse_args(["--epoch", "2"])  # not --epochs
    assert exit_info.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err


def test_resume_accepts_flags_given_again_with_their_saved_values(tmp_path, capsys):
    parser = common_parser()
    saved = flags.as_json(parser.parse_args(["--lr", "0.5", "--save_path", str(tmp_path), "--data_root", "data"]))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    args = flags.resolve(parser, ["--lr", "0.5", "--save_path", str(tmp_path), "--data_root", str(Path("data").resolve()),
                                  "--resume", str(tmp_path)])
    assert args.lr == 0.5 and args.resume == tmp_path
    with pytest.raises(SystemExit):
        flags.resolve(parser, ["--lr", "0.25", "--resume", str(tmp_path)])
    assert "cannot change: --lr" in capsys.readouterr().err


def test_dfc_finetunes_warnings_come_from_its_one_check_before_any_data(caplog):
    """Every warning about the flags is given by check_args (no data read: the root does not exist); build_model
    warns only of what loading the weights did."""
    import dfc_finetune

    p = dfc_finetune.build_parser()
    args = p.parse_args(["--data_root", "/nonexistent", "--backbones", "ssl4eo-moco", "--fresh_first_conv",
                         "--use_sup_con"])
    with caplog.at_level("INFO"):
        dfc_finetune.check_args(p, args)
    for text in ("were trained on SSL4EO-S12 inputs", "projection heads start fresh", "SupCon trains no parameter"):
        assert text in caplog.text
    assert "first layer" not in caplog.text  # --fresh_first_conv resets a layer only where the bands differ
    with pytest.raises(SystemExit):
        dfc_finetune.check_args(p, p.parse_args(["--backbones", "ssl4eo-moco", "--arch", "resnet18"]))


def test_dfc_finetune_warns_of_a_frozen_fresh_first_layer_only_where_one_started_fresh(tmp_path, caplog):
    import torch

    import dfc_finetune
    from helpers import ssl4eo_file
    from util import process

    p, ctx = dfc_finetune.build_parser(), process.Context(torch.device("cpu"))
    for bands, warned in ((13, False), (12, True)):
        ssl4eo_file(tmp_path / f"s2_{bands}.pth", bands)
        args = p.parse_args(["--arch", "resnet18", "--s2_backbone", str(tmp_path / f"s2_{bands}.pth"),
                             "--fresh_first_conv"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="dfc_finetune"):
            dfc_finetune.build_model(args, ctx, 8, (2, 13))
        assert ("backbone2.conv1.weight started fresh and stay frozen" in caplog.text) is warned


def test_the_data_flags_default_normalize_refuse_s2_bands_off_a_manifest_and_warn_of_other_inputs(caplog, capsys):
    import dfc_finetune

    p = dfc_finetune.build_parser()
    for manifest, normalize in ((True, "stats"), (False, "seed")):
        args = p.parse_args(["--s2_bands", "B02,B03"] if manifest else [])
        flags.check_data_args(p, args, manifest, "DFC2020")
        assert args.normalize == normalize
    with pytest.raises(SystemExit):
        flags.check_data_args(p, p.parse_args(["--data_root", "d", "--s2_bands", "B02"]), False, "SEN12MS")
    assert "d is not a manifest (SEN12MS's S2 are the 13 L1C bands)" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        flags.check_data_args(p, p.parse_args(["--backbones", "ssl4eo-moco", "--normalize", "ssl4eo"]), False, "")
        assert not caplog.text
        flags.check_data_args(p, p.parse_args(["--backbones", "ssl4eo-moco"]), True, "")
    assert "this run feeds --normalize stats inputs" in caplog.text
