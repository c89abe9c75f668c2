"""Every registered model's outputs for a fixed seed and input, pinned before the layers were reorganised.

`tests/fixtures/pinned_models.safetensors` holds, per model, the logits, pooling attention and (for
multi-branch models) branch attention of a model built with `torch.manual_seed(0)` on fixed bags, plus
its state_dict layout (names and shapes, in creation order) in the header. A refactor of layers/ or
models/ must keep all of it: same parameter names (so existing checkpoints load), same creation order
(so seeded runs reproduce), same numbers.

Regenerate only for an intended change of a model: `python tests/test_models_pinned.py --write`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qgmil
from qgmil.data import pad_bags

PINNED = Path(__file__).parent / "fixtures" / "pinned_models.safetensors"
IN_DIM, NUM_CLASSES = 24, 3


def outputs(name: str) -> tuple[dict[str, torch.Tensor], list[list]]:
    torch.manual_seed(0)
    model = qgmil.create_model(name, in_dim=IN_DIM, num_classes=NUM_CLASSES).eval()
    g = torch.Generator().manual_seed(1)
    x, mask = pad_bags([torch.randn(n, IN_DIM, generator=g) for n in (11, 4, 7)])
    with torch.no_grad():
        out = model(x, mask)
    tensors = {f"{name}.logits": out.logits, f"{name}.attention": out.attention}
    if out.branch_attention is not None:
        tensors[f"{name}.branch_attention"] = out.branch_attention
    layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    return {k: v.contiguous() for k, v in tensors.items()}, layout


def _stored():
    with safe_open(str(PINNED), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["layouts"])


def test_every_registered_model_is_pinned():
    _, layouts = _stored()
    assert sorted(layouts) == qgmil.list_models()


@pytest.mark.parametrize("name", qgmil.list_models())
def test_outputs_and_parameter_layout_unchanged(name):
    tensors, layouts = _stored()
    now, layout = outputs(name)
    assert layout == layouts[name], "parameter names, shapes or creation order changed"
    assert sorted(now) == sorted(k for k in tensors if k.startswith(f"{name}."))
    for key, value in now.items():
        torch.testing.assert_close(value, tensors[key], rtol=1e-5, atol=1e-6, msg=key)


if __name__ == "__main__" and "--write" in sys.argv:
    torch.set_num_threads(2)
    everything, layouts = {}, {}
    for model_name in qgmil.list_models():
        tensors, layouts[model_name] = outputs(model_name)
        everything.update(tensors)
    PINNED.parent.mkdir(exist_ok=True)
    save_file(everything, str(PINNED), metadata={"layouts": json.dumps(layouts)})
    print(f"wrote {PINNED}: {len(layouts)} models")
