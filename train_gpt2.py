"""
GPT-2 in one file. The lecture reads top to bottom in the order things happen: the model and its
generation, the shard loader, the optimizer, one step, the pretraining loop, sampling, the command line.

    python train_gpt2.py --mode sample --init_from gpt2 --prompt "Hello, I'm a language model,"
    python prepare_data.py && python train_gpt2.py --mode pretrain    # GPT-2 124M: one GPU, a Mac or a CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --mode pretrain                   # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=IP_OF_NODE_0 --master_port=29500 ...
        ... train_gpt2.py --mode pretrain           # 2 nodes of 8 GPUs, on each (--node_rank=1 on the second)
    ... --mode pretrain --model gpt2-xl --batch_size 8 --fsdp 1 --activation_checkpointing 1  # GPT-2 XL, small GPUs
    python prepare_data.py --sft && python train_gpt2.py --mode finetune && python train_gpt2.py --mode chat
A marked appendix holds the rest: --mode eval, export, bench, plot... A mode's flags: --mode MODE --help
"""

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# The model, and its generation with a KV cache: one unit, to copy whole into a project

EOT_TOKEN = 50256  # <|endoftext|>: separates documents, ends an answer, stops generation


class UserError(ValueError):
    """A mistake the user can fix (a flag, a path, a file): one line, no traceback."""


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model reads (learned positions)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary: the token ids the model reads and predicts
    padded_vocab_size: int = (
        50257  # rows of wte and lm_head: 50304 = 128 * 393 tiles on a GPU (see lm_logits)
    )
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


PRESETS = {  # the four sizes OpenAI released, by their Hugging Face names: 124M, 350M, 774M, 1558M parameters
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
# OpenAI's checkpoints (and transformers') store these as Conv1D, (in, out); nn.Linear keeps (out, in)
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# GPT2Config's settings that change the computation: this model computes their defaults (OpenAI's)
HF_COMPUTATION = (
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "tie_word_embeddings",
    "n_inner",
    "add_cross_attention",
)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.n_head, self.layer_idx = (
            config.n_head,
            layer_idx,
        )  # layer_idx: which layer of a KVCache is ours
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1  # adds into the residual stream: see GPT._init_weights

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:  # generating: the positions fed before are keys too
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        # Whole sequences are causal: is_causal lets PyTorch pick the flash kernel. With a cache the keys start
        # first: KVCache.extend makes the mask. (No test on T, which torch.compile may make a symbol.)
        is_causal = attn_mask is None and kv_cache is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
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
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the positions fed so far, every layer's: one more token costs one position's work."""

    def __init__(self, config, batch_size, capacity):
        self.shape = (
            config.n_layer,
            batch_size,
            config.n_head,
            capacity,
            config.n_embd // config.n_head,
        )
        self.k = self.v = (
            None  # made by the first update in the keys' dtype: bf16 under bf16 autocast, half the size
        )
        self.real = (
            None  # (B, capacity): False at left padding, from which positions and masks follow
        )
        self.length = 0  # positions fed so far

    def extend(self, T, device, real=None):
        """T more positions (real (B, T): 0 at padding) -> their positions, (T,) or (B, T), and the
        attention mask: None for one query, else (B or 1, 1, T, past + T), True where it may look."""
        past, end = self.length, self.length + T
        if end > self.shape[3]:
            raise ValueError(f"the KV cache holds {self.shape[3]} positions, {end} asked")
        self.length = end
        if real is not None and not bool(real.all()) and self.real is None:
            self.real = torch.ones(self.shape[1], self.shape[3], dtype=torch.bool, device=device)
        if self.real is not None and real is not None:
            self.real[:, past:end] = real.bool()
        key_pos = torch.arange(end, device=device)  # (past + T,)
        query_pos = key_pos[past:, None]  # (T, 1)
        if self.real is None:  # no padding: query i sees keys 0 .. past + i
            return key_pos[past:], None if T == 1 else (key_pos <= query_pos)[
                None, None
            ]  # (1, 1, T, past + T)
        # A row's positions count its real tokens only: a padded row computes what it would alone.
        pos = (self.real[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        # earlier real tokens, and itself always: a padding query seeing nothing would give NaN
        visible = self.real[:, None, None, :end] | (key_pos == query_pos)  # (B, 1, T, past + T)
        return pos, (key_pos <= query_pos) & visible

    def update(self, layer, k, v):
        """Store one layer's (B, nh, T, hs) keys and values of the new positions; return all so far."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros_like(self.k)
        start = self.length - k.size(2)  # extend has counted the T new positions already
        self.k[layer, :, :, start : self.length], self.v[layer, :, :, start : self.length] = k, v
        return self.k[layer, :, :, : self.length], self.v[
            layer, :, :, : self.length
        ]  # (B, nh, past + T, hs)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """A token id per row of (B, vocab) logits: 0 is greedy; top_k, top_p (nucleus) keep the likeliest."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = (
            sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        )  # the likelier ones already reach top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits, targets), the mean over targets that are not -100, with the gradient made in place of
    log_softmax's output: backward makes no logits-sized buffer (torch's makes two: 825 MB at 8 x 256 x 50304)."""

    @staticmethod
    def forward(ctx, logits, targets):  # (N, V) floats, (N,) ids
        logp, counted = torch.log_softmax(logits, dim=-1), targets != -100  # (N, V), (N,)
        ctx.save_for_backward(logp, targets, counted)
        return (
            -(logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * counted).sum()
            / counted.sum()
        )

    @staticmethod
    def backward(
        ctx, grad
    ):  # (softmax - one-hot) / count on the counted rows, 0 on the others; it runs once
        logp, targets, counted = ctx.saved_tensors
        g = logp.exp_().scatter_add_(
            1, targets.clamp(min=0)[:, None], -counted[:, None].to(logp.dtype)
        )
        return g.mul_(
            (grad * counted / counted.sum().clamp(min=1))[:, None]
        ), None  # none counted: 0, as torch's


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = (
            self.lm_head.weight
        )  # tied, as GPT-2: one matrix reads tokens and scores them
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(
                module, "RESIDUAL_SCALE_INIT"
            ):  # 2 adds a block: the stream's variance stays
                std *= (
                    2 * self.config.n_layer
                ) ** -0.5  # put with depth (GPT-2 paper, section 2.3)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, pos, attn_mask=None, kv_cache=None):
        """ids (B, T) at positions pos, (T,) or (B, T) -> (B, T, C), before the final LayerNorm."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        return x

    def lm_logits(self, x):
        """(..., C) -> (..., padded_vocab_size) logits, -inf on the padded columns: never predicted."""
        logits = self.lm_head(x)  # all padded_vocab_size rows: the fast shape
        if self.config.padded_vocab_size > self.config.vocab_size:
            # In place and hidden from autograd: exact, as the gradient reaching a padded column is
            # softmax - one-hot = 0 - 0; a -inf bias or a slice would cost a pass over the logits.
            with torch.no_grad():
                logits[..., self.config.vocab_size :] = float("-inf")
        return logits

    def forward(self, idx, targets=None):
        """ids (B, T), targets (B, T) (-100: no loss) -> (B, T, vocab_size) logits, the mean loss (or None)."""
        if idx.size(1) > self.config.block_size:
            raise ValueError(
                f"sequence of {idx.size(1)} tokens is longer than block_size {self.config.block_size}"
            )
        return self.head(
            self.hidden_states(idx, torch.arange(idx.size(1), device=idx.device)), targets
        )

    def head(self, x, targets=None):
        """(B, T, C) -> forward's logits and loss: the last LayerNorm, the LM head, the loss (FSDP compiles it alone)."""
        logits = self.lm_logits(self.transformer.ln_f(x))  # (B, T, padded_vocab_size)
        loss = None
        if (
            targets is not None
        ):  # (B * T, padded_vocab_size) is a view of the logits; compiled, the loss fuses anyway
            cross_entropy = F.cross_entropy if torch.compiler.is_compiling() else CrossEntropy.apply
            loss = cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten()
            )  # (ignoring -100, as F.cross_entropy)
        return logits[..., : self.config.vocab_size], loss  # a view: (B, T, vocab_size)

    @classmethod
    def from_pretrained(cls, name_or_path, padded_vocab_size=None):
        """OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", from the Hugging Face
        hub) or a local Hugging Face GPT-2 folder. padded_vocab_size=50304: to train on at speed."""
        from safetensors import SafetensorError  # comes with transformers, only needed here
        from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()  # missing or mismatched weights are errors below, not warnings
        try:
            if (hf := AutoConfig.from_pretrained(name_or_path)).model_type != "gpt2":
                raise ValueError(f"it is a {hf.model_type} checkpoint, not a GPT-2 checkpoint")
            hf_model, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        except (OSError, ValueError, SafetensorError) as e:  # a missing, broken or foreign folder
            raise UserError(
                f"could not load {name_or_path!r} as a GPT-2 checkpoint: {(str(e) or repr(e)).splitlines()[0]}"
            ) from None
        if info["missing_keys"] or info["mismatched_keys"]:
            raise UserError(
                f"checkpoint {name_or_path!r} is broken: missing keys or shapes: "
                f"{sorted(map(str, info['missing_keys'] or info['mismatched_keys']))}"
            )
        same = {
            "activation_function": "gelu_pytorch_tanh",
            "n_inner": 4 * hf.n_embd,
        }  # the same maths, spelled otherwise
        for field in HF_COMPUTATION:  # another value would silently make another model
            if getattr(hf, field) not in (getattr(GPT2Config(), field), same.get(field)):
                raise UserError(
                    f"{name_or_path!r} sets {field}={getattr(hf, field)!r}, which this GPT-2 does not compute"
                )
        model = cls(
            GPTConfig(
                block_size=hf.n_positions,
                vocab_size=hf.vocab_size,
                n_layer=hf.n_layer,
                n_head=hf.n_head,
                n_embd=hf.n_embd,
                padded_vocab_size=max(padded_vocab_size or 0, hf.vocab_size),
            )
        )
        theirs = hf_model.state_dict()  # the same names as ours: a key-by-key copy
        with torch.no_grad():
            for key, param in model.state_dict().items():
                src = theirs[key].t() if key.endswith(CONV1D_WEIGHTS) else theirs[key]
                param[: src.size(0)].copy_(
                    src
                )  # wte / lm_head: the real rows; padded rows keep their init
        return model

    def next_logits(self, idx, cache, real=None):
        """idx (B, T) fed after what the cache holds -> the last position's (B, vocab_size) logits."""
        pos, attn_mask = cache.extend(idx.size(1), idx.device, real)
        x = self.transformer.ln_f(
            self.hidden_states(idx, pos, attn_mask, cache)[:, -1, :]
        )  # (B, C)
        # (padded_vocab, C) @ (C, B): x @ W.T in the layout CPU BLAS runs ~2.5x faster for a few rows
        return (self.lm_head.weight @ x.t()).t()[:, : self.config.vocab_size]  # (B, vocab_size)

    @torch.no_grad()
    def stream(
        self, input_ids, attention_mask=None, max_new_tokens=64, eos_token_id=EOT_TOKEN, **sampling
    ):
        """Yield each row's next token, (B,), when chosen; left padding: attention_mask 0 (see left_pad)."""
        B, T = input_ids.size()
        if T == 0:
            raise ValueError("the prompt is empty: give at least one token")
        window = self.config.block_size
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = attention_mask[:, -window:] if padded else None  # (B, T), at most window wide
        ids = input_ids[:, -window:]  # a prompt longer than the model reads: keep its end
        cache = KVCache(self.config, B, min(window, ids.size(1) + max_new_tokens))
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            if step == 0:
                logits = self.next_logits(ids, cache, mask)
            elif ids.size(1) <= window:  # the usual step: one new position, the rest is cached
                logits = self.next_logits(ids[:, -1:], cache)
            else:  # past block_size the window slides, and the positions in the keys with it: fed anew
                if padded:  # the tokens generated since the mask was cut are all real
                    mask = torch.cat([mask, mask.new_ones(B, ids.size(1) - mask.size(1))], dim=1)[
                        :, -window:
                    ]
                ids, cache = ids[:, -window:], KVCache(self.config, B, window)
                logits = self.next_logits(ids, cache, mask)
            next_token = sample_next_token(logits, **sampling)  # (B,)
            if (
                eos_token_id is not None
            ):  # a finished row goes on giving eos, as transformers pads it
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            yield next_token
            if eos_token_id is not None and bool(finished.all()):
                return
            ids = torch.cat(
                [ids, next_token[:, None]], dim=1
            )  # (B, T + 1); the cache remembers the padding

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """The prompt and up to max_new_tokens new tokens, (B, T + new), as transformers' generate."""
        return torch.cat(
            [input_ids]
            + [token[:, None] for token in self.stream(input_ids, attention_mask, **kwargs)],
            1,
        )


