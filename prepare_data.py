"""
Turn text into what train_gpt2.py reads.

Pretraining shards (GPT-2 token ids, uint16, numpy's .npy format, every document
starting with <|endoftext|>), a validation split first, and meta.json:
    python prepare_data.py                     # FineWeb-Edu sample-10BT -> data/fineweb_edu_10B (~10B tokens)
    python prepare_data.py --dataset roneneldan/TinyStories --out_dir data/tinystories
    python prepare_data.py --dataset path/to/folder_of_parquet_or_jsonl --out_dir data/mine
    python prepare_data.py --files input.txt more.jsonl rows.parquet --out_dir data/mine --val_tokens 100000

Instruction data for --mode finetune (Stanford Alpaca, prompt tokens masked out):
    python prepare_data.py --sft                            # tatsu-lab/alpaca -> data/alpaca
    python prepare_data.py --sft --files alpaca_data.json   # -> data/alpaca too

HellaSwag validation set for --mode eval:
    python prepare_data.py --hellaswag                      # -> data/hellaswag/hellaswag_val.jsonl

Check a prepared folder, and compare our tokenizer with build-nanogpt's Pool.imap:
    python prepare_data.py --verify data/fineweb_edu_10B
    python prepare_data.py --bench --files corpus.jsonl --num_proc 2

Hub datasets are streamed: documents are tokenized as they arrive, so neither memory nor
disk ever holds the raw corpus (FineWeb-Edu's 10B sample is ~27 GB of parquet; its shards
are 20 GB). Everything is built in a sibling folder, <out_dir>.partial, and moved into
place only when whole, so a folder under its final name is always a complete dataset.
An interrupted run (Ctrl-C, kill -9, a lost connection) is resumed by running the same
command again: it goes on after the last complete shard.
"""

import argparse
import codecs
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

EOT_TOKEN = 50256  # <|endoftext|>, which starts every document

# The standard Stanford Alpaca prompts. The answer follows "### Response:\n".
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# Our bookkeeping inside the staging folder: the lock, and the command and progress of the run.
LOCK, STATE, META = "lock", "state.json", "meta.json"


class DataError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


# Test hook: PREPARE_DATA_DIE_AT=point:n ends the process like kill -9 (os._exit, no cleanup)
# the n-th time it reaches that point; point:n:pause instead says so and waits for a signal.
# Tests stop a run exactly where they mean to, with no sleeps.
_hits = {}  # point -> how many times this run has reached it


def die_here(point):
    name, n, action = (os.environ.get("PREPARE_DATA_DIE_AT", "") + "::").split(":")[:3]
    if name == point:
        _hits[point] = _hits.get(point, 0) + 1
        if _hits[point] == int(n or 1) and action == "pause":  # n left out: the first time
            print(f"paused at {point}", flush=True)
            signal.pause()  # e.g. a test's Ctrl-C, sent while the workers are busy
        elif _hits[point] == int(n or 1):
            os._exit(137)  # 137: what a shell reports for a process killed by SIGKILL (128 + 9)


# -----------------------------------------------------------------------------
# Reading rows from local files. Each reader yields (row, where, after): the row, where it is
# for error messages, and the position just after it, from which a resumed run reads on.


def decode(raw, errors, path, line=None):
    """Bytes to text, naming the line of a bad byte: Latin-1 files are common."""
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        line = line or raw.count(b"\n", 0, e.start) + 1  # a whole file: count the newlines before the bad byte
        raise DataError(f"{path}, line {line}: not UTF-8 (byte {raw[e.start]:#04x}); convert the file to UTF-8, "
                        "or pass --encoding_errors replace to replace bad bytes with U+FFFD") from None


def read_text(path, errors):
    raw = Path(path).read_bytes()  # whole: a plain-text file is one document anyway
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw  # Windows editors add a BOM
    return decode(raw, errors, path)


def jsonl_rows(path, offset, line, errors):
    """One JSON object per line. The position is a byte offset, so a resumed run seeks
    instead of reading the lines it already did."""
    with open(path, "rb") as f:
        f.seek(offset)  # 0, or where the last run stopped
        for raw in f:  # binary: len(raw) counts bytes, so offset stays a true seek position
            offset += len(raw)
            if offset == len(raw) and raw.startswith(codecs.BOM_UTF8):  # the file's first line
                raw = raw[len(codecs.BOM_UTF8):]
            where = f"{path}, line {line}"
            text = decode(raw, errors, path, line)
            line += 1
            if not text.strip():  # blank lines (a trailing one, often) are not rows
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); fix or delete that line") from None
            yield row, where, (offset, line)  # (offset, line) after this row: a resume starts at the next


def json_rows(path, start, errors):
    """A JSON list of objects; the position is a row number."""
    try:
        rows = json.loads(read_text(path, errors))  # whole file: the standard library cannot stream a JSON list
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(rows, list):  # one object, or JSON lines saved as .json
        raise DataError(f"{path}: expected a JSON list of objects; for one object per line, name it .jsonl")
    for i in range(start, len(rows)):  # start: rows an earlier run already did
        yield rows[i], f"{path}, row {i + 1}", (i + 1, 0)


def parquet_rows(path, start):
    """Rows of a parquet file; the position is a row number."""
    import pyarrow
    import pyarrow.parquet as pq  # comes with datasets
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        n = 0  # rows in the batches before this one
        for batch in batches:
            rows = batch.to_pylist()  # dicts, as the JSON readers give
            for i in range(max(start - n, 0), len(rows)):  # a resumed run skips the rows it did
                yield rows[i], f"{path}, row {n + i + 1}", (n + i + 1, 0)
            n += len(rows)
    except pyarrow.ArrowException as e:  # not parquet, or cut short
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); "
                        "check the file, or name it by what it holds (.txt, .jsonl, .json)") from None


