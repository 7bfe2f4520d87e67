"""Tests for train_gpt2.py and prepare_data.py, on the CPU, offline, in a few minutes.

References are independent wherever one exists: Hugging Face transformers' GPT-2 for
logits and generation, tiktoken for tokens, a plain loop for the KV cache, a
single-process run for DDP, an uninterrupted run for resume.

    pytest -q test_gpt2.py
"""

import argparse
import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

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
# One thread in this process and in every process it starts: runs that are compared bit for
# bit (resume, DDP, accumulation) must sum in the same order, and a busy machine must not
# change that (MKL picks its thread count by the load unless it is pinned). pytest-xdist runs
# the tests on as many processes as there are cores instead.
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# The scripts started here must feel Ctrl-C as a terminal gives it: a suite started in the
# background by a shell inherits SIGINT ignored, and so would every process it starts.
signal.signal(signal.SIGINT, signal.default_int_handler)

import train_gpt2 as tg  # noqa: E402

torch.set_num_threads(1)
# torch's own inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method: not ours to fix
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


# train_gpt2.py refuses --fsdp 1 on torch older than 2.10 (dev/check_torch.sh found FSDP2 wrong on
# gloo before it): those tests run on 2.10 and newer.
needs_fsdp_torch = pytest.mark.skipif(
    tuple(map(int, torch.__version__.split(".")[:2])) < (2, 10), reason="FSDP needs torch 2.10"
)


def needs_shared(name):
    """The path of a file in ../shared/data. Without it the test skips on a developer's machine,
    but fails under CI (CI=true), where shared/ is always beside the clone: a skip there would hide a failure."""
    path = SHARED / "data" / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {path}")
        pytest.skip(f"needs ../shared/data/{name}")
    return path


def run_script(script, *args, env=None, check=True, new_process=False):
    """Run one of the project's scripts as a user would: its main() with these arguments, in
    this process (an interpreter start and the imports cost seconds a call), or as a new
    process where that is what is tested (exit codes, signals, env). Returns what a finished
    process gives: returncode, stdout, stderr. An env of its own means a new process."""
    import traceback

    if new_process or env:
        proc = subprocess.run(
            [sys.executable, str(HERE / script), *map(str, args)],
            cwd=HERE,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=600,
        )
    else:
        main = {"train_gpt2.py": tg.main, "prepare_data.py": pdata.main}[script]
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:  # as the interpreter would: a message goes to stderr, code 1
                code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
            except Exception:
                traceback.print_exc()
                code = 1
        proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
]  # + --nproc_per_node=N, script, args


def assert_one_line_error(proc, *words):
    """Failed with one line that says what is wrong (after any progress output), no traceback;
    returns that line."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


# -----------------------------------------------------------------------------
# A small random GPT-2, saved the way Hugging Face saves real checkpoints


def make_hf_gpt2(path, n_head=4, n_embd=64, n_layer=2, n_positions=64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=50257
    )
    model = GPT2LMHeadModel(config)
    # Random weights of a larger scale than the init (LayerNorms and biases included), so the
    # logits have structure and every weight must be copied into the right place to match.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                name.endswith("ln_1.weight")
                or name.endswith("ln_2.weight")
                or name.endswith("ln_f.weight")
            ):
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
        logits, _ = model(ids)
        logits_p, _ = padded(ids)
        _, loss = model(ids, targets)
        _, loss_p = padded(ids, targets)
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
    assert grad[50257:].abs().max().item() == 0  # the -inf logits: softmax gives exactly 0 there
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
    theirs = hf_model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=tg.EOT_TOKEN,
        eos_token_id=None,
    )
    assert ours.tolist() == theirs.tolist()


def test_rows_stop_at_eos_and_are_padded_like_transformers(hf_pair):
    hf_model, model, _ = hf_pair
    prompts = [random_ids(1, n, seed=10 + n)[0].tolist() for n in (4, 9)]
    ids, mask = tg.left_pad(prompts)
    free = model.generate(ids, mask, max_new_tokens=12, temperature=0, eos_token_id=None)
    # Declare the 3rd generated token of row 0 the end token: row 0 must stop there, row 1 go on.
    eos = free[0, ids.size(1) + 2].item()
    ours = model.generate(ids, mask, max_new_tokens=12, temperature=0, eos_token_id=eos)
    theirs = hf_model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=eos,
        eos_token_id=eos,
    )
    assert ours.tolist() == theirs.tolist()
    assert ours[0, ids.size(1) + 2 :].eq(eos).all()


# -----------------------------------------------------------------------------
# Generation against plain references


def generate_without_cache(model, ids, max_new_tokens):
    """build-nanogpt's loop: recompute the whole (cropped) sequence for every token."""
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.config.block_size :])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("prompt_len, new", [(10, 30), (50, 40), (90, 5)])  # block_size is 64
def test_kv_cache_equals_recomputing(hf_pair, prompt_len, new):
    _, model, _ = hf_pair
    ids = random_ids(2, prompt_len, seed=3)
    expected = generate_without_cache(model, ids, new)
    assert (
        model.generate(ids, max_new_tokens=new, temperature=0, eos_token_id=None).tolist()
        == expected.tolist()
    )


@pytest.mark.parametrize("left_padding", [0, 3])
def test_prompt_fed_in_pieces_through_the_cache_equals_one_pass(hf_pair, left_padding):
    # With past > 0 and T > 1 new tokens, SDPA's is_causal would align its triangle top-left and
    # show the new tokens the wrong keys: the cache must give the bottom-right mask itself.
    _, model, _ = hf_pair
    ids = random_ids(2, 30, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :left_padding] = 0  # row 0 left-padded (when left_padding > 0), row 1 not
    with torch.no_grad():
        one_pass = model.next_logits(ids, tg.KVCache(model.config, 2, 30), mask)
        for pieces in [(12, 18), (5, 1, 7, 17)]:
            cache = tg.KVCache(model.config, 2, 30)
            bounds = np.cumsum((0,) + pieces)
            for a, b in zip(bounds[:-1], bounds[1:]):
                logits = model.next_logits(ids[:, a:b], cache, mask[:, :b])
            assert (logits - one_pass).abs().max().item() < 1e-5
        if not left_padding:  # and the one pass is the plain forward's last position
            assert (one_pass - model(ids)[0][:, -1]).abs().max().item() < 1e-5
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):  # the cache follows the compute dtype:
        cache = tg.KVCache(
            model.config, 2, 30
        )  # bf16 keys are stored as bf16, not cast again every token
        model.next_logits(ids, cache, mask)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16


def test_batch_equals_each_row_alone(hf_pair):
    _, model, _ = hf_pair
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 30, 17, 1)]
    ids, mask = tg.left_pad(prompts)
    batch = model.generate(
        ids, mask, max_new_tokens=50, temperature=0, eos_token_id=None
    )  # slides past 64
    for row, prompt in enumerate(prompts):
        alone = model.generate(
            torch.tensor([prompt]), max_new_tokens=50, temperature=0, eos_token_id=None
        )
        assert batch[row, ids.size(1) :].tolist() == alone[0, len(prompt) :].tolist()


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
    assert sample(5, top_k=50, top_p=0.9, temperature=0.7) == sample(
        5, top_k=50, top_p=0.9, temperature=0.7
    )


def test_sample_next_token_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits.softmax(-1)[0]
    seen_k = {
        tg.sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item()
        for s in range(200)
    }
    assert seen_k == {0, 1}
    # the two likeliest hold 0.64 + 0.24 = 0.88 of the mass: top_p 0.85 keeps exactly them
    assert probs[:2].sum() > 0.85 > probs[0]
    seen_p = {
        tg.sample_next_token(logits, top_p=0.85, generator=torch.Generator().manual_seed(s)).item()
        for s in range(200)
    }
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
    small = tg.GPT(
        tg.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, padded_vocab_size=50304)
    )
    with torch.no_grad():
        _, loss = small(random_ids(4, 64), random_ids(4, 64, seed=1))
    assert abs(loss.item() - math.log(50257)) < 0.05  # a fresh model guesses uniformly
    # residual projections start smaller: 0.02 / sqrt(2 * n_layer)
    assert abs(small.transformer.h[0].attn.c_proj.weight.std().item() - 0.01) < 0.001


def test_tokenizer_round_trip():
    enc = tg.get_tokenizer()
    text = (
        (SHARED / "data" / "tinyshakespeare.txt").read_text()[:5000]
        if SHARED.is_dir()
        else "ROMEO:\nBut soft!"
    )
    text += " naïve café 日本語 🙂 <tag> \t\n  x"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tg.EOT_TOKEN]


def test_compiled_model_trains_and_generates(hf_pair):
    _, _, path = hf_pair
    model = tg.GPT.from_pretrained(str(path), padded_vocab_size=50304)  # the -inf fill compiled too
    compiled = torch.compile(model)
    ids = random_ids(2, 32)
    eager_logits, _ = model(ids)
    _, eager_loss = model(ids, ids)
    eager_loss.backward()
    eager_grad, model.lm_head.weight.grad = model.lm_head.weight.grad, None
    logits, _ = compiled(ids)
    _, loss = compiled(ids, ids)
    # The step drops the logits: returned beside the loss, the compiled backward would fill a zero
    # gradient for them (zero_, fill_, copy_ of (B, T, 50257) in every backward).
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    logits_sized = [e.name for e in prof.events() if [2, 32, 50257] in map(list, e.input_shapes)]
    assert not logits_sized, logits_sized
    assert (
        torch.allclose(logits, eager_logits, atol=1e-4)
        and abs(loss.item() - eager_loss.item()) < 1e-4
    )
    grad = model.lm_head.weight.grad
    assert torch.allclose(grad, eager_grad, atol=1e-5) and grad[50257:].abs().max().item() == 0
    model.eval()
    # generation through the compiled wrapper (what broke build-nanogpt) gives the eager tokens
    out = compiled.generate(ids[:, :5], max_new_tokens=10, temperature=0, eos_token_id=None)
    assert (
        out.tolist()
        == model.generate(ids[:, :5], max_new_tokens=10, temperature=0, eos_token_id=None).tolist()
    )


def test_samples_in_a_run_do_not_compile_the_blocks_again():
    """Under FSDP each block is compiled alone (wrap_blocks): generating through them would compile
    again for every layer and every length, until dynamo's recompile limit. Samples run eagerly."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = tg.GPT(
        tg.GPTConfig(block_size=64, n_layer=10, n_head=2, n_embd=32, padded_vocab_size=50304)
    )
    for block in model.transformer.h:
        block.compile(backend=counter)  # as wrap_blocks does under --fsdp 1 --compile 1
    x = random_ids(2, 17)
    model(x[:, :-1], x[:, 1:])[1].backward()  # training: one graph serves every block
    assert counter.frame_count == 1
    samples = tg.show_samples(model, tg.get_tokenizer(), [464, 3290], 2, torch.float32)
    assert len(samples) == 2 and counter.frame_count == 1


@needs_fsdp_torch
def test_fsdp_compiles_the_blocks_and_the_head_once_each(monkeypatch):
    """--fsdp 1 --compile 1 compiles each block as it shards it (one graph serves them all) and the last
    LayerNorm, LM head and loss as one more graph: 2 graphs, no break, the eager loss and gradients."""
    import copy
    import functools

    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounter()
    monkeypatch.setattr(
        torch, "compile", functools.partial(torch.compile, backend=counter)
    )  # wrap_blocks' compiles
    torch.manual_seed(0)
    eager = tg.GPT(
        tg.GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32, padded_vocab_size=50304)
    )
    sharded = tg.wrap_blocks(
        copy.deepcopy(eager),
        torch.float32,
        argparse.Namespace(fsdp=1, activation_checkpointing=0, compile=1),
    )  # a group of one
    try:
        for seed in (0, 1):  # a second step compiles nothing more
            x = random_ids(2, 33, seed=seed)
            losses = [model(x[:, :-1], x[:, 1:])[1] for model in (eager, sharded)]
            for loss in losses:
                loss.backward()
            assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
        assert counter.frame_count == 2 and not counters["graph_break"], (
            counter.frame_count,
            dict(counters["graph_break"]),
        )
        for (name, a), b in zip(eager.named_parameters(), sharded.parameters()):
            assert torch.allclose(a.grad, b.grad.full_tensor(), atol=1e-6), name
    finally:
        torch.distributed.destroy_process_group()


def test_finetuning_lengths_compile_two_graphs_without_a_break():
    """Fine-tuning batches vary in length: torch.compile makes one graph for the first length and
    one dynamic graph for all the others, with no graph break (is_causal stays a Python bool,
    not a SymBool that scaled_dot_product_attention refuses: 13 graphs for these lengths before)."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = (
        CompileCounter()
    )  # counts the graphs dynamo hands to the backend, and runs them eagerly
    model = tg.GPT(
        tg.GPTConfig(
            block_size=64, vocab_size=128, padded_vocab_size=128, n_layer=2, n_head=2, n_embd=32
        )
    )
    compiled = torch.compile(model, backend=counter)
    for T in (7, 12, 20, 33, 64, 5):
        x = random_ids(2, T + 1, vocab=128)
        y = x[:, 1:].clone()
        y[:, :3] = -100  # a masked prompt, as InstructionLoader gives
        compiled(x[:, :-1], y)[1].backward()
    assert counter.frame_count == 2 and not counters["graph_break"], (
        counter.frame_count,
        dict(counters["graph_break"]),
    )


# -----------------------------------------------------------------------------
# --mode sample, and bad input


def test_sample_mode_streams_the_greedy_continuation(hf_pair):
    _, model, path = hf_pair
    enc = tg.get_tokenizer()
    prompt = "The quick brown fox"
    out = model.generate(torch.tensor([enc.encode(prompt)]), max_new_tokens=12, temperature=0)[
        0
    ].tolist()
    new = out[len(enc.encode(prompt)) :]
    expected = prompt + enc.decode(new[: new.index(tg.EOT_TOKEN)] if tg.EOT_TOKEN in new else new)
    proc = run_script(
        "train_gpt2.py",
        "--mode",
        "sample",
        "--init_from",
        path,
        "--prompt",
        prompt,
        "--max_new_tokens",
        12,
        "--temperature",
        0,
        "--device",
        "cpu",
    )
    assert proc.stdout.rstrip("\n") == expected


def test_sample_mode_batches_prompts_and_samples(hf_pair):
    _, _, path = hf_pair
    args = [
        "--mode",
        "sample",
        "--init_from",
        path,
        "--prompt",
        "One",
        "--prompt",
        "Two words",
        "--num_samples",
        2,
        "--max_new_tokens",
        8,
        "--seed",
        7,
        "--top_k",
        50,
        "--device",
        "cpu",
    ]
    first = run_script("train_gpt2.py", *args).stdout
    assert first.count("--- sample") == 4 and "\nOne" in first and "\nTwo words" in first
    assert run_script("train_gpt2.py", *args).stdout == first  # --seed makes it reproducible


def test_bad_model_name_and_broken_checkpoint(tmp_path, hf_pair):
    assert_one_line_error(
        run_script(
            "train_gpt2.py",
            "--mode",
            "sample",
            "--init_from",
            "gpt5",
            check=False,
            new_process=True,
        ),
        "unknown model",
        "gpt2-xl",
    )
    from safetensors.torch import load_file, save_file

    _, _, path = hf_pair
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(path / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="transformer.h.1.mlp.c_fc.bias"):
        tg.GPT.from_pretrained(str(tmp_path))
    assert_one_line_error(
        run_script("train_gpt2.py", "--init_from", tmp_path, check=False),
        "missing keys",
        "c_fc.bias",
    )
    assert_one_line_error(
        run_script("train_gpt2.py", "--init_from", tmp_path / "nope.pt", check=False), "not found"
    )


def test_empty_prompt_is_a_clear_error(hf_pair):
    _, model, path = hf_pair
    assert_one_line_error(
        run_script("train_gpt2.py", "--init_from", path, "--prompt", "", check=False),
        "prompt is empty",
    )
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
    run_script(
        "prepare_data.py",
        "--files",
        *files,
        "--out_dir",
        out,
        "--shard_size",
        500,
        "--val_tokens",
        700,
        "--num_proc",
        2,
    )
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
    assert (
        "already prepared"
        in run_script("prepare_data.py", *args, "--out_dir", tmp_path / "a").stdout
    )
    assert shard.stat().st_mtime_ns == before
    run_script("prepare_data.py", *args, "--out_dir", tmp_path / "a", "--overwrite")
    assert shard.read_bytes() == (tmp_path / "b" / "train_000000.npy").read_bytes()


def test_output_folders_that_are_links_stay_links(tmp_path):
    """A link to a bigger disk is how FineWeb gets placed: the data (and an export) go where the
    link points, and the link stays a link; nothing is built beside the link on the small disk."""
    files = write_corpus(tmp_path / "corpus")
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "data").symlink_to(
        tmp_path / "big" / "ds"
    )  # not there yet: prepare_data.py makes it
    (tmp_path / "big" / "hf").mkdir()  # an empty folder to export into
    (tmp_path / "small" / "hf").symlink_to(tmp_path / "big" / "hf")
    run_script(
        "prepare_data.py",
        "--files",
        *files,
        "--out_dir",
        tmp_path / "small" / "data",
        "--val_tokens",
        100,
    )
    run_script(
        "prepare_data.py",
        "--files",
        *files,
        "--out_dir",
        tmp_path / "small" / "data",
        "--val_tokens",
        100,
        "--overwrite",
    )  # a dataset replaced through the link
    model = tmp_path / "model.pt"
    ours = tg.GPT(tg.GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8))
    torch.save({"model": ours.state_dict(), "config": tg.asdict(ours.config)}, model)
    run_script(
        "train_gpt2.py",
        "--mode",
        "export",
        "--init_from",
        model,
        "--out_dir",
        tmp_path / "small" / "hf",
    )
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["data", "hf"]
    assert all((tmp_path / "small" / name).is_symlink() for name in ("data", "hf"))
    assert (tmp_path / "big" / "ds" / "meta.json").exists() and (
        tmp_path / "big" / "hf" / "model.safetensors"
    ).exists()
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["ds", "hf"]


def test_parquet_json_and_a_named_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS[:20], "n": list(range(20))}), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in DOCS[20:]]))
    out = tmp_path / "out"
    run_script(
        "prepare_data.py",
        "--files",
        tmp_path / "a.parquet",
        tmp_path / "b.json",
        "--text_column",
        "body",
        "--out_dir",
        out,
        "--val_tokens",
        100,
    )
    _, val = read_split(out, "val")
    _, train = read_split(out, "train")
    assert (
        tg.get_tokenizer().decode(np.concatenate(val + train).tolist()).split("<|endoftext|>")[1:]
        == DOCS
    )


def test_small_corpus_gets_a_val_split(tmp_path):
    out = tmp_path / "shakespeare"
    run_script("prepare_data.py", "--files", needs_shared("tinyshakespeare.txt"), "--out_dir", out)
    meta = json.loads((out / "meta.json").read_text())
    total = meta["splits"]["val"]["tokens"] + meta["splits"]["train"]["tokens"]
    assert total == 338_025 + 1  # the data README's count, plus the leading <|endoftext|>
    assert meta["splits"]["val"]["tokens"] == total // 10


