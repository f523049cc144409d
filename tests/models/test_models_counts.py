"""Parameter counts of the model zoo against published numbers.

ImageNet-sized models are built under `torch.device("meta")`: shapes only, no memory, no initialisation
cost. Each case names its count and where the count is published.
"""

from __future__ import annotations

import pytest
import torch

from polytrain.models import build_model


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, num_classes: int, in_shape: tuple[int, ...], **metaparameters) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(name, num_classes, in_shape, **metaparameters)


# (name, parameters at (3, 224, 224) with 1000 classes, source).
IMAGENET_COUNTS = [
    pytest.param("alexnet", 61_100_840, id="alexnet-61100840-torchvision-AlexNet_Weights"),
    pytest.param("vgg16", 138_357_544, id="vgg16-138357544-torchvision-VGG16_Weights"),
    pytest.param("vgg19", 143_667_240, id="vgg19-143667240-torchvision-VGG19_Weights"),
    # torchvision's GoogLeNet without the auxiliary classifiers (its weights' num_params).
    pytest.param("googlenet", 6_624_904, id="googlenet-6624904-torchvision-GoogLeNet_Weights"),
    pytest.param("resnet18", 11_689_512, id="resnet18-11689512-torchvision-ResNet18_Weights"),
    pytest.param("resnet50", 25_557_032, id="resnet50-25557032-torchvision-ResNet50_Weights"),
    pytest.param("densenet121", 7_978_856, id="densenet121-7978856-torchvision-DenseNet121_Weights"),
    # Iandola PhD thesis (2016) Table 5.1, "#parameter before pruning" total; also torchvision's count.
    pytest.param("squeezenet1_0", 1_248_424, id="squeezenet1_0-1248424-Iandola-thesis-Table5.1"),
    pytest.param("squeezenet1_1", 1_235_496, id="squeezenet1_1-1235496-torchvision-SqueezeNet1_1_Weights"),
    # No exact count is published for NIN-ImageNet; 7,595,176 is summed from the layer shapes of the
    # Caffe Model Zoo prototxt (test_nin_matches_model_zoo_snapshot_size checks it against the 29 MB).
    pytest.param("nin", 7_595_176, id="nin-7595176-Caffe-Model-Zoo-NIN-ImageNet-prototxt"),
]


@pytest.mark.parametrize("name, published", IMAGENET_COUNTS)
def test_imagenet_parameter_count(name, published):
    assert num_params(meta_model(name, 1000, (3, 224, 224))) == published


@pytest.mark.parametrize("name", [p.values[0] for p in IMAGENET_COUNTS])
def test_imagenet_forward_shape_on_meta(name):
    model = meta_model(name, 1000, (3, 224, 224))
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def test_nin_matches_model_zoo_snapshot_size():
    # Caffe Model Zoo, "Network in Network Imagenet Model" (gist mavenlin/d802a5849de39225bcc6): "a
    # snapshot of size 29MB"; float32 parameters in MiB.
    count = num_params(meta_model("nin", 1000, (3, 224, 224)))
    assert round(count * 4 / 2**20) == 29


# (name, metaparameters, parameters with 10 classes at (3, 32, 32), count as the paper rounds it or None).
CIFAR_COUNTS = [
    # He et al. 2016 Table 6 (option A shortcuts): ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M.
    pytest.param("resnet20", {}, 269_722, "0.27", id="resnet20-A-269722-He2016-Table6-0.27M"),
    pytest.param("resnet56", {}, 853_018, "0.85", id="resnet56-A-853018-He2016-Table6-0.85M"),
    pytest.param("resnet110", {}, 1_727_962, "1.7", id="resnet110-A-1727962-He2016-Table6-1.7M"),
    # Option B adds two 1x1 projections with batch norm: 16*32 + 32*64 + 2*(32 + 64) = 2,752 parameters.
    # The paper's CIFAR counts are for option A, so these have none to round to.
    pytest.param("resnet20", {"shortcut": "B"}, 272_474, None, id="resnet20-B-272474"),
    pytest.param("resnet56", {"shortcut": "B"}, 855_770, None, id="resnet56-B-855770"),
    pytest.param("resnet110", {"shortcut": "B"}, 1_730_714, None, id="resnet110-B-1730714"),
    # Huang et al. 2017 Table 2: DenseNet-BC (L=100, k=12) has 0.8M parameters.
    pytest.param("densenet_cifar", {}, 769_162, "0.8", id="densenet_cifar-769162-Huang2017-Table2-0.8M"),
]


@pytest.mark.parametrize("name, metaparameters, count, paper_millions", CIFAR_COUNTS)
def test_cifar_parameter_count(name, metaparameters, count, paper_millions):
    measured = num_params(meta_model(name, 10, (3, 32, 32), **metaparameters))
    assert measured == count
    if paper_millions is not None:
        decimals = len(paper_millions.split(".")[1])
        assert f"{measured / 1e6:.{decimals}f}" == paper_millions


def test_lenet5_parameter_count():
    # 156 + 2,416 + 48,120 + 10,164 + 850 (conv1, conv2, fc 400->120, fc 120->84, fc 84->10): the usual
    # fully connected LeNet-5 of LeCun et al. 1998 Fig. 2.
    assert num_params(build_model("lenet5", 10, (1, 32, 32))) == 61_706


def test_lenet5_pads_28px_inputs_like_32px():
    assert num_params(build_model("lenet5", 10, (1, 28, 28))) == 61_706
