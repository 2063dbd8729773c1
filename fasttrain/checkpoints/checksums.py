"""Checksums of a checkpoint's files: a bit that changes on disk after a save is found when the save is read, as one
line naming the file, never loaded as a silently different model.

Imports from fasttrain: system.errors.

A checkpoint file (and a sharded folder's state.pt) is a torch.save zip, which records each record's CRC-32; torch.load
never compares them, `check_records` does. A sharded folder's other files are read back once written and their CRC-32
recorded in its state.pt (`of_folder`), compared at every load (`verify`). CRC-32 because it is the zip's own (free for
a file save, one kind for both formats), the standard library's fastest (docs/checkpoints.md, "Checksums"), and finds
every burst of up to 32 bits: it guards against the disk's damage, not a forger's.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

from fasttrain.system.errors import UsageError

PIECE = 1 << 24  # bytes read at a time: large enough that zlib works at full rate, small enough to keep in cache


def damaged(file: Path, detail: str, what: str = "checksum mismatch") -> UsageError:
    """The error for `file` of a checkpoint, whose bytes are no longer those saved: `what` was found (`detail`)."""
    return UsageError(f"{file}: {what}, damaged since it was saved ({detail}); use an earlier checkpoint")


def crc32(file: Path) -> int:
    """The CRC-32 of the bytes of `file`."""
    crc = 0
    with open(file, "rb") as f:
        while piece := f.read(PIECE):
            crc = zlib.crc32(piece, crc)  # zlib lets other threads run meanwhile: a background save's checksums
    return crc


def of_folder(path: Path) -> dict[str, int]:
    """The CRC-32 of every file in the written folder `path`, by name, read back from it: what landed."""
    return {file.name: crc32(file) for file in sorted(path.iterdir()) if file.is_file()}


def verify(path: Path, sums: object, only: str | None = None) -> None:
    """UsageError naming the first file of folder `path` whose CRC-32 is not the one `sums` recorded (state.pt where
    none matches); `only`: that file alone. `sums` None: an older folder, taken as it is."""
    if sums is None:
        return
    if not isinstance(sums, dict) or not all(isinstance(n, str) and isinstance(c, int) for n, c in sums.items()):
        raise damaged(path / "state.pt", "not file names with their CRC-32", what="checksums unreadable")
    for name in sums:
        if "/" in name or "\\" in name or name in ("", ".", "..") or (path / name).is_symlink():
            raise damaged(
                path / "state.pt", f"one for {name!r}, not a file of {path.name}", what="checksums unreadable"
            )
    present = {name: recorded for name, recorded in sorted(sums.items()) if (path / name).is_file()}
    for name in present if only is None else [only] if only in present else []:
        found = crc32(path / name)  # one file at a time: a sound folder's files are each read once per call
        if found == present[name]:
            continue
        others = (other for other in present if other != name)
        if len(present) > 1 and not any(crc32(path / other) == present[other] for other in others):
            raise UsageError(  # a flipped bit damages one file, not every one
                f"{path / 'state.pt'}: records checksums that none of {path.name}'s other files have: state.pt and "
                "the shards do not belong together (a state.pt copied from another save?)"
            )
        raise damaged(path / name, f"CRC-32 {found:08x}, {present[name]:08x} recorded")
    missing = sorted(set(sums) - set(present))
    if missing and only is None:
        raise damaged(
            path / "state.pt", f"one for {missing[0]!r}, not a file of {path.name}", what="checksums unreadable"
        )


def check_records(file: Path) -> None:
    """UsageError naming `file`, a torch.save zip, if a record's bytes no longer have the CRC-32 recorded for them; no
    zip is torch.load's to refuse, and a CRC of 0 is not checked (empty, or checksums off)."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError):
        return
    except Exception as e:  # a damaged index: a member's name that is not UTF-8, a field out of range, ...
        raise damaged(
            file, f"its zip index: {type(e).__name__}: {' '.join(str(e).split())[:120]}", what="unreadable"
        ) from None
    with archive:
        for record in archive.infolist():
            if record.CRC == 0:
                continue
            try:
                with archive.open(record) as f:  # zipfile compares the CRC-32 once the last piece is read
                    while f.read(PIECE):
                        pass
            except zipfile.BadZipFile as e:  # a CRC that differs, or a record's header that changed
                if str(e).startswith("Bad CRC-32"):
                    raise damaged(file, f"its record {record.filename}") from None
                raise damaged(
                    file, f"its record {record.filename}: {' '.join(str(e).split())[:120]}", what="unreadable"
                ) from None
            except Exception as e:  # shorter than its index says, or a header it cannot parse
                detail = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
                raise damaged(file, f"its record {record.filename}: {detail}", what="unreadable") from None
