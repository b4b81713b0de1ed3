"""Storage layer: fsspec paths (local or s3://), WebDataset shards, dataset sources and the prepare job."""

from edc_ray.storage.prepare import ensure_prepared, prepare_dataset
from edc_ray.storage.shards import (
    DatasetInfo,
    ShardReadError,
    SplitInfo,
    decode_image,
    encode_png,
    iter_samples,
    iter_split,
    load_split,
    read_info,
    shard_urls,
    write_info,
    write_shard,
)
from edc_ray.storage.sources import SOURCES, Source, open_source

__all__ = [
    "SOURCES",
    "DatasetInfo",
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
    "shard_urls",
    "write_info",
    "write_shard",
]
