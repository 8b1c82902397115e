"""MDS shards (mosaicml-streaming's format): written with streaming's ``MDSWriter`` and read with
streaming's ``StreamingDataset`` (:class:`LocalStream`).

``import streaming`` imports its vision/text dataset zoo, which needs ``transformers`` and a
torchvision that matches torch (on a CPU box the PyPI torchvision is a CUDA build that fails to
load). :func:`streaming_mds` therefore imports the needed ``streaming.base`` modules behind bare
package objects for ``streaming`` and ``streaming.base``, without running either package
``__init__``; the full package is used as is when it is imported already.

:class:`LocalStream` opens one shard directory as a ``StreamingDataset`` for one data-parallel
reader. Streaming's world is set to the DP view while it is built (``RANK`` = DP rank,
``WORLD_SIZE`` = DP size, ``LOCAL_RANK`` = 0, ``LOCAL_WORLD_SIZE`` = 1: every reader is the only
rank of its own streaming "node", so readers share no shared memory) and ``torch.distributed``
is reported unavailable, so that ``StreamingDataset.__init__`` neither calls the global
``barrier()`` (only one rank per DP replica reads; the others would never join it) nor starts a
process group of its own (``maybe_init_dist`` would, for ``WORLD_SIZE`` > 1, if only
``is_initialized`` were reported False). Registration of the shared-memory prefix, which
streaming otherwise orders with that barrier, is serialized between the readers of a machine
by a file lock. Each ``LocalStream`` removes its own shared memory (and lock files, and its
cache directory, if any) in :meth:`LocalStream.close`, at garbage collection or at exit.

Our shards store local codes (text BPE ids, image/audio codebook indices) as
``ndarray:<dtype>`` columns; the loader maps them into the shared vocabulary.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import types
import weakref
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "index.json"
MANIFEST = "manifest.json"
VAL_DIR = "val"  # a stream's held-out split: a stream of its own inside the stream directory
HASH = "xxh64"  # content hash of every shard file, recorded in index.json and the manifest
_MODULES = (
    "format.mds.writer",
    "format.mds.reader",
    "format.mds.encodings",
    "compression",
    "constant",
    "dataset",
    "hashing",
    "stream",
    "world",
    "batching",
    "shared",
    "shared.prefix",
    "util",
)


class ShardError(RuntimeError):
    """A missing, truncated or malformed shard / sample; the message names it."""


class SampleError(ShardError):
    """One sample that cannot be decoded or is not a valid row; the message names stream, shard
    file and sample index (``data.on_bad_sample`` decides whether training skips it)."""


@cache
def streaming_mds() -> types.SimpleNamespace:
    """The parts of mosaicml-streaming that megadiff uses (writer, reader, StreamingDataset...)."""
    if "streaming" in sys.modules:
        mods = {n: importlib.import_module(f"streaming.base.{n}") for n in _MODULES}
    else:
        spec = importlib.util.find_spec("streaming")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "mosaicml-streaming is not installed: pip install --no-deps "
                "mosaicml-streaming==0.13.0 (see docs/data.md for its few real dependencies)"
            )
        root = next(iter(spec.submodule_search_locations))
        shims = {}
        for name, sub in (("streaming", ""), ("streaming.base", "/base")):
            m = types.ModuleType(name)
            m.__path__ = [root + sub]
            m.__package__ = name
            shims[name] = sys.modules[name] = m
        try:
            mods = {n: importlib.import_module(f"streaming.base.{n}") for n in _MODULES}
        finally:
            for name, m in shims.items():  # a later `import streaming` runs the real __init__
                if sys.modules.get(name) is m:
                    del sys.modules[name]
    return types.SimpleNamespace(
        MDSWriter=mods["format.mds.writer"].MDSWriter,
        MDSReader=mods["format.mds.reader"].MDSReader,
        mds_decode=mods["format.mds.encodings"].mds_decode,
        decompress=mods["compression"].decompress,
        get_hash=mods["hashing"].get_hash,
        StreamingDataset=mods["dataset"].StreamingDataset,
        Stream=mods["stream"].Stream,
        World=mods["world"].World,
        generate_work=mods["batching"].generate_work,
        SharedMemory=mods["shared"].SharedMemory,
        shm_name=mods["shared.prefix"]._get_path,
        SHM_TO_CLEAN=list(mods["constant"].SHM_TO_CLEAN),
        FILELOCKS=[mods["constant"].BARRIER_FILELOCK, mods["constant"].CACHE_FILELOCK],
        clean_stale_shared_memory=mods["util"].clean_stale_shared_memory,
    )


def mds_writer(
    out: str | Path,
    columns: dict[str, str],
    compression: str | None = None,
    size_limit: int = 1 << 26,
):
    """An ``MDSWriter`` on a local directory (use as a context manager); it records each shard
    file's :data:`HASH` in ``index.json``."""
    return streaming_mds().MDSWriter(
        out=str(out),
        columns=columns,
        compression=compression,
        size_limit=size_limit,
        hashes=[HASH],
    )


