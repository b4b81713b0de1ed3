"""Shared test helpers: a tiny generated image dataset (each class a bright square at its own place),
the tiny pipeline's config, synthesis-stage inputs, a Ray Train loop that records its resumes, and free
ports."""
import torch

from edc_ray.algo.observer import train_observer
from edc_ray.config import ObserversConfig, load_config
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


def recording_loop(record: str, module_name: str, loop_name: str, config: dict) -> None:
    """Run the Ray Train loop `module_name.loop_name`, noting (as JSON lines in `record`) for every
    start of the worker group which checkpointed epoch each rank resumed from (None: from scratch)."""
    import importlib
    import json
    import os

    module = importlib.import_module(module_name)
    original = module.latest_state

    def latest_state(rank: int) -> dict | None:
        state = original(rank)
        with open(record, "a") as f:
            f.write(json.dumps({"rank": rank, "pid": os.getpid(),
                                "epoch": None if state is None else state["epoch"]}) + "\n")
        return state

    module.latest_state = latest_state
    try:
        getattr(module, loop_name)(config)
    finally:
        module.latest_state = original


def synthesis_inputs(folder: str, num_classes: int = 4):
    """(ObserverSet in the object store, RunFolder holding the statistics stage's outputs) for the
    synthesis stage alone: an untrained ConvNet-D2 observer of a `num_classes`-class tiny set (the
    stage's mechanics do not depend on its quality). Needs a connected Ray instance."""
    import ray

    from edc_ray.algo.candidates import Candidates
    from edc_ray.algo.condense import accumulate_statistics
    from edc_ray.config import StatisticsConfig
    from edc_ray.pipeline.common import DatasetMeta, ObserverSet, build_model, observer_payload
    from edc_ray.pipeline.statistics import save_statistics
    from edc_ray.storage.run_folder import RunFolder

    images, labels = make_tiny(num_classes=num_classes, per_class=8)
    torch.manual_seed(0)
    model = build_model("convnet_d2", DatasetMeta(num_classes, 1, 12, tuple(MEAN), tuple(STD))).eval()
    sums = accumulate_statistics(model, [(images, labels)], num_classes, StatisticsConfig(patch_size=4), MEAN, STD)
    cands = Candidates([str(i) for i in range(len(images))], labels, torch.rand(len(images), dtype=torch.float64),
                       torch.rand(len(images)), list(images))
    observers = ObserverSet(("0-convnet_d2",), ("convnet_d2",), (ray.put(observer_payload("convnet_d2", model)),))
    run = RunFolder(str(folder))
    save_statistics(run, observers.names, num_classes, [sums], cands, len(cands), 10)
    return observers, run


def synthesis_config(iterations: int = 1000):
    """A synthesis config for `synthesis_inputs`: IPC 2, one class per unit, 2 actors of half a CPU."""
    from edc_ray.config import Config, ObserverSpec, StatisticsConfig

    cfg = Config()
    cfg.observers.models = [ObserverSpec("convnet_d2")]
    cfg.statistics = StatisticsConfig(patch_size=4)
    cfg.synthesis.ipc, cfg.synthesis.classes_per_unit, cfg.synthesis.iterations = 2, 1, iterations
    cfg.ray.synthesis_actors, cfg.ray.actor_cpus = 2, 0.5
    return cfg


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (all held open together while chosen)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tiny_overrides(src: str, data_root: str, run_dir: str, evaluate: bool = True,
                   iterations: int | None = 5) -> list[str]:
    """The tiny pipeline's settings as `--set` overrides (`iterations` None: the method's own)."""
    return [
        f"data.root={data_root}", "data.source=imagefolder", f"data.src={src}", "data.shard_size=25",
        "observers.models=[{arch: convnet_d2}]", "observers.epochs=2", "observers.batch_size=16",
        "observers.crop_padding=0", "observers.flip=false",
        "init.candidates_per_class=10", "synthesis.ipc=2", "synthesis.classes_per_unit=1",
        *([f"synthesis.iterations={iterations}"] if iterations is not None else []), "evaluation.epochs=2", "evaluation.batch_size=2",
        "evaluation.eval_every=0", "evaluation.val_batch_size=16", "evaluation.seeds=[0, 1]",
        f"evaluation.students={'[convnet_d2]' if evaluate else '[]'}",
        f"evaluation.random_baseline={'true' if evaluate else 'false'}",
        "ray.synthesis_actors=2", "ray.actor_cpus=0.5", "ray.train_workers=2",
        "ray.train_worker_cpus=0.5", "ray.stats_tasks=2", f"output.run_dir={run_dir}",
    ]


def tiny_config(src: str, data_root: str, run_dir: str, evaluate: bool = True):
    """The tiny pipeline's config (an ImageFolder at `src`, prepared into `data_root` on first use)."""
    return load_config(None, tiny_overrides(src, data_root, run_dir, evaluate))
