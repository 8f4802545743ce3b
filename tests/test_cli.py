import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from aesr1 import cli, environment
from aesr1.cli import STAGES, main
from aesr1.tracking import pipeline_id, project_root


def test_every_dvc_stage_has_a_subcommand_with_help():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) <= set(STAGES)
    for name in STAGES:
        done = subprocess.run([Path(sys.executable).parent / "aesr1", name, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "--params" in done.stdout, name


def test_a_stage_is_found_from_its_name_and_reads_its_own_section():
    """Stage X is the function X in aesr1/<package>/X.py (filter's is filter_corpus, not the builtin's name),
    taking (cfg, recorder), and the table's config class is the one that reads params.yaml's section X."""
    import importlib
    import inspect

    from aesr1.config import load_section

    for name, (module, config_class, function, _) in STAGES.items():
        assert module.startswith("aesr1.") and module.rsplit(".", 1)[1] == name, module
        assert function == ("filter_corpus" if name == "filter" else name)
        stage = importlib.import_module(module)
        assert list(inspect.signature(getattr(stage, function)).parameters) == ["cfg", "recorder"], name
        cfg = load_section(REPO / "params.yaml", name, getattr(stage, config_class))
        section = yaml.safe_load((REPO / "params.yaml").read_text())[name]
        for key, value in section.items():  # every value of the section reaches the stage's config
            if not isinstance(value, dict):
                assert getattr(cfg, key) == value, (name, key)


def test_bad_params_give_a_clear_error(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("ingest:\n  train_sise: 10\n")
    assert main(["ingest", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'params.yaml'}: ingest.train_sise is not a setting; did you mean train_size?" in err
    assert "pydantic" not in err
    assert main(["ingest", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    done = subprocess.run([Path(sys.executable).parent / "aesr1", "score", str(tmp_path / "nowhere.jpg"),
                           "--model", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"aesr1 score: error: no such image or folder: {tmp_path / 'nowhere.jpg'}\n"


def test_a_missing_review_file_is_a_user_error(tmp_path, capsys):
    assert main(["review", "apply", str(tmp_path / "missing.csv"), "--params", str(REPO / "params.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"aesr1 review: error: review file not found: {tmp_path}")


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    """A bug is not a user error, even a ValueError: it propagates, and Python prints its traceback."""
    def bug(args):
        raise ValueError("a bug deep in a stage")

    monkeypatch.setattr(cli, "_run_stage", bug)
    with pytest.raises(ValueError, match="a bug deep in a stage"):
        main(["ingest"])


def test_queued_experiments_track_into_the_real_repository(tmp_path):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    (copy / "params.yaml").write_text("")
    assert project_root(copy) == tmp_path / "repo"


def test_pipeline_id_prefers_the_environment(monkeypatch):
    monkeypatch.setenv(environment.PIPELINE_ID, "flow-run-1")
    assert pipeline_id() == "flow-run-1"
    monkeypatch.delenv(environment.PIPELINE_ID)
    assert pipeline_id() != pipeline_id()  # a stage run by hand is its own pipeline


def test_a_config_error_names_its_file_key_and_the_nearest_settings(tmp_path, capsys):
    """params.yaml, a recipe or a --params file: where the bad value is, and what it could have meant."""
    (tmp_path / "configs" / "recipes").mkdir(parents=True)
    (tmp_path / "configs" / "recipes" / "mine.yaml").write_text("rl:\n  grpo: {learning_rat: 1.0e-6}\n")
    (tmp_path / "params.yaml").write_text("recipe: mine\nrl:\n  heldout: {samples: many}\n  rewardz: {}\n")
    assert main(["rl", "--params", str(tmp_path / "params.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "aesr1 rl: error: " + lines[0].split("error: ", 1)[1]  # one error per line, no dump
    text = "\n".join(lines)
    assert f"{tmp_path / 'configs/recipes/mine.yaml'}: rl.grpo.learning_rat is not a setting; did you mean " \
           "learning_rate?" in text
    assert f"{tmp_path / 'params.yaml'}: rl.rewardz is not a setting; did you mean rewards?" in text
    assert f"{tmp_path / 'params.yaml'}: rl.heldout.samples: Input should be a valid integer" in text
    assert "'many'" in text
