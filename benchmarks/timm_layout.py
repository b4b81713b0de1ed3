"""Generate a dataset in the layout of the shared ImageNet WebDataset copies (timm's ``imagenet-1k-wds``).

    <root>/<name>-train-0000.tar ...       samples {__key__, jpg, cls, json}, classes interleaved
    <root>/<name>-validation-0000.tar ...
    <root>/_info.json                      timm's form: splits.<name>.{name, filenames, shard_lengths, num_samples}
    <root>/classes.txt                     one class name per line (the info names none, like the originals)

Images are JPEGs (quality 90) of random sizes, a per-class colour pattern plus noise, so observers can
learn something from them. Used by the tests and by ``stream_throughput --layout timm``.

    python -m benchmarks.timm_layout --out /tmp/tiny-wds --classes 10 --per-class 50
"""
from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image

from edc_ray.storage import fsio
from edc_ray.storage.shards import write_shard


def photo(label: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 HxWx3 image: the class's colour gradient plus noise."""
    colour = np.random.default_rng(label).random((2, 3))
    ramp = np.linspace(0, 1, width)[None, :, None]
    image = colour[0] * (1 - ramp) + colour[1] * ramp + 0.2 * rng.random((height, width, 3))
    return (np.clip(image / 1.2, 0, 1) * 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 HxWx3 image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_timm_layout(root: str, name: str = "tiny", num_classes: int = 3, per_class: dict[str, int] | None = None,
                      shards: dict[str, int] | None = None, sizes: tuple[int, int] = (20, 48), seed: int = 0
                      ) -> dict[str, list[bytes]]:
    """Write the dataset at ``root`` (a folder or URL); returns each split's JPEG bytes in file order."""
    per_class = per_class or {"train": 12, "validation": 4}
    shards = shards or {"train": 3, "validation": 2}
    rng = np.random.default_rng(seed)
    info, written = {"name": name, "splits": {}}, {}
    for split, count in per_class.items():
        labels = rng.permutation(np.repeat(np.arange(num_classes), count))  # classes interleaved across shards
        samples = []
        for i, label in enumerate(labels):
            height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            data = jpeg(photo(int(label), height, width, rng))
            samples.append({"__key__": f"{split}-{i:06d}", "jpg": data, "cls": int(label),
                            "json": json.dumps({"filename": f"n{label:08d}_{i}.JPEG", "label": int(label),
                                                "width": width, "height": height}).encode()})
        filenames, lengths = [], []
        for k, part in enumerate(np.array_split(np.arange(len(samples)), shards[split])):
            filename = f"{name}-{split}-{k:04d}.tar"
            lengths.append(write_shard(fsio.join(root, filename), [samples[j] for j in part]))
            filenames.append(filename)
        info["splits"][split] = {"name": split, "filenames": filenames, "shard_lengths": lengths,
                                 "num_samples": len(samples)}
        written[split] = [s["jpg"] for s in samples]
    fsio.atomic_write_bytes(fsio.join(root, "classes.txt"),
                            "".join(f"n{c:08d}\n" for c in range(num_classes)).encode())
    fsio.atomic_write_json(fsio.join(root, "_info.json"), info)
    return written


def main(argv: list[str] | None = None) -> None:
    """Write a timm-layout dataset of the given size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=500)
    args = parser.parse_args(argv)
    write_timm_layout(args.out, num_classes=args.classes,
                      per_class={"train": args.per_class, "validation": max(1, args.per_class // 5)},
                      shards={"train": args.shards, "validation": max(1, args.shards // 4)},
                      sizes=(args.min_size, args.max_size))


if __name__ == "__main__":
    main()
