"""Encoder registry: shapes of every encoder (giant ViTs on the meta device), preprocessing, seeded random weights,
local checkpoints (safetensors, weights_only pickles, training wrappers, DINOv2 layout) and offline failures."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")
import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from qgmil.extract.encoders import (  # noqa: E402
    Encoder,
    EncoderError,
    EncoderInfo,
    _spec,
    create_encoder,
    encoder_info,
    list_encoders,
)

REGISTERED = ["resnet50_trunc", "uni", "uni2-h", "gigapath", "h-optimus-0", "virchow2",
              "dinobloom-s", "dinobloom-b", "dinobloom-l", "dinobloom-g"]
DIMS = {"resnet50_trunc": 1024, "uni": 1024, "uni2-h": 1536, "gigapath": 1536, "h-optimus-0": 1536,
        "virchow2": 2560, "dinobloom-s": 384, "dinobloom-b": 768, "dinobloom-l": 1024, "dinobloom-g": 1536}
GATED = {"uni", "uni2-h", "gigapath", "h-optimus-0", "virchow2"}


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """(n, side, side, 3) uint8 RGB, as read from slides."""
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No socket can connect, and the hub cache is an empty folder (nothing the developer downloaded leaks in)."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# --- registry ----------------------------------------------------------------------------------------------------


def test_registry_names_and_info():
    assert set(REGISTERED) <= set(list_encoders())
    for name in REGISTERED:
        info = encoder_info(name)
        assert isinstance(info, EncoderInfo) and info.name == name and info.dim == DIMS[name]
        assert len(info.mean) == len(info.std) == 3 and all(0 < s < 1 for s in info.std)
        assert info.source and info.description and info.gated == (name in GATED)
        assert info.input_size == (None if name == "resnet50_trunc" else 224)
    assert encoder_info("resnet50_trunc").source == "timm:resnet50.tv_in1k"
    assert encoder_info("uni").source == "hf-hub:MahmoodLab/UNI"
    assert encoder_info("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)


def test_timm_names():
    info = encoder_info("timm:resnet18")
    assert (info.dim, info.input_size, info.source) == (512, 224, "timm:resnet18.a1_in1k")
    assert encoder_info("timm:vit_small_patch16_224").dim == 384


@pytest.mark.parametrize("name, expected", [("uni2h", "uni2-h"), ("dinobloom_s", "dinobloom-s"),
                                            ("timm:resnet5O", "timm:resnet50")])
def test_unknown_names_suggest_close_ones(name, expected):
    with pytest.raises(EncoderError, match="Did you mean") as err:
        create_encoder(name, "random")
    assert expected in str(err.value) and name in str(err.value)
    with pytest.raises(EncoderError, match="Available: .*resnet50_trunc"):
        encoder_info("nonsense")


# --- shapes of every encoder -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REGISTERED)
def test_every_encoder_builds_with_its_dim(name):
    """Meta device: the full architecture (up to ViT-G, 1.1 B parameters) without allocating or initialising it."""
    with torch.device("meta"):
        encoder = create_encoder(name, "random")
        side = encoder.info.input_size or 64
        out = encoder(torch.empty(2, side, side, 3, dtype=torch.uint8))
    assert out.shape == (2, DIMS[name]) and encoder.dim == DIMS[name]
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert encoder.weights == "random(seed=0)" and f"timm {timm.__version__}" in encoder.version


@pytest.mark.parametrize("name, side", [("resnet50_trunc", 64), ("dinobloom-s", 224), ("timm:resnet18", 64)])
def test_real_forward(name, side):
    encoder = create_encoder(name, "random")
    out = encoder(_images(2, side))
    assert out.shape == (2, encoder.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_virchow2_pools_class_token_and_patch_mean_without_registers():
    with torch.device("meta"):
        encoder = create_encoder("virchow2", "random")
    assert encoder.backbone.num_prefix_tokens == 5  # class token + 4 registers, excluded from the patch mean
    tokens = torch.randn(2, 5 + 256, 1280)
    encoder.backbone.forward_features = lambda x: tokens
    pooled = encoder._pool(encoder.backbone, None)
    torch.testing.assert_close(pooled, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


# --- preprocessing -----------------------------------------------------------------------------------------------


def test_uint8_and_float_inputs_agree_and_resize_happens():
    # A CNN: a randomly initialised ViT (LayerScale 1e-5) barely depends on its input, which would hide mistakes.
    encoder = create_encoder("timm:resnet18", "random")
    images = _images(2, 100)  # 100 px into a 224 px encoder: resized
    as_float = images.permute(0, 3, 1, 2).float() / 255
    out = encoder(images)
    torch.testing.assert_close(encoder(as_float), out)
    resized = F.interpolate(as_float, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(encoder(resized), out)


def test_normalisation_uses_info_mean_std():
    encoder = create_encoder("resnet50_trunc", "random")
    x = torch.rand(1, 3, 64, 64)
    mean, std = torch.tensor(encoder.info.mean).view(1, 3, 1, 1), torch.tensor(encoder.info.std).view(1, 3, 1, 1)
    expected = encoder.backbone((x - mean) / std)[-1].mean(dim=(2, 3))
    torch.testing.assert_close(encoder(x), expected)


@pytest.mark.parametrize("shape, dtype", [((2, 64, 64), torch.uint8), ((2, 3, 64, 64), torch.uint8),
                                          ((2, 64, 64, 3), torch.float32)])
def test_bad_image_batches_are_refused(shape, dtype):
    encoder = create_encoder("resnet50_trunc", "random")
    with pytest.raises(EncoderError, match="resnet50_trunc"):
        encoder(torch.zeros(shape, dtype=dtype))


# --- random weights ----------------------------------------------------------------------------------------------


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a = create_encoder("dinobloom-s", "random", seed=1).backbone.state_dict()
    b = create_encoder("dinobloom-s", "random", seed=1).backbone.state_dict()
    c = create_encoder("dinobloom-s", "random", seed=2).backbone.state_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


# --- local checkpoints -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinobloom_s():
    encoder = create_encoder("dinobloom-s", "random", seed=7)
    images = _images(2, 224, seed=1)
    return encoder, images, encoder(images)


def _state(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in encoder.backbone.state_dict().items()}


@pytest.mark.parametrize("layout", ["safetensors", "pth", "state_dict+module", "zenodo_teacher", "dinov2_hub"])
def test_local_checkpoint_reloads_exactly(dinobloom_s, tmp_path, layout):
    encoder, images, expected = dinobloom_s
    state = _state(encoder)
    dinov2 = {**state, "mask_token": torch.zeros(1, 384)}  # DINOv2's own layout carries its mask token
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, path)
    else:
        path = tmp_path / "w.pth"
        payload = {
            "pth": state,
            "state_dict+module": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
            # DinoBloom-S.pth on Zenodo: the DINOv2 training checkpoint, backbone beside the projection heads.
            "zenodo_teacher": {"teacher": {**{f"backbone.{k}": v for k, v in dinov2.items()},
                                           "dino_head.mlp.0.weight": torch.zeros(8, 384),
                                           "ibot_head.mlp.0.weight": torch.zeros(8, 384)}},
            "dinov2_hub": dinov2,  # MarrLab/DinoBloom pytorch_model_s.bin
        }[layout]
        torch.save(payload, path)
    reloaded = create_encoder("dinobloom-s", str(path))
    assert reloaded.weights == str(path) and str(path) in reloaded.version
    assert all(torch.equal(v, state[k]) for k, v in reloaded.backbone.state_dict().items())
    torch.testing.assert_close(reloaded(images), expected, rtol=0, atol=0)


def test_dinov2_checkpoint_maps_onto_timm_giant():
    """DinoBloom-G is DINOv2 ViT-g/14: SwiGLU w12/w3 -> timm fc1/fc2, no mask token, 518 px pos_embed -> 16 x 16."""
    spec = _spec("dinobloom-g")
    with torch.device("meta"):
        backbone = spec.build()
        own = backbone.state_dict()
        dinov2 = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in own.items()}
        dinov2["mask_token"] = torch.empty(1, 1536)
    dinov2["pos_embed"] = torch.randn(1, 1 + 37 * 37, 1536)  # the original 518 px DINOv2 grid
    converted = spec.convert(dinov2, backbone)
    assert set(converted) == set(own)
    assert all(converted[k].shape == v.shape for k, v in own.items())
    assert converted["pos_embed"].shape == (1, 1 + 16 * 16, 1536)


def test_resnet50_trunc_is_stem_and_layer1_to_3_average_pooled(tmp_path):
    """A full ResNet-50 checkpoint (layer4 and fc included) loads, and the output is the CLAM truncation."""
    torch.manual_seed(0)
    full = timm.create_model("resnet50").eval()
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    encoder = create_encoder("resnet50_trunc", str(path))
    x = torch.rand(2, 3, 96, 96)
    mean, std = torch.tensor(encoder.info.mean).view(1, 3, 1, 1), torch.tensor(encoder.info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1((x - mean) / std))))
        expected = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))
    torch.testing.assert_close(encoder(x), expected)


def test_timm_checkpoint_with_classifier_loads_headless(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18").eval()  # with its 1000-class fc, which the encoder has no use for
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    encoder = create_encoder("timm:resnet18", str(path))
    x = torch.rand(2, 3, 224, 224)
    mean, std = torch.tensor(encoder.info.mean).view(1, 3, 1, 1), torch.tensor(encoder.info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = full.forward_head(full.forward_features((x - mean) / std), pre_logits=True)
    torch.testing.assert_close(encoder(x), expected)


def test_wrong_keys_name_the_file_and_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2), "blocks.0.norm1.weight": torch.zeros(3)}, path)
    with pytest.raises(EncoderError) as err:
        create_encoder("dinobloom-s", str(path))
    message = str(err.value)
    assert str(path) in message and "dinobloom-s" in message
    assert "missing keys" in message and "unexpected keys" in message and "encoder.weight" in message
    assert "shape mismatches" in message and "blocks.0.norm1.weight" in message


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(EncoderError, match="not found: .*absent.pth"):
        create_encoder("resnet50_trunc", str(tmp_path / "absent.pth"))
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(EncoderError, match="unsupported type '.npz'"):
        create_encoder("resnet50_trunc", str(other))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(EncoderError, match="corrupt.safetensors cannot be read"):
        create_encoder("resnet50_trunc", str(corrupt))


_EXECUTED: list[str] = []


def _side_effect() -> str:
    _EXECUTED.append("unpickled code ran")
    return "payload"


class _Malicious:
    def __reduce__(self):
        return _side_effect, ()


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"state_dict": _Malicious()}, path)
    with pytest.raises(EncoderError, match="pickle.pt cannot be read"):
        create_encoder("resnet50_trunc", str(path))
    assert _EXECUTED == []
    plain = tmp_path / "plain.pt"
    torch.save([1, 2, 3], plain)  # loads under weights_only, but is no state dict
    with pytest.raises(EncoderError, match="plain.pt does not hold a state dict"):
        create_encoder("resnet50_trunc", str(plain))


# --- pretrained weights, offline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, repo", [("uni", "MahmoodLab/UNI"), ("resnet50_trunc", "timm/resnet50.tv_in1k"),
                                        ("dinobloom-s", "MarrLab/DinoBloom")])
@pytest.mark.parametrize("offline_env", [True, False])
def test_pretrained_offline_fails_fast_and_says_what_to_do(no_network, monkeypatch, name, repo, offline_env):
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # no HF_HUB_OFFLINE: the unreachable hub must be noticed, not retried for ~20 s
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(EncoderError) as err:
        create_encoder(name, "pretrained")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"'{name}'" in message and repo in message and "unreachable" in message
    assert "--weights PATH" in message and "--weights random" in message
    assert ("HF_TOKEN" in message) == encoder_info(name).gated


def test_pretrained_comes_from_the_hub_cache_when_offline(no_network, monkeypatch):
    """The whole pretrained path (hub file -> read -> convert -> strict load) on a cached timm checkpoint."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = no_network / "models--timm--resnet50.tv_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(1)
    full = timm.create_model("resnet50").eval()
    save_file({k: v.contiguous() for k, v in full.state_dict().items()},
              repo / "snapshots" / commit / "model.safetensors")
    encoder = create_encoder("resnet50_trunc", "pretrained")
    assert encoder.weights == "pretrained" and "model.safetensors@0123456789ab" in encoder.version
    torch.testing.assert_close(encoder.backbone.state_dict()["layer3.5.conv3.weight"],
                               full.state_dict()["layer3.5.conv3.weight"])
