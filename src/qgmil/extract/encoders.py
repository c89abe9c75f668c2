"""Image encoders: tiles or cell crops -> feature vectors, built on timm.

Every encoder is a registry entry: an `EncoderInfo` (what it outputs and expects), a builder of the timm
architecture, the Hugging Face hub file holding its pretrained weights, a converter from checkpoint keys to the
backbone's keys, and a pooling from backbone output to one vector per image. Weights come from one of three places,
through one loading path (read -> unwrap -> convert -> strict load):

  "pretrained"  the hub file (gated models read HF_TOKEN); cached by huggingface_hub, works offline once cached
  "random"      seeded random initialisation, for offline trials and tests
  a local file  .safetensors, or .pth/.pt/.bin read with torch.load(weights_only=True) - never a full unpickle

`timm:<model>` gives any timm model (its pooled features, num_classes=0) without registering it.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in this order
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
CONTAINER_KEYS = ("state_dict", "model", "teacher")  # training checkpoints nest the weights under these
# Training wrappers prefix the keys: DataParallel/DDP "module.", SSL "backbone." beside their heads, Lightning "model.".
KEY_PREFIXES = ("module.", "teacher.backbone.", "backbone.", "model.")
PROBE_TIMEOUT_S = 3.0


class EncoderError(ValueError):
    """An encoder that cannot be built or loaded; the message names the encoder or file and the fix."""


@dataclass(frozen=True)
class EncoderInfo:
    name: str  # registry name, e.g. "resnet50_trunc"
    dim: int  # output feature dimension
    input_size: int | None  # square input side the weights expect (None: fully convolutional, any size)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where pretrained weights come from, e.g. "timm:resnet50.tv_in1k", "hf-hub:MahmoodLab/UNI"
    description: str  # one line for `qgmil extract encoders`
    gated: bool = False  # needs a Hugging Face token (HF_TOKEN) and an accepted licence


StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict, nn.Module], StateDict]
Pooler = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _call(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm model with num_classes=0: (B, 3, H, W) -> its pooled features (B, D)."""
    return backbone(x)


def _same_keys(state: StateDict, backbone: nn.Module) -> StateDict:
    return state


@dataclass(frozen=True)
class _Spec:
    info: EncoderInfo
    build: Callable[[], nn.Module]  # the architecture, randomly initialised
    hub_repo: str | None  # Hugging Face repo of the pretrained weights (None: none published there)
    hub_files: tuple[str, ...]  # candidate files in hub_repo, first present wins
    convert: Converter  # checkpoint keys -> backbone keys, for hub and local files alike
    pool: Pooler  # backbone, (B, 3, S, S) normalised images -> (B, dim)


_REGISTRY: dict[str, _Spec] = {}


def register_encoder(info: EncoderInfo, build: Callable[[], nn.Module], *, hub_repo: str | None,
                     hub_files: tuple[str, ...] = HUB_FILES, convert: Converter = _same_keys,
                     pool: Pooler = _call) -> None:
    """Add an encoder. `build()` returns the random-init backbone; `convert(state_dict, backbone)` maps a checkpoint
    (hub file or local file alike) onto the backbone's keys; `pool(backbone, images)` gives (B, info.dim)."""
    if info.name in _REGISTRY:
        raise EncoderError(f"encoder '{info.name}' is already registered")
    _REGISTRY[info.name] = _Spec(info, build, hub_repo, hub_files, convert, pool)


# --- registered encoders ---------------------------------------------------------------------------------------


def _timm(arch: str, *, swiglu: bool = False, **kwargs) -> Callable[[], nn.Module]:
    """Builder of timm `arch` with `kwargs`; swiglu: packed SwiGLU MLP with SiLU (imported only when built)."""

    def build() -> nn.Module:
        import timm

        extra = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU} if swiglu else {}
        return timm.create_model(arch, pretrained=False, **kwargs, **extra)

    return build


