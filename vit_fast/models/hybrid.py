"""The ViT paper's hybrid stem: a ResNet (v2-style, weight-standardised convolutions + GroupNorm)
whose feature map is embedded by a 1x1 patch projection. Any backbone module that maps
[B, C, H, W] to a feature map [B, C', H/s, W/s] can be used instead (`HybridEmbed(backbone=...)`).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def same_pad(x: Tensor, kernel: int, stride: int, value: float = 0.0) -> Tensor:
    """TensorFlow's "SAME" padding, which the ViT hybrid's checkpoints were trained with: the output
    is ceil(size / stride) and any odd padding goes to the bottom/right (not symmetric)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (zero mean, unit variance per output filter), as BiT uses
    with GroupNorm so that batch statistics are never needed, and "SAME" padding (`same_pad`)."""

    def __init__(self, *args, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=self.eps)
        x = same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, 0, self.dilation, self.groups)


class SamePadMaxPool2d(nn.Module):
    """3x3/2 max-pool with "SAME" padding (padded with -inf, so padding never wins the max)."""

    def __init__(self, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(same_pad(x, self.kernel, self.stride, -math.inf), self.kernel, self.stride)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels, eps=1e-5)


class Bottleneck(nn.Module):
    """Pre-activation-free (v1.5-style ordering, as the ViT hybrid) bottleneck: 1x1 -> 3x3 (stride) -> 1x1."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        mid = out_chs // 4
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            # Named as timm's ResNetV2 (downsample.conv / downsample.norm): checkpoints load strictly.
            self.downsample = nn.Sequential(
                OrderedDict(conv=StdConv2d(in_chs, out_chs, 1, stride=stride, bias=False), norm=_gn(out_chs))
            )
        self.conv1, self.norm1 = StdConv2d(in_chs, mid, 1, bias=False), _gn(mid)
        self.conv2, self.norm2 = StdConv2d(mid, mid, 3, stride=stride, bias=False), _gn(mid)
        self.conv3, self.norm3 = StdConv2d(mid, out_chs, 1, bias=False), _gn(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class _Stage(nn.Module):
    """One ResNet stage; its bottlenecks live under `blocks` as in timm's ResNetV2."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """ResNet feature extractor: 7x7/2 conv stem + 3x3/2 max-pool, then bottleneck stages.

    The paper's hybrid default is layers=(3, 4, 9) with widths (256, 512, 1024): output stride 16,
    1024 channels, so at 224 px the 1x1 embedding sees a 14x14 grid like ViT-B/16.
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 9), in_chans: int = 3, stem_width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(in_chans, stem_width, 7, stride=2, bias=False),
                norm=_gn(stem_width),
                act=nn.ReLU(),
                pool=SamePadMaxPool2d(3, 2),
            )
        )
        stages, chs = [], stem_width
        for i, depth in enumerate(layers):
            out_chs = stem_width * 4 * 2**i
            blocks = [
                Bottleneck(chs if j == 0 else out_chs, out_chs, 2 if (j == 0 and i > 0) else 1)
                for j in range(depth)
            ]
            stages.append(_Stage(blocks))
            chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = chs
        self.reduction = 4 * 2 ** (len(layers) - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


@torch.no_grad()
def feature_shape(backbone: nn.Module, in_chans: int, img_size: tuple[int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of the backbone's feature map for one image of `img_size`."""
    was_training = backbone.training
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    backbone.eval()
    feat = backbone(torch.zeros(1, in_chans, *img_size, device=device))
    backbone.train(was_training)
    return int(feat.shape[1]), int(feat.shape[2]), int(feat.shape[3])


class HybridEmbed(nn.Module):
    """Parameter holder for the hybrid embedding, in timm's layout: `backbone` (the CNN) and `proj`,
    a 1x1 Conv2d [D, C', 1, 1] over the backbone's feature map (patch size 1 on the feature grid)."""

    def __init__(
        self, backbone: nn.Module, img_size: int | tuple[int, int], in_chans: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.backbone = backbone
        feat_chans, fh, fw = feature_shape(backbone, in_chans, self.img_size)
        self.patch_size = (1, 1)
        self.feat_ratio = self.img_size[0] // fh
        self.grid_size = (fh, fw)
        self.num_patches = fh * fw
        self.proj = nn.Conv2d(feat_chans, embed_dim, 1)
