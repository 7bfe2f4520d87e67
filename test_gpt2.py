"""Tests for train_gpt2.py and prepare_data.py, on the CPU, offline, in a few minutes.

References are independent wherever one exists: Hugging Face transformers' GPT-2 for
logits and generation, tiktoken for tokens, a plain loop for the KV cache, a
single-process run for DDP, an uninterrupted run for resume.

    pytest -q test_gpt2.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
if (SHARED / "tiktoken_cache").is_dir():  # tiktoken's GPT-2 files, for machines with no internet
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import train_gpt2 as tg  # noqa: E402

torch.set_num_threads(2)


def needs_shared(name):
    """The path of a file in ../shared/data. Without it the test skips on a developer's machine,
    but fails under CI (CI=true), where shared/ is always beside the clone: a skip there would hide a failure."""
    path = SHARED / "data" / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {path}")
        pytest.skip(f"needs ../shared/data/{name}")
    return path


def run_script(script, *args, cwd=HERE, env=None, check=True):
    """Run one of the project's scripts as a user would; return the finished process."""
    proc = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *words):
    """Failed with one line that says what is wrong (after any progress output), no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


# -----------------------------------------------------------------------------
# A small random GPT-2, saved the way Hugging Face saves real checkpoints


def make_hf_gpt2(path, n_head=4, n_embd=64, n_layer=2, n_positions=64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=50257)
    model = GPT2LMHeadModel(config)
    # Random weights of a larger scale than the init (LayerNorms and biases included), so the
    # logits have structure and every weight must be copied into the right place to match.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers model, our model loaded from its saved checkpoint, checkpoint dir)."""
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_model = make_hf_gpt2(path)
    return hf_model, tg.GPT.from_pretrained(str(path)).eval(), path


def random_ids(B, T, seed=0, vocab=50257):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# The model against Hugging Face transformers


@pytest.mark.parametrize("n_head", [1, 4, 8])
def test_logits_match_transformers(tmp_path, n_head):
    hf_model = make_hf_gpt2(tmp_path, n_head=n_head)
    model = tg.GPT.from_pretrained(str(tmp_path)).eval()
    ids = random_ids(3, 40)
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf_model(ids).logits
    assert ours.shape == theirs.shape == (3, 40, 50257)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_padded_vocab_changes_nothing(hf_pair):
    _, model, path = hf_pair
    padded = tg.GPT.from_pretrained(str(path), padded_vocab_size=50304).eval()
    assert padded.lm_head.weight.shape == (50304, 64)
    ids = random_ids(2, 30)
    targets = random_ids(2, 30, seed=1)
    with torch.no_grad():
        logits, loss = model(ids, targets)
        logits_p, loss_p = padded(ids, targets)
    assert logits_p.shape[-1] == 50257  # the padded rows never reach softmax
    assert torch.allclose(logits, logits_p, atol=1e-5) and abs(loss.item() - loss_p.item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocab_rows_get_no_gradient_and_no_nan(hf_pair, dtype):
    _, model, path = hf_pair
    padded = tg.GPT.from_pretrained(str(path), padded_vocab_size=50304)
    ids, targets = random_ids(2, 30), random_ids(2, 30, seed=1)
    targets[0, :5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        _, loss = padded(ids, targets)
    loss.backward()
    grad = padded.lm_head.weight.grad
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in padded.parameters())
    assert grad[50257:].abs().max().item() == 0  # the -inf bias: softmax gives exactly 0 there
    if dtype == torch.float32:  # and the real rows learn exactly what the unpadded model learns
        model.zero_grad()
        model(ids, targets)[1].backward()
        assert torch.allclose(grad[:50257], model.lm_head.weight.grad, atol=1e-6)
        model.zero_grad()


def test_loss_matches_transformers_and_ignores_minus_100(hf_pair):
    hf_model, model, _ = hf_pair
    ids = random_ids(2, 33)
    labels = ids.clone()
    labels[0, :10] = -100
    with torch.no_grad():
        _, ours = model(ids[:, :-1], labels[:, 1:])
        theirs = hf_model(ids, labels=labels).loss  # transformers shifts the labels itself
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_greedy_generation_matches_transformers_left_padded(hf_pair):
    hf_model, model, _ = hf_pair
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 11, 7)]
    ids, mask = tg.left_pad(prompts)
    ours = model.generate(ids, mask, max_new_tokens=20, temperature=0, eos_token_id=None)
    theirs = hf_model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                               pad_token_id=tg.EOT_TOKEN, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_rows_stop_at_eos_and_are_padded_like_transformers(hf_pair):
    hf_model, model, _ = hf_pair
    prompts = [random_ids(1, n, seed=10 + n)[0].tolist() for n in (4, 9)]
    ids, mask = tg.left_pad(prompts)
    free = model.generate(ids, mask, max_new_tokens=12, temperature=0, eos_token_id=None)
    # Declare the 3rd generated token of row 0 the end token: row 0 must stop there, row 1 go on.
    eos = free[0, ids.size(1) + 2].item()
    ours = model.generate(ids, mask, max_new_tokens=12, temperature=0, eos_token_id=eos)
    theirs = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=eos, eos_token_id=eos)
    assert ours.tolist() == theirs.tolist()
    assert ours[0, ids.size(1) + 2:].eq(eos).all()


# -----------------------------------------------------------------------------
# Generation against plain references


def generate_without_cache(model, ids, max_new_tokens):
    """build-nanogpt's loop: recompute the whole (cropped) sequence for every token."""
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.config.block_size:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("prompt_len, new", [(10, 30), (50, 40), (90, 5)])  # block_size is 64
def test_kv_cache_equals_recomputing(hf_pair, prompt_len, new):
    _, model, _ = hf_pair
    ids = random_ids(2, prompt_len, seed=3)
    expected = generate_without_cache(model, ids, new)
    assert model.generate(ids, max_new_tokens=new, temperature=0, eos_token_id=None).tolist() == expected.tolist()