def left_pad(token_lists, pad_id=EOT_TOKEN):
    """(B, T) ids and mask of prompts of different lengths, right-aligned: next tokens in one column."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens) :], mask[row, width - len(tokens) :] = (
            torch.tensor(tokens, dtype=torch.long),
            1,
        )
    return ids, mask


# -----------------------------------------------------------------------------
# The data: pretraining shards, one optimizer step at a time
#
# prepare_data.py writes uint16 token shards and a meta.json listing them. Step s reads the same tokens
# however split over micro-steps and ranks: the same losses on 1 GPU or 8, resumed from two numbers.


class PretrainLoader:
    """(B, T) windows of a split's shards, read as one stream (a window may run on into the next
    shard: no token is skipped), the train shards in an order shuffled from (seed, epoch)."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337):
        self.meta = json.load(open(os.path.join(data_dir, "meta.json")))["splits"][
            split
        ]  # its shards, lengths, sha256
        self.names = [os.path.join(data_dir, name) for name in self.meta["shards"]]
        self.shards = [
            np.load(path, mmap_mode="r") for path in self.names
        ]  # the OS pages in what is read
        self.heads = [
            hashlib.sha256(shard[: 1 << 15]).hexdigest() for shard in self.shards
        ]  # a shard swapped shows
        self.total_tokens = sum(len(shard) for shard in self.shards)
        self.split, self.B, self.T, self.rank, self.world_size, self.seed = (
            split,
            batch_size,
            block_size,
            rank,
            world_size,
            seed,
        )
        self.position = 0  # where the next step starts in the epoch's stream
        self.set_epoch(0)

    def set_epoch(self, epoch):
        order = np.arange(
            len(self.shards)
        )  # val: in file order, so every evaluation reads the same tokens
        if self.split == "train":  # a fixed order would make the loss rise and fall with each epoch
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        self.order, self.order_names = (
            [self.shards[i] for i in order],
            [self.names[i] for i in order],
        )
        self.starts = np.cumsum(
            [0] + [len(s) for s in self.order]
        )  # where each shard begins in the stream
        self.epoch = epoch

    def read(self, start, n):
        """n tokens of the stream from start on, as int64 (what cross_entropy's targets must be)."""
        out, filled = np.empty(n, dtype=np.int64), 0
        shard = (
            int(np.searchsorted(self.starts, start, side="right")) - 1
        )  # the shard whose span holds start
        while filled < n:
            offset = (
                start + filled - self.starts[shard]
            )  # where the stream position falls in that shard
            piece = self.order[shard][offset : offset + n - filled]
            if (
                len(piece) and piece.max() >= 50257
            ):  # the embedding would fail with a device-side assert
                raise UserError(
                    f"{self.order_names[shard]} holds token id {int(piece.max())} near position "
                    f"{offset:,}, outside GPT-2's 50,257: re-run prepare_data.py for it"
                )
            out[filled : filled + len(piece)] = piece
            filled, shard = (
                filled + len(piece),
                shard + 1,
            )  # what is still missing comes from the next shard
        return out

    def window(self, start):
        tokens = torch.from_numpy(
            self.read(start, self.B * self.T + 1)
        )  # + 1: the last input's target
        return tokens[:-1].view(self.B, self.T), tokens[1:].view(
            self.B, self.T
        )  # inputs, next-token targets

    def steps_per_epoch(self, grad_accum):
        return (self.total_tokens - 1) // (
            grad_accum * self.world_size * self.B * self.T
        )  # - 1: the last target

    def next_step(self, grad_accum):
        """This rank's grad_accum micro-batches of the next optimizer step."""
        tokens_per_step = (
            grad_accum * self.world_size * self.B * self.T
        )  # every rank's micro-batches, end to end
        if self.position + tokens_per_step + 1 > self.total_tokens:  # the epoch is used up
            self.set_epoch(self.epoch + 1)
            self.position = 0
        # micro-step m of rank r reads the (m * world_size + r)-th block of B sequences
        batches = [
            self.window(self.position + (m * self.world_size + self.rank) * self.B * self.T)
            for m in range(grad_accum)
        ]
        self.position += tokens_per_step
        return batches

    def eval_steps(self, max_batches):
        return min(max_batches, (self.total_tokens - 1) // (self.B * self.T))

    def eval_batch(self, i):
        return self.window(i * self.B * self.T)  # the split's i-th batch, from its start

    def state_dict(
        self,
    ):  # (seed, epoch) gives the shard order; the shards' list: is it the same data on resume?
        return {"epoch": self.epoch, "position": self.position, "data": [self.meta, self.heads]}

    def load_state_dict(self, state):
        self.set_epoch(state["epoch"])
        self.position = state["position"]


# -----------------------------------------------------------------------------
# Training: the learning rate, AdamW, devices and precision, one step, checkpoints


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return (
            max_lr * (step + 1) / warmup_steps
        )  # step + 1: the first step trains at a small LR, not at 0
    if step >= max_steps:
        return min_lr  # past max_steps the cosine would climb back up
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizer(model, weight_decay, learning_rate):
    """AdamW, fused (one kernel for all); weight decay on matrices only: biases and gains need none."""
    params = [
        p for p in model.parameters() if p.requires_grad
    ]  # parameters() yields tied wte / lm_head once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # GPT-3's betas: beta2 0.95, not 0.999, follows a change in the gradients' scale in ~20 steps
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=True)


def pick_dtype(device, requested="auto"):
    """The matmuls' dtype (the weights stay float32): bfloat16 on GPUs that have it (A100, H100, RTX 30xx
    on), float16 on older ones (T4, V100: a gradient scaler), float32 on CPUs and Macs."""
    cuda = device.startswith("cuda")
    if requested == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"{torch.cuda.get_device_name(device)} has no bfloat16: use --dtype float16 (or auto)"
        )
    if requested != "auto":
        return getattr(torch, requested)
    return (
        (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if cuda
        else torch.float32
    )


def autocast(
    device, dtype
):  # matmuls in dtype, what needs range (softmax, norms, the loss) in float32
    return torch.autocast(str(device).split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


def setup_distributed(device="auto"):
    """(rank, local_rank, world_size, device); under torchrun, in the process group: NCCL or gloo."""
    if device == "auto":
        device = (
            "cuda"
            if torch.cuda.is_available()
            else "mps"
            if torch.backends.mps.is_available()
            else "cpu"
        )
    keep_freed_memory(
        device
    )  # (appendix) a CPU step's buffers are not mapped and zeroed afresh each step
    torch.set_float32_matmul_precision(
        "high" if device.startswith("cuda") else "highest"
    )  # float32 matmuls: TF32
    if (
        "LOCAL_RANK" not in os.environ
    ):  # (the flags' checks refused torchrun's variables left in a shell)
        return 0, 0, 1, device
    # set by torchrun: rank over all nodes, local_rank on this node (which GPU), world_size in all
    rank, local_rank, world_size = (
        int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    )
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)  # before NCCL starts: otherwise every rank opens it on GPU 0
    torch.distributed.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        device_id=torch.device(device) if device.startswith("cuda") else None,
    )
    return rank, local_rank, world_size, device


def all_reduce_sum(values):  # a tensor summed over all ranks, in place (one process: as it is)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


def forward_backward(model, micro_batches, dtype, scaler, stop=False):
    """The gradients of one optimizer step over this rank's micro-batches (on the device). Returns
    the loss, the mean over all ranks' targets, and whether any rank must stop (all stop together)."""
    # The mean over all the step's targets: micro-batches (and ranks, fine-tuning) hold different numbers
    # of them, so each mean is weighted by its share, times world_size as DDP and FSDP average over ranks.
    counts = torch.stack(
        [(y != -100).sum() for _, y in micro_batches]
    ).float()  # targets per micro-batch
    totals = all_reduce_sum(
        torch.stack([counts.sum(), torch.tensor(float(stop), device=counts.device)])
    )
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    loss_sum = 0.0
    for i, (x, y) in enumerate(micro_batches):
        last = (
            i == len(micro_batches) - 1
        )  # the gradients are averaged over ranks at the last one only
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
        with (
            model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        ):
            with autocast(x.device, dtype):
                loss = model(x, y)[
                    1
                ]  # the logits are dropped at once: one logits-sized buffer less in backward
            weight = (
                counts[i] / totals[0] * world_size
            )  # this micro-batch's share of the step's targets
            scaler.scale(
                loss * weight
            ).backward()  # float16: scaled up, so small gradients do not underflow
        loss_sum = loss_sum + loss.detach().float() * weight / world_size
    return all_reduce_sum(loss_sum.reshape(1)).item(), bool(totals[1] > 0)


