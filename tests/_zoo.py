"""Real architectures with random weights, built locally (no downloads), for conformance tests.

Each entry of :data:`ZOO` builds a model, its probe inputs and the layers to probe.  The
structures are those researchers bring, with what makes them hard to measure:

``resnet18``  torchvision's ResNet-18 (He et al. 2016): ``BasicBlock`` with one
              ``self.relu = nn.ReLU(inplace=True)`` used twice, BatchNorm, ``out += identity``
              written in place over ``bn2``'s output, 1×1-conv downsample.  Written here
              module for module as ``torchvision.models.resnet`` defines it (state-dict keys
              included); ``torchvision.models.resnet18`` is used when it can be imported.
``vgg11``     torchvision's VGG-11 (configuration "A", Simonyan & Zisserman 2015): convolutions
              each followed by ``nn.ReLU(inplace=True)``, the classifier's in-place ReLUs and
              Dropout.  ``hidden`` is the classifier width (4096 in torchvision; smaller here
              by default so a test runs in seconds: the structure is the same).
``vit``       a small Vision Transformer from ``transformers``' ``ViTConfig`` (patch embedding,
              two pre-norm blocks, [CLS] token).
``gpt2``      a two-layer GPT-2 from ``GPT2Config`` (causal self-attention, tuple outputs).
``bert``      a two-layer BERT from ``BertConfig`` with padded sequences (attention mask).
``mlp``       Linear → ReLU(inplace=True) → Dropout → Linear → ReLU(inplace=True) → Linear.
``shared``    a block whose one ``nn.ReLU`` is called twice per forward pass.

Models are float64 by default (references are float64), in train mode as built (BatchNorm
and Dropout active): the consumer decides what mode to measure in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tests import _tiny_models as tiny

__all__ = ["ZOO", "Entry", "bert", "gpt2", "mlp", "resnet18", "shared", "vgg11", "vit"]


# --------------------------------------------------------------- torchvision's ResNet-18
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet (BasicBlock, zero-init-residual off)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes, stride),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision() -> Any:
    try:
        import torchvision.models as models
    except ImportError:
        return None
    return models


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 with random weights (torchvision's own when importable)."""
    models = _torchvision()
    if models is not None:
        return models.resnet18(weights=None, num_classes=num_classes)
    return ResNet((2, 2, 2, 2), num_classes)


# --------------------------------------------------------------- torchvision's VGG-11
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512,
                                    "M")


class VGG(nn.Module):
    """torchvision.models.vgg.VGG with a classifier of width ``hidden``."""

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, hidden: int = 4096,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def _vgg_features(cfg: tuple[int | str, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1),
                       nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers)


def vgg11(num_classes: int = 10, hidden: int = 256) -> nn.Module:
    """VGG-11 with random weights (torchvision's own when importable and ``hidden=4096``)."""
    models = _torchvision()
    if models is not None and hidden == 4096:
        return models.vgg11(weights=None, num_classes=num_classes)
    return VGG(_vgg_features(VGG11_CFG), num_classes, hidden)


# --------------------------------------------------------------- transformers
def vit() -> nn.Module:
    """A two-block ViT (``transformers.ViTModel``): 32×32 images, 8×8 patches, width 32."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return ViTModel(config, add_pooling_layer=False)


def gpt2() -> nn.Module:
    """A two-layer GPT-2 (``transformers.GPT2Model``), width 32, vocabulary 300."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=300,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2Model(config)


def bert() -> nn.Module:
    """A two-layer BERT (``transformers.BertModel``), width 32, vocabulary 300."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False)


# --------------------------------------------------------------- small models
def mlp(d_in: int = 16, width: int = 24, classes: int = 4) -> nn.Module:
    """Linear → ReLU(inplace) → Dropout → Linear → ReLU(inplace) → Linear."""
    return tiny.mlp(d_in, width, width, classes, inplace=True, dropout=0.2)


class Shared(nn.Module):
    """One ``nn.ReLU`` called twice per forward pass (the BasicBlock pattern), a head."""

    def __init__(self, d_in: int = 16, width: int = 24, classes: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, width), nn.Linear(width, width)
        self.act = nn.ReLU()
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.head(self.act(self.fc2(h)) + h)


def shared() -> nn.Module:
    return Shared()


# --------------------------------------------------------------- the zoo
@dataclass
class Entry:
    """A zoo model with its probe inputs.

    ``build()`` returns the model (float64, train mode, seeded); ``inputs(n, seed)`` a probe
    batch (a tensor, or a mapping for ``model(**batch)``; ``mask`` the attention mask or
    ``None``); ``layers`` the layers probed by default (features of at most a few hundred
    dims, so a d × d eigensolve is quick); ``reduce`` the token reduction for them.
    """

    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int, int], Any]
    layers: list[str]
    reduce: str = "flatten"
    kind: str = "vision"
    notes: dict[str, str] = field(default_factory=dict)

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make().double().train()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)


def _vectors(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g, dtype=torch.float64) * 2.0 + 0.5


def _tokens(n: int, seed: int, padded: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.long)
    if padded:
        lengths = torch.randint(4, 13, (n,), generator=g)
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}


ZOO: dict[str, Entry] = {
    "resnet18": Entry("resnet18", resnet18, _images,
                      ["layer4.0.bn1", "layer4.0.bn2", "layer4.1", "avgpool", "fc"]),
    "vgg11": Entry("vgg11", vgg11, _images, ["features.20", "classifier.3", "classifier.6"]),
    "vit": Entry("vit", vit, _images, ["layers.0.mlp.fc1", "layers.1", "layernorm"],
                 reduce="cls"),
    "gpt2": Entry("gpt2", gpt2, lambda n, s: _tokens(n, s, padded=False),
                  ["h.0.mlp.c_fc", "h.1", "ln_f"], reduce="mean", kind="text"),
    "bert": Entry("bert", bert, lambda n, s: _tokens(n, s, padded=True),
                  ["encoder.layer.0.intermediate", "encoder.layer.1"], reduce="mean",
                  kind="text"),
    "mlp": Entry("mlp", mlp, _vectors, ["0", "3", "5"]),
    "shared": Entry("shared", shared, _vectors, ["fc1", "fc2", "head"]),
}
"""Every zoo model by name."""