def text_rows(path, start, errors, text_column):
    """A plain-text file is one document."""
    if start == 0:  # start 1: the one document is done
        yield {text_column: read_text(path, errors)}, f"{path}", (1, 0)


def file_rows(path, offset, line, args):
    suffix = Path(path).suffix.lower()  # by name, not by sniffing the bytes
    if suffix == ".jsonl":
        return jsonl_rows(path, offset, line, args.encoding_errors)
    if suffix == ".json":
        return json_rows(path, offset, args.encoding_errors)
    if suffix == ".parquet":
        return parquet_rows(path, offset)
    return text_rows(path, offset, args.encoding_errors, args.text_column)  # any other name: plain text


def local_rows(args, start=None):
    """Every row of every file, from position start = {file, offset, line} on."""
    start = start or {"file": 0, "offset": 0, "line": 1}  # a fresh run: first file, from the top
    for i in range(start["file"], len(args.files)):
        offset, line = (start["offset"], start["line"]) if i == start["file"] else (0, 1)  # later files: from the top
        for row, where, (offset, line) in file_rows(args.files[i], offset, line, args):
            # {file, offset, line}: what state.json stores to resume
            yield row, where, {"file": i, "offset": offset, "line": line}


def open_hub(args):
    import datasets  # here, not at the top: --files never needs it, and it is slow to import
    try:
        # streaming: rows arrive over the network as we tokenize; nothing is cached on disk
        return datasets.load_dataset(args.dataset, args.subset, split=args.split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as e:  # a wrong name, subset or split, or no network
        raise DataError(f"cannot open dataset {args.dataset}: {str(e).splitlines()[0]}") from None


def hub_rows(args, start=None):
    """Rows of a streamed dataset (the Hub, or a local folder of parquet/jsonl files). The
    position is the stream's own state_dict, so a resumed run asks `datasets` to skip
    ahead instead of reading and dropping every document it already did."""
    ds = open_hub(args)
    n = 0  # rows read, for messages; counts on across a resume
    if start:
        ds.load_state_dict(start["stream"])  # datasets reopens the right file at the right row
        n = start["row"]  # the row count is not in the stream's state
    for row in ds:
        n += 1
        # The position as a function: ds.state_dict() costs ~7 us, half again what reading a row
        # costs, on the one process that feeds every tokenizer; it is wanted only where a batch
        # is cut, which asks for it while this generator is still paused right after row n.
        yield row, f"{args.dataset} row {n}", lambda n=n: {"stream": ds.state_dict(), "row": n}


def read_rows(args, start=None):
    return local_rows(args, start) if args.files else hub_rows(args, start)  # --files wins over --dataset


# -----------------------------------------------------------------------------
# What a row must hold, for each kind of data. Checked up front for the first rows of
# every file and again for every row as it is read: a bad row is named by file and line.


def describe(value):
    return "null" if value is None else repr(value)[:40]  # 40 characters: a whole document would drown the message


def text_of(row, name, where):
    if not isinstance(row, dict):
        raise DataError(f"{where} is {describe(row)}, not an object with a {name!r} column")
    if name not in row:
        raise DataError(f"{where} has no column {name!r}; its columns are: {', '.join(map(str, row))} "
                        "(choose one with --text_column)")
    if not isinstance(row[name], str):
        raise DataError(f"{where}: {name!r} is {describe(row[name])}, not text; fix or remove that row")
    return row[name]


def alpaca_example(row, where):
    """(instruction, input, output) of an Alpaca record."""
    if not isinstance(row, dict):
        raise DataError(f"{where} is {describe(row)}, not an Alpaca record")
    # input is optional in Alpaca; these two are not
    missing = [key for key in ("instruction", "output") if key not in row]
    if missing:
        raise DataError(f"{where} has no column {missing[0]!r}; Alpaca data needs instruction, input "
                        f"(optional) and output; its columns are: {', '.join(map(str, row))}")
    fields = (row["instruction"], row.get("input") or "", row["output"])  # input: absent, null or "" alike
    if not all(isinstance(field, str) for field in fields):
        raise DataError(f"{where}: instruction, input and output must be text; fix or remove that row")
    return fields


def hellaswag_item(row, where):
    """ctx, the 4 endings and the label 0..3 (the Hub's copy stores the label as a string)."""
    if not isinstance(row, dict) or not {"ctx", "endings", "label"} <= set(row):  # all three present
        columns = ", ".join(map(str, row)) if isinstance(row, dict) else describe(row)
        raise DataError(f"{where} is not HellaSwag: rows need ctx, endings (4) and label; got {columns}")
    endings, label = row["endings"], str(row["label"])
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise DataError(f"{where}: HellaSwag needs exactly 4 endings (text); fix or remove that item")
    if label not in ("0", "1", "2", "3"):
        raise DataError(f"{where}: label {row['label']!r} is not 0..3 (the test split has no labels: "
                        "use the validation split)")
    # int: train_gpt2.py's loader wants 0..3 as numbers
    item = {"ctx": row["ctx"], "endings": endings, "label": int(label)}
    # lm-evaluation-harness builds its query from these three instead of ctx: kept when there
    item.update({key: row[key] for key in ("activity_label", "ctx_a", "ctx_b") if isinstance(row.get(key), str)})
    return item


def check_row(args, row, where):
    if args.sft:
        return alpaca_example(row, where)
    if args.hellaswag:
        return hellaswag_item(row, where)
    return text_of(row, args.text_column, where)


def check_inputs(args, rows_per_file=100):
    """Before anything is written: every file exists, is readable, decodes and has the
    column in its first rows; a dataset opens and its first row has it."""
    sources = [[path] for path in args.files] if args.files else [None]  # one file at a time, so an error names it
    empty = True  # until some source yields a row
    for source in sources:
        if source:
            path = source[0]
            if not os.path.exists(path):
                raise DataError(f"file not found: {path}")
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise DataError(f"cannot read {path}: it is {'a folder' if os.path.isdir(path) else 'not readable'}")
        # a copy of args that names this one file
        rows = read_rows(argparse.Namespace(**{**vars(args), "files": source}) if source else args)
        for i, (row, where, _) in enumerate(rows):
            check_row(args, row, where)
            empty = False
            if i + 1 == rows_per_file:  # enough to catch a wrong format or column at once
                break
        rows.close()  # the rest is read, and checked, as it is tokenized
    if empty:  # after all sources: one empty file among others is fine
        raise DataError(f"the corpus {describe_source(args)} is empty: no rows to read")


def describe_source(args):
    return " ".join(args.files) if args.files else f"{args.dataset}" + (f" ({args.subset})" if args.subset else "")


# -----------------------------------------------------------------------------
# Tokenizing, in parallel, in order, with bounded memory

_encoder = None  # one per worker process, made on first use (works with fork and spawn)


def tokenize_documents(texts):
    """One uint16 array: each document's tokens, each preceded by <|endoftext|>."""
    global _encoder
    if _encoder is None:  # once per process, not once per batch
        import tiktoken
        _encoder = tiktoken.get_encoding("gpt2")
    tokens = []  # a Python list, then one conversion: cheaper than growing an array
    for text in texts:
        tokens.append(EOT_TOKEN)
        tokens.extend(_encoder.encode_ordinary(text))
    try:
        return np.array(tokens, dtype=np.uint16)  # numpy refuses, rather than wraps, an id >= 65,536
    except OverflowError:  # GPT-2's 50,257 fit; another tokenizer's might not
        raise DataError(f"token id {max(tokens)} does not fit in uint16: this format holds ids below 65,536") from None


# Test hook: PREPARE_DATA_BATCH_CHARS makes batches smaller, so that a small corpus spans many.
BATCH_CHARS = int(os.environ.get("PREPARE_DATA_BATCH_CHARS", 1 << 18))  # 262,144 characters, ~60k tokens


def batches_of_documents(documents, start=None, max_chars=None):
    """Group (text, position after it) into batches of about 256 KB (~60k tokens), so that
    sending work to a process costs little next to tokenizing it, yet the last batches,
    when some processes already idle, are short. Each batch comes with the reader's
    position before its first document: where a resumed run starts reading again."""
    batch, size, position, max_chars = [], 0, start, max_chars or BATCH_CHARS
    for text, after in documents:
        batch.append(text)
        size += len(text)  # characters, not bytes or tokens: free to count, and close enough
        if size >= max_chars:
            yield position, batch
            # the next batch starts after this one's last document (a stream's position is computed now)
            batch, size, position = [], 0, after() if callable(after) else after
    if batch:  # the tail, shorter than max_chars
        yield position, batch


def start_worker(lock_fd):
    # Ctrl-C reaches the whole process group: only the parent reacts, the pool is terminated.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lock_fd is not None:  # forked: drop our copy of the lock, so that it dies with the parent
        os.close(lock_fd)


def tokenize_in_parallel(batches, num_proc, lock_fd=None):
    """Yield (position, tokens) in document order. At most 2 batches per process are in flight:
    Pool.imap would read the whole corpus into its queue ahead of the workers."""
    if num_proc <= 1:  # one process: no pool to start, and a traceback that points at the bug
        for position, batch in batches:
            yield position, tokenize_documents(batch)
        return
    forked = mp.get_start_method() == "fork"  # only a forked worker has our lock descriptor to drop
    with mp.Pool(num_proc, start_worker, (lock_fd if forked else None,)) as pool:  # exit: terminate
        in_flight = deque()  # (position, AsyncResult), oldest first
        for position, batch in batches:
            in_flight.append((position, pool.apply_async(tokenize_documents, (batch,))))
            # 2 per process: one running, one queued, so no worker waits on the reader
            if len(in_flight) >= 2 * num_proc:
                position, result = in_flight.popleft()
                yield position, result.get()  # waits on the oldest only: document order, whichever finishes first
        while in_flight:  # the reader is done: drain what is left
            position, result = in_flight.popleft()
            yield position, result.get()


# -----------------------------------------------------------------------------
# Writing files atomically, with checksums


def save_npy(path, array):
    """Write to a temporary name, then rename: a file with the final name is always whole.
    Returns the file's sha256, computed from the bytes as they are written (no re-read)."""
    array = np.ascontiguousarray(array)  # .data below must be one contiguous buffer
    header = io.BytesIO()  # the exact header np.save writes
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    digest = hashlib.sha256(header.getvalue())  # the checksum covers the whole file, as sha256sum sees it
    digest.update(array.data)
    tmp = f"{path}.tmp"  # same folder: os.replace is atomic only within one file system
    with open(tmp, "wb") as f:
        f.write(header.getvalue())
        f.write(array.data)  # the buffer itself: a 200 MB shard is not copied
        f.flush()
        os.fsync(f.fileno())  # on disk before the name says it is whole
    die_here("shard_tmp")
    os.replace(tmp, path)  # atomic: the name holds the old file or the whole new one
    return digest.hexdigest()


def save_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)  # indented: people read meta.json too
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())  # as for shards: after a crash, the old state.json or the new, never half
    os.replace(tmp, path)


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks: any size


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise DataError(f"{path} is not readable JSON: it was not written by prepare_data.py, or was "
                        "edited; move it away") from None


