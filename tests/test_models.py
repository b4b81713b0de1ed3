"""Model registry, architectures and weights files. Tiny inputs: the whole file runs in seconds on CPU."""

from __future__ import annotations

import pickle
import socket

import huggingface_hub.constants
import pytest
import torch
from torch import nn

from edc_ray.algo.stats import hooked_layers

from edc_ray.models import (
    PretrainedWeightsError,
    create_model,
    is_model,
    list_models,
    load_weights,
    save_weights,
)

EXTERNAL = ["timm:resnet18", "torchvision:mobilenet_v2", "torchvision:shufflenet_v2_x0_5"]
ALL_MODELS = list_models() + EXTERNAL
INPUTS = {"gray28": (1, 28), "rgb32": (3, 32)}


def build(name: str, in_chans: int = 3, image_size: int = 32, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_chans=in_chans, image_size=image_size, **kwargs)


def images(in_chans: int, image_size: int) -> torch.Tensor:
    return torch.randn(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(1))


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_registry_lists_the_builtin_architectures():
    assert list_models() == [
        "convnet", "convnet_bn", "convnet_d1", "convnet_d2", "convnet_d3",
        "convnet_w128", "convnet_w32", "convnet_w64", "resnet18_cifar", "wrn16_2",
    ]
    assert all(is_model(name) for name in ALL_MODELS)
    assert not is_model("timm:not_a_model") and not is_model("nope") and not is_model("timm:")


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_gives_one_logit_per_class(name, shape):
    in_chans, image_size = shape
    model = build(name, in_chans, image_size).eval()
    with torch.no_grad():
        assert model(images(in_chans, image_size)).shape == (2, 10)
    assert model.arch_name == name


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name):
    model = build(name, in_chans=1, image_size=28).train()
    model(images(1, 28)).logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_same_seed_same_initial_weights(name):
    first, second, other = (build(name, seed=seed).state_dict().values() for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize(
    "name, kwargs, image_size, convs, group_norms, batch_norms, features",
    [
        ("convnet", {}, 32, 3, 3, 0, 128 * 4 * 4),
        ("convnet_w128", {}, 28, 3, 3, 0, 128 * 3 * 3),
        ("convnet_w64", {}, 32, 3, 3, 0, 64 * 4 * 4),
        ("convnet_w32", {}, 32, 3, 3, 0, 32 * 4 * 4),
        ("convnet_d1", {}, 28, 1, 1, 0, 128 * 14 * 14),
        ("convnet_d2", {}, 32, 2, 2, 0, 128 * 8 * 8),
        ("convnet_d3", {}, 32, 3, 3, 0, 128 * 4 * 4),
        ("convnet_bn", {}, 32, 3, 0, 3, 128 * 4 * 4),
        ("convnet", {"norm": "none"}, 32, 3, 0, 0, 128 * 4 * 4),
        ("convnet_w32", {"width": 16, "depth": 4}, 32, 4, 4, 0, 16 * 2 * 2),
    ],
)
def test_convnet_structure_follows_depth_width_norm(
    name, kwargs, image_size, convs, group_norms, batch_norms, features
):
    model = build(name, image_size=image_size, **kwargs)
    assert count(model, nn.Conv2d) == convs
    assert count(model, nn.GroupNorm) == group_norms
    assert count(model, nn.BatchNorm2d) == batch_norms
    assert model.classifier.in_features == features
    # instance norm = one group per channel, with an affine
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_groups == m.num_channels and m.affine for m in norms)


def test_convnet_rejects_images_smaller_than_its_pooling():
    with pytest.raises(ValueError, match="depth 4 needs image_size >= 16"):
        build("convnet", image_size=8, depth=4)
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build("convnet", norm="layer")


def test_unknown_name_lists_registered_names_and_prefixes():
    with pytest.raises(ValueError) as raised:
        build("convnet_w999")
    message = str(raised.value)
    assert "'convnet_w999'" in message
    assert all(name in message for name in list_models())
    assert "'timm:<name>'" in message and "'torchvision:<name>'" in message
    with pytest.raises(ValueError, match="timm has no model 'not_a_model'"):
        build("timm:not_a_model")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes must be an integer >= 1, got 0"),
        ({"num_classes": True}, "num_classes must be an integer >= 1, got True"),
        ({"in_chans": 0}, "in_chans must be an integer >= 1, got 0"),
        ({"image_size": 4}, "image_size must be an integer >= 8, got 4"),
        ({"image_size": 32.0}, "image_size must be an integer >= 8, got 32.0"),
    ],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("convnet", **{"num_classes": 10, **kwargs})


def test_builtin_models_have_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained weights.*load_weights"):
        build("resnet18_cifar", pretrained=True)


def test_timm_vit_gets_the_image_size():
    model = build("timm:test_vit", image_size=32)
    assert tuple(model.patch_embed.img_size) == (32, 32)
    assert model(images(3, 32)).shape == (2, 10)


def test_grayscale_stem_sums_rgb_filters():
    rgb, gray = build("torchvision:resnet18").eval(), build("torchvision:resnet18", in_chans=1).eval()
    assert torch.equal(gray.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    x = images(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)))


def test_hooked_layers_are_conv_and_batchnorm_in_registration_order():
    assert [layer.name for layer in hooked_layers(build("convnet_bn", depth=2))] == [
        "features.0.0", "features.0.1", "features.1.0", "features.1.1",
    ]
    assert [layer.name for layer in hooked_layers(build("convnet_d2"))] == ["features.0.0", "features.1.0"]
    layers = hooked_layers(build("resnet18_cifar"))
    assert layers[0].name == "stem.0"
    assert len(layers) == 2 * (1 + 8 * 2 + 3)  # conv + BatchNorm pairs: stem, two per block, 3 projections
    assert all(isinstance(layer.module, (nn.Conv2d, nn.BatchNorm2d)) for layer in layers)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_weights_round_trip(tmp_path, where):
    url = str(tmp_path / "nested" / "w.pt") if where == "local" else f"memory://{tmp_path.name}/w.pt"
    saved, fresh = build("convnet_bn", seed=1), build("convnet_bn", seed=2)
    saved(images(3, 32))  # move the BatchNorm running statistics away from their initial values
    save_weights(saved, url)
    assert load_weights(fresh, url) is fresh
    for (key, a), b in zip(saved.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), key
    if where == "local":
        assert [p.name for p in (tmp_path / "nested").iterdir()] == ["w.pt"]  # no temporary file left


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_weights(build("convnet_d1"), str(tmp_path / "absent.pt"))


def test_shape_mismatch_names_model_and_path(tmp_path):
    path = str(tmp_path / "w32.pt")
    save_weights(build("convnet_w32"), path)
    with pytest.raises(ValueError, match=r"(?s)w32\.pt do not fit model 'convnet_w64'.*size mismatch"):
        load_weights(build("convnet_w64"), path)


class _Payload:
    """Unpickling this opens (creates) the marker file: stands for arbitrary code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_weights_file_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Payload(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_weights(build("convnet_d1"), str(path))
    assert not marker.exists()
    # the payload is real: an unrestricted load does run it
    torch.load(path, weights_only=False)["payload"].close()
    assert marker.exists()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty weight caches, failing at once instead of retrying."""

    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # the Hugging Face hub (timm weights) retries for a minute unless it knows it is offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_without_network_explains_the_offline_route(offline, name):
    with pytest.raises(PretrainedWeightsError, match=f"'{name}'.*pretrained=False.*load_weights"):
        create_model(name, num_classes=1000, pretrained=True)
