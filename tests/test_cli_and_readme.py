"""The README cannot drift from the code, and the CLI entry points work."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qgmil.demo import run_demo

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
    metrics = run_demo(epochs=6, out_dir=tmp_path, progress=False)
    assert metrics["macro_f1"] > 0.85
    assert metrics["attention_on_positive_instances"] > 2 * metrics["uniform_attention_on_positive_instances"]
    assert metrics["checkpoint_roundtrip_max_abs_diff"] == 0.0