# -----------------------------------------------------------------------------
# The staging folder: <out_dir>.partial holds the lock, state.json (the command, and how far
# it got) and the files made so far. Only a whole dataset is moved to out_dir.


def dataset_files(meta):
    """The files a meta.json describes, besides itself."""
    if meta.get("kind") == "sft":
        return {f"{split}_{name}.npy" for split in ("train", "val") for name in ("tokens", "mask", "offsets")}
    if meta.get("kind") == "hellaswag":
        return {"hellaswag_val.jsonl"}
    # pretrain: the shards each split lists
    return {name for split in meta.get("splits", {}).values() for name in split.get("shards", [])}


def remove_dataset(folder, keep_lock=False):
    """Delete a dataset of ours: the files its meta.json lists, shards, our bookkeeping, then
    the folder if nothing else is left in it (a file we did not write is never deleted)."""
    names = {META, STATE} | (set() if keep_lock else {LOCK})  # the caller may still hold the lock
    if os.path.exists(os.path.join(folder, META)):
        names |= dataset_files(read_json(os.path.join(folder, META)))
    for name in os.listdir(folder):
        if name in names or name.endswith(".tmp") or (folder.endswith(".partial") and name.endswith(".npy")):
            Path(folder, name).unlink(missing_ok=True)
    if not keep_lock:  # a caller that holds the lock keeps the folder too
        try:
            os.rmdir(folder)
        except OSError:  # not empty: someone else's files are in it
            pass