def save_checkpoint(path, raw_model, optimizer, state, master):
    """Full weights and AdamW's state by parameter name, gathered into rank 0's CPU memory (every rank
    calls this under FSDP): one format, resumable on any number of GPUs, with or without FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(
        raw_model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if master:
        model_state["lm_head.weight"] = model_state[
            "transformer.wte.weight"
        ]  # tied: stored once, as state_dict() does
        checkpoint = {
            "model": model_state,
            "optimizer": optimizer_state,
            "config": asdict(raw_model.config),
            **state,
        }
        atomic_write(path, lambda f: torch.save(checkpoint, f))  # (appendix) whole, or not at all
        print(f"saved {path} at step {state['step']}")


# -----------------------------------------------------------------------------
# The pretraining loop (fine-tuning runs it too, with the appendix's loader)
#
# Check what can refuse the run, build (or resume) it, then loop: evaluate, step, log, save when proven.


@torch.no_grad()
def evaluate_loss(model, loader, max_batches, dtype):
    """Mean loss per target over the split's first max_batches batches, dealt to the ranks in turn; each
    runs as many forwards (FSDP gathers in each): a rank short of one repeats one, uncounted."""
    n, world_size, device = (
        loader.eval_steps(max_batches),
        loader.world_size,
        next(model.parameters()).device,
    )
    sums = torch.zeros(2, device=device)  # summed loss, and targets
    for i in range(loader.rank, math.ceil(n / world_size) * world_size, world_size):
        x, y = (t.to(device) for t in loader.eval_batch(min(i, n - 1)))
        with autocast(device, dtype):
            loss = model(x, y)[1]  # the logits are dropped at once
        count = (y != -100).sum() * (i < n)  # fine-tuning batches hold different numbers of targets
        sums += torch.stack([loss.float() * count, count.float()])
    sums = all_reduce_sum(sums)
    return (sums[0] / sums[1]).item()


def show_samples(model, enc, prompt, n, dtype):
    """n continuations of a prompt, by every rank (under FSDP each forward needs them all)."""
    ids = torch.tensor([prompt] * n, device=next(model.parameters()).device)  # (n, T)
    generator = torch.Generator(ids.device).manual_seed(
        42
    )  # fixed: samples differ only by the weights
    # eager: FSDP's compiled blocks would compile again for every layer and length, up to dynamo's limit
    with autocast(ids.device, dtype), torch.compiler.set_stance("force_eager"):
        out = model.generate(ids, max_new_tokens=32, top_k=50, generator=generator) if n else ids
    return [
        enc.decode(row[ids.size(1) :]).split("<|endoftext|>")[0] for row in out.tolist()
    ]  # until a document ends


def train(args):
    """--mode pretrain, and --mode finetune."""
    rank, local_rank, world_size, device = setup_distributed(args.device)
    master, pretrain, cuda = rank == 0, args.mode == "pretrain", device.startswith("cuda")
    say = print if master else (lambda *a, **k: None)  # the other ranks run silent
    dtype = pick_dtype(device, args.dtype)
    torch.manual_seed(args.seed)  # every rank the same seed: the same fresh weights everywhere
    # All that can refuse the run is checked now, before --out_dir is touched, not after hours of steps.
    model, checkpoint = model_to_train(
        args
    )  # (appendix) new, OpenAI's, ours, or the one to resume (its checkpoint)
    T = model.to(device).config.block_size
    check_data(
        args.data_dir, args.mode, args.batch_size, T
    )  # (appendix) meta.json, shards, examples
    Loader = PretrainLoader if pretrain else InstructionLoader  # (appendix: instruction examples)
    train_loader, val_loader = (
        Loader(args.data_dir, split, args.batch_size, T, rank, world_size, args.seed)
        for split in ("train", "val")
    )
    # total_batch_size = batch_size x block_size (pretraining counts tokens) x GPUs x grad_accum
    per_micro_step = args.batch_size * (T if pretrain else 1) * world_size
    if (
        args.total_batch_size % per_micro_step
    ):  # (in tokens when pretraining, examples when fine-tuning)
        raise UserError(
            f"--total_batch_size {args.total_batch_size} is not a multiple of {per_micro_step}, the batch x GPUs"
        )
    grad_accum = (
        args.total_batch_size // per_micro_step
    )  # micro-steps per optimizer step on each rank
    steps_per_epoch = train_loader.steps_per_epoch(grad_accum)
    if steps_per_epoch == 0:
        raise UserError(
            f"the train split of {args.data_dir} is less than one step: lower --total_batch_size"
        )
    max_steps = args.max_steps or steps_per_epoch * args.epochs
    hellaswag = (
        pretrain
        and args.hellaswag
        and load_hellaswag(
            args.hellaswag_path,
            args.hellaswag_limit,  # (appendix)
            args.hellaswag_convention,
        )
    )  # read now: a bad one fails now
    enc, template = (
        get_tokenizer(),
        getattr(train_loader, "template", None),
    )  # (appendix) tiktoken's; fine-tuning's template
    prompt, prompt_text = sample_prompt(
        args.prompt, enc, val_loader, template
    )  # (appendix) what samples continue
    if args.fsdp or args.activation_checkpointing:
        wrap_blocks(
            model, dtype, args
        )  # (appendix) before the optimizer: FSDP replaces the parameters
    optimizer = configure_optimizer(
        model, args.weight_decay, args.max_lr
    )  # its lr is set at every step
    scaler = torch.amp.GradScaler(
        device.split(":")[0], enabled=dtype == torch.float16
    )  # a no-op but in float16
    step = 0
    if (
        checkpoint is not None
    ):  # resume: the optimizer, the scaler, the data's position, the random state
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if (step := checkpoint["step"]) > max_steps:
            raise UserError(
                f"{args.out_dir} is at step {step}, past --max_steps {max_steps}: give at least {step}"
            )
        set_optimizer_state_dict(
            model,
            optimizer,
            checkpoint["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        scaler.load_state_dict(checkpoint["scaler"])
        if (
            checkpoint["loader"]["data"] != train_loader.state_dict()["data"]
        ):  # prepared again, or shards swapped
            raise UserError(
                f"{args.data_dir} is not the data this run was reading (prepared again?): resume on that "
                f"data, or start a new run from its weights with --init_from {args.out_dir}/ckpt.pt"
            )
        train_loader.load_state_dict(
            checkpoint["loader"]
        )  # the next step reads on: no batch twice, none skipped
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if cuda:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    start_step, saved_step, raw_model, weights_bad = (
        step,
        step or None,
        model,
        False,
    )  # saved_step: the one on disk
    if (
        args.compile and not args.fsdp
    ):  # (FSDP compiled each block, and the head, as it sharded them)
        model = torch.compile(model)
    if world_size > 1 and not args.fsdp:  # DDP: a whole copy on every GPU, gradients averaged
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if cuda else None
        )
    say(
        f"{args.mode}: {sum(p.numel() for p in raw_model.parameters()):,} parameters, {world_size} process(es) on "
        f"{device}, {grad_accum} micro-steps of {args.batch_size} a step, {max_steps} steps ({steps_per_epoch} an epoch)"
    )
    peak = (
        pretrain and cuda and peak_flops(device)
    )  # MFU: the step's FLOPs against the GPUs' peak (appendix)
    step_seconds_at_peak = (
        flops_per_token(raw_model) * args.total_batch_size / (peak * world_size) if peak else 0
    )
    log_path, checkpoint_path = (
        os.path.join(args.out_dir, "log.jsonl"),
        os.path.join(args.out_dir, "ckpt.pt"),
    )

    def log(
        entry, line
    ):  # log.jsonl (a crash loses at most the line being written), wandb, the screen
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if tracker:
                tracker.log(entry, step=entry["step"])
        say(line, flush=True)

    guard, tracker, t_start = (
        RunGuard(args.out_dir, master),
        None,
        time.time(),
    )  # (appendix) --out_dir locked; Ctrl-C
    try:
        if (
            master and checkpoint is not None
        ):  # a run killed after its checkpoint logged steps that are done again now
            truncate_log(log_path, step)  # (appendix)
        tracker = (
            start_wandb(args, checkpoint) if master and args.wandb_project else None
        )  # (appendix)
        checkpoint = None  # the weights and optimizer state are in place: the copy is freed
        while True:
            # what a checkpoint of this step holds besides the weights: taken before the loader moves on
            state = {
                "step": step,
                "loader": train_loader.state_dict(),
                "args": vars(args),
                "prompt_template": template,
                "scaler": scaler.state_dict(),
                "wandb_id": tracker and tracker.id,
                "rng": {
                    "cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if cuda else None,
                },
            }
            if step > start_step and (step % args.eval_interval == 0 or step == max_steps):
                model.eval()
                entry = {
                    "step": step,
                    "val_loss": evaluate_loss(model, val_loader, args.val_steps, dtype),
                }
                if hellaswag:
                    entry.update(
                        hellaswag_eval(raw_model, hellaswag, dtype, args.hellaswag_convention)
                    )
                log(
                    entry,
                    " | ".join(
                        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in entry.items()
                    ),
                )
                for i, text in enumerate(
                    show_samples(raw_model, enc, prompt, args.eval_samples, dtype)
                ):
                    say(f"--- sample {i + 1}\n{prompt_text}{text}")
                model.train()
            if step == max_steps:
                if step > start_step:
                    save_checkpoint(checkpoint_path, raw_model, optimizer, state, master)
                say(f"{args.out_dir} is at step {step} of --max_steps {max_steps}: done")
                break
            t0 = (
                time.time()
            )  # after the evaluation: a step's time is its data, forward, backward and update
            lr = get_lr(
                step, args.max_lr, args.max_lr * args.min_lr_ratio, args.warmup_steps, max_steps
            )
            for (
                group
            ) in optimizer.param_groups:  # both groups, with and without decay, follow the schedule
                group["lr"] = lr
            micro_batches = [
                (x.to(device), y.to(device)) for x, y in train_loader.next_step(grad_accum)
            ]
            loss, stop_now = forward_backward(
                model, micro_batches, dtype, scaler, guard.stop_requested
            )
            scaler.unscale_(
                optimizer
            )  # float16: the true gradients, for their norm and the clipping
            # clipped to a global norm of grad_clip (0: only measured); float16's scaler skips an overflow
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), args.grad_clip or math.inf
            ).item()
            if not (math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled())):
                weights_bad = True
                raise non_finite_error(
                    step, loss, grad_norm, checkpoint_path, saved_step
                )  # (appendix)
            # A checkpoint due at this step is written now that its weights have proved finite.
            if stop_now or (step > start_step and step % args.ckpt_interval == 0):
                save_checkpoint(checkpoint_path, raw_model, optimizer, state, master)
                saved_step = step
            if stop_now:  # this step's update is dropped: the checkpoint resumes it exactly
                say("stopped; continue with --init_from resume")
                break
            scaler.step(optimizer)  # optimizer.step(), unless float16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(
                set_to_none=True
            )  # None, not zeros: the memory is free until the next backward
            if cuda:
                torch.cuda.synchronize()  # the GPU runs behind Python: wait, so that dt is the step's time
            dt, step = time.time() - t0, step + 1  # step counts the steps done, as checkpoints do
            tokens = (
                sum(x.numel() for x, _ in micro_batches) * world_size
            )  # fine-tuning: padding included
            eta = (
                (time.time() - t_start) / (step - start_step) * (max_steps - step)
            )  # evaluations included
            entry = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "ms": 1000 * dt,
                "tok_per_s": tokens / dt,
                **({"mfu": step_seconds_at_peak / dt} if peak else {}),
            }
            log(
                entry,
                f"step {step:5d}/{max_steps} | loss {loss:.6f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
                f"{1000 * dt:.0f} ms | {tokens / dt:,.0f} tok/s"
                + (f" | MFU {100 * entry['mfu']:.1f}%" if peak else "")
                + f" | ETA {int(eta) // 60}m{int(eta) % 60:02d}s",
            )
    except (
        Exception
    ):  # no trained step is lost: they are saved first (unless bad, or under FSDP: see appendix)
        if (
            step > start_step
            and not weights_bad
            and state["step"] == step != saved_step
            and not args.fsdp
        ):
            with contextlib.suppress(
                Exception
            ):  # whatever failed (an evaluation, the disk, the data): it is reported
                save_checkpoint(checkpoint_path, raw_model, optimizer, state, master)
        raise
    finally:
        guard.close(tracker)  # Ctrl-C means Ctrl-C again; the lock is given back; wandb ends


# -----------------------------------------------------------------------------
# Sampling


def encode_prompt(enc, prompt, template=None):
    """A prompt's ids, in the fine-tuning template if any; "<|endoftext|>" samples unconditionally."""
    return enc.encode(
        template.format(instruction=prompt) if template else prompt,
        allowed_special={"<|endoftext|>"},
    )


