"""Name -> architecture registry, in the style of timm: a decorator registers built-in builders, external
libraries (timm, torchvision) answer to prefixed names such as ``timm:resnet18``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


class ExternalLibrary(Protocol):
    """A model zoo reachable through ``<prefix>:<name>`` model names."""

    def has_model(self, name: str) -> bool:
        """Whether the library knows the architecture ``name``."""

    def create(
        self, name: str, num_classes: int, in_chans: int, image_size: int, pretrained: bool | str, **kwargs: Any
    ) -> nn.Module:
        """Build the architecture ``name`` with a ``num_classes``-way head for ``in_chans``-channel input."""


_BUILTINS: dict[str, Callable[..., nn.Module]] = {}
_LIBRARIES: dict[str, ExternalLibrary] = {}


def register_model(name: str, **defaults: Any) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes, in_chans, image_size, **kwargs)`` under ``name``.

    ``defaults`` are bound keyword arguments (e.g. ``width=32``); callers of :func:`create_model` may still
    override them. The decorated object is returned unchanged so decorators can be stacked.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _BUILTINS or ":" in name:
            raise ValueError(f"cannot register model {name!r}: name taken or contains ':'")
        _BUILTINS[name] = partial(builder, **defaults)
        return builder

    return decorator


def register_library(prefix: str, library: ExternalLibrary) -> None:
    """Make ``library`` answer to model names ``<prefix>:<name>``."""
    if prefix in _LIBRARIES:
        raise ValueError(f"external model prefix {prefix!r} is already registered")
    _LIBRARIES[prefix] = library


def list_models() -> list[str]:
    """Sorted names of the built-in architectures (external libraries are reached by prefix)."""
    return sorted(_BUILTINS)


def external_prefixes() -> list[str]:
    """Sorted prefixes that route a model name to an external library, e.g. ``["timm", "torchvision"]``."""
    return sorted(_LIBRARIES)


def is_model(name: str) -> bool:
    """Whether :func:`create_model` can build ``name`` (checks external names against their library)."""
    if name in _BUILTINS:
        return True
    prefix, sep, external_name = name.partition(":")
    return bool(sep) and prefix in _LIBRARIES and _LIBRARIES[prefix].has_model(external_name)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 32,
    pretrained: bool | str = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the architecture ``name`` as a ``num_classes``-way classifier of ``in_chans`` x ``image_size``²
    images. Extra ``kwargs`` go to the builder (e.g. ``width=64`` for ConvNets).

    ``pretrained`` (True or a weights name) is only available for external names and may need the network (see
    :class:`~edc_ray.models.external.PretrainedWeightsError`). The returned module carries its registry
    name as ``model.arch_name`` so later errors can name it.
    """
    _check_int("num_classes", num_classes, 1)
    _check_int("in_chans", in_chans, 1)
    _check_int("image_size", image_size, 8)
    if name in _BUILTINS:
        if pretrained:
            raise ValueError(
                f"built-in model {name!r} has no pretrained weights: train it, or build it with "
                "pretrained=False and load a weights file with edc_ray.models.load_weights"
            )
        model = _BUILTINS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
    elif is_model(name):
        prefix, _, external_name = name.partition(":")
        library = _LIBRARIES[prefix]
        model = library.create(external_name, num_classes, in_chans, image_size, pretrained, **kwargs)
    else:
        raise ValueError(_unknown_model_message(name))
    model.arch_name = name
    return model


def _unknown_model_message(name: str) -> str:
    prefix, sep, external_name = name.partition(":")
    if sep and prefix in _LIBRARIES:
        return f"unknown model {name!r}: {prefix} has no model {external_name!r}"
    prefixes = ", ".join(f"'{p}:<name>'" for p in external_prefixes())
    return f"unknown model {name!r}; built-in models: {', '.join(list_models())}; external models: {prefixes}"


def _check_int(what: str, value: Any, minimum: int) -> None:
    # bool is an int subclass, but True classes / channels is always a caller bug
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