def check_out_dir(out_dir, overwrite):
    """Refuse an output that is a file, or a folder holding anything that is not ours."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir} is a file; choose a folder")
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    if names and META not in names:  # a missing or empty folder is fine
        raise DataError(f"{out_dir} is a folder that is not a prepared dataset (no meta.json); "
                        "choose a new or empty --out_dir")
    if META in names and overwrite:
        foreign = sorted(names - dataset_files(read_json(os.path.join(out_dir, META))) - {META, LOCK, STATE})
        if foreign:
            raise DataError(f"{out_dir} holds files that are not part of its dataset ({', '.join(foreign[:3])}); "
                            "move them away before --overwrite")


def take_lock(staging):
    """An exclusive flock on staging/lock. The kernel drops it when the process dies, so a
    kill -9 never leaves a false "busy"."""
    for _ in range(3):  # the lock file can be removed by its holder between our open and flock
        os.makedirs(staging, exist_ok=True)  # each try: the holder may have removed the folder too
        fd = os.open(os.path.join(staging, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)  # CLOEXEC: not to children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # LOCK_NB: fail at once rather than wait for the other run
        except BlockingIOError:
            os.close(fd)
            raise DataError(f"another prepare_data.py is writing {staging}; wait for it to finish, or stop it") from None
        try:
            # the file we locked is still the one under the name
            if os.stat(os.path.join(staging, LOCK)).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass  # removed after our open: try again
        os.close(fd)
    raise DataError(f"could not lock {staging}: another prepare_data.py keeps starting and finishing there")


def release_lock(staging, fd):
    """Remove the staging folder if it holds no work worth resuming, then unlock."""
    if os.path.isdir(staging) and all(name in (LOCK, STATE) or name.endswith(".tmp") for name in os.listdir(staging)):
        remove_dataset(staging)  # the lock file and the folder go too; the flock holds until the close below
    os.close(fd)


def exchange(a, b):
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE): there is no moment
    when neither is in place. False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded into Python
    if not hasattr(libc, "renameat2"):  # glibc before 2.28 has no wrapper
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2  # Linux values, not in Python's os
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot
        return False
    # any other failure is real: report it, with the path
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)


def publish(staging, out_dir):
    """Move the finished dataset into place; an old one is replaced only now."""
    if not os.path.isdir(out_dir):
        os.rename(staging, out_dir)  # nothing to replace: one atomic rename
    elif exchange(staging, out_dir):
        die_here("swap")
        remove_dataset(staging)  # now the old dataset
    else:  # two renames; recover() finishes them if we die in between
        os.rename(out_dir, f"{out_dir}.old")
        die_here("swap")
        os.rename(staging, out_dir)
        remove_dataset(f"{out_dir}.old")
    for name in (STATE, LOCK):  # state.json marked the new dataset until here
        Path(out_dir, name).unlink(missing_ok=True)


def recover(staging, out_dir):
    """Finish what a run killed inside publish() left: every case ends as one whole dataset."""
    if os.path.isdir(out_dir) and os.path.exists(os.path.join(out_dir, STATE)):  # the new one, in place
        for name in (STATE, LOCK):
            Path(out_dir, name).unlink(missing_ok=True)
    if os.path.exists(os.path.join(staging, META)) and not os.path.exists(os.path.join(staging, STATE)):
        remove_dataset(staging, keep_lock=True)  # the old one, swapped out
    if os.path.isdir(f"{out_dir}.old"):
        if os.path.isdir(out_dir):
            remove_dataset(f"{out_dir}.old")  # the new one made it: the old one is stale
        else:
            os.rename(f"{out_dir}.old", out_dir)  # the old one back; a finished staging is published next


def fingerprint(args):
    """What decides the output: a half-made folder is only resumed by the same command."""
    if args.files:
        # size and mtime: an edited file is caught without hashing gigabytes
        inputs = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in args.files]
    else:
        inputs = [args.dataset, args.subset, args.split]  # a Hub dataset: by name; its contents are the Hub's to change
        if os.path.isdir(args.dataset):  # a local dataset folder: its files, as for --files
            inputs += sorted([str(p), p.stat().st_size, p.stat().st_mtime_ns]
                             for p in Path(args.dataset).rglob("*") if p.is_file())
    kind = "sft" if args.sft else "hellaswag" if args.hellaswag else "pretrain"
    options = {"pretrain": ("text_column", "shard_size", "val_tokens"), "hellaswag": (),
               "sft": ("block_size", "val_fraction", "seed")}[kind]
    return {"kind": kind, "inputs": inputs, "encoding_errors": args.encoding_errors,
            **{name: getattr(args, name) for name in options}}


def resume_state(staging, fp):
    """The state of a half-made run of this same command in staging, or None to start afresh."""
    path = os.path.join(staging, STATE)
    if not os.path.exists(path):
        if any(name != LOCK and not name.endswith(".tmp") for name in os.listdir(staging)):
            raise DataError(f"{staging} is in the way: prepare_data.py builds there, but it holds files "
                            "that are not ours; move it away")
        return None
    state = read_json(path)
    if state.get("fingerprint") != fp:
        old = state.get("fingerprint") or {}
        # name the first field that differs, so the user knows what changed
        differs = next((key for key in fp if old.get(key) != fp[key]), "the command")
        raise DataError(f"{staging} holds a half-made preparation by another command (its {differs} differs); "
                        f"re-run that command to finish it, or delete {staging} to start over")
    for name in os.listdir(staging):  # a temporary file is a shard that was being written: redo it
        if name.endswith(".tmp"):
            os.unlink(os.path.join(staging, name))
    return state


# -----------------------------------------------------------------------------
# Pretraining shards


class ShardWriter:
    """Cuts a stream of tokens into shards of shard_size: the first val_tokens go to
    val_000000.npy, ..., the rest to train_000000.npy, ... A document may span two shards,
    so no token is dropped. After each shard, state.json records the shards so far and
    where to read on: the position of a batch and how many of its tokens are written."""

    def __init__(self, out_dir, shard_size, val_tokens, state):
        self.out_dir, self.shard_size, self.val_tokens, self.state = out_dir, shard_size, val_tokens, state
        self.buffer = np.empty(shard_size, dtype=np.uint16)  # the one big allocation: memory follows shard_size
        self.filled = 0  # tokens in buffer, not yet in a shard
        state.setdefault("splits", {split: {"tokens": 0, "shards": [], "shard_tokens": [], "sha256": []}
                                    for split in ("val", "train")})
        self.splits = state["splits"]  # the same dict as state's: commit() saves what write() records

    def tokens(self, split):
        return self.splits[split]["tokens"]

    def split(self):
        # val until val_tokens are written, then train for good
        return "val" if self.tokens("val") < self.val_tokens else "train"

    def capacity(self):
        """Room left in the current shard: a val shard also ends where the val split ends."""
        if self.split() == "val":
            return min(self.shard_size, self.val_tokens - self.tokens("val")) - self.filled
        return self.shard_size - self.filled

    def add(self, tokens, position, done):
        """Tokens of the batch read from position; `done` of its tokens came before these."""
        while len(tokens):
            n = min(len(tokens), self.capacity())  # up to the end of the shard, or of the val split
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled += n
            tokens, done = tokens[n:], done + n  # done: this batch's tokens now in buffer or on disk
            if self.capacity() == 0:
                self.flush()
                self.commit({"position": position, "skip": done})

    def flush(self):
        if self.filled == 0:  # nothing pending: the last shard ended exactly
            return
        self.write(self.split(), self.buffer[:self.filled])
        self.filled = 0

    def write(self, split, tokens):
        s = self.splits[split]
        name = f"{split}_{len(s['shards']):06d}.npy"  # 6 digits: names sort in order
        digest = save_npy(os.path.join(self.out_dir, name), tokens)
        die_here("shard_saved")  # a kill here leaves a shard state.json does not list: the resume rewrites it
        s["shards"].append(name)
        s["shard_tokens"].append(len(tokens))
        s["sha256"].append(digest)
        s["tokens"] += len(tokens)

    def commit(self, resume):
        """The shards written so far count once state.json says so."""
        self.state["resume"] = resume
        save_json(os.path.join(self.out_dir, STATE), self.state)  # the moment the shard counts


def prepare_pretraining(args, staging, state, lock_fd):
    # one shard of val by default, as in build-nanogpt's fineweb.py
    val_tokens = args.val_tokens if args.val_tokens is not None else args.shard_size
    writer = ShardWriter(staging, args.shard_size, val_tokens, state)
    resume = state.get("resume", {"position": None, "skip": 0})  # a fresh run: read from the start, skip nothing
    finished = resume.get("finished", False)  # all read: only meta.json was left to write
    written = writer.tokens("val") + writer.tokens("train")  # by an earlier, interrupted run
    if written:
        print(f"resuming {staging}: {written:,} tokens already in "
              f"{len(writer.splits['val']['shards']) + len(writer.splits['train']['shards'])} shards")
    rows = iter(()) if finished else read_rows(args, resume["position"])
    # lazy: each row is checked as it is read
    documents = ((check_row(args, row, where), after) for row, where, after in rows)
    skip, tokenized = resume.get("skip", 0), 0  # tokens of the first batch an earlier run already wrote
    from tqdm import tqdm  # here: only pretraining shows a progress bar
    with tqdm(unit="tok", unit_scale=True, desc=f"tokenizing into {args.out_dir}", smoothing=0.1,
              initial=written) as progress:  # the bar counts on from what is on disk
        for position, tokens in tokenize_in_parallel(batches_of_documents(documents, resume.get("position")),
                                                     args.num_proc, lock_fd):
            tokenized += len(tokens)  # printed at the end: what resuming saved, honestly counted
            done = min(skip, len(tokens))  # a resumed run re-reads one batch: drop what is written
            skip -= done
            writer.add(tokens[done:], position, done)  # `done` tells add() where in the batch these start
            progress.update(len(tokens) - done)
            die_here("batch")
    if writer.tokens("val") == 0 and writer.filled and args.val_tokens is None and not finished:
        # The whole corpus is smaller than one shard: "the first shard is val" would take it all.
        everything = writer.buffer[:writer.filled].copy()
        cut = max(1, len(everything) // 10)  # at least one token of val, even for a tiny corpus
        print(f"note: the corpus is smaller than one shard; its first 10% ({cut:,} tokens) is the val split")
        writer.write("val", everything[:cut])
        writer.write("train", everything[cut:])
        writer.filled = 0  # both halves written: nothing for flush() to write again
    writer.flush()  # the last, shorter shard
    writer.commit({"finished": True})  # all read: a run resumed from here only writes meta.json
    if writer.tokens("train") == 0:
        raise DataError(f"no tokens left to train on: all {writer.tokens('val'):,} are in the val split; "
                        "give a smaller --val_tokens")
    meta = {
        "kind": "pretrain",
        "source": describe_source(args),
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "eot_token": EOT_TOKEN,  # the separator that starts every document
        "shard_size": args.shard_size,
        # per split: tokens, shards, and parallel to shards their lengths and sha256 (for --verify)
        "splits": writer.splits,
    }
    die_here("meta")
    save_json(os.path.join(staging, META), meta)  # written last: marks the folder complete
    print(f"wrote {writer.tokens('train'):,} train and {writer.tokens('val'):,} val tokens in "
          f"{len(writer.splits['train']['shards']) + len(writer.splits['val']['shards'])} shards to {args.out_dir} "
          f"(this run tokenized {tokenized:,} tokens)")


# -----------------------------------------------------------------------------
# Instruction data (Alpaca) and HellaSwag: small, so made in one go (no resume)


def prepare_sft(args, staging):
    """Each example: prompt tokens (mask 0), then answer + <|endoftext|> (mask 1). Stored as
    {split}_tokens.npy (uint16), {split}_mask.npy (uint8) and {split}_offsets.npy (int64,
    example i is tokens[offsets[i]:offsets[i+1]])."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")  # one process: Alpaca's ~10M tokens need no pool
    examples, dropped, source = [], 0, describe_source(args)  # dropped: examples too long to train on whole
    for row, where, _ in read_rows(args):
        instruction, input, output = alpaca_example(row, where)
        template = ALPACA_PROMPT_WITH_INPUT if input else ALPACA_PROMPT
        # Prompt and answer are tokenized apart, as at inference: the prompt is encoded alone
        # and the answer generated after it, so the boundary falls where it will fall then.
        prompt = enc.encode_ordinary(template.format(instruction=instruction, input=input))
        answer = enc.encode_ordinary(output) + [EOT_TOKEN]  # EOT in the answer: the model learns to stop
        if len(prompt) + len(answer) > args.block_size:  # a cut example would teach answers that end mid-sentence
            dropped += 1
            continue
        examples.append((prompt, answer))
    if not examples:
        raise DataError(f"{source} has no examples of at most {args.block_size} tokens")
    order = np.random.default_rng(args.seed).permutation(len(examples))  # seeded: the same command makes the same split
    n_val = max(1, round(len(examples) * args.val_fraction))  # at least 1: train_gpt2.py refuses an empty val split
    splits = {"val": order[:n_val], "train": order[n_val:]}
    meta = {"kind": "sft", "source": source, "tokenizer": "gpt2", "block_size": args.block_size,
            # the finetune checkpoint keeps it: chat wraps prompts the same way
            "prompt_template": ALPACA_PROMPT, "prompt_template_with_input": ALPACA_PROMPT_WITH_INPUT,
            "dropped_too_long": dropped, "splits": {}, "sha256": {}}
    for split, indices in splits.items():
        tokens, mask, offsets = [], [], [0]  # offsets starts at 0: n examples, n + 1 offsets
        for i in sorted(indices):  # sorted: the split is random, the order within it stable
            prompt, answer = examples[i]
            tokens += prompt + answer  # one flat stream per split: the loader slices it with offsets
            mask += [0] * len(prompt) + [1] * len(answer)  # (len(tokens),) 0/1: the loss counts only the answer
            offsets.append(len(tokens))
        for name, values, dtype in (("tokens", tokens, np.uint16), ("mask", mask, np.uint8), ("offsets", offsets, np.int64)):
            file = f"{split}_{name}.npy"
            meta["sha256"][file] = save_npy(os.path.join(staging, file), np.array(values, dtype=dtype))
        # answer_tokens: how many tokens the loss sees
        meta["splits"][split] = {"examples": len(indices), "tokens": len(tokens), "answer_tokens": int(sum(mask))}
    save_json(os.path.join(staging, META), meta)
    print(f"wrote {meta['splits']['train']['examples']:,} train and {meta['splits']['val']['examples']:,} val "
          f"examples to {args.out_dir}; dropped {dropped:,} longer than {args.block_size} tokens")


