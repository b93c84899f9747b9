"""Model registry: the seed network's exact shape, every model's forward, head replacement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train.models import (
    MODELS,
    build_model,
    classifier_parameters,
    resolve_image_size,
)


def test_seed_cnn_is_the_article_network():
    m = build_model("seed_cnn", 10)
    layers = [(n, type(x).__name__) for n, x in m.named_children()]
    assert layers == [
        ("conv1", "Conv2d"), ("pool", "MaxPool2d"), ("conv2", "Conv2d"),
        ("fc1", "Linear"), ("fc2", "Linear"), ("fc3", "Linear"),
    ]  # fmt: skip
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (3, 6, (5, 5))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.kernel_size) == (6, 16, (5, 5))
    assert [(f.in_features, f.out_features) for f in (m.fc1, m.fc2, m.fc3)] == [
        (400, 120),
        (120, 84),
        (84, 10),
    ]
    assert m.pool.kernel_size == 2 and m.pool.stride == 2
    # The article's parameter count.
    assert sum(p.numel() for p in m.parameters()) == 62006


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_shapes_at_32px(name):
    m = build_model(name, 7, cifar_stem=True).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert m(x).shape == (2, 7)


def test_resnet_stems():
    plain = build_model("resnet18", 10)
    small = build_model("resnet18", 10, cifar_stem=True)
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert resolve_image_size("resnet50", 0, False) == 224
    assert resolve_image_size("resnet50", 0, True) == 32


def test_seed_cnn_size_is_fixed():
    assert resolve_image_size("seed_cnn", 0, False) == 32
    with pytest.raises(ValueError, match="32 px inputs only"):
        resolve_image_size("seed_cnn", 64, False)


@pytest.mark.parametrize("name", ["seed_cnn", "cifar_fast", "resnet18"])
def test_the_head_belongs_to_the_classifier(name):
    m = build_model(name, 3, cifar_stem=True)
    head = MODELS[name].head
    # The head is what transfer trains (frozen backbone) and gives its own lr.
    assert {id(p) for p in getattr(m, head).parameters()} <= classifier_parameters(m, name)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_weights_never_downloaded(monkeypatch):
    import torch.hub

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    build_model("resnet50", 1000)
