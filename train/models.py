"""Model registry: every network the trainer knows, each with a named, replaceable head.

Nothing here downloads weights: torchvision models are built with
``weights=None``. Each entry records which submodule is the classifier head so
that transfer learning can train it on its own (``classifier_parameters``)
and fine-tuning can give the backbone its own learning rate (``classifier_parameters``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class SeedCNN(nn.Module):
    """The article's network, layer for layer: two 5x5 convs and three linear layers, 32 px in."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def _conv_group(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    # Pool right after the first conv: the second conv then runs at a quarter of
    # the pixels, which is where most of this net's speed comes from.
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(c_mid),
        nn.GELU(),
        nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    )


class CifarFast(nn.Module):
    """A small, wide CIFAR network after Keller Jordan's airbench94 (2x2 stem, three
    conv groups 64/256/256, global max-pool, scaled linear head): built for GPU speed.

    INNER gives each group's first conv its own width (channel pruning makes them
    differ from WIDTHS, the groups' outputs); by default they are equal."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (64, 256, 256),
        inner: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        inner = inner or widths
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 2, bias=True), nn.GELU())
        self.layers = nn.Sequential(
            _conv_group(24, inner[0], widths[0]),
            _conv_group(widths[0], inner[1], widths[1]),
            _conv_group(widths[1], inner[2], widths[2]),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes, bias=False)
        # A small logit scale keeps early softmax outputs soft (airbench uses 1/9).
        self.logit_scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1)) * self.logit_scale


def _resnet(arch: str) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, cifar_stem: bool) -> nn.Module:
        import torchvision  # late: it costs seconds at start-up and only ResNets need it

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if cifar_stem:
            # 32 px inputs: a 7x7/2 conv plus max-pool would leave 8x8 maps before layer1.
            model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    build: Callable[[int, bool], nn.Module]  # (num_classes, cifar_stem) -> module
    head: str  # attribute name of the final nn.Linear
    # Modules that classify the backbone's features, head included: what
    # --transfer features trains and --backbone-lr-mult leaves alone. Empty: the head alone.
    classifier: tuple[str, ...] = ()
    native_size: int  # input side the architecture is designed for
    small_native_size: int  # same, with the CIFAR stem
    fixed_size: bool = False  # True: any other input size cannot work


MODELS: dict[str, ModelSpec] = {
    "seed_cnn": ModelSpec(
        build=lambda n, _stem: SeedCNN(n),
        head="fc3",
        # Its two hidden linear layers classify as much as fc3 does (torchvision's
        # VGG/AlexNet split "features" and "classifier" the same way): frozen, they
        # carry the source's classes into the new task.
        classifier=("fc1", "fc2", "fc3"),
        native_size=32,
        small_native_size=32,
        fixed_size=True,
    ),
    "cifar_fast": ModelSpec(
        build=lambda n, _stem: CifarFast(n), head="fc", native_size=32, small_native_size=32
    ),
    # cifar_fast at an eighth of the width (about 7x fewer MACs): a teacher that
    # trains in minutes on a CPU, for distillation experiments without a GPU.
    "cifar_fast_s": ModelSpec(
        build=lambda n, _stem: CifarFast(n, widths=(32, 64, 128)),
        head="fc",
        native_size=32,
        small_native_size=32,
    ),
    "resnet18": ModelSpec(
        build=_resnet("resnet18"), head="fc", native_size=224, small_native_size=32
    ),
    "resnet50": ModelSpec(
        build=_resnet("resnet50"), head="fc", native_size=224, small_native_size=32
    ),
}


def resolve_image_size(name: str, image_size: int, cifar_stem: bool) -> int:
    """The input side to train at: IMAGE_SIZE, or the model's native size when 0."""
    spec = MODELS[name]
    native = spec.small_native_size if cifar_stem else spec.native_size
    if image_size == 0:
        return native
    if spec.fixed_size and image_size != native:
        raise ValueError(
            f"model {name} takes {native} px inputs only; got --image-size {image_size}"
        )
    return image_size


def build_model(name: str, num_classes: int, *, cifar_stem: bool = False) -> nn.Module:
    """A freshly initialised model (never downloaded weights)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    return MODELS[name].build(num_classes, cifar_stem)


def head_module(model: nn.Module, name: str) -> nn.Linear:
    return getattr(model, MODELS[name].head)


def classifier_parameters(model: nn.Module, name: str) -> set[int]:
    """ids of the classifier's parameters (ModelSpec.classifier, or the head alone)."""
    names = MODELS[name].classifier or (MODELS[name].head,)
    return {id(p) for n in names for p in getattr(model, n).parameters()}


def num_classes_of(model: nn.Module, name: str) -> int:
    return head_module(model, name).out_features
