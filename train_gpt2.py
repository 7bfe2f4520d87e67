"""
GPT-2 in one file: the model, OpenAI's weights, generation, pretraining (DDP or FSDP),
instruction fine-tuning, evaluation (validation loss, HellaSwag), export to Hugging Face,
benchmarks and plots. It reads top to bottom in the order the data flows: the model, then
generation, loading, data, the pieces of a training step, evaluation, the training loop,
and the modes that use them; every function is defined before its first caller.

Sample from OpenAI's GPT-2 (downloads the weights through Hugging Face once):
    python train_gpt2.py --mode sample --init_from gpt2 --prompt "Hello, I'm a language model,"

Pretrain GPT-2 124M on FineWeb-Edu 10B (first: python prepare_data.py):
    one GPU, a Mac or a CPU:  python train_gpt2.py --mode pretrain
    8 GPUs on one node:       torchrun --standalone --nproc_per_node=8 train_gpt2.py --mode pretrain
    GPT-2 XL on 8 small GPUs: torchrun --standalone --nproc_per_node=8 train_gpt2.py --mode pretrain \
                                  --model gpt2-xl --batch_size 8 --fsdp 1 --activation_checkpointing 1
    2 nodes of 8 GPUs:        on each node, with --node_rank=0 on the first and 1 on the second:
        torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=IP_OF_NODE_0 --master_port=29500 \
            train_gpt2.py --mode pretrain
    a tiny model on a laptop: python train_gpt2.py --mode pretrain --data_dir data/shakespeare \
                                  --n_layer 4 --n_head 4 --n_embd 128 --block_size 256 --batch_size 8 --total_batch_size 4096

Fine-tune on Alpaca, then talk to it (first: python prepare_data.py --sft):
    python train_gpt2.py --mode finetune --init_from gpt2 --data_dir data/alpaca
    python train_gpt2.py --mode chat --init_from out/finetune/ckpt.pt

Evaluate (first: python prepare_data.py --hellaswag), plot, hand the model to transformers:
    python train_gpt2.py --mode eval --init_from gpt2 --data_dir data/fineweb_edu_10B
    python train_gpt2.py --mode plot --out_dir out/pretrain
    python train_gpt2.py --mode export --init_from out/finetune --out_dir out/hf

Measure a GPU: python train_gpt2.py --mode bench [--bench_anchor 1 | --bench_generate 1]

Every flag: python train_gpt2.py --help
"""

import argparse
import builtins
import codecs
import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


# -----------------------------------------------------------------------------
# The model


EOT_TOKEN = 50256  # <|endoftext|>: separates documents, ends an answer, stops generation


class UserError(ValueError):
    """A mistake the user can fix (a flag, a path, a file): the command line prints it as one
    line. Anything else that goes wrong is a bug and keeps its traceback."""


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can read (learned positions)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary: the token ids the model reads and writes
    # Rows of the embedding / LM head. 50304 = 128 * 393 makes the biggest matmul of the model
    # tile evenly on a GPU; the extra rows are never read or predicted (see GPT.lm_logits).
    padded_vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) is below vocab_size ({self.vocab_size})")


# The four sizes OpenAI released, by their Hugging Face names.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# OpenAI's checkpoints (and transformers' GPT2LMHeadModel) store these four as Conv1D, i.e.
# (in, out); nn.Linear keeps (out, in). Reading and exporting transpose them.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of a generation KVCache is ours
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1  # adds into the residual stream: see GPT._init_weights

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:  # generating: the positions fed earlier are keys too
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        # Without a mask, is_causal lets PyTorch pick the flash kernel. It aligns its triangle
        # top-left, which is right only when the keys start where the queries do (training,
        # or a cache's first step) or for one query, which sees every key; for anything else
        # KVCache.extend builds the mask (see the Generation section).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream itself is never normalised."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (as GPT-2): the same matrix reads tokens in and scores them out.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "RESIDUAL_SCALE_INIT"):
                # Each block adds twice into the residual stream; scale so its variance
                # stays put with depth (GPT-2 paper, section 2.3).
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, pos, attn_mask=None, kv_cache=None):
        """The transformer without its final LayerNorm: token ids (B, T) at positions pos, (T,)
        or (B, T), -> (B, T, C). forward, generation and scoring each finish it their own way."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        return x

    def lm_logits(self, x):
        """The LM head: final hidden states (..., C) -> logits (..., padded_vocab_size), with
        -inf on the padded columns, so that softmax gives them exactly 0: they are never
        predicted and never change a loss."""
        logits = self.lm_head(x)  # all padded_vocab_size rows: the fast shape
        if self.config.padded_vocab_size > self.config.vocab_size:
            # Written in place, and hidden from autograd. The gradient that reaches a padded
            # column is softmax - one-hot = 0 - 0, exactly 0 whatever autograd believes the
            # fill did, so passing it through unchanged is exact. The other ways each cost a
            # full extra pass over the (B, T, 50304) logits in eager mode: a -inf bias (addmm
            # first copies the bias into every row), cutting the columns off (a copy forward
            # and backward), an autograd-visible fill (it copies the gradient to zero 47
            # columns). Compiled, the fill fuses into the softmax that reads the logits.
            with torch.no_grad():
                logits[..., self.config.vocab_size:] = float("-inf")
        return logits

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids; targets: (B, T) next-token ids, -100 where no loss is wanted.
        Returns (B, T, vocab_size) logits and the mean loss over the counted targets (or None).
        Whole sequences, as training reads them; generation, with its KV cache and left
        padding, calls hidden_states from its own section below."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.ln_f(self.hidden_states(idx, torch.arange(T, device=idx.device)))  # (B, T, C)
        logits = self.lm_logits(x)  # (B, T, padded_vocab_size), -inf on the padded columns
        loss = None
        if targets is not None:
            # (B * T, padded_vocab_size) is a view of the contiguous logits: no copy
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1), ignore_index=-100)
        return logits[..., :self.config.vocab_size], loss  # a view: (B, T, vocab_size)

    @classmethod
    def from_pretrained(cls, name_or_path, padded_vocab_size=None):
        """OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", from the Hugging
        Face hub) or a local directory with a Hugging Face GPT-2 checkpoint. Pass
        padded_vocab_size=50304 to train it further at full speed."""
        if name_or_path not in PRESETS and not os.path.isdir(name_or_path):
            raise UserError(f"unknown model {name_or_path!r}: use one of {', '.join(PRESETS)}, "
                            "or a directory holding a Hugging Face GPT-2 checkpoint")
        try:
            from transformers import AutoConfig, GPT2LMHeadModel  # only needed here, so imported here
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise UserError("reading Hugging Face GPT-2 weights needs transformers: pip install transformers") from None
        hf_logging.set_verbosity_error()  # we report missing or mismatched weights ourselves
        hf_logging.disable_progress_bar()
        try:
            hf = AutoConfig.from_pretrained(name_or_path)
            if hf.model_type == "gpt2":
                hf_model, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        except (OSError, ValueError) as e:  # transformers' own words for a missing or broken folder
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load {name_or_path!r} as a GPT-2 checkpoint: {first_line}") from None
        if hf.model_type != "gpt2":
            raise UserError(f"{name_or_path!r} is a {hf.model_type} checkpoint, not a GPT-2 checkpoint")
        for problem in ("missing_keys", "mismatched_keys"):
            if info[problem]:
                raise UserError(f"checkpoint {name_or_path!r} is broken: {problem.replace('_', ' ')}: "
                                f"{', '.join(sorted(map(str, info[problem])))}")
        # Every field of GPT2Config that changes the computation is either what this model
        # computes or refused by name: loading it anyway would silently give another model.
        implemented = {
            "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both the tanh approximation
            "layer_norm_epsilon": (1e-5,),
            "scale_attn_weights": (True,),  # scores divided by sqrt(head size)
            "scale_attn_by_inverse_layer_idx": (False,),
            "reorder_and_upcast_attn": (False,),
            "tie_word_embeddings": (True,),
            "n_inner": (None, 4 * hf.n_embd),  # the MLP's width; None means 4 x n_embd
            "add_cross_attention": (False,),
        }
        for field, supported in implemented.items():
            value = getattr(hf, field, supported[0])
            if value not in supported:
                raise UserError(f"checkpoint {name_or_path!r} sets {field}={value!r}, which this GPT-2 does not "
                                f"implement (it computes {field}={supported[0]!r})")
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd,
                           padded_vocab_size=max(padded_vocab_size or 0, hf.vocab_size))
        model = cls(config)
        ours, theirs = model.state_dict(), hf_model.state_dict()
        with torch.no_grad():
            for key, param in ours.items():
                if key not in theirs:
                    raise UserError(f"checkpoint {name_or_path!r} has no weight {key!r}")
                src = theirs[key].t() if key.endswith(CONV1D_WEIGHTS) else theirs[key]
                if key in ("transformer.wte.weight", "lm_head.weight"):
                    param[src.size(0):].normal_(0.0, 0.02)  # padded rows: never used, just tidy
                    param = param[:src.size(0)]
                if src.shape != param.shape:
                    raise UserError(f"checkpoint {name_or_path!r}: weight {key!r} has shape "
                                    f"{tuple(src.shape)}, expected {tuple(param.shape)}")
                param.copy_(src)
        return model

    # Generation has its own section below (KV cache, left padding, sampling); these two give
    # it transformers' calling convention: model.generate(input_ids, attention_mask, ...).
    def generate(self, *args, **kwargs):
        return generate_tokens(self, *args, **kwargs)

    def stream(self, *args, **kwargs):
        return stream_tokens(self, *args, **kwargs)


# -----------------------------------------------------------------------------
# Generation: the KV cache, left padding, sampling
#
# Training reads whole sequences, so GPT.forward needs no positions or masks but the causal
# one. Generation feeds a prompt and then one token at a time, and the rows of a batch may
# be left-padded to one length. The cache keeps the keys and values of what was fed, and from
# its own length and padding works out each new position and the attention mask it needs;
# forward_cached drives the model's pieces with them.


class KVCache:
    """Keys and values of the positions fed so far, for every layer, so that generating one
    more token costs one position's work instead of the whole sequence's; and which of those
    positions hold real tokens and which left padding, which fixes positions and masks."""

    def __init__(self, config, batch_size, capacity, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, capacity, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (n_layer, B, nh, capacity, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.real = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)  # False: padding
        self.padded = False  # no padding yet: positions and masks are the simple ones
        self.length = 0  # positions fed so far

    def extend(self, T, real=None):
        """Take T more positions; real (B, T) is 0 where they are padding (None: all real).
        Returns their positions, (T,) or (B, T), and the attention mask the layers need:
        None (see CausalSelfAttention), or (B or 1, 1, T, past + T), True where a query may look."""
        past, end = self.length, self.length + T
        if end > self.k.size(3):
            raise ValueError(f"the KV cache holds {self.k.size(3)} positions, {end} asked")
        self.length = end
        device = self.k.device
        if real is not None and not bool(real.all()):
            self.real[:, past:end] = real.bool()
            self.padded = True
        if not self.padded:
            pos = torch.arange(past, end, device=device)  # (T,)
            if past == 0 or T == 1:
                return pos, None
            # T > 1 tokens after past cached ones (a prompt fed in pieces): query i sees keys
            # 0 .. past + i, a triangle aligned bottom-right, which is_causal would get wrong.
            return pos, (torch.arange(end, device=device) <= pos[:, None])[None, None]  # (1, 1, T, past + T)
        # A row's positions count its real tokens only, so a padded row computes exactly
        # what it computes alone.
        pos = (self.real[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        key_pos = torch.arange(end, device=device)  # (past + T,)
        query_pos = torch.arange(past, end, device=device)[:, None]  # (T, 1)
        # A query sees earlier real tokens, and always itself: a padding query with nothing
        # to see would make softmax return NaN, which then leaks everywhere.
        visible = self.real[:, None, None, :end] | (key_pos == query_pos)  # (B, 1, T, past + T)
        return pos, (key_pos <= query_pos) & visible

    def update(self, layer, k, v):
        """Store one layer's (B, nh, T, hs) keys and values of the new positions; return all so far."""
        start = self.length - k.size(2)  # extend has already counted the T new positions
        self.k[layer, :, :, start:self.length] = k
        self.v[layer, :, :, start:self.length] = v
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]  # (B, nh, past + T, hs)


