"""Sharded checkpoint folders: torch.distributed.checkpoint (DCP) on disk, written by every rank, read safely.

Imports from fasttrain: checkpoints.checksums, system.errors.

A folder `step_0000100/` holds

    .metadata             DCP's index: every tensor's shape, dtype and which file and bytes hold each piece
    __0_0.distcp, ...     the tensors, one file per rank that wrote some (each rank writes only what it holds)
    state.pt              the rest (checkpoint_files.py): run state, every rank's loader and RNG, config, scaler,
                          and the CRC-32 of each file above ("checksums"), read back once they are written

DCP reads the tensors with `torch.load(weights_only=True)`, but `.metadata` with plain `pickle.load`, which would run
any code a planted file names; here an unpickler builds only DCP's metadata classes, torch.Size and dtypes, and an index
naming anything but tensors or files outside the folder is refused, so a folder cannot run code. A load compares each
file with the CRC-32 state.pt recorded (checksums.py).
"""

from __future__ import annotations

import functools
import pickle
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from fasttrain.checkpoints import checksums
from fasttrain.system.errors import UsageError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

# torch.distributed.checkpoint (DCP) is imported by the functions that read or write a folder, not with this
# module: it brings DTensor and most of torch.distributed, about a second of every process's start, which a
# run that never touches a sharded checkpoint (most, and every command but train) need not pay.

# In a world of one DCP warns, on every save and load, that it assumes one process: so it does, by design. An
# async save warns from its background thread, after any warnings.catch_warnings() around the call has ended,
# so the filter is the process's.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

METADATA = ".metadata"
_ALLOWED = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: no other class or function can be named, so none is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(path: Path) -> Metadata:
    """The index of the checkpoint folder `path`; UsageError naming the file if it is missing, damaged, names
    anything a safe load cannot read, or points outside the folder."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    file = path / METADATA
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UsageError(f"{file}: missing, so {path.name} is not a complete checkpoint") from None
    except Exception as e:  # truncated, garbage, or naming code to run
        reason = " ".join(str(e).split("\n")[0].split())[:160]
        raise UsageError(f"{file}: not a checkpoint's metadata ({type(e).__name__}: {reason})") from None
    if not isinstance(metadata, Metadata):
        raise UsageError(f"{file}: not a checkpoint's metadata (a {type(metadata).__name__})")
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise UsageError(f"{file}: entry {key} is not a tensor; fasttrain checkpoints hold only tensors there")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        plain = isinstance(name, str) and not ("/" in name or "\\" in name or name in ("", ".", ".."))
        if not plain or getattr(info, "transform_descriptors", None):
            raise UsageError(f"{file}: names a shard {name!r} that is not a plain file of the folder")
    if metadata.storage_meta is None:
        metadata.storage_meta = StorageMeta()
    return metadata


@functools.cache
def _safe_reader() -> type:
    """DCP's file reader with the metadata read by `read_metadata` instead of pickle.load (a class made on first
    use, as DCP is imported then)."""
    import torch.distributed.checkpoint as dcp

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            metadata = read_metadata(Path(self.path))
            if metadata.storage_meta is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def check_complete(path: Path) -> None:
    """UsageError naming the file if the folder `path` lacks a shard its metadata names, or holds one shorter
    than the bytes it should hold (truncated): found before anything is loaded, on every rank alike."""
    sizes: dict[str, int] = {}
    for info in read_metadata(path).storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, needed in sorted(sizes.items()):
        file = path / name
        if not file.is_file():
            raise UsageError(f"{file}: missing, a shard of the checkpoint {path.name} (a rank's part of its state)")
        if file.stat().st_size < needed:
            raise UsageError(
                f"{file}: truncated ({file.stat().st_size} bytes, the checkpoint's metadata needs {needed})"
            )


def write(path: Path, state: dict, process_group: dist.ProcessGroup | None = None) -> None:
    """Every rank writes its part of `state` (tensors: DTensor shards, or whole ones that DCP assigns to one
    rank each) into the folder `path`; rank 0 writes .metadata last."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(path), process_group=process_group, no_dist=alone())


def write_async(
    path: Path, state: dict, process_group: dist.ProcessGroup | None = None, checksum: bool = False
) -> Future:
    """`write`, returning once `state` is in CPU memory: a future of the write (rank 0 with `checksum`: of the folder's
    checksums). `process_group`: a gloo group of its own, apart from training's collectives."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(path)  # no stager: async_save returns a Future
    written = cast(Future, dcp.async_save(state, storage_writer=writer, process_group=process_group, no_dist=alone()))
    if not checksum:
        return written

    def written_then_summed() -> dict[str, int]:
        written.result()  # raises what the write raised
        return checksums.of_folder(path)

    # Not a done-callback of `written`: one added after the write is done runs at once, on the training thread.
    summing = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-checksums")
    summed = summing.submit(written_then_summed)
    summing.shutdown(wait=False)  # its thread ends once the checksums are done
    return summed


def read_into(path: Path, state: dict) -> None:
    """Fill `state` (this rank's tensors, shaped as it holds them) from the folder `path`, in any world:
    DCP reads the pieces each tensor needs. UsageError if the folder does not hold them."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=_safe_reader()(path), no_dist=alone())
    except (Exception, dcp.api.CheckpointException) as e:
        raise UsageError(f"{path}: cannot read its shards ({one_line(e)})") from None


def read_whole(path: Path, prefix: str, what: Path) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (e.g. "model") in the folder `path`, whole, on the CPU, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path)
    tensors = {
        key[len(prefix) + 1 :]: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(item, TensorStorageMetadata)
    }
    try:
        dcp.load({prefix: tensors}, storage_reader=_safe_reader()(path), no_dist=True)
    except (Exception, dcp.api.CheckpointException) as e:
        raise UsageError(f"{what}: cannot read its shards ({one_line(e)})") from None
    return tensors


def alone() -> bool:
    """Whether this process is a world of one (no process group): DCP then reads and writes without meeting."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def one_line(error: BaseException) -> str:
    """The gist of `error` in one line: for DCP's CheckpointException, the first rank's own error."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
