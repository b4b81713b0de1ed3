"""A tiny generated image dataset for fast tests: each class is a bright square at its own place."""
import torch

from edc_ray.algo.observer import train_observer
from edc_ray.config import ObserversConfig
from edc_ray.models import create_model

MEAN, STD = [0.2], [0.3]


def make_tiny(num_classes: int = 3, per_class: int = 20, size: int = 12, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, size, size) and int64 labels, classes in order."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(num_classes):
        for _ in range(per_class):
            img = torch.rand(1, size, size, generator=g) * 0.3
            r = 1 + 3 * c + int(torch.randint(0, 2, (), generator=g))
            img[:, r:r + 4, 2:size - 2] += 0.7
            images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def tiny_observers(images: torch.Tensor, labels: torch.Tensor, archs=("convnet", "convnet_bn"),
                   epochs: int = 3) -> list[torch.nn.Module]:
    """Small observers trained briefly on the tiny set."""
    cfg = ObserversConfig(epochs=epochs, batch_size=16, lr=0.05)
    models = []
    for k, arch in enumerate(archs):
        torch.manual_seed(k)
        model = create_model(arch, num_classes=int(labels.max()) + 1, in_chans=1,
                             image_size=images.shape[-1], depth=2, width=8)
        models.append(train_observer(model, images, labels, cfg, MEAN, STD, seed=k))
    return models