def forward_cached(model, idx, cache, real=None):
    """Feed idx (B, T) after what the cache holds (real: as in KVCache.extend); return the
    (B, vocab_size) logits of the last position, the only ones generation needs."""
    pos, attn_mask = cache.extend(idx.size(1), real)
    x = model.hidden_states(idx, pos, attn_mask, cache)  # (B, T, C)
    x = model.transformer.ln_f(x[:, -1, :])  # (B, C): the last position only
    # (padded_vocab, C) @ (C, B): the same product as x @ W.T, in the layout CPU BLAS runs
    # ~2.5x faster for a few rows (measured at batch 8). The padded rows are cut off here.
    logits = model.lm_head.weight @ x.t()  # (padded_vocab_size, B)
    return logits.t()[:, :model.config.vocab_size]  # (B, vocab_size)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from (B, vocab) logits: temperature 0 is greedy, top_k keeps the
    k likeliest tokens, top_p the smallest set whose probability reaches p (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the likelier ones before it already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_tokens(model, input_ids, attention_mask=None, max_new_tokens=64, temperature=1.0,
                  top_k=None, top_p=None, eos_token_id=EOT_TOKEN, generator=None):
    """Yields the next token of every row, (B,), as soon as it is chosen (see generate_tokens).
    The prompt is left-padded where rows differ in length, with attention_mask 0 there."""
    B, T = input_ids.size()
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token")
    window = model.config.block_size
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = attention_mask[:, -window:] if padded else None  # (B, T) at most window wide
    ids = input_ids[:, -window:]  # a prompt longer than the model can read: keep its end
    device, dtype = input_ids.device, model.lm_head.weight.dtype
    cache = KVCache(model.config, B, min(window, ids.size(1) + max_new_tokens), device, dtype)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if step == 0:
            logits = forward_cached(model, ids, cache, mask)
        elif ids.size(1) <= window:  # the usual step: one new position, the rest is cached
            logits = forward_cached(model, ids[:, -1:], cache)
        else:
            # Past block_size the window slides. Positions are baked into the cached keys,
            # so the cache cannot shift with it: recompute the window, as without a cache.
            if padded:  # the tokens generated since the mask was last cut are all real
                mask = torch.cat([mask, mask.new_ones(B, ids.size(1) - mask.size(1))], dim=1)[:, -window:]
            ids = ids[:, -window:]
            cache = KVCache(model.config, B, window, device, dtype)
            logits = forward_cached(model, ids, cache, mask)
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            next_token = torch.where(finished, eos_token_id, next_token)
            finished |= next_token == eos_token_id
        yield next_token
        if eos_token_id is not None and bool(finished.all()):
            return
        ids = torch.cat([ids, next_token[:, None]], dim=1)  # (B, T + 1); the cache remembers the padding


@torch.no_grad()
def generate_tokens(model, input_ids, attention_mask=None, max_new_tokens=64, temperature=1.0,
                    top_k=None, top_p=None, eos_token_id=EOT_TOKEN, generator=None):
    """The prompt followed by up to max_new_tokens new tokens, (B, T + new), like
    transformers' generate; a row that stopped early is padded with eos_token_id."""
    new_tokens = list(stream_tokens(model, input_ids, attention_mask, max_new_tokens, temperature,
                                    top_k, top_p, eos_token_id, generator))
    return torch.cat([input_ids] + [t[:, None] for t in new_tokens], dim=1)


def left_pad(token_lists, pad_id=EOT_TOKEN):
    """(B, T) ids and attention mask, the rows aligned on the right so that every row's
    next token is generated at the same column."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return ids, mask


# -----------------------------------------------------------------------------
# Devices, the tokenizer, and loading a model to use


def pick_device(requested="auto"):
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def enable_tf32():
    """float32 matmuls (what autocast leaves in float32) on tensor cores: ~8x faster, 10-bit mantissa."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def pick_dtype(device, requested="auto"):
    """The dtype the matmuls run in (the weights stay float32). bfloat16 where the GPU has it
    (A100, H100, RTX 30xx and later); float16 on older GPUs (T4, V100: free notebooks), whose
    narrow range needs a gradient scaler; float32 on CPUs and Macs, where half types are
    rarely faster. A bfloat16 run on a CPU is still allowed: the tests use it."""
    device_type = device.split(":")[0]
    if requested == "auto":
        if device_type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if requested == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16: use --dtype float16 (or auto)")
    return getattr(torch, requested)


def autocast(device, dtype=None):
    """Mixed precision: matmuls in dtype (default: pick_dtype's), the rest in float32."""
    dtype = dtype or pick_dtype(device)
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


def get_tokenizer():
    import tiktoken  # imported late so the model above can be copied without it
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads GPT-2's files once; offline that fails deep in requests
        raise UserError(f"tiktoken could not load GPT-2's BPE files ({type(e).__name__}): it downloads them once; "
                        "offline, set TIKTOKEN_CACHE_DIR to a folder holding them") from None


def encode_prompts(enc, prompts, template=None):
    """Token ids of each prompt, wrapped in the fine-tuning template when there is one.
    <|endoftext|> is allowed, so '--prompt "<|endoftext|>"' samples unconditionally."""
    token_lists = []
    for prompt in prompts:
        text = template.format(instruction=prompt) if template else prompt
        token_lists.append(enc.encode(text, allowed_special={"<|endoftext|>"}))
    return token_lists


def until_eot(tokens):
    """Generated tokens up to (not including) the first <|endoftext|>."""
    return tokens[:tokens.index(EOT_TOKEN)] if EOT_TOKEN in tokens else tokens


def load_checkpoint(path, resuming=False):
    """A checkpoint written by this file, checked to be one before anything trusts its keys."""
    try:
        # weights_only: a checkpoint is data, and loading it must not run code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, or pickled code: all unreadable to us
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated or "
                        "not a PyTorch file; pick another checkpoint") from None
    needed = ("model", "config") + (("optimizer", "step", "loader", "rng", "args") if resuming else ())
    missing = [key for key in needed if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        found = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{path} is not a {'resumable ' if resuming else ''}checkpoint of train_gpt2.py: it has no "
                        f"{', '.join(missing)} (found: {found[:200]})")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # another model's config or weights
        raise UserError(f"{path} does not hold this file's GPT-2: {str(e).strip().splitlines()[0][:200]}") from None
    return model


def load_model(init_from, padded_vocab_size=None):
    """A model from a checkpoint of ours (a .pt file, or a run folder holding ckpt.pt) or
    from Hugging Face GPT-2 weights, with the checkpoint's dict (None for Hugging Face)."""
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        init_from = os.path.join(init_from, "ckpt.pt")  # a run folder: its checkpoint
    if os.path.isfile(init_from):
        checkpoint = load_checkpoint(init_from)
        return model_from_checkpoint(checkpoint, init_from), checkpoint
    if init_from.endswith(".pt"):
        raise UserError(f"checkpoint {init_from} not found")
    if init_from not in PRESETS and not os.path.isdir(init_from):
        raise UserError(f"unknown model {init_from!r}: use one of {', '.join(PRESETS)}, a checkpoint .pt of ours, "
                        "a run folder holding ckpt.pt, or a folder holding a Hugging Face GPT-2 checkpoint")
    return GPT.from_pretrained(init_from, padded_vocab_size), None


# -----------------------------------------------------------------------------
# Data: pretraining shards and instruction examples
#
# Both loaders hand out one optimizer step at a time: a list of grad_accum micro-batches
# for this rank. Step s always covers the same sequences, however they are split over
# micro-steps and ranks, so a run gives the same result on 1 GPU or 8 for the same total
# batch, and the position to resume from is a step count, not a per-rank detail.


REPREPARE = "re-run prepare_data.py for this folder (prepare_data.py --verify names the broken file)"


