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


def run_script(script, *args, cwd=HERE, env=None, check=True):
    """Run one of the project's scripts as a user would; return the finished process."""
    proc = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


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
    _, model, _ = hf_pair
    compiled = torch.compile(model)
    ids = random_ids(2, 32)
    with torch.no_grad():
        eager_logits, eager_loss = model(ids, ids)
        logits, loss = compiled(ids, ids)
    assert torch.allclose(logits, eager_logits, atol=1e-4) and abs(loss.item() - eager_loss.item()) < 1e-4
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