@pytest.mark.parametrize("left_padding", [0, 3])
def test_prompt_fed_in_pieces_through_the_cache_equals_one_pass(hf_pair, left_padding):
    # With past > 0 and T > 1 new tokens, SDPA's is_causal would align its triangle top-left and
    # show the new tokens the wrong keys: the cache must give the bottom-right mask itself.
    _, model, _ = hf_pair
    ids = random_ids(2, 30, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :left_padding] = 0  # row 0 left-padded (when left_padding > 0), row 1 not
    with torch.no_grad():
        cache = tg.KVCache(model.config, 2, 30, "cpu", torch.float32)
        one_pass = tg.forward_cached(model, ids, cache, mask)
        for pieces in [(12, 18), (5, 1, 7, 17)]:
            cache = tg.KVCache(model.config, 2, 30, "cpu", torch.float32)
            bounds = np.cumsum((0,) + pieces)
            for a, b in zip(bounds[:-1], bounds[1:]):
                logits = tg.forward_cached(model, ids[:, a:b], cache, mask[:, a:b])
            assert (logits - one_pass).abs().max().item() < 1e-5
        if not left_padding:  # and the one pass is the plain forward's last position
            assert (one_pass - model(ids)[0][:, -1]).abs().max().item() < 1e-5


def test_batch_equals_each_row_alone(hf_pair):
    _, model, _ = hf_pair
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 30, 17, 1)]
    ids, mask = tg.left_pad(prompts)
    batch = model.generate(ids, mask, max_new_tokens=50, temperature=0, eos_token_id=None)  # slides past 64
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=50, temperature=0, eos_token_id=None)
        assert batch[row, ids.size(1):].tolist() == alone[0, len(prompt):].tolist()


def test_sampling_is_seeded_and_filters_work(hf_pair):
    _, model, _ = hf_pair
    ids = random_ids(2, 8)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(ids, max_new_tokens=15, eos_token_id=None, generator=g, **kw).tolist()

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = model.generate(ids, max_new_tokens=15, temperature=0, eos_token_id=None).tolist()
    assert sample(3, top_k=1) == greedy
    assert sample(4, top_p=1e-6) == greedy
    assert sample(5, top_k=50, top_p=0.9, temperature=0.7) == sample(5, top_k=50, top_p=0.9, temperature=0.7)


def test_sample_next_token_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits.softmax(-1)[0]
    seen_k = {tg.sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen_k == {0, 1}
    # the two likeliest hold 0.64 + 0.24 = 0.88 of the mass: top_p 0.85 keeps exactly them
    assert probs[:2].sum() > 0.85 > probs[0]
    seen_p = {tg.sample_next_token(logits, top_p=0.85, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen_p == {0, 1}


def test_causality(hf_pair):
    _, model, _ = hf_pair
    ids = random_ids(1, 40)
    changed = ids.clone()
    changed[0, 25:] = random_ids(1, 15, seed=9)
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-6)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_gpt2_size_and_init_loss():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # wte counted once: tied
    assert model.lm_head.weight is model.transformer.wte.weight
    small = tg.GPT(tg.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, padded_vocab_size=50304))
    with torch.no_grad():
        _, loss = small(random_ids(4, 64), random_ids(4, 64, seed=1))
    assert abs(loss.item() - math.log(50257)) < 0.05  # a fresh model guesses uniformly
    # residual projections start smaller: 0.02 / sqrt(2 * n_layer)
    assert abs(small.transformer.h[0].attn.c_proj.weight.std().item() - 0.01) < 0.001


def test_tokenizer_round_trip():
    enc = tg.get_tokenizer()
    text = (SHARED / "data" / "tinyshakespeare.txt").read_text()[:5000] if SHARED.is_dir() else "ROMEO:\nBut soft!"
    text += " naïve café 日本語 🙂 <tag> \t\n  x"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tg.EOT_TOKEN]


def test_compiled_model_trains_and_generates(hf_pair):
    _, _, path = hf_pair
    model = tg.GPT.from_pretrained(str(path), padded_vocab_size=50304)  # the -inf bias compiled too
    compiled = torch.compile(model)
    ids = random_ids(2, 32)
    eager_logits, eager_loss = model(ids, ids)
    eager_loss.backward()
    eager_grad, model.lm_head.weight.grad = model.lm_head.weight.grad, None
    logits, loss = compiled(ids, ids)
    loss.backward()
    assert torch.allclose(logits, eager_logits, atol=1e-4) and abs(loss.item() - eager_loss.item()) < 1e-4
    grad = model.lm_head.weight.grad
    assert torch.allclose(grad, eager_grad, atol=1e-5) and grad[50257:].abs().max().item() == 0
    model.eval()
    # generation through the compiled wrapper (what broke build-nanogpt) gives the eager tokens
    out = compiled.generate(ids[:, :5], max_new_tokens=10, temperature=0, eos_token_id=None)
    assert out.tolist() == model.generate(ids[:, :5], max_new_tokens=10, temperature=0, eos_token_id=None).tolist()


# -----------------------------------------------------------------------------
# --mode sample, and bad input


def test_sample_mode_streams_the_greedy_continuation(hf_pair):
    _, model, path = hf_pair
    enc = tg.get_tokenizer()
    prompt = "The quick brown fox"
    out = model.generate(torch.tensor([enc.encode(prompt)]), max_new_tokens=12, temperature=0)[0].tolist()
    new = out[len(enc.encode(prompt)):]
    expected = prompt + enc.decode(new[:new.index(tg.EOT_TOKEN)] if tg.EOT_TOKEN in new else new)
    proc = run_script("train_gpt2.py", "--mode", "sample", "--init_from", path, "--prompt", prompt,
                      "--max_new_tokens", 12, "--temperature", 0, "--device", "cpu")
    assert proc.stdout.rstrip("\n") == expected


