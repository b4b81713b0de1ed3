"""Storage layer: fsspec paths (local or s3://), WebDataset shards, dataset sources and the prepare job."""

from edc_ray.storage.dataset_info import DatasetInfo, ShardList, SplitInfo, read_info, write_info
from edc_ray.storage.images import ImageFit, decode_image, encode_png
from edc_ray.storage.prepare import ensure_prepared, prepare_dataset
from edc_ray.storage.shards import ShardReadError, iter_samples, iter_split, load_split, write_shard
from edc_ray.storage.sources import SOURCES, Source, open_source

__all__ = [
    "SOURCES",
    "DatasetInfo",
    "ImageFit",
    "ShardList",
    "ShardReadError",
    "Source",
    "SplitInfo",
    "decode_image",
    "encode_png",
    "ensure_prepared",
    "iter_samples",
    "iter_split",
    "load_split",
    "open_source",
    "prepare_dataset",
    "read_info",
    "write_info",
    "write_shard",
]