def _drop_classifier(state: StateDict, backbone: nn.Module) -> StateDict:
    """Drop classifier weights the headless (num_classes=0) backbone has no place for, as timm does."""
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    own = backbone.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.startswith(prefixes)}


def _convert_vit(state: StateDict, backbone: nn.Module) -> StateDict:
    """timm's ViT checkpoint filter: DINOv2 layout (mask_token, SwiGLU w12/w3) -> timm, pos_embed resampled to the
    backbone's grid (a 518 px DINOv2 checkpoint -> 224 / 14 = 16 x 16 patches). A no-op on timm-layout weights."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in state.items() if not k.startswith(("dino_head.", "ibot_head."))}  # SSL heads
    return _drop_classifier(checkpoint_filter_fn(state, backbone), backbone)


def _convert_resnet_trunc(state: StateDict, backbone: nn.Module) -> StateDict:
    """A full ResNet-50 checkpoint (timm or torchvision, same key names) -> its stem + layer1..3."""
    return {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}


def _pool_last_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """features_only backbone: last feature map (B, C, h, w) -> global average (B, C)."""
    return backbone(x)[-1].mean(dim=(2, 3))


def _pool_cls_and_patch_mean(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ViT tokens (B, prefix + N, D) -> [class token, mean of patch tokens] (B, 2D); register tokens left out."""
    tokens = backbone.forward_features(x)
    return torch.cat([tokens[:, 0], tokens[:, backbone.num_prefix_tokens:].mean(dim=1)], dim=-1)


def _register_builtin() -> None:
    register_encoder(
        EncoderInfo("resnet50_trunc", 1024, None, IMAGENET_MEAN, IMAGENET_STD, "timm:resnet50.tv_in1k",
                    "ImageNet ResNet-50 (torchvision weights) up to layer3, global average pooled; the CLAM default"),
        _timm("resnet50", features_only=True, out_indices=(3,)),
        hub_repo="timm/resnet50.tv_in1k", convert=_convert_resnet_trunc, pool=_pool_last_map,
    )
    # Pathology foundation models: timm kwargs and normalisation as on their model cards; class token unless noted.
    # (vit_giant_patch14_*dinov2 already use the packed SwiGLU MLP.)
    register_encoder(
        EncoderInfo("uni", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, "hf-hub:MahmoodLab/UNI",
                    "UNI (Mahmood Lab) ViT-L/16 pathology encoder, class token", gated=True),
        _timm("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
              dynamic_img_size=True),
        hub_repo="MahmoodLab/UNI", convert=_convert_vit,
    )
    register_encoder(
        EncoderInfo("uni2-h", 1536, 224, IMAGENET_MEAN, IMAGENET_STD, "hf-hub:MahmoodLab/UNI2-h",
                    "UNI2-h (Mahmood Lab) ViT-H/14, 8 registers, pathology encoder, class token", gated=True),
        _timm("vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
              embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, swiglu=True, reg_tokens=8,
              dynamic_img_size=True),
        hub_repo="MahmoodLab/UNI2-h", convert=_convert_vit,
    )
    register_encoder(
        EncoderInfo("gigapath", 1536, 224, IMAGENET_MEAN, IMAGENET_STD, "hf-hub:prov-gigapath/prov-gigapath",
                    "Prov-GigaPath tile encoder ViT-g/16 (Providence/Microsoft), class token", gated=True),
        _timm("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
              num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
        hub_repo="prov-gigapath/prov-gigapath", convert=_convert_vit,
    )
    register_encoder(
        EncoderInfo("h-optimus-0", 1536, 224, HOPTIMUS_MEAN, HOPTIMUS_STD, "hf-hub:bioptimus/H-optimus-0",
                    "H-optimus-0 (Bioptimus) ViT-g/14, 4 registers, own normalisation, class token", gated=True),
        _timm("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5, dynamic_img_size=False,
              num_classes=0, global_pool="token"),
        hub_repo="bioptimus/H-optimus-0", convert=_convert_vit,
    )
    register_encoder(
        EncoderInfo("virchow2", 2560, 224, IMAGENET_MEAN, IMAGENET_STD, "hf-hub:paige-ai/Virchow2",
                    "Virchow2 (Paige) ViT-H/14: class token + mean of patch tokens (registers excluded)",
                    gated=True),
        _timm("vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
              global_pool="", dynamic_img_size=True, swiglu=True),
        hub_repo="paige-ai/Virchow2", convert=_convert_vit, pool=_pool_cls_and_patch_mean,
    )
    # DinoBloom (Koch et al. 2024, github.com/marrlab/DinoBloom): DINOv2 ViT-S/B/L/G/14 fine-tuned on blood and
    # marrow cells at 224 px. Weights: hub MarrLab/DinoBloom pytorch_model_<s|b|l|g>.bin (plain DINOv2 keys, 257-token
    # pos_embed), also on Zenodo 10908163 as DinoBloom-<S|B|L|G>.pth ({"teacher": backbone.* + heads}). The authors
    # use the DINOv2 forward output: the final-norm class token.
    for size, arch, dim in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536)):
        register_encoder(
            EncoderInfo(f"dinobloom-{size}", dim, 224, IMAGENET_MEAN, IMAGENET_STD,
                        f"hf-hub:MarrLab/DinoBloom/pytorch_model_{size}.bin",
                        f"DinoBloom-{size.upper()} (Marr lab) DINOv2 ViT-{size.upper()}/14 hematology cell encoder, "
                        "class token"),
            _timm(f"vit_{arch}_patch14_dinov2", img_size=224, num_classes=0),
            hub_repo="MarrLab/DinoBloom", hub_files=(f"pytorch_model_{size}.bin",), convert=_convert_vit,
        )


