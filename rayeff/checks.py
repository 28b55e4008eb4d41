"""Checks of the files and folders a command reads or writes, made before Ray starts and before anything is written.
Each failure is a one-line `UserError` naming the input and the fix (the command line prints it, exit code 2).

    text = read_text_file(path, "job file")          # exists, a file, readable, UTF-8 (a byte-order mark is fine)
    check_output_location(job.output_dir)            # a folder that exists or can be created, and is writable
    check_output_file(path, "--output", overwrite)   # a file that can be written, and that is not silently replaced

Writability is probed by creating and removing a temporary folder in the nearest existing folder: permission bits
do not tell (root ignores them) and neither do read-only or pseudo filesystems (/proc).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rayeff.errors import UserError


def path_exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:   # e.g. permission denied on a parent: treated as absent; the probe then tells why
        return False


def _no_nul(path, what: str) -> None:
    if "\x00" in str(path):
        raise UserError(f"{what}: {str(path)!r} holds a NUL character, which no path can; fix the path")


def read_text_file(path: str | Path, what: str, fix: str = "") -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped). Missing, a folder, unreadable, binary or in
    another encoding (UTF-16, Latin-1 ...) is a one-line `UserError` naming `what` and the path."""
    _no_nul(path, what)
    path = Path(path)
    if not path_exists(path):
        raise UserError(f"{path}: no such {what}{fix}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a {what}{fix}")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (a device, socket or pipe); give a {what}{fix}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err}); check its permissions") from None
    return decode_text(data, path, what)


def decode_text(data: bytes, path: str | Path, what: str) -> str:
    """UTF-8 text, a leading byte-order mark dropped; anything else (UTF-16, Latin-1, binary) a one-line error."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: the {what} is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise UserError(f"{path}: the {what} holds NUL bytes (binary, or UTF-16 without a byte-order mark); save it "
                        "as UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: the {what} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it "
                        "as UTF-8") from None


def _probe_writable(folder: Path) -> str | None:
    """None if a folder can be created (and removed again) in `folder`, else why not."""
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".rayeff-probe-"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_output_location(location: str, what: str = "output_dir", target: Path | None = None) -> None:
    """A local output folder must exist as a writable folder or be creatable (its nearest existing ancestor is a
    writable folder). Object-store URIs are checked by `rayeff.cluster.storage.Storage`. `target`: the file to be
    written in it, named in the message instead of the folder."""
    from rayeff.cluster.storage import is_uri

    if is_uri(location):
        return
    _no_nul(location, what)
    path = Path(location).expanduser().absolute()
    shown = target.absolute() if target is not None else path
    probe = path
    while not path_exists(probe) and probe != probe.parent:
        probe = probe.parent
    if probe.is_dir():   # names the folder would be created with must fit the filesystem's limits
        name_max = os.pathconf(probe, "PC_NAME_MAX")
        for part in (shown.relative_to(probe).parts if shown.is_relative_to(probe) else ()):
            if len(os.fsencode(part)) > name_max:
                raise UserError(f"{what}: {shown} cannot be created: the name {part[:40]}... is longer than the "
                                f"{name_max} bytes a file name can have there; choose a shorter name")
    if not probe.is_dir():
        where = "is a file" if probe == shown else f"cannot be created: {probe} is a file"
        raise UserError(f"{what}: {shown} {where}, not a folder; choose another location")
    why = _probe_writable(probe)
    if why is not None:
        where = "" if probe == shown else f" (in {probe})"
        raise UserError(f"{what}: {shown} cannot be written{where}: {why}; choose a writable location")


def check_output_file(path: str | Path, what: str = "--output", overwrite: bool = False,
                      flag: str = "--overwrite", parent_created: bool = False) -> Path:
    """A file that a command will write: not a folder, in a writable folder (that exists, or with
    `parent_created` can be created); an existing file is refused unless `overwrite` (so a finished benchmark is
    never silently replaced)."""
    shown = str(path)
    _no_nul(shown, what)
    path = Path(path).expanduser()
    if shown.endswith(("/", os.sep)) or path.is_dir():
        raise UserError(f"{what}: {path} is a folder; give a file name, e.g. {path / 'out.json'}")
    if not parent_created and not path.parent.is_dir():
        kind = "is a file, not a folder" if path_exists(path.parent) else "does not exist"
        raise UserError(f"{what}: folder {path.parent} {kind}; create it first or choose another location")
    if path_exists(path) and not overwrite:
        raise UserError(f"{what}: {path} already exists; pass {flag} to replace it, or choose another file")
    check_output_location(str(path.parent), what, target=path)
    return path