def test_workers_started_by_spawning(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    code = (
        "import multiprocessing as mp, sys; mp.set_start_method('spawn'); import prepare_data; "
        "prepare_data.main(sys.argv[1:])"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--files",
            *map(str, files),
            "--out_dir",
            str(tmp_path / "out"),
            "--val_tokens",
            "50",
            "--num_proc",
            "2",
        ],
        cwd=HERE,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "out" / "meta.json").exists()


def test_interrupted_run_resumes_after_the_last_shard(tmp_path, monkeypatch, capsys):
    files = write_corpus(tmp_path / "corpus")
    args = [
        "--files",
        *map(str, files),
        "--shard_size",
        "300",
        "--val_tokens",
        "300",
        "--num_proc",
        "1",
    ]
    monkeypatch.setattr(
        pdata, "BATCH_CHARS", 500
    )  # many batches, so that there is something to skip
    pdata.main(args + ["--out_dir", str(tmp_path / "clean")])
    real_save, saved = pdata.save_npy, []

    def save_then_die(path, array):
        if len(saved) == 3:  # Ctrl-C while writing the 4th shard: half a temp file, no rename
            with open(f"{path}.tmp", "wb") as f:
                f.write(b"\x93NUMPY half")
            raise KeyboardInterrupt
        saved.append(path)
        return real_save(path, array)

    monkeypatch.setattr(pdata, "save_npy", save_then_die)
    with pytest.raises(SystemExit, match="interrupted.*same command resumes"):
        pdata.main(args + ["--out_dir", str(tmp_path / "cut")])
    cut, partial = tmp_path / "cut", tmp_path / "cut.partial"
    assert not cut.exists()  # nothing under the final name until it is whole
    for name in map(os.path.basename, saved):  # every shard under its final name is whole
        assert (np.load(partial / name) == np.load(tmp_path / "clean" / name)).all()
    monkeypatch.setattr(pdata, "save_npy", real_save)
    capsys.readouterr()
    pdata.main(args + ["--out_dir", str(cut)])  # the re-run
    out = capsys.readouterr().out
    assert (
        "resuming" in out and tokenized(out) < total_tokens(cut) - 3 * 300 + 500
    )  # at most one batch again
    assert_same_folder(cut, tmp_path / "clean")
    assert not partial.exists()


def tokenized(stdout):
    """How many tokens a run tokenized, from its last line."""
    return int(stdout.split("this run tokenized ")[1].split(" tokens")[0].replace(",", ""))


def total_tokens(folder):
    meta = json.loads((folder / "meta.json").read_text())
    return sum(s["tokens"] for s in meta["splits"].values())


def assert_same_folder(a, b):
    """Byte-identical: the same files with the same bytes."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def snapshot(folder):
    """sha256 of every file under folder, by relative path (folders too, so that a new empty one shows)."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


# Where a run of prepare_data.py is killed: code that makes the child call here() at that place, which
# ends the process as kill -9 would (os._exit: no cleanup, no finally) the n-th time it is reached.
PLACES = {
    "batch": "add = p.ShardWriter.add\np.ShardWriter.add = lambda *a: (add(*a), here())",  # mid-shard, tokens in memory
    "shard_tmp": "replace = os.replace\nos.replace = lambda a, b: (a.endswith('.npy.tmp') and here(), replace(a, b))",
    "shard_saved": "save = p.save_npy\np.save_npy = lambda *a: (save(*a), here())[0]",  # renamed, state.json not updated
    "meta": "save = p.save_json\np.save_json = lambda path, obj: (path.endswith('meta.json') and here(), save(path, obj))",
    "publish": "publish = p.publish\np.publish = lambda *a: (here(), publish(*a))",
    "rename": "rename = os.rename\nos.rename = lambda a, b: (rename(a, b), b.endswith('.old') and here())",  # the old one moved
    "pause": "add = p.ShardWriter.add\np.ShardWriter.add = lambda *a: (add(*a), here(pause=True))",  # a Ctrl-C's moment
}