_register_builtin()


# --- generic timm models -----------------------------------------------------------------------------------------


def _timm_filter(state: StateDict, backbone: nn.Module) -> StateDict:
    """The model family's own checkpoint filter (what timm applies to pretrained weights), then no classifier."""
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, backbone)
    return _drop_classifier(state, backbone)


@lru_cache(maxsize=None)
def _timm_spec(name: str) -> _Spec:
    """Spec of "timm:<model>": built once on the meta device to read its output size and data config."""
    import timm
    from timm.data import resolve_data_config

    model_name = name.removeprefix("timm:")
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        hint = f" Did you mean: {', '.join('timm:' + c for c in close)}?" if close else ""
        raise EncoderError(f"unknown timm model '{model_name}' in encoder '{name}'.{hint}")
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    config = resolve_data_config({}, model=model)
    pretrained = model.pretrained_cfg
    tag = f"{pretrained['architecture']}.{pretrained['tag']}" if pretrained.get("tag") else model_name
    hub_id = pretrained.get("hf_hub_id")
    info = EncoderInfo(
        name, int(getattr(model, "head_hidden_size", None) or model.num_features), int(config["input_size"][-1]),
        tuple(config["mean"]), tuple(config["std"]), f"timm:{tag}", f"timm model {tag}, pooled features",
    )
    hub_files = (pretrained["hf_hub_filename"],) if pretrained.get("hf_hub_filename") else HUB_FILES
    return _Spec(info, _timm(model_name, num_classes=0), hub_id, hub_files, _timm_filter, _call)


def _spec(name: str) -> _Spec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_spec(name)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise EncoderError(f"unknown encoder '{name}'.{hint} Available: {', '.join(list_encoders())}, "
                       "or timm:<model name> for any timm model.")


def list_encoders() -> list[str]:
    """Registered encoder names (any timm model also works as "timm:<name>")."""
    return sorted(_REGISTRY)


def encoder_info(name: str) -> EncoderInfo:
    """What `name` (registered, or "timm:<model>") outputs and expects, without building it."""
    return _spec(name).info


