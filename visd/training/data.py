"""Training data: a preprocessing cache, the augmented dataset, the collate and the per-epoch loader.

Each scan is preprocessed once (:func:`visd.data.load_case`: reorientation, resampling, HU window,
organ crop) and cached on disk as ``<cache>/<key[:2]>/<key>.npz``; the key hashes the input paths,
their modification times and sizes, the model's preprocessing spec, organ list and label mapping,
so a changed file or spec is preprocessed again. Cache files are written atomically (temporary
file, fsync, ``os.replace``), so concurrent workers and processes can share one cache.

Dataset items are addressed by ``(epoch, index)``: the augmentation generator is derived from
``(seed, epoch, index, view)`` (:func:`visd.training.augment.view_rng`), so batches are the same
whichever process or worker loads them, and a resumed run sees the same crops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from visd._io import atomic_path
from visd.config import ViSDConfig
from visd.errors import InputError
from visd.training.augment import augment, view_rng
from visd.training.manifest import ManifestRecord

__all__ = ["PreprocessCache", "CTReportDataset", "Batch", "Collate", "epoch_batches", "make_loader"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1


def _fingerprint(path: str) -> list[Any]:
    """Path, modification time and size of a file, or of every file under a folder (a DICOM series)."""
    p = Path(path)
    if p.is_dir():
        entries = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                entries.append([os.path.relpath(os.path.join(root, name), p), st.st_mtime_ns, st.st_size])
        return [str(p.resolve()), entries]
    try:
        st = p.stat()
    except OSError as e:
        raise InputError(f"cannot read training scan {path}: {e}. Check the manifest paths.") from e
    return [str(p.resolve()), st.st_mtime_ns, st.st_size]


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


class PreprocessCache:
    """Preprocessed scans on disk, computed on first use.

    Args:
        folder: cache folder (created when needed).
        config: the model config; its ``preprocess`` spec, ``organs`` and ``totalsegmentator_map``
            are part of the key.
        mask_format: passed to :func:`visd.data.load_case`.
        dtype: ``"float32"`` (exact) or ``"float16"`` (half the size) for the cached image.
    """

    def __init__(self, folder: str | Path, config: ViSDConfig, mask_format: str = "auto", dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise InputError(f"cache dtype {dtype!r} is not 'float32' or 'float16'")
        self.folder = Path(folder)
        self.config = config
        self.mask_format = mask_format
        self.dtype = dtype
        self._spec = {
            "version": _CACHE_VERSION,
            "preprocess": config.preprocess.model_dump(mode="json"),
            "organs": list(config.organs),
            "totalsegmentator_map": {k: list(v) for k, v in config.totalsegmentator_map.items()},
            "mask_format": mask_format,
            "dtype": dtype,
        }

    def key(self, record: ManifestRecord) -> str:
        """Hex SHA-256 of the inputs' fingerprints and the preprocessing spec."""
        blob = json.dumps({**self._spec, "image": _fingerprint(record.image), "mask": _fingerprint(record.mask)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, record: ManifestRecord) -> Path:
        key = self.key(record)
        return self.folder / key[:2] / f"{key}.npz"

    def load(self, record: ManifestRecord) -> tuple[np.ndarray, np.ndarray]:
        """``(image (D, H, W) float32 in [0, 1], mask (D, H, W) uint8)`` of a record, from the cache or computed."""
        path = self.path(record)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    return data["image"].astype(np.float32, copy=False), data["mask"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                logger.warning("cache file %s is unreadable (%s); preprocessing %s again", path, e, record.id)
        from visd.data import load_case

        case = load_case(record.image, record.mask, self.config, mask_format=self.mask_format)
        image = case.image.astype(self.dtype, copy=False)
        mask = case.mask.astype(np.uint8, copy=False)
        _atomic_savez(path, image=image, mask=mask)
        logger.debug("cached %s -> %s", record.id, path)
        return image.astype(np.float32, copy=False), mask


class CTReportDataset(Dataset):
    """Augmented crops of the manifest's scans, indexed by ``(epoch, index)``.

    Each item: ``index``; ``image`` ``(V, 1, D, H, W)`` float32 and ``mask`` ``(V, 1, D, H, W)``
    uint8 for ``V = views`` augmented views (``(D, H, W)`` = the model's ROI); ``texts`` (one per
    organ) and ``abnormal`` ``(O,)`` bool.
    """

    def __init__(
        self,
        records: Sequence[ManifestRecord],
        cache: PreprocessCache,
        *,
        seed: int,
        views: int = 1,
        flip_prob: float = 0.2,
    ) -> None:
        if views < 1:
            raise InputError(f"views must be >= 1, got {views}")
        self.records = list(records)
        self.cache = cache
        self.seed = seed
        self.views = views
        self.flip_prob = flip_prob
        self.roi = tuple(cache.config.preprocess.roi)
        self.pad_value = float(cache.config.preprocess.pad_value)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        record = self.records[index]
        image, mask = self.cache.load(record)
        images, masks = [], []
        for view in range(self.views):
            rng = view_rng(self.seed, epoch, index, view)
            img, msk = augment(image, mask, self.roi, rng, self.flip_prob, self.pad_value)  # type: ignore[arg-type]
            images.append(torch.from_numpy(img))
            masks.append(torch.from_numpy(msk))
        return {
            "index": index,
            "image": torch.stack(images)[:, None],
            "mask": torch.stack(masks)[:, None],
            "texts": record.texts,
            "abnormal": torch.tensor(record.abnormal, dtype=torch.bool),
        }


@dataclass
class Batch:
    """A collated training batch (``B`` scans, ``O`` organs).

    Attributes:
        indices: ``(B,)`` manifest row of each scan.
        image, mask: ``(B, 1, D, H, W)`` view 1, float32 in [0, 1] and uint8 organ labels.
        abnormal: ``(B, O)`` bool.
        texts: ``B`` lists of ``O`` report texts.
        input_ids, attention_mask: ``(B * O, L)`` the texts tokenised, row ``b * O + o``
            (None when the stage needs no text).
        image2, mask2: view 2 (disease objective), else None.
    """

    indices: torch.Tensor
    image: torch.Tensor
    mask: torch.Tensor
    abnormal: torch.Tensor
    texts: list[list[str]]
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    image2: torch.Tensor | None = None
    mask2: torch.Tensor | None = None

    def _map(self, fn) -> "Batch":
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


class Collate:
    """Stack samples into a :class:`Batch` and tokenise their texts (``tokenizer`` None: no text)."""

    def __init__(self, tokenizer: Any = None, max_length: int = 384) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[dict[str, Any]]) -> Batch:
        images = torch.stack([s["image"] for s in samples])  # (B, V, 1, D, H, W)
        masks = torch.stack([s["mask"] for s in samples])
        texts = [list(s["texts"]) for s in samples]
        batch = Batch(
            indices=torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            image=images[:, 0].contiguous(),
            mask=masks[:, 0].contiguous(),
            abnormal=torch.stack([s["abnormal"] for s in samples]),
            texts=texts,
        )
        if images.shape[1] > 1:
            batch.image2, batch.mask2 = images[:, 1].contiguous(), masks[:, 1].contiguous()
        if self.tokenizer is not None:
            flat = [t for row in texts for t in row]
            enc = self.tokenizer(flat, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
            batch.input_ids, batch.attention_mask = enc["input_ids"], enc["attention_mask"]
        return batch


def epoch_batches(
    dataset: Dataset, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[list[tuple[int, int]]]:
    """This process's batches of one epoch as lists of ``(epoch, index)`` keys.

    The order is :class:`torch.utils.data.DistributedSampler`'s (shuffled with ``seed + epoch``,
    rank ``r`` takes every ``world_size``-th index); a last partial batch is dropped so every
    process runs the same number of steps.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [[(epoch, i) for i in order[s : s + batch_size]] for s in range(0, len(order) - batch_size + 1, batch_size)]


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset,
    batches: Sequence[Sequence[tuple[int, int]]],
    collate: Collate,
    *,
    num_workers: int,
    pin_memory: bool,
    seed: int,
) -> DataLoader:
    """A DataLoader over the given batches. Its own generator keeps the global torch RNG untouched."""
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_sampler=[list(b) for b in batches],
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=_worker_init if num_workers else None,
    )
