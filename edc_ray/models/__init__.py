"""Classifier architectures by name (observers and students), and their weights files.

Importing this package registers the built-in architectures and the ``timm:`` / ``torchvision:`` prefixes.
"""

from edc_ray.models import convnet, external, resnet_cifar, wrn  # noqa: F401  (registration side effects)
from edc_ray.models.external import PretrainedWeightsError, adapt_first_conv
from edc_ray.models.registry import (
    create_model,
    external_prefixes,
    is_model,
    list_models,
    register_library,
    register_model,
)
from edc_ray.models.weights import load_weights, save_weights

__all__ = [
    "PretrainedWeightsError",
    "adapt_first_conv",
    "create_model",
    "external_prefixes",
    "is_model",
    "list_models",
    "load_weights",
    "register_library",
    "register_model",
    "save_weights",
]
