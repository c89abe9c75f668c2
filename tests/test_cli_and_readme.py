"""The README cannot drift from the code, and the CLI entry points work."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qgmil.bench import run_demo

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(README)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_data_commands_run(tmp_path):
    section = README.split("## Data", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.strip().splitlines()]
    assert any(c.startswith("qgmil data check") for c in commands)
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    assert (tmp_path / "data" / "digits" / "splits.json").is_file()


def test_readme_config_example_is_valid_and_shows_the_defaults(tmp_path):
    from qgmil.rundir.config import RunConfig, load_config

    section = README.split("## Training and cross-validation", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)[0]
    path = tmp_path / "readme-config.yaml"
    path.write_text(block)
    config = load_config(path)
    defaults = RunConfig(data={"table": config.data.table, "features": config.data.features})
    assert config.model_dump() == defaults.model_dump()  # the README lists the real defaults


def test_ci_runs_the_readme_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)[0].strip().splitlines()
    assert len(commands) == 2, "the quick start is two commands"
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["models", "qgmil_wo*"], ["--version"]])
def test_cli_entry_points(argv):
    for cmd in ([sys.executable, "-m", "qgmil"], ["qgmil"]):
        result = subprocess.run(cmd + argv, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    if argv == ["models"]:
        assert "qgmil_elementwise" in result.stdout and "qgmil_wo_swiglu" in result.stdout


def test_cli_unknown_model_pattern_fails_cleanly():
    result = subprocess.run([sys.executable, "-m", "qgmil", "models", "nothing*"], capture_output=True, text=True)
    assert result.returncode != 0 and "no model matches" in result.stderr


def test_demo_learns_digit_bags_and_finds_the_positive_instances(tmp_path):
    result = run_demo(tmp_path, datasets=["digit-bags"], models=["qgmil"], folds=2, epochs=12, progress=False)
    row = result["summary"].iloc[0]
    assert row["folds"] == 2 and row["macro_f1_mean"] > 0.8
    # a digit bag holds 8-24 digits of which 1-3 are nines: uniform attention would put ~1/8 on them
    assert row["attention_on_positives"] > 0.25
    assert "| digit-bags | qgmil | **" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs" / "digit-bags" / "qgmil" / "summary.json").is_file()


def test_cli_datasets_list_and_prepare_with_options(tmp_path):
    from click.testing import CliRunner

    from qgmil.cli import main
    from qgmil.data import MILDataset

    runner = CliRunner()
    listing = runner.invoke(main, ["datasets", "list"])
    assert listing.exit_code == 0 and "synthetic-wsi" in listing.output and "musk1" in listing.output
    pbc = next(line for line in listing.output.splitlines() if line.startswith("pbcseq "))
    assert pbc.endswith("[survival]")  # the task a built-in's targets are for
    out = tmp_path / "wsi"
    args = ["datasets", "prepare", "synthetic-wsi", str(out), "--bags", "3", "--min-instances", "50",
            "--max-instances", "80", "--dim", "8", "--dtype", "float16"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    data = MILDataset.from_table(out / "labels.csv", out / "features")
    assert len(data) == 3 and data.in_dim == 8 and all(50 <= n <= 80 for n in data.lengths)
    bad = runner.invoke(main, ["datasets", "prepare", "musk1", str(tmp_path / "m"), "--bags", "3"])
    assert bad.exit_code != 0 and "unknown option '--bags' for musk1 (options: standardize)" in bad.output
    changed = runner.invoke(main, args[:4] + ["--bags", "4"])
    assert changed.exit_code != 0 and "error:" in changed.output


def test_readme_tuning_example_is_valid_and_shows_the_defaults(tmp_path):
    from qgmil.rundir.config import TuneConfig, load_config

    section = README.split("## Nested tuning", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)[0]
    path = tmp_path / "tune.yaml"
    path.write_text("data: {builtin: musk1}\n" + block)
    tune = load_config(path).tune
    assert tune.model_dump(exclude={"space"}) == TuneConfig().model_dump(exclude={"space"})
    assert set(tune.space) == {"optim.lr", "model.overrides.depth", "model.overrides.dim", "optim.weight_decay"}
