"""Load checkpoints trained with the official QG-MIL code (MIT, model definitions only).

The official models are built as `QGMIL_MODELS[variant](in_dim, embed_dim, dropout, num_classes, **kwargs)`
from a `Qwen3MILConfig` dataclass. `resolve_official_config` replays that construction (including its
quirks), `official_shapes` lists the state_dict it produces, and `convert_official_state_dict` renames
the tensors to our layout. The only non-trivial step: the official q_proj fuses the queries and the gate
logits, interleaved per key/value head; we keep the gate in its own `gate_proj`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import first_nonfinite
from ..models.qgmil import QGMIL, QGMILConfig

# Defaults of the official Qwen3MILConfig dataclass.
OFFICIAL_DEFAULTS: dict = dict(
    in_dim=1024,
    embed_dim=512,
    num_classes=1,
    hidden_size=512,
    intermediate_size=2048,
    num_attention_heads=8,
    num_key_value_heads=None,
    head_dim=None,
    attention_dropout=0.0,
    headwise_attn_output_gate=False,
    elementwise_attn_output_gate=False,
    use_qk_norm=True,
    qkv_bias=False,
    use_rms_norm=True,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    mlp_ratio=4.0,
    dropout=0.25,
    num_layers=1,
    pooling="attention",
    use_cls_token=False,
    # Accepted but without effect in the official forward pass:
    use_positional_encoding=False,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    use_sliding_window=False,
    sliding_window=None,
    max_window_layers=0,
    _attn_implementation="sdpa",
    rope_scaling=None,
)

_GATES = {"headwise": (True, False), "elementwise": (False, True), "none": (False, False)}


def _preset(gate="headwise", rms=True, qk=True, layers=1, embed_dim=512, heads=8) -> dict:
    head, elem = _GATES[gate]
    return dict(
        embed_dim=embed_dim,
        num_attention_heads=heads,
        num_layers=layers,
        use_rms_norm=rms,
        use_qk_norm=qk,
        headwise_attn_output_gate=head,
        elementwise_attn_output_gate=elem,
        dropout=0.25,
        pooling="attention",
    )


# Official presets (configuration_qwen3.py) under the official registry keys.
OFFICIAL_VARIANTS: dict[str, dict] = {
    "qgmil": _preset(),
    "qgmil_elementwise": _preset(gate="elementwise"),
    "qgmil_no_gate": _preset(gate="none"),
    "qgmil_layernorm": _preset(rms=False, qk=False),
    "qgmil_no_qknorm": _preset(qk=False),
    "qgmil_minimal": _preset(gate="none", rms=False, qk=False),
    "qgmil_deep": _preset(layers=4),
    "qgmil_light": _preset(embed_dim=256, heads=4),
}
# The official model classes default embed_dim to 512, except the light one.
_CLASS_EMBED_DIM = {name: 256 if name == "qgmil_light" else 512 for name in OFFICIAL_VARIANTS}


class ConversionError(ValueError):
    """An official checkpoint that does not fit the given constructor arguments."""


def official_variant(name: str) -> str:
    """Accept "qgmil_deep", "deep", "base", "qgmil_base"; return the registry key."""
    key = {"base": "qgmil", "qgmil_base": "qgmil"}.get(name, name)
    if key not in OFFICIAL_VARIANTS and f"qgmil_{key}" in OFFICIAL_VARIANTS:
        key = f"qgmil_{key}"
    if key not in OFFICIAL_VARIANTS:
        raise ConversionError(f"unknown official variant {name!r}; expected one of {', '.join(OFFICIAL_VARIANTS)}")
    return key


def resolve_official_config(variant: str, in_dim: int, num_classes: int = 1, **kwargs) -> dict:
    """The official config after `__post_init__`, exactly as the official constructor would build it."""
    variant = official_variant(variant)
    unknown = sorted(set(kwargs) - set(OFFICIAL_DEFAULTS))
    if unknown:
        raise ConversionError(f"unknown official constructor argument(s): {', '.join(unknown)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("head_dim", "num_key_value_heads")}
    cfg = dict(OFFICIAL_DEFAULTS)
    cfg.update(OFFICIAL_VARIANTS[variant])
    cfg.update(embed_dim=_CLASS_EMBED_DIM[variant], in_dim=in_dim, num_classes=num_classes)
    cfg.update(kwargs)
    # __post_init__: derived sizes come from hidden_size *before* it is overwritten by embed_dim.
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg["head_dim"] is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if not cfg["intermediate_size"]:
        cfg["intermediate_size"] = int(cfg["hidden_size"] * cfg["mlp_ratio"])
    cfg["hidden_size"] = cfg["embed_dim"]
    if cfg["headwise_attn_output_gate"] and cfg["elementwise_attn_output_gate"]:
        raise ConversionError("official config sets both headwise and elementwise gates")
    return cfg


def to_qgmil_config(c: dict) -> QGMILConfig:
    """Our config for the same network."""
    if c["use_cls_token"]:
        pooling = "cls"
    else:
        # The official forward falls back to mean pooling for any other name (including "cls").
        pooling = {"attention": "gated_attention", "max": "max"}.get(c["pooling"], "mean")
    gate = "headwise" if c["headwise_attn_output_gate"] else "elementwise" if c["elementwise_attn_output_gate"] else "none"
    return QGMILConfig(
        in_dim=c["in_dim"],
        num_classes=c["num_classes"],
        dim=c["hidden_size"],
        depth=c["num_layers"],
        heads=c["num_attention_heads"],
        kv_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        ffn_dim=c["intermediate_size"],
        norm="rms" if c["use_rms_norm"] else "layer",
        qk_norm=c["use_qk_norm"],
        gate=gate,
        ffn="swiglu",
        act=c["hidden_act"] if c["hidden_act"] in ("silu", "gelu", "relu") else "silu",
        pooling=pooling,
        dropout=c["dropout"],
        attn_dropout=c["attention_dropout"],
        qkv_bias=c["qkv_bias"],
        norm_eps=c["rms_norm_eps"],
    )


def official_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes that the official code creates for config `c`."""
    hid, heads, hd, kv = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["num_key_value_heads"]
    ln = not c["use_rms_norm"]  # LayerNorms carry a bias

    def norm(prefix, width):
        return {f"{prefix}.weight": (width,), **({f"{prefix}.bias": (width,)} if ln else {})}

    def linear(prefix, n_out, n_in, bias=True):
        return {f"{prefix}.weight": (n_out, n_in), **({f"{prefix}.bias": (n_out,)} if bias else {})}

    q_out = heads * hd + (heads if c["headwise_attn_output_gate"] else 0)
    q_out += heads * hd if c["elementwise_attn_output_gate"] else 0
    qkv_bias = c["qkv_bias"]
    shapes = {**linear("input_proj.0", hid, c["in_dim"]), **norm("input_proj.1", hid)}
    if c["use_cls_token"]:
        shapes["cls_token"] = (1, 1, hid)
    for i in range(c["num_layers"]):
        p = f"layers.{i}"
        shapes.update(norm(f"{p}.input_layernorm", hid))
        shapes.update(norm(f"{p}.post_attention_layernorm", hid))
        shapes.update(linear(f"{p}.self_attn.q_proj", q_out, hid, qkv_bias))
        shapes.update(linear(f"{p}.self_attn.k_proj", kv * hd, hid, qkv_bias))
        shapes.update(linear(f"{p}.self_attn.v_proj", kv * hd, hid, qkv_bias))
        shapes.update(linear(f"{p}.self_attn.o_proj", hid, heads * hd, qkv_bias))
        if c["use_qk_norm"]:
            shapes.update(norm(f"{p}.self_attn.q_norm", hd))
            shapes.update(norm(f"{p}.self_attn.k_norm", hd))
        shapes.update(linear(f"{p}.mlp.gate_proj", c["intermediate_size"], hid, bias=False))
        shapes.update(linear(f"{p}.mlp.up_proj", c["intermediate_size"], hid, bias=False))
        shapes.update(linear(f"{p}.mlp.down_proj", hid, c["intermediate_size"], bias=False))
    shapes.update(norm("final_norm", hid))
    if c["pooling"] == "attention":  # created even when a CLS token makes it unused
        shapes.update(linear("pooling.attention_V.0", hid // 2, hid))
        shapes.update(linear("pooling.attention_U.0", hid // 2, hid))
        shapes.update(linear("pooling.attention_weights", 1, hid // 2))
        shapes.update(norm("pooling.norm", hid))
    shapes.update(linear("classifier.0", hid // 2, hid))
    shapes.update(linear("classifier.3", c["num_classes"], hid // 2))
    return shapes


# Official name -> our name, for every tensor except the fused q_proj.
_RENAMES = [
    (r"^input_proj\.0\.", "embed.proj."),
    (r"^input_proj\.1\.", "embed.norm."),
    (r"^layers\.(\d+)\.input_layernorm\.", r"blocks.\1.attn_norm."),
    (r"^layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ffn_norm."),
    (r"^layers\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^layers\.(\d+)\.mlp\.", r"blocks.\1.ffn."),
    (r"^pooling\.attention_V\.0\.", "pool.attn_v."),
    (r"^pooling\.attention_U\.0\.", "pool.attn_u."),
    (r"^pooling\.attention_weights\.", "pool.attn_w."),
    (r"^pooling\.norm\.", "pool.norm."),
    (r"^classifier\.0\.", "head.fc1."),
    (r"^classifier\.3\.", "head.fc2."),
]


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _split_query_gate(t: torch.Tensor, c: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Official fused q_proj rows, per kv head [queries of its heads | gates of its heads] -> (q, gate)."""
    heads, hd, kv = c["num_attention_heads"], c["head_dim"], c["num_key_value_heads"]
    groups = heads // kv
    if c["headwise_attn_output_gate"]:
        gate_rows = groups
    elif c["elementwise_attn_output_gate"]:
        gate_rows = groups * hd
    else:
        return t, None
    per_kv = t.reshape(kv, groups * hd + gate_rows, *t.shape[1:])
    q, gate = per_kv.split([groups * hd, gate_rows], dim=1)
    return q.reshape(heads * hd, *t.shape[1:]), gate.reshape(kv * gate_rows, *t.shape[1:])


def convert_official_state_dict(state: dict[str, torch.Tensor], c: dict, source: str = "state_dict") -> dict:
    """Check `state` against the official shapes for config `c` and rename it to our layout."""
    expected = official_shapes(c)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:4]}")
        raise ConversionError(
            f"{source}: does not match official variant config ({'; '.join(parts)}). "
            "Check --variant and the constructor arguments (e.g. --num-layers, --use-cls-token)."
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} but the given official "
                f"arguments need {shape}. Check --in-dim, --num-classes, --embed-dim and the head/width arguments."
            )
    if (bad := first_nonfinite(state)) is not None:
        raise ConversionError(f"{source}: tensor {bad!r} holds NaN or Inf values")
    ours = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to(torch.float32)
        if c["use_cls_token"] and key.startswith("pooling."):
            continue  # unused by the official forward when a CLS token is pooled
        if re.match(r"^layers\.\d+\.self_attn\.q_proj\.", key):
            q, gate = _split_query_gate(tensor, c)
            ours[_rename(key)] = q
            if gate is not None:
                ours[_rename(key).replace(".q_proj.", ".gate_proj.")] = gate
        else:
            ours[_rename(key)] = tensor
    return ours


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors, or from .pt/.pth/.bin/.ckpt loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure gets the same explanation
        raise ConversionError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(err).__name__}: {err}). "
            "Only plain tensor state_dicts are accepted; arbitrary pickles are never loaded."
        ) from err
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConversionError(f"{path}: does not hold a state_dict (a mapping of names to tensors)")
    # Prefixes added by DistributedDataParallel and torch.compile.
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}


def convert_official(
    state: dict[str, torch.Tensor] | str | Path,
    variant: str,
    in_dim: int,
    num_classes: int = 1,
    **official_kwargs,
) -> QGMIL:
    """Build our model holding the weights of an official checkpoint (a state_dict or a file path).

    `official_kwargs` are the official constructor arguments (embed_dim, dropout, hidden_size,
    intermediate_size, num_attention_heads, num_layers, use_cls_token, ...).
    """
    c = resolve_official_config(variant, in_dim=in_dim, num_classes=num_classes, **official_kwargs)
    source = str(state) if isinstance(state, (str, Path)) else "state_dict"
    if isinstance(state, (str, Path)):
        state = read_state_dict(state)
    ours = convert_official_state_dict(state, c, source)  # shapes checked before the model is built
    model = QGMIL(to_qgmil_config(c))
    model.name = official_variant(variant)
    model.load_state_dict(ours, strict=True)
    return model.eval()