def stream_text(model, enc, tokens, args, generator=None):
    """Print one answer as it is generated, token by token; return its text."""
    import codecs

    device = next(model.parameters()).device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T): a batch of one
    decoder, pieces = (
        codecs.getincrementaldecoder("utf-8")(errors="replace"),
        [],
    )  # a token may end mid-character
    with autocast(device, pick_dtype(str(device), args.dtype)):
        for token in model.stream(
            ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        ):
            if token.item() == EOT_TOKEN:  # the end of a fine-tuned answer, or of a document
                break
            pieces.append(decoder.decode(enc.decode_single_token_bytes(token.item())))
            print(pieces[-1], end="", flush=True)
    pieces.append(
        decoder.decode(b"", final=True)
    )  # bytes still held: a cut-off character shows as U+FFFD
    print(pieces[-1])
    return "".join(pieces)


def sample(args):
    """--mode sample: continue each --prompt (a fine-tuned model answers it)."""
    device = setup_distributed(args.device)[3]  # one process: sampling needs no torchrun
    prompts = args.prompt or ["Hello, I'm a language model,"]
    model, template = load_model(
        args.init_from
    )  # (appendix) ours (.pt, a run folder), a Hugging Face GPT-2, OpenAI's
    model.to(device).eval()
    enc = get_tokenizer()  # (appendix)
    token_lists = [
        encode_prompt(enc, prompt, template) for prompt in prompts
    ]  # a long one: its end is read
    generator = (
        torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    )  # None: fresh samples
    if len(prompts) == 1 and args.num_samples == 1:  # one answer: streamed as it comes, as in chat
        print(
            prompts[0], end="" if template is None else "\n", flush=True
        )  # a continuation goes on the same line
        stream_text(model, enc, token_lists[0], args, generator)
    else:  # (appendix) every prompt times num_samples, as one left-padded batch
        sample_batch(
            model,
            enc,
            prompts if template is None else [""] * len(prompts),
            token_lists,
            args,
            generator,
        )


# -----------------------------------------------------------------------------
# The command line: --mode says what to do, and which flags exist


def parse_args(argv):
    """One mode's flags, each with one default (--mode MODE --help); resume: the run's flags, unless given."""
    p = argparse.ArgumentParser(
        add_help=False,
        allow_abbrev=False,  # allow_abbrev: --max_l is not --max_lr
        formatter_class=HelpFormatter,
        description="GPT-2. --mode MODE --help: its flags",
    )
    p.error = lambda message: p.exit(
        2, f"error: {message} (see --help)\n"
    )  # one line, as every other mistake
    p.add_argument(
        "--mode",
        default="sample",
        help="what to do",
        choices=["pretrain", "finetune", "sample", "chat", "eval", "export", "bench", "plot"],
    )
    mode, add = (
        p.parse_known_args(argv)[0].mode,
        p.add_argument,
    )  # the mode decides which flags follow
    pre, train, count, count0 = (
        mode == "pretrain",
        mode in ("pretrain", "finetune"),
        number(int, 1),
        number(int, 0),
    )
    if mode not in (
        "bench",
        "plot",
    ):  # gpt2: or -medium, -large, -xl; a run folder: one holding ckpt.pt
        add(
            "--init_from",
            default="scratch" if pre else "gpt2",
            help="scratch | resume | gpt2 | a .pt | a run or HF folder",
        )
    if mode in ("pretrain", "finetune", "eval"):
        add("--data_dir", default="data/fineweb_edu_10B", help="a folder made by prepare_data.py")
    if mode not in ("sample", "chat", "bench"):
        add(
            "--out_dir",
            default=f"out/{mode}",
            help="the run's folder: ckpt.pt, log.jsonl, eval.json, plot.png",
        )
    if mode not in ("export", "plot"):
        add(
            "--device",
            default="auto",
            type=device_flag,
            help="auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps",
        )
        add(
            "--dtype",
            default="auto",
            choices=["auto", "bfloat16", "float16", "float32"],
            help="the matmuls' precision",
        )
        add("--seed", type=int, default=1337, help="data order, initial weights, sampling")
    if pre or mode == "bench":
        add(
            "--model",
            default="gpt2",
            choices=list(PRESETS),
            help="a new model's size (the next three override it)",
        )
        for name, what in (
            ("--n_layer", "transformer blocks"),
            ("--n_head", "attention heads"),
            ("--n_embd", "width"),
        ):
            add(name, type=count, help=f"{what}, instead of the --model's")
    if train or mode in ("eval", "bench"):
        add("--batch_size", type=count, default=64, help="micro-batch per GPU")
    if train or mode == "bench":
        add(
            "--block_size",
            type=count,
            help="sequence length (default: 1024 for a new model, else the model's)",
        )
        add(
            "--compile",
            type=int,
            choices=[0, 1],
            default=int(torch.cuda.is_available() and sys.platform != "win32"),
            help="1: torch.compile the model (it needs Triton: Linux with a GPU)",
        )
    if train or mode == "eval":
        add(
            "--val_steps", type=count, default=160, help="val batches per evaluation, over all GPUs"
        )
    if train:
        add(
            "--total_batch_size",
            type=count,
            default=524288,
            help="a step's tokens (finetune: examples), all GPUs",
        )
        add("--max_lr", type=number(float, 0, above=True), default=6e-4, help="peak learning rate")
        add(
            "--min_lr_ratio",
            type=number(float, 0, 1),
            default=0.1,
            help="the LR decays to max_lr x this",
        )
        add("--warmup_steps", type=count0, default=715, help="steps of linear warmup to max_lr")
        add(
            "--max_steps",
            type=count,
            help="optimizer steps (default: --epochs over the train split)",
        )
        add(
            "--epochs", type=count, default=1, help="passes over the train split, if no --max_steps"
        )
        add("--weight_decay", type=number(float, 0), default=0.1, help="AdamW's, on matrices only")
        add(
            "--grad_clip",
            type=number(float, 0),
            default=1.0,
            help="clip the gradients' global norm to this; 0: off",
        )
        add("--eval_interval", type=count, default=250, help="steps between evaluations")
        add("--eval_samples", type=count0, default=4, help="lines sampled at each evaluation")
        add(
            "--prompt",
            help="what they continue (default: the val split's start; finetune: an instruction)",
        )
        add(
            "--ckpt_interval",
            type=count,
            default=5000,
            help="steps between checkpoints (and one at the end)",
        )
    if mode in (
        "sample",
        "chat",
    ):  # nanoGPT's defaults: a small model at temperature 1 drifts into noise
        add("--max_new_tokens", type=count0, default=64, help="tokens to generate at most")
        add(
            "--temperature",
            type=number(float, 0),
            default=0.8,
            help="0 is greedy; below 1 sharpens the distribution",
        )
        add("--top_k", type=count0, default=200, help="sample among the k likeliest tokens; 0: all")
        add(
            "--top_p",
            type=number(float, 0, 1, above=True),
            default=1.0,
            help="among the likeliest with this probability",
        )
    if mode == "sample":
        add(
            "--prompt",
            action="append",
            help='repeat for several prompts (default: "Hello, I\'m a language model,")',
        )
        add("--num_samples", type=count, default=1, help="samples per prompt")
    for name, modes, kwargs in APPENDIX_FLAGS:  # (appendix) FSDP, wandb, HellaSwag, bench
        if mode in modes:
            add(name, **kwargs)
    p.set_defaults(**MODE_DEFAULTS.get(mode, {}))  # (appendix) the other modes' defaults
    add("-h", "--help", action="help", help=f"show the flags of --mode {mode}")
    args = p.parse_args(argv)
    resume = args.mode in ("pretrain", "finetune") and args.init_from == "resume"
    if (
        resume or mode == "eval"
    ):  # the run's flags, unless given now; eval: its data and val batches (its val loss)
        run = (
            saved_args(args.out_dir)
            if resume
            else saved_args(args.init_from, ("data_dir", "batch_size", "val_steps"))
        )
        p.set_defaults(**run)  # (appendix)
        args = p.parse_args(argv)
    check_args(p, args)  # (appendix) what spans several flags
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    modes = dict(
        pretrain=train,
        finetune=train,
        sample=sample,
        chat=chat,
        eval=evaluate,
        export=export,
        bench=bench,
        plot=plot,
    )
    try:
        modes[args.mode](args)
        if torch.distributed.is_initialized():  # a clean exit: NCCL warns about a group left open
            torch.distributed.destroy_process_group()
    except (
        UserError,
        OSError,
        torch.OutOfMemoryError,
    ) as e:  # what the user can fix, wherever it strikes: one line
        if not (line := one_line(e, args)):  # (appendix)
            raise  # a bug: it keeps its traceback
        sys.exit(f"error: {line}")
    except KeyboardInterrupt:  # Ctrl-C (training handles its first one itself, and saves)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)  # the shell's code for "killed by SIGINT"


# =============================================================================
# APPENDIX. The lecture ends here: what follows does not teach GPT-2. First the rest of
# what a training run needs (the guards that keep a user's work safe, fine-tuning, FSDP),
# then the other modes: eval, chat, export, bench, plot.
# =============================================================================

# -----------------------------------------------------------------------------
# The guards of a run: its flags, the files it reads, the folder it writes, its stop. Each thing a
# user gives is checked once, where it enters, before step 1 and before any output is touched; what
# fails says what to do in one line (main() does so for a full or read-only disk, wherever it strikes).

try:
    import fcntl  # the folder lock of a run (POSIX)
except ImportError:  # Windows: runs are not locked
    fcntl = None


def number(
    kind, low, high=None, above=False
):  # an argparse type: a number in its domain (no --max_steps -1)
    def parse(text):
        value = kind(text)  # argparse reports a ValueError as "invalid value"
        if not (
            math.isfinite(value)
            and (value > low if above else value >= low)
            and (high is None or value <= high)
        ):
            domain = (
                f"in {'(' if above else '['}{low:g}, {high:g}]"
                if high
                else f"{'>' if above else '>='} {low:g}"
            )
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {domain}")
        return value

    return parse


def device_flag(
    text,
):  # an argparse type: a device this machine has (--device cuda without a GPU is a mistake)
    try:  # torch says what a name means, and whether this machine has it
        return text if text == "auto" else torch.empty(0, device=text) is not None and text
    except (RuntimeError, AssertionError) as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device this machine has ({first_line(e)}); use auto, cpu, "
            "cuda, cuda:N or mps"
        ) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)", unless there is none to show
        return action.help if action.default is None else super()._get_help_string(action)


APPENDIX_FLAGS = [  # the appendix's flags: (name, the modes that take it, argparse's settings)
    (
        "--fsdp",
        ("pretrain", "finetune", "bench"),
        dict(type=int, choices=[0, 1], default=0, help="1: shard over the GPUs (FSDP2)"),
    ),
    (
        "--activation_checkpointing",
        ("pretrain", "finetune", "bench"),
        dict(type=int, choices=[0, 1], default=0, help="1: less memory"),
    ),
    (
        "--wandb_project",
        ("pretrain", "finetune"),
        dict(help="also log to this Weights & Biases project (pip install wandb)"),
    ),
    (
        "--hellaswag",
        ("pretrain", "eval"),
        dict(type=int, choices=[0, 1], default=0, help="1: score HellaSwag too"),
    ),
    (
        "--hellaswag_path",
        ("pretrain", "eval"),
        dict(default="data/hellaswag/hellaswag_val.jsonl", help="its items"),
    ),
    (
        "--hellaswag_limit",
        ("pretrain", "eval"),
        dict(type=number(int, 1), help="the first N items only (default: all)"),
    ),
    (
        "--hellaswag_convention",
        ("pretrain", "eval"),
        dict(
            default="completion",
            choices=["completion", "harness", "both"],
            help="GPT-2's or lm-evaluation-harness's",
        ),
    ),
    ("--bench_steps", ("bench",), dict(type=number(int, 1), default=20, help="steps timed")),
    (
        "--bench_warmup",
        ("bench",),
        dict(type=number(int, 0), default=5, help="steps not timed first (compilation)"),
    ),
]
MODE_DEFAULTS = {  # where the other modes' defaults differ from pretraining's
    "finetune": dict(
        init_from="gpt2",
        data_dir="data/alpaca",
        batch_size=8,
        total_batch_size=32,
        max_lr=2e-5,
        warmup_steps=100,
        epochs=2,
        eval_interval=200,
        val_steps=50,
        ckpt_interval=1000,
    ),  # a small LR
    "eval": dict(
        data_dir=None, batch_size=16, hellaswag=1, hellaswag_convention="both"
    ),  # either published number
    "sample": dict(seed=None),  # fresh samples every time, unless --seed is given
    "chat": dict(init_from="out/finetune", max_new_tokens=256, seed=None),
    "export": dict(init_from=None, out_dir=None),  # both must be given
    "bench": dict(block_size=1024),
    "plot": dict(out_dir="out/pretrain"),
}