def run_killed(place, *args):
    """prepare_data.py in a new process, with batches of ~100 tokens (a resumed run re-reads little),
    killed at a place (PLACES, 'name:n' for the n-th time); returns the finished process."""
    name, _, n = place.partition(":")
    child = (
        f"import os, signal, sys\nimport prepare_data as p\np.BATCH_CHARS = 400\ncalls = [0]\n"
        f"def here(pause=False):\n    calls[0] += 1\n    if calls[0] == {int(n or 1)}:\n"
        f"        print('paused', flush=True) if pause else os._exit(137)\n        signal.pause()\n"
        f"{PLACES[name]}\np.main(sys.argv[1:])\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", child, *map(str, args)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def many_documents(path, n=150, first=0):
    """A .jsonl file of n short documents, so that a resume has whole batches to skip."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(first, first + n):
            f.write(json.dumps({"text": f"Document {i}: " + DOCS[i % len(DOCS)][:200]}) + "\n")
    return path


@pytest.mark.parametrize(
    "point",
    [
        "batch:4",  # mid-shard, tokens in memory
        "shard_tmp:3",  # a shard's temp file written, not renamed
        "shard_saved:3",  # renamed, state.json not yet updated
        "meta",  # every shard written, just before meta.json
    ],
)
def test_kill_9_then_rerun_equals_uninterrupted(tmp_path, point):
    files = [many_documents(tmp_path / "docs.jsonl"), *write_corpus(tmp_path / "corpus")]
    args = ["--files", *files, "--shard_size", 500, "--val_tokens", 500, "--num_proc", 1]
    run_script(
        "prepare_data.py", *args, "--out_dir", tmp_path / "clean"
    )  # default batches: the batch size changes no shard
    out = tmp_path / "out"
    assert (
        run_killed(point, *args, "--out_dir", out).wait() == 137 and not out.exists()
    )  # a real death, workers and all
    again = run_script("prepare_data.py", *args, "--out_dir", out).stdout
    assert_same_folder(out, tmp_path / "clean")
    if point != "batch:4":  # finished shards are not tokenized again
        assert tokenized(again) < total_tokens(out) - 2 * 500 + 200
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("point, damage", [("meta", "delete"), ("shard_saved:3", "truncate")])
def test_resume_redoes_shards_damaged_since_the_interruption(tmp_path, point, damage):
    files = [many_documents(tmp_path / "docs.jsonl"), *write_corpus(tmp_path / "corpus")]
    args = ["--files", *files, "--shard_size", 500, "--val_tokens", 500, "--num_proc", 1]
    run_script("prepare_data.py", *args, "--out_dir", tmp_path / "clean")
    out = tmp_path / "out"
    assert run_killed(point, *args, "--out_dir", out).wait() == 137
    shard = tmp_path / "out.partial" / "train_000000.npy"  # listed in state.json at both points
    shard.unlink() if damage == "delete" else shard.write_bytes(shard.read_bytes()[:-100])
    assert "starting over" in run_script("prepare_data.py", *args, "--out_dir", out).stdout
    assert_same_folder(out, tmp_path / "clean")
    run_script("prepare_data.py", "--verify", out)


@pytest.mark.parametrize(
    "point, num_proc", [("batch:3", 2), ("shard_saved:2", 1), ("publish", 1), ("rename", 1)]
)
def test_kill_9_during_overwrite_keeps_the_old_dataset_or_the_whole_new_one(
    tmp_path, point, num_proc
):
    files = write_corpus(tmp_path / "corpus")
    new = [
        "--files",
        many_documents(tmp_path / "other.jsonl"),
        "--shard_size",
        500,
        "--val_tokens",
        500,
        "--num_proc",
        num_proc,
    ]
    out = tmp_path / "out"
    run_script(
        "prepare_data.py", "--files", *files, "--out_dir", out, "--shard_size", 400, "--num_proc", 1
    )
    old = snapshot(out)
    run_script("prepare_data.py", *new, "--out_dir", tmp_path / "clean")
    assert run_killed(point, *new, "--out_dir", out, "--overwrite").wait() == 137
    if (
        point == "rename"
    ):  # between the two renames: the old dataset waits, whole, beside; the next run puts it back
        assert not out.exists() and snapshot(tmp_path / "out.old") == old
    else:
        assert snapshot(out) == old
    run_script("prepare_data.py", *new, "--out_dir", out, "--overwrite")
    assert_same_folder(out, tmp_path / "clean")
    assert not (tmp_path / "out.partial").exists()


def test_kill_9_and_resume_of_a_streamed_dataset(tmp_path, capsys, monkeypatch):
    """The hub code path (datasets' streaming IterableDataset), on a local folder of jsonl files."""
    folder = tmp_path / "hub"
    folder.mkdir()
    for k in range(3):
        many_documents(folder / f"part{k}.jsonl", n=50, first=50 * k)
    args = ["--dataset", folder, "--shard_size", 300, "--val_tokens", 300, "--num_proc", 1]
    out = tmp_path / "out"
    assert run_killed("shard_saved:6", *args, "--out_dir", out).wait() == 137 and not out.exists()
    state = json.loads((tmp_path / "out.partial" / "state.json").read_text())
    assert state["resume"]["position"][
        "stream"
    ]  # datasets' own state_dict, not a count of rows to re-read
    monkeypatch.setattr(pdata, "BATCH_CHARS", 400)  # as in the killed process
    pdata.main([*map(str, args), "--out_dir", str(out)])
    again = capsys.readouterr().out
    pdata.main([*map(str, args), "--out_dir", str(tmp_path / "clean")])
    assert_same_folder(out, tmp_path / "clean")
    assert tokenized(again) < total_tokens(out) - 5 * 300 + 200
    assert pdata.parse_args(["--dataset", str(folder)]).out_dir == os.path.join("data", "hub")


def test_ctrl_c_with_two_processes_is_one_line_and_resumable(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    args = [
        "--files",
        *map(str, files),
        "--out_dir",
        str(tmp_path / "out"),
        "--shard_size",
        "300",
        "--val_tokens",
        "300",
        "--num_proc",
        "2",
    ]
    proc = run_killed("pause:3", *args)
    assert proc.stdout.readline().startswith("paused")  # the workers are up and busy
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole process group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith("error: interrupted"), stderr
    assert "same command resumes" in lines[-1]
    run_script("prepare_data.py", *args, new_process=True)
    assert (tmp_path / "out" / "meta.json").exists()


def test_a_closed_stdout_costs_no_file(tmp_path):
    """`prepare_data.py ... | head -n 1`: the reader gone, the data is still written whole, and the
    run ends without a BrokenPipeError. Unbuffered, so that a line written mid-run meets the
    closed pipe (the small corpus's note comes before meta.json)."""
    files = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["--files", *files, "--out_dir", out, "--num_proc", 1]
    proc = subprocess.Popen(
        [sys.executable, HERE / "prepare_data.py", *map(str, args)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "Error" not in stderr, stderr
    assert "ok:" in run_script("prepare_data.py", "--verify", out).stdout


def test_verify_names_the_bad_shard(tmp_path, capsys):
    files = write_corpus(tmp_path / "corpus")
    for name, extra in (("a", []), ("b", ["--encoding_errors", "replace"])):
        pdata.main(
            [
                "--files",
                *map(str, files[: 2 if name == "a" else 3]),
                "--out_dir",
                str(tmp_path / name),
                "--shard_size",
                "300",
                "--val_tokens",
                "300",
                "--num_proc",
                "1",
                *extra,
            ]
        )
    a = tmp_path / "a"
    capsys.readouterr()
    pdata.main(["--verify", str(a)])
    assert capsys.readouterr().out.startswith("ok:")

    def verify_error():
        with pytest.raises(SystemExit) as e:
            pdata.main(["--verify", str(a)])
        return str(e.value.code)

    shard = a / "train_000001.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-3] + bytes([good[-3] ^ 1]) + good[-2:])  # one bit of one token
    assert verify_error().startswith(f"error: {shard} differs") and "--overwrite" in verify_error()
    shard.write_bytes(good[:-10])
    assert "train_000001.npy is truncated" in verify_error()
    shard.write_bytes(
        (tmp_path / "b" / "train_000000.npy").read_bytes()
    )  # another folder's shard, same length
    assert f"{shard} differs" in verify_error()
    shard.write_bytes(good)
    (a / "val_000000.npy").unlink()
    assert "val_000000.npy is missing" in verify_error()


def test_sft_and_hellaswag_defaults_and_verify(tmp_path, monkeypatch, capsys):
    assert pdata.parse_args(
        ["--sft", "--files", "alpaca_data_sample.json"]
    ).out_dir == os.path.join("data", "alpaca")
    assert pdata.parse_args(["--hellaswag", "--files", "hs.jsonl"]).out_dir == os.path.join(
        "data", "hellaswag"
    )
    assert pdata.parse_args(["--files", "x/input.txt"]).out_dir == os.path.join("data", "input")
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca_records(20)))
    monkeypatch.chdir(tmp_path)  # the defaults are relative to where the user runs it
    pdata.main(["--sft", "--files", "alpaca.json"])
    pdata.main(["--verify", "data/alpaca"])
    assert "ok:" in capsys.readouterr().out
    (tmp_path / "data" / "alpaca" / "val_mask.npy").write_bytes(b"changed")
    with pytest.raises(SystemExit, match="val_mask.npy differs"):
        pdata.main(["--verify", "data/alpaca"])


def test_bom_and_replaced_bad_bytes_are_accepted(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "World"}\n')
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9".encode("latin-1"))
    pdata.main(
        [
            "--files",
            *(str(tmp_path / n) for n in ("bom.txt", "bom.jsonl", "latin1.txt")),
            "--out_dir",
            str(tmp_path / "out"),
            "--val_tokens",
            "1",
            "--encoding_errors",
            "replace",
            "--num_proc",
            "1",
        ]
    )
    _, val = read_split(tmp_path / "out", "val")
    _, train = read_split(tmp_path / "out", "train")
    assert tg.get_tokenizer().decode(np.concatenate(val + train).tolist()).split("<|endoftext|>")[
        1:
    ] == ["Hello", "World", "Caf\ufffd"]


def hold_the_lock(tmp):
    import fcntl

    (tmp / "out.partial").mkdir()
    fd = os.open(tmp / "out.partial", os.O_RDONLY)
    fcntl.flock(
        fd, fcntl.LOCK_EX
    )  # as a running preparation holds it (released when the test ends)
    return fd


def half_made_by_another_command(tmp):
    real = pdata.save_npy

    def save_then_stop(path, array):  # Ctrl-C once the first shard is saved
        real(path, array)
        raise KeyboardInterrupt

    pdata.save_npy = save_then_stop
    try:
        with pytest.raises(SystemExit):
            pdata.main(
                [
                    "--files",
                    str(tmp / "in" / "ok.jsonl"),
                    "--out_dir",
                    str(tmp / "out"),
                    "--shard_size",
                    "5",
                    "--val_tokens",
                    "5",
                    "--num_proc",
                    "1",
                ]
            )
    finally:
        pdata.save_npy = real
    assert (tmp / "out.partial" / "state.json").exists()


def prepared(tmp):
    pdata.main(
        [
            "--files",
            str(tmp / "in" / "ok.jsonl"),
            "--out_dir",
            str(tmp / "out"),
            "--val_tokens",
            "5",
            "--num_proc",
            "1",
        ]
    )


def failing_writes(code):
    """Every shard's write refused with errno code, as the disk would refuse it."""

    def setup(tmp):
        def refused(path, array):
            raise OSError(code, os.strerror(code), f"{path}.tmp")

        pdata.save_npy = refused

    return setup


GOOD = {"ok.jsonl": "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:5])}
HS_ITEM = {
    "ctx": "A man",
    "activity_label": "Walking",
    "ctx_a": "A man",
    "ctx_b": "",
    "endings": ["a", "b", "c", "d"],
    "label": 1,
}
BAD_INPUTS = [  # (name, files in in/, arguments after --files, setup, words the one line must hold)
    ("missing file", {}, ["in/missing.txt"], None, ["file not found", "missing.txt"]),
    ("a folder as a file", {}, ["in"], None, ["cannot read", "folder"]),
    (
        "latin-1 text",
        {"a.txt": "ok\nCaf\xe9".encode("latin-1")},
        ["in/a.txt"],
        None,
        ["a.txt, line 2", "not UTF-8", "--encoding_errors replace"],
    ),
    (
        "latin-1 jsonl",
        {"a.jsonl": b'{"text": "ok"}\n\n{"text": "Caf\xe9"}\n'},
        ["in/a.jsonl"],
        None,
        ["a.jsonl, line 3", "not UTF-8"],
    ),
    (
        "malformed jsonl",
        {"a.jsonl": '{"text": "ok"}\n{"text": "no end\n'},
        ["in/a.jsonl"],
        None,
        ["a.jsonl, line 2", "not valid JSON"],
    ),
    (
        "null text",
        {"a.jsonl": '{"text": null}\n'},
        ["in/a.jsonl"],
        None,
        ["line 1", "'text' is null"],
    ),
    (
        "number text",
        {"a.jsonl": '{"text": "ok"}\n{"text": 42}\n'},
        ["in/a.jsonl"],
        None,
        ["line 2", "'text' is 42"],
    ),
    (
        "jsonl line not an object",
        {"a.jsonl": '["text"]\n'},
        ["in/a.jsonl"],
        None,
        ["line 1", "not an object"],
    ),
    (
        "json not a list",
        {"a.json": '{"text": "hi"}'},
        ["in/a.json"],
        None,
        ["a.json", "JSON list", ".jsonl"],
    ),
    (
        "broken json",
        {"a.json": '[{"text": "hi"},\n'},
        ["in/a.json"],
        None,
        ["a.json, line 2", "not valid JSON"],
    ),
    (
        "fake parquet",
        {"a.parquet": "not parquet at all"},
        ["in/a.parquet"],
        None,
        ["a.parquet", "not a readable parquet"],
    ),
    (
        "no text column",
        {"a.jsonl": '{"content": "hi", "url": "x"}\n'},
        ["in/a.jsonl"],
        None,
        ["no column 'text'", "content, url"],
    ),
    ("empty corpus", {"a.jsonl": ""}, ["in/a.jsonl"], None, ["empty"]),
    (
        "all tokens in val",
        {"a.txt": "just a few words"},
        ["in/a.txt", "--val_tokens", "1000"],
        None,
        ["--val_tokens"],
    ),
    (
        "hellaswag 3 endings",
        {"hs.jsonl": json.dumps({**HS_ITEM, "endings": ["a", "b", "c"]}) + "\n"},
        ["in/hs.jsonl", "--hellaswag"],
        None,
        ["hs.jsonl, line 1", "exactly 4 endings"],
    ),
    (
        "hellaswag label 7",
        {"hs.jsonl": json.dumps(HS_ITEM) + "\n" + json.dumps({**HS_ITEM, "label": 7}) + "\n"},
        ["in/hs.jsonl", "--hellaswag"],
        None,
        ["hs.jsonl, line 2", "label 7", "0..3"],
    ),
    (
        # train_gpt2.py scores both conventions: a row without the harness's texts is refused here.
        "hellaswag without activity_label",
        {"hs.jsonl": json.dumps({**HS_ITEM, "activity_label": None}) + "\n"},
        ["in/hs.jsonl", "--hellaswag"],
        None,
        ["hs.jsonl, line 1", "must be text"],
    ),
    ("hellaswag no items", {"hs.jsonl": "\n"}, ["in/hs.jsonl", "--hellaswag"], None, ["empty"]),
    (
        "alpaca without output",
        {"al.json": json.dumps([{"instruction": "hi"}])},
        ["in/al.json", "--sft"],
        None,
        ["al.json, row 1", "no column 'output'"],
    ),
    ("out_dir is a file", {"out": "my notes"}, ["in/ok.jsonl"], None, ["out is a file"]),
    (
        "out_dir a link that loops",
        {},
        ["in/ok.jsonl"],
        lambda tmp: (tmp / "out").symlink_to("out"),
        ["out: Too many levels of symbolic links", "--out_dir"],
    ),
    ("out_dir name too long", {}, ["in/ok.jsonl", "--out_dir", "x" * 300], None, ["too long"]),
    (
        "out_dir name too long for its .partial",
        {},
        ["in/ok.jsonl", "--out_dir", "x" * 250],
        None,
        [".partial: File name too long"],
    ),
    (
        "out_dir is someone's folder",
        {"out/notes.txt": "mine"},
        ["in/ok.jsonl"],
        None,
        ["not a prepared dataset"],
    ),
    (
        "foreign file in a dataset",
        {},
        ["in/ok.jsonl", "--overwrite"],
        lambda tmp: (prepared(tmp), (tmp / "out" / "notes.txt").write_text("mine")),
        ["notes.txt", "not part of its dataset"],
    ),
    (
        "bad input over a dataset",
        {"bad.jsonl": "{oops\n"},
        ["in/bad.jsonl", "--overwrite"],
        prepared,
        ["bad.jsonl, line 1", "not valid JSON"],
    ),
    (
        "second preparation at once",
        {},
        ["in/ok.jsonl"],
        hold_the_lock,
        ["another prepare_data.py is writing"],
    ),
    (
        "half-made by another command",
        {},
        ["in/ok.jsonl", "--shard_size", "7", "--val_tokens", "5"],
        half_made_by_another_command,
        ["another command", "shard_size", "delete"],
    ),
    (
        "disk full",
        {},
        ["in/ok.jsonl"],
        failing_writes(errno.ENOSPC),
        ["cannot write", "No space left", ".tmp"],
    ),
    (
        "quota exceeded",
        {},
        ["in/ok.jsonl"],
        failing_writes(errno.EDQUOT),
        ["cannot write", "quota", "free some space, or choose another --out_dir"],
    ),
    (
        "file too large",
        {},
        ["in/ok.jsonl"],
        failing_writes(errno.EFBIG),
        ["cannot write", "File too large (", "ulimit -f", "a smaller --shard_size"],
    ),
    (
        "read-only file system",
        {},
        ["in/ok.jsonl"],
        failing_writes(errno.EROFS),
        ["cannot write", "Read-only file system; choose another --out_dir"],
    ),
    (
        "output not ours to write",
        {},
        ["in/ok.jsonl"],
        failing_writes(errno.EACCES),
        ["cannot write", "Permission denied; check its permissions, or choose another --out_dir"],
    ),
    (
        "shard_size 0",
        {},
        ["in/ok.jsonl", "--shard_size", "0"],
        None,
        ["--shard_size", "at least 1"],
    ),
    (
        "shard_size beyond memory",
        {},
        ["in/ok.jsonl", "--shard_size", str(10**16)],
        None,
        ["--shard_size", "smaller"],
    ),
    (
        "shard_size beyond any memory",
        {},
        ["in/ok.jsonl", "--shard_size", str(10**23)],
        None,
        ["--shard_size", "smaller"],
    ),
    (
        "documents all blank",
        {"a.jsonl": '{"text": ""}\n{"text": " \\n "}\n'},
        ["in/a.jsonl"],
        None,
        ["a.jsonl", "blank documents only"],
    ),
    ("an empty text file", {"a.txt": ""}, ["in/a.txt"], None, ["a.txt", "is empty"]),
    (
        "one Alpaca record",
        {"al.json": json.dumps([{"instruction": "hi", "output": "yo"}])},
        ["in/al.json", "--sft"],
        None,
        ["1 example", "2 at least"],
    ),
    (
        "a file named out.partial",
        {"out.partial": "mine"},
        ["in/ok.jsonl"],
        None,
        ["out.partial", "in the way"],
    ),
    (
        "verify a meta.json without splits",
        {"out/meta.json": '{"kind": "pretrain"}'},
        ["in/ok.jsonl", "--verify", "out"],
        None,
        ["lacks what --verify checks"],
    ),
    ("num_proc -1", {}, ["in/ok.jsonl", "--num_proc", "-1"], None, ["--num_proc", "at least 1"]),
    (
        "val_fraction 1.5",
        {},
        ["in/ok.jsonl", "--sft", "--val_fraction", "1.5"],
        None,
        ["--val_fraction", "between 0 and 1"],
    ),
]


@pytest.mark.parametrize(
    "name, files, args, setup, words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS]
)
def test_prepare_data_bad_input(tmp_path, monkeypatch, name, files, args, setup, words):
    """One line that names the problem, exit non-zero, and every file as it was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        pdata, "save_npy", pdata.save_npy
    )  # undone after the test, if setup replaces it
    for path, content in {**GOOD, **files}.items():
        (tmp_path / "in" / path if not path.startswith("out") else tmp_path / path).parent.mkdir(
            exist_ok=True
        )
        target = tmp_path / "in" / path if not path.startswith("out") else tmp_path / path
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    lock = setup(tmp_path) if setup else None
    before = snapshot(tmp_path)
    assert_one_line_error(
        run_script(
            "prepare_data.py",
            "--files",
            *args[:1],
            "--out_dir",
            "out",
            "--num_proc",
            1,
            *args[1:],
            check=False,
        ),
        *words,
    )
    assert snapshot(tmp_path) == before
    if isinstance(lock, int):
        os.close(lock)


def test_an_unreadable_input_is_a_read_error(tmp_path, monkeypatch):
    """A file the user may not read is named as such, with its fix; nothing is written."""
    path = tmp_path / "a.jsonl"
    path.write_text(GOOD["ok.jsonl"])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: os.access answers as it would a user
        monkeypatch.setattr(os, "access", lambda name, mode: os.fspath(name) != str(path))
    proc = run_script("prepare_data.py", "--files", path, "--out_dir", tmp_path / "o", check=False)
    line = assert_one_line_error(proc)
    assert line == f"error: cannot read {path}: Permission denied; check its permissions"
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_tokens_that_do_not_fit_uint16(monkeypatch):
    class HugeTokenizer:  # a tokenizer whose ids do not fit in uint16
        eot_token = 50256

        def encode_ordinary(self, text):
            return [70_000]

    import tiktoken

    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: HugeTokenizer())
    with pytest.raises(
        OverflowError
    ):  # never wrapped silently into another token (GPT-2's ids all fit)
        pdata.tokenize_documents(["anything"])


def test_tiktoken_without_its_files_is_train_gpt2s_line(tmp_path, monkeypatch):
    """Offline with nothing cached, both scripts say the same: which files, and where from."""
    import tiktoken

    def offline(name):  # as tiktoken fails deep inside requests
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(tg.UserError) as trained:
        tg.get_tokenizer()
    files = write_corpus(tmp_path / "corpus")
    prepare = run_script(
        "prepare_data.py", "--files", *files, "--out_dir", tmp_path / "out", check=False
    )
    assert assert_one_line_error(prepare, "vocab.bpe") == f"error: {trained.value}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_hub_check_goes_where_the_library_goes(monkeypatch):
    """The Hub check connects to HF_ENDPOINT's host at the port it names, else its scheme's; behind
    a proxy it connects nowhere (only a download can tell), unless NO_PROXY names the host."""
    import socket

    import huggingface_hub.constants as hub

    monkeypatch.setattr("urllib.request.getproxies", dict)  # no proxy
    with socket.socket() as mirror:  # a local mirror on a port of its own answers
        mirror.bind(("127.0.0.1", 0))
        mirror.listen()
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{mirror.getsockname()[1]}")
        pdata.check_hub("some/dataset")
    with pytest.raises(pdata.UserError, match="127.0.0.1, which cannot be reached"):
        pdata.check_hub("some/dataset")  # the same port, closed
    tried = []

    class Answered:  # a connection that answered
        def close(self):
            pass

    def connect(address, timeout):
        tried.append(address)
        return Answered()

    monkeypatch.setattr(socket, "create_connection", connect)
    for endpoint in ("http://127.0.0.1:8080", "http://hf-mirror.test", "https://hf-mirror.test"):
        monkeypatch.setattr(hub, "ENDPOINT", endpoint)
        pdata.check_hub("some/dataset")
    assert tried == [("127.0.0.1", 8080), ("hf-mirror.test", 80), ("hf-mirror.test", 443)]
    monkeypatch.setattr("urllib.request.getproxies", lambda: {"http": "http://proxy.test:3128"})
    monkeypatch.setattr(hub, "ENDPOINT", "http://hf-mirror.test")
    monkeypatch.setenv("no_proxy", "elsewhere.test")
    pdata.check_hub("some/dataset")  # through the proxy: not tried
    monkeypatch.setenv("no_proxy", "hf-mirror.test")
    pdata.check_hub("some/dataset")  # reached directly: tried
    assert tried[3:] == [("hf-mirror.test", 80)]


def test_save_npy_writes_what_np_save_writes(tmp_path):
    import hashlib

    array = np.arange(1000, dtype=np.uint16)[::2]  # not contiguous
    digest = pdata.save_npy(tmp_path / "a.npy", array)
    expected = io.BytesIO()
    np.save(expected, array)
    assert (tmp_path / "a.npy").read_bytes() == expected.getvalue()
    assert digest == hashlib.sha256(expected.getvalue()).hexdigest()


def alpaca_records(n=30):
    if (SHARED / "data" / "alpaca_data_sample.json").exists():
        return json.loads((SHARED / "data" / "alpaca_data_sample.json").read_text())[:n]
    return [
        {"instruction": f"Say {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i} it is."}
        for i in range(n)
    ]


def test_sft_masks_exactly_the_answers(tmp_path):
    records = alpaca_records(30) + [
        {"instruction": "Too long", "input": "", "output": "word " * 2000}
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    out = tmp_path / "alpaca"
    run_script(
        "prepare_data.py",
        "--sft",
        "--files",
        tmp_path / "alpaca.json",
        "--out_dir",
        out,
        "--val_fraction",
        0.2,
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dropped_too_long"] == 1
    assert meta["splits"]["val"]["examples"] == 6 and meta["splits"]["train"]["examples"] == 24
    enc = tg.get_tokenizer()
    seen = []
    for split in ("train", "val"):
        tokens, mask, offsets = (
            np.load(out / f"{split}_{name}.npy") for name in ("tokens", "mask", "offsets")
        )
        assert len(tokens) == len(mask) == offsets[-1] == meta["splits"][split]["tokens"]
        for i in range(len(offsets) - 1):
            t, m = (
                tokens[offsets[i] : offsets[i + 1]],
                mask[offsets[i] : offsets[i + 1]].astype(bool),
            )
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
    run_script(
        "prepare_data.py",
        "--hellaswag",
        "--files",
        tmp_path / "hs.jsonl",
        "--out_dir",
        tmp_path / "hs",
    )
    items = [
        json.loads(line)
        for line in (tmp_path / "hs" / "hellaswag_val.jsonl").read_text().splitlines()
    ]
    originals = [json.loads(line) for line in lines]
    assert [(i["ctx"], i["endings"], i["label"]) for i in items] == [
        (o["ctx"], o["endings"], o["label"]) for o in originals
    ]
    keys = ("activity_label", "ctx_a", "ctx_b")  # what lm-evaluation-harness's query is made of
    assert [[i[k] for k in keys] for i in items] == [[o[k] for k in keys] for o in originals]


# -----------------------------------------------------------------------------
# Pretraining

TINY = [
    "--n_layer",
    2,
    "--n_head",
    2,
    "--n_embd",
    32,
    "--block_size",
    32,
    "--batch_size",
    2,
    "--total_batch_size",
    256,
    "--warmup_steps",
    2,
    "--max_lr",
    3e-3,
    "--eval_samples",
    0,
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """tinyshakespeare prepared by prepare_data.py (or a stand-in text if shared/ is absent)."""
    folder = tmp_path_factory.mktemp("shakespeare")
    source = SHARED / "data" / "tinyshakespeare.txt"
    if not source.exists():
        source = folder / "text.txt"
        source.write_text(" ".join(DOCS) * 200)
    run_script(
        "prepare_data.py", "--files", source, "--out_dir", folder / "data", "--shard_size", 100_000
    )
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
    proc = run_script(
        "train_gpt2.py",
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        "--out_dir",
        out,
        *TINY,
        "--n_embd",
        64,
        "--batch_size",
        8,
        "--max_lr",
        1e-2,
        "--max_steps",
        40,
        "--eval_interval",
        20,
        "--val_steps",
        4,
        "--eval_samples",
        1,
    )
    losses = [loss for _, loss in train_losses(out)]
    assert losses[0] == pytest.approx(math.log(50257), abs=0.1)
    assert sum(losses[-5:]) / 5 < 7.2  # far below ln(50257) = 10.8 after 40 steps of 256 tokens
    val = [e["val_loss"] for e in read_log(out) if "val_loss" in e]
    assert len(val) == 2 and val[0] > val[1] and val[1] < 7.6
    assert (
        "--- sample 1\nFirst Citizen:\nBefore we proceed" in proc.stdout and "ETA" in proc.stdout
    )  # the val split's start
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 40 and checkpoint["config"]["padded_vocab_size"] == 50304
    # the checkpoint samples with --mode sample
    run_script(
        "train_gpt2.py",
        "--mode",
        "sample",
        "--init_from",
        out / "ckpt.pt",
        "--max_new_tokens",
        5,
        "--device",
        "cpu",
    )
    # --mode eval of the run reads its data and val batches (8 x 32, 4 of them): the val loss it logged last, exactly
    run_script(
        "train_gpt2.py",
        "--mode",
        "eval",
        "--init_from",
        out,
        "--hellaswag",
        0,
        "--out_dir",
        tmp_path / "eval",
        "--device",
        "cpu",
    )
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["val_loss"] == val[1] and evaluated["val_loss_of"] == "4 batches of 8 x 32"


def gradients(model, micro_batches):
    """The loss and gradients of one training step, as the training loop computes them."""
    model.zero_grad(set_to_none=True)
    loss, stop = tg.forward_backward(
        model, micro_batches, torch.float32, torch.amp.GradScaler("cpu", enabled=False)
    )
    assert stop is False
    return loss, [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    x, y = random_ids(8, 16), random_ids(8, 16, seed=1)
    loss_big, big = gradients(model, [(x, y)])
    loss_acc, acc = gradients(model, [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    for a, b in zip(acc, big):  # float32 sums in another order: equal to ~1e-7 relative
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    # Masked targets (fine-tuning): micro-batches with different numbers of targets must
    # still give the mean over every target of the step.
    y_masked = y.clone()
    y_masked[0, :12] = -100
    y_masked[5, 3:] = -100
    loss_big, big = gradients(model, [(x, y_masked)])
    loss_acc, acc = gradients(model, [(x[i : i + 2], y_masked[i : i + 2]) for i in range(0, 8, 2)])
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(acc, big))


def make_shards(folder, shard_lengths, val_length=100):
    """A prepared folder whose token at stream position i is i (mod 50000), for loader tests."""
    folder.mkdir()
    names, position = [], val_length
    pdata.save_npy(folder / "val_000000.npy", (np.arange(val_length) % 50000).astype(np.uint16))
    for i, n in enumerate(shard_lengths):
        names.append(f"train_{i:06d}.npy")
        pdata.save_npy(
            folder / names[-1], (np.arange(position, position + n) % 50000).astype(np.uint16)
        )
        position += n
    pdata.save_json(
        folder / "meta.json",
        {
            "kind": "pretrain",
            "splits": {
                "val": {
                    "tokens": val_length,
                    "shards": ["val_000000.npy"],
                    "shard_tokens": [val_length],
                },
                "train": {
                    "tokens": sum(shard_lengths),
                    "shards": names,
                    "shard_tokens": list(shard_lengths),
                },
            },
        },
    )
    return folder


def test_loader_reads_every_token_across_shards_and_ranks(tmp_path):
    data = make_shards(tmp_path / "data", [37, 50, 13, 64])  # windows must cross shard ends
    B, T, accum = 2, 8, 2
    single = tg.PretrainLoader(data, "train", B * 2, T, seed=3)  # one rank, twice the batch
    ranks = [tg.PretrainLoader(data, "train", B, T, rank=r, world_size=2, seed=3) for r in range(2)]
    stream = np.concatenate([single.shards[i] for i in single.order]).astype(np.int64)
    for step in range(2):
        whole = single.next_step(accum)
        parts = [loader.next_step(accum) for loader in ranks]
        # the step's sequences, in order, are consecutive windows of the stream
        xs = torch.cat([x for x, _ in whole]).view(-1)
        start = step * accum * 2 * B * T
        assert xs.tolist() == stream[start : start + len(xs)].tolist()
        assert all((y[:, :-1] == x[:, 1:]).all() for x, y in whole)
        # two ranks together read exactly what one reads: micro-step m, rank r
        split = torch.cat([torch.cat([parts[r][m][0] for r in range(2)]) for m in range(accum)])
        assert split.tolist() == torch.cat([x for x, _ in whole]).tolist()
    # 164 tokens hold 2 steps of 64 (+1): the next step starts a new epoch, in another order
    epoch0_order = list(single.order)
    single.next_step(accum)
    assert single.epoch == 1 and list(single.order) != epoch0_order
    state = single.state_dict()
    again = tg.PretrainLoader(data, "train", B * 2, T, seed=3)
    again.load_state_dict(state)
    assert [x.tolist() for x, _ in again.next_step(accum)] == [
        x.tolist() for x, _ in single.next_step(accum)
    ]


def test_ddp_two_processes_equal_one(shakespeare, tmp_path):
    args = [
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        *TINY,
        "--max_steps",
        6,
        "--eval_interval",
        3,
        "--val_steps",
        4,
    ]
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "one")
    subprocess.run(
        TORCHRUN
        + [
            "--nproc_per_node=2",
            str(HERE / "train_gpt2.py"),
            *map(str, args),
            "--out_dir",
            str(tmp_path / "two"),
        ],
        check=True,
        capture_output=True,
        cwd=HERE,
    )
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == 8  # 6 steps, 2 evaluations
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    keys = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"].keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def test_training_with_torch_compile(shakespeare, tmp_path):
    args = [
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        *TINY,
        "--max_steps",
        2,
        "--eval_interval",
        1,
        "--val_steps",
        2,
        "--eval_samples",
        1,
    ]
    proc = run_script("train_gpt2.py", *args, "--compile", 1, "--out_dir", tmp_path / "compiled")
    assert (
        proc.stdout.count("val_loss") == 2 and "--- sample 1" in proc.stdout
    )  # evaluation and sampling compiled
    keys = torch.load(tmp_path / "compiled" / "ckpt.pt", weights_only=True)["model"].keys()
    assert "lm_head.weight" in keys and not any(
        k.startswith(("module.", "_orig_mod.")) for k in keys
    )
    # the compiled run computes what the eager one does: losses, gradient norms, val losses
    run_script("train_gpt2.py", *args, "--compile", 0, "--out_dir", tmp_path / "eager")
    for compiled, eager in zip(
        read_log(tmp_path / "compiled"), read_log(tmp_path / "eager"), strict=True
    ):
        for key in {"loss", "grad_norm", "val_loss"} & (set(compiled) | set(eager)):
            assert compiled.get(key) == pytest.approx(eager[key], rel=1e-4), (key, compiled, eager)


def interrupt_and_resume(args, out_dir, signal_at_step):
    """Run, send SIGTERM once the log shows signal_at_step, then resume to the end."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "train_gpt2.py"), *map(str, args), "--out_dir", str(out_dir)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # blocking reads: no sleeps
        if line.startswith(f"step {signal_at_step:5d}/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0
    stopped_at = torch.load(out_dir / "ckpt.pt", weights_only=True)["step"]
    run_script("train_gpt2.py", *args, "--out_dir", out_dir, "--init_from", "resume")
    return stopped_at


def test_resume_after_sigterm_equals_uninterrupted(shakespeare, tmp_path):
    args = [
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        *TINY,
        "--max_steps",
        40,
        "--eval_interval",
        10,
        "--val_steps",
        2,
        "--ckpt_interval",
        1000,
    ]
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "straight")
    stopped_at = interrupt_and_resume(args, tmp_path / "cut", signal_at_step=6)
    assert 6 <= stopped_at < 40  # it stopped early, at the end of a step, and saved
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "cut")
    assert [s for s, _ in resumed] == list(range(1, 41))
    assert resumed == straight  # bit for bit
    val = lambda d: [e["val_loss"] for e in read_log(d) if "val_loss" in e]  # noqa: E731
    assert val(tmp_path / "cut") == val(tmp_path / "straight")


def test_a_run_killed_after_its_checkpoint_logs_each_step_once(shakespeare, tmp_path, monkeypatch):
    """Killed (kill -9) after the checkpoint of step 3, with steps 4-6 logged and a line cut short: the
    resumed run does 4-6 again, and log.jsonl holds each step once, as an uninterrupted run's."""
    args = [
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        *TINY,
        "--max_steps",
        6,
        "--eval_interval",
        3,
        "--val_steps",
        1,
        "--ckpt_interval",
        3,
    ]
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "straight")
    save = tg.save_checkpoint

    def save_and_keep_step_3(path, *rest):
        save(path, *rest)
        if (
            rest[2]["step"] == 3
        ):  # the state dict: the checkpoint a kill -9 during step 6 would leave
            shutil.copy(path, tmp_path / "at_step_3.pt")

    monkeypatch.setattr(tg, "save_checkpoint", save_and_keep_step_3)
    cut = tmp_path / "cut"
    run_script("train_gpt2.py", *args, "--out_dir", cut)
    shutil.copy(tmp_path / "at_step_3.pt", cut / "ckpt.pt")
    with open(cut / "log.jsonl", "a") as f:
        f.write('\n{"step": 7, "lo')  # a blank line, and one killed in its middle
    run_script("train_gpt2.py", *args, "--out_dir", cut, "--init_from", "resume")

    def timeless(d):
        return [{k: v for k, v in e.items() if k not in ("ms", "tok_per_s")} for e in read_log(d)]

    assert timeless(cut) == timeless(tmp_path / "straight")  # each step once, bit for bit the same


def test_resume_refuses_data_that_changed(tmp_path):
    """Prepared again (bigger), two shards of equal length swapped, or another val shard: the same
    position would be other tokens, so the run refuses to resume on them (one line, nothing touched)."""
    data = make_shards(tmp_path / "data", [3000, 3000], val_length=300)
    args = [
        "--mode",
        "pretrain",
        "--data_dir",
        data,
        *TINY,
        "--out_dir",
        tmp_path / "run",
        "--device",
        "cpu",
    ]
    run_script("train_gpt2.py", *args, "--max_steps", 2)

    def swap_train_shards():
        (data / "train_000000.npy").rename(data / "swap")
        (data / "train_000001.npy").rename(data / "train_000000.npy")
        (data / "swap").rename(data / "train_000001.npy")

    swap_train_shards()
    resume, before = ["--init_from", "resume", "--max_steps", 4], snapshot(tmp_path)
    assert "not the data this run was reading" in main_error(*args, *resume)
    assert snapshot(tmp_path) == before
    swap_train_shards()  # back as they were; now a val shard of other tokens
    pdata.save_npy(data / "val_000000.npy", np.ones(300, np.uint16))
    before = snapshot(tmp_path)
    assert "not the data this run was reading" in main_error(*args, *resume)
    assert snapshot(tmp_path) == before
    shutil.rmtree(data)
    make_shards(data, [3000, 3000, 3000], val_length=300)  # prepared again, bigger
    before = snapshot(tmp_path)
    assert f"--init_from {tmp_path / 'run'}/ckpt.pt" in main_error(*args, *resume)
    assert snapshot(tmp_path) == before


def test_non_finite_loss_names_a_checkpoint_that_resumes(shakespeare, tmp_path):
    # The LR climbs to 1e3 over 20 steps: the loss blows up a few steps in. With a checkpoint
    # due at every step, the one at the step before the blow-up holds weights whose next
    # loss is already huge; the error must name an earlier one, proven by a finite step.
    args = [
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        "--out_dir",
        tmp_path,
        *TINY,
        "--max_lr",
        1e3,
        "--warmup_steps",
        20,
        "--max_steps",
        50,
        "--ckpt_interval",
        1,
        "--eval_interval",
        1000,
    ]
    message = main_error(*args)
    assert "loss became non-finite" in message and "ckpt.pt" in message
    failed_at = int(message.split("at step ")[1].split()[0])
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert f"at step {saved} " in message and saved < failed_at - 1
    # resumed exactly as the message advises, the named checkpoint trains on: a finite step
    before = [loss for step, loss in train_losses(tmp_path) if step == saved + 1]
    tg.main([str(a) for a in args] + ["--init_from", "resume", "--max_steps", str(saved + 1)])
    resumed = [loss for step, loss in train_losses(tmp_path) if step == saved + 1]
    assert (
        len(before) == 1 and resumed == before and math.isfinite(resumed[0])
    )  # done again, logged once


def main_error(*args):
    """The one-line message train_gpt2.py fails with (in-process: no interpreter start)."""
    return assert_one_line_error(run_script("train_gpt2.py", *args, check=False))


def test_pretrain_bad_input(shakespeare, tmp_path):
    def pretrain(*args):
        return main_error(
            "--mode", "pretrain", *TINY, "--max_steps", 2, "--out_dir", tmp_path / "o", *args
        )

    proc = run_script(
        "train_gpt2.py",
        "--mode",
        "pretrain",
        "--data_dir",
        tmp_path / "nothing",
        check=False,
        new_process=True,
    )
    assert_one_line_error(
        proc, "not found", "prepare_data.py"
    )  # as the user sees it: exit code, stderr
    assert "not a multiple" in pretrain(
        "--data_dir", shakespeare, "--total_batch_size", 100
    ) and "64" in pretrain("--data_dir", shakespeare, "--total_batch_size", 100)
    assert "nothing to resume" in pretrain("--data_dir", shakespeare, "--init_from", "resume")
    assert "no train shards" in pretrain("--data_dir", make_shards(tmp_path / "empty", []))
    broken = make_shards(tmp_path / "broken", [500])
    np.save(broken / "train_000000.npy", np.arange(500, dtype=np.int32))  # not uint16
    assert "re-run prepare_data.py" in pretrain("--data_dir", broken)
    (tmp_path / "unfinished").mkdir()
    assert "no meta.json" in pretrain("--data_dir", tmp_path / "unfinished")
    assert "less than one step" in pretrain("--data_dir", make_shards(tmp_path / "small", [100]))
    tg.main(
        [
            "--mode",
            "pretrain",
            *map(str, TINY),
            "--max_steps",
            "1",
            "--data_dir",
            str(shakespeare),
            "--out_dir",
            str(tmp_path / "o"),
        ]
    )
    assert "already holds a checkpoint" in pretrain("--data_dir", shakespeare)


def test_a_failure_after_training_started_saves_the_steps_done(tmp_path):
    # Steps read 128 (+1) tokens each; a token id past the vocabulary at 900 stops the 8th
    # step. The 7 steps done must not be lost, although no checkpoint was due.
    data = make_shards(tmp_path / "data", [1400], val_length=300)
    bad = np.load(data / "train_000000.npy")
    bad[900] = 50300
    np.save(data / "train_000000.npy", bad)
    args = [
        "--mode",
        "pretrain",
        *TINY,
        "--total_batch_size",
        128,
        "--data_dir",
        data,
        "--out_dir",
        tmp_path / "o",
        "--max_steps",
        10,
        "--eval_interval",
        100,
        "--ckpt_interval",
        100,
    ]
    message = main_error(*args)
    assert "train_000000.npy" in message and "50300" in message
    assert [e["step"] for e in read_log(tmp_path / "o") if "loss" in e] == list(range(1, 8))
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"] == 7


def test_half_precision_trains_on_cpu(shakespeare, tmp_path, capsys):
    """bfloat16 autocast and float16 with its gradient scaler, run on a CPU: the path a GPU
    takes, exercised where CI can run it."""
    for dtype in ("bfloat16", "float16"):
        out = tmp_path / dtype
        tg.main(
            [
                *map(str, TINY),
                "--mode",
                "pretrain",
                "--data_dir",
                str(shakespeare),
                "--out_dir",
                str(out),
                "--max_lr",
                "1e-2",
                "--batch_size",
                "4",
                "--max_steps",
                "8",
                "--eval_interval",
                "8",
                "--val_steps",
                "2",
                "--dtype",
                dtype,
            ]
        )
        losses = [loss for _, loss in train_losses(out)]
        assert losses[-1] < losses[0] - 1.0  # it learns
        scaler = torch.load(out / "ckpt.pt", weights_only=True)["scaler"]
        assert (scaler.get("_growth_tracker") == 8) == (
            dtype == "float16"
        )  # the scaler ran every step, fp16 only
    capsys.readouterr()
    tg.main(
        [
            "--init_from",
            str(tmp_path / "bfloat16"),
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--max_new_tokens",
            "5",
            "--temperature",
            "0",
        ]
    )
    assert capsys.readouterr().out.startswith("Hello, I'm a language model,")


def test_dtype_follows_the_gpu(monkeypatch):
    assert (
        tg.pick_dtype("cpu") == torch.float32 and tg.pick_dtype("cpu", "bfloat16") == torch.bfloat16
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # A100, H100
    assert tg.pick_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # T4, V100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert (
        tg.pick_dtype("cuda") == torch.float16
        and tg.pick_dtype("cuda:0", "float32") == torch.float32
    )
    with pytest.raises(tg.UserError, match="Tesla T4 has no bfloat16"):
        tg.pick_dtype("cuda", "bfloat16")


def test_wandb_logs_what_the_log_holds(shakespeare, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    tg.main(
        [
            *map(str, TINY),
            "--mode",
            "pretrain",
            "--data_dir",
            str(shakespeare),
            "--out_dir",
            str(out),
            "--max_steps",
            "2",
            "--eval_interval",
            "2",
            "--val_steps",
            "1",
            "--wandb_project",
            "gpt2-test",
        ]
    )
    import wandb

    wandb.teardown()  # wandb's service writes the run file for good when it stops, as at exit
    (run,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    record = run.read_bytes()
    for key in ("loss", "val_loss", "grad_norm", "lr", "tok_per_s", "gpt2-test"):
        assert key.encode() in record, key
    assert (
        torch.load(out / "ckpt.pt", weights_only=True)["wandb_id"] in run.name
    )  # a resume continues this run


# -----------------------------------------------------------------------------
# The command line: every mistake a user can make with train_gpt2.py, in every mode, must end
# the command with one line that names the problem, and leave every file the user has exactly
# as it was.


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, shakespeare, sft_data, base_model):
    """What a user has made by now: prepared data, a base checkpoint, a finished pretraining
    run, a fine-tuning run, HellaSwag files good and bad, a Hugging Face folder."""
    root = tmp_path_factory.mktemp("user")
    args = [
        "--mode",
        "pretrain",
        *map(str, TINY),
        "--data_dir",
        str(shakespeare),
        "--max_steps",
        "2",
    ]
    tg.main(args + ["--out_dir", str(root / "run")])
    tg.main(
        [
            *map(str, FINETUNE),
            "--init_from",
            str(base_model),
            "--data_dir",
            str(sft_data),
            "--max_steps",
            "1",
            "--out_dir",
            str(root / "ft"),
        ]
    )
    good = json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1})
    for name, text in {
        "hs_two_endings": '{"ctx": "A", "endings": ["a", "b"], "label": 0}',
        "hs_label_9": good.replace('"label": 1', '"label": 9'),
        "hs_empty": "\n",
        "hs_not_json": "{ctx: A",
        "hs_good": good,
    }.items():
        (root / f"{name}.jsonl").write_text(text + "\n")
    (root / "log_bad").mkdir()
    (root / "log_bad" / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n')
    (root / "log_no_step").mkdir()
    (root / "log_no_step" / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"loss": [4.0]}\n')
    # a run killed before its first checkpoint: a log, no ckpt.pt
    (root / "no_ckpt").mkdir()
    (root / "no_ckpt" / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (root / "loop").symlink_to(root / "loop")  # a link that leads back to itself
    # a Hugging Face folder whose pytorch_model.bin holds a Python object besides its tensors
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32))
    hf.save_pretrained(root / "hfbin")
    (root / "hfbin" / "model.safetensors").unlink()
    weights = {key: value.clone() for key, value in hf.state_dict().items()}
    torch.save({**weights, "extra": Path("x")}, root / "hfbin" / "pytorch_model.bin")
    (root / "truncated.pt").write_bytes((root / "run" / "ckpt.pt").read_bytes()[:5000])
    (root / "random.pt").write_bytes(os.urandom(3000))
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    (root / "a_file").write_text("not a folder")
    for field, value in [
        ("layer_norm_epsilon", 1e-6),
        ("scale_attn_weights", False),
        ("tie_word_embeddings", False),
    ]:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(
            GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, **{field: value})
        ).save_pretrained(root / field)
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(root / "bert")
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=1000)
    ).save_pretrained(root / "vocab")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)).save_pretrained(
        root / "corrupt"
    )
    weights = root / "corrupt" / "model.safetensors"
    weights.write_bytes(
        weights.read_bytes()[: len(weights.read_bytes()) // 2]
    )  # a download cut short
    torch.save({"model": Path("x"), "config": {}}, root / "object.pt")  # an object besides tensors
    return {"root": root, "data": shakespeare, "sft": sft_data, "base": base_model}


def broken_shards(tmp, kind):
    """A copy of a small prepared folder, broken in one way."""
    data = make_shards(tmp / kind, [3000, 3000], val_length=300)
    meta_path = data / "meta.json"
    meta = json.loads(meta_path.read_text())
    if kind == "meta_not_json":
        meta_path.write_text("{not json")
    elif kind == "meta_no_splits":
        meta_path.write_text(json.dumps({"kind": "pretrain"}))
    elif kind == "token_too_big":
        np.save(data / "train_000000.npy", np.full(3000, 50300, dtype=np.uint16))
    elif kind == "shorter_than_meta":
        np.save(data / "train_000001.npy", np.zeros(2000, dtype=np.uint16))
    elif kind == "truncated_npy":
        path = data / "train_000001.npy"
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "shard_tokens_disagree":
        meta["splits"]["train"]["shard_tokens"] = [3000, 2999]
        meta_path.write_text(json.dumps(meta))
    elif kind == "tiny_val":
        meta["splits"]["val"]["tokens"], meta["splits"]["val"]["shard_tokens"] = 20, [20]
        np.save(data / "val_000000.npy", np.zeros(20, dtype=np.uint16))
        meta_path.write_text(json.dumps(meta))
    return data


PRETRAIN = ["--mode", "pretrain", *TINY, "--max_steps", 3]
BAD_TRAIN_INPUTS = {  # name: (arguments given the user's files u and a scratch folder t, words of the error)
    # flags outside their domain, refused before anything runs
    "max_steps -1": (
        lambda u, t: PRETRAIN + ["--max_steps", -1, "--data_dir", u["data"]],
        ["--max_steps", ">= 1"],
    ),
    "grad_clip -1": (lambda u, t: PRETRAIN + ["--grad_clip", -1], ["--grad_clip"]),
    "max_lr nan": (lambda u, t: PRETRAIN + ["--max_lr", "nan"], ["--max_lr", "> 0"]),
    "min_lr_ratio 2": (lambda u, t: PRETRAIN + ["--min_lr_ratio", 2], ["--min_lr_ratio"]),
    "batch_size 0": (lambda u, t: PRETRAIN + ["--batch_size", 0], ["--batch_size"]),
    "eval_samples -1": (lambda u, t: PRETRAIN + ["--eval_samples", -1], ["--eval_samples"]),
    "abbreviated flag": (lambda u, t: PRETRAIN + ["--max_l", 1e-3], ["unrecognized", "--max_l"]),
    "device cuda without CUDA": (
        lambda u, t: ["--device", "cuda"],
        ["--device", "not a device this machine has", "CUDA"],
    ),
    "device that does not exist": (lambda u, t: ["--device", "tpu7"], ["--device", "not a device"]),
    "temperature -1": (
        lambda u, t: ["--temperature", -1, "--init_from", u["base"]],
        ["--temperature"],
    ),
    "top_p 0": (lambda u, t: ["--top_p", 0, "--init_from", u["base"]], ["--top_p", "> 0 and <= 1"]),
    "top_k -5": (lambda u, t: ["--top_k", -5, "--init_from", u["base"]], ["--top_k"]),
    "max_new_tokens -3": (
        lambda u, t: ["--max_new_tokens", -3, "--init_from", u["base"]],
        ["--max_new_tokens"],
    ),
    "hellaswag_limit 0": (
        lambda u, t: ["--mode", "eval", "--hellaswag_limit", 0],
        ["--hellaswag_limit"],
    ),
    "bench warmup eats every step": (
        lambda u, t: ["--mode", "bench", "--bench_steps", 3, "--bench_warmup", 3],
        ["--bench_warmup"],
    ),
    "n_embd not a multiple of n_head": (
        lambda u, t: (
            PRETRAIN
            + ["--n_embd", 30, "--n_head", 4, "--data_dir", u["data"], "--out_dir", t / "o"]
        ),
        ["--n_embd 30", "--n_head 4"],
    ),
    "block_size beyond the checkpoint": (
        lambda u, t: [
            "--mode",
            "finetune",
            *FINETUNE[2:],
            "--init_from",
            u["base"],
            "--data_dir",
            u["sft"],
            "--block_size",
            500,
            "--out_dir",
            t / "o",
        ],
        ["--block_size 500", "128"],
    ),
    # data folders, checked when opened
    "data folder missing": (
        lambda u, t: PRETRAIN + ["--data_dir", t / "nope", "--out_dir", t / "o"],
        ["not found"],
    ),
    "meta.json not JSON": (
        lambda u, t: (
            PRETRAIN + ["--data_dir", broken_shards(t, "meta_not_json"), "--out_dir", t / "o"]
        ),
        ["meta.json", "prepare_data.py"],
    ),
    "meta.json without its fields": (
        lambda u, t: (
            PRETRAIN + ["--data_dir", broken_shards(t, "meta_no_splits"), "--out_dir", t / "o"]
        ),
        ["meta.json", "splits"],
    ),
    "shard shorter than meta.json": (
        lambda u, t: (
            PRETRAIN + ["--data_dir", broken_shards(t, "shorter_than_meta"), "--out_dir", t / "o"]
        ),
        ["meta.json says", "prepare_data.py"],
    ),
    "shard length against shard_tokens": (
        lambda u, t: (
            PRETRAIN
            + ["--data_dir", broken_shards(t, "shard_tokens_disagree"), "--out_dir", t / "o"]
        ),
        ["train_000001.npy", "2,999"],
    ),
    "truncated shard": (
        lambda u, t: (
            PRETRAIN + ["--data_dir", broken_shards(t, "truncated_npy"), "--out_dir", t / "o"]
        ),
        ["train_000001.npy", "cut short or not .npy"],
    ),
    "token id outside the vocabulary": (
        lambda u, t: (
            PRETRAIN + ["--data_dir", broken_shards(t, "token_too_big"), "--out_dir", t / "o"]
        ),
        ["train_000000.npy", "50300"],
    ),
    "val split shorter than a batch": (
        lambda u, t: PRETRAIN + ["--data_dir", broken_shards(t, "tiny_val"), "--out_dir", t / "o"],
        ["val split", "--batch_size"],
    ),
    "train split smaller than a step": (
        lambda u, t: PRETRAIN + ["--data_dir", make_shards(t / "s", [100]), "--out_dir", t / "o"],
        ["less than one step"],
    ),
    "instruction data to pretrain": (
        lambda u, t: PRETRAIN + ["--data_dir", u["sft"], "--out_dir", t / "o"],
        ["sft data", "prepare_data.py"],
    ),
    "pretraining shards to fine-tune": (
        lambda u, t: [
            *FINETUNE,
            "--init_from",
            u["base"],
            "--data_dir",
            u["data"],
            "--out_dir",
            t / "o",
        ],
        ["--sft"],
    ),
    "fine-tuning from scratch": (
        lambda u, t: [
            *FINETUNE,
            "--init_from",
            "scratch",
            "--data_dir",
            u["sft"],
            "--out_dir",
            t / "o",
        ],
        ["--mode finetune starts from a trained model", "--init_from gpt2"],
    ),
    "too few examples for a step": (
        lambda u, t: [
            *FINETUNE,
            "--init_from",
            u["base"],
            "--data_dir",
            u["sft"],
            "--batch_size",
            7,
            "--total_batch_size",
            70,
            "--out_dir",
            t / "o",
        ],
        ["--total_batch_size"],
    ),
    # output folders and checkpoints
    "out_dir is a file": (
        lambda u, t: PRETRAIN + ["--data_dir", u["data"], "--out_dir", u["root"] / "a_file"],
        ["is a file"],
    ),
    "out_dir cannot be made": (
        lambda u, t: PRETRAIN + ["--data_dir", u["data"], "--out_dir", "/proc/gpt2_run"],
        ["cannot write", "/proc/gpt2_run"],
    ),
    "a new run over a finished one": (
        lambda u, t: PRETRAIN + ["--data_dir", u["data"], "--out_dir", u["root"] / "run"],
        ["already holds a checkpoint", "--init_from resume"],
    ),
    "resume with nothing to resume": (
        lambda u, t: (
            PRETRAIN + ["--data_dir", u["data"], "--init_from", "resume", "--out_dir", t / "o"]
        ),
        ["nothing to resume"],
    ),
    "resume past --max_steps": (
        lambda u, t: (
            PRETRAIN
            + [
                "--data_dir",
                u["data"],
                "--init_from",
                "resume",
                "--max_steps",
                1,
                "--out_dir",
                u["root"] / "run",
            ]
        ),
        ["step 2", "--max_steps"],
    ),
    "fine-tune run resumed as pretraining": (
        lambda u, t: (
            PRETRAIN
            + ["--data_dir", u["data"], "--init_from", "resume", "--out_dir", u["root"] / "ft"]
        ),
        ["--mode finetune run"],
    ),
    "pretraining run resumed as fine-tuning": (
        lambda u, t: [
            *FINETUNE,
            "--data_dir",
            u["sft"],
            "--init_from",
            "resume",
            "--out_dir",
            u["root"] / "run",
        ],
        ["--mode pretrain run"],
    ),
    "truncated checkpoint": (
        lambda u, t: ["--init_from", u["root"] / "truncated.pt"],
        ["truncated.pt", "not a readable"],
    ),
    "random bytes as checkpoint": (
        lambda u, t: [
            "--mode",
            "eval",
            "--init_from",
            u["root"] / "random.pt",
            "--hellaswag",
            0,
            "--out_dir",
            t / "e",
        ],
        ["random.pt", "not a readable"],
    ),
    "foreign checkpoint": (
        lambda u, t: ["--init_from", u["root"] / "foreign.pt"],
        ["not a checkpoint of train_gpt2.py", "weights"],
    ),
    "foreign checkpoint to start a run": (
        lambda u, t: [
            *FINETUNE,
            "--init_from",
            u["root"] / "foreign.pt",
            "--data_dir",
            u["sft"],
            "--out_dir",
            t / "o",
        ],
        ["foreign.pt"],
    ),
    "unknown model name": (
        lambda u, t: ["--init_from", "gpt5"],
        ["unknown model", "run folder", "gpt2-xl"],
    ),
    "a Python object in a checkpoint": (
        lambda u, t: ["--init_from", u["root"] / "object.pt"],
        ["object.pt", "Path"],
    ),
    "a safetensors file cut short": (
        lambda u, t: ["--init_from", u["root"] / "corrupt"],
        ["corrupt", "could not load"],
    ),
    "another tokenizer's vocabulary": (
        lambda u, t: ["--init_from", u["root"] / "vocab"],
        ["1,000 token ids", "GPT-2's"],
    ),
    "sample --init_from resume": (
        lambda u, t: ["--init_from", "resume"],
        ["--init_from resume", "its folder"],
    ),
    "resume at another size": (
        lambda u, t: [
            "--mode",
            "pretrain",
            "--init_from",
            "resume",
            "--out_dir",
            u["root"] / "run",
            "--n_layer",
            1,
            "--max_steps",
            3,
        ],
        ["--n_layer 1", "differs", "keeps"],
    ),
    "temperature that overflows": (
        lambda u, t: ["--init_from", u["base"], "--temperature", "1e-9"],
        ["--temperature"],
    ),
    "checkpoint file missing": (lambda u, t: ["--init_from", t / "nope.pt"], ["not found"]),
    # Hugging Face folders this GPT-2 does not compute exactly
    "layer_norm_epsilon 1e-6": (
        lambda u, t: ["--init_from", u["root"] / "layer_norm_epsilon"],
        ["layer_norm_epsilon"],
    ),
    "scale_attn_weights off": (
        lambda u, t: ["--init_from", u["root"] / "scale_attn_weights"],
        ["scale_attn_weights"],
    ),
    "untied embeddings": (
        lambda u, t: ["--init_from", u["root"] / "tie_word_embeddings"],
        ["tie_word_embeddings"],
    ),
    "not a GPT-2 checkpoint": (
        lambda u, t: ["--init_from", u["root"] / "bert"],
        ["bert", "not a GPT-2"],
    ),
    # HellaSwag files, checked before the model loads (eval) or before step 1 (pretrain)
    "HellaSwag file missing": (
        lambda u, t: [
            "--mode",
            "eval",
            "--init_from",
            u["base"],
            "--hellaswag_path",
            t / "hs.jsonl",
            "--out_dir",
            t / "e",
        ],
        ["not found", "--hellaswag"],
    ),
    "HellaSwag item with 2 endings": (
        lambda u, t: [
            "--mode",
            "eval",
            "--init_from",
            u["base"],
            "--hellaswag_path",
            u["root"] / "hs_two_endings.jsonl",
            "--out_dir",
            t / "e",
        ],
        ["line 1"],
    ),
    "HellaSwag label 9": (
        lambda u, t: [
            "--mode",
            "eval",
            "--init_from",
            u["base"],
            "--hellaswag_path",
            u["root"] / "hs_label_9.jsonl",
            "--out_dir",
            t / "e",
        ],
        ["line 1", "label"],
    ),
    "HellaSwag file with no items": (
        lambda u, t: (
            PRETRAIN
            + [
                "--data_dir",
                u["data"],
                "--hellaswag",
                1,
                "--hellaswag_path",
                u["root"] / "hs_empty.jsonl",
                "--out_dir",
                t / "o",
            ]
        ),
        ["no HellaSwag items"],
    ),
    "HellaSwag file not JSON": (
        lambda u, t: (
            PRETRAIN
            + [
                "--data_dir",
                u["data"],
                "--hellaswag",
                1,
                "--hellaswag_path",
                u["root"] / "hs_not_json.jsonl",
                "--out_dir",
                t / "o",
            ]
        ),
        ["line 1"],
    ),
    # sampling, chat, plot
    "empty prompt": (lambda u, t: ["--init_from", u["base"], "--prompt", ""], ["prompt is empty"]),
    "chat with a model that is not fine-tuned": (
        lambda u, t: ["--mode", "chat", "--init_from", u["base"]],
        ["not fine-tuned"],
    ),
    "plot without a log": (
        lambda u, t: ["--mode", "plot", "--out_dir", t / "nothing"],
        ["log.jsonl not found"],
    ),
    "plot of a log cut short": (
        lambda u, t: ["--mode", "plot", "--out_dir", u["root"] / "log_bad"],
        ["line 2"],
    ),
    "plot of a log entry without a step": (
        lambda u, t: ["--mode", "plot", "--out_dir", u["root"] / "log_no_step"],
        ["line 2", "not a log entry"],
    ),
    # values that pass a parser and would fail later
    "seed -1": (lambda u, t: PRETRAIN + ["--seed", -1], ["--seed", ">= 0"]),
    "seed 2**64": (lambda u, t: ["--init_from", u["base"], "--seed", 2**64], ["--seed"]),
    "block_size 10**23": (
        lambda u, t: ["--mode", "bench", "--block_size", 10**23],
        ["--block_size", "<= 1048576"],
    ),
    "an empty --out_dir": (
        lambda u, t: [
            "--mode",
            "eval",
            "--init_from",
            u["base"],
            "--hellaswag",
            0,
            "--out_dir",
            "",
        ],
        ["--out_dir is empty"],
    ),
    "an --out_dir that links to itself": (
        lambda u, t: [
            "--mode",
            "eval",
            "--init_from",
            u["base"],
            "--out_dir",
            u["root"] / "loop",
        ],
        ["loop", "symbolic links"],
    ),
    "an --out_dir name too long": (
        lambda u, t: PRETRAIN + ["--data_dir", u["data"], "--out_dir", t / ("x" * 300)],
        ["File name too long"],
    ),
    "an HF pytorch_model.bin that would run code": (
        lambda u, t: ["--init_from", u["root"] / "hfbin"],
        ["pytorch_model.bin", "Python objects"],
    ),
    # a run folder with a log and no checkpoint: one way forward
    "a new run over a run that saved no checkpoint": (
        lambda u, t: PRETRAIN + ["--data_dir", u["data"], "--out_dir", u["root"] / "no_ckpt"],
        ["move its log.jsonl away"],
    ),
    # flags that point to the fix
    "a misspelt flag": (lambda u, t: PRETRAIN + ["--max_stpes", 3], ["did you mean --max_steps?"]),
    "another codebase's flag": (
        lambda u, t: PRETRAIN + ["--learning_rate", 1e-3],
        ["did you mean --max_lr?"],
    ),
    "a flag of another mode, --mode forgotten": (
        lambda u, t: ["--data_dir", u["data"]],
        ["--data_dir is a flag of --mode pretrain, finetune, eval, not of --mode sample"],
    ),
    "a total_batch_size that micro-steps do not divide": (
        lambda u, t: PRETRAIN + ["--data_dir", u["data"], "--total_batch_size", 5000],
        ["--total_batch_size 5000", "(--batch_size x --block_size x GPUs)", "give 4992 or 5056"],
    ),
}


@pytest.mark.parametrize("case", BAD_TRAIN_INPUTS)
def test_train_gpt2_bad_input(case, user_files, tmp_path):
    make_args, words = BAD_TRAIN_INPUTS[case]
    args = make_args(user_files, tmp_path)
    args = (
        args if "--device" in args or "plot" in args else args + ["--device", "cpu"]
    )  # plot has no --device
    folders = (user_files["root"], user_files["data"], user_files["sft"], tmp_path)
    before = [snapshot(folder) for folder in folders]
    message = main_error(*args)
    for word in words:
        assert word in message, message
    assert [
        snapshot(folder) for folder in folders
    ] == before  # nothing the user had, changed; nothing new either


def test_first_commands_offline_say_what_to_do_in_seconds(tmp_path, monkeypatch):
    """The README's first commands on a machine without internet (nothing downloaded yet): one line that
    says what to do, in seconds (not a minute of retries, not a worker's traceback)."""
    import huggingface_hub.constants as hub

    # A name that never resolves (RFC 6761), nothing in Hugging Face's cache, no proxy (a proxy is
    # trusted to reach the hub).
    monkeypatch.setattr(hub, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("urllib.request.getproxies", dict)
    for args in (
        [],
        ["--mode", "sample", "--prompt", "Hi"],
        ["--mode", "finetune"],
        ["--mode", "eval"],
    ):
        t0 = time.time()
        message = main_error(*args)  # each defaults to --init_from gpt2
        assert (
            time.time() - t0 < 5
            and "downloaded from hub.invalid once" in message
            and "local model" in message
        )
    # The Hub's datasets, streamed: Alpaca, FineWeb-Edu, HellaSwag.
    for args in (["--sft"], [], ["--hellaswag"]):
        t0 = time.time()
        proc = run_script("prepare_data.py", *args, "--out_dir", tmp_path / "hub", check=False)
        assert (
            time.time() - t0 < 5
            and not (tmp_path / "hub").exists()
            and not (tmp_path / "hub.partial").exists()
        )
        assert_one_line_error(
            proc, "is streamed from hub.invalid, which cannot be reached", "--files"
        )
    monkeypatch.setattr("urllib.request.getproxies", lambda: {"https": "http://proxy.invalid:3128"})
    # Behind a proxy only a download can tell: it is tried.
    assert tg.not_downloadable("gpt2") is None
    # tiktoken's GPT-2 files not downloaded yet.
    (tmp_path / "no_tiktoken").mkdir()
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "no_tiktoken")}
    prepare = run_script(
        "prepare_data.py",
        "--files",
        *write_corpus(tmp_path / "corpus"),
        "--out_dir",
        tmp_path / "d",
        env=offline,
        check=False,
    )
    assert_one_line_error(prepare, "tiktoken", "TIKTOKEN_CACHE_DIR")
    model = tg.GPT(tg.GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8))
    torch.save(
        {"model": model.state_dict(), "config": tg.asdict(model.config)}, tmp_path / "model.pt"
    )
    sample = run_script(
        "train_gpt2.py", "--init_from", tmp_path / "model.pt", env=offline, check=False
    )
    assert_one_line_error(sample, "tiktoken", "TIKTOKEN_CACHE_DIR")
    export = [
        "--mode",
        "export",
        "--init_from",
        tmp_path / "model.pt",
        "--out_dir",
        tmp_path / "hf",
    ]
    assert_one_line_error(
        run_script("train_gpt2.py", *export, env=offline, check=False), "tiktoken", "CACHE_DIR"
    )
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_windows_without_fcntl_or_triton_needs_no_extra_flag(tmp_path, monkeypatch):
    """Windows has no fcntl: both scripts import and run without it (runs are then not locked). Nor has it
    Triton: --compile is 0 there by default, even with a GPU; 1 on Linux with a GPU."""
    corpus = write_corpus(tmp_path / "corpus")
    code = f"""import sys
sys.modules["fcntl"] = None  # import fcntl raises ImportError, as on Windows
sys.path.insert(0, {str(HERE)!r})
import prepare_data, train_gpt2
assert train_gpt2.fcntl is None
prepare_data.main(["--files", *{[str(c) for c in corpus]!r}, "--out_dir", {str(tmp_path / "data")!r}, "--num_proc", "1"])
train_gpt2.main(["--mode", "pretrain", *{[str(a) for a in TINY]!r}, "--data_dir", {str(tmp_path / "data")!r},
                 "--out_dir", {str(tmp_path / "run")!r}, "--max_steps", "1", "--val_steps", "1"])
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and (tmp_path / "run" / "ckpt.pt").exists(), (
        proc.stdout + proc.stderr
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for platform, compile in (("win32", 0), ("linux", 1)):
        monkeypatch.setattr(sys, "platform", platform)
        args = ["--mode", "pretrain", "--data_dir", str(tmp_path / "data")]
        assert tg.parse_args(args).compile == compile


def test_wandb_without_a_login_is_refused_before_step_1(shakespeare, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "HOME": str(tmp_path)
    }  # no key, no netrc
    args = [
        *PRETRAIN,
        "--data_dir",
        shakespeare,
        "--out_dir",
        tmp_path / "o",
        "--device",
        "cpu",
        "--wandb_project",
        "p",
    ]
    proc = subprocess.run(
        [sys.executable, HERE / "train_gpt2.py", *map(str, args)],
        cwd=HERE,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert_one_line_error(proc, "wandb login", "WANDB_MODE=offline")
    assert not (tmp_path / "o").exists()


def test_another_run_in_the_same_folder_is_refused(shakespeare, tmp_path):
    import fcntl

    (tmp_path / "o").mkdir()
    folder = os.open(tmp_path / "o", os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        args = PRETRAIN + ["--data_dir", shakespeare, "--out_dir", tmp_path / "o"]
        proc = run_script("train_gpt2.py", *args, check=False)
    finally:
        os.close(folder)
    message = assert_one_line_error(proc)
    assert "another run is using" in message and not list((tmp_path / "o").iterdir())
    assert "parameters" not in proc.stdout  # no start banner for a run that does not start


def test_torch_older_than_the_floor_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    message = main_error("--mode", "plot", "--out_dir", tmp_path)
    assert "torch 2.6.0+cu124 is older than 2.7" in message and not list(tmp_path.iterdir())
    # FSDP's own floor (dev/check_torch.sh found it wrong on 2.7 to 2.9).
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    message = main_error(*PRETRAIN, "--fsdp", 1, "--out_dir", tmp_path / "run")
    assert "--fsdp 1 needs torch 2.10 or newer (this is 2.9.1+cu128)" in message
    assert not list(tmp_path.iterdir())


def test_a_finished_command_returns_to_its_caller(base_model):
    """A successful run ends as Python expects (no os._exit): run as a script inside a longer-lived
    Python (IPython's %run, cProfile, python -i), the lines after it run."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train_gpt2.py', '--mode', 'sample', '--init_from', {str(base_model)!r}, "
        "'--max_new_tokens', '2', '--device', 'cpu']\n"
        "runpy.run_path('train_gpt2.py', run_name='__main__')\n"
        "print('after the run')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == 0 and "after the run" in proc.stdout, proc.stderr


def test_a_closed_stdout_costs_no_step_no_file_and_no_traceback(shakespeare, base_model, tmp_path):
    """| head -n 1: the reader goes away after a line; the run still does every step and saves
    them, eval still writes eval.json, and nothing ends in a traceback."""

    def closed_after_one_line(*args):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "train_gpt2.py"), *map(str, args)],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=600) == 0 and "Traceback" not in stderr, stderr
        return stderr

    run = tmp_path / "run"
    closed_after_one_line(
        *PRETRAIN,
        "--data_dir",
        shakespeare,
        "--out_dir",
        run,
        "--max_steps",
        6,
        "--eval_interval",
        2,
    )
    assert [e["step"] for e in read_log(run) if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 6
    closed_after_one_line(
        "--mode", "eval", "--init_from", run, "--hellaswag", 0, "--out_dir", tmp_path / "e"
    )
    assert "val_loss" in json.loads((tmp_path / "e" / "eval.json").read_text())
    closed_after_one_line("--mode", "plot", "--out_dir", run)
    closed_after_one_line("--init_from", base_model, "--prompt", "a\nb", "--max_new_tokens", 20)


def test_notes_on_the_schedule_and_the_resume(shakespeare, tmp_path):
    """A run that is all warmup, and a resume that reshapes the cosine, say so before step 1."""
    args = [*PRETRAIN, "--data_dir", shakespeare, "--out_dir", tmp_path, "--eval_interval", 100]
    first = run_script("train_gpt2.py", *args, "--warmup_steps", 5).stdout
    assert "note: all 3 steps are warmup" in first
    again = run_script("train_gpt2.py", *args, "--init_from", "resume", "--max_steps", 6).stdout
    assert f"resuming {tmp_path} at step 3" in again
    assert "its cosine ends at step 6, not 3" in again and "learning rate goes from" in again


def test_prompt_longer_than_the_model_reads_is_said(base_model):
    proc = run_script(
        "train_gpt2.py",
        "--init_from",
        base_model,
        "--prompt",
        " ".join(["word"] * 300),
        "--max_new_tokens",
        1,
    )
    assert "note: the prompt is 300 tokens; the model reads its last 128" in proc.stderr


def test_help_is_true_for_each_mode():
    def help_of(mode):
        with pytest.raises(SystemExit):
            tg.parse_args(["--mode", mode, "--help"])

    for mode in ("sample", "chat", "eval", "export"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            help_of(mode)
        assert "scratch" not in out.getvalue() and "data order" not in out.getvalue(), mode
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        help_of("bench")
    assert out.getvalue().count("1024") == 1  # --block_size's default, once
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        help_of("export")
    assert "a new, empty folder" in out.getvalue()


def test_the_default_micro_batch_fits_the_gpu(monkeypatch, capsys):
    for memory, batch_size in ((85.5e9, 64), (42.4e9, 32), (25.4e9, 16), (16.9e9, 8)):
        properties = argparse.Namespace(total_memory=memory)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
        assert tg.fitting_batch_size("cuda:0") == batch_size
    assert "--batch_size 8: what GPT-2 124M fits in 16 GiB" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")  # the other ranks stay silent
    tg.fitting_batch_size("cuda:0")
    assert capsys.readouterr().out == ""
    assert tg.fitting_batch_size("cpu") == 8


def test_the_hub_check_follows_a_mirror_and_no_proxy(monkeypatch):
    """HF_ENDPOINT's scheme, host and port are what the check connects to; behind a proxy only a
    download can tell, unless NO_PROXY covers the host."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *args: None)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert tg.not_downloadable("gpt2") is None  # a mirror on a plain http port answers
    # the listener is gone: nothing answers on that port
    assert "127.0.0.1" in tg.not_downloadable("gpt2")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert tg.not_downloadable("gpt2") is None  # a proxy: only a download can tell
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert "127.0.0.1" in tg.not_downloadable("gpt2")  # the proxy is bypassed: checked


def test_out_of_memory_is_one_line_that_says_what_may_fit(shakespeare, tmp_path, monkeypatch):
    """CUDA's out-of-memory error at step 1 (raised here by hand: a CPU has no such limit) is one
    line naming a micro-batch half as big, and the run folder is left as it was (none)."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.28 GiB")

    def cpu_out_of_memory(*args, **kwargs):  # what a CPU's allocator says
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 13237223424 bytes. Error code 12"
        )

    monkeypatch.setattr(tg, "forward_backward", cpu_out_of_memory)
    message = main_error(
        *PRETRAIN, "--data_dir", shakespeare, "--out_dir", tmp_path / "o", "--device", "cpu"
    )
    assert "--batch_size 2 does not fit in this machine" in message, message
    monkeypatch.setattr(tg, "forward_backward", out_of_memory)
    message = main_error(
        *PRETRAIN, "--data_dir", shakespeare, "--out_dir", tmp_path / "o", "--device", "cpu"
    )
    assert "--batch_size 2 does not fit" in message and "try --batch_size 1" in message, message
    assert (
        "--total_batch_size keeps each step the same" in message and not (tmp_path / "o").exists()
    )
    message = main_error(
        *PRETRAIN,
        "--batch_size",
        1,
        "--data_dir",
        shakespeare,
        "--out_dir",
        tmp_path / "o",
        "--device",
        "cpu",
    )
    assert "the model does not fit" in message and "--activation_checkpointing 1" in message, (
        message
    )


