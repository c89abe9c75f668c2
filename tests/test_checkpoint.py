import pytest
import torch
from safetensors.torch import save_file

import qgmil
from qgmil.checkpoint import CheckpointError, read_metadata


def test_metadata_is_plain_json_in_the_header(tmp_path):
    model = qgmil.create_model("qgmil_light", in_dim=8, num_classes=2, depth=2)
    path = qgmil.save_model(model, tmp_path / "sub" / "m.safetensors", extra={"classes": ["neg", "pos"]})
    meta = read_metadata(path)
    assert meta["arch"] == "qgmil" and meta["model_name"] == "qgmil_light"
    assert meta["config"]["depth"] == 2 and meta["extra"] == {"classes": ["neg", "pos"]}


def test_load_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        qgmil.load_model(tmp_path / "absent.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(CheckpointError, match="bare.safetensors.*without qgmil metadata"):
        qgmil.load_model(bare)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors.*not a readable"):
        qgmil.load_model(junk)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    qgmil.save_model(qgmil.create_model("qgmil", in_dim=8, num_classes=2), path)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qgmil.checkpoint.save_file", explode)
    with pytest.raises(OSError):
        qgmil.save_model(qgmil.create_model("qgmil", in_dim=8, num_classes=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