def prepare_hellaswag(args, staging):
    """HellaSwag's validation items as JSON lines: ctx, the 4 endings, the label (and the
    activity label and the two halves of ctx, which lm-evaluation-harness's query uses)."""
    items = [hellaswag_item(row, where) for row, where, _ in read_rows(args)]  # not empty: check_inputs saw a row
    path = os.path.join(staging, "hellaswag_val.jsonl")
    with open(path, "w") as f:  # in staging: moved into place whole
        for item in items:
            f.write(json.dumps(item) + "\n")
    # hashed after writing: a few MB, read once
    save_json(os.path.join(staging, META), {"kind": "hellaswag", "source": describe_source(args), "items": len(items),
                                            "sha256": {"hellaswag_val.jsonl": sha256_file(path)}})
    print(f"wrote {len(items):,} HellaSwag items to {os.path.join(args.out_dir, 'hellaswag_val.jsonl')}")


# -----------------------------------------------------------------------------
# --verify: every file whole, unchanged, and of the length meta.json says


def check_shard(path, n):
    """The .npy header says 1-D uint16 of n tokens and the file is as long as that."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)  # (major, minor): np.save writes 1.0, or 2.0 for a header over 64 KB
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)  # only the header is read: a 200 MB shard is not loaded
        except ValueError:
            raise DataError(f"{path} is not a .npy file (bad header); re-run prepare_data.py --overwrite for this folder") from None
        expected = f.tell() + 2 * n  # header, then 2 bytes a token
    if dtype != np.uint16 or shape != (n,):
        raise DataError(f"{path} holds {dtype} of shape {shape}, but meta.json says {n:,} uint16 tokens; "
                        "re-run prepare_data.py --overwrite for this folder")
    if os.path.getsize(path) != expected:
        raise DataError(f"{path} is truncated or padded: {os.path.getsize(path):,} bytes, not {expected:,}; "
                        "re-run prepare_data.py --overwrite for this folder")


def verify(folder):
    if not os.path.exists(os.path.join(folder, META)):
        raise DataError(f"{folder} has no meta.json: it is not a prepared folder, or its preparation did not "
                        "finish (run the same command again)")
    meta = read_json(os.path.join(folder, META))
    if meta.get("kind") == "pretrain":
        files = []
        for split, s in meta["splits"].items():
            if "sha256" not in s:  # files from older versions have no checksums to compare
                raise DataError(f"{folder} was made before prepare_data.py recorded checksums; re-run it with --overwrite")
            # (name, tokens, sha256) per shard, val then train
            files += [(name, n, digest) for name, n, digest in zip(s["shards"], s["shard_tokens"], s["sha256"])]
    elif "sha256" in meta:
        # sft and hellaswag: any length, checked by sha256 alone
        files = [(name, None, digest) for name, digest in meta["sha256"].items()]
    else:
        raise DataError(f"{folder} was made before prepare_data.py recorded checksums; re-run it with --overwrite")
    for name, n, digest in files:  # in order: the first bad file is the one named
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataError(f"{path} is missing; re-run prepare_data.py --overwrite for this folder")
        if n is not None:
            check_shard(path, n)
        if sha256_file(path) != digest:
            raise DataError(f"{path} differs from the file prepare_data.py wrote (sha256); "
                            "re-run prepare_data.py --overwrite for this folder")
    # sft and pretrain; hellaswag has items, not tokens
    tokens = {split: s["tokens"] for split, s in meta["splits"].items()} if "splits" in meta else {}
    print(f"ok: {folder}: {len(files)} files, checksums match"
          + "".join(f", {n:,} {split} tokens" for split, n in tokens.items()))


# -----------------------------------------------------------------------------
# --bench: our tokenizer against build-nanogpt's fineweb.py, on the same documents


def tokenize_like_fineweb(doc):
    """build-nanogpt's fineweb.py: one document, <|endoftext|> first, to uint16."""
    global _encoder
    if _encoder is None:
        import tiktoken
        _encoder = tiktoken.get_encoding("gpt2")
    tokens = [EOT_TOKEN]  # before the document, as fineweb.py does
    tokens.extend(_encoder.encode_ordinary(doc))
    tokens_np = np.array(tokens)  # int64 first, so that the assert can see an id too large
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def bench(args, doc_chars=4000, rounds=3):
    """Tokenize --files both ways, without writing; the documents are cut at paragraph
    breaks into pieces of about doc_chars (~1000 tokens, like FineWeb's web pages).
    The best of 3 alternating rounds each: a shared machine's noise only slows a run down."""
    docs = []
    for row, where, _ in read_rows(args):  # --files only: --bench is about tokenizing, not the network
        piece = ""  # the piece being built, cut at paragraph breaks
        for paragraph in text_of(row, args.text_column, where).split("\n\n"):
            piece += paragraph + "\n\n"
            if len(piece) >= doc_chars:
                docs.append(piece)
                piece = ""
        docs.append(piece)  # the rest, even if short (or empty)
    timings = {}
    # alternating: a slow spell of the machine hits both
    for name in ("prepare_data.py", "Pool.imap chunksize=16") * rounds:
        t0, n = time.perf_counter(), 0
        if name == "prepare_data.py":
            # (text, None): nothing is resumed, so no positions
            for _, tokens in tokenize_in_parallel(batches_of_documents((d, None) for d in docs), args.num_proc):
                n += len(tokens)
        else:
            # a fresh pool each round, as ours makes one per call: both pay the start-up
            with mp.Pool(args.num_proc) as pool:
                for tokens in pool.imap(tokenize_like_fineweb, docs, chunksize=16):  # chunksize=16 as in fineweb.py
                    n += len(tokens)
        timings[name] = max(timings.get(name, 0), n / (time.perf_counter() - t0))  # tokens per second, the best round
    for name, speed in timings.items():
        print(f"{name:24s} {n:,} tokens of {len(docs):,} documents, {args.num_proc} processes: {speed:,.0f} tokens/s")
    print(f"ratio (ours / Pool.imap): {timings['prepare_data.py'] / timings['Pool.imap chunksize=16']:.2f}x")