# -----------------------------------------------------------------------------
# The README's commands, benchmarks and MFU


def readme_commands(heading):
    """The python command lines of the first bash block under a README heading, joined
    across backslash continuations."""
    section = (HERE / "README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [
        line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("python ")
    ]


def test_readme_quick_start_fine_tune_and_eval_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's commands, in a fresh folder, with the shared files in place of the
    downloads, a small random GPT-2 in place of OpenAI's, and fewer steps."""
    import shlex

    hf = tmp_path / "tiny_gpt2"
    make_hf_gpt2(hf, n_positions=1024)
    files = {
        "input.txt": needs_shared("tinyshakespeare.txt"),
        "alpaca_data.json": needs_shared("alpaca_data_sample.json"),
        "hellaswag_val.jsonl": needs_shared("hellaswag_val.jsonl"),
    }
    fewer = {
        "pretrain": [
            "--max_steps",
            "1",
            "--eval_interval",
            "1",
            "--val_steps",
            "1",
            "--eval_samples",
            "1",
            "--total_batch_size",
            "2048",
        ],
        "finetune": [
            "--max_steps",
            "1",
            "--eval_interval",
            "1",
            "--val_steps",
            "1",
            "--batch_size",
            "4",
            "--total_batch_size",
            "4",
            "--eval_samples",
            "1",
        ],
        "eval": ["--val_steps", "1", "--batch_size", "2", "--hellaswag_limit", "4"],
        "sample": ["--max_new_tokens", "4"],
        "chat": ["--max_new_tokens", "4"],
    }
    monkeypatch.chdir(tmp_path)
    ran = []
    for heading in (
        "Quick start on a laptop: tiny Shakespeare",
        "Fine-tune and chat",
        "Evaluate and plot",
    ):
        for line in readme_commands(heading):
            args = [str(files.get(a, a)) for a in shlex.split(line)[2:]]
            if line.startswith("python prepare_data.py"):
                if "--files" not in args:
                    continue  # the Hub, which this machine cannot reach: the same code as --files
                pdata.main(args)
            else:
                if "--mode pretrain" in line and "--data_dir" not in line or "out/pretrain" in line:
                    continue  # FineWeb-Edu's defaults, and plotting that run: a GPU's work
                args = [str(hf) if a == "gpt2" else a for a in args] + (
                    ["--device", "cpu"] if "plot" not in args else []
                )
                args += fewer.get(args[args.index("--mode") + 1], [])
                monkeypatch.setattr("sys.stdin", io.StringIO("Name a fruit.\n/quit\n"))
                tg.main(args)
            ran.append(line.split()[1] + " " + " ".join(a for a in args if a.startswith("--mode")))
    assert len(ran) == 10, ran
    assert (tmp_path / "out" / "shakespeare" / "plot.png").exists() and (
        tmp_path / "data" / "alpaca" / "meta.json"
    ).exists()
    assert json.loads((tmp_path / "out" / "eval" / "eval.json").read_text())["hellaswag_items"] == 4