def test_sample_mode_batches_prompts_and_samples(hf_pair):
    _, _, path = hf_pair
    args = ["--mode", "sample", "--init_from", path, "--prompt", "One", "--prompt", "Two words",
            "--num_samples", 2, "--max_new_tokens", 8, "--seed", 7, "--top_k", 50, "--device", "cpu"]
    first = run_script("train_gpt2.py", *args).stdout
    assert first.count("--- sample") == 4 and "\nOne" in first and "\nTwo words" in first
    assert run_script("train_gpt2.py", *args).stdout == first  # --seed makes it reproducible


def test_bad_model_name_and_broken_checkpoint(tmp_path, hf_pair):
    assert_one_line_error(run_script("train_gpt2.py", "--mode", "sample", "--init_from", "gpt5", check=False), "unknown model", "gpt2-xl")
    from safetensors.torch import load_file, save_file
    _, _, path = hf_pair
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(path / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="transformer.h.1.mlp.c_fc.bias"):
        tg.GPT.from_pretrained(str(tmp_path))
    assert_one_line_error(run_script("train_gpt2.py", "--init_from", tmp_path, check=False), "missing keys", "c_fc.bias")
    assert_one_line_error(run_script("train_gpt2.py", "--init_from", tmp_path / "nope.pt", check=False), "not found")


def test_empty_prompt_is_a_clear_error(hf_pair):
    _, model, path = hf_pair
    assert_one_line_error(run_script("train_gpt2.py", "--init_from", path, "--prompt", "", check=False), "prompt is empty")
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))


# -----------------------------------------------------------------------------
# prepare_data.py

import prepare_data as pdata  # noqa: E402

