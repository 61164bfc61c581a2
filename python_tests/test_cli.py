"""The command line: ``xlt-fast train`` (fields, config file + overrides, errors, --resume) and
``xlt-fast reproduce`` (claims tables and where the plots are)."""
import json
import types

from xlt_fast import cli, experiments

TINY = ["--n_source", "160", "--n_target", "80", "--n_test", "32", "--n_dev", "32", "--n_source_eval", "32",
        "--batch_size", "16", "--zs_epochs", "1", "--epochs", "1", "--critic_hidden", "32", "--no_progress",
        "--no_plots"]


def test_train_help_lists_the_fields(capsys):
    assert cli.main(["train", "iwda", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lambda_da LAMBDA_DA" in out and "--target_priors" in out and "[paper] C.2" in out


def test_train_from_file_with_overrides_then_resume(tmp_path, capsys):
    config = tmp_path / "iwda.toml"
    config.write_text('variant = "unweighted"\nlambda_da = 0.5\ntarget_lang = "vi"\n')
    out_dir = str(tmp_path / "run")
    assert cli.main(["train", "iwda", "--config", str(config), *TINY, "--lambda_da", "0.05",
                     "--output_dir", out_dir]) == 0
    printed = capsys.readouterr().out
    assert "iwda unweighted: 20 steps" in printed and "target_test" in printed
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (saved["variant"], saved["lambda_da"], saved["target_lang"]) == ("unweighted", 0.05, "vi")
    assert cli.main(["train", "iwda", "--config", str(config), *TINY, "--lambda_da", "0.05", "--output_dir",
                     out_dir]) == 2  # exists: refuse to overwrite
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(["train", "iwda", "--config", str(config), *TINY, "--lambda_da", "0.05", "--output_dir",
                     out_dir, "--resume"]) == 0


def test_train_bad_fields_exit_2_with_every_problem(capsys):
    assert cli.main(["train", "iwda", "--lamda_da", "1", "--n_target", "-3", "--variant", "best"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lambda_da'" in err and "n_target (from the command line): must be >= 8" in err
    assert "variant (from the command line): expected one of" in err


def test_unknown_trainer_or_experiment(capsys):
    assert cli.main(["train", "nope"]) == 2
    assert "unknown trainer 'nope'; available: iwda" in capsys.readouterr().err
    assert cli.main(["reproduce", "nope", "--output_dir", "/nonexistent"]) == 2
    assert "unknown method(s) ['nope']; available: iwda, wordot, wca" in capsys.readouterr().err


def test_reproduce_prints_claims_and_plots(tmp_path, capsys, monkeypatch):
    def run(out_dir, quick, progress, workers):
        out_dir.mkdir(parents=True)
        (out_dir / "claims.md").write_text("| claim | paper | ours | verdict |\n| R1 | p | o | **consistent** |\n")
        (out_dir / "fig.png").write_bytes(b"png")
        assert quick and workers == 3

    monkeypatch.setattr(experiments, "get", lambda name: types.SimpleNamespace(run=run))
    assert cli.main(["reproduce", "iwda", "--quick", "--output_dir", str(tmp_path), "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "| R1 | p | o | **consistent** |" in out and str(tmp_path / "iwda" / "fig.png") in out
    assert "R1" in (tmp_path / "claims.md").read_text()
