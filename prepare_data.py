"""
Turn text into what train_gpt2.py reads.

Pretraining shards (GPT-2 token ids, uint16, numpy's .npy format, every document
starting with <|endoftext|>), a validation split first, and meta.json:
    python prepare_data.py                     # FineWeb-Edu sample-10BT -> data/fineweb_edu_10B (~10B tokens)
    python prepare_data.py --dataset roneneldan/TinyStories --out_dir data/tinystories
    python prepare_data.py --files input.txt more.jsonl rows.parquet --out_dir data/mine --val_tokens 100000

Instruction data for --mode finetune (Stanford Alpaca, prompt tokens masked out):
    python prepare_data.py --sft                            # tatsu-lab/alpaca -> data/alpaca
    python prepare_data.py --sft --files alpaca_data.json

HellaSwag validation set for --mode eval:
    python prepare_data.py --hellaswag                      # -> data/hellaswag/hellaswag_val.jsonl

Hub datasets are streamed: documents are tokenized as they arrive, so neither memory nor
disk ever holds the raw corpus (FineWeb-Edu's 10B sample is ~27 GB of parquet; its shards
are 20 GB). The price is that an interrupted run starts again from the beginning.
"""

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
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


class DataError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


# -----------------------------------------------------------------------------
# Reading rows: local files or a Hugging Face dataset, one dict per document


def read_rows(files=None, dataset=None, subset=None, split="train", text_column="text"):
    """Yield one dict per document, never holding the whole corpus in memory."""
    if not files:
        import datasets
        # streaming: rows arrive over the network as we tokenize; nothing is cached on disk
        yield from datasets.load_dataset(dataset, subset, split=split, streaming=True)
        return
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"file not found: {path}")
    for path in files:
        suffix = Path(path).suffix.lower()
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)
        elif suffix == ".json":
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects; for one object per line, name it .jsonl")
            yield from rows
        elif suffix == ".parquet":
            import pyarrow.parquet as pq  # comes with datasets
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        else:  # plain text: the whole file is one document
            with open(path, encoding="utf-8") as f:
                yield {text_column: f.read()}


def column(rows, name, source):
    """The values of one column, with a clear error when the rows don't have it."""
    for row in rows:
        if name not in row:
            raise DataError(f"{source} has no column {name!r}; its columns are: {', '.join(map(str, row))} "
                            "(choose one with --text_column)")
        yield row[name]


def describe_source(args):
    return " ".join(args.files) if args.files else f"{args.dataset}" + (f" ({args.subset})" if args.subset else "")


# -----------------------------------------------------------------------------
# Tokenizing, in parallel, in order, with bounded memory

_encoder = None  # one per worker process, made on first use (works with fork and spawn)


def tokenize_documents(texts):
    """One uint16 array: each document's tokens, each preceded by <|endoftext|>."""
    global _encoder
    if _encoder is None:
        import tiktoken
        _encoder = tiktoken.get_encoding("gpt2")
    tokens = [EOT_TOKEN]
    for i, text in enumerate(texts):
        if i:
            tokens.append(EOT_TOKEN)
        tokens.extend(_encoder.encode_ordinary(text))
    tokens = np.array(tokens, dtype=np.int64)
    if tokens.max() >= 2**16:  # GPT-2's 50,257 fit; another tokenizer's might not
        raise DataError(f"token id {tokens.max()} does not fit in uint16: this format holds ids below 65,536")
    return tokens.astype(np.uint16)


def batches_of_documents(texts, max_chars=1 << 20):
    """Group documents into batches of about a megabyte, so that sending work to a
    process costs little next to tokenizing it."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_in_parallel(texts, num_proc):
    """Yield token arrays in document order. At most 2 batches per process are in flight:
    Pool.imap would read the whole corpus into its queue ahead of the workers."""
    if num_proc <= 1:
        for batch in batches_of_documents(texts):
            yield tokenize_documents(batch)
        return
    with mp.Pool(num_proc) as pool:
        in_flight = deque()
        for batch in batches_of_documents(texts):
            in_flight.append(pool.apply_async(tokenize_documents, (batch,)))
            if len(in_flight) >= 2 * num_proc:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


# -----------------------------------------------------------------------------
# Writing shards atomically


def save_npy(path, array):
    """Write to a temporary name, then rename: a file with the final name is always whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class ShardWriter:
    """Cuts a stream of tokens into shards of shard_size: the first val_tokens go to
    val_000000.npy, ..., the rest to train_000000.npy, ... A document may span two shards,
    so no token is dropped."""

    def __init__(self, out_dir, shard_size, val_tokens):
        self.out_dir, self.shard_size, self.val_tokens = out_dir, shard_size, val_tokens
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0
        self.shards = {"val": [], "train": []}
        self.tokens = {"val": 0, "train": 0}

    def split(self):
        return "val" if self.tokens["val"] < self.val_tokens else "train"

    def capacity(self):
        """Room left in the current shard: a val shard also ends where the val split ends."""
        if self.split() == "val":
            return min(self.shard_size, self.val_tokens - self.tokens["val"]) - self.filled
        return self.shard_size - self.filled

    def add(self, tokens):
        while len(tokens):
            n = min(len(tokens), self.capacity())
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.capacity() == 0:
                self.flush()

    def flush(self):
        if self.filled == 0:
            return
        self.write(self.split(), self.buffer[:self.filled])
        self.filled = 0

    def write(self, split, tokens):
        name = f"{split}_{len(self.shards[split]):06d}.npy"
        save_npy(os.path.join(self.out_dir, name), tokens)
        self.shards[split].append(name)
        self.tokens[split] += len(tokens)


