"""Our models reproduce the official QG-MIL code, loaded through the converter.

Fixtures (../shared/fixtures/qgmil_reference) hold, per official variant, the weights in two states
(fresh init and perturbed), fixed inputs and the official outputs; see their manifest.json.
"""

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qgmil
from qgmil.convert import ConversionError, convert_official, resolve_official_config

RTOL = 1e-5
FILES = [
    "qgmil", "qgmil_elementwise", "qgmil_no_gate", "qgmil_layernorm", "qgmil_no_qknorm",
    "qgmil_minimal", "qgmil_deep", "qgmil_light", "qgmil_nc1", "qgmil_consistent64",
]


def close(actual, expected):
    """Relative to the tensor's scale: the init-state logits are ~1e-4, so elementwise rtol alone is moot."""
    scale = expected.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=RTOL, atol=RTOL)


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "manifest.json").read_text())


def load_fixture(fixtures_dir, manifest, name):
    info = manifest["files"][f"{name}.safetensors"]
    tensors = load_file(str(fixtures_dir / f"{name}.safetensors"))
    return info, tensors


def state_of(tensors, state):
    prefix = f"{state}.state."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("state", ["init", "pert"])
@pytest.mark.parametrize("name", FILES)
def test_matches_official_outputs(fixtures_dir, manifest, name, state):
    info, t = load_fixture(fixtures_dir, manifest, name)
    model = convert_official(state_of(t, state), info["registry_key"], **info["constructor_kwargs"])
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]
    x, mask = t["x"], t["mask"].bool()
    with torch.no_grad():
        nomask = model(x, return_layer_attention=True)
        masked = model(x, mask, return_layer_attention=True)
        truncated = model(x[1:2, :25])
    out = f"{state}.out."
    close(nomask.logits, t[out + "logits_nomask"])
    close(masked.logits, t[out + "logits_mask"])
    close(nomask.attention, t[out + "pool_attention_nomask"])
    close(masked.attention, t[out + "pool_attention_mask"])
    close(truncated.logits, t[out + "logits_bag1_truncated"])
    close(nomask.embedding, t[f"{state}.act_nomask.pooled"])
    for i, ours in enumerate(nomask.layer_attention):
        close(ours, t[f"{out}layer_attentions_nomask.{i}"])
    for i, ours in enumerate(masked.layer_attention):
        official = t[f"{out}layer_attentions_mask.{i}"]
        # Padded query rows are garbage in both implementations; real rows must agree.
        close(ours[0], official[0])
        close(ours[1, :, :25], official[1, :, :25])


def test_resolved_config_reproduces_official_quirks(manifest):
    for info in manifest["files"].values():
        ours = resolve_official_config(info["registry_key"], **info["constructor_kwargs"])
        for key, value in info["resolved_config"].items():
            assert ours[key] == value, (info["registry_key"], key)
    for name, info in manifest["default_size_shapes"].items():
        c = resolve_official_config(name, in_dim=64, num_classes=3)
        assert c["head_dim"] == info["resolved"]["head_dim"] and c["intermediate_size"] == 2048


@pytest.mark.parametrize("name", ["qgmil", "qgmil_layernorm", "qgmil_light", "qgmil_deep"])
def test_official_presets_match_our_registry(manifest, name):
    """`create_model(preset)` at default size has exactly the official parameter count."""
    info = manifest["default_size_shapes"][name]
    model = qgmil.create_model(name, in_dim=64, num_classes=3)
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_converts_file_and_load_model_reproduces(fixtures_dir, manifest, tmp_path, suffix):
    info, t = load_fixture(fixtures_dir, manifest, "qgmil_light")
    src = tmp_path / f"official{suffix}"
    sd = state_of(t, "pert")
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, src)  # DDP-style wrapper
    else:
        save_file(sd, str(src))
    dst = tmp_path / "converted.safetensors"
    kw = info["constructor_kwargs"]
    result = subprocess.run(
        [sys.executable, "-m", "qgmil", "convert-official", str(src), str(dst), "--variant", "qgmil_light",
         "--in-dim", str(kw["in_dim"]), "--num-classes", str(kw["num_classes"]), "--embed-dim", str(kw["embed_dim"])],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    model = qgmil.load_model(dst)
    with torch.no_grad():
        close(model(t["x"], t["mask"].bool()).logits, t["pert.out.logits_mask"])


def test_shape_mismatch_names_the_key(fixtures_dir, manifest):
    info, t = load_fixture(fixtures_dir, manifest, "qgmil")
    kw = dict(info["constructor_kwargs"], embed_dim=32)
    with pytest.raises(ConversionError, match=r"input_proj\.0\.weight.*\(16, 64\).*\(32, 64\)"):
        convert_official(state_of(t, "init"), "qgmil", **kw)
    with pytest.raises(ConversionError, match="missing key"):
        convert_official(state_of(t, "init"), "qgmil_deep", **info["constructor_kwargs"])
    with pytest.raises(ConversionError, match="unknown official constructor argument"):
        convert_official(state_of(t, "init"), "qgmil", **info["constructor_kwargs"], n_layers=2)


def test_cli_reports_bad_files_without_traceback(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": torch.zeros(2), "obj": argparse.Namespace(payload=1)}, pickled)
    missing = tmp_path / "missing.pt"
    for src, message in [(pickled, "weights_only=True"), (missing, "no such file")]:
        r = subprocess.run(
            [sys.executable, "-m", "qgmil", "convert-official", str(src), str(tmp_path / "o.safetensors"),
             "--variant", "qgmil", "--in-dim", "64", "--num-classes", "3"],
            capture_output=True, text=True,
        )
        assert r.returncode == 2 and message in r.stderr and str(src) in r.stderr
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "o.safetensors").exists()
