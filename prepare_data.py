"""
Turn text into what train_gpt2.py reads: GPT-2 token shards (uint16 .npy files, every document
after an <|endoftext|>), a validation split first, and a meta.json that lists them.

    python prepare_data.py                     # FineWeb-Edu sample-10BT -> data/fineweb_edu_10B (~10B tokens)
    python prepare_data.py --dataset roneneldan/TinyStories --out_dir data/tinystories
    python prepare_data.py --files input.txt more.jsonl rows.parquet --out_dir data/mine
    python prepare_data.py --sft               # Stanford Alpaca, prompts masked out, for --mode finetune
    python prepare_data.py --hellaswag         # HellaSwag's validation set, for --mode eval
    python prepare_data.py --verify data/fineweb_edu_10B   # every file against meta.json's checksums

The main path comes first, in the order things happen: rows read (from local files, or streamed
from the Hub), tokenized by a pool of processes, cut into shards, and meta.json. Behind it:
instruction data (--sft), HellaSwag, then what keeps a user's work safe (a run builds in
<out_dir>.partial, moves it into place whole, and resumes after its last shard when the same
command runs again), --verify, and the command line.
"""

import argparse
import contextlib
import errno
import functools
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import socket
import sys
import urllib.request
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Stanford Alpaca's prompts: the answer follows them.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Characters sent to a tokenizer process at a time: about 60k tokens.
BATCH_CHARS = 1 << 18
# In the staging folder, the command and its progress; in a dataset, its index.
STATE = "state.json"
META = "meta.json"


class UserError(Exception):
    """Bad input from the user: printed as one line that says what to do, without a traceback."""


# -----------------------------------------------------------------------------
# Reading rows. Each reader yields (row, where, after): the row (a dict, as datasets gives),
# where it is (for messages), and the position just after it, from which a resumed run reads on.


def jsonl_rows(path, offset, line, errors):
    """A .jsonl file's rows, from byte offset on (line is that line's number); after: (offset, line)."""
    # Binary: len(raw) counts bytes, so that offset stays a true seek position.
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            where = f"{path}, line {line}"
            text = decode(raw, errors, path, line)
            line += 1
            # Blank lines (a trailing one, often) are not rows.
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{where}: not valid JSON ({e.msg}); fix or delete that line"
                ) from None
            yield row, where, (offset, line)


def json_rows(path, first, errors):
    """A .json file's rows from row number first on; after: (the next row's number, 0)."""
    # The whole file at once: the standard library cannot stream a JSON list.
    try:
        rows = json.loads(decode(Path(path).read_bytes(), errors, path))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file"
        ) from None
    # One object, or JSON lines saved as .json.
    if not isinstance(rows, list):
        raise UserError(
            f"{path}: expected a JSON list of objects; for one object per line, name it .jsonl"
        )
    for i in range(first, len(rows)):
        yield rows[i], f"{path}, row {i + 1}", (i + 1, 0)


def parquet_rows(path, first):
    """A .parquet file's rows from row number first on, a batch at a time; after: as json_rows."""
    import pyarrow  # it comes with datasets
    import pyarrow.parquet as pq

    before = 0  # rows in the batches before this one
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            rows = batch.to_pylist()
            for i in range(max(first - before, 0), len(rows)):
                number = before + i + 1
                yield rows[i], f"{path}, row {number}", (number, 0)
            before += len(rows)
    except pyarrow.ArrowException as e:
        # Not parquet, or cut short.
        raise UserError(
            f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); check the file, or "
            "name it by what it holds (.txt, .jsonl, .json)"
        ) from None


