"""Network in Network (Lin, Chen & Yan, ICLR 2014), the ImageNet model of the Caffe Model Zoo."""

from __future__ import annotations

from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked, image_shape, is_small, pool_or_skip, stem_conv, stem_pool


def mlpconv(conv: nn.Conv2d, widths: tuple[int, int]) -> nn.Sequential:
    """An mlpconv layer (Lin et al. 2014 Sec. 3.1): `conv`, then two 1x1 convolutions ("cccp"), all ReLU."""
    return nn.Sequential(
        conv,
        nn.ReLU(inplace=True),
        nn.Conv2d(conv.out_channels, widths[0], 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(widths[0], widths[1], 1),
        nn.ReLU(inplace=True),
    )


@MODELS.register("nin")
@checked
def nin(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """NIN-ImageNet: four mlpconv layers and global average pooling, no fully connected layer.

    Follows the Caffe Model Zoo "Network in Network Imagenet Model" by M. Lin (train_val.prototxt of
    https://gist.github.com/mavenlin/d802a5849de39225bcc6): conv1 11x11/4 96 + cccp1/cccp2 96, conv2 5x5
    256 + cccp3/cccp4 256, conv3 3x3 384 + cccp5/cccp6 384, each followed by a 3x3/2 max pool (Caffe rounds
    pool sizes up, hence `ceil_mode`), dropout 0.5, conv4 3x3 1024 + cccp7 1024 + cccp8 num_classes, a 6x6
    average pool (global at 224x224). The last mlpconv ends in ReLU as in the prototxt, so the logits are
    non-negative. PyTorch's default initialisation.

    Parameters at (3, 224, 224) with 1000 classes: 7,595,176. The model zoo page publishes no exact count,
    only the size of the trained snapshot, 29 MB; 7,595,176 float32 parameters are 28.97 MiB.

    Small inputs (smaller side < 64 px, see `polytrain.models.common`): conv1 becomes 3x3/1, pool1 is
    skipped, and pools that would leave less than 1x1 are skipped.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
    """
    channels, height, width = image_shape("nin", in_shape)
    small = is_small((height, width))
    conv1, hw = stem_conv(channels, 96, (height, width), kernel=11, stride=4, padding=0)
    pool1, hw = stem_pool(small, hw, 3, 2, ceil_mode=True)
    pool2, hw = pool_or_skip(nn.MaxPool2d, hw, 3, 2, ceil_mode=True)  # mlpconv 2 and 3 keep the size
    pool3, hw = pool_or_skip(nn.MaxPool2d, hw, 3, 2, ceil_mode=True)
    return nn.Sequential(
        mlpconv(conv1, (96, 96)),
        pool1,
        mlpconv(nn.Conv2d(96, 256, 5, padding=2), (256, 256)),
        pool2,
        mlpconv(nn.Conv2d(256, 384, 3, padding=1), (384, 384)),
        pool3,
        nn.Dropout(0.5),
        mlpconv(nn.Conv2d(384, 1024, 3, padding=1), (1024, num_classes)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
