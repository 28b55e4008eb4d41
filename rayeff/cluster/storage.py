"""Where a run keeps its files (`output_dir`): a local folder, a shared filesystem path, or an object-store URI
(`s3://bucket/runs/x`, `gs://bucket/runs/x`, anything `pyarrow.fs` opens). Ray Train writes checkpoints there
itself (its storage_path); the driver writes job.yaml, result.json and the final weights through the same pyarrow
filesystem. Object-store options come from the environment as their SDKs read it (AWS_ENDPOINT_URL, AWS_REGION,
credentials), so a location is one plain URI that joins cleanly.

On a multi-node cluster every worker writes checkpoints, so a folder on the driver's own disk would scatter them:
`check_shared` rejects a local path there unless it lies on a network filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from rayeff.errors import UserError

# Filesystem types (as /proc/mounts names them) that every node of a cluster can mount at the same path.
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "cephfs", "glusterfs",
                      "beegfs", "9p", "virtiofs", "fuse.gcsfuse", "fuse.s3fs", "fuse.juicefs", "fuse.sshfs",
                      "fuse.mountpoint-s3", "efs", "wekafs")


def rayeff_cache_dir() -> Path:
    """This machine's rayeff state: the tokenised-data cache and the output-folder locks (RAYEFF_CACHE)."""
    return Path(os.environ.get("RAYEFF_CACHE", Path.home() / ".cache" / "rayeff"))


@contextlib.contextmanager
def output_lock(location: str, what: str = "run") -> Iterator[None]:
    """Holds a local output folder for one rayeff command at a time on this machine: a second run or sweep on it is
    refused with one line. The lock is the operating system's (flock, through `filelock`) on a file named after the
    folder's path in rayeff's cache folder, so nothing is written to the output folder before the run writes it,
    and a command that crashes or is killed leaves it free. An object-store location is not locked."""
    if is_uri(location):
        yield
        return
    import hashlib

    from filelock import FileLock, Timeout

    locks = rayeff_cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(Path(location).resolve()).encode()).hexdigest()[:24]
    lock = FileLock(str(locks / f"{key}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"output_dir: {location} is in use by another rayeff {what} running now; wait for it to end, "
                        "or choose another --output") from None
    try:
        yield
    finally:
        lock.release()


def is_uri(location: str) -> bool:
    return "://" in location


def location_name(location: str) -> str:
    """The last part of a folder or URI: the name a run or sweep goes by in metrics and logs."""
    return location.rstrip("/").rsplit("/", 1)[-1]


def absolute(location: str) -> str:
    """A URI as it is; a local path expanded and made absolute."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_text(data: dict) -> str:
    """How rayeff writes its JSON files: indented, numpy scalars and the like as floats."""
    return json.dumps(data, indent=2, default=float)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json_text(data))


class Storage:
    """One output location and the pyarrow filesystem behind it."""

    def __init__(self, location: str):
        import pyarrow.fs

        if is_uri(location):
            if "?" in location:
                raise UserError(f"output_dir {location}: give object-store options in the environment (e.g. "
                                "AWS_ENDPOINT_URL), not in the URI")
            self.location = location.rstrip("/")
            try:
                self.fs, self.root = pyarrow.fs.FileSystem.from_uri(self.location)
            except (pyarrow.lib.ArrowInvalid, OSError) as err:
                raise UserError(f"output_dir {location}: pyarrow cannot open it ({err}); use a local or shared "
                                "path, or an s3:// or gs:// URI") from None
        else:
            self.location = absolute(location)
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), self.location

    @property
    def local(self) -> bool:
        return not is_uri(self.location)

    def child(self, *parts: str) -> str:
        """The location of a file or folder inside this one (an output_dir for a sweep's trial, say)."""
        return "/".join([self.location, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs

        try:
            return self.fs.get_file_info(self._path(*parts)).type != pyarrow.fs.FileType.NotFound
        except OSError as err:
            raise UserError(f"output_dir {self.location}: cannot read it ({err}); check the URI and credentials"
                            ) from None

    def names(self, *parts: str) -> list[str]:
        """Names of the entries directly inside a folder (none if it does not exist)."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self._path(*parts), allow_not_found=True)
        return sorted(Path(info.path).name for info in self.fs.get_file_info(selector))

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self._path(name)) as stream:
            return stream.read().decode()

    def download(self, name: str, local_file: Path) -> None:
        import pyarrow.fs

        pyarrow.fs.copy_files(self._path(name), str(local_file), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())

    def make(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def write_text(self, name: str, text: str) -> None:
        """Whole or not at all: a local file is renamed into place; an object store shows an object only once
        its upload completes."""
        if self.local:
            write_text_atomic(Path(self.root) / name, text)
            return
        with self.fs.open_output_stream(self._path(name)) as out:
            out.write(text.encode())

    def write_json(self, name: str, data: dict) -> None:
        self.write_text(name, json_text(data))

    def upload(self, local_file: Path, name: str) -> None:
        """Copy a local file to `name` (a path inside this location), as atomically as `write_text`."""
        import pyarrow.fs

        target = self._path(name)
        self.fs.create_dir(target.rpartition("/")[0], recursive=True)
        if self.local:
            tmp = Path(target).with_name(f".{Path(target).name}.tmp{os.getpid()}")
            pyarrow.fs.copy_files(str(local_file), str(tmp))
            os.replace(tmp, target)
            return
        pyarrow.fs.copy_files(str(local_file), target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)


def filesystem_type(path: str) -> str:
    """The type of the filesystem that holds `path` (or its nearest existing parent), from /proc/mounts."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    probe = probe.resolve()
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            mount = fields[1].replace("\\040", " ")
            if (probe == Path(mount) or Path(mount) in probe.parents) and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def check_shared(location: str, what: str = "output_dir") -> None:
    """On a Ray cluster of several nodes, refuse a location that only this node can see."""
    import ray

    if is_uri(location):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    kind = filesystem_type(location)
    if len(nodes) > 1 and kind not in SHARED_FILESYSTEMS:
        raise UserError(f"{what} {location}: a folder on this node's own disk ({kind}), but the Ray cluster has "
                        f"{len(nodes)} nodes whose workers all write there; use a shared filesystem mounted on every "
                        "node (e.g. /mnt/rayeff, see clusters/README.md) or an s3:// or gs:// URI")