def read_meta(data_dir, kind=None):
    """The folder's meta.json, checked to be of this kind ('pretrain' or 'sft') if given."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} not found: make it with prepare_data.py"
                        + (" --sft" if kind == "sft" else ""))
    if not os.path.exists(path):
        raise UserError(f"{data_dir} has no meta.json: it is not prepared, or its preparation was "
                        "interrupted; run prepare_data.py for it (the same command resumes an interrupted one)")
    try:
        with open(path) as f:
            meta = json.load(f)
        splits = meta["splits"]
        for split in ("val", "train"):
            if meta["kind"] == "pretrain":
                int(splits[split]["tokens"]), list(splits[split]["shards"])
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not ours
        raise UserError(f"{path} is not a meta.json written by prepare_data.py ({type(e).__name__}: {e}): "
                        f"{REPREPARE}") from None
    if kind is not None and meta["kind"] != kind:
        want = "pretraining shards (prepare_data.py)" if kind == "pretrain" else "instruction data (prepare_data.py --sft)"
        raise UserError(f"{data_dir} holds {meta['kind']} data, but this mode reads {want}")
    return meta


def load_npy(path, dtype, length=None):
    """A memory-mapped array: the OS pages in what is read, never the whole file. Its header
    and length are checked against what meta.json says, which costs nothing."""
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: {REPREPARE}")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:  # a header numpy cannot read, or fewer bytes than it promises
        raise UserError(f"{path} is not a whole .npy file ({e}): {REPREPARE}") from None
    if array.dtype != dtype or array.ndim != 1:
        raise UserError(f"{path} holds {array.dtype} of shape {array.shape}, expected 1-D {np.dtype(dtype)}: {REPREPARE}")
    if length is not None and len(array) != length:
        raise UserError(f"{path} holds {len(array):,} tokens but meta.json says {length:,}: {REPREPARE}")
    return array


class PretrainLoader:
    """(B, T) windows from uint16 token shards. An epoch reads the train shards, in an order
    shuffled from the seed, as one stream: a window that runs off the end of a shard
    continues in the next one, so no token is skipped. The val split is read in order."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337):
        meta = read_meta(data_dir, "pretrain")
        names = meta["splits"][split]["shards"]
        if not names:
            raise UserError(f"{data_dir} has no {split} shards: re-run prepare_data.py for it")
        # prepare_data.py records each shard's length; older folders only the split's total
        lengths = meta["splits"][split].get("shard_tokens", [None] * len(names))
        self.names = [os.path.join(data_dir, name) for name in names]
        # memory-mapped: opening every shard reads only its header
        self.shards = [load_npy(path, np.uint16, n) for path, n in zip(self.names, lengths)]
        self.split, self.B, self.T, self.rank, self.world_size, self.seed = split, batch_size, block_size, rank, world_size, seed
        self.total_tokens = sum(len(s) for s in self.shards)
        if self.total_tokens != meta["splits"][split]["tokens"]:
            raise UserError(f"the {split} shards of {data_dir} hold {self.total_tokens:,} tokens but meta.json says "
                            f"{meta['splits'][split]['tokens']:,}: {REPREPARE}")
        if split == "val" and self.total_tokens - 1 < self.B * self.T:  # found now, not at the first evaluation
            raise UserError(f"the val split of {data_dir} ({self.total_tokens:,} tokens) is shorter than one batch of "
                            f"{self.B} x {self.T}: lower --batch_size or --block_size, or prepare more val tokens")
        self.epoch, self.position = 0, 0  # where the next step starts in the epoch's stream
        self._set_epoch(0)

    def _set_epoch(self, epoch):
        order = np.arange(len(self.shards))  # val: in file order, so every evaluation reads the same tokens
        if self.split == "train":  # a fixed order makes the loss rise and fall with each epoch
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        self.order = [self.shards[i] for i in order]
        self.order_names = [self.names[i] for i in order]
        self.starts = np.cumsum([0] + [len(s) for s in self.order])  # where each shard begins in the stream
        self.epoch = epoch

    def read(self, start, n):
        """n tokens of the stream from start on, as int64, across shard boundaries."""
        out = np.empty(n, dtype=np.int64)  # int64 (long): what cross_entropy's targets must be
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1  # the shard whose span holds start
        while filled < n:
            offset = start + filled - self.starts[shard]  # where the stream position falls inside that shard
            piece = self.order[shard][offset:offset + n - filled]
            if len(piece) and piece.max() >= 50257:  # the embedding would fail with a device-side assert
                raise UserError(f"{self.order_names[shard]} holds token id {int(piece.max())} near position "
                                f"{offset:,}, outside GPT-2's 50,257: {REPREPARE}")
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1  # what is still missing comes from the next shard
        return out

    def window(self, start):
        # + 1: the last input's target is one token further
        tokens = torch.from_numpy(self.read(start, self.B * self.T + 1))
        return tokens[:-1].view(self.B, self.T), tokens[1:].view(self.B, self.T)  # inputs, next-token targets

    def next_step(self, grad_accum):
        # every rank's micro-batches of one step, end to end
        tokens_per_step = grad_accum * self.world_size * self.B * self.T
        if self.position + tokens_per_step + 1 > self.total_tokens:  # the epoch is used up
            self._set_epoch(self.epoch + 1)
            self.position = 0
        # micro-step m of rank r reads the (m * world_size + r)-th block of B sequences
        batches = [self.window(self.position + (m * self.world_size + self.rank) * self.B * self.T)
                   for m in range(grad_accum)]
        self.position += tokens_per_step  # the same on every rank: each reads only its own blocks of the span
        return batches

    def eval_batches(self, max_batches):
        """This rank's share of the first max_batches batches of the split."""
        n = min(max_batches, (self.total_tokens - 1) // (self.B * self.T))  # at least 1: checked in __init__
        for i in range(self.rank, n, self.world_size):  # round-robin: rank r takes batches r, r + W, r + 2W, ...
            yield self.window(i * self.B * self.T)

    def state_dict(self):
        # the shard order follows from (seed, epoch): two numbers restore the stream
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self._set_epoch(state["epoch"])  # rebuilds that epoch's shard order from the seed
        self.position = state["position"]


class InstructionLoader:
    """Batches of instruction examples (prepare_data.py --sft), each padded to its longest
    example. Labels are -100 on the prompt and on padding, so the loss counts answer tokens
    (and the closing <|endoftext|>) only. A step's examples are sorted by length before
    they are cut into micro-batches: less padding, and the same step."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337, group_by_length=True):
        self.meta = read_meta(data_dir, "sft")
        path = lambda name: os.path.join(data_dir, f"{split}_{name}.npy")  # noqa: E731
        self.tokens = load_npy(path("tokens"), np.uint16)  # every example's tokens, end to end
        # per token: 1 where it is a target (the answer and its <|endoftext|>)
        self.mask = load_npy(path("mask"), np.uint8)
        self.offsets = load_npy(path("offsets"), np.int64)  # example i is tokens[offsets[i]:offsets[i + 1]]
        self.n = len(self.offsets) - 1  # examples: offsets has one entry more, the end of the last
        if self.n < 1:
            raise UserError(f"{data_dir} has no {split} examples: re-run prepare_data.py --sft")
        lengths = np.diff(self.offsets)  # tokens per example
        # Instruction data is small (Alpaca: ~10M tokens), so it is checked whole, up front.
        if (self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens) or len(self.mask) != len(self.tokens)
                or (lengths < 2).any() or self.tokens.max() >= 50257):
            raise UserError(f"the {split} files of {data_dir} do not agree with each other (lengths, offsets or "
                            "token ids): re-run prepare_data.py --sft for this folder")
        if lengths.max() > block_size + 1:
            raise UserError(f"{data_dir} has examples of {lengths.max()} tokens, more than the model's block_size "
                            f"{block_size} + 1: re-run prepare_data.py --sft --block_size {block_size}")
        self.split, self.B, self.rank, self.world_size, self.seed = split, batch_size, rank, world_size, seed
        self.group_by_length = group_by_length
        self.lengths = lengths
        self.epoch, self.step_in_epoch = 0, 0  # the resume point: an epoch's order follows from (seed, epoch)

    def batch(self, indices):
        """(B, L) inputs and labels for these examples, L the longest of them minus one."""
        width = max(int(self.lengths[i]) for i in indices) - 1
        # right padding: a causal model's real positions never see it
        x = torch.full((len(indices), width), EOT_TOKEN, dtype=torch.long)
        # -100: cross_entropy's ignore_index, so padding adds no loss
        y = torch.full((len(indices), width), -100, dtype=torch.long)
        for row, i in enumerate(indices):
            start, end = self.offsets[i], self.offsets[i + 1]
            tokens = torch.from_numpy(self.tokens[start:end].astype(np.int64))
            mask = torch.from_numpy(self.mask[start + 1:end].astype(bool))  # does token t+1 count as a target?
            x[row, :end - start - 1] = tokens[:-1]  # inputs: every token but the last
            # targets: shifted by one, the prompt's set to -100
            y[row, :end - start - 1] = tokens[1:].masked_fill(~mask, -100)
        return x, y

    def steps_per_epoch(self, grad_accum):
        # floor: an epoch's last few examples sit out; the next epoch's shuffle differs
        return self.n // (grad_accum * self.world_size * self.B)

    def next_step(self, grad_accum):
        per_step = grad_accum * self.world_size * self.B  # examples per optimizer step, over all ranks
        if self.step_in_epoch >= self.steps_per_epoch(grad_accum):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        # remade from (seed, epoch) each step: a resume needs only the two counters
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        # this step's examples, the same on every rank
        step = order[self.step_in_epoch * per_step:(self.step_in_epoch + 1) * per_step]
        if self.group_by_length:
            # stable: equal lengths keep their shuffled order
            step = step[np.argsort(self.lengths[step], kind="stable")]
        self.step_in_epoch += 1
        # micro-step m of rank r takes the (m * world_size + r)-th run of B examples, as PretrainLoader does
        return [self.batch(step[(m * self.world_size + self.rank) * self.B:][:self.B]) for m in range(grad_accum)]

    def eval_batches(self, max_batches):
        # ceil: the last batch may be short, and every val example counts
        n = min(max_batches, math.ceil(self.n / self.B))
        for i in range(self.rank, n, self.world_size):
            # in file order: the same val loss every time
            yield self.batch(range(i * self.B, min((i + 1) * self.B, self.n)))

    def state_dict(self):
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state):
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]


# -----------------------------------------------------------------------------
# Training pieces: LR schedule, optimizer, distributed setup, one step, checkpoints, MFU


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step + 1: the first step trains at a small LR, not at 0
    if step >= max_steps:
        return min_lr  # past max_steps the cosine would climb back up
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizer(model, weight_decay, learning_rate, fused=True):
    """AdamW with weight decay on the matrices (matmuls and embeddings) only: decaying
    biases and LayerNorm gains toward zero only hurts. fused: one kernel pass over all the
    parameters instead of several per tensor: on CUDA as on a CPU (an 8x faster step there,
    ~100 -> ~12 ms for 16M parameters; build-nanogpt fuses on CUDA only)."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields the tied wte / lm_head once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if hasattr(model, "set_requires_gradient_sync") and params[0].device.type == "cpu":
        # FSDP's sharded parameters on a CPU (gloo: the tests, a laptop) keep the per-tensor
        # kernels: with the fused one, 2 runs of 39 aborted as the process exited, a teardown
        # race inside torch (none of 114 without it). On CUDA, fused AdamW is FSDP2's usual one.
        fused = False
    # betas and eps as GPT-3 was trained (build-nanogpt's too): beta2 0.95 rather than 0.999 lets the
    # second-moment estimate follow a sudden change of gradient scale within ~20 steps, not ~1000
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def setup_distributed(requested_device):
    """(rank, local_rank, world_size, device). Under torchrun, joins the process group:
    NCCL between GPUs, gloo between CPU processes."""
    if "RANK" not in os.environ:  # not under torchrun: one process, no process group
        return 0, 0, 1, pick_device(requested_device)
    import torch.distributed as dist
    # set by torchrun: rank over all nodes, local_rank on this node (which GPU), world_size processes in all
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available() and requested_device in ("auto", "cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)  # before NCCL starts: otherwise every rank opens its communicator on GPU 0
        dist.init_process_group(backend="nccl", device_id=torch.device(device))  # device_id: bound to this GPU now
    else:
        device = "cpu"
        dist.init_process_group(backend="gloo")  # NCCL is GPU-only; CPU runs (tests, a laptop) use gloo
    return rank, local_rank, world_size, device


def shard_and_checkpoint(model, dtype, fsdp, activation_checkpointing, compile_blocks):
    """In place, in torchtitan's order: each block wrapped for activation checkpointing, then
    compiled, then sharded (FSDP2); then the root, which owns what is left (embeddings, ln_f,
    and lm_head, whose weight is wte's: one Parameter, so it is sharded once). The module
    keeps its class, methods and parameter names; the wrapper's prefix is dropped from its
    state dict, by the wrapper itself and by torch.distributed.checkpoint's helpers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # The --dtype of autocast: FSDP2 all-gathers the weights already cast to bf16 (half the
    # traffic), keeps the float32 shards as master weights for AdamW, and reduce-scatters the
    # gradients in float32, which an average over many ranks needs.
    mp_policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.transformer.h):
        if activation_checkpointing:
            # The block keeps only its input for the backward pass and runs its forward again
            # there: saved activations drop from ~34 x (B, T, C) per block to 2 (bf16).
            block = checkpoint_wrapper(block)  # non-reentrant torch.utils.checkpoint
            model.transformer.h[i] = block
        if fsdp:
            if compile_blocks:
                block.compile()  # per block (the whole model is compiled without FSDP): same code for all
            # Each block is one all-gather in the forward and one reduce-scatter in the backward;
            # the root's reshard is skipped, as its weights are needed again at once in the backward.
            fully_shard(block, mp_policy=mp_policy)
    if fsdp:
        import warnings
        # forward returns logits[..., :vocab_size], a view; nothing writes into it in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        fully_shard(model, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def bytes_held(model, optimizer):
    """Bytes of parameters, gradients and optimizer state stored by this process. Under FSDP
    the tensors are DTensors and this rank stores only its shard (to_local), which is the point."""
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())
    tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {}  # tied weights and views share storage: count it once
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def all_reduce_sum(values, world_size):
    """Sum a list of floats over all ranks (a no-op on one process)."""
    if world_size == 1:
        return values
    import torch.distributed as dist
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL takes GPU tensors only; gloo runs on the CPU here
    t = torch.tensor(values, dtype=torch.float64, device=device)  # float64: token counts past 2**24 stay exact
    dist.all_reduce(t)  # SUM by default; every rank gets the total
    return t.tolist()


def forward_backward(model, micro_batches, device, world_size, grad_clip, stop_requested=False,
                     dtype=None, scaler=None, optimizer=None):
    """The gradients of one optimizer step over this rank's micro-batches, clipped to a global
    norm of grad_clip (0: not clipped). Returns (loss, grad norm, stop?) with the loss averaged
    over every target token of the step, on all ranks. With float16, scaler (a GradScaler of
    optimizer) scales the loss up so small gradients do not underflow, and back down before
    the norm is taken."""
    # The loss of the step is the mean over all its target tokens. Micro-batches (and, in
    # fine-tuning, ranks) hold different numbers of them, so each micro-batch's mean loss is
    # weighted by its share of the step's targets. DDP averages gradients over ranks, hence
    # the factor world_size.
    counts = [int((y != -100).sum()) for _, y in micro_batches]  # target tokens per micro-batch; -100 is not a target
    # one collective for two things: the step's targets over all ranks, and whether any rank was asked to stop
    # (all ranks must stop at the same step, or the others hang in their next all-reduce)
    total, stop = all_reduce_sum([float(sum(counts)), float(stop_requested)], world_size)
    loss_sum = 0.0
    is_ddp = hasattr(model, "no_sync")  # DDP's wrapper; FSDP2 and a plain module have no no_sync
    is_fsdp = hasattr(model, "set_requires_gradient_sync")  # FSDP2 (fully_shard)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # Gradients are all-reduced on the last micro-step only. DDP decides at forward
        # time whether this backward syncs, so the choice is made before the forward.
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if is_ddp and not last else contextlib.nullcontext()
        if is_fsdp:
            # The same for FSDP: gradients accumulate unsharded (memory: a full copy), and
            # are reduce-scattered once. FSDP also averages over ranks, as DDP does.
            model.set_requires_gradient_sync(last)
        with sync:
            with autocast(device, dtype):
                loss = model(x, y)[1]  # the logits are not kept: one logits-sized buffer less in backward
            weight = counts[i] / total * world_size  # this micro-batch's share of the step's targets
            (scaler.scale(loss * weight) if scaler else loss * weight).backward()  # gradients add up over micro-steps
        loss_sum += loss.detach().float() * counts[i]  # a tensor: no .item(), so no GPU sync per micro-step
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, for their norm and the clipping
    # max_norm inf measures the norm without clipping (0 means "off", as in nanoGPT)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    # each rank's share of the mean; they sum to it
    (step_loss,) = all_reduce_sum([loss_sum.item() / total], world_size)
    return step_loss, grad_norm.item(), stop > 0


def train_step(model, optimizer, micro_batches, device, world_size, grad_clip):
    """forward_backward, then the update if the loss and gradients are finite."""
    loss, grad_norm, _ = forward_backward(model, micro_batches, device, world_size, grad_clip)
    if math.isfinite(loss) and math.isfinite(grad_norm):  # a non-finite update would poison the weights for good
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: the memory is free until the next backward
    return loss, grad_norm


def atomic_write(path, write):
    """write(f) into a temporary file, then rename it to path: a crash or a full disk midway
    never leaves a half-written file under the final name, and never hurts the previous one."""
    tmp = f"{path}.tmp"  # same folder: a rename is atomic only within one filesystem
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the real file
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never a mix
    except OSError as e:  # full disk, read-only folder, quota: the user can fix these
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write {path}: {e.strerror or e}; the previous version, if any, is intact") from None


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


@contextlib.contextmanager
def claim_out_dir(out_dir):
    """Hold out_dir for one run: checked writable, and locked, since two runs writing one
    folder would mix their checkpoints and logs. The lock is on the folder itself, so a
    refused run leaves no file behind, and the kernel drops it when the process dies."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file: choose a folder")
    created = not os.path.exists(out_dir)  # so that a refused or empty run removes only a folder it made
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # can we write here? (leaves no file)
    except OSError as e:
        raise UserError(f"cannot write to --out_dir {out_dir}: {e.strerror or e}") from None
    try:
        import fcntl  # POSIX only: on Windows runs are not locked
        folder = os.open(out_dir, os.O_RDONLY)  # flock needs a descriptor; the folder's own leaves no lock file
    except ImportError:
        folder = None
    try:
        if folder is not None:
            try:
                # LOCK_NB: refuse at once, not wait behind the other run
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"another run is using {out_dir}: wait for it to finish, or choose another --out_dir") from None
        yield  # the run happens here, with the lock held
    finally:
        if folder is not None:
            os.close(folder)  # closing the descriptor releases the lock
        if created:
            with contextlib.suppress(OSError):  # removes the folder only if the run left it empty
                os.rmdir(out_dir)


# Dense bf16 tensor-core peak, TFLOP/s, by GPU model as its name spells it. nanoGPT hard-codes
# the A100's 312 and so reports 104% MFU on an H100. A name must match a model exactly: an
# "L40S" is not an "L4" (3x apart), an "A10G" not an "A10". Other GPUs: --peak_tflops.
PEAK_TFLOPS = {
    "H100 SXM": 989, "H100 PCIe": 756, "H100 NVL": 835, "H200 SXM": 989, "H200 NVL": 835,
    "H800 SXM": 989, "H800 PCIe": 756, "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121,
    "GH200": 989, "A10G": 70, "A10": 125, "RTX 4090": 165, "RTX 3090": 71,
}


def gpu_peak_tflops(name):
    """The PEAK_TFLOPS entry for a name as torch.cuda.get_device_name gives it, e.g. "NVIDIA
    H100 80GB HBM3" (an SXM board), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA
    GeForce RTX 4090"; None for a GPU not in the table."""
    words = [w for w in name.replace("-", " ").split() if w not in ("NVIDIA", "GeForce", "Tesla")]
    if not words:
        return None
    # A data-centre GPU is its first word, the rest memory and board ("A100 SXM4 80GB"); a
    # GeForce is every word ("RTX 4090", but "RTX 4090 D" or "RTX 3090 Ti" are other GPUs).
    model = " ".join(words) if words[0] == "RTX" else words[0]
    if model in ("H100", "H200", "H800"):  # one chip at different power budgets
        upper = [w.upper() for w in words]
        model += " PCIe" if "PCIE" in upper else " NVL" if "NVL" in upper else " SXM"
    return PEAK_TFLOPS.get(model)  # None: no MFU is shown rather than a wrong one


