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
from the Hub), tokenized by a pool of processes, cut into shards, then meta.json. Behind it:
instruction data (--sft) and HellaSwag; what keeps a user's work safe (a run builds in
<out_dir>.partial, moves it into place only whole, and resumes after its last shard when the
same command runs again); --verify; and the command line.
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
import urllib.parse
import urllib.request
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm


class UserError(Exception):
    """Bad input from the user: printed as one line that says what to do, without a traceback."""


def say(line):
    """A line for the user. A closed stdout (`| head -n 1`) costs no file: the work goes on, and
    the lines after go to os.devnull (progress goes to stderr)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: into os.devnull, without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -----------------------------------------------------------------------------
# Reading rows. Each reader yields (row, where, after): the row (a dict, as datasets gives it),
# where it is (for messages), and the position just after it, from which a resumed run reads on.


def jsonl_rows(path, offset, line, errors):
    """A .jsonl file's rows, from byte offset on (line is that line's number). After a row, the
    position is (offset, line) of the next one."""
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
                raise UserError(f"{where}: not valid JSON ({e.msg}); fix or delete that line")
            yield row, where, (offset, line)


def parquet_rows(path):
    """A .parquet file's rows, read a batch at a time: the file need not fit in memory."""
    import pyarrow  # it comes with datasets
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except pyarrow.ArrowException as e:
        # Not parquet, or cut short.
        raise UserError(
            f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); check the file, or "
            "name it by what it holds (.txt, .jsonl, .json)"
        )


def json_list(text, path):
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file")
    # One object, or JSON lines saved as .json.
    if not isinstance(rows, list):
        raise UserError(
            f"{path}: expected a JSON list of objects; for one object per line, name it .jsonl"
        )
    return rows