# --- weights -----------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    """True when the hub must not be asked: HF_HUB_OFFLINE set now, or its endpoint unreachable.

    huggingface_hub reads HF_HUB_OFFLINE only at import, and without a network retries each request for ~20 s;
    one short probe instead turns "no network" into a cache-only lookup that fails (or succeeds) at once.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE:
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)  # the hub's client: honours proxies
    except Exception:  # whatever the transport raises (DNS, refused, timeout, proxy): the hub is out of reach
        return True
    return False


def _download(spec: _Spec) -> Path:
    """The pretrained weights file of `spec` from the hub (or its cache) -> local path."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    info = spec.info
    if spec.hub_repo is None:
        raise EncoderError(f"encoder '{info.name}' ({info.source}) has no weights on the Hugging Face hub: pass "
                           "--weights PATH to a checkpoint, or --weights random for an offline trial run.")
    offline = _hub_offline()
    error: Exception | None = None
    for filename in spec.hub_files:
        try:
            return Path(hf_hub_download(spec.hub_repo, filename, local_files_only=offline))
        except EntryNotFoundError as err:  # not in this repo (or not cached): try the next candidate file
            error = err
        except (GatedRepoError, RepositoryNotFoundError, OSError, ValueError) as err:  # access / network / cache
            error = err
            break
    if offline:
        reason = "the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and the file is not in the local cache"
    elif isinstance(error, (GatedRepoError, RepositoryNotFoundError)):
        reason = "access was refused (gated or private repository)"
    else:
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    gated = (f" It is gated: accept its licence on https://huggingface.co/{spec.hub_repo} and set HF_TOKEN."
             if info.gated else "")
    raise EncoderError(
        f"encoder '{info.name}': cannot get pretrained weights {info.source} (Hugging Face hub {spec.hub_repo}: "
        f"{', '.join(spec.hub_files)}): {reason}.{gated} Or pass --weights PATH to a downloaded checkpoint, "
        "or --weights random for an offline trial run."
    ) from error


def _read_checkpoint(path: str | Path) -> StateDict:
    """A checkpoint file -> flat {key: tensor}, containers unwrapped and wrapper prefixes stripped.

    .safetensors via safetensors; .pth/.pt/.bin via torch.load(weights_only=True), which refuses arbitrary objects
    instead of running their pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"weights file not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise EncoderError(f"weights file {path}: unsupported type '{path.suffix}' "
                           f"(expected one of {', '.join(CHECKPOINT_SUFFIXES)})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load/safetensors raise many types on corrupt or unsafe files; all mean unreadable
        raise EncoderError(f"weights file {path} cannot be read as a tensor checkpoint: {err}") from err
    state = _unwrap(state)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise EncoderError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return _strip_prefixes(state)


def _unwrap(checkpoint: object) -> object:
    """{"state_dict": {...}}, {"model": {...}}, {"teacher": {...}} (nested too) -> the innermost dict."""
    while isinstance(checkpoint, dict):
        inner = next((checkpoint[k] for k in CONTAINER_KEYS if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            break
        checkpoint = inner
    return checkpoint


def _strip_prefixes(state: StateDict) -> StateDict:
    changed = True
    while changed:
        changed = False
        for prefix in KEY_PREFIXES:
            inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            # A prefix on every key is a wrapper; an SSL backbone keeps only its part (its heads are not ours).
            if inside and (len(inside) == len(state) or prefix.endswith("backbone.")):
                state, changed = inside, True
    return state


def _load(spec: _Spec, backbone: nn.Module, state: StateDict, origin: str) -> None:
    """Convert `state` (read from `origin`) onto `backbone` and load it strictly."""
    name = spec.info.name
    try:
        state = spec.convert(state, backbone)
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        raise EncoderError(f"{origin} cannot be converted for encoder '{name}': {err}") from err
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong)) if keys]
        raise EncoderError(f"{origin} does not fit encoder '{name}': {'; '.join(parts)}")
    backbone.load_state_dict(state, strict=True)