def peak_flops(device, override=None):
    if override:  # --peak_tflops: a GPU not in the table, or one clocked differently
        return override * 1e12
    if not device.startswith("cuda"):  # no peak known for CPUs and Macs: MFU is left out
        return None
    tflops = gpu_peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


def flops_per_token(model):
    """Training FLOPs per token, as in nanoGPT (PaLM appendix B): 6 per parameter (forward
    and backward matmuls), plus attention's 12 * n_layer * n_embd * block_size; position
    embeddings do no matmul."""
    cfg = model.config
    # wte stays in: as lm_head (tied) it is a (C, padded_vocab) matmul in both passes
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


class StopRequested:
    """Ctrl-C or SIGTERM during training: save a checkpoint at the next step, then exit."""

    def __init__(self):
        import signal
        self.requested = False
        # the handlers before ours, put back by restore()
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True  # only a flag: the loop acts on it between steps, where a checkpoint is consistent
        print("\nstopping: a checkpoint will be saved at the next step; Ctrl-C again to quit at once", flush=True)


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------
# Evaluation: validation loss, samples, HellaSwag
#
# Used during training and by --mode eval. Each rank scores its share; the sums are
# all-reduced, so the numbers are those of one process whatever the number of GPUs.


@torch.no_grad()
def evaluate_loss(model, loader, max_batches, device, world_size, dtype=None, progress=False):
    """Mean loss per target token over the first max_batches batches of the loader's split,
    the batches spread over the ranks."""
    from tqdm import tqdm
    loss_sum, count, missing = 0.0, 0, 0
    batches = tqdm(loader.eval_batches(max_batches), desc="val loss", unit="batch", disable=not progress, leave=False)
    if hasattr(model, "set_requires_gradient_sync"):
        # FSDP: each forward gathers the weights from every rank, so all ranks must run as
        # many. Rank 0 has the most (batches are dealt round-robin); the others make up for
        # the one they lack with a forward whose loss is not counted.
        batches = list(batches)
        (all_batches,) = all_reduce_sum([float(len(batches))], world_size)
        missing = math.ceil(all_batches / world_size) - len(batches)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            _, loss = model(x, y)
        n = int((y != -100).sum())  # targets in this batch: fine-tuning batches differ, so weight by it
        loss_sum += loss.float().item() * n  # mean back to a sum: batches of different sizes average right
        count += n
    for _ in range(missing):
        model(torch.zeros((1, 1), dtype=torch.long, device=device))  # output dropped: it only joins the all-gathers
    loss_sum, count = all_reduce_sum([loss_sum, float(count)], world_size)
    return loss_sum / count


def show_samples(model, device, template=None, n=4, max_new_tokens=32, dtype=None):
    """A few lines from the model during training: a glance at what it has learned."""
    enc = get_tokenizer()
    prompt = "Give three tips for staying healthy." if template else "Hello, I'm a language model,"
    ids = torch.tensor([encode_prompts(enc, [prompt], template)[0]] * n, device=device)  # (n, T): one prompt, n samples
    # fixed: one evaluation's samples differ from the last only by the weights
    generator = torch.Generator(device=device).manual_seed(42)
    with autocast(device, dtype):
        out = model.generate(ids, max_new_tokens=max_new_tokens, top_k=50, generator=generator)
    for row in out.tolist():
        print(f"  sample: {prompt if not template else ''}{enc.decode(until_eot(row[ids.size(1):]))!r}")


def load_hellaswag(path, limit=None, convention="completion"):
    """HellaSwag items as prepare_data.py --hellaswag writes them, each checked: a context,
    4 endings and a label in 0..3 (a broken item would be scored silently as a wrong one)."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run prepare_data.py --hellaswag (or pass --hellaswag_path)")
    items = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported like any bad line
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = (isinstance(item["ctx"], str) and isinstance(item["endings"], list) and len(item["endings"]) == 4
                      and all(isinstance(e, str) for e in item["endings"]) and item["label"] in (0, 1, 2, 3))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise UserError(f"{path}, line {number}: not a HellaSwag item (a ctx, 4 endings and a label 0-3): "
                                "re-run prepare_data.py --hellaswag")
            if convention != "completion" and not all(isinstance(item.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b")):
                raise UserError(f"{path}, line {number}: no activity_label, ctx_a and ctx_b, which the harness convention "
                                "asks with: re-run prepare_data.py --hellaswag --overwrite")
            items.append(item)
            if limit and len(items) == limit:
                break
    if not items:
        raise UserError(f"{path} holds no HellaSwag items: re-run prepare_data.py --hellaswag")
    return items


def harness_item(item):
    """The item as lm-evaluation-harness asks it (its hellaswag task): the query is the activity
    label and both halves of the context, the second capitalized, and query and endings are
    cleaned of the bracketed tags of HellaSwag's WikiHow half ("[title]", "[step]")."""
    def clean(text):
        text = text.strip().replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", text).replace("  ", " ")
    query = clean(item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize())
    return {"ctx": query, "endings": [clean(ending) for ending in item["endings"]], "label": item["label"]}


@torch.no_grad()
def score_endings(model, enc, items, device, max_batch_tokens=8192, progress=False):
    """Loss of each of the 4 endings of each item, given its context: (n, 4) summed over the
    ending's tokens and (n, 4) averaged over them. Only the ending's positions count, so the
    LM head (most of a small model's work) and the loss run at those positions alone. The
    candidates are sorted by length and cut into right-padded batches of at most
    max_batch_tokens positions, padding included: memory stays bounded whatever the items,
    and little of the work is padding, which sits after the tokens that count, so a causal
    model's losses for them do not change."""
    T = model.config.block_size
    rows, spans = [], []  # each candidate's tokens, and how many at its end are the ending's
    for item in items:
        context = enc.encode(item["ctx"])
        for ending in item["endings"]:
            ending_tokens = enc.encode(" " + ending)  # the space belongs to the ending's first token
            tokens = (context + ending_tokens)[-T - 1:]  # too long: keep the end
            rows.append(tokens)
            spans.append(min(len(ending_tokens), len(tokens) - 1))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # shortest first: a batch's rows are of similar length
    sums = torch.zeros(len(rows))  # (4n,): each candidate's summed ending loss, in the order of rows
    start = 0
    from tqdm import tqdm
    bar = tqdm(total=len(items), unit="item", desc="HellaSwag", disable=not progress, leave=False,
               bar_format="{desc}: {n:.0f}/{total} items [{elapsed}<{remaining}, {rate_fmt}]")
    while start < len(order):
        # Sorted, so a batch's last row is its widest: grow the batch while it fits.
        end = start + 1
        while end < len(order) and (end + 1 - start) * (len(rows[order[end]]) - 1) <= max_batch_tokens:
            end += 1
        batch = order[start:end]
        width = len(rows[batch[-1]]) - 1  # a row's last token is only a target
        ids = torch.full((len(batch), width), EOT_TOKEN, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: not the ending's
        for r, i in enumerate(batch):
            tokens, n = torch.tensor(rows[i]), len(rows[i]) - 1
            ids[r, :n] = tokens[:-1]  # inputs from the left, padding after them
            targets[r, n - spans[i]:n] = tokens[n - spans[i] + 1:]  # the ending's tokens only
        ids, targets = ids.to(device), targets.to(device)
        counted = targets != -100  # (b, width)
        with autocast(device):
            x = model.hidden_states(ids, torch.arange(width, device=device))  # (b, width, C)
            x = model.transformer.ln_f(x[counted])  # (N, C): the N positions that count, rows one after another
            logits = model.lm_logits(x)  # (N, padded_vocab_size), as in forward
        losses = F.cross_entropy(logits.float(), targets[counted], reduction="none")  # (N,)
        row_of = counted.nonzero()[:, 0]  # (N,): which row of the batch each loss belongs to
        sums[batch] = torch.zeros(len(batch), device=device).index_add_(0, row_of, losses).cpu()
        bar.update(len(batch) / 4)  # 4 candidates an item
        start = end
    bar.close()
    sums = sums.view(-1, 4)  # (n, 4): the 4 endings of an item are consecutive rows
    return sums, sums / torch.tensor(spans, dtype=torch.float).view(-1, 4)  # and per ending token, (n, 4)


def hellaswag_eval(model, items, device, rank=0, world_size=1, convention="completion", progress=False):
    """HellaSwag accuracy; items are split over ranks. Two conventions are quoted:
    completion (GPT-2/GPT-3 papers, build-nanogpt): the context, then " " + ending; acc picks
    the lowest summed loss, acc_norm the lowest loss per token (GPT-2 124M: 0.2859 / 0.2955).
    harness (lm-evaluation-harness): its cleaned query and endings; acc_norm divides the
    summed loss by the ending's length in characters (GPT-2 124M: acc_norm 0.3114). items:
    from load_hellaswag, read once for all the evaluations of a run."""
    mine = items[rank::world_size]  # round-robin over ranks; all_reduce_sum adds the counts back up
    labels = torch.tensor([item["label"] for item in mine], dtype=torch.long)
    enc, results, counts = get_tokenizer(), {}, []
    was_training = model.training
    model.eval()
    for name in ("completion", "harness") if convention == "both" else (convention,):
        asked = [harness_item(item) for item in mine] if name == "harness" else mine
        sums, per_token = score_endings(model, enc, asked, device, progress=progress) if mine else (torch.zeros(0, 4),) * 2
        # (n, 4): each ending's length in characters, the harness's acc_norm divisor
        chars = torch.tensor([[len(e) for e in item["endings"]] for item in asked], dtype=torch.float).view(-1, 4)
        normed = per_token if name == "completion" else sums / chars
        # this rank's correct answers: acc, then acc_norm (the lowest loss is the model's pick)
        counts += [float((sums.argmin(dim=1) == labels).sum()), float((normed.argmin(dim=1) == labels).sum())]
        prefix = "hellaswag" if name == "completion" else "hellaswag_harness"
        # each metric's index into counts, divided by n after the all-reduce
        results.update({f"{prefix}_acc": len(counts) - 2, f"{prefix}_acc_norm": len(counts) - 1})
    model.train(was_training)
    *counts, n = all_reduce_sum(counts + [float(len(mine))], world_size)  # the item count rides in the same collective
    return {**{key: counts[i] / n for key, i in results.items()}, "hellaswag_items": int(n)}


# -----------------------------------------------------------------------------
# Training: pretraining and fine-tuning share one loop
#
# A run is: check everything that can refuse it, build the model, data and optimizer (or
# take them from the checkpoint), then the loop: evaluate now and then, take a step, log it,
# save a checkpoint once the next step has shown its weights sound. Each piece is a small
# function above run_training, which reads as that loop.


def config_from_args(args):
    """A fresh model's size: the --model preset, with any of --n_layer --n_head --n_embd
    --block_size instead. The vocabulary is padded to 50304 for speed."""
    size = {**PRESETS[args.model], **{k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)}}
    if size["n_embd"] % size["n_head"]:
        raise UserError(f"--n_embd {size['n_embd']} is not a multiple of --n_head {size['n_head']}: "
                        "each head takes an equal slice of the width")
    return GPTConfig(block_size=args.block_size or 1024, padded_vocab_size=50304, **size)


def build_model(args, checkpoint):
    """The model to train: from the resumed checkpoint, a checkpoint of ours, OpenAI's
    weights, or fresh (--init_from scratch) in the size the flags give."""
    if checkpoint is not None:  # resumed: the checkpoint's size, not the flags'
        return model_from_checkpoint(checkpoint, os.path.join(args.out_dir, "ckpt.pt"))
    if args.init_from == "scratch":
        return GPT(config_from_args(args))
    model, _ = load_model(args.init_from, padded_vocab_size=50304)  # padded as a fresh model is: the fast LM head
    if args.block_size and args.block_size > model.config.block_size:
        raise UserError(f"--block_size {args.block_size} is longer than the {model.config.block_size} positions "
                        f"{args.init_from} has learned: give at most {model.config.block_size}")
    if args.block_size and args.block_size < model.config.block_size:
        # Train on shorter sequences: keep the first block_size learned positions.
        model.config.block_size = args.block_size
        model.transformer.wpe.weight = nn.Parameter(model.transformer.wpe.weight[:args.block_size].clone())
    return model


def checkpoint_to_resume(args):
    """The checkpoint to resume (None for a new run), after every check that can refuse the
    run: nothing in the folder is touched by a refused run."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.init_from != "resume":
        for name, what in (("ckpt.pt", "a checkpoint"), ("log.jsonl", "the log")):  # never overwrite a run's work
            if os.path.exists(os.path.join(args.out_dir, name)):
                raise UserError(f"{args.out_dir} already holds {what} of an earlier run ({name}): continue it with "
                                "--init_from resume, or choose another --out_dir")
        return None
    if not os.path.exists(path):
        raise UserError(f"nothing to resume: {path} does not exist (start a run with "
                        f"--init_from {'scratch' if args.mode == 'pretrain' else 'gpt2'})")
    # also checks that optimizer, step, loader, rng and args are there
    checkpoint = load_checkpoint(path, resuming=True)
    if checkpoint["args"].get("mode", args.mode) != args.mode:
        raise UserError(f"{path} is a --mode {checkpoint['args']['mode']} run: resume it with --mode "
                        f"{checkpoint['args']['mode']}, or start a {args.mode} run with --init_from {path}")
    return checkpoint


def start_wandb(args, checkpoint):
    """A Weights & Biases run that receives what log.jsonl receives (imported only here); a
    resumed run continues the same wandb run."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs wandb: pip install wandb") from None
    run_id = (checkpoint or {}).get("wandb_id")  # saved in every checkpoint: a resume appends to the same wandb run
    return wandb.init(project=args.wandb_project, name=os.path.basename(os.path.normpath(args.out_dir)), config=vars(args),
                      dir=args.out_dir, id=run_id, resume="allow" if run_id else None)


