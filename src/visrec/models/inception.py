"""GoogLeNet / Inception v1 (Szegedy et al., 2015) on torchvision's implementation (its weight files load).

The two auxiliary classifiers are optional (`aux=True`) and used in training only: the training loop adds
their losses with weight `aux_weight` (0.3, as in the paper); evaluation and prediction see the main head.
`stem="small"` (automatic under 96 px) makes the first convolution 3x3 stride 1 and drops the first two
max-pools, so 28-32 px inputs keep a 4x4 map at the last stage.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ._registry import register_model
from .layers import Classifier, resolve_stem, swap_layers

_tvg = importlib.import_module("torchvision.models.googlenet")  # the module, not the function of the same name


class GoogLeNet(Classifier, _tvg.GoogLeNet):
    head_path = "fc"
    stage_paths = ("maxpool2", "maxpool3", "maxpool4", "inception5b")
    aux_weight = 0.3

    def __init__(self, in_chans: int, num_classes: int, stem: str, aux: bool, dropout: float, act: str):
        _tvg.GoogLeNet.__init__(self, num_classes=num_classes, aux_logits=aux, init_weights=True, dropout=dropout)
        if stem == "small":
            self.conv1.conv = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
            self.maxpool1, self.maxpool2 = nn.Identity(), nn.Identity()
        elif in_chans != 3:
            self.conv1.conv = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.aux_outputs: list[torch.Tensor] = []
        swap_layers(self, act)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.aux_outputs = []
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        if self.aux1 is not None and self.training:
            self.aux_outputs.append(self.aux1(x))
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        if self.aux2 is not None and self.training:
            self.aux_outputs.append(self.aux2(x))
        x = self.maxpool4(self.inception4e(x))
        return self.inception5b(self.inception5a(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = nn.Linear(aux.fc2.in_features, num_classes, device=aux.fc2.weight.device)


@register_model(family="googlenet")
def googlenet(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto", aux: bool = False,
              dropout: float = 0.2, act: str = "relu") -> nn.Module:
    """GoogLeNet (Inception v1, with batch norm as in torchvision); aux=True adds the auxiliary heads."""
    return GoogLeNet(in_chans, num_classes, resolve_stem(stem, image_size), aux, dropout, act)