def _hub_revision(path: Path) -> str:
    """Commit of a file in the huggingface_hub cache (.../snapshots/<commit>/<file>), else ""."""
    return f"@{path.parent.name[:12]}" if path.parent.parent.name == "snapshots" else ""


# --- the encoder -------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Frozen image encoder: (B, H, W, 3) uint8 or (B, 3, H, W) float [0, 1] -> (B, dim) float32 features."""

    def __init__(self, spec: _Spec, backbone: nn.Module, weights: str, weights_detail: str):
        super().__init__()
        import timm

        self.info = spec.info
        self.name = spec.info.name
        self.dim = spec.info.dim
        self.weights = weights
        self.version = f"timm {timm.__version__}; {spec.info.source}; weights={weights_detail}"
        self.backbone = backbone
        self._pool = spec.pool
        # Non-persistent: preprocessing constants, not weights; they follow .to(device) with the backbone.
        self.register_buffer("mean", torch.tensor(spec.info.mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec.info.std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, H, W, 3) uint8 RGB (as read from slides) or (B, 3, H, W) float in [0, 1].

        Returns (B, dim) float32. Converts to float, scales to [0, 1], resizes to info.input_size when set and
        different (bilinear, antialias=True), normalises with mean/std, runs the backbone. All on the module's
        device, so uint8 can be sent to the GPU and normalised there.
        """
        if images.dim() != 4:
            raise EncoderError(f"encoder '{self.name}' expects a batch (B, H, W, 3) uint8 or (B, 3, H, W) float, "
                               f"got shape {tuple(images.shape)}")
        images = images.to(self.mean.device)
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise EncoderError(f"encoder '{self.name}': uint8 images must be (B, H, W, 3) RGB, "
                                   f"got shape {tuple(images.shape)}")
            x = images.permute(0, 3, 1, 2).float() / 255.0
        elif images.is_floating_point() and images.shape[1] == 3:
            x = images.float()
        else:
            raise EncoderError(f"encoder '{self.name}': expected (B, H, W, 3) uint8 or (B, 3, H, W) float images, "
                               f"got {images.dtype} of shape {tuple(images.shape)}")
        size = self.info.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return self._pool(self.backbone, x).float()


def create_encoder(name: str, weights: str = "pretrained", *, seed: int = 0,
                   device: torch.device | str | None = None) -> Encoder:
    """Build encoder `name` (see list_encoders(), or "timm:<model>") in eval mode with frozen parameters.

    weights: "pretrained" (Hugging Face hub download or cache; gated models read HF_TOKEN), "random" (seeded by
    `seed`, the global RNG left as it was), or a local .safetensors/.pth/.pt/.bin checkpoint. Raises EncoderError
    with the fix when the weights cannot be had. Build under `with torch.device("meta"):` with weights="random" to
    check shapes without allocating.
    """
    spec = _spec(name)
    state, origin = None, None
    if weights == "pretrained":
        path = _download(spec)  # before building: a missing download fails fast, not after a minute of init
        state, origin = _read_checkpoint(path), f"pretrained weights {spec.info.source} ({path})"
        label, detail = "pretrained", f"pretrained ({path.name}{_hub_revision(path)})"
    elif weights == "random":
        label = detail = f"random(seed={seed})"
    else:
        path = Path(weights).expanduser()
        state, origin = _read_checkpoint(path), f"weights file {path}"
        label = detail = str(path)
    # Seed the CPU generator only (torch.manual_seed would also reseed CUDA), and restore it afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        backbone = spec.build()
    if state is not None:
        _load(spec, backbone, state, origin)
    encoder = Encoder(spec, backbone, label, detail)
    encoder.eval().requires_grad_(False)
    return encoder if device is None else encoder.to(device)