def decode(raw, errors, path, line=None):
    """Bytes to text, a byte-order mark dropped; a bad byte's message names its line, as
    Latin-1 files are common."""
    try:
        return raw.decode("utf-8-sig", errors)
    except UnicodeDecodeError as e:
        # A whole file: the bad byte's line is one more than the newlines before it.
        if line is None:
            line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}, line {line}: not UTF-8 (byte {raw[e.start]:#04x}); convert the file to "
            "UTF-8, or pass --encoding_errors replace to replace bad bytes with U+FFFD"
        ) from None


def file_rows(path, start, args):
    """One file's rows from position start, read as its suffix says; any other file is plain
    text, one document: its position is (0, 1) before it and (1, 0) after it."""
    offset, line = start
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        yield from jsonl_rows(path, offset, line, args.encoding_errors)
    elif suffix == ".json":
        yield from json_rows(path, offset, args.encoding_errors)
    elif suffix == ".parquet":
        yield from parquet_rows(path, offset)
    elif offset == 0:
        text = decode(Path(path).read_bytes(), args.encoding_errors, path)
        yield {args.text_column: text}, path, (1, 0)


def stream_position(stream, rows_read):
    """Where a streamed dataset is: datasets' own state, and the rows read (for messages)."""
    return {"stream": stream.state_dict(), "row": rows_read}


def read_rows(args, start=None):
    """Every row of --files, or of the streamed --dataset, from position start on."""
    if args.files:
        # A position in --files: {file, offset, line}. Files after the first are read from the top.
        if start is None:
            start = {"file": 0, "offset": 0, "line": 1}
        for i in range(start["file"], len(args.files)):
            first = (0, 1)
            if i == start["file"]:
                first = (start["offset"], start["line"])
            for row, where, (offset, line) in file_rows(args.files[i], first, args):
                yield row, where, {"file": i, "offset": offset, "line": line}
        return
    # Imported here: --files never needs it, and it is slow to import.
    import datasets

    # Streamed: rows arrive over the network as they are tokenized; nothing is cached on disk.
    try:
        stream = datasets.load_dataset(args.dataset, args.subset, split=args.split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        # A wrong name, subset or split, or no network.
        raise UserError(f"cannot open dataset {args.dataset}: {str(e).splitlines()[0]}") from None
    rows_read = 0
    if start is not None:
        # datasets reopens the right file at the right row.
        stream.load_state_dict(start["stream"])
        rows_read = start["row"]
    for row in stream:
        rows_read += 1
        # The position is a function, called only where a batch is cut: stream.state_dict()
        # costs ~7 us, half again a row's reading, on the one process that feeds every tokenizer.
        after = functools.partial(stream_position, stream, rows_read)
        yield row, f"{args.dataset} row {rows_read}", after


def describe_source(args):
    if args.files:
        return " ".join(args.files)
    if args.subset:
        return f"{args.dataset} ({args.subset})"
    return args.dataset


def describe(value):
    """A value in a message, cut at 40 characters: a whole document would drown the message."""
    if value is None:
        return "null"
    return repr(value)[:40]


def text_of(row, name, where):
    """The text of a pretraining row: its column `name`."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is {describe(row)}, not an object with a {name!r} column")
    if name not in row:
        raise UserError(
            f"{where} has no column {name!r}; its columns are: {', '.join(map(str, row))} "
            "(see --text_column)"
        )
    if not isinstance(row[name], str):
        raise UserError(
            f"{where}: {name!r} is {describe(row[name])}, not text; fix or remove that row"
        )
    return row[name]


# -----------------------------------------------------------------------------
# Tokenizing in parallel, in document order, with bounded memory


def tokenize_documents(texts):
    """Texts -> one uint16 array: each document's tokens, each after <|endoftext|>."""
    import tiktoken

    # Loaded once per process: tiktoken keeps it.
    encoder = tiktoken.get_encoding("gpt2")
    # A Python list, then one conversion: cheaper than growing an array.
    tokens = []
    for text in texts:
        tokens.append(encoder.eot_token)
        tokens.extend(encoder.encode_ordinary(text))
    # GPT-2's 50,257 ids fit; numpy refuses one that does not, rather than wrap it.
    return np.array(tokens, dtype=np.uint16)


def batches_of_documents(documents, start=None):
    """(text, after) documents -> (position, texts) batches of ~BATCH_CHARS characters, one
    process's work; position is where the batch's first document is read from, to resume from."""
    batch = []
    size = 0
    position = start
    for text, after in documents:
        batch.append(text)
        # Characters, not bytes or tokens: free to count, and close enough.
        size += len(text)
        if size >= BATCH_CHARS:
            yield position, batch
            # A stream's position is a function: computed now, where it is needed.
            if callable(after):
                after = after()
            position = after
            batch = []
            size = 0
    if batch:
        yield position, batch


def start_worker(lock):
    """A tokenizer process leaves Ctrl-C to its parent, and lets go of a lock it inherited by fork
    (else the lock would outlive a parent killed with -9)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lock is not None:
        os.close(lock)


def tokenize_in_parallel(batches, num_proc, lock=None):
    """(position, texts) batches -> (position, tokens), in document order. Two batches per process
    are in flight at a time (Pool.imap would queue the whole corpus)."""
    # One process: no pool to start, and a traceback that points at the bug.
    if num_proc <= 1:
        for position, batch in batches:
            yield position, tokenize_documents(batch)
        return
    # A spawned process does not inherit the lock's file descriptor: it has none to close.
    if mp.get_start_method() != "fork":
        lock = None
    with mp.Pool(num_proc, start_worker, (lock,)) as pool:
        in_flight = deque()  # (position, AsyncResult), oldest first
        for position, batch in batches:
            in_flight.append((position, pool.apply_async(tokenize_documents, (batch,))))
            # One batch running and one queued per process: no worker waits.
            if len(in_flight) >= 2 * num_proc:
                # The oldest first, whichever finishes first: document order.
                position, result = in_flight.popleft()
                yield position, result.get()
        for position, result in in_flight:
            yield position, result.get()


# -----------------------------------------------------------------------------
# Cutting into shards, each written atomically with its checksum, and meta.json


def write_whole(path, *chunks):
    """Write under a temporary name, then rename: the file under its name is whole, the old or the
    new one after a crash. Returns its sha256, from the bytes as they are written (no re-read)."""
    digest = hashlib.sha256()
    # The same folder: os.replace is atomic only within one file system.
    with open(f"{path}.tmp", "wb") as f:
        for chunk in chunks:
            f.write(chunk)  # a shard's buffer itself: its 200 MB are not copied
            digest.update(chunk)
        f.flush()
        # On disk before the name says it is whole.
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
    return digest.hexdigest()


def save_npy(path, array):
    """The bytes np.save writes; returns their sha256, as sha256sum sees the file."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return write_whole(path, header.getvalue(), array.data)


def save_json(path, obj):
    # Indented: people read meta.json too.
    write_whole(path, (json.dumps(obj, indent=2) + "\n").encode())


class ShardWriter:
    """Tokens into shards: val_000000.npy, ... until val_tokens are written, then train_000000.npy,
    ...; after each shard, state.json says how far the run got."""

    def __init__(self, out_dir, shard_size, val_tokens, state):
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.val_tokens = val_tokens
        self.state = state
        # The one big allocation: memory follows --shard_size.
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0  # tokens in the buffer, not yet in a shard
        # The state's own (commit() saves them), and meta.json's in the end.
        empty = {
            split: {"tokens": 0, "shards": [], "shard_tokens": [], "sha256": []}
            for split in ("val", "train")
        }
        self.splits = state.setdefault("splits", empty)

    def split(self):
        """val until val_tokens are written, then train for good."""
        if self.splits["val"]["tokens"] < self.val_tokens:
            return "val"
        return "train"

    def room(self):
        """Room left in the shard being filled: a val shard also ends where the val split does."""
        end = self.shard_size
        if self.split() == "val":
            end = min(end, self.val_tokens - self.splits["val"]["tokens"])
        return end - self.filled

    def add(self, tokens, position, done):
        """Tokens of the batch read from position, of which `done` were added before these."""
        while len(tokens):
            n = min(len(tokens), self.room())
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            done += n
            if self.room() == 0:
                self.write(self.split(), self.buffer[: self.filled])
                # The moment the shard counts: a resumed run rereads this batch, skipping `done`.
                self.commit({"position": position, "skip": done})

    def write(self, split, tokens):
        record = self.splits[split]
        # Six digits: the names sort in order.
        name = f"{split}_{len(record['shards']):06d}.npy"
        # The checksum is for --verify; each shard's length, for train_gpt2.py to check.
        record["sha256"].append(save_npy(os.path.join(self.out_dir, name), tokens))
        record["shards"].append(name)
        record["shard_tokens"].append(len(tokens))
        record["tokens"] += len(tokens)
        self.filled = 0

    def finish(self, cut_small_corpus):
        """The tokens left into a last, shorter shard; then state.json says every row is read."""
        tokens = self.buffer[: self.filled]
        # Nothing in val yet: the whole corpus is in the buffer, and it is smaller than a shard
        # (the default --val_tokens), so its first 10% becomes the val split.
        if cut_small_corpus and len(tokens) and not self.splits["val"]["tokens"]:
            cut = max(1, len(tokens) // 10)
            print(
                f"note: the corpus is smaller than one shard; its first 10% ({cut:,} tokens) is the val split"
            )
            self.write("val", tokens[:cut])
            self.write("train", tokens[cut:])
        elif len(tokens):
            self.write(self.split(), tokens)
        # A run resumed from here only writes meta.json.
        self.commit({"finished": True})

    def commit(self, resume):
        self.state["resume"] = resume
        save_json(os.path.join(self.out_dir, STATE), self.state)


def tokenize_into_shards(args, writer, resume, lock):
    """Every row from the resume position on, tokenized in parallel, into shards; returns how many
    tokens this run tokenized."""
    rows = read_rows(args, resume["position"])
    # rows -> (text, after) documents -> (position, texts) batches -> (position, tokens)
    documents = ((text_of(row, args.text_column, where), after) for row, where, after in rows)
    batches = batches_of_documents(documents, resume["position"])
    # A resumed run reads its first batch again: the tokens of it already in shards are dropped.
    written = writer.splits["val"]["tokens"] + writer.splits["train"]["tokens"]
    if written:
        print(f"resuming {writer.out_dir}: {written:,} tokens already in shards")
    skip = resume["skip"]
    tokenized = 0
    bar = tqdm(
        unit="tok",
        unit_scale=True,
        desc=f"tokenizing into {args.out_dir}",
        smoothing=0.1,
        initial=written,
    )
    with bar:
        for position, tokens in tokenize_in_parallel(batches, args.num_proc, lock):
            done = min(skip, len(tokens))
            skip -= done
            tokenized += len(tokens)
            writer.add(tokens[done:], position, done)
            bar.update(len(tokens) - done)
    return tokenized


def prepare_pretraining(args, staging, state, lock):
    """Rows -> tokens -> shards, then meta.json; a resumed run reads on from state.json."""
    # One shard of val by default, as build-nanogpt's fineweb.py.
    val_tokens = args.shard_size
    if args.val_tokens:
        val_tokens = args.val_tokens
    writer = ShardWriter(staging, args.shard_size, val_tokens, state)
    # A fresh run: from the start, with nothing to skip.
    resume = state.get("resume", {"position": None, "skip": 0})
    tokenized = 0
    if not resume.get("finished"):
        tokenized = tokenize_into_shards(args, writer, resume, lock)
        writer.finish(cut_small_corpus=args.val_tokens is None)
    train = writer.splits["train"]
    val = writer.splits["val"]
    if not train["tokens"]:
        raise UserError(
            f"all {val['tokens']:,} tokens are in the val split: give a smaller --val_tokens"
        )
    meta = {
        "kind": "pretrain",
        "source": describe_source(args),
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "shard_size": args.shard_size,
        "splits": writer.splits,
    }
    save_json(os.path.join(staging, META), meta)
    shards = len(train["shards"]) + len(val["shards"])
    print(
        f"wrote {train['tokens']:,} train and {val['tokens']:,} val tokens in {shards} shards to "
        f"{args.out_dir} (this run tokenized {tokenized:,} tokens)"
    )


# -----------------------------------------------------------------------------
# Instruction data (--sft, Alpaca) and HellaSwag (--hellaswag): small, so made in one go


def alpaca_example(row, where):
    """An Alpaca record as (prompt, answer) text: the prompt is the instruction (and its optional
    input) in Alpaca's template."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is {describe(row)}, not an Alpaca record")
    for key in ("instruction", "output"):
        if key not in row:
            raise UserError(
                f"{where} has no column {key!r}; Alpaca data needs instruction, input (optional) "
                f"and output; its columns are: {', '.join(map(str, row))}"
            )
    # An input absent, null or "" is all the same: none.
    context = row.get("input")
    if context is None:
        context = ""
    if not all(isinstance(field, str) for field in (row["instruction"], context, row["output"])):
        raise UserError(
            f"{where}: instruction, input and output must be text; fix or remove that row"
        )
    template = ALPACA_PROMPT_WITH_INPUT if context else ALPACA_PROMPT
    return template.format(instruction=row["instruction"], input=context), row["output"]


def tokenize_examples(args):
    """Every Alpaca record as (prompt tokens, answer tokens), and how many were dropped as longer
    than --block_size. One process: Alpaca's ~10M tokens need no pool."""
    import tiktoken

    encoder = tiktoken.get_encoding("gpt2")
    examples = []
    dropped = 0
    for row, where, _ in read_rows(args):
        prompt, answer = alpaca_example(row, where)
        # Prompt and answer are tokenized apart, as at inference: the boundary falls where it will then.
        prompt_tokens = encoder.encode_ordinary(prompt)
        # <|endoftext|> ends the answer: the model learns to stop.
        answer_tokens = encoder.encode_ordinary(answer) + [encoder.eot_token]
        # A cut example would teach answers that end mid-sentence.
        if len(prompt_tokens) + len(answer_tokens) > args.block_size:
            dropped += 1
        else:
            examples.append((prompt_tokens, answer_tokens))
    return examples, dropped


def save_examples(staging, split, examples, checksums):
    """A split's examples, concatenated, into {split}_tokens.npy, _mask.npy (1: an answer's token)
    and _offsets.npy (example i is tokens[offsets[i]:offsets[i + 1]]); returns its counts."""
    tokens = []
    mask = []
    offsets = [0]
    for prompt, answer in examples:
        tokens += prompt + answer
        # The loss counts the answer only.
        mask += [0] * len(prompt) + [1] * len(answer)
        offsets.append(len(tokens))
    arrays = {
        "tokens": np.array(tokens, dtype=np.uint16),
        "mask": np.array(mask, dtype=np.uint8),
        "offsets": np.array(offsets, dtype=np.int64),
    }
    for name, array in arrays.items():
        filename = f"{split}_{name}.npy"
        checksums[filename] = save_npy(os.path.join(staging, filename), array)
    return {"examples": len(examples), "tokens": len(tokens), "answer_tokens": sum(mask)}


def prepare_sft(args, staging):
    """Alpaca's records -> tokenized examples -> a val and a train split, then meta.json."""
    examples, dropped = tokenize_examples(args)
    # A val and a train example at least.
    if len(examples) < 2:
        raise UserError(
            f"{describe_source(args)} has {len(examples)} example(s) of <= {args.block_size} "
            "tokens: 2 at least"
        )
    # Seeded: the same command makes the same split. The split is random, the order within it stable.
    order = np.random.default_rng(args.seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(len(examples) * args.val_fraction)))
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    meta = {
        "kind": "sft",
        "source": describe_source(args),
        "command": args.command,
        "block_size": args.block_size,
        "tokenizer": "gpt2",
        # The template, for chat to wrap prompts in.
        "prompt_template": ALPACA_PROMPT,
        "prompt_template_with_input": ALPACA_PROMPT_WITH_INPUT,
        "dropped_too_long": dropped,
        "splits": {},
        "sha256": {},
    }
    for split, indices in splits.items():
        chosen = [examples[i] for i in indices]
        meta["splits"][split] = save_examples(staging, split, chosen, meta["sha256"])
    save_json(os.path.join(staging, META), meta)
    train = meta["splits"]["train"]
    val = meta["splits"]["val"]
    print(
        f"wrote {train['examples']:,} train and {val['examples']:,} val examples to "
        f"{args.out_dir}; dropped {dropped:,} longer than {args.block_size} tokens"
    )


def hellaswag_item(row, where):
    """A HellaSwag row checked: its ctx, 4 endings and label (0..3), and the fields
    lm-evaluation-harness builds its query from."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is {describe(row)}, not a HellaSwag row (ctx, endings, label)")
    if not {"ctx", "endings", "label"} <= set(row):
        raise UserError(
            f"{where} is not HellaSwag: rows need ctx, endings (4) and label; got "
            f"{', '.join(map(str, row))}"
        )
    endings = row["endings"]
    if (
        not isinstance(endings, list)
        or len(endings) != 4
        or not all(isinstance(e, str) for e in endings)
    ):
        raise UserError(
            f"{where}: HellaSwag needs exactly 4 endings (text); fix or remove that item"
        )
    # The test split has none; a number or a string ("2") alike.
    label = str(row["label"])
    if label not in ("0", "1", "2", "3"):
        raise UserError(
            f"{where}: label {row['label']!r} is not 0..3 (the test split has none: use validation)"
        )
    item = {"ctx": row["ctx"], "endings": endings, "label": int(label)}
    for key in ("activity_label", "ctx_a", "ctx_b"):
        if isinstance(row.get(key), str):
            item[key] = row[key]
    return item


def prepare_hellaswag(args, staging):
    """HellaSwag's items as JSON lines: the file train_gpt2.py's --hellaswag_path reads."""
    items = [hellaswag_item(row, where) for row, where, _ in read_rows(args)]
    lines = "".join(json.dumps(item) + "\n" for item in items)
    digest = write_whole(os.path.join(staging, "hellaswag_val.jsonl"), lines.encode())
    meta = {
        "kind": "hellaswag",
        "source": describe_source(args),
        "items": len(items),
        "sha256": {"hellaswag_val.jsonl": digest},
    }
    save_json(os.path.join(staging, META), meta)
    print(
        f"wrote {len(items):,} HellaSwag items to {os.path.join(args.out_dir, 'hellaswag_val.jsonl')}"
    )


# -----------------------------------------------------------------------------
# What keeps the user's work safe: inputs checked before anything is written; one run per
# folder; everything built in <out_dir>.partial, resumable, and moved into place only whole;
# only files of ours ever deleted.


def check_row(args, row, where):
    if args.sft:
        return alpaca_example(row, where)
    return hellaswag_item(row, where) if args.hellaswag else text_of(row, args.text_column, where)


def check_inputs(args, rows_per_file=100):
    """Before anything is written: tiktoken's files, the Hub, every input's first rows (opens, decodes, has the column)."""
    try:
        tokenize_documents(
            [""]
        )  # once in this process: a missing file fails here, not in 8 workers
    except (
        Exception
    ) as e:  # tiktoken downloads GPT-2's files once; offline that fails deep in requests
        raise UserError(
            f"tiktoken has no GPT-2 files ({type(e).__name__}): it downloads them once; offline, set "
            "TIKTOKEN_CACHE_DIR to a folder holding them"
        ) from None
    if not (
        args.files
        or os.path.isdir(args.dataset)
        or {"https", "all"} & urllib.request.getproxies().keys()
    ):
        from huggingface_hub import (
            constants,
        )  # the Hub streams the rows: it must answer now, not after a minute of retries

        host = constants.ENDPOINT.split("://")[-1].split("/")[
            0
        ]  # huggingface.co, or the HF_ENDPOINT mirror
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as e:
            raise UserError(
                f"--dataset {args.dataset} is streamed from {host}, which cannot be reached ({e.strerror or e}): "
                "connect, or give local files (--files) or a folder of them (--dataset DIR)"
            ) from None
    empty = True
    for path in args.files or [None]:  # one file at a time, so that an error names it
        if path and not os.path.isfile(path):
            raise UserError(
                f"file not found: {path}"
                if not os.path.exists(path)
                else f"cannot read {path}: it is a folder"
            )
        rows = read_rows(argparse.Namespace(**{**vars(args), "files": [path] if path else None}))
        for row, where, _ in itertools.islice(
            rows, rows_per_file
        ):  # enough to catch a wrong format or column
            empty = (
                empty and not str(check_row(args, row, where)).strip()
            )  # (the rest is checked as it is read)
        rows.close()
    if empty:  # after all sources: one empty file among others is fine
        raise UserError(
            f"the corpus {describe_source(args)} is empty: no rows, or blank documents only"
        )


def dataset_files(meta):  # the files a meta.json describes, besides itself
    return (
        set(meta.get("sha256", {}))
        if meta.get("kind") in ("sft", "hellaswag")
        else {name for split in meta.get("splits", {}).values() for name in split.get("shards", [])}
    )


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(
            f"{path} not found: not a prepared folder, or its preparation is unfinished (run it again)"
        ) from None
    except json.JSONDecodeError:
        raise UserError(
            f"{path} is not readable JSON: not prepare_data.py's, or edited; move it away"
        ) from None


def remove_dataset(folder):
    """Delete a dataset of ours, then its folder if nothing else is in it: a file we did not write stays."""
    names = {META, STATE} | (
        dataset_files(read_json(os.path.join(folder, META)))
        if os.path.exists(os.path.join(folder, META))
        else set()
    )
    for name in os.listdir(folder):
        if (
            name in names
            or name.endswith(".tmp")
            or (folder.endswith(".partial") and name.endswith(".npy"))
        ):
            Path(folder, name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: someone else's files are in it
        os.rmdir(folder)


def check_out_dir(
    out_dir, overwrite
):  # an output that is a file, or holds files not ours, is refused
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file; choose a folder")
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    if names and META not in names:
        raise UserError(
            f"{out_dir} is a folder that is not a prepared dataset (no meta.json): choose another --out_dir"
        )
    foreign = (
        sorted(names - dataset_files(read_json(os.path.join(out_dir, META))) - {META, STATE})
        if overwrite and names
        else []
    )
    if foreign:
        raise UserError(
            f"{out_dir} holds files not part of its dataset ({', '.join(foreign[:3])}): move them away first"
        )


def take_lock(staging):
    """An flock on the staging folder itself: the kernel drops it if the process dies (no false "busy")."""
    if os.path.exists(staging) and not os.path.isdir(staging):
        raise UserError(
            f"{staging} is in the way: prepare_data.py builds there, and it is a file; move it away"
        )
    os.makedirs(staging, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: runs into one folder are not locked
        return None
    fd = os.open(staging, os.O_RDONLY)
    try:
        fcntl.flock(
            fd, fcntl.LOCK_EX | fcntl.LOCK_NB
        )  # LOCK_NB: fail at once, rather than wait for the other run
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"another prepare_data.py is writing {staging}; wait for it to finish, or stop it"
        ) from None
    return fd


def fingerprint(
    args,
):  # what decides the output: a half-made folder is resumed by the same command only
    paths = args.files or (
        sorted(map(str, Path(args.dataset).rglob("*"))) if os.path.isdir(args.dataset) else []
    )
    inputs = [
        [os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns]
        for p in paths
        if os.path.isfile(p)
    ]
    kind = "sft" if args.sft else "hellaswag" if args.hellaswag else "pretrain"
    options = {
        "pretrain": ("text_column", "shard_size", "val_tokens"),
        "sft": ("block_size", "val_fraction", "seed"),
    }
    # a file edited is caught by its size and mtime (no hashing of gigabytes); a Hub dataset, by its name
    return {
        "kind": kind,
        "inputs": inputs + ([] if args.files else [args.dataset, args.subset, args.split]),
        "encoding_errors": args.encoding_errors,
        **{name: getattr(args, name) for name in options.get(kind, ())},
    }


def resume_state(
    staging, fp
):  # the state of a half-made run of this same command, or None to start afresh
    path = os.path.join(staging, STATE)
    if not os.path.exists(path):
        if any(not name.endswith(".tmp") for name in os.listdir(staging)):
            raise UserError(
                f"{staging} is in the way: prepare_data.py builds there, and it holds files not ours"
            )
        return None
    state = read_json(path)
    if state.get("fingerprint") != fp:
        differs = next(
            (key for key in fp if (state.get("fingerprint") or {}).get(key) != fp[key]),
            "the command",
        )
        raise UserError(
            f"{staging} holds a half-made preparation by another command (its {differs} differs); re-run "
            f"that command to finish it, or delete {staging} to start over"
        )
    shards = [
        f
        for split in state.get("splits", {}).values()
        for f in zip(split["shards"], split["shard_tokens"])
    ]
    if bad := next(
        (name for name, n in shards if not shard_whole(os.path.join(staging, name), n)), None
    ):
        print(
            f"note: {os.path.join(staging, bad)} is missing or damaged since the interruption: starting over"
        )
        for name in [
            n for n in os.listdir(staging) if n.endswith((".npy", ".tmp")) or n in (META, STATE)
        ]:  # ours
            os.remove(os.path.join(staging, name))
        return None
    return state  # (a .tmp left by a killed run is written over when its file is made again)


def shard_whole(
    path, n
):  # a uint16 .npy of n tokens, neither cut short nor padded: its header read, not its data
    try:
        shard = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # missing, not .npy, or fewer bytes than its header says
        return False
    return (
        shard.dtype == np.uint16
        and shard.shape == (n,)
        and os.path.getsize(path) == shard.offset + 2 * n
    )


def recover(out_dir):
    """Finish a publish(): the new dataset loses its state.json and the old one goes; or the old one comes back."""
    if os.path.isdir(out_dir):
        Path(out_dir, STATE).unlink(missing_ok=True)  # state.json marked the new dataset until here
        if os.path.isdir(f"{out_dir}.old"):
            remove_dataset(f"{out_dir}.old")
    elif os.path.isdir(f"{out_dir}.old"):
        os.rename(f"{out_dir}.old", out_dir)


def publish(staging, out_dir):  # the finished dataset into place: an old one is replaced only now
    if os.path.isdir(out_dir):
        os.rename(out_dir, f"{out_dir}.old")
    os.rename(staging, out_dir)
    recover(out_dir)


def prepare(args):
    args.out_dir = os.path.realpath(
        args.out_dir
    )  # a link (to a bigger disk): the data goes where it points
    staging = (
        f"{args.out_dir}.partial"  # a sibling: the same file system, so the final move is a rename
    )
    done = lambda: os.path.exists(os.path.join(args.out_dir, META)) and not args.overwrite  # noqa: E731
    if done() and not os.path.exists(staging) and not os.path.exists(f"{args.out_dir}.old"):
        return print(
            f"{args.out_dir} is already prepared (see its meta.json); --overwrite redoes it"
        )
    check_inputs(args)  # everything about the inputs, before anything is written
    check_out_dir(args.out_dir, args.overwrite)
    fp = fingerprint(args)
    lock = take_lock(staging)  # held until the end: one run per out_dir at a time
    try:
        recover(args.out_dir)  # what a run killed in publish() left
        if done():  # (a crashed run's dataset, now in place)
            return print(
                f"{args.out_dir} is already prepared (see its meta.json); --overwrite redoes it"
            )
        state = resume_state(staging, fp)  # None: from the start; else the half-made run's
        if state is None or not os.path.exists(
            os.path.join(staging, META)
        ):  # else: finished, not yet moved
            state = state or {
                "fingerprint": fp
            }  # the fingerprint first: a resume knows its command
            save_json(os.path.join(staging, STATE), state)
            try:  # each writes into staging, meta.json last; only pretraining is resumable
                if args.sft or args.hellaswag:
                    (prepare_sft if args.sft else prepare_hellaswag)(args, staging)
                else:
                    prepare_pretraining(args, staging, state, lock)
            except UserError:  # the same command would fail the same way: nothing here to resume
                remove_dataset(staging)
                raise
        check_out_dir(
            args.out_dir, args.overwrite
        )  # again: the user may have put files there meanwhile
        publish(staging, args.out_dir)
    finally:
        if os.path.isdir(staging) and all(
            name.endswith(".tmp") or name == STATE for name in os.listdir(staging)
        ):
            shutil.rmtree(staging)  # no work worth resuming in it
        if lock is not None:
            os.close(lock)


# -----------------------------------------------------------------------------
# --verify: every file whole, unchanged, and of the length meta.json says


def verify(folder):
    meta = read_json(os.path.join(folder, META))
    try:  # (name, tokens or None, sha256): shards by length and checksum, the other files by checksum
        files = (
            [
                f
                for s in meta["splits"].values()
                for f in zip(s["shards"], s["shard_tokens"], s["sha256"])
            ]
            if meta["kind"] == "pretrain"
            else [(name, None, digest) for name, digest in meta["sha256"].items()]
        )
    except (KeyError, TypeError, AttributeError):
        raise UserError(
            f"{folder}/meta.json lacks what --verify checks: re-run prepare_data.py --overwrite"
        ) from None
    again = "re-run prepare_data.py --overwrite for this folder"
    for name, n, digest in files:  # in order: the first bad file is the one named
        path = os.path.join(folder, name)
        if not os.path.exists(path) or (n is not None and not shard_whole(path, n)):
            raise UserError(
                f"{path} is {f'truncated or padded (not {n:,} tokens)' if os.path.exists(path) else 'missing'}; {again}"
            )
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                raise UserError(
                    f"{path} differs from the file prepare_data.py wrote (sha256); {again}"
                )
    print(f"ok: {folder}: {len(files)} files, checksums match")


# -----------------------------------------------------------------------------
# Command line


def at_least(low, high=None):  # an argparse type: a number in its domain, or a one-line error
    def parse(text):
        value = type(low)(text)  # argparse reports a ValueError as "invalid value"
        if (
            value < low
            or (high is not None and value >= high)
            or (isinstance(low, float) and value <= low)
        ):
            raise argparse.ArgumentTypeError(
                f"must be {'between 0 and 1 (exclusive)' if high else f'at least {low}'}"
            )
        return value

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.error = lambda message: p.exit(
        2, f"error: {message} (see --help)\n"
    )  # one line, as every other mistake
    add = p.add_argument
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--sft", action="store_true", help="prepare Alpaca-style instruction data instead"
    )
    kind.add_argument(
        "--hellaswag", action="store_true", help="prepare the HellaSwag validation set instead"
    )
    add(
        "--dataset",
        help="a Hugging Face dataset or a folder of parquet/jsonl files, streamed (default: FineWeb-Edu, "
        "Alpaca with --sft, HellaSwag with --hellaswag)",
    )
    add("--subset", help="the dataset's configuration (default: sample-10BT for FineWeb-Edu)")
    add("--split", help="the dataset's split (default: train; validation with --hellaswag)")
    add(
        "--files",
        nargs="+",
        help="local .txt (one document each), .jsonl, .json or .parquet files, not --dataset",
    )
    add("--text_column", default="text", help="the column holding the text")
    add(
        "--encoding_errors",
        choices=("strict", "replace"),
        default="strict",
        help="bytes not UTF-8: stop, or U+FFFD",
    )
    add(
        "--out_dir",
        help="where to write (default: data/<the dataset's or first file's name>, data/alpaca, data/hellaswag)",
    )
    add("--shard_size", type=at_least(1), default=100_000_000, help="tokens per shard")
    add(
        "--val_tokens",
        type=at_least(1),
        help="tokens in the val split (default: a shard; 10%% of a smaller corpus)",
    )
    add("--num_proc", type=at_least(1), default=os.cpu_count(), help="tokenizer processes")
    add(
        "--overwrite",
        action="store_true",
        help="redo a complete folder; the old one stays until the new one is whole",
    )
    add(
        "--block_size",
        type=at_least(1),
        default=1024,
        help="--sft: the longest example kept, in tokens",
    )
    add(
        "--val_fraction",
        type=at_least(0.0, 1.0),
        default=0.05,
        help="--sft: the share of examples held out",
    )
    add("--seed", type=int, default=1337, help="--sft: the seed of the train/val split")
    add(
        "--verify",
        metavar="DIR",
        help="check a prepared folder's files against its meta.json, and stop",
    )
    args = p.parse_args(argv)
    args.command = shlex.join(
        ["python", "prepare_data.py", *(sys.argv[1:] if argv is None else argv)]
    )  # to redo it
    kind = "sft" if args.sft else "hellaswag" if args.hellaswag else "pretrain"
    fineweb = kind == "pretrain" and not (
        args.dataset or args.files
    )  # no source named: FineWeb-Edu's 10B sample
    if not (args.dataset or args.files):  # the kind's own dataset
        args.dataset = {"sft": "tatsu-lab/alpaca", "hellaswag": "Rowan/hellaswag"}.get(
            kind, "HuggingFaceFW/fineweb-edu"
        )
        args.subset = args.subset or ("sample-10BT" if fineweb else None)
    # by default, the folders train_gpt2.py reads: data/alpaca to fine-tune, data/hellaswag to evaluate
    source = (
        "fineweb_edu_10B"
        if fineweb
        else Path(args.files[0]).stem
        if args.files
        else Path(args.dataset).name
    )
    args.out_dir = os.path.normpath(
        args.out_dir
        or {"sft": "data/alpaca", "hellaswag": "data/hellaswag"}.get(kind, f"data/{source}")
    )  # no trailing slash: <out_dir>.partial is a sibling
    args.split = args.split or (
        "validation" if args.hellaswag else "train"
    )  # HellaSwag's test split has no labels
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        verify(args.verify) if args.verify else prepare(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except (ConnectionError, TimeoutError) as e:  # the Hub went away: nothing is lost
        sys.exit(
            f"error: lost the connection to {args.dataset} ({e}); run the same command again to resume"
        )
    except MemoryError:  # np.empty(shard_size) is the one big allocation
        sys.exit(
            f"error: out of memory: a shard of --shard_size {args.shard_size:,} tokens does not fit; give a smaller one"
        )
    except KeyboardInterrupt:
        sys.exit(
            f"error: interrupted; {args.out_dir} is unchanged, and the same command resumes the work"
        )
    except (
        OSError
    ) as e:  # a full or read-only disk is the user's to fix; any other OSError is a bug
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise
        sys.exit(
            f"error: cannot write {e.filename or args.out_dir}: {e.strerror}; free space or choose another --out_dir"
        )


if __name__ == "__main__":
    main()