def decode(raw, errors, path, line=None):
    """Bytes to text, a byte-order mark dropped. A bad byte's message names its line: Latin-1
    files are common."""
    try:
        return raw.decode("utf-8-sig", errors)
    except UnicodeDecodeError as e:
        # A whole file: the bad byte's line is one more than the newlines before it.
        if line is None:
            line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}, line {line}: not UTF-8 (byte {raw[e.start]:#04x}); convert the file to "
            "UTF-8, or pass --encoding_errors replace to replace bad bytes with U+FFFD"
        )


def file_rows(path, start, args):
    """One file's rows from position start on, read as its name's suffix says."""
    offset, line = start
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        yield from jsonl_rows(path, offset, line, args.encoding_errors)
        return
    # The other formats are read row by row: a position is (the next row's number, 0).
    if suffix == ".parquet":
        rows = parquet_rows(path)
    else:
        # The whole file at once: the standard library cannot stream a JSON list, and any other
        # file is plain text, one document.
        text = decode(Path(path).read_bytes(), args.encoding_errors, path)
        rows = [{args.text_column: text}]
        if suffix == ".json":
            rows = json_list(text, path)
    for number, row in enumerate(rows, 1):
        # The rows before the position were read by an earlier run.
        if number > offset:
            yield row, f"{path}, row {number}", (number, 0)


def stream_position(stream, rows_read):
    return {"stream": stream.state_dict(), "row": rows_read}


def read_rows(args, start=None):
    """Every row of --files, or of the streamed --dataset, from position start on."""
    if args.files:
        # A position in --files: {file, offset, line}.
        if start is None:
            start = {"file": 0, "offset": 0, "line": 1}
        first = (start["offset"], start["line"])
        for i in range(start["file"], len(args.files)):
            for row, where, (offset, line) in file_rows(args.files[i], first, args):
                yield row, where, {"file": i, "offset": offset, "line": line}
            # The files after the first are read from the top.
            first = (0, 1)
        return
    # Imported here: --files never needs it, and it is slow to import.
    import datasets

    # Streamed: rows arrive over the network as they are tokenized; nothing is cached on disk.
    try:
        stream = datasets.load_dataset(args.dataset, args.subset, split=args.split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        # A wrong name, subset or split, or no network.
        raise UserError(f"cannot open dataset {args.dataset}: {str(e).splitlines()[0]}")
    # A position in a stream is datasets' own state, which reopens the right file at the right
    # row, and the number of rows read, for messages.
    rows_read = 0
    if start is not None:
        stream.load_state_dict(start["stream"])
        rows_read = start["row"]
    for number, row in enumerate(stream, rows_read + 1):
        # The position is a function, called only where a batch is cut: stream.state_dict()
        # costs ~7 us, half again a row's reading, on the one process that feeds every tokenizer.
        after = functools.partial(stream_position, stream, number)
        yield row, f"{args.dataset} row {number}", after


def describe_source(args):
    if args.files:
        return " ".join(args.files)
    if args.subset:
        return f"{args.dataset} ({args.subset})"
    return args.dataset


def describe(value):
    """A value in a message, as JSON spells it (null, not None): 40 characters at most, as a whole
    document would drown the message."""
    return json.dumps(value, default=str)[:40]


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

# Characters sent to a tokenizer process at a time: about 60k tokens.
BATCH_CHARS = 1 << 18


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


def batches_of_documents(documents, start):
    """(text, after) documents -> (position, texts) batches of ~BATCH_CHARS characters, a
    process's work. A batch's position is where its first document is read from: a resumed run
    reads on from there."""
    batch = []
    size = 0
    position = start
    for text, after in documents:
        batch.append(text)
        # Characters, not bytes or tokens: free to count, and close enough.
        size += len(text)
        if size >= BATCH_CHARS:
            yield position, batch
            # A stream's position is a function: computed here, where it is needed.
            if callable(after):
                after = after()
            position = after
            batch = []
            size = 0
    if batch:
        yield position, batch


def start_worker(lock):
    """A tokenizer process leaves Ctrl-C to its parent, and lets go of a lock it inherited by
    fork: else a parent killed with -9 would leave the folder locked while its workers live on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lock is not None:
        os.close(lock)


def tokenize_in_parallel(batches, num_proc, lock):
    """(position, texts) batches -> (position, tokens), in document order, with two batches a
    process in flight at a time (Pool.imap would queue the whole corpus)."""
    # A spawned process starts afresh: it holds no lock to let go of.
    if mp.get_start_method() != "fork":
        lock = None
    with mp.Pool(num_proc, start_worker, (lock,)) as pool:
        # (position, AsyncResult), the oldest first.
        in_flight = deque()
        for position, batch in batches:
            in_flight.append((position, pool.apply_async(tokenize_documents, (batch,))))
            # One batch running and one queued per process: no worker waits.
            if len(in_flight) >= 2 * num_proc:
                # The oldest, whichever finishes first: document order.
                position, result = in_flight.popleft()
                yield position, result.get()
        for position, result in in_flight:
            yield position, result.get()


# -----------------------------------------------------------------------------
# Cutting into shards, each written atomically with its checksum, then meta.json. While a run
# builds, state.json beside the shards says which command it is and how far it got.


def write_whole(path, *chunks):
    """Writes under a temporary name, then renames: the file under its name is whole, the old or
    the new one after a crash. Returns its sha256, from the bytes as they are written."""
    digest = hashlib.sha256()
    # The same folder: os.replace is atomic only within one file system.
    with open(f"{path}.tmp", "wb") as f:
        for chunk in chunks:
            # A shard's buffer itself: its 200 MB are not copied.
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        # On disk before the name says it is whole.
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
    return digest.hexdigest()


def save_npy(path, array):
    """The bytes np.save writes; returns their sha256, as sha256sum sees the file."""
    array = np.ascontiguousarray(array)
    # The header as np.save writes it; then the array's own memory, not a copy of it.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return write_whole(path, header.getvalue(), array.data)


def save_json(path, obj):
    # Indented: people read meta.json too.
    write_whole(path, (json.dumps(obj, indent=2) + "\n").encode())


class ShardWriter:
    """Tokens into shards: val_000000.npy, ... until val_tokens are written, then
    train_000000.npy, ...; after each shard, state.json says how far the run got."""

    def __init__(self, out_dir, shard_size, val_tokens, state):
        self.out_dir = out_dir
        self.val_tokens = val_tokens
        self.state = state
        # The one big allocation: memory follows --shard_size. A size beyond what numpy can even
        # address is its ValueError, not a MemoryError: to the user, the same.
        try:
            self.buffer = np.empty(shard_size, dtype=np.uint16)
        except ValueError:
            raise MemoryError
        # Tokens in the buffer, not yet in a shard.
        self.filled = 0
        # The splits are the state's own (commit() saves them), and meta.json's in the end.
        fresh = {
            split: {"tokens": 0, "shards": [], "shard_tokens": [], "sha256": []}
            for split in ("val", "train")
        }
        self.splits = state.setdefault("splits", fresh)

    def split(self):
        """val until val_tokens are written, then train for good."""
        if self.splits["val"]["tokens"] < self.val_tokens:
            return "val"
        return "train"

    def add(self, tokens, position, done):
        """Tokens of the batch read from position, of which `done` were added before these."""
        while len(tokens):
            split = self.split()
            # A shard ends at shard_size; a val shard also where the val split does.
            end = len(self.buffer)
            if split == "val":
                end = min(end, self.val_tokens - self.splits["val"]["tokens"])
            n = min(len(tokens), end - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            done += n
            if self.filled == end:
                self.write(split, self.buffer[:end])
                # The moment the shard counts. A resumed run reads this batch again and skips
                # the `done` tokens of it that are in shards.
                self.commit({"position": position, "skip": done})

    def write(self, split, tokens):
        record = self.splits[split]
        # Six digits: the names sort in order.
        name = f"{split}_{len(record['shards']):06d}.npy"
        # The checksum is for --verify; each shard's length, for train_gpt2.py to check.
        record["sha256"].append(save_npy(f"{self.out_dir}/{name}", tokens))
        record["shards"].append(name)
        record["shard_tokens"].append(len(tokens))
        record["tokens"] += len(tokens)
        self.filled = 0

    def finish(self, cut_small_corpus):
        """The tokens left go into a last, shorter shard; then state.json says all is read."""
        tokens = self.buffer[: self.filled]
        # Nothing in val yet: the whole corpus is in the buffer, smaller than the default
        # --val_tokens (a shard), which would take it all. Its first 10% is the val split instead
        # (check_inputs refused a corpus with no text: it has two tokens at least).
        if cut_small_corpus and not self.splits["val"]["tokens"]:
            cut = max(1, len(tokens) // 10)
            say(
                f"note: the corpus is smaller than one shard; its first 10% ({cut:,} tokens) "
                "is the val split"
            )
            self.write("val", tokens[:cut])
            self.write("train", tokens[cut:])
        elif len(tokens):
            self.write(self.split(), tokens)
        # A run resumed from here only writes meta.json.
        self.commit({"finished": True})

    def commit(self, resume):
        self.state["resume"] = resume
        save_json(f"{self.out_dir}/state.json", self.state)


def tokenize_into_shards(args, writer, resume, lock):
    """Every row from the resume position on, tokenized in parallel, into shards. Returns how
    many tokens this run tokenized."""
    written = writer.splits["val"]["tokens"] + writer.splits["train"]["tokens"]
    if written:
        say(f"resuming {writer.out_dir}: {written:,} tokens already in shards")
    # rows -> (text, after) documents -> (position, texts) batches -> (position, tokens)
    rows = read_rows(args, resume["position"])
    documents = ((text_of(row, args.text_column, where), after) for row, where, after in rows)
    batches = batches_of_documents(documents, resume["position"])
    # A resumed run reads its first batch again: the tokens of it already in shards are dropped.
    skip = resume["skip"]
    # Every token this run made, the dropped ones too: the summary says how much work it did.
    tokenized = 0
    with tqdm(
        unit="tok",
        unit_scale=True,
        desc=f"tokenizing into {args.out_dir}",
        smoothing=0.1,
        initial=written,
    ) as bar:
        for position, tokens in tokenize_in_parallel(batches, args.num_proc, lock):
            done = min(skip, len(tokens))
            skip -= done
            tokenized += len(tokens)
            writer.add(tokens[done:], position, done)
            bar.update(len(tokens) - done)
    return tokenized


def prepare_pretraining(args, staging, state, lock):
    """Rows -> tokens -> shards; returns what meta.json says of them. A resumed run reads on from
    state.json."""
    # One shard of val by default, as build-nanogpt's fineweb.py.
    val_tokens = args.val_tokens
    if val_tokens is None:
        val_tokens = args.shard_size
    writer = ShardWriter(staging, args.shard_size, val_tokens, state)
    # A fresh run starts at the top, with nothing to skip.
    resume = state.get("resume", {"position": None, "skip": 0})
    tokenized = 0
    if "finished" not in resume:
        tokenized = tokenize_into_shards(args, writer, resume, lock)
        writer.finish(cut_small_corpus=args.val_tokens is None)
    train = writer.splits["train"]
    val = writer.splits["val"]
    # A --val_tokens as big as the corpus would leave train_gpt2.py nothing to learn from.
    if not train["tokens"]:
        raise UserError(
            f"all {val['tokens']:,} tokens are in the val split: give a smaller --val_tokens"
        )
    say(
        f"wrote {train['tokens']:,} train and {val['tokens']:,} val tokens in "
        f"{len(train['shards']) + len(val['shards'])} shards to {args.out_dir} (this run "
        f"tokenized {tokenized:,} tokens)"
    )
    return {
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "shard_size": args.shard_size,
        "splits": writer.splits,
    }


# -----------------------------------------------------------------------------
# Instruction data (--sft, Alpaca) and HellaSwag (--hellaswag): small, so made in one go

# Stanford Alpaca's prompts: the answer follows them.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_example(row, where):
    """An Alpaca record as (prompt, answer) text: the prompt is its instruction, and its
    optional input, in Alpaca's template."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is {describe(row)}, not an Alpaca record")
    for key in ("instruction", "output"):
        if key not in row:
            raise UserError(
                f"{where} has no column {key!r}; Alpaca data needs instruction, input (optional) "
                f"and output; its columns are: {', '.join(map(str, row))}"
            )
    # An input that is absent, null or "" is none.
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
    """Every Alpaca record as (prompt tokens, answer tokens), and how many were dropped as
    longer than --block_size. One process: Alpaca's ~10M tokens need no pool."""
    import tiktoken

    encoder = tiktoken.get_encoding("gpt2")
    examples = []
    dropped = 0
    for row, where, _ in read_rows(args):
        prompt_text, answer_text = alpaca_example(row, where)
        # Prompt and answer are tokenized apart, as at inference: the boundary falls where it
        # will fall then.
        prompt = encoder.encode_ordinary(prompt_text)
        # <|endoftext|> ends the answer: the model learns to stop.
        answer = encoder.encode_ordinary(answer_text) + [encoder.eot_token]
        # A cut example would teach answers that end mid-sentence.
        if len(prompt) + len(answer) > args.block_size:
            dropped += 1
        else:
            examples.append((prompt, answer))
    return examples, dropped


def save_examples(staging, split, examples, checksums):
    """A split's examples into {split}_tokens.npy, _mask.npy and _offsets.npy (example i is
    tokens[offsets[i]:offsets[i + 1]]); returns what meta.json says of the split."""
    tokens = []
    mask = []
    offsets = [0]
    for prompt, answer in examples:
        tokens += prompt + answer
        # 1 marks an answer's token: the loss counts those only.
        mask += [0] * len(prompt) + [1] * len(answer)
        offsets.append(len(tokens))
    arrays = {
        "tokens": (tokens, np.uint16),
        "mask": (mask, np.uint8),
        "offsets": (offsets, np.int64),
    }
    for name, (values, dtype) in arrays.items():
        filename = f"{split}_{name}.npy"
        checksums[filename] = save_npy(f"{staging}/{filename}", np.array(values, dtype))
    return {"examples": len(examples), "tokens": len(tokens), "answer_tokens": sum(mask)}


def prepare_sft(args, staging):
    """Alpaca's records -> tokenized examples -> a val and a train split; returns what meta.json
    says of them."""
    examples, dropped = tokenize_examples(args)
    # A val and a train example at least.
    if len(examples) < 2:
        raise UserError(
            f"{describe_source(args)} has {len(examples)} example(s) of <= {args.block_size} "
            "tokens: 2 at least"
        )
    # Seeded: the same command makes the same split.
    order = np.random.default_rng(args.seed).permutation(len(examples))
    # --val_fraction of the examples, but one at least, and one left for train.
    n_val = min(len(examples) - 1, max(1, round(len(examples) * args.val_fraction)))
    meta = {
        # The command, for train_gpt2.py's advice to redo with another --block_size.
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
    for split, indices in (("val", order[:n_val]), ("train", order[n_val:])):
        # The split is random, the order within it stable.
        chosen = [examples[i] for i in sorted(indices)]
        meta["splits"][split] = save_examples(staging, split, chosen, meta["sha256"])
    say(
        f"wrote {len(examples) - n_val:,} train and {n_val:,} val examples to {args.out_dir}; "
        f"dropped {dropped:,} longer than {args.block_size} tokens"
    )
    return meta


def hellaswag_item(row, where):
    """A HellaSwag row checked as train_gpt2.py's load_hellaswag reads it: the texts of both
    conventions (ctx; lm-evaluation-harness's activity_label, ctx_a, ctx_b), 4 endings, a label."""
    texts = ("ctx", "activity_label", "ctx_a", "ctx_b")
    if not isinstance(row, dict) or not {*texts, "endings", "label"} <= row.keys():
        raise UserError(
            f"{where} is not HellaSwag: rows need {', '.join(texts)}, endings (4) and label; "
            f"got {describe(row)}"
        )
    if not all(isinstance(row[key], str) for key in texts):
        raise UserError(f"{where}: HellaSwag's {', '.join(texts)} must be text")
    endings = row["endings"]
    if (
        not isinstance(endings, list)
        or len(endings) != 4
        or not all(isinstance(ending, str) for ending in endings)
    ):
        raise UserError(
            f"{where}: HellaSwag needs exactly 4 endings (text); fix or remove that item"
        )
    # The label may be a number or a string ("2").
    label = str(row["label"])
    if label not in ("0", "1", "2", "3"):
        raise UserError(
            f"{where}: label {row['label']!r} is not 0..3 (the test split has none: use validation)"
        )
    item = {key: row[key] for key in texts}
    item["endings"] = endings
    item["label"] = int(label)
    return item


def prepare_hellaswag(args, staging):
    """HellaSwag's items as JSON lines, the file train_gpt2.py's --hellaswag_path reads; returns
    what meta.json says of it."""
    items = [hellaswag_item(row, where) for row, where, _ in read_rows(args)]
    lines = "".join(json.dumps(item) + "\n" for item in items)
    digest = write_whole(f"{staging}/hellaswag_val.jsonl", lines.encode())
    say(f"wrote {len(items):,} HellaSwag items to {args.out_dir}/hellaswag_val.jsonl")
    return {"items": len(items), "sha256": {"hellaswag_val.jsonl": digest}}


# -----------------------------------------------------------------------------
# What keeps a user's work safe: inputs checked before anything is written; one run per folder;
# everything built in <out_dir>.partial, resumable, and moved into place only whole; only files
# of ours ever deleted.


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(
            f"{path} not found: not a prepared folder, or its preparation is unfinished "
            "(run it again)"
        )
    except json.JSONDecodeError:
        raise UserError(
            f"{path} is not readable JSON: not prepare_data.py's, or edited; move it away"
        )


def dataset_files(folder):
    """The files a folder's meta.json lists, besides itself: {name: (tokens or None, sha256)}."""
    meta = read_json(f"{folder}/meta.json")
    # Pretraining lists its shards with their length; the other kinds, every file.
    try:
        if meta["kind"] == "pretrain":
            return {
                name: (n, digest)
                for split in meta["splits"].values()
                for name, n, digest in zip(split["shards"], split["shard_tokens"], split["sha256"])
            }
        return {name: (None, digest) for name, digest in meta["sha256"].items()}
    except (KeyError, TypeError, AttributeError):
        raise UserError(
            f"{folder}/meta.json lacks what --verify checks (not prepare_data.py's, or edited): "
            "move it away, and prepare the folder again"
        )


def remove_dataset(folder):
    """Deletes a dataset of ours, then its folder if nothing else is in it: a file we did not
    write stays."""
    ours = {"meta.json", "state.json"}
    if os.path.exists(f"{folder}/meta.json"):
        ours.update(dataset_files(folder))
    for name in ours:
        Path(folder, name).unlink(missing_ok=True)
    # Not empty: someone else's files are in it.
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def remove_staged(staging):
    """Deletes what a run wrote in the staging folder: its shards, temporary files and JSON."""
    for name in os.listdir(staging):
        if name.endswith((".npy", ".tmp")) or name in ("meta.json", "state.json"):
            os.remove(f"{staging}/{name}")


def check_hub(dataset):
    """A Hub dataset is streamed: the Hub must answer now, not after a minute of retries. The
    check goes where the library goes, and never refuses what it would load."""
    # A local folder needs no network.
    if os.path.isdir(dataset):
        return
    from huggingface_hub import constants

    # huggingface.co, or the HF_ENDPOINT mirror, at the port it names or its scheme's.
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port
    if port is None:
        port = {"http": 80}.get(endpoint.scheme, 443)
    # Behind a proxy for the endpoint's scheme (or all), only a download can tell; unless
    # NO_PROXY names the host, which is then reached directly.
    proxies = urllib.request.getproxies()
    if endpoint.scheme in proxies or "all" in proxies:
        if not urllib.request.proxy_bypass(endpoint.hostname):
            return
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as e:
        raise UserError(
            f"--dataset {dataset} is streamed from {endpoint.hostname}, which cannot be reached "
            f"({e}): connect, or give local files (--files) or a folder of them (--dataset DIR)"
        )


def check_inputs(args):
    """Before anything is written: tiktoken's files, the Hub, and each input's first 100 rows,
    enough to catch a wrong format or column (the rest is checked as it is read)."""
    # tiktoken downloads GPT-2's files once. Offline, that fails deep in requests: here, rather
    # than in every tokenizer process.
    try:
        tokenize_documents([""])
    except Exception:
        # Word for word train_gpt2.py's line.
        raise UserError(
            "tiktoken has no GPT-2 files: it downloads them once (vocab.bpe and encoder.json, from "
            "openaipublic.blob.core.windows.net/gpt-2/encodings/main); offline, copy tiktoken's "
            "cache folder from a machine that has them and set TIKTOKEN_CACHE_DIR to it"
        )
    if args.files:
        for path in args.files:
            if not os.path.exists(path):
                raise UserError(f"file not found: {path}")
            if not os.path.isfile(path):
                raise UserError(f"cannot read {path}: it is a folder")
            if not os.access(path, os.R_OK):
                raise UserError(f"cannot read {path}: Permission denied; check its permissions")
        # One file at a time, so that an error names it.
        sources = [file_rows(path, (0, 1), args) for path in args.files]
    else:
        check_hub(args.dataset)
        sources = [read_rows(args)]
    empty = True
    for rows in sources:
        for row, where, _ in itertools.islice(rows, 100):
            # Instruction data and HellaSwag are small: they are read whole, and checked, before
            # a file of theirs is written.
            if args.kind != "pretrain" or text_of(row, args.text_column, where).strip():
                empty = False
    # After all sources: one empty file among others is fine.
    if empty:
        raise UserError(
            f"the corpus {describe_source(args)} is empty: no rows, or blank documents only"
        )


def check_out_dir(out_dir, overwrite):
    """--out_dir and the <out_dir>.partial a run builds in: folders, or nothing yet under names
    the file system can make. A folder with files not of its dataset is refused."""
    for path in (out_dir, f"{out_dir}.partial"):
        # A link that loops, a name too long, a file in the way: refused here, before any work,
        # rather than when the finished dataset is moved into place.
        try:
            os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}; choose another --out_dir")
        if not os.path.isdir(path):
            raise UserError(
                f"{path} is a file, in the way of the folder prepare_data.py makes there; move it "
                "away, or choose another --out_dir"
            )
    if not os.path.isdir(out_dir):
        return
    names = set(os.listdir(out_dir))
    # An empty folder is fine: a user may have made it, or linked it to a bigger disk, for the data.
    if names and "meta.json" not in names:
        raise UserError(
            f"{out_dir} is a folder that is not a prepared dataset (no meta.json): choose another "
            "--out_dir"
        )
    # --overwrite deletes the old dataset: only where every file in the folder is the dataset's.
    if overwrite and names:
        foreign = sorted(names - set(dataset_files(out_dir)) - {"meta.json", "state.json"})
        if foreign:
            raise UserError(
                f"{out_dir} holds files not part of its dataset ({', '.join(foreign[:3])}): "
                "move them away first"
            )


def take_lock(staging):
    """An flock on the staging folder itself: the kernel lets go of it when the process dies, so
    that a killed run leaves no false "busy"."""
    os.makedirs(staging, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        # Windows: runs into one folder are not locked.
        return None
    # A folder opened read-only: the lock needs a file descriptor, not a file to write.
    lock = os.open(staging, os.O_RDONLY)
    # LOCK_NB: fail at once, rather than wait for the other run.
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UserError(
            f"another prepare_data.py is writing {staging}; wait for it to finish, or stop it"
        )
    return lock


def fingerprint(args):
    """What decides the output: a half-made folder is resumed by the same command only."""
    # A folder streamed as a dataset is fingerprinted by its files, and a Hub dataset by its
    # name: Path(name).rglob finds no files there.
    paths = args.files
    if not args.files:
        paths = sorted(map(str, Path(args.dataset).rglob("*")))
    # An edited file shows in its size and mtime: no hashing of gigabytes.
    inputs = [
        [os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns]
        for p in paths
        if os.path.isfile(p)
    ]
    if not args.files:
        inputs += [args.dataset, args.subset, args.split]
    # The options that change the bytes written (--num_proc and --out_dir do not).
    options = {
        "pretrain": ["text_column", "shard_size", "val_tokens"],
        "sft": ["block_size", "val_fraction", "seed"],
    }
    fp = {"kind": args.kind, "inputs": inputs, "encoding_errors": args.encoding_errors}
    for name in options.get(args.kind, []):
        fp[name] = getattr(args, name)
    return fp


def shard_whole(path, n):
    """A uint16 .npy of n tokens, neither cut short nor padded: its header is read, not its data."""
    try:
        shard = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        # Missing, not .npy, or fewer bytes than its header says.
        return False
    size = os.path.getsize(path)
    return shard.dtype == np.uint16 and shard.shape == (n,) and size == shard.offset + 2 * n


def load_state(staging, fp):
    """The state of a half-made run of this same command, or a fresh one."""
    fresh = {"fingerprint": fp}
    path = f"{staging}/state.json"
    if not os.path.exists(path):
        # A .tmp is a killed run's: it is written over when its file is made again.
        if any(not name.endswith(".tmp") for name in os.listdir(staging)):
            raise UserError(
                f"{staging} is in the way: prepare_data.py builds there, and it holds files not "
                "ours"
            )
        return fresh
    state = read_json(path)
    if state["fingerprint"] != fp:
        what = next((key for key in fp if state["fingerprint"].get(key) != fp[key]), "command")
        raise UserError(
            f"{staging} holds a half-made preparation by another command (its {what} differs); "
            f"re-run that command to finish it, or delete {staging} to start over"
        )
    # A shard listed in state.json was whole when it was listed; the disk may have lost it since.
    for split in state.get("splits", {}).values():
        for name, n in zip(split["shards"], split["shard_tokens"]):
            path = f"{staging}/{name}"
            if not shard_whole(path, n):
                say(f"note: {path} is missing or damaged since the interruption: starting over")
                remove_staged(staging)
                return fresh
    return state


def build(args, staging, state, lock):
    """The dataset, made in the staging folder; meta.json, written last, says it is finished."""
    # The fingerprint first: a resumed run knows its command.
    save_json(f"{staging}/state.json", state)
    meta = {"kind": args.kind, "source": describe_source(args)}
    # Only pretraining is resumable: the others are small.
    try:
        if args.kind == "sft":
            meta.update(prepare_sft(args, staging))
        elif args.kind == "hellaswag":
            meta.update(prepare_hellaswag(args, staging))
        else:
            meta.update(prepare_pretraining(args, staging, state, lock))
    except UserError:
        # The same command would fail the same way: nothing here is worth resuming.
        remove_staged(staging)
        raise
    save_json(f"{staging}/meta.json", meta)


def recover(out_dir):
    """Finishes a publish(): the new dataset loses its state.json and the old one goes; or, if
    the new one is not in place, the old one comes back."""
    if os.path.isdir(out_dir):
        # state.json marked the new dataset until here.
        Path(out_dir, "state.json").unlink(missing_ok=True)
        if os.path.isdir(f"{out_dir}.old"):
            remove_dataset(f"{out_dir}.old")
    # Killed between publish()'s two renames: the old dataset waits, whole, beside.
    elif os.path.isdir(f"{out_dir}.old"):
        os.rename(f"{out_dir}.old", out_dir)


def publish(staging, out_dir):
    """The finished dataset into place: an old one is replaced only now."""
    if os.path.isdir(out_dir):
        os.rename(out_dir, f"{out_dir}.old")
    os.rename(staging, out_dir)
    recover(out_dir)


def prepare(args):
    # A link (to a bigger disk): the data goes where it points, and the link stays a link.
    args.out_dir = os.path.realpath(args.out_dir)
    # A sibling: on the same file system, so that the final move is a rename.
    staging = f"{args.out_dir}.partial"
    # Prepared, --overwrite not asked, and nothing of ours half-done beside it: nothing to do,
    # nor to check. (A half-done publish() is finished below, a dataset of the same command
    # staged in full put in place.)
    if os.path.exists(f"{args.out_dir}/meta.json") and not args.overwrite:
        if not os.path.exists(staging) and not os.path.exists(f"{args.out_dir}.old"):
            say(f"{args.out_dir} is already prepared (see its meta.json); --overwrite redoes it")
            return
    check_inputs(args)
    check_out_dir(args.out_dir, args.overwrite)
    # Held until the end: one run per --out_dir at a time.
    lock = take_lock(staging)
    try:
        # What a run killed in publish() left.
        recover(args.out_dir)
        state = load_state(staging, fingerprint(args))
        # With meta.json, the staged dataset is finished, and only waits to be moved.
        if not os.path.exists(f"{staging}/meta.json"):
            build(args, staging, state, lock)
        # Again: the user may have put files there meanwhile.
        check_out_dir(args.out_dir, args.overwrite)
        publish(staging, args.out_dir)
    finally:
        # A staging folder with no shard in it holds nothing worth resuming.
        if os.path.isdir(staging) and all(
            name.endswith(".tmp") or name == "state.json" for name in os.listdir(staging)
        ):
            shutil.rmtree(staging)
        if lock is not None:
            os.close(lock)


# -----------------------------------------------------------------------------
# --verify: every file whole, unchanged, and of the length meta.json says


def verify(folder):
    # Shards by length and checksum, other files by checksum.
    files = dataset_files(folder)
    again = "re-run prepare_data.py --overwrite for this folder"
    # In order: the first bad file is the one named.
    for name, (n, digest) in files.items():
        path = f"{folder}/{name}"
        if not os.path.exists(path):
            raise UserError(f"{path} is missing; {again}")
        if n is not None and not shard_whole(path, n):
            raise UserError(f"{path} is truncated or padded (not {n:,} tokens); {again}")
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                raise UserError(
                    f"{path} differs from the file prepare_data.py wrote (sha256); {again}"
                )
    say(f"ok: {folder}: {len(files)} files, checksums match")


# -----------------------------------------------------------------------------
# The command line


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1 (exclusive)")
    return value


def make_parser():
    """The command line: what to prepare, from what, where and how."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )

    def one_line_error(message):
        # One line, as every other mistake.
        parser.exit(2, f"error: {message} (see --help)\n")

    parser.error = one_line_error
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--sft", action="store_true", help="prepare Alpaca-style instruction data instead"
    )
    kind.add_argument(
        "--hellaswag", action="store_true", help="prepare the HellaSwag validation set instead"
    )
    add = parser.add_argument
    add(
        "--dataset",
        help="a Hugging Face dataset or a folder of parquet/jsonl files, streamed (default: "
        "FineWeb-Edu, Alpaca with --sft, HellaSwag with --hellaswag)",
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
        help="where to write (default: data/<the dataset's or first file's name>, data/alpaca, "
        "data/hellaswag)",
    )
    add("--shard_size", type=positive_int, default=100_000_000, help="tokens per shard")
    add(
        "--val_tokens",
        type=positive_int,
        help="tokens in the val split (default: a shard; 10%% of a smaller corpus)",
    )
    add("--num_proc", type=positive_int, default=os.cpu_count(), help="tokenizer processes")
    add(
        "--overwrite",
        action="store_true",
        help="redo a complete folder; the old one stays until the new one is whole",
    )
    add(
        "--block_size",
        type=positive_int,
        default=1024,
        help="--sft: the longest example kept, in tokens",
    )
    add("--val_fraction", type=fraction, default=0.05, help="--sft: the share of examples held out")
    add("--seed", type=int, default=1337, help="--sft: the seed of the train/val split")
    add(
        "--verify",
        metavar="DIR",
        help="check a prepared folder's files against its meta.json, and stop",
    )
    return parser


def parse_args(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    args = make_parser().parse_args(argv)
    # The command, to redo it: meta.json keeps it, and train_gpt2.py's advice quotes it.
    args.command = shlex.join(["python", "prepare_data.py", *argv])
    # One name for the kind of data, read wherever it matters.
    args.kind = "pretrain"
    if args.sft:
        args.kind = "sft"
    if args.hellaswag:
        args.kind = "hellaswag"
    if args.files:
        name = Path(args.files[0]).stem
    elif args.dataset:
        name = Path(args.dataset).name
    else:
        # No source named: the kind's own Hub dataset; to pretrain, FineWeb-Edu's 10B sample.
        hub = {"pretrain": "HuggingFaceFW/fineweb-edu", "sft": "tatsu-lab/alpaca"}
        args.dataset = hub.get(args.kind, "Rowan/hellaswag")
        name = "fineweb_edu_10B"
        if args.kind == "pretrain" and not args.subset:
            args.subset = "sample-10BT"
    # By default, the folders train_gpt2.py reads: data/alpaca to fine-tune, data/hellaswag to
    # evaluate.
    if not args.out_dir:
        folders = {"sft": "data/alpaca", "hellaswag": "data/hellaswag"}
        args.out_dir = folders.get(args.kind, f"data/{name}")
    # No trailing slash: <out_dir>.partial must be a sibling.
    args.out_dir = os.path.normpath(args.out_dir)
    # HellaSwag's test split has no labels.
    if not args.split:
        args.split = "validation" if args.hellaswag else "train"
    return args


# What to do when the disk refuses a write, by its errno. (Inputs are checked for reading before.)
FREE_SPACE = "; free some space, or choose another --out_dir"
PERMISSIONS = "; check its permissions, or choose another --out_dir"
WRITE_ADVICE = {
    errno.ENOSPC: FREE_SPACE,
    errno.EDQUOT: FREE_SPACE,
    errno.EFBIG: " (the file system or `ulimit -f` limits a file's size); choose another --out_dir "
    "or a smaller --shard_size",
    errno.EROFS: "; choose another --out_dir",
    errno.EACCES: PERMISSIONS,
    errno.EPERM: PERMISSIONS,
}


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.verify:
            verify(args.verify)
        else:
            prepare(args)
    except UserError as e:
        # The user's to fix: one line, no traceback.
        sys.exit(f"error: {e}")
    except (ConnectionError, TimeoutError) as e:
        # The Hub went away: nothing is lost.
        sys.exit(
            f"error: lost the connection to {args.dataset} ({e}); run the same command again "
            "to resume"
        )
    except MemoryError:
        # np.empty(shard_size) is the one big allocation.
        sys.exit(
            f"error: out of memory: a shard of --shard_size {args.shard_size:,} tokens does not "
            "fit; give a smaller one"
        )
    except KeyboardInterrupt:
        sys.exit(
            f"error: interrupted; {args.out_dir} is unchanged, and the same command resumes "
            "the work"
        )
    except OSError as e:
        # A write the disk refused is the user's to fix; any other OSError is a bug.
        if e.errno not in WRITE_ADVICE:
            raise
        # A write's own error names no file.
        where = e.filename
        if where is None:
            where = args.out_dir
        sys.exit(f"error: cannot write {where}: {e.strerror}{WRITE_ADVICE[e.errno]}")


if __name__ == "__main__":
    main()