DOCS = [
    "First document.\nIt has two lines.",
    "Ünïcödé, 日本語 and emoji 🙂 survive the round trip.",
    "x",
    "A longer one: " + " ".join(f"word{i}" for i in range(300)),
    "  leading and trailing whitespace  \n\n",
] + [f"Document number {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]


def write_corpus(folder):
    """The same documents as a .jsonl file and single-document .txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in DOCS[:-2]:
            f.write(json.dumps({"text": doc, "id": 0}) + "\n")
    for i, doc in enumerate(DOCS[-2:]):
        (folder / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return [folder / "docs.jsonl", folder / "doc0.txt", folder / "doc1.txt"]


def read_split(out_dir, split):
    meta = json.loads((out_dir / "meta.json").read_text())
    shards = [np.load(out_dir / name) for name in meta["splits"][split]["shards"]]
    return meta, shards


def test_shards_decode_back_to_the_documents(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    run_script("prepare_data.py", "--files", *files, "--out_dir", out, "--shard_size", 500, "--val_tokens", 700, "--num_proc", 2)
    meta, val = read_split(out, "val")
    _, train = read_split(out, "train")
    assert [len(s) for s in val] == [500, 200]  # the val split ends where --val_tokens says
    assert all(len(s) == 500 for s in train[:-1]) and 0 < len(train[-1]) <= 500
    assert all(s.dtype == np.uint16 for s in val + train)
    assert meta["splits"]["val"]["tokens"] == 700
    assert meta["splits"]["train"]["tokens"] == sum(map(len, train))
    tokens = np.concatenate(val + train).tolist()
    enc = tg.get_tokenizer()
    expected = [t for doc in DOCS for t in [tg.EOT_TOKEN] + enc.encode_ordinary(doc)]
    assert tokens == expected  # tiktoken, document by document, each after <|endoftext|>
    assert enc.decode(tokens).split("<|endoftext|>")[1:] == DOCS


def test_rerun_is_identical_and_skipped_unless_overwrite(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    args = ["--files", *files, "--shard_size", 300, "--val_tokens", 300]
    run_script("prepare_data.py", *args, "--out_dir", tmp_path / "a", "--num_proc", 1)
    run_script("prepare_data.py", *args, "--out_dir", tmp_path / "b", "--num_proc", 2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:  # 1 and 2 processes write the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    shard = tmp_path / "a" / "train_000000.npy"
    before = shard.stat().st_mtime_ns
    assert "already prepared" in run_script("prepare_data.py", *args, "--out_dir", tmp_path / "a").stdout
    assert shard.stat().st_mtime_ns == before
    run_script("prepare_data.py", *args, "--out_dir", tmp_path / "a", "--overwrite")
    assert shard.read_bytes() == (tmp_path / "b" / "train_000000.npy").read_bytes()


def test_interrupted_run_leaves_no_complete_looking_shard(tmp_path, monkeypatch):
    files = write_corpus(tmp_path / "corpus")
    args = ["--files", *map(str, files), "--shard_size", "300", "--val_tokens", "300", "--num_proc", "1"]
    pdata.main(args + ["--out_dir", str(tmp_path / "clean")])
    real_save, saved = pdata.save_npy, []

    def save_then_die(path, array):
        if len(saved) == 3:  # killed while writing the 4th shard: half a temp file, no rename
            with open(f"{path}.tmp", "wb") as f:
                f.write(b"\x93NUMPY half")
            raise KeyboardInterrupt
        real_save(path, array)
        saved.append(path)

    monkeypatch.setattr(pdata, "save_npy", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pdata.main(args + ["--out_dir", str(tmp_path / "cut")])
    cut = tmp_path / "cut"
    assert not (cut / "meta.json").exists()  # not marked complete
    for name in map(os.path.basename, saved):  # every shard under its final name is whole
        assert (np.load(cut / name) == np.load(tmp_path / "clean" / name)).all()
    monkeypatch.setattr(pdata, "save_npy", real_save)
    pdata.main(args + ["--out_dir", str(cut)])  # the re-run
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    for p in cut.iterdir():
        assert p.read_bytes() == (tmp_path / "clean" / p.name).read_bytes()


def test_parquet_json_and_a_named_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": DOCS[:20], "n": list(range(20))}), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in DOCS[20:]]))
    out = tmp_path / "out"
    run_script("prepare_data.py", "--files", tmp_path / "a.parquet", tmp_path / "b.json", "--text_column", "body",
               "--out_dir", out, "--val_tokens", 100)
    _, val = read_split(out, "val")
    _, train = read_split(out, "train")
    assert tg.get_tokenizer().decode(np.concatenate(val + train).tolist()).split("<|endoftext|>")[1:] == DOCS


def test_small_corpus_gets_a_val_split(tmp_path):
    out = tmp_path / "shakespeare"
    run_script("prepare_data.py", "--files", needs_shared("tinyshakespeare.txt"), "--out_dir", out)
    meta = json.loads((out / "meta.json").read_text())
    total = meta["splits"]["val"]["tokens"] + meta["splits"]["train"]["tokens"]
    assert total == 338_025 + 1  # the data README's count, plus the leading <|endoftext|>
    assert meta["splits"]["val"]["tokens"] == total // 10


def test_workers_started_by_spawning(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    code = ("import multiprocessing as mp, sys; mp.set_start_method('spawn'); import prepare_data; "
            "prepare_data.main(sys.argv[1:])")
    subprocess.run([sys.executable, "-c", code, "--files", *map(str, files), "--out_dir", str(tmp_path / "out"),
                    "--val_tokens", "50", "--num_proc", "2"], cwd=HERE, check=True, capture_output=True)
    assert (tmp_path / "out" / "meta.json").exists()


def test_prepare_data_bad_input(tmp_path, monkeypatch):
    def prepare(*args):
        return run_script("prepare_data.py", *args, "--out_dir", tmp_path / "out", check=False)

    assert_one_line_error(prepare("--files", tmp_path / "missing.txt"), "file not found", "missing.txt")
    (tmp_path / "rows.jsonl").write_text('{"content": "hi", "url": "x"}\n')
    assert_one_line_error(prepare("--files", tmp_path / "rows.jsonl"), "no column 'text'", "content, url")
    (tmp_path / "empty.jsonl").write_text("")
    assert_one_line_error(prepare("--files", tmp_path / "empty.jsonl"), "empty")
    (tmp_path / "tiny.txt").write_text("just a few words")
    assert_one_line_error(prepare("--files", tmp_path / "tiny.txt", "--val_tokens", 1000), "--val_tokens")

    class HugeTokenizer:  # a tokenizer whose ids do not fit in uint16
        def encode_ordinary(self, text):
            return [70_000]

    monkeypatch.setattr(pdata, "_encoder", HugeTokenizer())
    with pytest.raises(pdata.DataError, match="70000 does not fit in uint16"):
        pdata.tokenize_documents(["anything"])


def alpaca_records(n=30):
    if (SHARED / "data" / "alpaca_data_sample.json").exists():
        return json.loads((SHARED / "data" / "alpaca_data_sample.json").read_text())[:n]
    return [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i} it is."} for i in range(n)]


def test_sft_masks_exactly_the_answers(tmp_path):
    records = alpaca_records(30) + [{"instruction": "Too long", "input": "", "output": "word " * 2000}]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    out = tmp_path / "alpaca"
    run_script("prepare_data.py", "--sft", "--files", tmp_path / "alpaca.json", "--out_dir", out, "--val_fraction", 0.2)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dropped_too_long"] == 1
    assert meta["splits"]["val"]["examples"] == 6 and meta["splits"]["train"]["examples"] == 24
    enc = tg.get_tokenizer()
    seen = []
    for split in ("train", "val"):
        tokens, mask, offsets = (np.load(out / f"{split}_{name}.npy") for name in ("tokens", "mask", "offsets"))
        assert len(tokens) == len(mask) == offsets[-1] == meta["splits"][split]["tokens"]
        for i in range(len(offsets) - 1):
            t, m = tokens[offsets[i]:offsets[i + 1]], mask[offsets[i]:offsets[i + 1]].astype(bool)
            prompt, answer = enc.decode(t[~m].tolist()), enc.decode(t[m].tolist())
            assert (m == (np.arange(len(m)) >= m.argmax())).all()  # one answer span, at the end
            record = next(r for r in records if answer == r["output"] + "<|endoftext|>")
            template = pdata.ALPACA_PROMPT_WITH_INPUT if record["input"] else pdata.ALPACA_PROMPT
            assert prompt == template.format(**record)
            seen.append(record["instruction"])
    assert sorted(seen) == sorted(r["instruction"] for r in records[:30])


def test_hellaswag_preparation(tmp_path):
    lines = needs_shared("hellaswag_val.jsonl").read_text().splitlines()[:25]
    (tmp_path / "hs.jsonl").write_text("\n".join(lines) + "\n")
    run_script("prepare_data.py", "--hellaswag", "--files", tmp_path / "hs.jsonl", "--out_dir", tmp_path / "hs")
    items = [json.loads(l) for l in (tmp_path / "hs" / "hellaswag_val.jsonl").read_text().splitlines()]
    originals = [json.loads(l) for l in lines]
    assert [(i["ctx"], i["endings"], i["label"]) for i in items] == [(o["ctx"], o["endings"], o["label"]) for o in originals]


# -----------------------------------------------------------------------------
# Pretraining

TINY = ["--n_layer", 2, "--n_head", 2, "--n_embd", 32, "--block_size", 32, "--batch_size", 2,
        "--total_batch_size", 256, "--warmup_steps", 2, "--max_lr", 3e-3, "--eval_samples", 0, "--device", "cpu"]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """tinyshakespeare prepared by prepare_data.py (or a stand-in text if shared/ is absent)."""
    folder = tmp_path_factory.mktemp("shakespeare")
    source = SHARED / "data" / "tinyshakespeare.txt"
    if not source.exists():
        source = folder / "text.txt"
        source.write_text(" ".join(DOCS) * 200)
    run_script("prepare_data.py", "--files", source, "--out_dir", folder / "data", "--shard_size", 100_000)
    return folder / "data"


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def train_losses(out_dir):
    return [(e["step"], e["loss"]) for e in read_log(out_dir) if "loss" in e]


def test_lr_schedule():
    lr = lambda step: tg.get_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)  # noqa: E731
    assert lr(0) == pytest.approx(6e-5)  # warmup starts at max_lr / warmup_steps
    assert lr(9) == pytest.approx(6e-4)  # and ends at max_lr
    assert lr(10) == pytest.approx(6e-4)  # cosine starts at the top
    assert lr(60) == pytest.approx((6e-4 + 6e-5) / 2)  # half way down the cosine
    assert lr(110) == pytest.approx(6e-5) and lr(500) == pytest.approx(6e-5)  # the floor
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_pretraining_learns(shakespeare, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_gpt2.py", "--mode", "pretrain", "--data_dir", shakespeare, "--out_dir", out, *TINY,
                      "--n_embd", 64, "--batch_size", 8, "--max_lr", 1e-2,
                      "--max_steps", 40, "--eval_interval", 20, "--val_steps", 4, "--eval_samples", 1)
    losses = [loss for _, loss in train_losses(out)]
    assert losses[0] == pytest.approx(math.log(50257), abs=0.1)
    assert sum(losses[-5:]) / 5 < 7.2  # far below ln(50257) = 10.8 after 40 steps of 256 tokens
    val = [e["val_loss"] for e in read_log(out) if "val_loss" in e]
    assert len(val) == 2 and val[0] > val[1] and val[1] < 7.6
    assert "sample: Hello, I'm a language model," in proc.stdout and "ETA" in proc.stdout
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 40 and checkpoint["config"]["padded_vocab_size"] == 50304
    # the checkpoint samples with --mode sample
    run_script("train_gpt2.py", "--mode", "sample", "--init_from", out / "ckpt.pt", "--max_new_tokens", 5, "--device", "cpu")


class RecordingOptimizer:
    """Stands in for AdamW: keeps the gradients it is asked to apply."""

    def __init__(self, model):
        self.model = model

    def step(self):
        self.grads = [p.grad.clone() for p in self.model.parameters()]

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def gradients(model, micro_batches):
    optimizer = RecordingOptimizer(model)
    loss, _, _ = tg.train_step(model, optimizer, micro_batches, "cpu", 1, grad_clip=1e9)
    return loss, optimizer.grads


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    x, y = random_ids(8, 16), random_ids(8, 16, seed=1)
    loss_big, big = gradients(model, [(x, y)])
    loss_acc, acc = gradients(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    for a, b in zip(acc, big):  # float32 sums in another order: equal to ~1e-7 relative
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    # Masked targets (fine-tuning): micro-batches with different numbers of targets must
    # still give the mean over every target of the step.
    y_masked = y.clone()
    y_masked[0, :12] = -100
    y_masked[5, 3:] = -100
    loss_big, big = gradients(model, [(x, y_masked)])
    loss_acc, acc = gradients(model, [(x[i:i + 2], y_masked[i:i + 2]) for i in range(0, 8, 2)])
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(acc, big))


def make_shards(folder, shard_lengths, val_length=100):
    """A prepared folder whose token at stream position i is i (mod 50000), for loader tests."""
    folder.mkdir()
    names, position = [], val_length
    pdata.save_npy(folder / "val_000000.npy", (np.arange(val_length) % 50000).astype(np.uint16))
    for i, n in enumerate(shard_lengths):
        names.append(f"train_{i:06d}.npy")
        pdata.save_npy(folder / names[-1], (np.arange(position, position + n) % 50000).astype(np.uint16))
        position += n
    pdata.save_json(folder / "meta.json", {"kind": "pretrain", "splits": {
        "val": {"tokens": val_length, "shards": ["val_000000.npy"]},
        "train": {"tokens": sum(shard_lengths), "shards": names}}})
    return folder


def test_loader_reads_every_token_across_shards_and_ranks(tmp_path):
    data = make_shards(tmp_path / "data", [37, 50, 13, 64])  # windows must cross shard ends
    B, T, accum = 2, 8, 2
    single = tg.PretrainLoader(data, "train", B * 2, T, seed=3)  # one rank, twice the batch
    ranks = [tg.PretrainLoader(data, "train", B, T, rank=r, world_size=2, seed=3) for r in range(2)]
    stream = np.concatenate([single.order[i] for i in range(4)]).astype(np.int64)
    for step in range(2):
        whole = single.next_step(accum)
        parts = [loader.next_step(accum) for loader in ranks]
        # the step's sequences, in order, are consecutive windows of the stream
        xs = torch.cat([x for x, _ in whole]).view(-1)
        start = step * accum * 2 * B * T
        assert xs.tolist() == stream[start:start + len(xs)].tolist()
        assert all((y[:, :-1] == x[:, 1:]).all() for x, y in whole)
        # two ranks together read exactly what one reads: micro-step m, rank r
        split = torch.cat([torch.cat([parts[r][m][0] for r in range(2)]) for m in range(accum)])
        assert split.tolist() == torch.cat([x for x, _ in whole]).tolist()
    # 164 tokens hold 2 steps of 64 (+1): the next step starts a new epoch, in another order
    epoch0_order = [int(s[0]) for s in single.order]
    single.next_step(accum)
    assert single.epoch == 1 and [int(s[0]) for s in single.order] != epoch0_order
    state = single.state_dict()
    again = tg.PretrainLoader(data, "train", B * 2, T, seed=3)
    again.load_state_dict(state)
    assert [x.tolist() for x, _ in again.next_step(accum)] == [x.tolist() for x, _ in single.next_step(accum)]


def test_ddp_two_processes_equal_one(shakespeare, tmp_path):
    args = ["--mode", "pretrain", "--data_dir", shakespeare, *TINY, "--max_steps", 6, "--eval_interval", 3, "--val_steps", 4]
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run(torchrun + [str(HERE / "train_gpt2.py"), *map(str, args), "--out_dir", str(tmp_path / "two")],
                   check=True, capture_output=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == 8  # 6 steps, 2 evaluations
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    keys = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"].keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def test_training_with_torch_compile(shakespeare, tmp_path):
    proc = run_script("train_gpt2.py", "--mode", "pretrain", "--data_dir", shakespeare, "--out_dir", tmp_path, *TINY,
                      "--compile", 1, "--max_steps", 2, "--eval_interval", 1, "--val_steps", 2, "--eval_samples", 1)
    assert proc.stdout.count("val_loss") == 2 and "sample: Hello" in proc.stdout  # evaluation and sampling compiled
    keys = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"].keys()
    assert "lm_head.weight" in keys and not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def interrupt_and_resume(args, out_dir, signal_at_step):
    """Run, send SIGTERM once the log shows signal_at_step, then resume to the end."""
    import signal
    proc = subprocess.Popen([sys.executable, str(HERE / "train_gpt2.py"), *map(str, args), "--out_dir", str(out_dir)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # blocking reads: no sleeps
        if line.startswith(f"step {signal_at_step:5d}/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0
    stopped_at = torch.load(out_dir / "ckpt.pt", weights_only=True)["step"]
    run_script("train_gpt2.py", *args, "--out_dir", out_dir, "--init_from", "resume")
    return stopped_at


def test_resume_after_sigterm_equals_uninterrupted(shakespeare, tmp_path):
    args = ["--mode", "pretrain", "--data_dir", shakespeare, *TINY, "--max_steps", 40, "--eval_interval", 10,
            "--val_steps", 2, "--ckpt_interval", 1000]
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "straight")
    stopped_at = interrupt_and_resume(args, tmp_path / "cut", signal_at_step=6)
    assert 6 <= stopped_at < 40  # it stopped early, at the end of a step, and saved
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "cut")
    assert [s for s, _ in resumed] == list(range(1, 41))
    assert resumed == straight  # bit for bit
    val = lambda d: [e["val_loss"] for e in read_log(d) if "val_loss" in e]  # noqa: E731
    assert val(tmp_path / "cut") == val(tmp_path / "straight")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(shakespeare, tmp_path):
    proc = run_script("train_gpt2.py", "--mode", "pretrain", "--data_dir", shakespeare, "--out_dir", tmp_path, *TINY,
                      "--max_lr", 1e9, "--max_steps", 50, "--ckpt_interval", 1, "--eval_interval", 1000, check=False)
    assert_one_line_error(proc, "loss became", "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def main_error(*args):
    """The one-line message train_gpt2.main exits with (in-process: no interpreter start)."""
    with pytest.raises(SystemExit) as exit:
        tg.main([str(a) for a in args])
    message = str(exit.value.code)
    assert message.startswith("error:") and "\n" not in message
    return message


def test_pretrain_bad_input(shakespeare, tmp_path):
    def pretrain(*args):
        return main_error("--mode", "pretrain", *TINY, "--max_steps", 2, "--out_dir", tmp_path / "o", *args)

    proc = run_script("train_gpt2.py", "--mode", "pretrain", "--data_dir", tmp_path / "nothing", check=False)
    assert_one_line_error(proc, "not found", "prepare_data.py")  # as the user sees it
    assert "not a multiple" in pretrain("--data_dir", shakespeare, "--total_batch_size", 100) and "64" in pretrain(
        "--data_dir", shakespeare, "--total_batch_size", 100)
    assert "nothing to resume" in pretrain("--data_dir", shakespeare, "--init_from", "resume")
    assert "no train shards" in pretrain("--data_dir", make_shards(tmp_path / "empty", []))
    broken = make_shards(tmp_path / "broken", [500])
    np.save(broken / "train_000000.npy", np.arange(500, dtype=np.int32))  # not uint16
    assert "re-run prepare_data.py" in pretrain("--data_dir", broken)
    (tmp_path / "unfinished").mkdir()
    assert "no meta.json" in pretrain("--data_dir", tmp_path / "unfinished")
    assert "less than one step" in pretrain("--data_dir", make_shards(tmp_path / "small", [100]))
    tg.main(["--mode", "pretrain", *map(str, TINY), "--max_steps", "1", "--data_dir", str(shakespeare), "--out_dir", str(tmp_path / "o")])
    assert "already holds a checkpoint" in pretrain("--data_dir", shakespeare)


def test_mfu_peak_matches_the_exact_gpu_model():
    peaks = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100 80GB PCIe": 312, "NVIDIA A100-PCIE-40GB": 312,
             "NVIDIA L4": 121, "NVIDIA L40S": 362, "NVIDIA L40": 181, "NVIDIA A10G": 70, "NVIDIA A10": 125,
             "NVIDIA GeForce RTX 4090": 165, "NVIDIA GeForce RTX 3090": 71,
             # not in the table: None, so that the user gives --peak_tflops
             "NVIDIA GeForce RTX 3090 Ti": None, "NVIDIA GeForce RTX 4090 D": None, "Tesla V100-SXM2-16GB": None,
             "NVIDIA RTX A6000": None, "NVIDIA L20": None, "NVIDIA A40": None, "": None}
    assert {name: tg.gpu_peak_tflops(name) for name in peaks} == peaks
    assert tg.peak_flops("cpu") is None and tg.peak_flops("cpu", override=100) == 100e12


def test_bench_mode_prints_throughput_memory_and_the_anchor(capsys):
    tg.main(list(map(str, ["--mode", "bench", "--n_layer", 2, "--n_head", 2, "--n_embd", 32, "--block_size", 32,
                           "--batch_size", 2, "--bench_steps", 3, "--bench_warmup", 1, "--device", "cpu",
                           "--compile", 0, "--bench_anchor", 1])))
    out = capsys.readouterr().out
    ours = next(line for line in out.splitlines() if line.startswith("ours "))
    assert "tokens/s" in ours and "peak memory +" in ours and "build-nanogpt" in out
    assert "x build-nanogpt's speed" in out


# -----------------------------------------------------------------------------
# Instruction fine-tuning

INSTRUCTIONS = [
    {"instruction": "What color is the sky?", "input": "", "output": "The sky is blue."},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple, crisp and red."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Who wrote Hamlet?", "input": "", "output": "William Shakespeare wrote Hamlet."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend!"},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "What is the opposite of hot?", "input": "", "output": "Cold."},
]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    (folder / "records.json").write_text(json.dumps(INSTRUCTIONS))
    run_script("prepare_data.py", "--sft", "--files", folder / "records.json", "--out_dir", folder / "data",
               "--val_fraction", 0.125, "--block_size", 128)
    return folder / "data"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A small random GPT-2 with room for the Alpaca prompt (128 positions), as one of our
    checkpoints (starting from it needs no transformers import: faster tests)."""
    path = tmp_path_factory.mktemp("base")
    make_hf_gpt2(path, n_positions=128)
    model = tg.GPT.from_pretrained(str(path))
    torch.save({"model": model.state_dict(), "config": tg.asdict(model.config)}, path / "base.pt")
    return path / "base.pt"


def train_examples(data):
    """The (instruction, output) pairs of the train split, decoded back."""
    enc = tg.get_tokenizer()
    tokens, mask, offsets = (np.load(data / f"train_{n}.npy") for n in ("tokens", "mask", "offsets"))
    pairs = []
    for i in range(len(offsets) - 1):
        t, m = tokens[offsets[i]:offsets[i + 1]], mask[offsets[i]:offsets[i + 1]].astype(bool)
        prompt, answer = enc.decode(t[~m].tolist()), enc.decode(t[m][:-1].tolist())
        pairs.append(next((r["instruction"], answer) for r in INSTRUCTIONS if r["output"] == answer and r["instruction"] in prompt))
    return pairs


def test_loss_counts_answer_tokens_only_and_ignores_padding(sft_data):
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    loader = tg.InstructionLoader(sft_data, "train", 3, 128)
    x, y = loader.batch([0, 1, 2])
    with torch.no_grad():
        _, loss = model(x, y)
        # by hand: every example alone, unpadded, cross-entropy at its answer positions only
        total, count = 0.0, 0
        for i in range(3):
            start, end = loader.offsets[i], loader.offsets[i + 1]
            tokens = torch.tensor(loader.tokens[start:end].astype(np.int64))
            answer = torch.tensor(loader.mask[start + 1:end].astype(bool))
            logits, _ = model(tokens[None, :-1])
            log_probs = logits[0].log_softmax(-1)[torch.arange(len(tokens) - 1), tokens[1:]]
            total -= log_probs[answer].sum().item()
            count += int(answer.sum())
        assert count == int((y != -100).sum())
        assert loss.item() == pytest.approx(total / count, rel=1e-5)
        for width in (60, 80):  # padded further: same loss
            x_wide = torch.full((3, width), tg.EOT_TOKEN)
            y_wide = torch.full((3, width), -100)
            x_wide[:, :x.size(1)], y_wide[:, :y.size(1)] = x, y
            assert model(x_wide, y_wide)[1].item() == pytest.approx(loss.item(), rel=1e-5)


FINETUNE = ["--mode", "finetune", "--batch_size", 7, "--total_batch_size", 7, "--max_lr", 3e-3,
            "--warmup_steps", 5, "--eval_interval", 20, "--val_steps", 2, "--eval_samples", 0, "--device", "cpu"]


def test_finetuned_model_answers_and_stops(sft_data, base_model, tmp_path):
    out = tmp_path / "ft"
    run_script("train_gpt2.py", *FINETUNE, "--init_from", base_model, "--data_dir", sft_data, "--out_dir", out,
               "--max_steps", 40)
    losses = [loss for _, loss in train_losses(out)]
    assert losses[-1] < 0.1 * losses[0]  # memorized the handful of answers
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["prompt_template"] == pdata.ALPACA_PROMPT  # the checkpoint remembers its template
    no_input = [r["instruction"] for r in INSTRUCTIONS if not r["input"]]
    (instruction, answer), (chat_instruction, chat_answer) = [p for p in train_examples(sft_data) if p[0] in no_input][:2]
    # --mode sample wraps the prompt in the template and stops at <|endoftext|>
    proc = run_script("train_gpt2.py", "--mode", "sample", "--init_from", out / "ckpt.pt", "--prompt", instruction,
                      "--temperature", 0, "--max_new_tokens", 40, "--device", "cpu")
    assert proc.stdout == f"{instruction}\n{answer}\n"
    # and chat does the same, one instruction at a time, until /quit
    proc = subprocess.run([sys.executable, str(HERE / "train_gpt2.py"), "--mode", "chat", "--init_from", str(out / "ckpt.pt"),
                           "--temperature", "0", "--device", "cpu"], input=f"{chat_instruction}\n/quit\n",
                          capture_output=True, text=True, cwd=HERE, check=True)
    answer = chat_answer
    assert f"> {answer}\n> " in proc.stdout


def test_sample_applies_the_template_only_to_finetuned_checkpoints(base_model, tmp_path):
    model, _ = tg.load_model(str(base_model))
    enc = tg.get_tokenizer()
    prompt = "Name a fruit."
    for template in (None, pdata.ALPACA_PROMPT):
        path = tmp_path / f"{template is None}.pt"
        torch.save({"model": model.state_dict(), "config": tg.asdict(model.config), "prompt_template": template}, path)
        tokens = enc.encode(template.format(instruction=prompt) if template else prompt)
        new = model.generate(torch.tensor([tokens]), max_new_tokens=10, temperature=0)[0, len(tokens):].tolist()
        new = new[:new.index(tg.EOT_TOKEN)] if tg.EOT_TOKEN in new else new
        proc = run_script("train_gpt2.py", "--mode", "sample", "--init_from", path, "--prompt", prompt,
                          "--temperature", 0, "--max_new_tokens", 10, "--device", "cpu")
        assert proc.stdout == (f"{prompt}\n" if template else prompt) + enc.decode(new) + "\n"
    assert "not fine-tuned" in main_error("--mode", "chat", "--init_from", tmp_path / "True.pt")


def test_finetune_resume_equals_uninterrupted(sft_data, base_model, tmp_path):
    args = [*FINETUNE, "--init_from", base_model, "--data_dir", sft_data, "--max_steps", 16, "--ckpt_interval", 1000,
            "--batch_size", 2, "--total_batch_size", 4, "--eval_interval", 8, "--block_size", 100]  # 100 < the model's 128
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "straight")
    stopped_at = interrupt_and_resume(args, tmp_path / "cut", signal_at_step=4)
    assert 4 <= stopped_at < 16
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["model"]["transformer.wpe.weight"].shape == (100, 64)
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "straight")