def test_mfu_peak_matches_the_exact_gpu_model():
    peaks = {
        "NVIDIA H100 80GB HBM3": 989,
        "NVIDIA H100 PCIe": 756,
        "NVIDIA H100 NVL": 835,
        "NVIDIA H200": 989,
        "NVIDIA A100-SXM4-80GB": 312,
        "NVIDIA A100 80GB PCIe": 312,
        "NVIDIA A100-PCIE-40GB": 312,
        "NVIDIA L4": 121,
        "NVIDIA L40S": 362,
        "NVIDIA L40": 181,
        "NVIDIA A10G": 70,
        "NVIDIA A10": 125,
        "NVIDIA GeForce RTX 4090": 165,
        "NVIDIA GeForce RTX 3090": 71,
        "NVIDIA B200": 2250,
        "NVIDIA GB200": 2500,
        "NVIDIA B300 SXM6 AC": 2250,
        # a MIG slice: its share of the GPU's 7 compute slices
        "NVIDIA H100 80GB HBM3 MIG 3g.40gb": 989 * 3 / 7,
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb": 312 / 7,
        # not in the table: None, no MFU rather than a wrong one
        "NVIDIA GeForce RTX 3090 Ti": None,
        "NVIDIA GeForce RTX 4090 D": None,
        "Tesla V100-SXM2-16GB": None,
        "NVIDIA RTX A6000": None,
        "NVIDIA L20": None,
        "NVIDIA A40": None,
        "": None,
    }
    found = {}
    for name in peaks:  # as torch.cuda names the GPU
        with mock.patch.object(torch.cuda, "get_device_name", lambda device, name=name: name):
            found[name] = tg.peak_flops("cuda:0") and tg.peak_flops("cuda:0") / 1e12
    assert found == pytest.approx(peaks)
    assert tg.peak_flops("cpu") is None


