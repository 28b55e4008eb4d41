"""Your own examples: a .jsonl, .json, .csv, .tsv or .parquet file, a folder saved by `datasets`' save_to_disk, or
a dataset that `datasets.load_dataset` reads (a hub id, or a local folder of data files).

    table = read_table("data/train.jsonl", "data.train_file")     # {column: [values]}, one entry per example
    table = read_dataset_split("stanfordnlp/imdb", None, "train")

Every way a file can be wrong (missing, unreadable, malformed line, no examples) is a `UserError` naming the field,
the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import sys
from pathlib import Path

from rayeff.errors import UserError

FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
DEV_SPLITS = ("validation", "dev", "test")   # a save_to_disk DatasetDict's dev split, by the names people use


def check_data_file(path: str, field: str) -> None:
    """Before anything starts: the file (or save_to_disk folder) is there and of a form we read."""
    p = Path(path)
    if p.is_dir():
        if not any((p / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise UserError(f"{field}: {path} is a folder but not one saved by datasets' save_to_disk; give a "
                            f"{', '.join(FORMATS)} file or such a folder")
        return
    if not p.is_file():
        raise UserError(f"{field}: {path} not found; give the path of your examples file")
    if p.suffix.lower() not in FORMATS:
        raise UserError(f"{field}: {path}: unknown format {p.suffix or '(no suffix)'!r}; rayeff reads "
                        f"{', '.join(FORMATS)} files and save_to_disk folders")


def read_table(path: str, field: str) -> dict[str, list]:
    """All columns of one file as lists of equal length (a column a JSON record lacks reads None there). Memoised
    on the file's size and modification time: a run asks for the train file's labels and its examples. The lists
    are shared; do not change them."""
    check_data_file(path, field)
    p = Path(path)
    stat = p.stat()
    return _read_table(str(p), field, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_table(path: str, field: str, size: int, mtime_ns: int) -> dict[str, list]:
    p = Path(path)
    if p.is_dir():
        table = _read_saved_dataset(p, field)
    elif p.suffix.lower() == ".parquet":
        table = _read_parquet(p, field)
    elif p.suffix.lower() in (".csv", ".tsv"):
        table = _read_delimited(p, field)
    else:
        table = _read_json(p, field)
    if not table or not len(next(iter(table.values()))):
        raise UserError(f"{field}: {path} holds no examples; give a file with at least one")
    return table


def content_hash(path: str) -> str:
    """The file's (or folder's files') bytes, hashed: the tokenised cache is keyed by what the data holds, not by
    where it lies or when it was touched."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.endswith(".lock"))
        return _hash_files(str(p), tuple((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                                         for f in files))
    return _hash_files(str(p.parent), ((p.name, p.stat().st_size, p.stat().st_mtime_ns),))


@functools.lru_cache(maxsize=32)
def _hash_files(root: str, files: tuple) -> str:
    """Memoised on each file's size and modification time, so a run hashes a large file once. A folder's file
    names count too; a single file's name does not."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        if len(files) > 1:
            digest.update(name.encode() + b"\0")
        with open(Path(root) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def _text(p: Path, field: str) -> str:
    from rayeff.checks import read_text_file

    return read_text_file(p, f"{field} file")


def _read_json(p: Path, field: str) -> dict[str, list]:
    text = _text(p, field)
    records = None
    if p.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if "Extra data" not in err.msg:   # not JSON lines either
                raise UserError(f"{field}: {p} line {err.lineno}: not valid JSON ({err.msg})") from None
        else:
            if isinstance(whole, dict) and all(isinstance(v, list) for v in whole.values()):
                return _equal_columns(whole, p, field)   # {column: [values]}
            if not isinstance(whole, list):
                raise UserError(f"{field}: {p}: expected a list of examples (JSON objects), or one object per "
                                "line (JSON lines)")
            records = [(i + 1, r) for i, r in enumerate(whole)]
    if records is None:   # JSON lines: one object per line
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UserError(f"{field}: {p} line {number}: not valid JSON ({err.msg}); each line must be "
                                    "one example as a JSON object") from None
    names: dict[str, None] = {}
    for number, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{field}: {p} example {number}: {type(record).__name__} is not a JSON object; each "
                            "example must be an object of column: value")
        names.update(dict.fromkeys(record))
    return {name: [r.get(name) for _, r in records] for name in names}


def _equal_columns(columns: dict, p: Path, field: str) -> dict[str, list]:
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise UserError(f"{field}: {p}: its columns have different lengths ({sorted(lengths)})")
    return columns


def _read_delimited(p: Path, field: str) -> dict[str, list]:
    csv.field_size_limit(sys.maxsize)
    # TSV as GLUE and most NLP corpora write it (and IANA's text/tab-separated-values defines it): no quoting, a
    # quote is an ordinary character. CSV quotes as RFC 4180 does.
    tsv = p.suffix.lower() == ".tsv"
    try:
        reader = csv.reader(io.StringIO(_text(p, field), newline=""), delimiter="\t" if tsv else ",", strict=True,
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        rows = list(reader)
    except csv.Error as err:
        raise UserError(f"{field}: {p} line {reader.line_num}: {err}") from None
    if not rows:
        raise UserError(f"{field}: {p} is empty; its first line must name the columns")
    header = [c.strip() for c in rows[0]]
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    for number, row in enumerate(rows[1:], 2):
        if len(row) > len(header):
            fix = ("a TSV field cannot hold a tab: remove it, or write the data as .csv (quoted) or .jsonl" if tsv
                   else "quote fields that hold the delimiter")
            raise UserError(f"{field}: {p} line {number}: {len(row)} fields but the header names {len(header)}; {fix}")
    return {name: [r[i] if i < len(r) else None for r in body] for i, name in enumerate(header)}


def _read_parquet(p: Path, field: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pydict()
    except Exception as err:  # noqa: BLE001  (pyarrow raises several types for a damaged file)
        raise UserError(f"{field}: {p}: not a readable Parquet file ({str(err).splitlines()[0][:160]})") from None


def _read_saved_dataset(p: Path, field: str) -> dict[str, list]:
    import datasets

    try:
        saved = datasets.load_from_disk(str(p))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{field}: {p}: datasets.load_from_disk cannot read it "
                        f"({str(err).splitlines()[0][:160]})") from None
    if isinstance(saved, datasets.DatasetDict):
        wanted = ("train",) if field.endswith("train_file") else DEV_SPLITS
        split = next((s for s in wanted if s in saved), None)
        if split is None:
            raise UserError(f"{field}: {p} holds splits {sorted(saved)} but none named {' or '.join(wanted)}")
        saved = saved[split]
    return saved.to_dict()


def check_dataset(name: str) -> None:
    """Before anything starts: a local dataset folder is there, or the hub (which holds the id) can be reached."""
    from rayeff.hub import hub_reachable

    if Path(name).expanduser().is_dir():
        return
    if Path(name).suffix.lower() in FORMATS:
        raise UserError(f"data.dataset: {name} is not a folder; give a hub dataset id or a folder of data files "
                        "(a single file is data.train_file)")
    if not hub_reachable():
        raise UserError(f"data.dataset: {name!r} is not a local folder and the Hugging Face hub cannot be reached "
                        "from this machine; download it (datasets' save_to_disk) and give data.train_file instead")


def read_dataset_split(name: str, config: str | None, split: str, field: str) -> dict[str, list]:
    """One split (named by the job's `field`) of a dataset `datasets.load_dataset` reads, as columns; memoised. The
    lists are shared."""
    return _split_columns(name, config, _split_of(name, config, split, field))


def dataset_fingerprint(name: str, config: str | None, split: str, field: str) -> str:
    """The split's content fingerprint as `datasets` computes it (from its files' hashes), for the tokenised cache."""
    return _load_dataset(name, config)[_split_of(name, config, split, field)]._fingerprint


def _split_of(name: str, config: str | None, split: str, field: str) -> str:
    splits = _load_dataset(name, config)
    if split not in splits:
        raise UserError(f"{field}: {name} has no split {split!r} (its splits: {', '.join(splits)}); name one of them")
    return split


@functools.lru_cache(maxsize=4)
def _split_columns(name: str, config: str | None, split: str) -> dict[str, list]:
    return _load_dataset(name, config)[split].to_dict()


@functools.lru_cache(maxsize=2)
def _load_dataset(name: str, config: str | None):
    import datasets

    check_dataset(name)
    source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    try:
        return datasets.load_dataset(source, config)
    except Exception as err:  # noqa: BLE001  (datasets raises many types: missing config, bad files, no access)
        raise UserError(f"data.dataset: datasets.load_dataset({name!r}, {config!r}) failed "
                        f"({(str(err).strip().splitlines() or [type(err).__name__])[0][:160]}); check the id, "
                        "data.dataset_config and access") from None