def rng_state(device):
    # CPU and this GPU's generators, put back on resume: a resumed run continues the same random stream
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


class RunLog:
    """Where a run reports: log.jsonl (and wandb), and one printed line a step with its rate and
    the time left, averaged over the last 20 steps. Only rank 0 writes and prints."""

    def __init__(self, path, tracker, max_steps, master):
        self.path, self.tracker, self.max_steps, self.master = path, tracker, max_steps, master
        self.step_times = []  # seconds of the last 20 steps, for the ETA

    def write(self, entry):
        if self.master:
            with open(self.path, "a") as f:  # one JSON object a line: a crash loses at most the line being written
                f.write(json.dumps(entry) + "\n")
            if self.tracker:
                self.tracker.log(entry, step=entry["step"])

    def eval(self, step, entry):
        entry = {"step": step, **entry}
        self.write(entry)
        if self.master:
            print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))

    def step(self, step, loss, lr, grad_norm, dt, tokens, seconds_at_peak=None):
        """seconds_at_peak: the step's FLOPs over the GPUs' peak FLOP/s, for MFU."""
        self.step_times = (self.step_times + [dt])[-20:]
        entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": 1000 * dt, "tok_per_s": tokens / dt}
        if seconds_at_peak:
            entry["mfu"] = seconds_at_peak / dt  # 1.0: every GPU at its peak for the whole step
        self.write(entry)
        if self.master:
            eta = (self.max_steps - step) * sum(self.step_times) / len(self.step_times)
            print(f"step {step:5d}/{self.max_steps} | loss {loss:.6f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
                  f"{1000 * dt:.0f} ms | {tokens / dt:,.0f} tok/s" + (f" | MFU {100 * entry['mfu']:.1f}%" if
                  "mfu" in entry else "") + f" | ETA {format_duration(eta)}", flush=True)


def training_model(args, checkpoint, device, dtype):
    """The model to train, on its device, wrapped for activation checkpointing and sharded
    (FSDP) if asked, and the checkpoint's optimizer state in the form every layout reads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    model = build_model(args, checkpoint)
    if checkpoint is not None and all(isinstance(k, int) for k in checkpoint["optimizer"]["state"]):
        # A checkpoint from before FSDP keyed AdamW's state by parameter index, which a sharded
        # or wrapped model does not share: load it into a plain optimizer and read it back by name.
        legacy = configure_optimizer(model, args.weight_decay, args.max_lr)  # the model is still on the CPU
        legacy.load_state_dict(checkpoint["optimizer"])
        checkpoint["optimizer"] = get_optimizer_state_dict(model, legacy, options=StateDictOptions(full_state_dict=True))
    model.to(device)
    if args.fsdp and dtype == torch.float16:
        raise UserError("--fsdp 1 trains in bfloat16 or float32 here (float16 would need a sharded gradient "
                        "scaler): give --dtype float32 on GPUs without bfloat16")
    if args.fsdp or args.activation_checkpointing:  # before the optimizer: FSDP replaces the parameters
        shard_and_checkpoint(model, dtype, args.fsdp, args.activation_checkpointing, args.compile)
    return model


def training_data(args, block_size, rank, world_size):
    """The train and val loaders and the step's geometry: total_batch_size = batch_size x
    (block_size, pretraining) x GPUs x grad_accum. Returns (train, val, grad_accum,
    steps_per_epoch, max_steps)."""
    pretrain = args.mode == "pretrain"
    Loader, unit = (PretrainLoader, "tokens") if pretrain else (InstructionLoader, "examples")
    # total_batch_size units one micro-step covers
    per_micro_step = args.batch_size * (block_size if pretrain else 1) * world_size
    if args.total_batch_size % per_micro_step:
        raise UserError(f"--total_batch_size {args.total_batch_size} {unit} is not a multiple of batch_size x "
                        f"{'block_size x ' if pretrain else ''}GPUs = {per_micro_step}")
    grad_accum = args.total_batch_size // per_micro_step  # micro-steps per optimizer step on each rank
    train_loader = Loader(args.data_dir, "train", args.batch_size, block_size, rank, world_size, args.seed)
    val_loader = Loader(args.data_dir, "val", args.batch_size, block_size, rank, world_size, args.seed)
    if pretrain:
        # - 1: the last token is only a target
        steps_per_epoch = (train_loader.total_tokens - 1) // args.total_batch_size
    else:
        steps_per_epoch = train_loader.steps_per_epoch(grad_accum)
    if steps_per_epoch == 0:
        raise UserError(f"the train split of {args.data_dir} is less than one step: it holds fewer than one step "
                        f"of --total_batch_size {args.total_batch_size:,} {unit}; lower --total_batch_size")
    max_steps = args.max_steps or steps_per_epoch * (1 if pretrain else args.epochs)  # default: one epoch / --epochs
    return train_loader, val_loader, grad_accum, steps_per_epoch, max_steps


def resume(checkpoint, path, model, optimizer, scaler, train_loader, device, max_steps):
    """Put the checkpoint's optimizer, scaler, data position and RNG in place; its step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if max_steps < checkpoint["step"]:
        raise UserError(f"{path} is at step {checkpoint['step']}, past --max_steps {max_steps}: "
                        f"give a --max_steps of at least {checkpoint['step']}")
    # Every rank holds the whole state (each read ckpt.pt); under FSDP each keeps its shard.
    set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True))
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    # the next step reads on from there: no batch seen twice or skipped
    train_loader.load_state_dict(checkpoint["loader"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.startswith("cuda") and checkpoint["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return checkpoint["step"]  # steps done when it was saved: the next one to train


def save_training_checkpoint(path, raw_model, optimizer, extra, master):
    """One format for every layout: full weights under their plain names, and AdamW's state
    keyed by parameter name, so a run resumes on any number of ranks, with or without FSDP.
    Under FSDP every rank sends its shards (so every rank calls this) and rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    # full_state_dict + cpu_offload: the whole state gathered into rank 0's CPU memory (the GPU never holds a
    # second full copy); the other ranks get empty dicts, hence master alone writes
    model_state, optimizer_state = get_state_dict(raw_model, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        model_state["lm_head.weight"] = model_state["transformer.wte.weight"]  # tied: saved once, as state_dict() does
        save_checkpoint(path, {"model": model_state, "optimizer": optimizer_state, "config": asdict(raw_model.config),
                               **extra})
        print(f"saved {path} at step {extra['step']}")


def compiled_and_replicated(model, args, local_rank, world_size, device):
    """torch.compile (under FSDP each block was compiled before sharding), and DDP over the
    ranks unless FSDP already spreads the model over them."""
    if args.compile and not args.fsdp:
        model = torch.compile(model)
    if world_size > 1 and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # broadcast_buffers off: the model has no buffers, so nothing to send before each forward
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None, broadcast_buffers=False)
    return model


def evaluate_during_training(model, raw_model, val_loader, args, device, rank, world_size, dtype, template,
                             hellaswag_items=None):
    """Validation loss (and HellaSwag when pretraining with --hellaswag 1) as a log entry, and a
    few sampled lines printed: a glance at what the model has learned."""
    model.eval()
    entry = {"val_loss": evaluate_loss(model, val_loader, args.val_steps, device, world_size, dtype)}
    if hellaswag_items:
        entry.update(hellaswag_eval(raw_model, hellaswag_items, device, rank, world_size, args.hellaswag_convention))
    if args.eval_samples and (rank == 0 or args.fsdp):
        # Under FSDP each forward gathers the weights from every rank, so every rank
        # generates the same lines; rank 0 prints them.
        with contextlib.nullcontext() if rank == 0 else contextlib.redirect_stdout(io.StringIO()):
            show_samples(raw_model, device, template, n=args.eval_samples, dtype=dtype)
    model.train()
    return entry


def non_finite_error(step, loss, grad_norm, checkpoint_path, saved_step):
    # The optimizer has not stepped, and every checkpoint this run saved was written only
    # after the step following it came out finite: the one named here resumes to a finite loss.
    where = (f"the last good checkpoint is {checkpoint_path} at step {saved_step} (resume it with a lower --max_lr, "
             "or check the data)" if saved_step not in (None, step) else
             "no checkpoint before it to go back to: start again with a lower --max_lr")
    return UserError(f"the loss became non-finite at step {step + 1} (loss {loss:.4g}, gradient norm {grad_norm:.4g}); "
                     f"{where}")


def run_training(args, rank, local_rank, world_size, device):
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)  # the other ranks run silent
    # every rank the same seed, so the same fresh weights: FSDP keeps each rank's slice of its own copy
    # (DDP would broadcast rank 0's anyway)
    torch.manual_seed(args.seed)
    if device.startswith("cuda"):
        enable_tf32()
    # Everything that can refuse the run is checked here, before step 1: a check that fires
    # later would throw trained steps away.
    checkpoint, checkpoint_path = checkpoint_to_resume(args), os.path.join(args.out_dir, "ckpt.pt")
    dtype = pick_dtype(device, args.dtype)
    model = training_model(args, checkpoint, device, dtype)
    train_loader, val_loader, grad_accum, steps_per_epoch, max_steps = training_data(
        args, model.config.block_size, rank, world_size)
    hellaswag_items = None  # read now: a missing or malformed file fails before step 1, not at step N
    if args.hellaswag and args.mode == "pretrain":
        hellaswag_items = load_hellaswag(args.hellaswag_path, args.hellaswag_limit, args.hellaswag_convention)
    template = train_loader.meta["prompt_template"] if args.mode == "finetune" else (checkpoint or {}).get("prompt_template")
    # over the final parameters (sharded under FSDP); its lr is overwritten every step from get_lr
    optimizer = configure_optimizer(model, args.weight_decay, args.max_lr)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)  # a no-op unless float16
    start_step = 0 if checkpoint is None else resume(checkpoint, checkpoint_path, model, optimizer, scaler,
                                                      train_loader, device, max_steps)
    tracker = start_wandb(args, checkpoint) if master and args.wandb_project else None
    checkpoint = None  # the weights and optimizer state are in place: free the copy
    raw_model = model  # the plain module (under FSDP, the sharded one): for checkpoints, sampling and MFU
    model = compiled_and_replicated(model, args, local_rank, world_size, device)
    print0(f"{args.mode}: {sum(p.numel() for p in raw_model.parameters()):,} parameters, {world_size} process(es) on "
           f"{device}, {grad_accum} micro-steps of {args.batch_size} per step, {max_steps} steps ({steps_per_epoch} "
           f"per epoch)" + (f", resuming {checkpoint_path} at step {start_step}" if start_step else ""))
    log = RunLog(os.path.join(args.out_dir, "log.jsonl"), tracker, max_steps, master)
    # MFU: the step's FLOPs against the GPUs' peak (pretraining: total_batch_size counts tokens)
    peak = peak_flops(device, args.peak_tflops) if args.mode == "pretrain" else None
    seconds_at_peak = flops_per_token(raw_model) * args.total_batch_size / (peak * world_size) if peak else None
    saved_step = start_step or None  # the step of the checkpoint on disk
    stop, step, weights_bad = StopRequested(), start_step, False
    try:
        while True:
            # what a checkpoint of this step holds besides the weights and AdamW: taken now,
            # before this step's batches move the loader on
            state = {"step": step, "loader": train_loader.state_dict(), "rng": rng_state(device), "args": vars(args),
                     "prompt_template": template, "scaler": scaler.state_dict(), "wandb_id": tracker and tracker.id}
            if step > start_step and (step % args.eval_interval == 0 or step == max_steps):
                log.eval(step, evaluate_during_training(model, raw_model, val_loader, args, device, rank, world_size,
                                                        dtype, template, hellaswag_items))
            if step == max_steps:
                if step > start_step:
                    save_training_checkpoint(checkpoint_path, raw_model, optimizer, state, master)
                break
            t0 = time.time()  # after the evaluation: a step's time is its data, forward, backward and update
            lr = get_lr(step, args.max_lr, args.max_lr * args.min_lr_ratio, args.warmup_steps, max_steps)
            for group in optimizer.param_groups:  # both groups, with and without decay, follow the schedule
                group["lr"] = lr
            micro_batches = train_loader.next_step(grad_accum)
            loss, grad_norm, stop_now = forward_backward(model, micro_batches, device, world_size, args.grad_clip,
                                                         stop.requested, dtype, scaler, optimizer)
            # float16 overflows now and then: the scaler skips that update and lowers its scale
            if not (math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled())):
                weights_bad = True
                raise non_finite_error(step, loss, grad_norm, checkpoint_path, saved_step)
            # A checkpoint due at this step is written now that its weights proved finite.
            if stop_now or (step > start_step and step % args.ckpt_interval == 0):
                save_training_checkpoint(checkpoint_path, raw_model, optimizer, state, master)
                saved_step = step
            if stop_now:  # this step's update is dropped: the checkpoint resumes it exactly
                print0("stopped; continue with --init_from resume")
                break
            scaler.step(optimizer)  # optimizer.step(), unless float16 gradients overflowed
            scaler.update()  # float16: raises the scale after a run of good steps, lowers it after an overflow
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # kernels run async: wait, so dt is the step's time, not its launch's
            step += 1
            tokens = sum(x.numel() for x, _ in micro_batches) * world_size  # fine-tuning: padding included
            # step counts steps done, as checkpoints do
            log.step(step, loss, lr, grad_norm, time.time() - t0, tokens, seconds_at_peak)
    except Exception:
        # No trained step is thrown away: whatever failed (an evaluation, the disk, the data),
        # the steps done since the last checkpoint are saved first, unless the weights are bad.
        # Not under FSDP on several ranks: gathering the weights needs every rank, and the
        # others may not have failed.
        if not weights_bad and state["step"] == step != saved_step and step > start_step \
                and not (args.fsdp and world_size > 1):
            with contextlib.suppress(Exception):  # the original error is the one to report
                save_training_checkpoint(checkpoint_path, raw_model, optimizer, state, master)
        raise
    finally:
        stop.restore()  # Ctrl-C means Ctrl-C again once the loop is over
        if tracker:
            tracker.finish()


def train(args):
    """--mode pretrain and --mode finetune: one process of the run, --out_dir locked while it lives."""
    rank, local_rank, world_size, device = setup_distributed(args.device)
    # rank 0 locks for the whole run: one lock per run, not one per process
    with claim_out_dir(args.out_dir) if rank == 0 else contextlib.nullcontext():
        run_training(args, rank, local_rank, world_size, device)
    if world_size > 1:
        torch.distributed.destroy_process_group()  # a clean exit: NCCL warns about a group left open


# -----------------------------------------------------------------------------
# --mode eval


def evaluate_model(args, rank, world_size, device):
    # What can be wrong with the inputs is found before the model loads (a minute for gpt2-xl).
    kind = read_meta(args.data_dir)["kind"] if args.data_dir else None
    items = load_hellaswag(args.hellaswag_path, args.hellaswag_limit, args.hellaswag_convention) if args.hellaswag else None
    model, _ = load_model(args.init_from)
    model.to(device).eval()
    results = {"model": args.init_from}
    if args.data_dir:
        Loader = PretrainLoader if kind == "pretrain" else InstructionLoader  # the folder says how to read it
        # val split, at the model's own block_size
        loader = Loader(args.data_dir, "val", args.batch_size, model.config.block_size, rank, world_size, args.seed)
        results["val_loss"] = evaluate_loss(model, loader, args.val_steps, device, world_size, progress=rank == 0)
    if args.hellaswag:
        t0 = time.time()
        results.update(hellaswag_eval(model, items, device, rank, world_size, args.hellaswag_convention,
                                      progress=rank == 0))
        results["hellaswag_items_per_s"] = results["hellaswag_items"] / (time.time() - t0)
    if rank == 0:  # one writer: the results are already summed over the ranks
        width = max(map(len, results))  # the values in one column
        for key, value in results.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
        # eval.json: the same numbers, for scripts and comparisons
        atomic_write(os.path.join(args.out_dir, "eval.json"), lambda f: f.write(json.dumps(results, indent=2).encode()))
    return results


def evaluate(args):
    """--mode eval: validation loss and HellaSwag of a model, as a table and as JSON."""
    rank, _, world_size, device = setup_distributed(args.device)
    with claim_out_dir(args.out_dir) if rank == 0 else contextlib.nullcontext():
        results = evaluate_model(args, rank, world_size, device)
    if world_size > 1:
        torch.distributed.destroy_process_group()  # as in train: no group left open at exit
    return results


# -----------------------------------------------------------------------------
# Sampling and chat


def stream_text(model, enc, tokens, device, args, generator=None):
    """Print one answer token by token as it is generated; return its text."""
    ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T): a batch of one
    # BPE tokens can split a UTF-8 character: decode bytes incrementally, never mid-character.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    with autocast(device, pick_dtype(device, args.dtype)):
        for token in model.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, generator=generator):
            token = token.item()  # one copy to the host a token (a GPU sync)
            if token == EOT_TOKEN:  # the end of a fine-tuned answer, or of a document
                break
            # '' until a character's last byte has come: never half of one on screen
            pieces.append(decoder.decode(enc.decode_single_token_bytes(token)))
            print(pieces[-1], end="", flush=True)
    pieces.append(decoder.decode(b"", final=True))  # bytes still held: a cut-off character prints as U+FFFD
    print(pieces[-1])
    return "".join(pieces)


def sample(args):
    device = pick_device(args.device)  # one process: sampling needs no torchrun
    prompts = args.prompt or ["Hello, I'm a language model,"]
    if not all(prompts):  # before loading a model that may take a minute
        raise UserError('the prompt is empty: give some text, or --prompt "<|endoftext|>" to sample unconditionally')
    model, checkpoint = load_model(args.init_from)
    model.to(device).eval()
    enc = get_tokenizer()
    template = (checkpoint or {}).get("prompt_template")  # set by --mode finetune
    token_lists = encode_prompts(enc, prompts, template)
    for prompt, tokens in zip(prompts, token_lists):
        if len(tokens) > model.config.block_size:
            print(f"note: prompt {prompt[:30]!r}... has {len(tokens)} tokens; the model reads only its last {model.config.block_size}")
    generator = None
    if args.seed is not None:  # --seed: the same samples every time; none: fresh ones
        generator = torch.Generator(device=device).manual_seed(args.seed)
    if len(prompts) == 1 and args.num_samples == 1:  # one answer: streamed token by token, as in chat
        # a continuation follows on the line; an answer below
        print(prompts[0], end="" if template is None else "\n", flush=True)
        stream_text(model, enc, token_lists[0], device, args, generator)
        return
    # Every prompt times num_samples, generated as one left-padded batch.
    # prompt-major: row // num_samples is the prompt
    batch = [tokens for tokens in token_lists for _ in range(args.num_samples)]
    ids, mask = left_pad(batch)  # (B, T), right-aligned: every row's next token at the same column
    with autocast(device, pick_dtype(device, args.dtype)):
        out = model.generate(ids.to(device), mask.to(device), max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             generator=generator)
    for row in range(len(batch)):
        text = prompts[row // args.num_samples] if template is None else ""  # a continuation reads with its prompt
        new = until_eot(out[row, ids.size(1):].tolist())  # the generated part only, cut at <|endoftext|>
        print(f"--- sample {row % args.num_samples + 1} of prompt {row // args.num_samples + 1}\n{text}{enc.decode(new)}")


def chat(args):
    """Type an instruction, read the answer as it is generated; /quit leaves. Each
    instruction stands alone: Alpaca teaches single-turn answers."""
    device = pick_device(args.device)
    model, checkpoint = load_model(args.init_from)
    template = (checkpoint or {}).get("prompt_template")
    if template is None:
        raise UserError(f"{args.init_from} is not fine-tuned (it has no prompt template): chat needs a "
                        "--mode finetune checkpoint; use --mode sample for a pretrained model")
    model.to(device).eval()
    enc = get_tokenizer()
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # Windows
        pass
    print("Type an instruction and press Enter; Ctrl-C stops an answer; /quit or Ctrl-D leaves.")
    while True:
        try:
            instruction = input("> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            print()
            break
        if instruction in ("/quit", "/exit"):
            break
        if instruction:  # an empty line asks nothing
            try:
                stream_text(model, enc, encode_prompts(enc, [instruction], template)[0], device, args, generator)
            except KeyboardInterrupt:  # Ctrl-C while answering: drop the answer, keep the chat
                print(" [stopped]")


# -----------------------------------------------------------------------------
# Export to Hugging Face
#
# A folder that transformers (and what builds on it: pipelines, vLLM, TGI, llama.cpp's
# converter) loads as OpenAI's GPT-2 loads: the weights in GPT2LMHeadModel's names and
# layout, and GPT-2's tokenizer files, rebuilt offline from tiktoken's data.


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character (OpenAI's encoder.py). vocab.json and
    merges.txt are text, and a BPE token is bytes that need not be valid UTF-8: so each byte is
    written as one visible character, the printable ones as themselves and the other 68 (space,
    control bytes, ...) as the characters from U+0100 on; a space becomes 'Ġ', hence 'Ġthe'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # 68 of them: space, control bytes, a few more
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def bpe_merges(ranks):
    """GPT-2's merge list from tiktoken's ranks ({token bytes: id}), in rank order: (left, right)
    pairs whose merge made each token of two or more bytes. tiktoken keeps only the ranks, as
    rank order is merge order: so token r was made by the merge BPE performs last when only
    the merges below r exist, and running BPE on its bytes with those finds the pair."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue  # the 256 single bytes: the alphabet, not merges
        parts = [bytes([b]) for b in token]  # from single bytes, as BPE starts
        while len(parts) > 2:  # BPE: merge the adjacent pair of lowest rank, below this token's own
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)  # the lowest rank merges first
            if pair_ranks[i] >= rank:
                raise UserError(f"tiktoken's GPT-2 ranks are not BPE merges at token {rank}: reinstall tiktoken")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))  # the last merge left: the one that made this token
    return merges