def test_finetune_bad_input(sft_data, shakespeare, base_model, tmp_path):
    def finetune(*args):
        return main_error(*FINETUNE, "--init_from", base_model, "--out_dir", tmp_path / "o", *args)

    assert "--sft" in finetune("--data_dir", shakespeare)  # pretraining shards are not instruction data
    assert "not found" in finetune("--data_dir", tmp_path / "missing")
    assert "fewer than one step" in finetune("--data_dir", sft_data, "--total_batch_size", 70, "--batch_size", 7)


# -----------------------------------------------------------------------------
# Evaluation: HellaSwag, --mode eval, --mode plot


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    """The first 12 items of HellaSwag's validation set, prepared by prepare_data.py."""
    folder = tmp_path_factory.mktemp("hellaswag")
    lines = needs_shared("hellaswag_val.jsonl").read_text().splitlines()[:12]
    (folder / "raw.jsonl").write_text("\n".join(lines) + "\n")
    run_script("prepare_data.py", "--hellaswag", "--files", folder / "raw.jsonl", "--out_dir", folder)
    return folder / "hellaswag_val.jsonl"


def test_hellaswag_scores_match_transformers_and_a_plain_loop(hellaswag_file, tmp_path):
    hf_model = make_hf_gpt2(tmp_path, n_positions=256)
    model = tg.GPT.from_pretrained(str(tmp_path)).eval()
    enc = tg.get_tokenizer()
    items = tg.load_hellaswag(hellaswag_file)
    sums, means = tg.score_endings(model, enc, items, "cpu", max_batch_tokens=1000)  # several batches, padded
    by_hand = []
    with torch.no_grad():
        for i, item in enumerate(items):
            context = enc.encode(item["ctx"])
            for j, ending in enumerate(item["endings"]):  # one forward pass per ending, no padding
                ending_tokens = enc.encode(" " + ending)
                ids = torch.tensor([context + ending_tokens])
                losses = torch.nn.functional.cross_entropy(hf_model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
                theirs = losses[-len(ending_tokens):]
                assert sums[i, j].item() == pytest.approx(theirs.sum().item(), abs=1e-3)
                assert means[i, j].item() == pytest.approx(theirs.mean().item(), abs=1e-4)
                ours = torch.nn.functional.cross_entropy(model(ids)[0][0, :-1], ids[0, 1:], reduction="none")
                by_hand.append(ours[-len(ending_tokens):].mean().item())
    by_hand = torch.tensor(by_hand).view(-1, 4)
    assert means.argmin(1).tolist() == by_hand.argmin(1).tolist()
    result = tg.hellaswag_eval(model, hellaswag_file, "cpu")
    labels = torch.tensor([item["label"] for item in items])
    assert result["hellaswag_acc_norm"] == pytest.approx((by_hand.argmin(1) == labels).double().mean().item())
    assert result["hellaswag_acc"] == pytest.approx((sums.argmin(1) == labels).double().mean().item())


def test_eval_mode_with_two_ranks_equals_one(hellaswag_file, shakespeare, base_model, tmp_path):
    args = ["--mode", "eval", "--init_from", base_model, "--hellaswag_path", hellaswag_file, "--data_dir", shakespeare,
            "--batch_size", 2, "--val_steps", 5, "--device", "cpu"]
    proc = run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "one")
    assert "hellaswag_acc_norm" in proc.stdout and "val_loss" in proc.stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run(torchrun + [str(HERE / "train_gpt2.py"), *map(str, args), "--out_dir", str(tmp_path / "two")],
                   check=True, capture_output=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert one["hellaswag_items"] == two["hellaswag_items"] == 12
    assert one["hellaswag_acc"] == two["hellaswag_acc"] and one["hellaswag_acc_norm"] == two["hellaswag_acc_norm"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)  # the same 5 batches, split over 2 ranks


def test_hellaswag_during_pretraining_and_plot(shakespeare, hellaswag_file, tmp_path):
    run_script("train_gpt2.py", "--mode", "pretrain", "--data_dir", shakespeare, "--out_dir", tmp_path, *TINY,
               "--block_size", 128, "--max_steps", 4, "--eval_interval", 2, "--val_steps", 2,
               "--hellaswag", 1, "--hellaswag_path", hellaswag_file, "--hellaswag_limit", 4)
    evals = [e for e in read_log(tmp_path) if "val_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and all(e["hellaswag_items"] == 4 for e in evals)
    run_script("train_gpt2.py", "--mode", "plot", "--out_dir", tmp_path)
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "log.jsonl not found" in main_error("--mode", "plot", "--out_dir", tmp_path / "nothing")


def test_bench_generate_times_three_methods_at_two_batch_sizes(capsys):
    # Only that it runs and reports: whether the tokens agree with transformers is tested
    # independently above (test_greedy_generation_matches_transformers_left_padded), not
    # taken from the bench's own "same tokens" line.
    tg.main(list(map(str, ["--mode", "bench", "--bench_generate", 1, "--n_layer", 1, "--n_head", 2, "--n_embd", 32,
                           "--block_size", 64, "--max_new_tokens", 8, "--bench_steps", 1, "--device", "cpu"])))
    out = capsys.readouterr().out
    assert "batch 1" in out and "batch 8" in out and out.count("transformers generate") == 2
