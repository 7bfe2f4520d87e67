"""
This project against the codebases it is measured against: the figures README.md quotes.
Not part of the lesson. Each comparison interleaves the two sides round by round, so that a
slow spell of a shared machine hits both.

    python dev/compare.py train --device cpu --n_layer 4 --n_head 4 --n_embd 256 --block_size 256 --batch_size 8
        one training step against build-nanogpt's (its forward and loss over the padded 50304
        logits, its clipping and AdamW), on copies of the same weights: time and peak memory
    python dev/compare.py generate --device cpu --n_layer 4 --n_head 4 --n_embd 256 --max_new_tokens 100
        greedy generation: the KV cache, recomputing every token (build-nanogpt's loop), and
        transformers' generate on the same weights; and the LM head's product alone, the floor
    python dev/compare.py tokenize --files corpus.jsonl --num_proc 2
        prepare_data.py's tokenizer against build-nanogpt's fineweb.py (Pool.imap, chunksize 16)
"""

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
import prepare_data as pdata  # noqa: E402
import train_gpt2 as tg  # noqa: E402


def median(times):
    return sorted(times)[len(times) // 2]


def interleaved(methods, rounds, warmup=1, sync=lambda: None):
    """{name: median seconds} of each method over rounds, run in turn (the order alternating)."""
    times = {name: [] for name in methods}
    for i in range(warmup + rounds):
        for name in list(methods) if i % 2 == 0 else list(methods)[::-1]:
            sync()
            t0 = time.perf_counter()
            methods[name]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: median(t) for name, t in times.items()}


def peak_memory_growth(fn, device):
    """How far memory rises while fn runs, in bytes: torch's peak allocation on CUDA; on a Linux
    CPU, the process's resident memory sampled every millisecond, after freed heap is handed
    back to the OS (malloc_trim) so that the level before is honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/statm"):
        return None
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page  # noqa: E731
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss()
    peak, done = [before], threading.Event()

    def sample():  # torch releases the GIL while it computes
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - before


def build_nanogpt_step(model, optimizer, x, y, device):
    """build-nanogpt's training step, on our model's weights: its forward, with the LM head and
    the loss over all 50304 padded columns (its vocab_size is 50304), clip at 1.0, AdamW."""
    optimizer.zero_grad()
    with tg.autocast(device, tg.pick_dtype(device)):
        h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(x.size(1), device=device))
        for block in model.transformer.h:
            h = block(h)
        logits = model.lm_head(model.transformer.ln_f(h))  # (B, T, 50304)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item(), norm.item()  # it prints both, so it waits for them


def compare_train(args):
    device = tg.setup_distributed(args.device)
    dtype = tg.pick_dtype(device)
    torch.manual_seed(0)
    config = tg.GPTConfig(
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        padded_vocab_size=50304,
    )
    ours, theirs = tg.GPT(config).to(device), tg.GPT(config).to(device)
    theirs.load_state_dict(ours.state_dict())
    our_optimizer = tg.configure_optimizer(ours, 0.1, 6e-4)
    # build-nanogpt fuses AdamW on CUDA only
    their_optimizer = torch.optim.AdamW(
        theirs.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda")
    )
    compiled = torch.compile(ours) if args.compile else ours
    scaler = torch.amp.GradScaler(enabled=False)
    x = torch.randint(0, 50257, (args.batch_size, args.block_size + 1), device=device)

    def our_step():
        tg.forward_backward(compiled, [(x[:, :-1], x[:, 1:])], dtype, scaler)
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        our_optimizer.step()
        our_optimizer.zero_grad(set_to_none=True)

    steps = {
        "ours": our_step,
        "build-nanogpt": lambda: build_nanogpt_step(
            theirs, their_optimizer, x[:, :-1], x[:, 1:], device
        ),
    }
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    medians = interleaved(steps, args.rounds, args.warmup, sync)
    print(
        f"train: {sum(p.numel() for p in ours.parameters()):,} parameters, batch {args.batch_size} x {args.block_size}, "
        f"{device}, {dtype}, compile {args.compile}, median of {args.rounds} interleaved rounds"
    )
    for name, step in steps.items():
        grown = peak_memory_growth(step, device)
        print(
            f"{name:<14} median step {1000 * medians[name]:8.1f} ms | "
            f"{args.batch_size * args.block_size / medians[name]:10,.0f} tokens/s"
            + (f" | peak memory +{grown / 2**20:,.0f} MiB" if grown is not None else "")
        )
    print(
        f"ours is {medians['build-nanogpt'] / medians['ours']:.2f}x build-nanogpt's speed (median step time ratio)"
    )


def compare_generate(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    device = tg.setup_distributed(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # one set of weights for both libraries
        GPT2LMHeadModel(
            GPT2Config(
                n_layer=args.n_layer,
                n_head=args.n_head,
                n_embd=args.n_embd,
                n_positions=args.block_size,
            )
        ).save_pretrained(tmp)
        hf_model = GPT2LMHeadModel.from_pretrained(tmp).to(device).eval()
        model = tg.GPT.from_pretrained(tmp).to(device).eval()
    n = args.max_new_tokens

    @torch.no_grad()
    def recompute(ids, mask):  # the whole window computed again for every token
        for _ in range(n):
            window = ids[:, -args.block_size :]
            if mask is None:  # build-nanogpt's loop: the plain forward, all positions' logits
                logits = model(window)[0][:, -1]
            else:  # it has no padding: a fresh cache every token, the last position's logits only
                logits = model.next_logits(
                    window,
                    tg.KVCache(model.config, ids.size(0), window.size(1)),
                    mask[:, -args.block_size :],
                )
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        return ids

    methods = {
        "KV cache (this file)": lambda ids, mask: model.generate(
            ids, mask, max_new_tokens=n, temperature=0, eos_token_id=None
        ),
        "recompute every step": recompute,
        "transformers generate": lambda ids, mask: hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tg.EOT_TOKEN,
        ),
    }
    prompts = {
        1: (torch.randint(0, 50257, (1, 16)), None),
        8: tg.left_pad(
            [torch.randint(0, 50257, (k,)).tolist() for k in (16, 5, 11, 8, 14, 3, 9, 12)]
        ),
    }
    dtype = tg.pick_dtype(device)  # bfloat16 on a recent GPU, as --mode sample runs
    print(
        f"generate: {args.n_layer} layers, {args.n_embd} wide, {n} new tokens, greedy, {device}, {dtype}, "
        f"median of {args.rounds} interleaved rounds"
    )
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with tg.autocast(device, dtype):  # every side in the same dtype
        for batch, (ids, mask) in prompts.items():
            ids, mask = ids.to(device), None if mask is None else mask.to(device)
            with tg.autocast(
                device, torch.float32
            ):  # compared in float32: bf16 would break near-ties differently
                outputs = {name: method(ids, mask).tolist() for name, method in methods.items()}
            hidden = torch.randn(
                batch, args.n_embd, device=device
            )  # (B, C): next_logits multiplies by its .t()

            def lm_head_alone():  # the product every loop does once a token; no loop can be faster than n of them
                for _ in range(n):
                    model.lm_head.weight @ hidden.t()

            timed = {name: (lambda m=method: m(ids, mask)) for name, method in methods.items()}
            medians = interleaved({**timed, "LM head alone": lm_head_alone}, args.rounds, 0, sync)
            print(
                "batch 1, a 16-token prompt:"
                if batch == 1
                else "batch 8, prompts of 3-16 tokens, left-padded:"
            )
            for name, dt in medians.items():
                print(f"  {name:<24} {1000 * dt:8.1f} ms  {batch * n / dt:8.0f} tokens/s")
            ours, hf = medians["KV cache (this file)"], medians["transformers generate"]
            same = all(out == outputs["transformers generate"] for out in outputs.values())
            print(
                f"  same tokens from all three: {same}; KV cache is {medians['recompute every step'] / ours:.1f}x faster "
                f"than recomputing, {hf / ours:.2f}x faster than transformers; the LM head alone caps any loop at "
                f"{hf / medians['LM head alone']:.2f}x here"
            )


def tokenize_like_fineweb(doc):
    """build-nanogpt's fineweb.py: one document, <|endoftext|> first, to uint16."""
    global encoder
    if "encoder" not in globals():
        import tiktoken

        encoder = tiktoken.get_encoding("gpt2")
    tokens = np.array([encoder.eot_token] + encoder.encode_ordinary(doc))
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token dictionary too large for uint16"
    return tokens.astype(np.uint16)