def jinja_chat_template(template):
    """The fine-tuning prompt template (str.format, with {instruction}) as a Jinja chat template:
    a user message renders to exactly template.format(instruction=content), and an assistant
    message to its content and <|endoftext|>, as a fine-tuning example ends. The template's
    text goes in as Jinja string literals, so no brace or quote in it can read as Jinja."""
    from string import Formatter  # the parser str.format itself uses: '{{' and '}}' come out unescaped
    pieces = []
    for literal, field, spec, conversion in Formatter().parse(template):
        if literal:
            # a JSON string is a valid Jinja string literal
            pieces.append("{{ " + json.dumps(literal, ensure_ascii=False) + " }}")
        if field is not None:
            if field != "instruction" or spec or conversion:
                raise UserError(f"the checkpoint's prompt template has a field {{{field}}}: only {{instruction}} can be exported")
            pieces.append("{{ message['content'] }}")
    return ("{% for message in messages %}"
            "{% if message['role'] == 'user' %}" + "".join(pieces) +
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% else %}{{ raise_exception('this model was fine-tuned on user and assistant messages only') }}"
            "{% endif %}{% endfor %}")


def write_gpt2_tokenizer(folder, enc, max_length, chat_template=None):
    """vocab.json, merges.txt and tokenizer_config.json: the files of OpenAI's GPT-2 tokenizer as
    transformers reads them, from tiktoken's data (no download). tiktoken's ranks are GPT-2's
    token ids and its byte strings the tokens, so only their spelling changes."""
    byte_char = bytes_to_unicode()
    as_text = lambda token: "".join(byte_char[b] for b in token)  # noqa: E731
    ranks = enc._mergeable_ranks  # tiktoken's own table: {token bytes: id}, no special tokens
    # <|endoftext|> is one of tiktoken's special tokens, not a rank: added by hand
    vocab = {as_text(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": EOT_TOKEN}
    merges = bpe_merges(ranks)
    print(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges rebuilt from tiktoken's GPT-2 ranks"
          + (", chat template from the fine-tuning prompt" if chat_template else ""))
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",  # AutoTokenizer builds the fast one from these same files
        "model_max_length": max_length,  # block_size: the tokenizer warns before the model fails
        "add_prefix_space": False,  # "Hello" and " Hello" are different tokens, as in tiktoken
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        # special: "<|endoftext|>" in text is the one token 50256, as with tiktoken's allowed_special
        "added_tokens_decoder": {str(EOT_TOKEN): {"content": "<|endoftext|>", "special": True, "normalized": True,
                                                  "lstrip": False, "rstrip": False, "single_word": False}},
    }
    if chat_template:
        tokenizer_config["chat_template"] = chat_template  # tokenizer.apply_chat_template reads it here
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        # a version line first: transformers skips the first line (and the empty one after the last newline)
        f.write("#version: 0.2\n" + "".join(f"{as_text(a)} {as_text(b)}\n" for a, b in merges))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)


def hf_gpt2_tensors(model):
    """The model's weights as GPT2LMHeadModel stores them: the same names, Conv1D's layout."""
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # the same tensor as wte (tied); transformers re-ties it on load, as for OpenAI's files
        if key == "transformer.wte.weight":
            tensor = tensor[:model.config.vocab_size]  # the padded rows (50257 -> 50304) are never read or predicted
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # OpenAI's Conv1D stores (in, out); nn.Linear holds (out, in)
        tensors[key] = tensor.contiguous()  # safetensors writes whole, dense tensors
    return tensors


def hf_gpt2_config(config, dtype):
    """OpenAI's config.json for GPT-2, with this model's sizes and every setting that differs
    from transformers' defaults spelled out (a default may change between its versions)."""
    return {
        "architectures": ["GPT2LMHeadModel"],  # what AutoModelForCausalLM builds
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,  # 50257, never the padded size: hf_gpt2_tensors cuts those rows
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # the same, under the name older transformers read
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # None means 4 * n_embd, our MLP's width
        "activation_function": "gelu_new",  # GELU's tanh approximation, as our MLP
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which our blocks use
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # we train without dropout
        "initializer_range": 0.02,  # used only for weights a user adds (a classification head, ...)
        "scale_attn_weights": True,  # softmax(q k / sqrt(head size)), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,  # options added after GPT-2, for other models: off
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,  # lm_head is wte, as in our GPT
        "bos_token_id": EOT_TOKEN,  # GPT-2 has one special token for all three roles
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": dtype,  # what from_pretrained(dtype="auto") loads it as
    }