def test_bench_mode_prints_throughput_in_the_dtype_asked(capsys, monkeypatch):
    """--dtype reaches the timed step's autocast: float32 measures float32, bfloat16 bfloat16."""
    seen = []
    monkeypatch.setattr(
        tg,
        "autocast",
        lambda device, dtype: (
            seen.append(dtype) or torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        ),
    )
    for dtype in ("float32", "bfloat16"):
        tg.main(
            list(
                map(
                    str,
                    [
                        "--mode",
                        "bench",
                        "--n_layer",
                        2,
                        "--n_head",
                        2,
                        "--n_embd",
                        32,
                        "--block_size",
                        32,
                        "--batch_size",
                        2,
                        "--bench_steps",
                        3,
                        "--bench_warmup",
                        1,
                        "--device",
                        "cpu",
                        "--compile",
                        0,
                        "--dtype",
                        dtype,
                    ],
                )
            )
        )
        out = capsys.readouterr().out
        assert "median step" in out and "tokens/s" in out
        assert f"torch.{dtype}" in out and set(seen) == {getattr(torch, dtype)}, (dtype, seen)
        seen.clear()


import dev.compare as compare  # noqa: E402


def test_compare_train_against_build_nanogpt(capsys):
    """dev/compare.py: the training-step comparison the README quotes runs and reports."""
    compare.main(
        list(
            map(
                str,
                [
                    "train",
                    "--device",
                    "cpu",
                    "--n_layer",
                    2,
                    "--n_head",
                    2,
                    "--n_embd",
                    32,
                    "--block_size",
                    32,
                    "--batch_size",
                    2,
                    "--rounds",
                    3,
                ],
            )
        )
    )
    out = capsys.readouterr().out
    ours = next(line for line in out.splitlines() if line.startswith("ours "))
    assert "tokens/s" in ours and "peak memory +" in ours and "build-nanogpt" in out
    assert "x build-nanogpt's speed" in out


def test_compare_tokenize_against_a_pool(tmp_path, capsys):
    """dev/compare.py tokenize, which the README quotes: both ways count the same tokens."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc * 20}) + "\n" for doc in DOCS[:4]))
    compare.main(["tokenize", "--files", str(corpus), "--num_proc", "1"])
    out = capsys.readouterr().out
    counts = re.findall(r"^(?:prepare_data.py|Pool.imap chunksize=16) +([\d,]+) tokens", out, re.M)
    assert len(counts) == 2 and counts[0] == counts[1] != "0", out
    assert "ratio (ours / Pool.imap)" in out


# -----------------------------------------------------------------------------
# FSDP and activation checkpointing


def torchrun(n, *args, out_dir, stop_after=None):
    """train_gpt2.py on n ranks (gloo, CPU); with stop_after, SIGTERM once rank 0 logs that step.
    torchrun passes the signal on to the ranks, which save at the next step and exit."""
    proc = subprocess.Popen(
        TORCHRUN
        + [
            f"--nproc_per_node={n}",
            str(HERE / "train_gpt2.py"),
            *map(str, args),
            "--out_dir",
            str(out_dir),
        ],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in proc.stdout:  # blocking reads: no sleeps
        output.append(line)
        if stop_after and line.startswith(f"step {stop_after:5d}/"):
            proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    assert stop_after or code == 0, "".join(output)  # torchrun itself exits non-zero when signalled
    return "".join(output)


@needs_fsdp_torch
def test_fsdp_equals_one_process_and_resumes_on_one_process_and_ddp(shakespeare, tmp_path):
    """FSDP (with activation checkpointing) on 2 ranks against one process, over steps with
    gradient accumulation (2 micro-steps per rank) and clipping (grad_clip 0.1 < every norm).
    Stopped by SIGTERM, its checkpoint resumes under FSDP on one process (without torchrun) and
    under DDP. Tolerances: losses rel 1e-5 (observed < 1e-7: FSDP sums
    the same numbers in another order). Gradient norms rel 1e-3: a float32 norm over 1.6M
    numbers sums in another order over shards, which moves it by ~1e-5 of itself (both are
    ~2e-5 from the float64 norm), and the clip carries that into the weights."""
    args = [
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        *TINY,
        "--grad_clip",
        0.1,
        "--max_steps",
        8,
        "--eval_interval",
        4,
        "--val_steps",
        3,
        "--ckpt_interval",
        1000,
    ]  # 3 val batches: 2 ranks get 2 and 1
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "one")
    fsdp = tmp_path / "fsdp"
    torchrun(2, *args, "--fsdp", 1, "--activation_checkpointing", 1, out_dir=fsdp, stop_after=2)
    checkpoint = torch.load(fsdp / "ckpt.pt", weights_only=True)
    stopped_at = checkpoint["step"]
    assert 2 <= stopped_at < 8 and checkpoint["args"]["fsdp"] == 1
    # the same file as a single process writes: full weights under plain names, AdamW by name
    assert (
        checkpoint["model"].keys()
        == tg.GPT(tg.GPTConfig(**checkpoint["config"])).state_dict().keys()
    )
    assert checkpoint["model"]["lm_head.weight"] is checkpoint["model"]["transformer.wte.weight"]
    assert "transformer.wte.weight" in checkpoint["optimizer"]["state"]
    shutil.copytree(fsdp, tmp_path / "ddp")
    # under FSDP on one process, started without torchrun (a new process: it opens a process group)
    run_script(
        "train_gpt2.py",
        *args,
        "--fsdp",
        1,
        "--init_from",
        "resume",
        "--out_dir",
        fsdp,
        new_process=True,
    )
    torchrun(2, *args, "--fsdp", 0, "--init_from", "resume", out_dir=tmp_path / "ddp")

    one = read_log(tmp_path / "one")
    assert len(one) == 10 and all(
        e["grad_norm"] > 0.1 for e in one if "grad_norm" in e
    )  # 8 steps, 2 evaluations
    for run in (fsdp, tmp_path / "ddp"):
        log = [
            e for e in read_log(run) if not ("val_loss" in e and e["step"] == stopped_at)
        ]  # logged twice
        assert [e["step"] for e in log] == [e["step"] for e in one], run
        for a, b in zip(one, log):
            for key, rel in (("loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-3)):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=rel), (run.name, key, a, b)


def bytes_held(model, optimizer):
    """Bytes of parameters, gradients and AdamW state this process stores (FSDP: its shards alone)."""
    from torch.distributed.tensor import DTensor

    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    ]
    storages = {}  # tied weights and views share storage: counted once
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def two_steps(model, wrap=None):
    """AdamW's state and the gradients of a second step, on a 2 x 32 model (sharded first by wrap)."""
    (wrap or (lambda m: m))(model)
    optimizer = tg.configure_optimizer(model, 0.1, 6e-4)
    x = random_ids(2, 33)
    for step in range(2):
        gradients(model, [(x[:, :-1], x[:, 1:])])
        optimizer.step() if step == 0 else None
    return bytes_held(model, optimizer)