def prepare_pretraining(args):
    texts = column(read_rows(args.files, args.dataset, args.subset, args.split, args.text_column),
                   args.text_column, describe_source(args))
    # Read the first document before the progress bar: a missing file or column fails cleanly.
    first = next(texts, None)
    if first is None:
        raise DataError(f"the corpus {describe_source(args)} is empty: no text to tokenize")
    texts = itertools.chain([first], texts)
    val_tokens = args.val_tokens if args.val_tokens is not None else args.shard_size
    writer = ShardWriter(args.out_dir, args.shard_size, val_tokens)
    from tqdm import tqdm
    with tqdm(unit="tok", unit_scale=True, desc=f"tokenizing into {args.out_dir}", smoothing=0.1) as progress:
        for tokens in tokenize_in_parallel(texts, args.num_proc):
            writer.add(tokens)
            progress.update(len(tokens))
    if writer.tokens["val"] == 0 and writer.filled and args.val_tokens is None:
        # The whole corpus is smaller than one shard: "the first shard is val" would take it all.
        everything = writer.buffer[:writer.filled].copy()
        cut = max(1, len(everything) // 10)
        print(f"note: the corpus is smaller than one shard; its first 10% ({cut:,} tokens) is the val split")
        writer.write("val", everything[:cut])
        writer.write("train", everything[cut:])
        writer.filled = 0
    writer.flush()
    if writer.tokens["val"] + writer.tokens["train"] == 0:
        raise DataError(f"the corpus {describe_source(args)} is empty: no text to tokenize")
    if writer.tokens["train"] == 0:
        raise DataError(f"no tokens left to train on: all {writer.tokens['val']:,} are in the val split; "
                        "give a smaller --val_tokens")
    meta = {
        "kind": "pretrain",
        "source": describe_source(args),
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "eot_token": EOT_TOKEN,
        "shard_size": args.shard_size,
        "splits": {split: {"tokens": writer.tokens[split], "shards": writer.shards[split]} for split in ("val", "train")},
    }
    save_json(os.path.join(args.out_dir, "meta.json"), meta)  # written last: marks the folder complete
    print(f"wrote {writer.tokens['train']:,} train and {writer.tokens['val']:,} val tokens "
          f"in {len(writer.shards['train']) + len(writer.shards['val'])} shards to {args.out_dir}")


# -----------------------------------------------------------------------------
# Instruction data (Alpaca) and HellaSwag


def prepare_sft(args):
    """Each example: prompt tokens (mask 0), then answer + <|endoftext|> (mask 1). Stored as
    {split}_tokens.npy (uint16), {split}_mask.npy (uint8) and {split}_offsets.npy (int64,
    example i is tokens[offsets[i]:offsets[i+1]])."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    examples, dropped, source = [], 0, describe_source(args)
    for row in read_rows(args.files, args.dataset, args.subset, args.split):
        missing = [key for key in ("instruction", "output") if key not in row]
        if missing:
            raise DataError(f"{source} has no column {missing[0]!r}; Alpaca data needs instruction, input "
                            f"(optional) and output; its columns are: {', '.join(map(str, row))}")
        template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
        # Prompt and answer are tokenized apart, as at inference: the prompt is encoded alone
        # and the answer generated after it, so the boundary falls where it will fall then.
        prompt = enc.encode_ordinary(template.format(instruction=row["instruction"], input=row.get("input", "")))
        answer = enc.encode_ordinary(row["output"]) + [EOT_TOKEN]
        if len(prompt) + len(answer) > args.block_size:
            dropped += 1
            continue
        examples.append((prompt, answer))
    if not examples:
        raise DataError(f"{source} has no examples of at most {args.block_size} tokens")
    order = np.random.default_rng(args.seed).permutation(len(examples))
    n_val = max(1, round(len(examples) * args.val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    meta = {"kind": "sft", "source": source, "tokenizer": "gpt2", "block_size": args.block_size,
            "prompt_template": ALPACA_PROMPT, "prompt_template_with_input": ALPACA_PROMPT_WITH_INPUT,
            "dropped_too_long": dropped, "splits": {}}
    for split, indices in splits.items():
        tokens, mask, offsets = [], [], [0]
        for i in sorted(indices):  # sorted: the split is random, the order within it stable
            prompt, answer = examples[i]
            tokens += prompt + answer
            mask += [0] * len(prompt) + [1] * len(answer)
            offsets.append(len(tokens))
        save_npy(os.path.join(args.out_dir, f"{split}_tokens.npy"), np.array(tokens, dtype=np.uint16))
        save_npy(os.path.join(args.out_dir, f"{split}_mask.npy"), np.array(mask, dtype=np.uint8))
        save_npy(os.path.join(args.out_dir, f"{split}_offsets.npy"), np.array(offsets, dtype=np.int64))
        meta["splits"][split] = {"examples": len(indices), "tokens": len(tokens), "answer_tokens": int(sum(mask))}
    save_json(os.path.join(args.out_dir, "meta.json"), meta)
    print(f"wrote {meta['splits']['train']['examples']:,} train and {meta['splits']['val']['examples']:,} val "
          f"examples to {args.out_dir}; dropped {dropped:,} longer than {args.block_size} tokens")


def prepare_hellaswag(args):
    """HellaSwag's validation items as JSON lines: ctx, the 4 endings, the label."""
    items = []
    for row in read_rows(args.files, args.dataset, args.subset, args.split):
        try:
            items.append({"ctx": row["ctx"], "endings": list(row["endings"]), "label": int(row["label"])})
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{describe_source(args)} is not HellaSwag: rows need ctx, endings (4) and label; "
                            f"got {', '.join(map(str, row))}") from None
    if not items:
        raise DataError(f"{describe_source(args)} has no items")
    path = os.path.join(args.out_dir, "hellaswag_val.jsonl")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    os.replace(tmp, path)
    save_json(os.path.join(args.out_dir, "meta.json"), {"kind": "hellaswag", "source": describe_source(args), "items": len(items)})
    print(f"wrote {len(items):,} HellaSwag items to {path}")


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Tokenize a corpus for train_gpt2.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sft", action="store_true", help="prepare Alpaca-style instruction data instead")
    p.add_argument("--hellaswag", action="store_true", help="prepare the HellaSwag validation set instead")
    p.add_argument("--dataset", default=None, help="a Hugging Face dataset (default: FineWeb-Edu; tatsu-lab/alpaca "
                   "with --sft; Rowan/hellaswag with --hellaswag)")
    p.add_argument("--subset", default=None, help="the dataset's configuration (default: sample-10BT for FineWeb-Edu)")
    p.add_argument("--split", default=None, help="default: train (validation with --hellaswag)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--files", nargs="+", default=None, help="local .txt (one document each), .jsonl, .json or .parquet files")
    p.add_argument("--out_dir", default=None, help="default: data/<dataset or first file's name>")
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--val_tokens", type=int, default=None, help="tokens in the val split (default: the first shard)")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="redo a folder that is already complete")
    p.add_argument("--block_size", type=int, default=1024, help="--sft: longest example kept, in tokens")
    p.add_argument("--val_fraction", type=float, default=0.05, help="--sft: share of examples held out")
    p.add_argument("--seed", type=int, default=1337, help="--sft: seed of the train/val split")
    args = p.parse_args(argv)
    if args.sft and args.hellaswag:
        p.error("choose one of --sft and --hellaswag")
    if args.dataset is None and not args.files:
        args.dataset, args.subset, default_out = (
            ("tatsu-lab/alpaca", args.subset, "data/alpaca") if args.sft else
            ("Rowan/hellaswag", args.subset, "data/hellaswag") if args.hellaswag else
            ("HuggingFaceFW/fineweb-edu", args.subset or "sample-10BT", "data/fineweb_edu_10B"))
    else:
        default_out = "data/" + (Path(args.files[0]).stem if args.files else args.dataset.split("/")[-1])
    args.out_dir = args.out_dir or default_out
    args.split = args.split or ("validation" if args.hellaswag else "train")
    if args.shard_size < 1 or (args.val_tokens is not None and args.val_tokens < 1) or args.num_proc < 1:
        p.error("--shard_size, --val_tokens and --num_proc must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    meta_path = os.path.join(args.out_dir, "meta.json")
    if os.path.exists(meta_path) and not args.overwrite:
        print(f"{args.out_dir} is already prepared (see its meta.json); --overwrite redoes it")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    # Whatever an interrupted or older run left here is not to be trusted: start clean.
    for path in Path(args.out_dir).iterdir():
        if path.name == "meta.json" or path.suffix == ".tmp" or (path.suffix == ".npy" and path.name.startswith(("train_", "val_"))):
            path.unlink()
    try:
        if args.sft:
            prepare_sft(args)
        elif args.hellaswag:
            prepare_hellaswag(args)
        else:
            prepare_pretraining(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
