"""Model weights as files: a ``state_dict`` saved with ``torch.save`` at a local path or any fsspec URL
(``s3://...``). Loading never unpickles arbitrary objects (``weights_only=True``): weights files are data
that may come from elsewhere."""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping

import torch
from torch import nn

from edc_ray.errors import DataError
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import torch_bytes


def save_weights(model: nn.Module, url: str) -> None:
    """Write ``model.state_dict()`` to ``url`` atomically: readers see the old file or the whole new one."""
    fsio.atomic_write_bytes(url, torch_bytes(model.state_dict()))


def load_weights(model: nn.Module, url: str, strict: bool = True) -> nn.Module:
    """Load the ``state_dict`` at ``url`` (path or fsspec URL) into ``model`` and return ``model``.

    Raises ``FileNotFoundError`` naming ``url`` when it does not exist, ``pickle.UnpicklingError`` when the
    file holds anything but tensors and plain containers (nothing in it is executed), and ``DataError``
    naming ``url`` when it is not a readable ``torch.save`` file (truncated, corrupt), not a state_dict,
    or (naming the model too) when its keys or shapes do not match.
    """
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"weights file not found: {url}") from error
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"refusing to load {url}: it is not a plain tensor state_dict ({error})"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise DataError(f"cannot read weights file {url} (truncated or not a torch.save file): {error}") from None
    name = getattr(model, "arch_name", type(model).__name__)
    if not isinstance(state, Mapping):
        raise DataError(f"{url} holds a {type(state).__name__}, not a state_dict for model {name!r}")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise DataError(f"weights {url} do not fit model {name!r}: {error}") from error
    return model