def export(args):
    """--mode export: write --init_from as a Hugging Face GPT-2 folder at --out_dir. The folder is
    built beside it and renamed into place when complete: a crash leaves no half folder."""
    import shutil  # only export needs it
    if not args.init_from:
        raise UserError("--mode export needs --init_from: a checkpoint .pt (e.g. out/finetune/ckpt.pt), "
                        "a Hugging Face GPT-2 folder or a name such as gpt2")
    if not args.out_dir:
        raise UserError("--mode export needs --out_dir: a new folder to write the Hugging Face model into")
    out_dir = os.path.abspath(args.out_dir)  # normalized (no trailing '/'): the .partial folder below is its sibling
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise UserError(f"{args.out_dir} exists and is not an empty folder: export never overwrites files; "
                        "give a new --out_dir, or move that one away first")
    try:
        from safetensors.torch import save_file  # imported here: nothing else needs it
    except ImportError:
        raise UserError("--mode export writes safetensors: pip install safetensors") from None
    start = time.time()
    print(f"reading {args.init_from}")  # a line per stage: a 1.5B model takes a while at each
    model, checkpoint = load_model(args.init_from)
    config, template = model.config, None
    if checkpoint is not None:
        template = checkpoint.get("prompt_template")  # set by --mode finetune
        del checkpoint  # a training checkpoint holds the optimizer's state too: twice the model, freed now
    elif os.path.isfile(os.path.join(args.init_from, "config.json")):  # re-exporting a folder we wrote: keep its template
        with open(os.path.join(args.init_from, "config.json")) as f:
            template = json.load(f).get("prompt_template")
    enc = get_tokenizer()
    if config.vocab_size != enc.n_vocab:
        raise UserError(f"the model reads {config.vocab_size} token ids but GPT-2's tokenizer has {enc.n_vocab}: "
                        "export writes GPT-2's tokenizer, so it can only export models of GPT-2's vocabulary")
    chat_template = jinja_chat_template(template) if template else None  # before writing anything

    tensors = hf_gpt2_tensors(model)
    n_params = sum(t.numel() for t in tensors.values())  # as exported: 50257 rows, the tied lm_head once
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")  # 'float32': the spelling config.json uses
    hf_config = hf_gpt2_config(config, dtype)
    if template:
        # model.config.prompt_template: the plain str.format template, for code that does not chat
        hf_config["prompt_template"] = template

    tmp = f"{out_dir}.partial-{os.getpid()}"  # a sibling, so that the final rename stays on one filesystem
    os.makedirs(tmp)
    try:
        size_mb = n_params * model.lm_head.weight.element_size() / 1e6
        print(f"model: {n_params / 1e6:.1f}M parameters, {size_mb:.1f} MB of {dtype} -> model.safetensors")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})  # "pt": transformers checks it
        del tensors
        # safetensors writes its file private (0600); give it the mode the user's umask gave config.json
        shutil.copymode(os.path.join(tmp, "config.json"), os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}, f, indent=2)  # stop at <|endoftext|>
        write_gpt2_tokenizer(tmp, enc, config.block_size, chat_template)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); rmdir refuses if files appeared since
        os.rename(tmp, out_dir)  # the finished folder appears at once, under its name
    except BaseException:  # Ctrl-C too: no .partial folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {args.out_dir} ({', '.join(sorted(os.listdir(out_dir)))}) in {time.time() - start:.1f}s")


# -----------------------------------------------------------------------------
# Benchmarks: a training step against build-nanogpt's, and generation against transformers'


def build_nanogpt_forward(model, idx, targets):
    """build-nanogpt's forward and loss on our model's weights, the anchor --bench_anchor times
    ours against: the same blocks, and the LM head over all 50304 padded columns with the
    loss taken over them too, as build-nanogpt trains (its vocab_size is 50304)."""
    B, T = idx.size()
    pos = torch.arange(T, device=idx.device)  # (T,)
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)  # (B, T, C)
    for block in model.transformer.h:
        x = block(x)
    logits = model.lm_head(model.transformer.ln_f(x))  # (B, T, 50304)
    # (B * T, 50304) against (B * T,): cross_entropy wants one row per target
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def build_nanogpt_step(forward, model, optimizer, x, y, device):
    """build-nanogpt's optimizer step (one micro-step): forward, backward, clip, AdamW."""
    optimizer.zero_grad()
    with autocast(device):
        _, loss = forward(model, x.to(device), y.to(device))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # build-nanogpt clips at 1.0, as GPT-3
    optimizer.step()
    return loss.item(), norm.item()  # build-nanogpt prints both, so it waits for them


def peak_memory_growth(fn, device):
    """Run fn(); return how far memory rose above its level before, in bytes: on CUDA,
    torch's peak allocation; on a Linux CPU, the process's resident memory (RSS) sampled
    every millisecond, after handing freed heap back to the OS so that the level before is
    honest; elsewhere None."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # queued work first: the peak is fn's alone
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # weights and AdamW state already held: not fn's growth
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    if device != "cpu" or not os.path.exists("/proc/self/statm"):
        return None
    import ctypes
    import threading
    page = os.sysconf("SC_PAGE_SIZE")  # statm counts pages, not bytes

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page  # the second field: resident pages

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap kept by malloc would hide a step's growth
    before = rss()
    peak, done = [before], threading.Event()

    def sample():  # torch releases the GIL while it computes, so this thread keeps sampling
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
    return max(peak[0], rss()) - before  # the sampler may have missed the last millisecond


def bench_generate(args):
    """--mode bench --bench_generate 1: greedy generation on random weights, at batch 1 and at
    batch 8 with prompts of different lengths (left-padded): our KV cache, recomputing the
    whole sequence for every token (build-nanogpt's way), and transformers' generate on the
    very same weights, interleaved round by round; checks that all give the same tokens. Also
    times the LM head's product alone, the floor no loop goes below."""
    from transformers import GPT2Config, GPT2LMHeadModel
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    cfg = config_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:  # one set of weights for both libraries
        GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                   n_positions=cfg.block_size)).save_pretrained(tmp)
        hf_model = GPT2LMHeadModel.from_pretrained(tmp).to(device).eval()
        model = GPT.from_pretrained(tmp).to(device).eval()
    n = args.max_new_tokens

    @torch.no_grad()
    def recompute(ids, mask):
        for _ in range(n):
            window = ids[:, -cfg.block_size:]  # the model reads at most block_size tokens
            if mask is None:  # build-nanogpt's loop
                logits = model(window)[0][:, -1]  # (B, vocab): the last position's, the whole window recomputed
            else:  # it has no padding: a fresh cache every token recomputes everything
                cache = KVCache(model.config, ids.size(0), window.size(1), device, torch.float32)
                logits = forward_cached(model, window, cache, mask[:, -cfg.block_size:])
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)  # greedy, as the others: tokens comparable
        return ids

    methods = {
        "KV cache (this file)": lambda ids, mask: model.generate(ids, mask, max_new_tokens=n, temperature=0, eos_token_id=None),
        "recompute every step": recompute,
        "transformers generate": lambda ids, mask: hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                                     eos_token_id=None, pad_token_id=EOT_TOKEN),
    }
    lengths = [16, 5, 11, 8, 14, 3, 9, 12]  # batch 8: prompts of 3 to 16 tokens, left-padded
    prompts = {1: (torch.randint(0, 50257, (1, 16)), None),  # batch 1: no padding, no mask
               8: left_pad([torch.randint(0, 50257, (length,)).tolist() for length in lengths])}
    print(f"bench generate: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, {n} new tokens, greedy, "
          f"{device}, median of {args.bench_steps} interleaved rounds")
    for batch, (ids, mask) in prompts.items():
        ids, mask = ids.to(device), mask.to(device) if mask is not None else None
        outputs = {name: method(ids, mask).tolist() for name, method in methods.items()}  # warm-up, and the tokens
        # The floor: the LM head's (vocab x C) product, which every loop does once a token and
        # which at batch 1 is mostly reading the matrix. No loop can run faster than n of them.
        last_hidden = torch.randn(cfg.n_embd, batch, device=device)  # (C, B), as forward_cached multiplies

        def lm_head_alone(*_):
            for _ in range(n):
                model.lm_head.weight @ last_hidden  # (vocab, B), dropped at once as a loop drops it

        timed = {**methods, "LM head alone": lm_head_alone}
        times = {name: [] for name in timed}
        for _ in range(args.bench_steps):
            for name, method in timed.items():
                t0 = time.perf_counter()
                method(ids, mask)
                if device.startswith("cuda"):  # the clock stops once the GPU is done
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        label = "batch 1, a 16-token prompt" if batch == 1 else "batch 8, prompts of 3-16 tokens, left-padded"
        print(f"{label}:")
        for name, dt in medians.items():
            print(f"  {name:<24} {1000 * dt:8.1f} ms  {batch * n / dt:8.0f} tokens/s")
        ours, theirs = medians["KV cache (this file)"], medians["transformers generate"]
        same = all(out == outputs["transformers generate"] for out in outputs.values())
        print(f"  same tokens from all three: {same}; KV cache is {medians['recompute every step'] / ours:.1f}x "
              f"faster than recomputing, {theirs / ours:.2f}x faster than transformers; the LM head alone "
              f"caps any loop at {theirs / medians['LM head alone']:.2f}x here")


def memory_per_rank(compiled, model, optimizer, x, device, rank, world_size):
    """Print, on rank 0, the parameter + gradient + AdamW bytes each rank holds (FSDP: its shard),
    and its peak GPU memory, after one more forward and backward so the gradients exist too."""
    forward_backward(compiled, [(x[:, :-1], x[:, 1:])], device, world_size, 1.0)
    cuda = device.startswith("cuda")
    # each rank fills its own slot, and a sum hands rank 0 all of them
    held, peak_gpu = [0.0] * world_size, [0.0] * world_size
    held[rank] = bytes_held(model, optimizer)
    peak_gpu[rank] = torch.cuda.max_memory_allocated(device) if cuda else 0.0
    held, peak_gpu = all_reduce_sum(held, world_size), all_reduce_sum(peak_gpu, world_size)
    for r in range(world_size if rank == 0 else 0):
        print(f"rank {r}: parameters + gradients + AdamW state {held[r] / 2**20:,.2f} MiB"
              + (f" | peak GPU memory {peak_gpu[r] / 2**30:,.2f} GiB" if cuda else ""))


def bench(args):
    """--mode bench: a training step on random tokens, timed (median of --bench_steps after
    --bench_warmup), as tokens/s, MFU (CUDA) and the step's peak memory, so anyone can measure
    their hardware without preparing data. With --bench_anchor 1, build-nanogpt's step too,
    the two interleaved round by round, and their ratio. Under torchrun: DDP, or FSDP with
    --fsdp 1, and the memory each rank holds. With --bench_generate 1, generation instead."""
    if args.bench_generate:
        return bench_generate(args)
    rank, local_rank, world_size, device = setup_distributed(args.device)
    if args.bench_anchor and world_size > 1:
        raise UserError("--bench_anchor 1 compares one process's steps: run it without torchrun")
    print = builtins.print if rank == 0 else (lambda *a, **k: None)  # noqa: A001  (only rank 0 prints)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        enable_tf32()
    torch.manual_seed(args.seed)
    model = GPT(config_from_args(args)).to(device)  # random weights: speed does not depend on them
    T = model.config.block_size
    if args.fsdp or args.activation_checkpointing:
        shard_and_checkpoint(model, pick_dtype(device, args.dtype), args.fsdp, args.activation_checkpointing, args.compile)
    optimizer = configure_optimizer(model, 0.1, 6e-4)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the whole model was on the GPU before sharding
    compiled = compiled_and_replicated(model, args, local_rank, world_size, device)  # as a training run wraps it
    # CUDA runs async: time a step only once the GPU has finished it
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    # x is (B, T + 1): inputs x[:, :-1] and next-token targets x[:, 1:], both (B, T)
    steps = {"ours": lambda x: train_step(compiled, optimizer, [(x[:, :-1], x[:, 1:])], device, world_size, 1.0)}
    if args.bench_anchor:  # its own copy of the same weights, and its own AdamW
        anchor = GPT(model.config).to(device)
        anchor.load_state_dict(model.state_dict())
        anchor_optimizer = configure_optimizer(anchor, 0.1, 6e-4, fused=device_type == "cuda")  # as build-nanogpt fuses
        forward = torch.compile(build_nanogpt_forward) if args.compile else build_nanogpt_forward
        steps["build-nanogpt"] = lambda x: build_nanogpt_step(forward, anchor, anchor_optimizer, x[:, :-1], x[:, 1:], device)
    peak = peak_flops(device, args.peak_tflops)
    print(f"bench: {sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch_size} x {T}, "
          f"{device} ({torch.cuda.get_device_name(device) if device_type == 'cuda' else device_type}), "
          f"compile {bool(args.compile)}, {world_size} process(es){', FSDP' if args.fsdp else ''}, "
          f"{args.bench_steps} timed rounds after {args.bench_warmup}")
    times = {name: [] for name in steps}
    for i in range(args.bench_warmup + args.bench_steps):
        x = torch.randint(0, 50257, (args.batch_size, T + 1))  # fresh tokens each round
        # interleaved, the order alternating: a slow spell of a shared machine hits both ways
        for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            sync()
            t0 = time.perf_counter()
            steps[name](x)
            sync()
            if i >= args.bench_warmup:
                times[name].append(time.perf_counter() - t0)
        if i < args.bench_warmup:
            print(f"warm-up round {i + 1}/{args.bench_warmup}: not counted")
    x = torch.randint(0, 50257, (args.batch_size, T + 1))
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}  # median: robust to a stray slow step
    for name, step in steps.items():
        tok_per_s = args.batch_size * T * world_size / medians[name]  # every rank trains its own batch
        grown = peak_memory_growth(lambda: step(x), device)  # one more step, measured alone
        print(f"{name:<14} median step {1000 * medians[name]:8.1f} ms | {tok_per_s:10,.0f} tokens/s"
              + (f" | MFU {100 * flops_per_token(model) * tok_per_s / (peak * world_size):.1f}% of "
                 f"{peak / 1e12:.0f} TFLOP/s" if peak else "")
              + (f" | peak memory +{grown / 2**20:,.0f} MiB" if grown is not None else ""))
    if args.bench_anchor:
        print(f"ours is {medians['build-nanogpt'] / medians['ours']:.2f}x build-nanogpt's speed (median step time ratio)")
    if grown is not None:
        print("peak memory: " + ("torch.cuda.max_memory_allocated during one step, above what was allocated before it"
                                 if device_type == "cuda" else "the rise of the process's RSS during one step (sampled each ms)"))
    memory_per_rank(compiled, model, optimizer, x, device, rank, world_size)
    if world_size > 1:
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# Plot a run


