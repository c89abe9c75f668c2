"""Hostile and broken configs and checkpoints (issue 15): each is refused with one error that names the file
or key, before anything is built or written. The memory bombs run under an address-space cap (capped.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from capped import run_capped
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qgmil
from qgmil.bench.spec import BenchmarkError, load_spec
from qgmil.checkpoint import CheckpointError, read_metadata
from qgmil.cli import main
from qgmil.rundir.config import ConfigError, dump_yaml, load_config, parse_set, parse_yaml

# the subprocesses import this checkout's qgmil, whatever is installed
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(qgmil.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def bomb_yaml(levels: int) -> str:
    """A "billion laughs" document: each level is a list of nine aliases of the one before."""
    lines = ["data:", "  builtin: musk1", "  builtin_options:", '    l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# --- 1. YAML aliases ---------------------------------------------------------------------------------

def test_billion_laughs_config_is_refused_fast_and_leaves_no_run(tmp_path):
    config, out = tmp_path / "bomb.yaml", tmp_path / "run"
    config.write_text(bomb_yaml(9))
    result = run_capped(["train", str(config), "--out", str(out)], env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"error: {config}: not valid YAML (YAML anchors and aliases" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_aliases_are_refused_in_benchmark_specs_and_set_values(tmp_path):
    spec = tmp_path / "bench.yaml"
    spec.write_text("datasets: [musk1]\nmodels: &m [abmil]\ntrain: {x: *m}\n")
    with pytest.raises(BenchmarkError, match=f"{spec}: not valid YAML .*anchors and aliases"):
        load_spec(spec)
    with pytest.raises(ConfigError, match=r"--set model.overrides.x: not valid YAML .*anchors and aliases"):
        parse_set(["model.overrides.x=[&a 1, *a]"])
    # what qgmil writes itself never holds anchors, even for repeated values, so it reads back
    seeds = [0, 1]
    assert parse_yaml(dump_yaml({"a": seeds, "b": seeds}), "x") == {"a": [0, 1], "b": [0, 1]}


def test_oversized_and_binary_config_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="big.yaml: config file of 2,097,152 bytes"):
        load_config(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="bin.yaml: config file is not UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)


# --- 2. tampered checkpoint metadata --------------------------------------------------------------------

def saved(tmp_path, name="abmil", **kw) -> Path:
    model = qgmil.create_model(name, in_dim=4, num_classes=2, **kw)
    return qgmil.save_model(model, tmp_path / "best.safetensors", extra={"classes": ["neg", "pos"]})


def tamper(path: Path, *, tensors=None, **fields) -> Path:
    """Rewrite the checkpoint's header fields (config/extra as JSON text, or dicts) and optionally tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), metadata=meta)
    return path


def bag_folder(tmp_path) -> Path:
    """One bag of 3 instances x 4 features, the dim of `saved`."""
    bags = tmp_path / "bags"
    bags.mkdir()
    np.save(bags / "b1.npy", np.ones((3, 4), np.float32))
    return bags


def config_of(path: Path) -> dict:
    return read_metadata(path)["config"]


@pytest.mark.parametrize("change, message", [
    ({"config": "5"}, "config is a int, not a JSON object"),
    ({"extra": "[1,2]"}, "extra is a list, not a JSON object"),
    ({"config": "{not json"}, "config is not valid JSON"),
    ({"config": "[" * 100_000 + "]" * 100_000}, "config nested 100000 deep"),
    ({"arch": "nonexistent"}, "unknown architecture 'nonexistent'"),
])
def test_corrupt_metadata_is_named(tmp_path, change, message):
    path = tamper(saved(tmp_path), **change)
    with pytest.raises(CheckpointError, match=f"{path}: corrupt qgmil metadata \\({message}"):
        qgmil.load_model(path)


def test_config_without_in_dim_or_with_wrong_shapes_is_refused(tmp_path):
    path = saved(tmp_path)
    config = config_of(path)
    tamper(path, config={k: v for k, v in config.items() if k != "in_dim"})
    with pytest.raises(CheckpointError, match=f"{path}: the stored abmil config does not validate \\(in_dim: Field required"):
        read_metadata(path)
    tamper(path, config={**config, "dim": config["dim"] + 1})
    with pytest.raises(CheckpointError, match=f"{path}: tensor '.*' has shape .* but the stored config makes"):
        qgmil.load_model(path)
    tamper(path, config=config, tensors={k: v[..., :1].contiguous() if v.ndim == 2 else v for k, v in load_file(str(path)).items()})
    with pytest.raises(CheckpointError, match=f"{path}: tensor .* has shape"):
        qgmil.load_model(path)