# -----------------------------------------------------------------------------
# Command line


def positive_int(text):
    value = int(text)  # argparse turns a ValueError here into "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def fraction(text):
    value = float(text)  # a float: argparse reports text that is not one
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), not {value}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, like every other mistake; argparse's default prints the whole usage first."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    p = ArgumentParser(description="Tokenize a corpus for train_gpt2.py.")
    p.add_argument("--sft", action="store_true", help="prepare Alpaca-style instruction data instead")
    p.add_argument("--hellaswag", action="store_true", help="prepare the HellaSwag validation set instead")
    p.add_argument("--dataset", help="a Hugging Face dataset, or a local folder of parquet/jsonl files, streamed "
                   "(default: HuggingFaceFW/fineweb-edu; tatsu-lab/alpaca with --sft; Rowan/hellaswag with --hellaswag)")
    p.add_argument("--subset", help="the dataset's configuration (default: sample-10BT for FineWeb-Edu, else none)")
    p.add_argument("--split", help="the dataset's split (default: train; validation with --hellaswag)")
    p.add_argument("--files", nargs="+", help="local .txt (one document each), .jsonl, .json or .parquet files, "
                   "instead of --dataset")
    p.add_argument("--text_column", default="text", help="the column holding the text (default: text)")
    p.add_argument("--encoding_errors", choices=("strict", "replace"), default="strict",
                   help="bytes that are not UTF-8: strict stops with an error, replace turns them into U+FFFD "
                   "(default: strict)")
    p.add_argument("--out_dir", help="where to write (default: data/<dataset or first file's name>; "
                   "data/alpaca with --sft; data/hellaswag with --hellaswag)")
    p.add_argument("--shard_size", type=positive_int, default=100_000_000, help="tokens per shard (default: 100000000)")
    p.add_argument("--val_tokens", type=positive_int, help="tokens in the val split (default: one shard; 10%% "
                   "of a corpus smaller than one shard)")
    p.add_argument("--num_proc", type=positive_int, default=os.cpu_count(),
                   help=f"tokenizer processes (default: all {os.cpu_count()} cores)")
    p.add_argument("--overwrite", action="store_true", help="redo a complete folder; the old one stays until "
                   "the new one is whole")
    p.add_argument("--block_size", type=positive_int, default=1024, help="--sft: longest example kept, in tokens (default: 1024)")
    p.add_argument("--val_fraction", type=fraction, default=0.05, help="--sft: share of examples held out (default: 0.05)")
    p.add_argument("--seed", type=int, default=1337, help="--sft: seed of the train/val split (default: 1337)")
    p.add_argument("--verify", metavar="DIR", help="check a prepared folder's files against its meta.json, and stop")
    p.add_argument("--bench", action="store_true", help="time our tokenizer against build-nanogpt's Pool.imap "
                   "on --files, writing nothing")
    args = p.parse_args(argv)  # flag domains are checked here, by the types above
    if args.sft and args.hellaswag:
        p.error("choose one of --sft and --hellaswag")
    if args.bench and not args.files:
        p.error("--bench needs --files")
    # no source named at all: FineWeb-Edu, under its own out_dir name
    fineweb = args.dataset is None and not args.files and not args.sft and not args.hellaswag
    if args.dataset is None and not args.files:
        args.dataset, args.subset = (
            ("tatsu-lab/alpaca", args.subset) if args.sft else
            ("Rowan/hellaswag", args.subset) if args.hellaswag else
            ("HuggingFaceFW/fineweb-edu", args.subset or "sample-10BT"))
    # where train_gpt2.py looks by default: data/alpaca to fine-tune, data/hellaswag to evaluate
    default_out = ("data/alpaca" if args.sft else "data/hellaswag" if args.hellaswag else
                   "data/fineweb_edu_10B" if fineweb else
                   "data/" + (Path(args.files[0]).stem if args.files else Path(args.dataset).name))
    args.out_dir = os.path.normpath(args.out_dir or default_out)  # no trailing slash: <out_dir>.partial is a sibling
    args.split = args.split or ("validation" if args.hellaswag else "train")  # HellaSwag's test split has no labels
    return args