def saved_args(path, names=None):
    """The flags (or those named) that a run (its folder or ckpt.pt) was started with, but those saying what to resume."""
    try:  # mmap: only the flags are read, not the weights
        saved = torch.load(
            os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path,
            map_location="cpu",
            weights_only=True,
            mmap=True,
        )["args"]
    except Exception:  # missing, unreadable or not ours: what reads it says what is wrong
        return {}
    return {
        k: v
        for k, v in saved.items()
        if k not in ("init_from", "mode", "out_dir") and k in (names or saved)
    }


def check_args(p, args):
    """What no flag's type can check alone, before anything runs."""
    env = {
        name: os.environ.get(name)
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    mistakes = [  # (what is wrong, what to say)
        (
            any(env.values())
            and not (all(env.values()) and all(env[k].isdigit() for k in list(env)[:3])),
            f"the environment sets {', '.join(f'{k}={v}' for k, v in env.items() if v)}, but not as torchrun does: start "
            "with torchrun, or unset them (unset RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT)",
        ),
        (
            args.mode == "export" and not (args.init_from and args.out_dir),
            "--mode export needs --init_from (a checkpoint "
            ".pt, a Hugging Face GPT-2 folder, a name such as gpt2) and --out_dir (a new folder)",
        ),
        (
            getattr(args, "fsdp", 0) and getattr(args, "hellaswag", 0) and args.mode == "pretrain",
            "--hellaswag 1 during pretraining does not work with --fsdp 1 yet: score the checkpoint with --mode eval",
        ),
        (
            args.mode == "sample" and not all(args.prompt or ["x"]),
            "the prompt is empty: give some text, or --prompt "
            '"<|endoftext|>" to sample unconditionally',
        ),
        (
            args.mode == "finetune" and args.init_from == "scratch",
            "--mode finetune starts from a trained model: --init_from "
            "gpt2, a .pt or a run folder (--mode pretrain trains one from scratch)",
        ),
        (
            getattr(args, "init_from", None) == "resume"
            and args.mode not in ("pretrain", "finetune"),
            "--init_from resume "
            f"continues a training run; to {args.mode} a run's model, give its folder (--init_from out/pretrain)",
        ),
        (
            0 < getattr(args, "temperature", 1) < 1e-3,
            "--temperature below 0.001 makes the logits overflow: 0 is greedy",
        ),
        (
            args.mode == "bench" and args.bench_warmup >= args.bench_steps,
            "--bench_warmup leaves none of the --bench_steps to time: give fewer warm-up steps, or more steps",
        ),
    ]
    for wrong, message in mistakes:
        if wrong:
            p.error(message)
    if getattr(args, "init_from", None) in PRESETS and (
        message := not_downloadable(args.init_from)
    ):
        p.error(message)  # in seconds, not after a minute of retries


def not_downloadable(name):
    """Why OpenAI's checkpoint `name` cannot be had now, or None: it is cached, the hub answers, or a proxy may."""
    import socket
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache

    host = constants.ENDPOINT.split("://")[-1].split("/")[
        0
    ]  # huggingface.co, or the HF_ENDPOINT mirror
    try:
        if not (
            os.path.isdir(name)
            or isinstance(try_to_load_from_cache(name, "config.json"), str)
            or {"https", "all"} & urllib.request.getproxies().keys()
        ):  # a proxy: only a download can tell
            socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        return (
            f"--init_from {name} is downloaded from {host} once, and {host} cannot be reached ({e.strerror or e}): "
            "connect once, or give a local model (a Hugging Face GPT-2 folder, an export, a .pt)"
        )


def get_tokenizer():
    import tiktoken  # imported late, so that the model above can be copied without it

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # tiktoken downloads GPT-2's files once; offline that fails deep in requests
        raise UserError(
            "tiktoken has no GPT-2 files (it downloads them once): offline, set TIKTOKEN_CACHE_DIR to them"
        ) from None


def keep_freed_memory(device):
    """CPU: freed buffers (up to 2 GiB) stay in the process, not given back for the kernel to zero again each step."""
    import ctypes

    with contextlib.suppress(
        OSError, AttributeError
    ):  # another C library (macOS, Windows, musl): as it is
        if device == "cpu":
            libc = ctypes.CDLL("libc.so.6")
            (
                libc.mallopt(-3, 2**31 - 1),
                libc.mallopt(-1, 2**31 - 1),
            )  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (C ints)


def atomic_write(path, write):  # a crash or a full disk never leaves half a file under path
    tmp = f"{path}.tmp"  # same folder: a rename is atomic only within one filesystem
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the real file
        os.replace(tmp, path)  # a reader sees the old file or the new one, never a mix
    except Exception as e:
        raise_if_disk_full(path, e)  # torch.save says "unexpected pos" when the disk is full
        raise
    finally:  # after a full disk or a Ctrl-C, no .tmp is left behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def raise_if_disk_full(
    path, error
):  # after a failed write to path: an OSError that says so, in the writer's stead
    if (
        not isinstance(error, OSError)
        and shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**24
    ):
        raise OSError(
            errno.ENOSPC, os.strerror(errno.ENOSPC), path
        ) from error  # (16 MiB: what such a failure leaves)


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][
        :300
    ]  # for a one-line message


REPREPARE = "re-run prepare_data.py for it (prepare_data.py --verify names the broken file)"


def load_array(path, dtype, length=None):
    """A .npy file of prepare_data.py's, memory-mapped, its header and length checked (which costs nothing)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (
        OSError,
        ValueError,
    ) as e:  # missing, a header numpy cannot read, or fewer bytes than it says
        raise UserError(
            f"{path} is {e.strerror if isinstance(e, OSError) else 'cut short or not .npy'}: {REPREPARE}"
        ) from None
    if array.dtype != dtype or array.ndim != 1 or (length is not None and len(array) != length):
        raise UserError(
            f"{path} holds {array.dtype} of shape {array.shape}, but meta.json says "
            f"{'' if length is None else f'{length:,} '}{np.dtype(dtype)}: {REPREPARE}"
        )
    return array


def check_data(data_dir, mode, batch_size, block_size):
    """A data folder before a run reads it: its meta.json, its kind (returned), every shard whole and as long."""
    try:
        meta = json.load(open(os.path.join(data_dir, "meta.json")))
        kind, splits = meta["kind"], [meta["splits"][split] for split in ("train", "val")]
        shards = (
            [list(zip(s["shards"], s["shard_tokens"])) for s in splits]
            if kind == "pretrain"
            else []
        )
    except (
        FileNotFoundError,
        NotADirectoryError,
    ):  # missing, unprepared, or a text file, not yet tokenized
        sft, folder = (
            " --sft" if mode == "finetune" else "",
            os.path.join("data", os.path.basename(data_dir).split(".")[0]),
        )
        raise UserError(
            f"--data_dir {data_dir} is a file: run python prepare_data.py{sft} --files {data_dir} --out_dir "
            f"{folder}, then give --data_dir {folder}"
            if os.path.isfile(data_dir)
            else f"data folder {data_dir}"
            f" not found, or not prepared (no meta.json): run prepare_data.py{sft} (the same command resumes "
            "an interrupted one)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:  # not JSON, or not prepare_data.py's
        raise UserError(
            f"{data_dir}/meta.json is not prepare_data.py's ({type(e).__name__}: {e}): {REPREPARE}"
        ) from None
    if kind != {"pretrain": "pretrain", "finetune": "sft"}.get(mode, kind):
        raise UserError(
            f"{data_dir} holds {kind} data, but --mode {mode} reads "
            + (
                "instruction data (prepare_data.py --sft)"
                if mode == "finetune"
                else "pretraining shards (prepare_data.py)"
            )
        )
    if shards and not all(shards):
        raise UserError(
            f"{data_dir} has no {'train' if not shards[0] else 'val'} shards: {REPREPARE}"
        )
    [
        load_array(os.path.join(data_dir, name), np.uint16, length)
        for named in shards
        for name, length in named
    ]
    if (
        shards and sum(n for _, n in shards[1]) - 1 < batch_size * block_size
    ):  # found now, not at the first evaluation
        raise UserError(
            f"the val split of {data_dir} ({sum(n for _, n in shards[1]):,} tokens) is shorter than one batch"
            f" of {batch_size} x {block_size}: lower --batch_size{'' if mode == 'eval' else ' or --block_size'}"
        )
    return kind


def load_checkpoint(path, keys=("model", "config")):
    """A checkpoint of this file's, checked before anything trusts it, and its model."""
    try:  # weights_only: a checkpoint is data, and loading it must never run code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # truncated, random bytes, another program's file, Python objects besides tensors
        if refused := re.search(
            r"GLOBAL (\S+)", str(e)
        ):  # weights_only refused it: loading it would run code
            raise UserError(
                f"{path} holds a Python object ({refused[1]}), which loading would run: re-save its tensors"
            ) from None
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line(e)[:150]}): it may be "
            "truncated or not a PyTorch file; pick another checkpoint"
        ) from None
    if missing := [
        key for key in keys if not isinstance(checkpoint, dict) or key not in checkpoint
    ]:
        found = (
            ", ".join(map(str, checkpoint))[:200]
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise UserError(
            f"{path} is not a checkpoint of train_gpt2.py: it has no {', '.join(missing)} (found: {found})"
        )
    try:
        (model := GPT(GPTConfig(**checkpoint["config"]))).load_state_dict(checkpoint["model"])
    except (
        TypeError,
        ValueError,
        RuntimeError,
    ) as e:  # another model's config or weights (nanoGPT's, say)
        raise UserError(f"{path} does not hold this file's GPT-2: {first_line(e)[:200]}") from None
    return model, checkpoint


def load_model(init_from, padded_vocab_size=None):
    """(model, fine-tuning template or None): from our .pt or run folder, a Hugging Face GPT-2 folder, or OpenAI's."""
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        init_from = os.path.join(init_from, "ckpt.pt")  # a run folder: its checkpoint
    if os.path.isfile(init_from):
        model, checkpoint = load_checkpoint(init_from)  # (appendix: checked to be ours)
        return model, checkpoint.get("prompt_template")
    if init_from.endswith(".pt") or (init_from not in PRESETS and not os.path.isdir(init_from)):
        raise UserError(
            f"unknown model {init_from!r} (not found): use one of {', '.join(PRESETS)}, a checkpoint .pt, "
            "a run folder holding ckpt.pt, or a folder holding a Hugging Face GPT-2"
        )
    model, config = (
        GPT.from_pretrained(init_from, padded_vocab_size),
        os.path.join(init_from, "config.json"),
    )
    if (
        model.config.vocab_size != 50257
    ):  # tiktoken's GPT-2 tokenizer would give ids it lacks, or never its own
        raise UserError(
            f"{init_from} reads {model.config.vocab_size:,} token ids, not GPT-2's 50,257: another tokenizer's"
        )
    return model, json.load(open(config)).get("prompt_template") if os.path.isfile(config) else None


def new_model_config(args):
    """A new model's size: the --model preset, or --n_layer --n_head --n_embd where given."""
    size = {
        **PRESETS[args.model],
        **{k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)},
    }
    if size["n_embd"] % size["n_head"]:
        raise UserError(
            f"--n_embd {size['n_embd']} is not a multiple of --n_head {size['n_head']}: each head takes "
            "an equal slice of the width"
        )
    return GPTConfig(
        block_size=args.block_size or 1024, padded_vocab_size=50304, **size
    )  # 50304: the fast LM head