def test_tampered_classes_are_refused_before_predicting(tmp_path):
    path = tamper(saved(tmp_path), extra={"classes": ["a", "b", "c"]})
    with pytest.raises(CheckpointError, match="extra.classes must list the model's 2 class names"):
        read_metadata(path)
    result = invoke("predict", path, bag_folder(tmp_path), "--out", tmp_path / "preds")
    assert result.exit_code == 2 and f"error: {path}: extra.classes must list" in result.output
    assert not (tmp_path / "preds").exists()


def test_huge_configs_are_refused_under_a_memory_cap(tmp_path):
    """dim 5e6 would take 4.3 GB, num_classes 1e9 2 TB, depth 1e6 millions of modules (even on meta)."""
    path = saved(tmp_path, "qgmil_light")
    config = config_of(path)
    for i, change in enumerate([{"dim": 5e6}, {"num_classes": 1e9}, {"depth": 10**6}]):
        tamper(path, config={**config, **change}, extra={})
        (tmp_path / f"{i}.safetensors").write_bytes(path.read_bytes())
    code = ("import sys, qgmil\n"
            "for i in range(3):\n"
            "    try: qgmil.load_model(sys.argv[1] + f'/{i}.safetensors')\n"
            "    except ValueError as err: print(err)\n")
    result = run_capped(["-c", code, str(tmp_path)], env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{tmp_path}/{i}.safetensors: ") for i, line in enumerate(lines))
    assert "has shape" in lines[0] and "has shape" in lines[1]
    assert "more parameters than the file holds tensors" in lines[2]


# --- 3. NaN / Inf weights -----------------------------------------------------------------------------

def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path):
    path = saved(tmp_path)
    tensors = load_file(str(path))
    key = sorted(tensors)[1]
    tensors[key].view(-1)[0] = float("nan")
    tamper(path, tensors=tensors)
    with pytest.raises(CheckpointError, match=f"{path}: tensor '{key}' holds NaN or Inf"):
        qgmil.load_model(path)


def test_convert_official_refuses_nonfinite_weights(tmp_path):
    from qgmil.convert.official import official_shapes, resolve_official_config

    shapes = official_shapes(resolve_official_config("qgmil_light", in_dim=4, num_classes=2))
    state = {k: torch.zeros(shape) for k, shape in shapes.items()}
    state["classifier.3.weight"][0, 0] = float("inf")
    src = tmp_path / "official.safetensors"
    save_file(state, str(src))
    result = invoke("convert-official", src, tmp_path / "ours.safetensors", "--variant", "qgmil_light",
                    "--in-dim", 4, "--num-classes", 2)
    assert result.exit_code == 2
    assert f"error: {src}: tensor 'classifier.3.weight' holds NaN or Inf" in result.output
    assert not (tmp_path / "ours.safetensors").exists()


# --- 4. one-line errors instead of tracebacks -----------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--set", "optim.lr=[unclosed"], "--set optim.lr: not valid YAML (expected ',' or ']'"),
    (["--seeds", "a,b"], "--seeds 'a,b' (eval.seeds): expected comma-separated integers"),
    (["--device", "nonsense"], "runtime.device: 'nonsense' is not a device"),
    (["--lr", "inf"], "optim.lr: Input should be a finite number"),
    (["--set", "optim.warmup_epochs=.nan"], "optim.warmup_epochs: Input should be a finite number"),
])
def test_bad_training_flags_are_named_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "run"
    result = invoke("train", "--dataset", "musk1", *flags, "--out", out)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_garbage_run_json_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(None, [], {"data.builtin": "musk1"}).to_yaml())
    (run / "run.json").write_text("{garbage")
    result = invoke("evaluate", run)
    assert result.exit_code == 2 and f"error: {run / 'run.json'}: not valid JSON" in result.output
    (run / "run.json").write_text("[1, 2]")
    result = invoke("evaluate", run)
    assert result.exit_code == 2 and f"{run / 'run.json'}: not a run's facts" in result.output


def test_resume_of_a_directory_without_a_run_says_so(tmp_path):
    result = invoke("train", "--resume", "--epochs", 10, "--out", tmp_path)
    assert result.exit_code == 2
    assert f"error: {tmp_path}: holds no run to resume (no config.yaml)" in result.output


def test_predict_refuses_an_unknown_device(tmp_path):
    path = saved(tmp_path)
    result = invoke("predict", path, bag_folder(tmp_path), "--device", "nonsense", "--out", tmp_path / "p")
    assert result.exit_code == 2 and "device 'nonsense': not a device" in result.output, result.output