def prepare(args):
    staging = f"{args.out_dir}.partial"  # a sibling: the same file system, so the final move is a rename
    prepared = lambda: os.path.exists(os.path.join(args.out_dir, META)) and not args.overwrite  # noqa: E731
    # done, unless a staging or .old folder says a crashed run is to finish first
    if prepared() and not os.path.exists(staging) and not os.path.exists(f"{args.out_dir}.old"):
        print(f"{args.out_dir} is already prepared (see its meta.json); --overwrite redoes it")
        return
    check_inputs(args)  # everything about the inputs, before anything is written
    check_out_dir(args.out_dir, args.overwrite)
    fp = fingerprint(args)  # before the lock: reading sizes and mtimes touches nothing
    lock_fd = take_lock(staging)  # held until release_lock: one run per out_dir at a time
    try:
        recover(staging, args.out_dir)  # a run killed in publish() left a half-swapped pair
        if prepared():
            print(f"{args.out_dir} is already prepared (see its meta.json); --overwrite redoes it")
            return
        state = resume_state(staging, fp)  # None: start afresh; else: the half-made run's state
        if state is None or not os.path.exists(os.path.join(staging, META)):  # else: finished, not yet moved
            state = state or {"fingerprint": fp}  # the fingerprint first: a resume knows which command it belongs to
            save_json(os.path.join(staging, STATE), state)
            try:  # each writes into staging, meta.json last; only pretraining is resumable
                if args.sft or args.hellaswag:
                    (prepare_sft if args.sft else prepare_hellaswag)(args, staging)
                else:
                    prepare_pretraining(args, staging, state, lock_fd)
            except DataError:  # the same command would fail the same way: nothing here to resume
                remove_dataset(staging, keep_lock=True)
                raise
        else:
            print(f"{staging} was complete: moving it to {args.out_dir} (this run tokenized 0 tokens)")
        die_here("publish")
        check_out_dir(args.out_dir, args.overwrite)  # again: the user may have put files there meanwhile
        publish(staging, args.out_dir)
    finally:
        release_lock(staging, lock_fd)


def main(argv=None):
    args = parse_args(argv)
    _hits.clear()  # the test hook counts per run (tests call main() many times)
    try:
        if args.verify:
            verify(args.verify)
        elif args.bench:
            check_inputs(args)
            bench(args)
        else:
            prepare(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except (ConnectionError, TimeoutError) as e:  # the Hub went away: nothing is lost
        sys.exit(f"error: lost the connection to {args.dataset} ({e}); run the same command again to resume")
    except KeyboardInterrupt:
        sys.exit(f"error: interrupted; {args.out_dir} is unchanged, and the same command resumes after the "
                 "last complete shard")
    except OSError as e:  # a full or read-only disk is the user's to fix; any other OSError is a bug
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise
        sys.exit(f"error: cannot write {e.filename or args.out_dir}: {e.strerror}; free space or choose another --out_dir")


if __name__ == "__main__":
    main()