def model_to_train(args):
    """(model, checkpoint to resume or None): to resume, new, or loaded and cut to --block_size; never over a run."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.init_from == "resume":
        if not os.path.exists(path):
            raise UserError(
                f"nothing to resume: {path} does not exist (start a run with "
                f"--init_from {'scratch' if args.mode == 'pretrain' else 'gpt2'})"
            )
        model, checkpoint = load_checkpoint(
            path, ("model", "config", "optimizer", "step", "loader", "rng", "args")
        )
        if (was := checkpoint["args"].get("mode")) != args.mode:
            raise UserError(
                f"{path} is a --mode {was} run: resume it with --mode {was}, or start a {args.mode} run "
                f"with --init_from {path}"
            )
        for flag in (
            "model",
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "seed",
        ):  # what made its weights and order
            if getattr(args, flag, None) != checkpoint["args"].get(flag):
                raise UserError(
                    f"--{flag} {getattr(args, flag, None)} differs from the run's {checkpoint['args'].get(flag)}:"
                    f" a resumed run keeps its model and data order; start a new run with --init_from {path}"
                )
        return model, checkpoint
    if any(os.path.exists(os.path.join(args.out_dir, name)) for name in ("ckpt.pt", "log.jsonl")):
        raise UserError(
            f"{args.out_dir} already holds a checkpoint or log of an earlier run: continue it with "
            "--init_from resume, or choose another --out_dir"
        )
    if args.init_from == "scratch":
        return GPT(new_model_config(args)), None
    model, _ = load_model(args.init_from, padded_vocab_size=50304)
    if (args.block_size or 0) > model.config.block_size:
        raise UserError(
            f"--block_size {args.block_size} is longer than the {model.config.block_size} positions "
            f"{args.init_from} has learned: give at most {model.config.block_size}"
        )
    if (
        args.block_size and args.block_size < model.config.block_size
    ):  # shorter sequences: the first positions
        model.config.block_size = args.block_size
        model.transformer.wpe.weight = nn.Parameter(
            model.transformer.wpe.weight[: args.block_size].clone()
        )
    return model, None


def sample_prompt(prompt, enc, val_loader, template):
    """(tokens, text) the samples continue: --prompt, an instruction, or the val split's start (the corpus's style)."""
    if template:
        prompt = prompt or "Give three tips for staying healthy."
        return encode_prompt(enc, prompt, template), prompt + "\n"
    tokens = (
        encode_prompt(enc, prompt) if prompt else val_loader.read(0, 9).tolist()
    )  # <|endoftext|> and 8 more
    return tokens, enc.decode([t for t in tokens if t != EOT_TOKEN])


class RunGuard:
    """A run's hold on --out_dir (an flock on the folder, dropped by the kernel if the process dies; not on Windows):
    two runs would mix checkpoints and logs. And its stop button: Ctrl-C or SIGTERM saves at the next step, stops."""

    def __init__(self, out_dir, master):
        self.out_dir, self.made, self.folder, self.stop_requested = (
            out_dir,
            not os.path.exists(out_dir),
            None,
            False,
        )
        try:
            if master:
                os.makedirs(out_dir, exist_ok=True)
                self.folder = os.open(out_dir, os.O_RDONLY)
                if fcntl:  # LOCK_NB: refuse at once, rather than wait for the other run
                    fcntl.flock(self.folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.close()
            raise UserError(
                f"another run is using {out_dir}: wait for it to end, or choose another --out_dir"
                if self.folder is not None
                else f"--out_dir {out_dir} is a file: choose a folder"
                if os.path.isfile(out_dir)
                else f"cannot write to --out_dir {out_dir}: {e.strerror}"
            ) from None
        self.previous = {
            sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def handler(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop_requested = (
            True  # a flag only: the loop acts on it between steps, where a checkpoint is whole
        )
        print(
            "\nstopping: a checkpoint will be saved at the next step; Ctrl-C again to quit at once",
            flush=True,
        )

    def close(self, tracker=None):
        """Give back the signals and the lock, end wandb, and remove the folder if the run made it in vain."""
        for sig, handler in getattr(self, "previous", {}).items():
            signal.signal(sig, handler)
        if tracker:
            tracker.finish()
        if self.folder is not None:
            os.close(self.folder)  # releases the lock
            if self.made:
                with contextlib.suppress(OSError):  # rmdir refuses a folder that is not empty
                    os.rmdir(self.out_dir)


def non_finite_error(
    step, loss, grad_norm, checkpoint_path, saved_step
):  # its update was not applied
    where = (
        f"the last good checkpoint is {checkpoint_path} at step {saved_step} (resume it with a lower --max_lr, "
        "or check the data)"
        if saved_step not in (None, step)
        else "no checkpoint before it to go back to: start again with a lower --max_lr"
    )
    return UserError(
        f"the loss became non-finite at step {step + 1} (loss {loss:.4g}, gradient norm {grad_norm:.4g}); "
        f"{where}"
    )


def one_line(e, args):
    """main()'s line for what the user can fix (a mistake, memory, a full or read-only disk), or None: a bug."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(
        e, torch.OutOfMemoryError
    ):  # how much memory, and a micro-batch half as big (half the activations)
        cuda, train = (
            torch.cuda.is_available() and torch.cuda.is_initialized(),
            args.mode in ("pretrain", "finetune"),
        )
        where = (
            f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB on {torch.cuda.get_device_name()}"
            if cuda
            else "this machine"
        )
        if getattr(args, "batch_size", 1) > 1:
            return (
                f"--batch_size {args.batch_size} does not fit in {where}: try --batch_size {args.batch_size // 2}"
                + ("; --total_batch_size keeps each step the same" if train else "")
            )
        return f"the model does not fit in {where}: try a smaller one" + (
            ", or --activation_checkpointing 1" if train else ""
        )
    full, filled = "free some space, or ", "another command filled it meanwhile: "
    fix = {
        errno.ENOSPC: full,
        errno.EDQUOT: full,
        errno.ENOTEMPTY: filled,
        errno.EEXIST: filled,
        errno.EROFS: "",
        errno.EACCES: "check its permissions, or ",
        errno.EPERM: "check its permissions, or ",
    }.get(e.errno)
    return fix is not None and (
        f"cannot use {e.filename2 or e.filename or getattr(args, 'out_dir', None) or 'a file'}: "
        f"{e.strerror}; {fix}choose another folder"
    )


def truncate_log(path, step):
    """log.jsonl cut after `step`'s entries (a run killed after its checkpoint logged steps it now redoes)."""
    with contextlib.suppress(FileNotFoundError), open(path, "r+b") as f:
        kept = itertools.takewhile(
            lambda line: line.endswith(b"\n") and json.loads(line)["step"] <= step, f
        )
        f.truncate(sum(map(len, kept)))


def start_wandb(args, checkpoint):
    """A Weights & Biases run that receives what log.jsonl receives; a resumed run continues it."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs wandb: pip install wandb") from None
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.login(
        prompt=False, verify=False
    ):
        raise UserError(
            "--wandb_project needs a Weights & Biases login: run wandb login, or set WANDB_MODE=offline"
        )
    run_id = (checkpoint or {}).get("wandb_id")  # saved in every checkpoint
    return wandb.init(
        project=args.wandb_project,
        name=os.path.basename(os.path.normpath(args.out_dir)),
        config=vars(args),
        dir=args.out_dir,
        id=run_id,
        resume="allow" if run_id else None,
    )


# -----------------------------------------------------------------------------
# Fine-tuning: instruction examples (prepare_data.py --sft), the loss on the answers only


class InstructionLoader:
    """Instruction examples padded to the longest, labels -100 on the prompt and padding: the loss counts the answer
    and its <|endoftext|>. A step's examples, sorted by length, make its micro-batches, the same on any number of GPUs."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337):
        meta = json.load(open(os.path.join(data_dir, "meta.json")))
        self.template = meta["prompt_template"]  # chat and sample wrap prompts in it
        path = lambda name: os.path.join(data_dir, f"{split}_{name}.npy")  # noqa: E731
        self.tokens = load_array(path("tokens"), np.uint16)  # every example's tokens, end to end
        self.mask = load_array(
            path("mask"), np.uint8
        )  # per token, 1 where it is a target: the answer
        self.offsets = load_array(
            path("offsets"), np.int64
        )  # example i is tokens[offsets[i]:offsets[i + 1]]
        self.n, self.lengths = (
            len(self.offsets) - 1,
            np.diff(self.offsets),
        )  # examples, and tokens in each
        if self.n < 1:
            raise UserError(f"{data_dir} has no {split} examples: re-run prepare_data.py --sft")
        # Instruction data is small (Alpaca: ~10M tokens): checked whole, up front.
        if (
            self.offsets[0] != 0
            or self.offsets[-1] != len(self.tokens)
            or len(self.mask) != len(self.tokens)
            or (self.lengths < 2).any()
            or self.tokens.max() >= 50257
        ):
            raise UserError(
                f"the {split} files of {data_dir} do not agree with each other (lengths, offsets or token "
                "ids): re-run prepare_data.py --sft for this folder"
            )
        if self.lengths.max() > block_size + 1:
            raise UserError(
                f"{data_dir} has examples of {self.lengths.max()} tokens, more than the model's block_size "
                f"{block_size} + 1: prepare it again for this model, with {meta.get('command', 'its command')}"
                f" --block_size {block_size} --out_dir {data_dir} --overwrite"
            )
        self.B, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.data = [
            hashlib.sha256(array).hexdigest() for array in (self.tokens, self.mask, self.offsets)
        ]  # ~20 ms
        self.epoch, self.step_in_epoch = 0, 0  # an epoch's order follows from (seed, epoch)

    def batch(self, indices):
        """(B, L) inputs and labels of these examples, L the longest of them minus one."""
        width = max(int(self.lengths[i]) for i in indices) - 1
        x = torch.full(
            (len(indices), width), EOT_TOKEN, dtype=torch.long
        )  # right padding: never seen by a causal model
        y = torch.full((len(indices), width), -100, dtype=torch.long)  # -100: ignored by the loss
        for row, i in enumerate(indices):
            start, end = self.offsets[i], self.offsets[i + 1]
            tokens = torch.from_numpy(self.tokens[start:end].astype(np.int64))
            is_target = torch.from_numpy(
                self.mask[start + 1 : end].astype(bool)
            )  # does token t + 1 count?
            x[row, : end - start - 1] = tokens[:-1]
            y[row, : end - start - 1] = tokens[1:].masked_fill(
                ~is_target, -100
            )  # the prompt's targets: -100
        return x, y

    def steps_per_epoch(self, grad_accum):
        return self.n // (
            grad_accum * self.world_size * self.B
        )  # the last few examples sit an epoch out

    def next_step(self, grad_accum):
        per_step = (
            grad_accum * self.world_size * self.B
        )  # examples per optimizer step, over all ranks
        if self.step_in_epoch >= self.steps_per_epoch(grad_accum):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(
            self.n
        )  # made again each step: 2 numbers resume
        step = order[
            self.step_in_epoch * per_step : (self.step_in_epoch + 1) * per_step
        ]  # the same on every rank
        step = step[
            np.argsort(self.lengths[step], kind="stable")
        ]  # by length; equal lengths keep their order
        self.step_in_epoch += 1
        # micro-step m of rank r takes the (m * world_size + r)-th run of B examples, as PretrainLoader does
        return [
            self.batch(step[(m * self.world_size + self.rank) * self.B :][: self.B])
            for m in range(grad_accum)
        ]

    def eval_steps(self, max_batches):
        return min(
            max_batches, math.ceil(self.n / self.B)
        )  # the last batch may be short: every example counts

    def eval_batch(self, i):
        return self.batch(
            range(i * self.B, min((i + 1) * self.B, self.n))
        )  # in file order: the same loss each time

    def state_dict(self):
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "data": self.data}

    def load_state_dict(self, state):
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]