def plot(args):
    """--mode plot: train and val loss, and HellaSwag accuracy, over steps, from log.jsonl."""
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if not os.path.exists(log_path):
        raise UserError(f"{log_path} not found: point --out_dir at a training run's folder")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--mode plot needs matplotlib: pip install matplotlib") from None
    entries = []
    with open(log_path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                entry = json.loads(line) if line.strip() else {}
            except ValueError:  # a line cut short by a crash, or edited by hand
                raise UserError(f"{log_path}, line {number}, is not JSON: remove that line and plot again") from None
            if isinstance(entry, dict) and isinstance(entry.get("step"), int):  # other lines hold nothing to plot
                entries.append(entry)
    # (steps, values) of the entries that have key: train and val losses are logged at different steps
    series = lambda key: ([e["step"] for e in entries if key in e], [e[key] for e in entries if key in e])  # noqa: E731
    has_hellaswag = any("hellaswag_acc_norm" in e for e in entries)  # a second panel only then
    # squeeze=False: axes is 2-D with one panel or two
    fig, axes = plt.subplots(1, 2 if has_hellaswag else 1, figsize=(12 if has_hellaswag else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(*series("loss"), label="train loss", alpha=0.7)  # light: the noisy per-step curve under the val points
    ax.plot(*series("val_loss"), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_hellaswag:
        ax = axes[0][1]
        ax.plot(*series("hellaswag_acc_norm"), "o-", label="HellaSwag acc_norm")
        # GPT-2 124M's acc_norm in the completion convention (see hellaswag_eval)
        ax.axhline(0.2955, color="gray", linestyle="--", label="OpenAI GPT-2 124M")
        ax.axhline(0.25, color="lightgray", linestyle=":", label="chance")  # 4 endings: a guess is right 1 time in 4
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(args.out_dir)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "plot.png")
    fig.savefig(path, dpi=100)  # a file beside log.jsonl: works on a server with no display
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# Command line


# Flags whose default depends on the mode (None in the parser).
MODE_DEFAULTS = {
    # GPT-3 small's recipe as build-nanogpt runs it: 2**19 tokens a step, 6e-4, 715 warmup steps
    "pretrain": dict(init_from="scratch", data_dir="data/fineweb_edu_10B", out_dir="out/pretrain", batch_size=64,
                     total_batch_size=524288, max_lr=6e-4, warmup_steps=715, eval_interval=250, ckpt_interval=5000,
                     val_steps=160, hellaswag=0, hellaswag_convention="completion"),
    # a small LR: the pretrained weights should move little
    "finetune": dict(init_from="gpt2", data_dir="data/alpaca", out_dir="out/finetune", batch_size=8,
                     total_batch_size=32, max_lr=2e-5, warmup_steps=100, eval_interval=200, ckpt_interval=1000,
                     val_steps=50, hellaswag=0),
    # both HellaSwag conventions: either published number can be compared
    "eval": dict(init_from="gpt2", out_dir="out/eval", batch_size=16, val_steps=160, hellaswag=1, hellaswag_convention="both"),
    "bench": dict(batch_size=64, bench_steps=20, max_new_tokens=200),  # max_new_tokens: for --bench_generate
    # nanoGPT's sampling defaults: a 124M model at temperature 1 over all 50,257 tokens drifts
    # into noise within a sentence; 0.8 and the 200 likeliest keep it readable and varied.
    "sample": dict(init_from="gpt2", max_new_tokens=64, temperature=0.8, top_k=200),
    "chat": dict(init_from="out/finetune", max_new_tokens=256, temperature=0.8, top_k=200),
    "plot": dict(out_dir="out/pretrain"),
}


def flag(kind, low=None, high=None, above=False):
    """An argparse type: the text parsed as kind and checked against its domain, so that a
    value outside it (--max_steps -1, --top_p 0) is refused before anything runs."""
    # the range as the error message words it
    domain = (f"> {low}" if above else f">= {low}") if high is None else f"in {'(' if above else '['}{low}, {high}]"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        # nan and inf parse as floats but lie in no range
        if not math.isfinite(value) or (low is not None and (value <= low if above else value < low)) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {domain}")
        return value
    return parse


def device_flag(text):
    """A device that exists on this machine: --device cuda without a GPU is a mistake."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)  # parses 'cuda:1', refuses 'gpu'
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that PyTorch can use; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: Apple's Metal (mps) is not available here; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda, cuda:N or mps")
    return text


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, like every other mistake; argparse's default prints the whole usage first."""
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it depends on the mode; those say theirs in words."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def mode_default(name):
    """' (default: pretrain 6e-4, finetune 2e-5)', from MODE_DEFAULTS: one place for them."""
    values = [f"{mode} {defaults[name]}" for mode, defaults in MODE_DEFAULTS.items() if name in defaults]
    return f" (default: {', '.join(values)})" if values else ""


def parse_args(argv=None, defaults=None):
    """defaults: values that replace the parser's own, as a resumed run's saved flags do."""
    p = ArgumentParser(description="GPT-2: pretrain, fine-tune, evaluate, sample, chat.",
                       formatter_class=HelpFormatter, allow_abbrev=False)  # --max_l is not --max_lr
    count, positive = flag(int, 1), flag(float, 0, above=True)  # count: 1 or more; positive: above 0

    def add(group, name, default=None, help="", **kw):
        # a mode-dependent default is None here and named in the help
        group.add_argument(f"--{name}", default=default, help=help + mode_default(name), **kw)

    add(p, "mode", "sample", "what to do", choices=["pretrain", "finetune", "eval", "sample", "chat", "bench",
                                                    "plot", "export"])
    add(p, "init_from", help="scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face GPT-2 "
        "folder | a checkpoint .pt | a run folder holding ckpt.pt")
    add(p, "data_dir", help="a folder made by prepare_data.py")
    add(p, "out_dir", help="checkpoints, log.jsonl, eval.json, plot.png")
    add(p, "device", "auto", "auto picks cuda, then mps, then cpu", type=device_flag)
    # None until below: sample and chat draw fresh randomness unless given
    add(p, "seed", help="data order, init, sampling (default: 1337; sample and chat: a random seed)", type=int)
    add(p, "dtype", "auto", "the matmuls' precision; auto: bfloat16 on GPUs that have it, float16 with a gradient "
        "scaler on older GPUs (T4, V100), float32 on CPUs and Macs", choices=["auto", "bfloat16", "float16", "float32"])
    g = p.add_argument_group("model size, for --init_from scratch and --mode bench")
    add(g, "model", "gpt2", "a GPT-2 size; --n_layer, --n_head, --n_embd override its numbers", choices=list(PRESETS))
    add(g, "n_layer", help="transformer blocks, instead of the --model's", type=count)
    add(g, "n_head", help="attention heads, instead of the --model's", type=count)
    add(g, "n_embd", help="width of the residual stream, instead of the --model's", type=count)
    add(g, "block_size", help="sequence length (default: 1024, or the checkpoint's)", type=count)
    g = p.add_argument_group("training")
    add(g, "batch_size", help="micro-batch per GPU: sequences (pretrain), examples (finetune)", type=count)
    add(g, "total_batch_size", help="per optimizer step, over all GPUs: tokens (pretrain), examples (finetune); "
        "the rest is gradient accumulation", type=count)
    add(g, "max_lr", help="peak learning rate", type=positive)
    # above 1 the LR would rise as it decays
    add(g, "min_lr_ratio", 0.1, "the LR decays to max_lr x this", type=flag(float, 0, 1))
    # 0: no warmup (get_lr never divides by it then)
    add(g, "warmup_steps", help="steps of linear warmup to max_lr", type=flag(int, 0))
    add(g, "max_steps", help="optimizer steps (default: one epoch when pretraining, --epochs when fine-tuning)", type=count)
    add(g, "epochs", 2, "finetune: passes over the examples", type=count)
    # a negative decay would push weights away from 0
    add(g, "weight_decay", 0.1, "AdamW's, on matrices only", type=flag(float, 0))
    add(g, "grad_clip", 1.0, "clip the gradient's global norm to this; 0: no clipping", type=flag(float, 0))
    # None until below: its default depends on the device
    add(g, "compile", help="1: torch.compile the model (default: 1 on CUDA, 0 elsewhere)", type=int, choices=[0, 1])
    add(g, "fsdp", 0, "1: shard weights, gradients and optimizer state over the GPUs (FSDP2) instead of copying "
        "them to each (DDP); for models that do not fit one GPU with DDP; needs torchrun", type=int, choices=[0, 1])
    add(g, "activation_checkpointing", 0, "1: keep only each block's input and recompute the rest in the backward "
        "pass: ~1/3 more compute for long sequences and big micro-batches on small GPUs", type=int, choices=[0, 1])
    add(g, "eval_interval", help="steps between evaluations", type=count)
    add(g, "val_steps", help="val batches per evaluation, over all GPUs together", type=count)
    add(g, "eval_samples", 4, "lines sampled at each evaluation; 0: none", type=flag(int, 0))
    add(g, "ckpt_interval", help="steps between checkpoints (one is also saved at the end)", type=count)
    add(g, "peak_tflops", help="the GPU's bf16 peak for MFU (default: known for A100, H100, H200, L4, ...)",
        type=positive)
    add(g, "bench_steps", help="bench: timed steps, or rounds of generation", type=count)
    add(g, "bench_warmup", 5, "bench: first steps not counted (compilation)", type=flag(int, 0))
    add(g, "bench_anchor", 0, "bench: 1 also times build-nanogpt's step, interleaved", type=int, choices=[0, 1])
    add(g, "bench_generate", 0, "bench: 1 times generation against transformers instead", type=int, choices=[0, 1])
    add(g, "wandb_project", help="also log to this Weights & Biases project (pip install wandb)")
    g = p.add_argument_group("HellaSwag")
    add(g, "hellaswag", help="1: score HellaSwag (at every evaluation when pretraining)", type=int, choices=[0, 1])
    add(g, "hellaswag_path", "data/hellaswag/hellaswag_val.jsonl", "made by prepare_data.py --hellaswag")
    add(g, "hellaswag_limit", help="score only the first N items (default: all 10,042)", type=count)
    add(g, "hellaswag_convention", help="completion: GPT-2 paper / build-nanogpt (acc_norm per token); harness: "
        "lm-evaluation-harness (acc_norm per character); both", choices=["completion", "harness", "both"])
    g = p.add_argument_group("sampling and chat")
    add(g, "prompt", help="repeat for several prompts (default: \"Hello, I'm a language model,\")", action="append")
    add(g, "num_samples", 1, "samples per prompt", type=count)
    add(g, "max_new_tokens", help="tokens to generate at most", type=flag(int, 0))
    # 0 is allowed (greedy); a negative one would favour the unlikeliest tokens
    add(g, "temperature", help="0 is greedy; below 1 sharpens the distribution", type=flag(float, 0))
    add(g, "top_k", help="sample among the k likeliest tokens; 0: all", type=flag(int, 0))
    # (0, 1]: top_p 0 would drop every token, and softmax over all -inf is NaN
    add(g, "top_p", 1.0, "sample among the likeliest tokens holding this probability; 1: all", type=flag(float, 0, 1, above=True))
    if defaults:
        p.set_defaults(**defaults)  # a resumed run's saved flags; flags given now still win
    args = p.parse_args(argv)
    for key, value in MODE_DEFAULTS.get(args.mode, {}).items():  # None means not given: this mode's default
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seed is None and args.mode not in ("sample", "chat"):
        args.seed = 1337
    if args.compile is None:  # on CUDA only; 'auto' counts as CUDA where a GPU is
        args.compile = int(args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available())
    # checked now, not after the data and model have loaded
    if args.fsdp and args.mode in ("pretrain", "finetune", "bench") and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        p.error("--fsdp 1 shards over the processes torchrun starts (torchrun --nproc_per_node=N train_gpt2.py ...); "
                "one process has nothing to shard with: give --fsdp 0")
    if args.fsdp and args.hellaswag and args.mode == "pretrain":
        p.error("--hellaswag 1 during pretraining does not work with --fsdp 1 yet: give --hellaswag 0 and score "
                "the checkpoint with --mode eval")
    if args.mode == "bench" and not args.bench_generate and args.bench_warmup >= args.bench_steps:
        p.error(f"--bench_warmup {args.bench_warmup} leaves none of the {args.bench_steps} --bench_steps to time")
    return args


def resumed_args(argv, args):
    """A resumed run takes the flags it was started with; flags given now override them."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return args  # train() says there is nothing to resume
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["args"]  # mmap: reads only the args
        # those three say what to resume: always today's
        saved = {k: v for k, v in saved.items() if k not in ("init_from", "mode", "out_dir")}
    except Exception:  # truncated or foreign: train() loads it again and says what is wrong
        return args
    return parse_args(argv, defaults=saved)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)  # first pass: --out_dir says where the checkpoint to resume is
    modes = {"pretrain": train, "finetune": train, "eval": evaluate, "sample": sample, "chat": chat, "bench": bench,
             "plot": plot, "export": export}
    try:
        if args.init_from == "resume":
            args = resumed_args(argv, args)  # second pass, over the saved flags
        modes[args.mode](args)
    except UserError as e:  # a mistake the user can fix: one line; a bug keeps its traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C (training handles its first one itself, and saves)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)  # the shell's code for "killed by SIGINT"


if __name__ == "__main__":
    main()