@needs_fsdp_torch
@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp_rank_holds_its_share_of_the_bytes(ranks, tmp_path):
    """Parameters, gradients and AdamW state stored by each rank under FSDP (the DTensors' local shards),
    against one process's: a share of 1 / ranks each."""
    script = (
        tmp_path / "shards.py"
    )  # run by torchrun: wrap_blocks shards over the group, each rank reports
    script.write_text(f"""import argparse, os, sys
sys.path.insert(0, {str(HERE)!r})
import torch, test_gpt2 as t
torch.distributed.init_process_group("gloo")
torch.manual_seed(0)
model = t.tg.GPT(t.tg.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, padded_vocab_size=50304))
held = t.two_steps(model, lambda m: t.tg.wrap_blocks(m, torch.float32, argparse.Namespace(fsdp=1, activation_checkpointing=0, compile=0)))
sys.stdout.write(f"rank {{torch.distributed.get_rank()}} holds {{held}}\\n")  # one write: the ranks share the pipe
sys.stdout.flush()
torch.distributed.destroy_process_group()
os._exit(0)  # as train_gpt2.py's command line: no interpreter shutdown for gloo's threads to abort
""")
    proc = subprocess.run(
        TORCHRUN + [f"--nproc_per_node={ranks}", str(script)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    held = [int(n) for n in re.findall(r"rank \d+ holds (\d+)\n", proc.stdout)]
    torch.manual_seed(0)
    model = tg.GPT(
        tg.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, padded_vocab_size=50304)
    )
    one = two_steps(model)  # 16 bytes per parameter: weight, gradient, 2 Adam moments
    assert one == pytest.approx(16 * sum(p.numel() for p in model.parameters()), rel=1e-3)
    assert len(held) == ranks and all(h == pytest.approx(one / ranks, rel=0.01) for h in held), (
        held,
        one,
    )


def test_activation_checkpointing_same_gradients_fewer_saved_bytes():
    """The same loss and gradients, bit for bit (the forward runs again exactly), and far
    fewer bytes saved for the backward pass: a block keeps only its input."""
    import copy

    torch.manual_seed(0)
    # a small vocabulary, so that the blocks' activations, not the logits, dominate
    plain = tg.GPT(
        tg.GPTConfig(
            block_size=64, vocab_size=128, padded_vocab_size=128, n_layer=4, n_head=2, n_embd=64
        )
    )

    checkpointed = tg.wrap_blocks(
        copy.deepcopy(plain),
        torch.float32,
        argparse.Namespace(fsdp=0, activation_checkpointing=1, compile=0),
    )
    assert (
        checkpointed.state_dict().keys() == plain.state_dict().keys()
    )  # the wrapper leaves no trace in names
    x, y = random_ids(4, 64, vocab=128), random_ids(4, 64, seed=1, vocab=128)

    def run(model):
        saved = []  # bytes of every tensor autograd keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            _, loss = model(x, y)
        loss.backward()
        return sum(saved), loss.item(), [p.grad for p in model.parameters()]

    saved_plain, loss_plain, grads_plain = run(plain)
    saved_ckpt, loss_ckpt, grads_ckpt = run(checkpointed)
    assert loss_ckpt == loss_plain
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_ckpt))
    assert saved_ckpt < 0.25 * saved_plain, (saved_ckpt, saved_plain)


# -----------------------------------------------------------------------------
# Instruction fine-tuning

INSTRUCTIONS = [
    {"instruction": "What color is the sky?", "input": "", "output": "The sky is blue."},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple, crisp and red."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {
        "instruction": "Who wrote Hamlet?",
        "input": "",
        "output": "William Shakespeare wrote Hamlet.",
    },
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend!"},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "What is the opposite of hot?", "input": "", "output": "Cold."},
]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    (folder / "records.json").write_text(json.dumps(INSTRUCTIONS))
    run_script(
        "prepare_data.py",
        "--sft",
        "--files",
        folder / "records.json",
        "--out_dir",
        folder / "data",
        "--val_fraction",
        0.125,
        "--block_size",
        128,
    )
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
    tokens, mask, offsets = (
        np.load(data / f"train_{n}.npy") for n in ("tokens", "mask", "offsets")
    )
    pairs = []
    for i in range(len(offsets) - 1):
        t, m = tokens[offsets[i] : offsets[i + 1]], mask[offsets[i] : offsets[i + 1]].astype(bool)
        prompt, answer = enc.decode(t[~m].tolist()), enc.decode(t[m][:-1].tolist())
        pairs.append(
            next(
                (r["instruction"], answer)
                for r in INSTRUCTIONS
                if r["output"] == answer and r["instruction"] in prompt
            )
        )
    return pairs


def test_loss_counts_answer_tokens_only_and_ignores_padding(sft_data):
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    loader = tg.InstructionLoader(sft_data, "train", 3, 128)
    x, y = loader.batch([0, 1, 2])
    with torch.no_grad():
        _, loss = model(x, y)
        # by hand, from the files: every example alone, unpadded, cross-entropy at its answers only
        files = {
            name: np.load(sft_data / f"train_{name}.npy") for name in ("tokens", "mask", "offsets")
        }
        total, count = 0.0, 0
        for i in range(3):
            start, end = files["offsets"][i], files["offsets"][i + 1]
            tokens = torch.tensor(files["tokens"][start:end].astype(np.int64))
            answer = torch.tensor(files["mask"][start + 1 : end].astype(bool))
            logits, _ = model(tokens[None, :-1])
            log_probs = logits[0].log_softmax(-1)[torch.arange(len(tokens) - 1), tokens[1:]]
            total -= log_probs[answer].sum().item()
            count += int(answer.sum())
        assert count == int((y != -100).sum())
        assert loss.item() == pytest.approx(total / count, rel=1e-5)
        for width in (60, 80):  # padded further: same loss
            x_wide = torch.full((3, width), tg.EOT_TOKEN)
            y_wide = torch.full((3, width), -100)
            x_wide[:, : x.size(1)], y_wide[:, : y.size(1)] = x, y
            assert model(x_wide, y_wide)[1].item() == pytest.approx(loss.item(), rel=1e-5)


FINETUNE = [
    "--mode",
    "finetune",
    "--batch_size",
    7,
    "--total_batch_size",
    7,
    "--max_lr",
    3e-3,
    "--warmup_steps",
    5,
    "--eval_interval",
    20,
    "--val_steps",
    2,
    "--eval_samples",
    0,
    "--device",
    "cpu",
]


def test_finetuned_model_answers_and_stops(sft_data, base_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    run_script(
        "train_gpt2.py",
        *FINETUNE,
        "--init_from",
        base_model,
        "--data_dir",
        sft_data,
        "--out_dir",
        out,
        "--max_steps",
        40,
    )
    losses = [loss for _, loss in train_losses(out)]
    assert losses[-1] < 0.1 * losses[0]  # memorized the handful of answers
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert (
        checkpoint["prompt_template"] == pdata.ALPACA_PROMPT
    )  # the checkpoint remembers its template
    no_input = [r["instruction"] for r in INSTRUCTIONS if not r["input"]]
    (instruction, answer), (chat_instruction, chat_answer) = [
        p for p in train_examples(sft_data) if p[0] in no_input
    ][:2]
    # --mode sample wraps the prompt in the template and stops at <|endoftext|>
    proc = run_script(
        "train_gpt2.py",
        "--mode",
        "sample",
        "--init_from",
        out / "ckpt.pt",
        "--prompt",
        instruction,
        "--temperature",
        0,
        "--max_new_tokens",
        40,
        "--device",
        "cpu",
    )
    assert proc.stdout == f"{instruction}\n{answer}\n"
    # and chat does the same, one instruction at a time, until /quit

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{chat_instruction}\n/quit\n"))
    capsys.readouterr()
    tg.main(
        [
            "--mode",
            "chat",
            "--init_from",
            str(out / "ckpt.pt"),
            "--temperature",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert f"> {chat_answer}\n> " in capsys.readouterr().out


def test_sample_applies_the_template_only_to_finetuned_checkpoints(base_model, tmp_path):
    model, _ = tg.load_model(str(base_model))
    enc = tg.get_tokenizer()
    prompt = "Name a fruit."
    for template in (None, pdata.ALPACA_PROMPT):
        path = tmp_path / f"{template is None}.pt"
        torch.save(
            {
                "model": model.state_dict(),
                "config": tg.asdict(model.config),
                "prompt_template": template,
            },
            path,
        )
        tokens = enc.encode(template.format(instruction=prompt) if template else prompt)
        new = model.generate(torch.tensor([tokens]), max_new_tokens=10, temperature=0)[
            0, len(tokens) :
        ].tolist()
        new = new[: new.index(tg.EOT_TOKEN)] if tg.EOT_TOKEN in new else new
        proc = run_script(
            "train_gpt2.py",
            "--mode",
            "sample",
            "--init_from",
            path,
            "--prompt",
            prompt,
            "--temperature",
            0,
            "--max_new_tokens",
            10,
            "--device",
            "cpu",
        )
        assert proc.stdout == (f"{prompt}\n" if template else prompt) + enc.decode(new) + "\n"
    assert "not fine-tuned" in main_error("--mode", "chat", "--init_from", tmp_path / "True.pt")


def test_finetune_resume_equals_uninterrupted(sft_data, base_model, tmp_path):
    args = [
        *FINETUNE,
        "--init_from",
        base_model,
        "--data_dir",
        sft_data,
        "--max_steps",
        16,
        "--ckpt_interval",
        1000,
        "--batch_size",
        2,
        "--total_batch_size",
        4,
        "--eval_interval",
        8,
        "--block_size",
        100,
    ]  # 100 < the model's 128
    run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "straight")
    stopped_at = interrupt_and_resume(args, tmp_path / "cut", signal_at_step=4)
    assert 4 <= stopped_at < 16
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["model"][
        "transformer.wpe.weight"
    ].shape == (100, 64)
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "straight")
    # Started without --block_size, resumed with the model's own 128: the same run, not a change.
    plain = [*args[:-2], "--max_steps", 2, "--out_dir", tmp_path / "plain"]
    run_script("train_gpt2.py", *plain)
    resume = ["--init_from", "resume", "--max_steps", 3, "--block_size", 128]
    run_script("train_gpt2.py", *plain, *resume)
    assert [step for step, loss in train_losses(tmp_path / "plain")] == [1, 2, 3]


def read_until(proc, text, timeout=120):
    """What the process has printed up to and including text (blocking reads, no sleeps)."""
    import select

    out, deadline = b"", time.time() + timeout
    while text.encode() not in out:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.time()))
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        assert chunk, f"no {text!r} in time; got {out[-300:]!r}"
        out += chunk
    return out.decode(errors="replace")


def test_ctrl_c_in_sample_and_chat(base_model, tmp_path):
    """Ctrl-C as a terminal sends it, to the whole process group: sample ends with one line;
    chat drops the answer in progress and asks for the next instruction."""
    model, _ = tg.load_model(str(base_model))
    chat_model = tmp_path / "chat.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "config": tg.asdict(model.config),
            "prompt_template": pdata.ALPACA_PROMPT,
        },
        chat_model,
    )
    endless = [
        "--max_new_tokens",
        100_000,
        "--temperature",
        0,
        "--device",
        "cpu",
    ]  # slides past 128 positions: long
    for mode, checkpoint in (("sample", base_model), ("chat", chat_model)):
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "train_gpt2.py"),
                "--mode",
                mode,
                "--init_from",
                str(checkpoint),
                *(["--prompt", "Once"] if mode == "sample" else []),
                *map(str, endless),
            ],
            cwd=HERE,
            start_new_session=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            if mode == "chat":
                read_until(proc, "> ")
                proc.stdin.write(b"Name a fruit.\n")
                proc.stdin.flush()
            read_until(proc, " ")  # generating
            os.killpg(proc.pid, signal.SIGINT)
            if mode == "chat":
                seen = read_until(proc, "[stopped]\n> ")  # back at the prompt, still running
                proc.stdin.write(b"/quit\n")
                proc.stdin.flush()
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        err = err.decode()
        assert "Traceback" not in err, err
        if mode == "sample":
            assert proc.returncode == 130 and err.strip() == "interrupted"
        else:
            assert proc.returncode == 0 and "[stopped]" in seen


def test_finetune_bad_input(sft_data, shakespeare, base_model, tmp_path):
    def finetune(*args):
        return main_error(*FINETUNE, "--init_from", base_model, "--out_dir", tmp_path / "o", *args)

    assert "--sft" in finetune(
        "--data_dir", shakespeare
    )  # pretraining shards are not instruction data
    assert "not found" in finetune("--data_dir", tmp_path / "missing")
    assert "less than one step" in finetune(
        "--data_dir", sft_data, "--total_batch_size", 70, "--batch_size", 7
    )


def test_advice_run_as_written_makes_the_refused_command_work(tmp_path, monkeypatch):
    """An error's advice, run exactly as printed, lets the refused command run: instruction data prepared
    for a longer model (its own command again, with --block_size and --overwrite), and a text file given
    as --data_dir (prepared first, then its folder)."""
    import shlex

    monkeypatch.chdir(tmp_path)
    Path("records.json").write_text(json.dumps(INSTRUCTIONS))  # examples of 39 to 54 tokens
    pdata.main(
        ["--sft", "--files", "records.json", "--out_dir", "data/sft", "--val_fraction", "0.125"]
    )
    os.rename(
        "data/sft", "data/moved"
    )  # the advice redoes the folder refused, wherever it was first made
    model = tg.GPT(tg.GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=32))
    torch.save({"model": model.state_dict(), "config": tg.asdict(model.config)}, "short.pt")
    finetune = [
        "--mode",
        "finetune",
        "--init_from",
        "short.pt",
        "--data_dir",
        "data/moved",
        "--batch_size",
        2,
        "--total_batch_size",
        2,
        "--max_steps",
        1,
        "--eval_samples",
        0,
        "--device",
        "cpu",
    ]
    message = main_error(*finetune)
    assert (
        "examples of 54 tokens" in message
        and "--block_size 48 --out_dir data/moved --overwrite" in message
    )
    pdata.main(shlex.split(re.search(r"python prepare_data\.py.*", message)[0])[2:])
    assert not os.path.exists("data/sft")
    run_script("train_gpt2.py", *finetune)
    assert torch.load("out/finetune/ckpt.pt", weights_only=True)["step"] == 1

    Path("input.txt").write_text(" ".join(DOCS) * 100)
    message = main_error("--mode", "pretrain", *TINY, "--data_dir", "input.txt", "--max_steps", 1)
    command, folder = re.search(
        r"(python prepare_data\.py [^,]*), then give --data_dir (\S+)$", message
    ).groups()
    pdata.main(shlex.split(command)[2:])
    run_script("train_gpt2.py", "--mode", "pretrain", *TINY, "--data_dir", folder, "--max_steps", 1)
    assert torch.load("out/pretrain/ckpt.pt", weights_only=True)["step"] == 1


# -----------------------------------------------------------------------------
# Evaluation: HellaSwag, --mode eval, --mode plot


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    """The first 12 items of HellaSwag's validation set, prepared by prepare_data.py."""
    folder = tmp_path_factory.mktemp("hellaswag")
    lines = needs_shared("hellaswag_val.jsonl").read_text().splitlines()[:12]
    (folder / "raw.jsonl").write_text("\n".join(lines) + "\n")
    run_script(
        "prepare_data.py",
        "--hellaswag",
        "--files",
        folder / "raw.jsonl",
        "--out_dir",
        folder / "hs",
    )
    return folder / "hs" / "hellaswag_val.jsonl"


def test_hellaswag_scores_match_transformers_and_a_plain_loop(hellaswag_file, tmp_path):
    hf_model = make_hf_gpt2(tmp_path, n_positions=256)
    model = tg.GPT.from_pretrained(str(tmp_path)).eval()
    enc = tg.get_tokenizer()
    items = tg.load_hellaswag(hellaswag_file)
    # each item's 4 endings in one batch, padded to the longest
    scores = [tg.score_item(model, enc, item, torch.float32) for item in items]
    sums = torch.stack([item_sums for item_sums, _ in scores])
    means = torch.stack([item_sums / lengths for item_sums, lengths in scores])
    by_hand = []
    with torch.no_grad():
        for i, item in enumerate(items):
            context = enc.encode(item["ctx"])
            for j, ending in enumerate(item["endings"]):  # one forward pass per ending, no padding
                ending_tokens = enc.encode(" " + ending)
                ids = torch.tensor([context + ending_tokens])
                losses = torch.nn.functional.cross_entropy(
                    hf_model(ids).logits[0, :-1], ids[0, 1:], reduction="none"
                )
                theirs = losses[-len(ending_tokens) :]
                assert sums[i, j].item() == pytest.approx(theirs.sum().item(), abs=1e-3)
                assert means[i, j].item() == pytest.approx(theirs.mean().item(), abs=1e-4)
                ours = torch.nn.functional.cross_entropy(
                    model(ids)[0][0, :-1], ids[0, 1:], reduction="none"
                )
                by_hand.append(ours[-len(ending_tokens) :].mean().item())
    by_hand = torch.tensor(by_hand).view(-1, 4)
    assert means.argmin(1).tolist() == by_hand.argmin(1).tolist()
    result = tg.hellaswag_eval(model, tg.load_hellaswag(hellaswag_file), torch.float32)
    labels = torch.tensor([item["label"] for item in items])
    assert result["hellaswag_acc_norm"] == pytest.approx(
        (by_hand.argmin(1) == labels).double().mean().item()
    )
    assert result["hellaswag_acc"] == pytest.approx(
        (sums.argmin(1) == labels).double().mean().item()
    )


def test_hellaswag_harness_convention_matches_transformers(hellaswag_file, tmp_path):
    # lm-evaluation-harness's clean-up, on an item with the WikiHow half's tags
    tagged = {
        "activity_label": "Home",
        "ctx_a": "Clean the sink. [title] Rinse it.",
        "ctx_b": "then wipe",
        "endings": ["[step] Dry  it.", "Stop.", "Go.", "Sit."],
        "label": 0,
        "ctx": "unused",
    }
    asked = tg.harness_item(tagged)
    assert (
        asked["ctx"] == "Home: Clean the sink.. Rinse it. Then wipe"
        and asked["endings"][0] == " Dry it."
    )
    hf_model = make_hf_gpt2(tmp_path, n_positions=256)
    model = tg.GPT.from_pretrained(str(tmp_path)).eval()
    enc = tg.get_tokenizer()
    items = tg.load_hellaswag(hellaswag_file)
    right = {"acc": 0, "acc_norm": 0}
    with torch.no_grad():  # by hand, with transformers, one ending at a time
        for item in map(tg.harness_item, items):
            sums = []
            for ending in item["endings"]:
                ids = torch.tensor([enc.encode(item["ctx"]) + enc.encode(" " + ending)])
                n = len(enc.encode(" " + ending))
                losses = torch.nn.functional.cross_entropy(
                    hf_model(ids).logits[0, :-1], ids[0, 1:], reduction="none"
                )
                sums.append(losses[-n:].sum().item())
            right["acc"] += int(np.argmin(sums) == item["label"])
            right["acc_norm"] += int(
                np.argmin([s / len(e) for s, e in zip(sums, item["endings"])]) == item["label"]
            )
    both = tg.hellaswag_eval(model, tg.load_hellaswag(hellaswag_file), torch.float32, harness=True)
    assert both["hellaswag_harness_acc"] == right["acc"] / len(items)
    assert both["hellaswag_harness_acc_norm"] == right["acc_norm"] / len(items)
    completion = tg.hellaswag_eval(model, tg.load_hellaswag(hellaswag_file), torch.float32)
    assert "hellaswag_harness_acc" not in completion
    assert completion["hellaswag_items"] == both["hellaswag_items"] == len(items)


def test_eval_mode_with_two_ranks_equals_one(hellaswag_file, shakespeare, base_model, tmp_path):
    args = [
        "--mode",
        "eval",
        "--init_from",
        base_model,
        "--hellaswag_path",
        hellaswag_file,
        "--data_dir",
        shakespeare,
        "--batch_size",
        2,
        "--val_steps",
        5,
        "--device",
        "cpu",
    ]
    proc = run_script("train_gpt2.py", *args, "--out_dir", tmp_path / "one")
    assert "hellaswag_acc_norm" in proc.stdout and "val_loss" in proc.stdout
    assert "HellaSwag on a CPU: the first 200 items, a quick look" in proc.stdout
    subprocess.run(
        TORCHRUN
        + [
            "--nproc_per_node=2",
            str(HERE / "train_gpt2.py"),
            *map(str, args),
            "--out_dir",
            str(tmp_path / "two"),
        ],
        check=True,
        capture_output=True,
        cwd=HERE,
    )
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert one["hellaswag_items"] == two["hellaswag_items"] == 12
    assert (
        one["hellaswag_acc"] == two["hellaswag_acc"]
        and one["hellaswag_acc_norm"] == two["hellaswag_acc_norm"]
    )
    # The same 5 batches, split over 2 ranks.
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert one["val_loss_of"] == "5 batches of 2 x 128"