# -----------------------------------------------------------------------------
# FSDP and activation checkpointing: bigger models on smaller GPUs


def wrap_blocks(model, dtype, args):
    """In place, as torchtitan: each block checkpointed, compiled, sharded (FSDP2); then the root (wte = lm_head)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 gathers weights cast to the compute dtype (half the traffic); AdamW's float32 shards stay the master
    mp_policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32
    )
    if (
        args.fsdp and not torch.distributed.is_initialized()
    ):  # one process, to try FSDP on one GPU: a group of one
        torch.distributed.init_process_group(
            "nccl" if next(model.parameters()).is_cuda else "gloo",
            rank=0,
            world_size=1,
            store=torch.distributed.HashStore(),
        )
    for i, block in enumerate(model.transformer.h):
        if args.activation_checkpointing:
            # the block keeps its input only and runs again in backward: saved activations ~34 -> 2 x (B, T, C)
            model.transformer.h[i] = block = checkpoint_wrapper(block)
        if args.fsdp:
            if args.compile:
                block.compile()  # per block (without FSDP the whole model is compiled)
            # one all-gather in the forward and one reduce-scatter in the backward a block
            fully_shard(block, mp_policy=mp_policy)
    if args.fsdp:
        if args.compile:  # the LM head and the loss too: the step's largest tensors, fused as a whole-model compile does
            model.head = torch.compile(model.head)
        import warnings  # forward returns a view of its logits, and nothing writes into it in place

        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        fully_shard(
            model, mp_policy=mp_policy, reshard_after_forward=False
        )  # its weights are needed again at once
    return model


# -----------------------------------------------------------------------------
# HellaSwag and --mode eval: each rank scores its share, and the sums are all-reduced, so
# that the numbers are one process's whatever the number of GPUs


def load_hellaswag(path, limit=None, convention="completion"):
    """prepare_data.py --hellaswag's items, each checked (a broken one would be scored, silently, as wrong)."""
    texts = ("ctx",) + (
        ("activity_label", "ctx_a", "ctx_b") if convention != "completion" else ()
    )  # harness: its query's
    if not os.path.exists(path):
        raise UserError(
            f"{path} not found: run prepare_data.py --hellaswag (or give --hellaswag_path)"
        )
    items = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported like any bad line
        lines = (
            (number, line) for number, line in enumerate(f, 1) if line.strip()
        )  # a blank line is no item
        for number, line in itertools.islice(lines, limit):  # (limit None: all)
            try:
                item = json.loads(line)
                ok = (
                    all(isinstance(item.get(k), str) for k in texts)
                    and len(item["endings"]) == 4
                    and all(isinstance(e, str) for e in item["endings"])
                    and item["label"] in (0, 1, 2, 3)
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if not ok:
                raise UserError(
                    f"{path}, line {number}: not a HellaSwag item ({', '.join(texts)}, 4 endings, a label "
                    "0-3): re-run prepare_data.py --hellaswag --overwrite"
                )
            items.append(item)
    if not items:
        raise UserError(f"{path} holds no HellaSwag items: re-run prepare_data.py --hellaswag")
    return items


def harness_item(item):
    """The item as lm-evaluation-harness asks it: the activity label and both halves of the context (the second
    capitalized) as the query; query and endings cleaned of WikiHow's bracketed tags ("[title]", "[step]")."""

    def clean(text):
        return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")

    query = clean(item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize())
    return {
        "ctx": query,
        "endings": [clean(ending) for ending in item["endings"]],
        "label": item["label"],
    }


@torch.no_grad()
def score_endings(model, enc, items, dtype, max_batch_tokens=8192, progress=False):
    """Each item's 4 endings' losses after its context, (n, 4) summed and (n, 4) per token; only their positions go
    through the LM head. Sorted by length, in right-padded batches of at most max_batch_tokens: bounded memory."""
    from tqdm import tqdm

    T, device = model.config.block_size, next(model.parameters()).device
    rows, spans = [], []  # each candidate's tokens, and how many at its end are the ending's
    for item in items:
        context = enc.encode(item["ctx"])
        for ending in item["endings"]:
            ending_tokens = enc.encode(
                " " + ending
            )  # the space belongs to the ending's first token
            rows.append((context + ending_tokens)[-T - 1 :])  # too long: keep the end
            spans.append(min(len(ending_tokens), len(rows[-1]) - 1))
    order = sorted(
        range(len(rows)), key=lambda i: len(rows[i])
    )  # shortest first: a batch's rows are alike
    sums, start = torch.zeros(len(rows)), 0  # (4n,): each candidate's summed ending loss
    with tqdm(
        total=len(items), unit="item", desc="HellaSwag", disable=not progress, leave=False
    ) as bar:
        while start < len(order):
            end = (
                start + 1
            )  # sorted, so a batch's last row is its widest: grow the batch while it fits
            while (
                end < len(order)
                and (end + 1 - start) * (len(rows[order[end]]) - 1) <= max_batch_tokens
            ):
                end += 1
            batch, width = (
                order[start:end],
                len(rows[order[end - 1]]) - 1,
            )  # a row's last token is only a target
            ids = torch.full((len(batch), width), EOT_TOKEN, dtype=torch.long)
            targets = torch.full(
                (len(batch), width), -100, dtype=torch.long
            )  # -100: not the ending's
            for r, i in enumerate(batch):
                tokens, n = torch.tensor(rows[i]), len(rows[i]) - 1
                ids[r, :n] = tokens[:-1]
                targets[r, n - spans[i] : n] = tokens[
                    n - spans[i] + 1 :
                ]  # the ending's tokens only
            ids, targets = ids.to(device), targets.to(device)
            counted = targets != -100  # (b, width)
            with autocast(device, dtype):
                x = model.hidden_states(ids, torch.arange(width, device=device))  # (b, width, C)
                logits = model.lm_logits(
                    model.transformer.ln_f(x[counted])
                )  # (N, padded_vocab): the N that count
            losses = F.cross_entropy(logits.float(), targets[counted], reduction="none")  # (N,)
            sums[batch] = (
                torch.zeros(len(batch), device=device)
                .index_add_(0, counted.nonzero()[:, 0], losses)
                .cpu()
            )
            bar.update(len(batch) / 4)
            start = end
    sums = sums.view(-1, 4)  # (n, 4): an item's 4 endings are consecutive rows
    return sums, sums / torch.tensor(spans, dtype=torch.float).view(
        -1, 4
    )  # and per ending token, (n, 4)


def hellaswag_eval(model, items, dtype, convention="completion", progress=False):
    """HellaSwag accuracy, items split over the ranks. completion (GPT-2, GPT-3): acc_norm per token; harness
    (lm-evaluation-harness): its cleaned query and endings, acc_norm per character. acc: the summed loss."""
    rank, world_size = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if torch.distributed.is_initialized()
        else (0, 1)
    )
    mine = items[rank::world_size]  # all_reduce_sum adds the counts back up
    labels, enc, results, counts = (
        torch.tensor([item["label"] for item in mine]),
        get_tokenizer(),
        {},
        [],
    )
    for name in ("completion", "harness") if convention == "both" else (convention,):
        asked = [harness_item(item) for item in mine] if name == "harness" else mine
        sums, per_token = (
            score_endings(model, enc, asked, dtype, progress=progress)
            if mine
            else (torch.zeros(0, 4),) * 2
        )
        chars = torch.tensor(
            [[len(e) for e in item["endings"]] for item in asked], dtype=torch.float
        ).view(-1, 4)
        normed = per_token if name == "completion" else sums / chars
        counts += [
            float((sums.argmin(dim=1) == labels).sum()),
            float((normed.argmin(dim=1) == labels).sum()),
        ]
        prefix = "hellaswag" if name == "completion" else "hellaswag_harness"
        results.update(
            {f"{prefix}_acc": len(counts) - 2, f"{prefix}_acc_norm": len(counts) - 1}
        )  # indexes into counts
    device = next(model.parameters()).device
    *counts, n = all_reduce_sum(
        torch.tensor(counts + [float(len(mine))], dtype=torch.float64, device=device)
    ).tolist()
    return {**{key: counts[i] / n for key, i in results.items()}, "hellaswag_items": int(n)}


def evaluate(args):
    """--mode eval: a model's val loss and HellaSwag accuracy, as a table and as eval.json."""
    rank, _, world_size, device = setup_distributed(args.device)
    dtype = pick_dtype(device, args.dtype)
    # what can be wrong with the inputs is found before the model loads (a minute for gpt2-xl)
    items = args.hellaswag and load_hellaswag(
        args.hellaswag_path, args.hellaswag_limit, args.hellaswag_convention
    )
    model = load_model(args.init_from)[0].to(device).eval()
    results = {"model": args.init_from}
    if args.data_dir:  # at the model's own block_size; the folder says how to read it
        kind = check_data(args.data_dir, "eval", args.batch_size, model.config.block_size)
        loader = (PretrainLoader if kind == "pretrain" else InstructionLoader)(
            args.data_dir,
            "val",
            args.batch_size,
            model.config.block_size,
            rank,
            world_size,
            args.seed,
        )
        results["val_loss"] = evaluate_loss(model, loader, args.val_steps, dtype)
        results["val_batches"] = loader.eval_steps(args.val_steps)
    if items:
        t0 = time.time()
        results.update(
            hellaswag_eval(model, items, dtype, args.hellaswag_convention, progress=rank == 0)
        )
        results["hellaswag_items_per_s"] = results["hellaswag_items"] / (time.time() - t0)
    if rank == 0:  # the results are already summed over the ranks
        for key, value in results.items():  # a table, and the same numbers as JSON for scripts
            print(f"{key:<24}  {value:.4f}" if isinstance(value, float) else f"{key:<24}  {value}")
        os.makedirs(args.out_dir, exist_ok=True)
        atomic_write(
            os.path.join(args.out_dir, "eval.json"),
            lambda f: f.write(json.dumps(results, indent=2).encode()),
        )
    return results


# -----------------------------------------------------------------------------
# --mode sample with several prompts or samples, and --mode chat


