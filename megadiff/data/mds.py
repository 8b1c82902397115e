"""MDS shards (mosaicml-streaming's format): writing with streaming's ``MDSWriter`` and fast,
validated random access with numpy memory maps.

``import streaming`` imports its vision/text dataset zoo, which needs ``transformers`` and a
torchvision that matches torch (on a CPU box the PyPI torchvision is a CUDA build that fails to
load). :func:`streaming_mds` therefore imports only the MDS writer/reader modules, without running
the package ``__init__``; the full package is used as is when it is importable already.

Our shards store local codes (text BPE ids, image/audio codebook indices) as
``ndarray:<dtype>`` columns; the loader maps them into the shared vocabulary.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import mmap
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "index.json"
MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """A missing, truncated or malformed shard / sample; the message names it."""


@cache
def streaming_mds() -> types.SimpleNamespace:
    """``MDSWriter``, ``MDSReader``, ``mds_decode`` and ``decompress`` from mosaicml-streaming."""
    if "streaming" not in sys.modules:
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
            mods = [
                importlib.import_module(f"streaming.base.{n}")
                for n in ("format.mds.writer", "format.mds.reader", "format.mds.encodings")
            ]
            comp = importlib.import_module("streaming.base.compression")
        finally:
            for name, m in shims.items():  # a later `import streaming` runs the real __init__
                if sys.modules.get(name) is m:
                    del sys.modules[name]
    else:
        mods = [
            importlib.import_module(f"streaming.base.{n}")
            for n in ("format.mds.writer", "format.mds.reader", "format.mds.encodings")
        ]
        comp = importlib.import_module("streaming.base.compression")
    return types.SimpleNamespace(
        MDSWriter=mods[0].MDSWriter,
        MDSReader=mods[1].MDSReader,
        mds_decode=mods[2].mds_decode,
        decompress=comp.decompress,
    )


def mds_writer(
    out: str | Path,
    columns: dict[str, str],
    compression: str | None = None,
    size_limit: int = 1 << 26,
):
    """An ``MDSWriter`` on a local directory (use as a context manager)."""
    return streaming_mds().MDSWriter(
        out=str(out), columns=columns, compression=compression, size_limit=size_limit
    )


_SHAPE_DT = (np.uint8, np.uint16, np.uint32, np.uint64)


@cache
def _parse_encoding(enc: str) -> tuple:
    parts = enc.split(":")
    if parts[0] == "ndarray" and len(parts) >= 2:
        shape = tuple(int(x) for x in parts[2].split(",")) if len(parts) == 3 else None
        return ("ndarray", np.dtype(parts[1]), shape)
    return (parts[0], None, None)


class Shard:
    """One MDS shard file, memory-mapped on first use and checked against ``index.json``."""

    def __init__(self, root: Path, info: dict, idx: int):
        self.root, self.idx = root, idx
        self.info = info
        raw = info["raw_data"]
        zipped = info.get("zip_data")
        self.path = root / (zipped or raw)["basename"]
        self.raw_bytes = int(raw["bytes"])
        self.num_samples = int(info["samples"])
        self.compression = info.get("compression")
        self.names: list[str] = info["column_names"]
        self.encodings: list[str] = info["column_encodings"]
        self.sizes: list[int | None] = info["column_sizes"]
        self._buf: np.ndarray | None = None
        self._off: list[int] = []

    def _open(self) -> np.ndarray:
        where = f"shard '{self.path}'"
        if not self.path.is_file():
            raise ShardError(f"{where} is missing (listed in {self.root / INDEX})")
        if self.compression:
            data = streaming_mds().decompress(self.compression, self.path.read_bytes())
            buf = np.frombuffer(data, np.uint8)
        else:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size != self.raw_bytes:
                    raise ShardError(
                        f"{where} is truncated or altered: {size} bytes, index says "
                        f"{self.raw_bytes}"
                    )
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            buf = np.frombuffer(mm, np.uint8)
        if len(buf) != self.raw_bytes:
            raise ShardError(f"{where}: {len(buf)} bytes, index says {self.raw_bytes}")
        n = int(buf[:4].view(np.uint32)[0])
        if n != self.num_samples:
            raise ShardError(f"{where} holds {n} samples, index says {self.num_samples}")
        off = buf[4 : 4 + 4 * (n + 1)].view(np.uint32).astype(np.int64)
        if off[-1] != len(buf) or np.any(np.diff(off) < 0):
            raise ShardError(f"{where} has a corrupt offset table")
        self._buf, self._off = buf, off.tolist()
        return buf

    def raw(self, i: int) -> np.ndarray:
        buf = self._buf if self._buf is not None else self._open()
        return buf[self._off[i] : self._off[i + 1]]

    def get(self, i: int) -> dict[str, Any]:
        """Decode sample ``i`` (local index) into a dict of numpy arrays / python values."""
        data = self.raw(i)
        pos = 0
        sizes = []
        for s in self.sizes:
            if s:
                sizes.append(s)
            else:
                sizes.append(int(data[pos : pos + 4].view(np.uint32)[0]))
                pos += 4
        out: dict[str, Any] = {}
        for name, enc, size in zip(self.names, self.encodings, sizes):
            blob = data[pos : pos + size]
            pos += size
            out[name] = self._decode(enc, blob, i, name)
        if pos != len(data):
            raise ShardError(f"shard '{self.path}' sample {i}: {len(data) - pos} stray bytes")
        return out

    def _decode(self, enc: str, blob: np.ndarray, i: int, name: str) -> Any:
        parts = _parse_encoding(enc)
        if parts[0] == "ndarray":
            dtype = parts[1]
            if parts[2] is not None:
                shape = parts[2]
                vals = blob
            else:
                b = int(blob[0])
                ndim, sdt = b >> 2, _SHAPE_DT[b & 3]
                nb = ndim * np.dtype(sdt).itemsize
                shape = tuple(int(x) for x in blob[1 : 1 + nb].view(sdt))
                vals = blob[1 + nb :]
            if len(vals) != math.prod(shape) * dtype.itemsize:
                raise ShardError(
                    f"shard '{self.path}' sample {i} column '{name}': {len(vals)} bytes do not "
                    f"hold shape {shape} of {dtype}"
                )
            return vals.view(dtype).reshape(shape)
        return streaming_mds().mds_decode(enc, blob.tobytes())


class ShardSet:
    """All shards of one MDS directory, addressed by a global sample index."""

    def __init__(self, path: str | Path, name: str = ""):
        self.root = Path(path)
        self.name = name or self.root.name
        index = self.root / INDEX
        if not index.is_file():
            raise ShardError(
                f"stream '{self.name}': no {INDEX} in '{self.root}' (not an MDS shard directory; "
                "create one with `megadiff preprocess`)"
            )
        try:
            meta = json.loads(index.read_text())
            infos = meta["shards"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"stream '{self.name}': '{index}' is corrupt ({e})") from e
        if meta.get("version") != 2:
            raise ShardError(f"stream '{self.name}': '{index}' has unsupported version")
        self.shards = []
        for k, info in enumerate(infos):
            if info.get("format") != "mds":
                raise ShardError(
                    f"stream '{self.name}': shard {k} is not MDS ({info.get('format')})"
                )
            self.shards.append(Shard(self.root, info, k))
        counts = np.array([s.num_samples for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self.starts[-1])
        mp = self.root / MANIFEST
        self.manifest: dict = json.loads(mp.read_text()) if mp.is_file() else {}

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, i: int) -> tuple[Shard, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[k], i - int(self.starts[k])

    def get(self, i: int) -> dict[str, Any]:
        shard, j = self.locate(i)
        return shard.get(j)

    def check_files(self) -> None:
        """Cheap up-front check (stat only): every shard exists with the size in the index."""
        for s in self.shards:
            if not s.path.is_file():
                raise ShardError(f"shard '{s.path}' is missing (listed in {self.root / INDEX})")
            size = s.path.stat().st_size
            want = s.info["zip_data"]["bytes"] if s.compression else s.raw_bytes
            if size != want:
                raise ShardError(
                    f"shard '{s.path}' is truncated or altered: {size} bytes, index says {want}"
                )

    def verify(self) -> None:
        """Open every shard (size, sample count, offsets): raise on the first bad one."""
        for s in self.shards:
            s._open()
