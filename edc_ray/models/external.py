"""Architectures from timm and torchvision, reached as ``timm:<name>`` and ``torchvision:<name>``.

The libraries are imported on first use: importing them costs seconds, and most runs only need the
built-in small networks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from edc_ray.models.registry import register_library


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained (usually: no network)."""


class TimmLibrary:
    """``timm:<name>``: ``timm.create_model``, which adapts the stem to ``in_chans`` itself."""

    def has_model(self, name: str) -> bool:
        """Whether timm knows ``name`` (an architecture, optionally with a ``.tag``)."""
        import timm

        # a model folder is checked where it is read (a config error, or the missing-weights message)
        return name.startswith("local-dir:") or timm.is_model(name)

    def create(
        self, name: str, num_classes: int, in_chans: int, image_size: int, pretrained: bool | str, **kwargs: Any
    ) -> nn.Module:
        """``timm.create_model`` (``pretrained``: True, or a weights tag); ``img_size`` is passed only to fixed-input-size models such as ViTs,
        whose position embeddings depend on it (convolutional timm models reject the argument)."""
        import timm

        cfg = None if name.startswith("local-dir:") else timm.get_pretrained_cfg(name)
        if cfg is not None and cfg.fixed_input_size:
            kwargs.setdefault("img_size", image_size)
        tagged = f"{name}.{pretrained}" if isinstance(pretrained, str) else name
        with _explain_download_failure(f"timm:{tagged}", bool(pretrained)):
            return timm.create_model(
                tagged, pretrained=bool(pretrained), num_classes=num_classes, in_chans=in_chans, **kwargs
            )


class TorchvisionLibrary:
    """``torchvision:<name>``: a torchvision classification model; for ``in_chans != 3`` the first
    convolution is replaced (see :func:`adapt_first_conv`)."""

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is a torchvision classification model."""
        from torchvision import models

        return name in models.list_models(module=models)

    def create(
        self, name: str, num_classes: int, in_chans: int, image_size: int, pretrained: bool | str, **kwargs: Any
    ) -> nn.Module:
        """``torchvision.models.get_model`` with the weights ``pretrained`` names (``True``: the default).
        ``image_size`` is unused: the classification models pool globally."""
        from torchvision import models

        from edc_ray.models.pretrained import _torchvision_weights

        weights = _torchvision_weights(name, pretrained) if pretrained else None
        with _explain_download_failure(f"torchvision:{name}", pretrained):
            model = models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
        if in_chans != 3:
            adapt_first_conv(model, in_chans)
        return model


def adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Replace the first ``Conv2d`` of ``model`` (in registration order) by one reading ``in_chans`` channels.

    Its weights are the old ones summed over the input channels and spread evenly over the new ones, so a
    grayscale image gets the response its RGB replica had (for pretrained weights that keeps the features;
    for fresh weights it keeps the library's initialisation scheme up to scale).
    """
    name, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if old.groups != 1:
        raise ValueError(f"cannot adapt grouped first convolution {name!r} to {in_chans} input channels")
    new = nn.Conv2d(
        in_chans,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        summed = old.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.expand(-1, in_chans, -1, -1) / in_chans)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


@contextmanager
def _explain_download_failure(model_name: str, pretrained: bool | str) -> Iterator[None]:
    # network failures surface as OSError subclasses (URLError, requests' ConnectionError, the Hugging Face
    # hub's LocalEntryNotFoundError); anything else is not a download problem and passes through unchanged
    try:
        yield
    except OSError as error:
        if not pretrained:
            raise
        raise PretrainedWeightsError(
            f"could not download pretrained weights for {model_name!r} (is the network reachable?): {error}. "
            "Offline, build the model with pretrained=False and load a local weights file (a state_dict "
            "saved with torch.save, as a path or s3:// URL) with edc_ray.models.load_weights(model, url)."
        ) from error


register_library("timm", TimmLibrary())
register_library("torchvision", TorchvisionLibrary())
