"""Pretrained observers as EDC used them on ImageNet, offline: named torchvision weights from a file or
torch's hub cache, their own normalisation and validation resize, their class order."""
import pytest
import torch

from edc_ray.config import ConfigError, load_config
from edc_ray.errors import DataError
from edc_ray.models import create_model, save_weights
from edc_ray.models.external import PretrainedWeightsError
from edc_ray.models.pretrained import preprocessing
from edc_ray.pipeline.common import DatasetMeta
from edc_ray.pipeline.observers import check_pretrained_weights, observers_stage, pretrained_preprocessing
from edc_ray.pipeline.run import run_pipeline
from edc_ray.storage.dataset_info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, SplitInfo, imagenet_classes
from edc_ray.storage.run_folder import RunFolder


def imagenet_info(classes: list[str] | None = None) -> DatasetInfo:
    """An ImageNet-shaped info of images of any size, with measured pixel statistics of its own."""
    split = SplitInfo("train", 1000, ["train-0000.tar"], [1000])
    return DatasetInfo("imagenet-1k", classes or imagenet_classes(), None, 3, [0.3, 0.3, 0.3], [0.2, 0.2, 0.2],
                       {"train": split, "validation": split})


def observer_config(weights: str | None, tag: str = "IMAGENET1K_V1"):
    spec = f"{{arch: 'torchvision:resnet18', pretrained: {tag}" + (f", weights: '{weights}'}}" if weights else "}")
    return load_config(None, [f"observers.models=[{spec}]", "data.image_size=32", "data.val_split=validation"])


def test_named_weights_bring_their_preprocessing():
    pre = preprocessing("torchvision:mobilenet_v2", "IMAGENET1K_V1")
    assert (pre.mean, pre.std, pre.resize_ratio, pre.num_classes) == (IMAGENET_MEAN, IMAGENET_STD, 256 / 224, 1000)
    assert preprocessing("torchvision:efficientnet_b0", "IMAGENET1K_V1").interpolation == "bicubic"
    with pytest.raises(ConfigError, match=r"pretrained: torchvision:resnet18 has no weights 'IMAGENET1K_V9'.*V1"):
        observer_config(None, "IMAGENET1K_V9")


def test_the_observers_normalisation_replaces_the_datasets(tmp_path):
    cfg = observer_config(str(tmp_path / "w.pt"))
    pre = pretrained_preprocessing(cfg, imagenet_info())
    meta = DatasetMeta.from_info(imagenet_info(), cfg.data, pre)
    assert (meta.mean, meta.std) == (IMAGENET_MEAN, IMAGENET_STD)  # not the dataset's 0.3 / 0.2
    assert meta.fit("val").resize_ratio == pytest.approx(256 / 224) and meta.fit("val").crop == "center"


def test_a_dataset_in_another_class_order_is_refused(tmp_path):
    cfg = observer_config(str(tmp_path / "w.pt"))
    shuffled = imagenet_classes()[::-1]
    with pytest.raises(DataError, match="sorted-wnid order.*data.classes: imagenet-1k"):
        pretrained_preprocessing(cfg, imagenet_info(shuffled))
    with pytest.raises(DataError, match="1000 classes"):
        pretrained_preprocessing(cfg, imagenet_info(["cat", "dog"]))
    cfg.data.val_resize_ratio = 1.0
    with pytest.raises(ConfigError, match="data.val_resize_ratio: 1.0 differs"):
        pretrained_preprocessing(cfg, imagenet_info())


def test_a_weights_file_is_loaded_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    torch.manual_seed(0)
    saved = create_model("torchvision:resnet18", 1000)  # randomly initialised: no download
    save_weights(saved, str(tmp_path / "resnet18.pt"))
    cfg = observer_config(str(tmp_path / "resnet18.pt"))
    check_pretrained_weights(cfg)  # a weights file: nothing to fetch
    meta = DatasetMeta.from_info(imagenet_info(), cfg.data, pretrained_preprocessing(cfg, imagenet_info()))
    [(arch, model)] = observers_stage(cfg, RunFolder(str(tmp_path / "run")), meta)
    assert arch == "torchvision:resnet18"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


def test_a_missing_weights_file_is_named_before_any_work(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    cfg = observer_config(None)
    with pytest.raises(PretrainedWeightsError, match=r"fetch https://download.pytorch.org/models/"
                                                     r"resnet18-f37072fd.pth into .*empty-cache/hub/checkpoints/"
                                                     r"resnet18-f37072fd.pth"):
        check_pretrained_weights(cfg)
    cfg.data.root = str(tmp_path / "no-dataset-here")
    cfg.output.run_dir = str(tmp_path / "run")
    with pytest.raises(PretrainedWeightsError):  # not the missing dataset: the weights are checked first
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_a_timm_model_folder_brings_its_weights_and_preprocessing(tmp_path, monkeypatch):
    import timm
    from timm.models import save_for_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "models" / "test_efficientnet"
    torch.manual_seed(0)
    saved = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000)
    save_for_hf(saved, str(folder))
    arch = f"timm:local-dir:{folder}"
    pre = preprocessing(arch, True)  # from the folder's config.json: timm's test model crops at 0.95
    assert (pre.num_classes, pre.resize_ratio) == (1000, pytest.approx(1 / 0.95))
    cfg = load_config(None, [f"observers.models=[{{arch: '{arch}', pretrained: true}}]", "data.image_size=32",
                             "data.val_split=validation", f"data.val_resize_ratio={1 / 0.95}"])
    check_pretrained_weights(cfg)
    meta = DatasetMeta.from_info(imagenet_info(), cfg.data, pretrained_preprocessing(cfg, imagenet_info()))
    run = RunFolder(str(tmp_path / "run"))
    [(got_arch, model)] = observers_stage(cfg, run, meta)
    assert got_arch == arch and run.exists("observers", "0-timm_local-dir_" + str(folder).replace("/", "_") + ".pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(PretrainedWeightsError, match=f"observers.models\\[0\\]: the timm model folder {folder} "
                                                     "lacks config.json or its weights"):
        check_pretrained_weights(cfg)
    with pytest.raises(ConfigError, match=r"pretrained: .*nowhere/config.json is missing"):
        load_config(None, [f"observers.models=[{{arch: 'timm:local-dir:{tmp_path}/nowhere', pretrained: true}}]"])
