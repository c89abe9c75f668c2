"""Every architecture learns: well above chance on the built-in digit-bags (one preset per architecture)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qgmil
from qgmil.data import digit_bags, pad_bags

# One preset per architecture; the QG-MIL ablation presets share qgmil's code.
LEARNERS = [m for m in qgmil.list_models() if not m.startswith("qgmil_")]


@pytest.fixture(scope="module")
def data():
    return digit_bags(n_bags=240, seed=3)


@pytest.mark.parametrize("name", LEARNERS)
def test_model_learns_digit_bags(name, data):
    torch.manual_seed(0)
    model = qgmil.create_model(name, in_dim=data.in_dim, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    train, test = np.arange(180), np.arange(180, 240)
    rng = np.random.default_rng(0)
    for _ in range(15):
        model.train()
        for batch in np.array_split(rng.permutation(train), 12):
            x, mask = pad_bags([data.bags[i] for i in batch])
            labels = torch.as_tensor(data.labels[batch])
            out = model(x, mask, labels=labels)
            loss = F.cross_entropy(out.logits, labels) + sum(out.aux_losses.values(), torch.zeros(()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        x, mask = pad_bags([data.bags[i] for i in test])
        accuracy = (model(x, mask).logits.argmax(1).numpy() == data.labels[test]).mean()
    assert accuracy > 0.75, f"{name}: test accuracy {accuracy:.2f} (chance 0.5)"