def compare_tokenize(args, doc_chars=4000):
    """--files cut at paragraph breaks into ~1000-token documents (FineWeb's web pages), tokenized
    both ways without writing; the best of 3 alternating rounds each."""
    import multiprocessing as mp

    docs = []
    for row, where, _ in pdata.read_rows(
        argparse.Namespace(files=args.files, encoding_errors="strict", text_column="text")
    ):
        piece = ""
        for paragraph in pdata.text_of(row, "text", where).split("\n\n"):
            piece += paragraph + "\n\n"
            if len(piece) >= doc_chars:
                docs, piece = docs + [piece], ""
        docs.append(piece)
    speeds = {}
    counts = {}
    for name in ("prepare_data.py", "Pool.imap chunksize=16") * 3:
        t0, n = time.perf_counter(), 0
        if name == "prepare_data.py":
            batches = pdata.batches_of_documents(((d, None) for d in docs), start=None)
            for _, tokens in pdata.tokenize_in_parallel(batches, args.num_proc, lock=None):
                n += len(tokens)
        else:
            with mp.Pool(args.num_proc) as pool:
                n = sum(
                    len(tokens) for tokens in pool.imap(tokenize_like_fineweb, docs, chunksize=16)
                )
        speeds[name] = max(speeds.get(name, 0), n / (time.perf_counter() - t0))
        counts[name] = n
    for name, speed in speeds.items():
        print(
            f"{name:24s} {counts[name]:,} tokens of {len(docs):,} documents, {args.num_proc} "
            f"processes: {speed:,.0f} tokens/s"
        )
    print(
        f"ratio (ours / Pool.imap): {speeds['prepare_data.py'] / speeds['Pool.imap chunksize=16']:.2f}x"
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description="this project against build-nanogpt, transformers and fineweb.py"
    )
    p.add_argument("what", choices=["train", "generate", "tokenize"])
    p.add_argument("--device", default="auto")
    for name, default in (
        ("n_layer", 4),
        ("n_head", 4),
        ("n_embd", 256),
        ("block_size", 256),
        ("batch_size", 8),
        ("max_new_tokens", 100),
        ("rounds", 5),
        ("warmup", 1),
        ("compile", 0),
        ("num_proc", 2),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--files", nargs="+")
    args = p.parse_args(argv)
    {"train": compare_train, "generate": compare_generate, "tokenize": compare_tokenize}[args.what](
        args
    )


if __name__ == "__main__":
    main()