def sample_batch(model, enc, shown, token_lists, args, generator):
    """Every prompt num_samples times, one left-padded batch; shown: the text printed before each continuation."""
    device = next(model.parameters()).device
    ids, mask = left_pad(
        [tokens for tokens in token_lists for _ in range(args.num_samples)]
    )  # row // num_samples
    with autocast(device, pick_dtype(str(device), args.dtype)):
        out = model.generate(
            ids.to(device),
            mask.to(device),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        )
    for row in range(len(out)):  # the generated part, until an answer or a document ends
        new = enc.decode(out[row, ids.size(1) :].tolist()).split("<|endoftext|>")[0]
        print(
            f"--- sample {row % args.num_samples + 1} of prompt {row // args.num_samples + 1}\n"
            f"{shown[row // args.num_samples]}{new}"
        )


def chat(args):
    """Type an instruction, read the answer as it comes; /quit leaves. Single turns: what Alpaca teaches."""
    device = setup_distributed(args.device)[3]
    model, template = load_model(args.init_from)
    if template is None:
        raise UserError(
            f"{args.init_from} is not fine-tuned (it has no prompt template): chat needs a --mode finetune "
            "checkpoint or its export; --mode sample continues a pretrained model's text"
        )
    model.to(device).eval()
    enc = get_tokenizer()
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    with contextlib.suppress(
        ImportError
    ):  # line editing and history for input(); Windows has no readline
        import readline  # noqa: F401
    print("Type an instruction and press Enter; Ctrl-C stops an answer; /quit or Ctrl-D leaves.")
    while True:
        try:
            instruction = input("> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            print()
            break
        if instruction in ("/quit", "/exit"):
            break
        try:
            if instruction:  # an empty line asks nothing
                stream_text(model, enc, encode_prompt(enc, instruction, template), args, generator)
        except KeyboardInterrupt:  # Ctrl-C while answering: drop the answer, keep the chat
            print(" [stopped]")


# -----------------------------------------------------------------------------
# --mode export: a folder that transformers (and vLLM, TGI, llama.cpp's converter...) loads
# as it loads OpenAI's GPT-2: its weights, config and tokenizer files.


def jinja_chat_template(template):
    """The str.format prompt template as a Jinja chat template: a user message renders as the template does, an answer
    as itself and <|endoftext|>. The template's text goes in as Jinja string literals: no brace in it is Jinja."""
    from string import (
        Formatter,
    )  # the parser str.format itself uses: '{{' and '}}' come out unescaped

    pieces = []
    for literal, field, spec, conversion in Formatter().parse(template):
        pieces += (
            ["{{ " + json.dumps(literal, ensure_ascii=False) + " }}"] if literal else []
        )  # JSON: a Jinja literal
        if field is not None:
            if field != "instruction" or spec or conversion:
                raise UserError(
                    f"the prompt template has a field {{{field}}}: only {{instruction}} can be exported"
                )
            pieces.append("{{ message['content'] }}")
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        + "".join(pieces)
        + "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('this model was fine-tuned on user and assistant messages only') }}"
        "{% endif %}{% endfor %}"
    )


def export(args):
    """--mode export: --init_from as a Hugging Face GPT-2 folder at --out_dir, built beside it, renamed when whole."""
    from tiktoken.load import read_file_cached
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = os.path.realpath(
        args.out_dir
    )  # no trailing '/', no link: the .partial folder is a sibling of the target
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise UserError(
            f"{args.out_dir} exists and is not an empty folder: export never overwrites files; give a new "
            "--out_dir, or move that one away first"
        )
    print(f"reading {args.init_from}")
    model, template = load_model(args.init_from)
    chat_template = (
        jinja_chat_template(template) if template else None
    )  # refused now, if it cannot be written
    config = model.config
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )  # GPT2Config's defaults for the rest: what we compute
    hf.load_state_dict(
        {
            k: (
                v.t()
                if k.endswith(CONV1D_WEIGHTS)
                else v[: config.vocab_size]
                if "wte" in k or "lm_head" in k
                else v
            )
            for k, v in model.state_dict().items()
        }
    )  # Conv1D's layout; no padded rows
    hf.config.prompt_template = (
        template  # model.config.prompt_template: the plain str.format template
    )
    tmp = f"{out_dir}.partial-{os.getpid()}"  # a sibling: the final rename stays on one filesystem
    try:
        hf.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        shutil.copymode(
            os.path.join(tmp, "config.json"), os.path.join(tmp, "model.safetensors")
        )  # not private: umask's
        # GPT-2's tokenizer files are OpenAI's own, as tiktoken downloaded (and cached) them
        base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
        for name, url in (
            ("vocab.json", base + "encoder.json"),
            ("merges.txt", base + "vocab.bpe"),
        ):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(read_file_cached(url))
        tokenizer_config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": config.block_size,
            "add_prefix_space": False,
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            **({"chat_template": chat_template} if chat_template else {}),
        }
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        if os.path.isdir(out_dir):
            os.rmdir(
                out_dir
            )  # empty (checked above); refused if another export, or the user, filled it since
        os.rename(tmp, out_dir)  # the finished folder appears at once, under its name
    except Exception as e:
        raise_if_disk_full(out_dir, e)  # safetensors says "I/O error" when the disk is full
        raise
    finally:  # Ctrl-C too: no .partial folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out_dir}: {', '.join(sorted(os.listdir(out_dir)))}")


# -----------------------------------------------------------------------------
# --mode bench: a training step timed on random tokens, without data; MFU against the GPU's
# peak. (Generation, and comparisons with other codebases: dev/compare.py.)

# Dense bf16 tensor-core peak, TFLOP/s, by the GPU's model as torch names it, matched whole: "L40S" is not "L4"
PEAK_TFLOPS = {
    r"H[128]00.*PCIe": 756,
    r"H[12]00.*NVL": 835,
    r"G?H[128]00\b.*": 989,
    r"A[18]00\b.*": 312,
    "L40S": 362,
    "L40": 181,
    "L4": 121,
    "A10G": 70,
    "A10": 125,
    "RTX 4090": 165,
    "RTX 3090": 71,
}  # first match


def peak_flops(device):
    """FLOP/s of PEAK_TFLOPS for the GPU (torch names it "NVIDIA H100 80GB HBM3"), or None: no MFU, not a wrong one."""
    model = re.sub(
        r"^(NVIDIA )?(GeForce |Tesla )?",
        "",
        torch.cuda.get_device_name(device) if "cuda" in device else "",
    )
    return next(
        (tflops * 1e12 for pattern, tflops in PEAK_TFLOPS.items() if re.fullmatch(pattern, model)),
        None,
    )


def flops_per_token(model):
    """Training FLOPs per token (PaLM, appendix B): 6 a parameter (wpe aside), attention's 12 * L * C * T."""
    cfg = model.config
    return (
        6 * (sum(p.numel() for p in model.parameters()) - cfg.block_size * cfg.n_embd)
        + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    )


def bench(args):
    """--mode bench: the median training step on random tokens (no data): tokens/s, MFU and memory (CUDA); DDP or
    FSDP under torchrun. (Generation: python dev/compare.py generate.)"""
    rank, local_rank, world_size, device = setup_distributed(args.device)
    dtype, cuda = pick_dtype(device, args.dtype), device.startswith("cuda")
    torch.manual_seed(args.seed)
    model = GPT(new_model_config(args)).to(device)  # random weights: speed does not depend on them
    if args.fsdp or args.activation_checkpointing:
        wrap_blocks(model, dtype, args)
    optimizer, scaler = (
        configure_optimizer(model, 0.1, 6e-4),
        torch.amp.GradScaler(enabled=dtype == torch.float16),
    )
    compiled = (
        torch.compile(model) if args.compile and not args.fsdp else model
    )  # as a training run wraps it
    if world_size > 1 and not args.fsdp:
        compiled = torch.nn.parallel.DistributedDataParallel(
            compiled, device_ids=[local_rank] if cuda else None
        )
    B, T, times, sync = (
        args.batch_size,
        model.config.block_size,
        [],
        torch.cuda.synchronize if cuda else lambda: None,
    )
    say = print if rank == 0 else (lambda *a, **k: None)
    say(
        f"bench: {sum(p.numel() for p in model.parameters()):,} parameters, batch {B} x {T}, {device} "
        f"({torch.cuda.get_device_name(device) if cuda else 'cpu'}), {dtype}, compile {args.compile}, {world_size} "
        f"process(es){', FSDP' if args.fsdp else ''}, {args.bench_steps} steps timed after {args.bench_warmup}"
    )
    for i in range(args.bench_steps):
        x = torch.randint(0, 50257, (B, T + 1), device=device)  # fresh tokens each step
        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(
            compiled, [(x[:, :-1], x[:, 1:])], dtype, scaler
        )  # the training step, as train() takes it
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        sync()  # the GPU runs behind Python: the step is timed once it is done
        times += [time.perf_counter() - t0] if i >= args.bench_warmup else []
    median, peak = (
        statistics.median(times),
        peak_flops(device),
    )  # the median: a stray slow step does not count
    tokens_per_s = B * T * world_size / median
    say(
        f"median step {1000 * median:.1f} ms | {tokens_per_s:,.0f} tokens/s"
        + (
            f" | MFU {100 * flops_per_token(model) * tokens_per_s / (peak * world_size):.1f}% of {peak / 1e12:.0f} TFLOP/s"
            if peak
            else ""
        )
        + (
            f" | peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
            if cuda
            else ""
        )
    )


# -----------------------------------------------------------------------------
# --mode plot


def plot(args):
    """--mode plot: log.jsonl's losses, LR and HellaSwag; for the default recipe, OpenAI's GPT-2 124M beside them."""
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if not os.path.exists(log_path):
        raise UserError(f"{log_path} not found: point --out_dir at a training run's folder")
    import matplotlib

    matplotlib.use("Agg")  # files only, no window: works on a server
    import matplotlib.pyplot as plt

    entries = []
    with open(log_path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                entries.append(json.loads(line)) if line.strip() else None
            except ValueError:  # a line cut short by a crash, or edited by hand
                raise UserError(
                    f"{log_path}, line {number}, is not JSON: remove that line and plot again"
                ) from None

    def series(key):
        return (
            [e["step"] for e in entries if key in e],
            [e[key] for e in entries if key in e],
        )

    run = saved_args(args.out_dir)  # the run's flags, from its checkpoint
    gpt2 = (
        run.get("model") == "gpt2"
        and not run.get("n_layer")
        and "fineweb_edu" in str(run.get("data_dir"))
    )
    # (panel, curves, OpenAI GPT-2 124M's level): val loss 3.2924 on FineWeb-Edu's val as build-nanogpt measured
    # it, HellaSwag acc_norm 0.2955 (this file's --mode eval, completion)
    panels = [
        ("loss", ("loss", "val_loss"), 3.2924 if gpt2 else None),
        ("learning rate", ("lr",), None),
    ] + (
        [("HellaSwag acc_norm", ("hellaswag_acc_norm",), 0.2955)]
        if series("hellaswag_acc_norm")[0]
        else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, keys, openai) in zip(axes[0], panels):
        for key in keys:  # the noisy train loss light, under the val points
            ax.plot(
                *series(key),
                "-" if key in ("loss", "lr") else "o-",
                alpha=0.6 if key == "loss" else 1,
                label=key,
            )
        if openai:
            ax.axhline(openai, color="gray", linestyle="--", label="OpenAI GPT-2 124M")
        ax.set(xlabel="step", title=title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(args.out_dir)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "plot.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()  # done, every file closed: no interpreter shutdown, in which gloo's threads (kept by FSDP) can abort it
    sys.stdout.flush()
    os._exit(0)