def test_hellaswag_during_pretraining_and_plot(shakespeare, hellaswag_file, tmp_path):
    run_script(
        "train_gpt2.py",
        "--mode",
        "pretrain",
        "--data_dir",
        shakespeare,
        "--out_dir",
        tmp_path,
        *TINY,
        "--block_size",
        128,
        "--max_steps",
        4,
        "--eval_interval",
        2,
        "--val_steps",
        2,
        "--hellaswag",
        1,
        "--hellaswag_path",
        hellaswag_file,
        "--hellaswag_limit",
        4,
    )
    evals = [e for e in read_log(tmp_path) if "val_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and all(e["hellaswag_items"] == 4 for e in evals)
    run_script("train_gpt2.py", "--mode", "plot", "--out_dir", tmp_path)
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "log.jsonl not found" in main_error("--mode", "plot", "--out_dir", tmp_path / "nothing")


def test_generation_comparison_at_two_batch_sizes(capsys):
    # Only that it runs and reports: whether the tokens agree with transformers is tested
    # independently above (test_greedy_generation_matches_transformers_left_padded), not
    # taken from the comparison's own "same tokens" line.
    compare.main(
        list(
            map(
                str,
                [
                    "generate",
                    "--device",
                    "cpu",
                    "--n_layer",
                    1,
                    "--n_head",
                    2,
                    "--n_embd",
                    32,
                    "--block_size",
                    64,
                    "--max_new_tokens",
                    8,
                    "--rounds",
                    1,
                ],
            )
        )
    )
    out = capsys.readouterr().out
    assert "batch 1" in out and "batch 8" in out and out.count("transformers generate") == 2
    assert out.count("LM head alone") == 4  # a row, and the cap it sets, at each batch size


# -----------------------------------------------------------------------------
# Export to Hugging Face

EXPORT_TEXTS = [
    "Hello world. Hello, I'm a language model,",
    " leading space, trailing space ",
    "Accents: naïve café, déjà vu, Ångström, Straße, İstanbul, ÆØÅ æøå",
    "CJK: 日本語のテキスト、中文字符，한국어 문장",
    "Emoji: 🤖👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "def f(x):\n\treturn {'a': x ** 2}  # code\n\n\nif __name__ == \"__main__\":\n    f(3)\n",
    "whitespace runs:   \t\t  \n\n\n    end    ",
    "numbers 1234567890 3.14159 1,000,000 and contractions: don't, we'll, they're, I'M",
    "<|endoftext|>",
    "one document<|endoftext|>the next <|endoftext|> and <|endoftext a broken marker",
    "control \x00\x01\x7f bytes, a lone surrogate-free mix: Ω≈ç√∫˜µ≤≥÷ ﬁ ﬂ",
]


def export_to(source, out_dir):
    tg.main(["--mode", "export", "--init_from", str(source), "--out_dir", str(out_dir)])
    return out_dir


def randomize(model, seed=0):
    """Weights of a larger scale than the init (LayerNorms and biases included), as make_hf_gpt2:
    every weight must land in the right place, transposed right, for the logits to match."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{case: (our model, the folder exported from it)}: one of our fine-tuned checkpoints with the
    vocabulary padded to 50304, and a Hugging Face folder re-exported (--init_from DIR)."""
    folder = tmp_path_factory.mktemp("export")
    model = randomize(
        tg.GPT(tg.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, padded_vocab_size=50304))
    )
    checkpoint = {
        "model": model.state_dict(),
        "config": tg.asdict(model.config),
        "prompt_template": pdata.ALPACA_PROMPT,
    }
    torch.save(checkpoint, folder / "finetuned.pt")
    make_hf_gpt2(folder / "hf", n_head=4, n_embd=64, n_layer=2, n_positions=64, seed=1)
    return {
        "padded_finetuned_pt": (
            model.eval(),
            export_to(folder / "finetuned.pt", folder / "out_pt"),
        ),
        "hf_folder": (
            tg.GPT.from_pretrained(str(folder / "hf")).eval(),
            export_to(folder / "hf", folder / "out_hf"),
        ),
    }


@pytest.mark.parametrize("case", ["padded_finetuned_pt", "hf_folder"])
def test_export_matches_in_transformers(exports, case):
    from transformers import AutoModelForCausalLM

    ours, out = exports[case]
    hf_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf_model).__name__ == "GPT2LMHeadModel" and hf_model.dtype == torch.float32
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    assert (
        hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()
    )  # tied again
    ids = random_ids(3, 64, seed=2)
    with torch.no_grad():
        diff = (hf_model.eval()(ids).logits - ours(ids)[0]).abs().max().item()
    print(f"{case}: max |logit diff| {diff:.2e} over {ids.numel()} positions x 50257")
    assert diff <= 1e-5
    # Greedy generation, a left-padded batch of prompts of different lengths, token for token.
    prompts, mask = tg.left_pad([random_ids(1, n, seed=n)[0].tolist() for n in (5, 12, 1)])
    theirs = hf_model.generate(
        prompts, attention_mask=mask, do_sample=False, max_new_tokens=40, pad_token_id=tg.EOT_TOKEN
    )
    mine = ours.generate(prompts, mask, max_new_tokens=40, temperature=0)
    print(f"{case}: greedy generation equal over {theirs[:, prompts.size(1) :].numel()} new tokens")
    assert torch.equal(theirs, mine)


@pytest.mark.parametrize("case", ["padded_finetuned_pt", "hf_folder"])
def test_export_reloads_exactly(exports, case):
    ours, out = exports[case]
    reloaded, _ = tg.load_model(str(out))  # what --init_from DIR does
    theirs = reloaded.state_dict()
    for (
        key,
        tensor,
    ) in ours.state_dict().items():  # ours may have padded rows: compare the real ones
        assert torch.equal(tensor[: theirs[key].size(0)], theirs[key]), key
    assert reloaded.config.vocab_size == 50257 and reloaded.config.padded_vocab_size == 50257


def test_re_export_is_identical(exports, tmp_path):
    _, out = exports["padded_finetuned_pt"]
    again = export_to(out, tmp_path / "again")  # --init_from an exported folder
    assert sorted(os.listdir(again)) == sorted(os.listdir(out))
    for name in os.listdir(out):  # the prompt template included: it is read back from config.json
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def tiktoken_cached(url):
    """A file tiktoken downloaded and cached, or None (the name is the sha1 of its URL)."""
    import hashlib

    path = (
        Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))
        / hashlib.sha1(url.encode()).hexdigest()
    )
    return path if path.exists() else None


def test_exported_tokenizer_matches_tiktoken(exports):
    from transformers import AutoTokenizer

    _, out = exports["padded_finetuned_pt"]
    enc = tg.get_tokenizer()
    texts = EXPORT_TEXTS + [needs_shared("tinyshakespeare.txt").read_text()[:20000]]
    tokenizers = {}
    for use_fast in (True, False):  # both where both exist (transformers 5 has one class)
        try:
            tokenizer = AutoTokenizer.from_pretrained(out, use_fast=use_fast)
        except (ValueError, ImportError):
            continue
        tokenizers.setdefault(type(tokenizer).__name__, tokenizer)
    assert tokenizers
    compared = 0
    for name, tokenizer in tokenizers.items():
        assert (
            len(tokenizer) == 50257
            and tokenizer.eos_token_id == tokenizer.bos_token_id == tg.EOT_TOKEN
        )
        for text in texts:
            expected = enc.encode(
                text, allowed_special="all"
            )  # "<|endoftext|>" is the one token 50256
            ids = tokenizer(text)["input_ids"]
            assert ids == expected, (name, text[:40])
            assert tokenizer.decode(ids) == text
            compared += len(ids)
    print(
        f"tokenizers {', '.join(tokenizers)}: {compared} tokens equal to tiktoken's over {len(texts)} texts"
    )
    # The files rebuilt from tiktoken's ranks are OpenAI's own, where tiktoken cached those.
    encoder_json = tiktoken_cached(
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
    )
    vocab_bpe = tiktoken_cached(
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
    )
    if encoder_json and vocab_bpe:
        assert json.loads((out / "vocab.json").read_text()) == json.loads(encoder_json.read_text())
        openai_merges = vocab_bpe.read_text(encoding="utf-8").split("\n")[1:]
        assert (out / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] == openai_merges


def test_finetuned_export_carries_its_chat_template(exports):
    from transformers import AutoConfig, AutoTokenizer

    _, out = exports["padded_finetuned_pt"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tg.get_tokenizer()
    assert AutoConfig.from_pretrained(out).prompt_template == pdata.ALPACA_PROMPT  # the plain field
    for instruction in [
        "Who wrote Hamlet?",
        'Quote "this" and {{ that }} {% raw %} \\n',
        "Übersetze: 猫 🐈\n\nzwei Zeilen",
    ]:
        messages = [{"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == pdata.ALPACA_PROMPT.format(instruction=instruction)
        assert tokenizer(text)["input_ids"] == tg.encode_prompt(
            enc, instruction, pdata.ALPACA_PROMPT
        )  # what --mode sample feeds
        answered = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": "Fine."}], tokenize=False
        )
        assert answered == text + "Fine.<|endoftext|>"  # as a fine-tuning example ends
    # Any str.format template: braces, quotes and backslashes in it stay text, not Jinja.
    template = 'Q {{literal}} "quoted" \\ {{% not a tag %}} ☃:\n{instruction}\nA:'  # formats to "{% not a tag %}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}],
        tokenize=False,
        chat_template=tg.jinja_chat_template(template),
    )
    assert text == template.format(instruction="x")


def test_exported_finetune_answers_as_its_checkpoint(exports, tmp_path, monkeypatch, capsys):
    """--init_from out/hf reads the export back whole: the same greedy answer as the checkpoint it came
    from (its prompt template included), and chat takes it as a fine-tuned model."""

    folder = exports["padded_finetuned_pt"][1]
    answers = {}
    for source in (folder.parent / "finetuned.pt", folder):
        tg.main(
            [
                "--mode",
                "sample",
                "--init_from",
                str(source),
                "--prompt",
                "Name a fruit.",
                "--temperature",
                "0",
                "--max_new_tokens",
                "12",
                "--device",
                "cpu",
            ]
        )
        answers[source.name] = capsys.readouterr().out
        monkeypatch.setattr("sys.stdin", io.StringIO("Name a fruit.\n/quit\n"))
        tg.main(
            [
                "--mode",
                "chat",
                "--init_from",
                str(source),
                "--temperature",
                "0",
                "--max_new_tokens",
                "12",
                "--device",
                "cpu",
            ]
        )
        answers[source.name + " chat"] = capsys.readouterr().out
    assert answers["finetuned.pt"] == answers[folder.name] and answers["finetuned.pt"].startswith(
        "Name a fruit.\n"
    )
    assert answers["finetuned.pt chat"] == answers[folder.name + " chat"]


def test_readme_python_blocks_run_as_printed(exports, base_model, capsys):
    """The README's Python blocks, with local folders for "gpt2" and "out/hf": the export samples
    as --mode chat does, and left-padded generation prints each prompt and its new text only."""
    from transformers import GenerationConfig

    blocks = re.findall(r"```python\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    export = exports["padded_finetuned_pt"][1]
    for block in blocks:
        # The tiny export reads 64 positions, the template's prompt and 16 new tokens.
        block = block.replace('"out/hf"', repr(str(export))).replace("=64", "=16")
        exec(block.replace('"gpt2"', repr(str(base_model.parent))), {})
    chat = tg.parse_args(["--mode", "chat"])
    sampling = GenerationConfig.from_pretrained(export)
    assert sampling.do_sample
    assert (sampling.temperature, sampling.top_k) == (chat.temperature, chat.top_k)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("The capital of France is")
    assert lines[-1].startswith("Once upon a time")
    assert "<|endoftext|>" not in "".join(lines)


def fail_with(error):
    return lambda *args, **kwargs: (_ for _ in ()).throw(error)


def full_disk(monkeypatch, error):
    """What a disk that fills up mid-write looks like on a real full tmpfs (torch 2.13): the writer fails in its
    own words, and the disk has no space left."""
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0)
    )
    return fail_with(error)


def file_size_limit(monkeypatch, error):
    """What a limit on a file's size (ulimit -f, or FAT32 past 4 GiB) looks like: the writer fails in its
    own words, the disk has room, and the limit is finite."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (2**20, resource.RLIM_INFINITY))
    return fail_with(error)


def export_filled_by_another(monkeypatch, out_dir):
    """A second export into the same new folder that finishes first, while this one writes its weights."""
    from transformers import GPT2LMHeadModel

    save = GPT2LMHeadModel.save_pretrained

    def save_and_be_overtaken(self, folder, **kwargs):
        save(self, folder, **kwargs)
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", save_and_be_overtaken)


EXPORT = lambda t, train: ["--mode", "export", "--init_from", t / "model.pt", "--out_dir", t / "hf"]  # noqa: E731
FAULTS = {  # name: (set up the fault (monkeypatch, tmp folder), the command (tmp folder, a run's flags), words of its line)
    "export onto a disk that fills up": (
        lambda mp, t: mp.setattr(
            "transformers.GPT2LMHeadModel.save_pretrained",
            full_disk(
                mp,
                __import__("safetensors").SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                ),
            ),
        ),
        EXPORT,
        ["hf: No space left", "free some"],
    ),
    "export past a limit on a file's size": (
        lambda mp, t: mp.setattr(
            "transformers.GPT2LMHeadModel.save_pretrained",
            file_size_limit(
                mp,
                __import__("safetensors").SafetensorError(
                    "Error while serializing: File too large"
                ),
            ),
        ),
        EXPORT,
        ["hf: File too large", "ulimit -f"],
    ),
    "export under a read-only folder": (
        lambda mp, t: mp.setattr(
            "transformers.GPT2LMHeadModel.save_pretrained",
            fail_with(OSError(30, "Read-only file system", str(t / "hf.partial"))),
        ),
        EXPORT,
        ["Read-only file system", "another folder"],
    ),
    "two exports into one new folder": (
        lambda mp, t: export_filled_by_another(mp, t / "hf"),
        EXPORT,
        ["another command filled it meanwhile"],
    ),
    "a checkpoint onto a disk that fills up": (
        lambda mp, t: mp.setattr(
            torch,
            "save",
            full_disk(
                mp,
                RuntimeError(
                    "[enforce fail at inline_container.cc:672] . unexpected pos 6560960 vs 6560852"
                ),
            ),
        ),
        lambda t, train: [*train, "--init_from", "resume", "--max_steps", 4],
        ["ckpt.pt: No space left"],
    ),
    "a checkpoint past a limit on a file's size": (
        lambda mp, t: mp.setattr(
            torch,
            "save",
            file_size_limit(
                mp,
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
            ),
        ),
        lambda t, train: [*train, "--init_from", "resume", "--max_steps", 4],
        ["ckpt.pt: File too large", "ulimit -f"],
    ),
    "eval.json onto a full disk": (
        lambda mp, t: mp.setattr(os, "fsync", fail_with(OSError(28, "No space left on device"))),
        lambda t, train: [
            "--mode",
            "eval",
            "--init_from",
            t / "run",
            "--data_dir",
            train[train.index("--data_dir") + 1],
            "--hellaswag",
            0,
            "--out_dir",
            t / "run",
        ],
        ["run: No space left"],
    ),
    "a plot under a read-only folder": (
        lambda mp, t: mp.setattr(
            "matplotlib.figure.Figure.savefig",
            fail_with(OSError(30, "Read-only file system", str(t / "run" / "plot.png"))),
        ),
        lambda t, train: ["--mode", "plot", "--out_dir", t / "run"],
        ["plot.png: Read-only"],
    ),
}


@pytest.mark.parametrize("case", FAULTS)
def test_a_full_or_read_only_disk_is_one_line_and_loses_nothing(
    case, shakespeare, tmp_path, monkeypatch
):
    """Each fault (simulated as the libraries report it on a real full or read-only tmpfs) ends the command with one
    line, leaves what was there as it was (a checkpoint written before: byte for byte, and it still resumes), and
    no .tmp or .partial behind."""
    model = tg.GPT(tg.GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8))
    torch.save(
        {"model": model.state_dict(), "config": tg.asdict(model.config)}, tmp_path / "model.pt"
    )
    train = [
        *PRETRAIN,
        "--eval_interval",
        100,
        "--out_dir",
        tmp_path / "run",
        "--data_dir",
        shakespeare,
        "--device",
        "cpu",
    ]
    run_script("train_gpt2.py", *train, "--max_steps", 2)  # a checkpoint at step 2
    before = snapshot(tmp_path)
    setup, command, words = FAULTS[case]
    setup(monkeypatch, tmp_path)
    message = main_error(*command(tmp_path, train))
    for word in words:
        assert word in message, message
    monkeypatch.undo()
    after = snapshot(tmp_path)
    if "two exports" in case:  # the other export's folder, as it made it
        assert after.pop("hf") == "dir" and after.pop("hf/config.json")
    if "checkpoint" in case:  # the resumed run logged steps 3 and 4 before it failed to save them
        before.pop("run/log.jsonl"), after.pop("run/log.jsonl")
    assert after == before
    run_script("train_gpt2.py", *train, "--init_from", "resume", "--max_steps", 4)
    assert [e["step"] for e in read_log(tmp_path / "run") if "loss" in e] == [1, 2, 3, 4]


def test_export_bad_input(tmp_path, monkeypatch):
    source = tmp_path / "model.pt"
    ours = tg.GPT(tg.GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8))
    torch.save({"model": ours.state_dict(), "config": tg.asdict(ours.config)}, source)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("a user's file")
    (taken / "config.json").write_text("{}")

    before = snapshot(taken)
    message = main_error("--mode", "export", "--init_from", source, "--out_dir", taken)
    assert "not an empty folder" in message and "--out_dir" in message
    assert snapshot(taken) == before
    assert "not an empty folder" in main_error(
        "--mode", "export", "--init_from", source, "--out_dir", taken / "notes.txt"
    )
    assert "--init_from" in main_error("--mode", "export", "--out_dir", tmp_path / "new")
    assert "--out_dir" in main_error("--mode", "export", "--init_from", source)
    assert "not found" in main_error(
        "--mode", "export", "--init_from", tmp_path / "missing.pt", "--out_dir", tmp_path / "new"
    )
    # A failure half-way leaves nothing behind: no folder, no partial sibling.
    monkeypatch.setattr(
        "tiktoken.load.read_file_cached",
        lambda url: (_ for _ in ()).throw(OSError("disk full, say")),
    )
    with pytest.raises(OSError, match="disk full"):  # not a user's mistake: it keeps its traceback
        tg.main(
            ["--mode", "export", "--init_from", str(source), "--out_dir", str(tmp_path / "new")]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "taken"]
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()  # an empty folder is fine to fill
    export_to(source, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()