def read_index(path: str | Path, name: str = "") -> list[dict]:
    """The validated shard list of ``path/index.json`` (version 2, MDS shards only)."""
    root = Path(path)
    name = name or root.name
    index = root / INDEX
    redo = "re-run `megadiff preprocess` for this stream"
    if not index.is_file():
        raise ShardError(
            f"stream '{name}': no {INDEX} in '{root}' (not an MDS shard directory; "
            "create one with `megadiff preprocess`)"
        )
    try:
        meta = json.loads(index.read_text())
        infos = meta["shards"]
        version = meta.get("version")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"stream '{name}': '{index}' is corrupt ({e!r}); {redo}") from e
    if version != 2 or not isinstance(infos, list):
        raise ShardError(f"stream '{name}': '{index}' has unsupported version {version!r}; {redo}")
    for k, info in enumerate(infos):
        if not isinstance(info, dict) or info.get("format") != "mds":
            got = info.get("format") if isinstance(info, dict) else info
            raise ShardError(f"stream '{name}': shard {k} in '{index}' is not MDS ({got}); {redo}")
        try:
            _shard_file(root, info)
            int(info["samples"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(
                f"stream '{name}': shard {k} in '{index}' lacks {e} (corrupt index); {redo}"
            ) from e
    return infos


def read_manifest(path: str | Path, name: str = "") -> dict:
    """``path/manifest.json`` (written by ``megadiff preprocess``), ``{}`` when absent."""
    mp = Path(path) / MANIFEST
    if not mp.is_file():
        return {}
    try:
        tree = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(
            f"stream '{name or Path(path).name}': '{mp}' is not valid JSON ({e}); "
            "re-run `megadiff preprocess`"
        ) from e
    if not isinstance(tree, dict):
        raise ShardError(f"stream '{name or Path(path).name}': '{mp}' is not a JSON object")
    return tree


def _shard_file(root: Path, info: dict) -> tuple[Path, int]:
    """The file of a shard as stored (compressed or raw) and its size per the index."""
    data = info.get("zip_data") or info["raw_data"]
    return root / data["basename"], int(data["bytes"])


def shard_records(infos: list[dict]) -> list[dict]:
    """The manifest's record of each shard file as stored: name, bytes, samples and hash."""
    out = []
    for info in infos:
        data = info.get("zip_data") or info["raw_data"]
        rec = {"file": data["basename"], "bytes": int(data["bytes"]), "samples": info["samples"]}
        rec.update((data.get("hashes") or {}).items())
        out.append(rec)
    return out


def file_hash(path: Path, algo: str = HASH) -> str:
    """The content hash of one file (reads the whole file)."""
    return streaming_mds().get_hash(algo, path.read_bytes())


def check_shard_file(root: Path, info: dict, name: str = "") -> None:
    """Stat check: the shard file exists with the size ``index.json`` records."""
    path, want = _shard_file(root, info)
    stream = f"stream '{name or root.name}': "
    if not path.is_file():
        raise ShardError(
            f"{stream}shard '{path}' is missing (listed in {root / INDEX}); restore it or re-run "
            "`megadiff preprocess`"
        )
    size = path.stat().st_size
    if size != want:
        raise ShardError(
            f"{stream}shard '{path}' is truncated or altered: {size} bytes, index says {want}; "
            "restore it or re-run `megadiff preprocess`"
        )


_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _reader_world(dp_rank: int, dp_size: int) -> Iterator[None]:
    """Streaming sees this process as DP rank ``dp_rank`` of ``dp_size`` readers, each the only
    rank of its node, and no ``torch.distributed`` (see the module docstring)."""
    import torch.distributed as dist
    from filelock import FileLock

    old_env = {k: os.environ.get(k) for k in _ENV}
    old_avail = dist.is_available
    lock = FileLock(os.path.join(tempfile.gettempdir(), "megadiff-streaming-prefix.lock"))
    with lock:
        os.environ.update(
            RANK=str(dp_rank), WORLD_SIZE=str(dp_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1"
        )
        dist.is_available = lambda: False
        try:
            yield
        finally:
            dist.is_available = old_avail
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _release(wrappers: list, prefix: int, cache_dir: str | None) -> None:
    """Unlink the shared memory this reader created, its lock files and its cache directory."""
    for w in wrappers:
        atexit.unregister(w.cleanup)
        w.cleanup()
    api = streaming_mds()
    for lock in api.FILELOCKS:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(tempfile.gettempdir(), api.shm_name(prefix, lock)))
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)


class LocalStream:
    """One local MDS directory read through streaming's ``StreamingDataset`` by one DP reader.

    ``dataset[i]`` reads sample ``i`` (global index, shards in index order); :meth:`epoch_ids`
    gives the sample ids that streaming's partition (``relaxed``, one canonical node per DP
    rank) and shuffle (``py1e`` with ``shuffle_seed``; seed + epoch per epoch) assign to this DP
    rank for an epoch. Uncompressed shards are read in place (``local`` = the directory,
    ``remote=None``); compressed ones are decompressed by streaming into a cache directory of
    this reader's own (``remote`` = the directory), removed on :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        name: str = "",
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = False,
        shuffle_seed: int = 0,
        cache_root: str | None = None,
    ):
        api = streaming_mds()
        self.root = Path(path)
        self.name = name or self.root.name
        self.infos = read_index(self.root, self.name)
        for info in self.infos:
            check_shard_file(self.root, info, self.name)
        self.num_samples = sum(int(i["samples"]) for i in self.infos)
        self.shard_paths = [str(_shard_file(self.root, i)[0]) for i in self.infos]
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._checked: set[int] = set()
        self._epoch: tuple[int, np.ndarray] | None = None
        self.cache_dir = None
        if self.num_samples == 0:  # streaming refuses empty streams; callers report it
            self.dataset = None
            return
        if any(i.get("zip_data") for i in self.infos):
            self.cache_dir = tempfile.mkdtemp(prefix=f"megadiff-{self.name}-", dir=cache_root)
            stream = api.Stream(remote=str(self.root.absolute()), local=self.cache_dir)
        else:
            stream = api.Stream(remote=None, local=str(self.root.absolute()))
        kw = dict(
            streams=[stream],
            shuffle=shuffle,
            shuffle_algo="py1e",
            shuffle_seed=shuffle_seed,
            num_canonical_nodes=dp_size,
            shuffle_block_size=max(4_000_000 // dp_size, 1 << 18),  # streaming's default
            partition_algo="relaxed",
            batch_size=1,
        )
        for attempt in range(20):  # another (non-megadiff) streaming user may race for a prefix
            try:
                with _reader_world(dp_rank, dp_size):
                    self.dataset = api.StreamingDataset(**kw)
                break
            except FileExistsError:
                if attempt == 19:
                    raise
                time.sleep(0.05)
        ds = self.dataset
        self.world = ds._parallel_rank_world
        self.shm_prefix = ds._shm_prefix_int
        wrappers = [ds._locals_shm]
        for obj in vars(ds).values():  # SharedArray / SharedScalar / SharedBarrier
            for arr in (obj, getattr(obj, "arr", None), getattr(obj, "_arr", None)):
                if isinstance(getattr(arr, "shm", None), api.SharedMemory):
                    wrappers.append(arr.shm)
        self._finalizer = weakref.finalize(
            self, _release, wrappers, self.shm_prefix, self.cache_dir
        )

    def __len__(self) -> int:
        return self.num_samples

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """This DP rank's sample ids for ``epoch``, in reading order (cached per epoch)."""
        if self._epoch is None or self._epoch[0] != epoch:
            w = self.world
            work = streaming_mds().generate_work("random", self.dataset, w, epoch, 0)
            ids = work[w.node, w.rank_of_node, w.worker_of_rank].reshape(-1)
            self._epoch = (epoch, ids[ids >= 0].astype(np.int64))
        return self._epoch[1]

    def locate(self, i: int) -> tuple[str, int]:
        """(shard file, index in shard) of sample ``i``."""
        shard, j = self.dataset.spanner[i]
        return self.shard_paths[shard], int(j)

    def read(self, i: int) -> tuple[dict[str, Any], int, int]:
        """Sample ``i`` (read by ``StreamingDataset``), its shard number and index in the shard;
        a shard is stat-checked against the index on its first read (files may change after
        the stream was opened) and again when a sample fails to decode. A sample that cannot be
        decoded from an unchanged file raises :class:`SampleError`."""
        if self.dataset is None:
            raise IndexError(f"stream '{self.name}' is empty")
        shard, j = self.dataset.spanner[i]
        if shard not in self._checked:
            check_shard_file(self.root, self.infos[shard], self.name)
            self._checked.add(shard)
        try:
            sample = self.dataset[i]
        except Exception as e:  # noqa: BLE001 - any decode failure of this one sample
            check_shard_file(self.root, self.infos[shard], self.name)  # a changed file: fatal
            raise SampleError(
                f"{self.where(shard, j)}: cannot be decoded ({type(e).__name__}: {e})"
            ) from e
        return sample, shard, j

    def where(self, shard: int, j: int) -> str:
        """How messages name sample ``j`` of shard number ``shard``."""
        return f"stream '{self.name}' shard '{self.shard_paths[shard]}' sample {j}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.read(int(i))[0]

    def close(self) -> None:
        """Release streaming's shared memory, lock files and cache (also done at GC / exit)."""
        if self.dataset is not None:
            self._finalizer()

    def __enter__(self) -> LocalStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
