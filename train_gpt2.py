"""
GPT-2 in one file. The lecture reads top to bottom in the order things happen: the model and its
generation, the tokenizer, the shard loader, the optimizer and one training step, the pretraining
loop, sampling, the command line. A marked appendix holds the rest (fine-tuning, FSDP, HellaSwag,
chat, export, bench, plot, and the guards that keep a user's work safe).

    python train_gpt2.py --mode sample --init_from gpt2 --prompt "Hello, I'm a language model,"
    python prepare_data.py && python train_gpt2.py --mode pretrain   # one GPU, a Mac or a CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --mode pretrain   # 8 GPUs
    # 2 nodes of 8 GPUs: the same command on each, with --node_rank=1 on the second
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=IP_OF_NODE_0 \
        --master_port=29500 train_gpt2.py --mode pretrain
    # GPT-2 XL on smaller GPUs: sharded, and each block recomputed in the backward pass
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --mode pretrain --model gpt2-xl \
        --batch_size 8 --fsdp 1 --activation_checkpointing 1
    python prepare_data.py --sft && python train_gpt2.py --mode finetune
    python train_gpt2.py --mode chat

Each mode lists its flags: python train_gpt2.py --mode MODE --help
"""

import argparse
import contextlib
import difflib
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pad_sequence

# -----------------------------------------------------------------------------
# The model, and its generation with a KV cache: one unit, to copy whole into a project

# <|endoftext|>: it separates documents, ends an answer and stops generation.
EOT_TOKEN = 50256


@dataclass
class GPTConfig:
    # The longest sequence: the model learns an embedding for each position.
    block_size: int = 1024
    # GPT-2's BPE vocabulary: the token ids the model reads and predicts.
    vocab_size: int = 50257
    # The rows of wte and lm_head. 50304 = 128 * 393 makes a GPU's matmuls faster; the rows past
    # vocab_size are never a token.
    padded_vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        # Which layer of a KVCache holds this attention's keys and values.
        self.layer_idx = layer_idx
        # The query, key and value of every head, in one matmul.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # Generating: the positions fed before are keys and values too.
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        # A whole sequence is causal, and is_causal lets PyTorch pick its flash kernel. With a
        # cache, or with padding, the caller gives the mask.
        is_causal = attn_mask is None and kv_cache is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        # The heads side by side again.
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # The approximation GPT-2 was trained with.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None):
        # Pre-LayerNorm: each branch reads a normalised copy, and the residual stream itself is
        # never normalised.
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """The keys and values of every layer for the positions fed so far, so that each new token
    costs one position's work instead of the whole sequence's."""

    def __init__(self, config, batch_size, capacity):
        head_size = config.n_embd // config.n_head
        self.shape = (config.n_layer, batch_size, config.n_head, capacity, head_size)
        # Made at the first update, in the keys' dtype: under bfloat16 autocast, half the memory.
        self.k = None
        self.v = None
        # The positions every layer holds. The model counts new ones once all layers have them.
        self.length = 0

    def update(self, layer, k, v):
        """Store one layer's keys and values (B, nh, T, hs) of T new positions; return all so far."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros_like(self.k)
        start = self.length
        end = start + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, past + T, hs)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """A token id for each row of logits (B, vocab): temperature 0 is greedy; top_k keeps the k
    likeliest tokens, top_p (nucleus sampling) the likeliest that together reach probability p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the likelier ones before it already reach top_p.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Tied, as in GPT-2: one matrix reads the tokens in and scores them out.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            # Each block adds into the residual stream twice: scaled down with depth, the
            # stream's variance stays put (GPT-2 paper, section 2.3).
            if hasattr(module, "RESIDUAL_SCALE_INIT"):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def hidden_states(self, idx, pos, attn_mask=None, kv_cache=None):
        """Token ids (B, T) at positions pos, (T,) or (B, T) -> the last LayerNorm's output (B, T, C)."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Token ids (B, T) -> (logits (B, T, vocab_size), None). With targets (B, T), each
        position's next token or -100 (not learned) -> (None, the mean loss)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens are more than block_size {self.config.block_size}")
        x = self.hidden_states(idx, torch.arange(T, device=idx.device))
        return self.head(x, targets)

    def head(self, x, targets=None):
        """The LM head, and the loss. (FSDP compiles this part on its own.)"""
        logits = self.lm_head(x)  # (B, T, padded_vocab_size)
        if targets is None:
            return logits[..., : self.config.vocab_size], None
        if self.config.padded_vocab_size > self.config.vocab_size:
            # The padded columns are never the answer: -inf, written in place and hidden from
            # autograd. Exact, as the gradient reaching them is softmax - one-hot = 0 - 0.
            with torch.no_grad():
                logits[..., self.config.vocab_size :] = float("-inf")
        # The logits are not returned with the loss: nothing reads them, and a compiled backward
        # would fill a logits-sized gradient for them with zeros. Targets of -100 do not count.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return None, loss

    def next_logits(self, idx, cache, real):
        """The logits (B, vocab_size) of the token after idx (B, T), which is fed after what the
        cache holds. real (B, past + T): 1 at every token so far, 0 at left padding."""
        T = idx.size(1)
        past = cache.length
        # A row's positions count its real tokens only: a padded row computes what it would alone.
        pos = (real.cumsum(dim=1) - 1).clamp(min=0)[:, past:]  # (B, T)
        key_pos = torch.arange(past + T, device=idx.device)  # (past + T,)
        query_pos = key_pos[past:, None]  # (T, 1)
        # A query sees the real keys up to itself, and always itself: a padding query that saw
        # nothing would give NaN.
        visible = real[:, None, None, :].bool() | (key_pos == query_pos)  # (B, 1, T, past + T)
        attn_mask = visible & (key_pos <= query_pos)
        x = self.hidden_states(idx, pos, attn_mask, cache)[:, -1, :]  # (B, C)
        cache.length += T
        # x @ W.T computed as (W @ x.T).T: the layout a CPU's BLAS runs ~2.5x faster for a few rows.
        logits = (self.lm_head.weight @ x.t()).t()  # (B, padded_vocab_size)
        return logits[:, : self.config.vocab_size]

    @torch.no_grad()
    def stream(
        self, input_ids, attention_mask=None, max_new_tokens=64, eos_token_id=EOT_TOKEN, **sampling
    ):
        """Yield each row's next token (B,) as soon as it is chosen. attention_mask (B, T): 0 at
        left padding (see left_pad). sampling: sample_next_token's temperature, top_k, top_p."""
        if input_ids.size(1) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        window = self.config.block_size
        # Of a prompt longer than the model reads, its end.
        ids = input_ids[:, -window:]
        real = attention_mask[:, -window:]
        cache = KVCache(self.config, ids.size(0), min(window, ids.size(1) + max_new_tokens))
        # What the next forward feeds: the prompt, then one token at a time.
        new = ids
        finished = torch.zeros_like(ids[:, 0], dtype=torch.bool)  # (B,)
        for _ in range(max_new_tokens):
            logits = self.next_logits(new, cache, real)
            token = sample_next_token(logits, **sampling)  # (B,)
            if eos_token_id is not None:
                # A finished row goes on giving eos, as transformers pads it.
                token = torch.where(finished, eos_token_id, token)
                finished |= token == eos_token_id
            yield token
            if finished.all():
                return
            ids = torch.cat([ids, token[:, None]], dim=1)  # (B, T + 1)
            # The new token is real: a 1 padded on at the right.
            real = F.pad(real, (0, 1), value=1)
            new = ids[:, -1:]
            if ids.size(1) > window:
                # Past block_size the window slides, and every position in it: all is fed anew.
                ids = ids[:, -window:]
                real = real[:, -window:]
                cache = KVCache(self.config, ids.size(0), window)
                new = ids

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """The prompt and up to max_new_tokens new tokens, (B, T + new), as transformers' generate."""
        new_tokens = [token[:, None] for token in self.stream(input_ids, attention_mask, **kwargs)]
        return torch.cat([input_ids] + new_tokens, dim=1)

    @classmethod
    def from_pretrained(cls, name_or_path, padded_vocab_size=0):
        """OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", from the Hugging Face
        hub) or a Hugging Face GPT-2 folder. padded_vocab_size=50304: to train it at speed."""
        from transformers import GPT2LMHeadModel

        hf_model, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        broken = sorted(map(str, info["missing_keys"] or info["mismatched_keys"]))
        if broken:
            raise ValueError(f"{name_or_path} is broken: missing keys or shapes: {broken}")
        hf = hf_model.config
        config = GPTConfig(
            block_size=hf.n_positions,
            vocab_size=hf.vocab_size,
            padded_vocab_size=max(padded_vocab_size, hf.vocab_size),
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            n_embd=hf.n_embd,
        )
        model = cls(config)
        # Their names are ours: a copy key by key.
        theirs = hf_model.state_dict()
        with torch.no_grad():
            for key, param in model.state_dict().items():
                weight = theirs[key]
                if key.endswith(CONV1D_WEIGHTS):
                    weight = weight.t()
                # wte and lm_head: the real rows. The padded rows keep their initialization.
                param[: weight.size(0)].copy_(weight)
        return model


# OpenAI's checkpoints (and transformers') store these as Conv1D, (in, out); nn.Linear is (out, in).
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


def left_pad(token_lists, pad_id=EOT_TOKEN):
    """Prompts of different lengths as one batch, right-aligned so that their next tokens share a
    column: ids (B, T) and attention_mask (B, T), 0 at the padding."""
    rows = [torch.tensor(tokens, dtype=torch.long) for tokens in token_lists]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence(
        [torch.ones_like(row) for row in rows],
        batch_first=True,
        padding_value=0,
        padding_side="left",
    )
    return ids, mask


# -----------------------------------------------------------------------------
# The tokenizer, and the data: pretraining shards, one optimizer step at a time


class UserError(ValueError):
    """A mistake the user can fix (a flag, a path, a file): one line that says what to do."""


def get_tokenizer():
    """GPT-2's BPE tokenizer: tiktoken's, which downloads OpenAI's files once and caches them."""
    # Imported here, so that the model above can be copied without tiktoken.
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        # Offline, with nothing cached, it fails deep inside requests.
        raise UserError(
            "tiktoken has no GPT-2 files: it downloads them once (vocab.bpe and encoder.json, from "
            "openaipublic.blob.core.windows.net/gpt-2/encodings/main); offline, copy tiktoken's "
            "cache folder from a machine that has them and set TIKTOKEN_CACHE_DIR to it"
        )


def encode_prompt(enc, prompt, template=None):
    """A prompt's token ids, wrapped in a fine-tuned model's template if it has one.
    "<|endoftext|>" is the special token: a prompt of it alone samples unconditionally."""
    if template is not None:
        prompt = template.format(instruction=prompt)
    return enc.encode(prompt, allowed_special={"<|endoftext|>"})


# prepare_data.py writes uint16 token shards and a meta.json that lists them. A step reads the same
# tokens however it is split over micro-steps and ranks, so that 1 GPU and 8 give the same losses,
# and two numbers (epoch, position) resume it.


def read_meta(data_dir):
    """A prepared folder's meta.json: the kind of data, and each split's shards."""
    with open(os.path.join(data_dir, "meta.json")) as f:
        return json.load(f)


class PretrainLoader:
    """(B, T) windows of a split's shards, read as one stream of tokens (a window may run on into
    the next shard: no token is skipped); the train shards in an order shuffled each epoch."""

    # A fine-tuning loader's prompt template; pretraining data has none.
    template = None

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337):
        self.split = split
        self.B = batch_size
        self.T = block_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        meta = read_meta(data_dir)
        self.names = [os.path.join(data_dir, name) for name in meta["splits"][split]["shards"]]
        # Memory-mapped: the OS reads in the pages a window touches, nothing more.
        self.shards = [np.load(path, mmap_mode="r") for path in self.names]
        self.total_tokens = sum(len(shard) for shard in self.shards)
        # Found now, not at the first evaluation.
        if split == "val" and self.total_tokens - 1 < self.B * self.T:
            raise UserError(
                f"the val split of {data_dir} ({self.total_tokens:,} tokens) is shorter than one "
                f"batch of {self.B} x {self.T}: lower --batch_size (or --block_size)"
            )
        # On resume the data must be the same: the shards listed, and each one's first 32 KB.
        heads = [hashlib.sha256(shard[: 1 << 15]).hexdigest() for shard in self.shards]
        self.fingerprint = [meta["splits"][split], heads]
        # Where the next step starts in this epoch's stream.
        self.position = 0
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch
        # The val shards in their order: every evaluation reads the same tokens. The train shards
        # in another order each epoch, or the loss would rise and fall with the epoch.
        self.order = np.arange(len(self.shards))
        if self.split == "train":
            self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        # Where each shard starts in the stream.
        self.starts = np.cumsum([0] + [len(self.shards[i]) for i in self.order])

    def read(self, start, n):
        """n tokens of the stream from position start, as int64 (what cross_entropy's targets are)."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        # The shard that holds position start; what is missing then comes from the next ones.
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < n:
            offset = start + filled - self.starts[i]
            piece = self.shards[self.order[i]][offset : offset + n - filled]
            # An id past the vocabulary would stop a GPU with a device-side assert: say which file.
            if len(piece) > 0 and piece.max() >= 50257:
                raise UserError(
                    f"{self.names[self.order[i]]} holds token id {int(piece.max())} near position "
                    f"{offset:,}, outside GPT-2's 50,257: re-run prepare_data.py for it"
                )
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            i += 1
        return out

    def window(self, start):
        """(B, T) inputs from position start, and their targets: each input's next token."""
        tokens = torch.from_numpy(self.read(start, self.B * self.T + 1))
        x = tokens[:-1].view(self.B, self.T)
        y = tokens[1:].view(self.B, self.T)
        return x, y

    def steps_per_epoch(self, grad_accum):
        # The stream's last token is a target only.
        return (self.total_tokens - 1) // (grad_accum * self.world_size * self.B * self.T)

    def next_step(self, grad_accum):
        """This rank's grad_accum micro-batches of the next optimizer step."""
        tokens_per_step = grad_accum * self.world_size * self.B * self.T
        if self.position + tokens_per_step + 1 > self.total_tokens:  # the epoch is used up
            self.set_epoch(self.epoch + 1)
            self.position = 0
        # Micro-step m of rank r reads the (m * world_size + r)-th block of B sequences.
        blocks = range(self.rank, grad_accum * self.world_size, self.world_size)
        batches = [self.window(self.position + block * self.B * self.T) for block in blocks]
        self.position += tokens_per_step
        return batches

    def eval_steps(self, max_batches):
        return min(max_batches, (self.total_tokens - 1) // (self.B * self.T))

    def eval_batch(self, i):
        # The split's i-th batch from its start.
        return self.window(i * self.B * self.T)

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.set_epoch(state["epoch"])
        self.position = state["position"]


# -----------------------------------------------------------------------------
# Training: the learning rate, AdamW, devices and precision, one step


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr over warmup_steps, then a cosine decay to min_lr at max_steps."""
    # step + 1: the first step does not train at a learning rate of 0.
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    # Past max_steps the cosine would climb back up.
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # from 0 to 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizer(model, weight_decay, learning_rate):
    """AdamW, fused (one kernel for every parameter); weight decay on the matrices only: the
    biases and LayerNorm gains need none."""
    # parameters() yields the tied wte / lm_head once.
    groups = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    # GPT-3's betas: with beta2 0.95, not 0.999, AdamW follows the gradients' scale within ~20 steps.
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), fused=True)


def num_params(model):
    """The number of parameters, the tied wte / lm_head counted once."""
    return sum(p.numel() for p in model.parameters())


def pick_dtype(device, requested="auto"):
    """The matmuls' dtype (the weights stay float32): bfloat16 on GPUs that have it (A100, H100,
    RTX 30xx and later), float16 on older ones (T4, V100: with a gradient scaler), else float32."""
    cuda = device.startswith("cuda")
    if requested == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"{torch.cuda.get_device_name(device)} has no bfloat16: use --dtype float16 (or auto)"
        )
    if requested != "auto":
        return getattr(torch, requested)
    if not cuda:
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device, dtype):
    """Matmuls in dtype; what needs the range (softmax, norms, the loss) stays in float32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def keep_freed_memory():
    """On a CPU, glibc gives big freed buffers back to the kernel, which must zero them again at
    the next step: a third of a small model's step. Told to keep up to 2 GiB, it reuses them."""
    import ctypes

    # Another C library (macOS, Windows, musl) has no mallopt: the step is slower, nothing breaks.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**31 - 1)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def setup_distributed(device):
    """The device this process computes on. Under torchrun it joins the process group: NCCL
    between GPUs (one per process), gloo between CPU processes."""
    if device == "auto":
        device = "cpu"
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
    if device == "cpu":
        keep_freed_memory()
    if device.startswith("cuda"):
        # float32 matmuls in TF32 (A100 and later): several times faster, precise enough to train.
        torch.set_float32_matmul_precision("high")
    # A single process, not started by torchrun.
    if "LOCAL_RANK" not in os.environ:
        return device
    if not device.startswith("cuda"):
        dist.init_process_group("gloo")
        return device
    # LOCAL_RANK: this process's GPU on its node (RANK counts over all nodes).
    device = f"cuda:{os.environ['LOCAL_RANK']}"
    # Before NCCL starts, or every rank would open its communicator on GPU 0.
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=torch.device(device))
    return device


def rank_and_world_size():
    """This process's rank, and how many there are: 0 and 1 without torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_master():
    """Rank 0, or the only process: the one that prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs):
    """print on rank 0 only. Should the reader of the output go away (| head), the run goes on
    without a screen: its log.jsonl and checkpoints are the record."""
    if not is_master():
        return
    try:
        print(*args, **kwargs)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def all_reduce_sum(values):
    """A tensor summed over all ranks, in place (one process: as it is)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def forward_backward(model, micro_batches, dtype, scaler, stop=False):
    """The gradients of one optimizer step from this rank's micro-batches. Returns the step's loss
    (the mean over every rank's targets) and whether any rank must stop (then all stop together)."""
    # Micro-batches (and ranks, fine-tuning) hold different numbers of targets: each micro-batch's
    # mean loss is weighted by its share of the step's targets, times world_size, as DDP and FSDP
    # average the gradients over the ranks.
    counts = torch.stack([(y != -100).sum() for _, y in micro_batches]).float()
    stop_flag = torch.tensor(float(stop), device=counts.device)
    # The step's targets, and the ranks that must stop.
    totals = all_reduce_sum(torch.stack([counts.sum(), stop_flag]))
    _, world_size = rank_and_world_size()
    loss_sum = torch.zeros((), device=counts.device)
    for i, (x, y) in enumerate(micro_batches):
        # The ranks average their gradients once, at the last micro-step.
        last = i == len(micro_batches) - 1
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = last
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
        with autocast(x.device, dtype):
            _, loss = model(x, y)
        weight = counts[i] / totals[0] * world_size
        # float16: the loss scaled up, so that small gradients do not underflow.
        scaler.scale(loss * weight).backward()
        loss_sum += loss.detach().float() * weight / world_size
    loss = all_reduce_sum(loss_sum).item()
    return loss, bool(totals[1] > 0)


def parallelize(model, dtype, args):
    """The model as a training step runs it: sharded with --fsdp 1 (appendix), else compiled and,
    under torchrun, wrapped in DDP: a whole copy on every GPU, their gradients averaged."""
    if args.fsdp or args.activation_checkpointing:
        wrap_blocks(model, dtype, args)  # (appendix) FSDP compiles each block as it shards it
    if args.fsdp:
        return model
    if args.compile:
        model = torch.compile(model)
    # DDP finds the model on the GPU that setup_distributed gave this process.
    _, world_size = rank_and_world_size()
    if world_size > 1:
        model = DistributedDataParallel(model)
    return model


# -----------------------------------------------------------------------------
# The model a run trains, its checkpoints, and what it does between steps

# The four sizes OpenAI released, by their Hugging Face names: 124M, 350M, 774M, 1558M parameters.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def new_model_config(args):
    """A new model's size: the --model preset, or --n_layer, --n_head, --n_embd where given. Its
    vocabulary is padded to 50304 = 128 * 393: a GPU's matmuls are faster on multiples of 128."""
    # GPT-2's 1024 positions, unless --block_size says otherwise.
    size = dict(PRESETS[args.model], block_size=1024)
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(args, name) is not None:
            size[name] = getattr(args, name)
    if size["n_embd"] % size["n_head"] != 0:
        raise UserError(
            f"--n_embd {size['n_embd']} is not a multiple of --n_head {size['n_head']}: each "
            "head takes an equal slice of the width"
        )
    return GPTConfig(padded_vocab_size=50304, **size)


def model_to_train(args):
    """The model a run trains, and the checkpoint it resumes (or None): the run in --out_dir to
    resume, a new model, or a trained one (OpenAI's, a Hugging Face folder, a .pt of ours)."""
    if args.init_from == "resume":
        return load_run_to_resume(args)  # (appendix) checked against the flags given now
    # A new run never writes over another one's checkpoint or log.
    for name in ("ckpt.pt", "log.jsonl"):
        if os.path.exists(os.path.join(args.out_dir, name)):
            raise UserError(
                f"{args.out_dir} already holds a checkpoint or log of an earlier run: continue it "
                f"with --init_from resume (or, with no ckpt.pt, move its {name} away), or choose "
                "another --out_dir"
            )
    if args.init_from == "scratch":
        return GPT(new_model_config(args)), None
    model, _ = load_model(args.init_from, padded_vocab_size=50304)  # (appendix)
    learned = model.config.block_size
    if args.block_size is not None:
        if args.block_size > learned:
            raise UserError(
                f"--block_size {args.block_size} is longer than the {learned} positions "
                f"{args.init_from} has learned: give at most {learned}"
            )
        # Shorter sequences: the model keeps the embeddings of its first positions.
        model.config.block_size = args.block_size
        wpe = model.transformer.wpe.weight[: args.block_size].clone()
        model.transformer.wpe.weight = nn.Parameter(wpe)
    return model, None


@contextlib.contextmanager
def atomic_write(path):
    """A file opened under a temporary name and renamed when whole: a crash, a Ctrl-C or a full
    disk never leaves half a file under path."""
    # In the same folder: a rename is atomic within one filesystem only.
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            # On the disk before the rename makes it the real file.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        raise_if_disk_full(path, e)  # (appendix) torch.save says "unexpected pos" instead
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_checkpoint(path, raw_model, optimizer, state):
    """The full weights and AdamW's state by parameter name, gathered into rank 0's CPU memory
    (under FSDP every rank calls this): one format, to resume on any number of GPUs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(raw_model, optimizer, options=options)
    if not is_master():
        return
    # Tied: stored under both names, as state_dict() does.
    model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
    checkpoint = {"model": model_state, "optimizer": optimizer_state, **state}
    checkpoint["config"] = asdict(raw_model.config)
    with atomic_write(path) as f:
        torch.save(checkpoint, f)
    print0(f"saved {path} at step {state['step']}")


def resume_training(checkpoint, model, optimizer, scaler, train_loader):
    """AdamW's moments, float16's scaler and the data's position, as the checkpoint saved them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=options)
    scaler.load_state_dict(checkpoint["scaler"])
    train_loader.load_state_dict(checkpoint["loader"])
    return checkpoint["step"]


def log(path, entry, line, tracker):
    """One entry: a line of log.jsonl (a crash loses at most the line being written), the same to
    wandb, and a line on the screen."""
    if is_master():
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if tracker is not None:
            tracker.log(entry, step=entry["step"])
    print0(line, flush=True)


@torch.no_grad()
def evaluate_loss(model, loader, max_batches, dtype):
    """The mean loss per target over the split's first max_batches batches. They are dealt to the
    ranks in turn, and every rank runs as many forwards (FSDP gathers weights in each): a rank
    short of one repeats the last batch, uncounted."""
    device = next(model.parameters()).device
    n = loader.eval_steps(max_batches)
    rounds = math.ceil(n / loader.world_size)
    # The summed loss, and the number of targets: fine-tuning's batches hold different numbers.
    sums = torch.zeros(2, device=device)
    for i in range(loader.rank, rounds * loader.world_size, loader.world_size):
        x, y = loader.eval_batch(min(i, n - 1))
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            _, loss = model(x, y)
        count = (y != -100).sum() * (i < n)
        sums += torch.stack([loss.float() * count, count.float()])
    sums = all_reduce_sum(sums)
    return (sums[0] / sums[1]).item()


def sample_prompt(prompt, enc, val_loader, template):
    """What the samples of a run continue, as tokens and as text: --prompt; for a fine-tuned model,
    an instruction; by default the val split's first tokens, in the corpus's own style."""
    if template is not None:
        if prompt is None:
            prompt = "Give three tips for staying healthy."
        return encode_prompt(enc, prompt, template), prompt + "\n"
    if prompt is not None:
        tokens = encode_prompt(enc, prompt)
    else:
        # <|endoftext|>, then the split's first 8 tokens.
        tokens = val_loader.read(0, 9).tolist()
    text = enc.decode([token for token in tokens if token != EOT_TOKEN])
    return tokens, text


def show_samples(model, enc, prompt, n, dtype):
    """n continuations of the prompt's tokens, by every rank (under FSDP each forward needs them
    all); seeded alike each time, so that the samples differ only as the weights do."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * n, device=device)  # (n, T)
    generator = torch.Generator(device).manual_seed(42)
    # Eager: under FSDP the compiled blocks would compile again for every layer and length.
    with autocast(device, dtype), torch.compiler.set_stance("force_eager"):
        out = model.generate(ids, max_new_tokens=32, top_k=50, generator=generator)
    # Each sample until its document ends.
    return [enc.decode(row[len(prompt) :]).split("<|endoftext|>")[0] for row in out.tolist()]


# -----------------------------------------------------------------------------
# The pretraining loop (fine-tuning runs it too, with the appendix's loader)
#
# First everything that can refuse the run, then the run built (or resumed), then the loop:
# evaluate, step, log, save when the weights have proved finite.


def train(args):
    """--mode pretrain, and --mode finetune."""
    device = setup_distributed(args.device)
    rank, world_size = rank_and_world_size()
    dtype = pick_dtype(device, args.dtype)
    # The same seed on every rank: the same fresh weights everywhere.
    torch.manual_seed(args.seed)

    # What can refuse the run is checked now, before --out_dir is touched, not after hours of steps.
    if args.batch_size is None:
        args.batch_size = fitting_batch_size(device)  # (appendix)
    # The raw model is the one saved and sampled; the model wrapped for speed (below) trains it.
    raw_model, checkpoint = model_to_train(args)
    raw_model.to(device)
    block_size = raw_model.config.block_size
    Loader = PretrainLoader
    if args.mode == "finetune":
        Loader = InstructionLoader  # (appendix) instruction examples, the loss on the answers
    train_loader = Loader(
        args.data_dir, "train", args.batch_size, block_size, rank, world_size, args.seed
    )
    val_loader = Loader(args.data_dir, "val", args.batch_size, block_size, rank, world_size)
    # --total_batch_size counts tokens when pretraining (batch x block_size x GPUs x micro-steps),
    # examples when fine-tuning. What one micro-step on every GPU cannot hold is accumulated.
    per_micro_step = args.batch_size * world_size
    if args.mode == "pretrain":
        per_micro_step *= block_size
    if args.total_batch_size % per_micro_step != 0:
        raise UserError(total_batch_size_error(args, per_micro_step))  # (appendix) what fits
    grad_accum = args.total_batch_size // per_micro_step
    steps_per_epoch = train_loader.steps_per_epoch(grad_accum)
    if steps_per_epoch == 0:
        raise UserError(
            f"the train split of {args.data_dir} is less than one step: lower --total_batch_size"
        )
    max_steps = args.max_steps
    if max_steps is None:
        max_steps = steps_per_epoch * args.epochs
    hellaswag = None
    if args.mode == "pretrain" and args.hellaswag:
        hellaswag = load_hellaswag(args.hellaswag_path, args.hellaswag_limit)  # (appendix)
    enc = get_tokenizer()
    # A fine-tuned model keeps its prompt template: sample and chat wrap a prompt in it.
    template = train_loader.template
    prompt, prompt_text = sample_prompt(args.prompt, enc, val_loader, template)

    # The run. The optimizer comes after FSDP, which replaces the parameters.
    model = parallelize(raw_model, dtype, args)
    optimizer = configure_optimizer(raw_model, args.weight_decay, args.max_lr)
    # float16 needs its loss scaled; with other dtypes the scaler does nothing.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    step = 0
    if checkpoint is not None:
        check_resume(checkpoint, [train_loader, val_loader], max_steps, args)  # (appendix)
        step = resume_training(checkpoint, raw_model, optimizer, scaler, train_loader)
        print0(f"resuming {args.out_dir} at step {step}")
    start_step = step
    # A run that is all warmup never trains at --max_lr: said now, not found in the plot later.
    if args.warmup_steps >= max_steps:
        print0(f"note: all {max_steps} steps are warmup: the learning rate never reaches --max_lr")
    # MFU: the FLOPs of a step's tokens against the GPUs' peak (None for an unknown GPU).
    peak = None
    if device.startswith("cuda"):
        peak = peak_flops(device)  # (appendix)
    # --grad_clip 0: the gradients' norm is measured, not clipped.
    max_norm = math.inf
    if args.grad_clip > 0:
        max_norm = args.grad_clip
    log_path = os.path.join(args.out_dir, "log.jsonl")
    checkpoint_path = os.path.join(args.out_dir, "ckpt.pt")
    saved_step = start_step  # the step of the checkpoint on the disk
    state = None
    tracker = None
    guard = RunGuard(args.out_dir, rank)  # (appendix) --out_dir locked; Ctrl-C saves, then stops
    print0(
        f"{args.mode}: {num_params(raw_model):,} parameters, {world_size} process(es) on {device}, "
        f"{grad_accum} micro-steps of {args.batch_size} a step, {max_steps} steps "
        f"({steps_per_epoch} an epoch)"
    )

    try:
        if checkpoint is not None:
            # A run killed after its checkpoint had logged steps it now does again.
            truncate_log(log_path, step)  # (appendix)
        if args.wandb_project:
            tracker = start_wandb(args, checkpoint)  # (appendix)
        # The weights and AdamW's moments are in place: the checkpoint's copy is freed.
        checkpoint = None
        t_start = time.time()
        while True:
            # What a checkpoint of this step holds besides the weights, before the loader moves on.
            state = {
                "step": step,
                "max_steps": max_steps,
                "loader": train_loader.state_dict(),
                "data": [train_loader.fingerprint, val_loader.fingerprint],
                "scaler": scaler.state_dict(),
                "args": vars(args),
                "prompt_template": template,
                "wandb_id": getattr(tracker, "id", None),
            }

            if step > start_step and (step % args.eval_interval == 0 or step == max_steps):
                model.eval()
                val_loss = evaluate_loss(model, val_loader, args.val_steps, dtype)
                entry = {"step": step, "val_loss": val_loss}
                line = f"step {step:5d}/{max_steps} | val_loss {val_loss:.4f}"
                if hellaswag is not None:
                    entry.update(hellaswag_eval(raw_model, hellaswag, dtype))  # (appendix)
                    line += f" | hellaswag_acc_norm {entry['hellaswag_acc_norm']:.4f}"
                log(log_path, entry, line, tracker)
                if args.eval_samples > 0:
                    texts = show_samples(raw_model, enc, prompt, args.eval_samples, dtype)
                    for i, text in enumerate(texts):
                        print0(f"--- sample {i + 1}\n{prompt_text}{text}")
                model.train()

            if step == max_steps:
                if step > saved_step:
                    save_checkpoint(checkpoint_path, raw_model, optimizer, state)
                print0(f"{args.out_dir} is at step {step} of --max_steps {max_steps}: done")
                break

            # --------------- THE OPTIMIZER STEP, BEGIN ---------------
            # A step's time is its data, forward, backward and update: the evaluation is done.
            t0 = time.time()
            lr = get_lr(
                step, args.max_lr, args.max_lr * args.min_lr_ratio, args.warmup_steps, max_steps
            )
            # Both groups follow the schedule, with and without weight decay.
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = train_loader.next_step(grad_accum)
            micro_batches = [(x.to(device), y.to(device)) for x, y in batches]
            loss, stop = forward_backward(model, micro_batches, dtype, scaler, guard.stop_requested)
            # float16: the true gradients, for their norm and the clipping.
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            # float16's scaler skips a step whose gradients overflowed, and scales down: no error.
            norm_bad = not math.isfinite(grad_norm) and not scaler.is_enabled()
            if not math.isfinite(loss) or norm_bad:
                state = None  # weights whose next loss is not finite are not worth saving
                raise non_finite_error(step, loss, grad_norm, checkpoint_path, saved_step)
            # A checkpoint due at this step is written now that its weights have proved finite.
            if stop or (step > start_step and step % args.ckpt_interval == 0):
                save_checkpoint(checkpoint_path, raw_model, optimizer, state)
                saved_step = step
            # Stopped (Ctrl-C, SIGTERM): the update is dropped, and the checkpoint resumes it.
            if stop:
                print0("stopped; continue with --init_from resume")
                break
            # optimizer.step(), unless float16's gradients overflowed.
            scaler.step(optimizer)
            scaler.update()
            # The weights moved on: the state taken before no longer describes them.
            state = None
            # None, not zeros: the gradients' memory is free until the next backward.
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # the GPU runs behind Python: wait for the step's end
            # step counts the steps done, as a checkpoint does.
            step += 1
            # --------------- THE OPTIMIZER STEP, END ---------------
            # What follows only reports the step.

            dt = time.time() - t0
            # All GPUs' tokens; fine-tuning's with their padding.
            tokens = world_size * sum(x.numel() for x, _ in micro_batches)
            eta = (time.time() - t_start) / (step - start_step) * (max_steps - step)
            entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": 1000 * dt}
            entry["tok_per_s"] = tokens / dt
            line = (
                f"step {step:5d}/{max_steps} | loss {loss:.6f} | lr {lr:.2e} | "
                f"norm {grad_norm:.3f} | {1000 * dt:.0f} ms | {tokens / dt:,.0f} tok/s"
            )
            if peak is not None:
                entry["mfu"] = flops_per_token(raw_model) * tokens / dt / (peak * world_size)
                line += f" | MFU {100 * entry['mfu']:.1f}%"
            line += f" | ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
            log(log_path, entry, line, tracker)
    except Exception:
        # No step is coming: a Ctrl-C from now on stops at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # No trained step is lost to a failure (an evaluation, the disk, the data): the weights
        # are saved first. Not under FSDP, where saving needs every rank, and one has failed.
        if state is not None and step > saved_step and not args.fsdp:
            with contextlib.suppress(Exception):
                save_checkpoint(checkpoint_path, raw_model, optimizer, state)
        raise
    finally:
        # Ctrl-C means Ctrl-C again, the lock is given back, and wandb's run ends.
        guard.close(tracker)


# -----------------------------------------------------------------------------
# Sampling


def load_to_sample(args):
    """--init_from's model on --device, ready to generate, and its prompt template (or None)."""
    # One process: sampling needs no torchrun.
    device = setup_distributed(args.device)
    model, template = load_model(args.init_from)  # (appendix) a .pt, a run folder, HF, OpenAI's
    # Other samples every time, unless --seed is given.
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model.to(device)
    model.eval()
    return model, template


def stream_text(model, enc, tokens, args):
    """Print one answer token by token, as it is generated; return its text."""
    import codecs

    device = next(model.parameters()).device
    ids = torch.tensor([tokens], device=device)  # (1, T): a batch of one
    # A token may end in the middle of a character: bytes are printed once they make one.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    with autocast(device, pick_dtype(str(device), args.dtype)):
        stream = model.stream(
            ids,
            None,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        )
        for token in stream:
            token_id = token.item()
            # The end of a fine-tuned answer, or of a document.
            if token_id == EOT_TOKEN:
                break
            pieces.append(decoder.decode(enc.decode_single_token_bytes(token_id)))
            print(pieces[-1], end="", flush=True)
    # The bytes of a character cut off at the end show as U+FFFD.
    pieces.append(decoder.decode(b"", final=True))
    print(pieces[-1])
    return "".join(pieces)


def sample(args):
    """--mode sample: continue each --prompt, --num_samples times, printed as it is generated (a
    fine-tuned model answers the prompt instead)."""
    model, template = load_to_sample(args)
    enc = get_tokenizer()
    several = len(args.prompt) > 1 or args.num_samples > 1
    for i, prompt in enumerate(args.prompt):
        tokens = encode_prompt(enc, prompt, template)
        # The model reads block_size tokens at most: of a longer prompt, its end.
        if len(tokens) > model.config.block_size:
            print(
                f"note: the prompt is {len(tokens):,} tokens; the model reads its last "
                f"{model.config.block_size}",
                file=sys.stderr,
            )
        for j in range(args.num_samples):
            if several:
                print(f"--- sample {j + 1} of prompt {i + 1}")
            # A continuation goes on on the prompt's line; an answer starts on its own.
            if template is None:
                print(prompt, end="", flush=True)
            else:
                print(prompt)
            stream_text(model, enc, tokens, args)


# -----------------------------------------------------------------------------
# The command line: --mode says what to do (its flags: the appendix's first section)


def main(argv=None):
    # argv None: argparse reads sys.argv.
    args = parse_args(argv)  # (appendix) --mode and its flags, checked
    modes = {"pretrain": train, "finetune": train, "sample": sample, "chat": chat}
    modes.update({"eval": evaluate, "export": export, "bench": bench, "plot": plot})
    try:
        modes[args.mode](args)
    except BrokenPipeError:
        # The reader of the output went away (| head): the work is done and saved, nothing to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (UserError, OSError, RuntimeError) as e:
        # What the user can fix is one line, wherever it strikes; a bug keeps its traceback.
        message = one_line(e, args)  # (appendix)
        if message is None:
            raise
        exit_with(args, f"error: {message}", 1)  # (appendix)
    except KeyboardInterrupt:
        # A second Ctrl-C (training handles the first one, and saves). 130: "killed by SIGINT".
        exit_with(args, "interrupted", 130)
    if dist.is_initialized():
        end_process_group(args)  # (appendix)


# =============================================================================
# APPENDIX. The lecture ends here: what follows does not teach GPT-2. First the command line
# and the guards that keep a user's work safe, then fine-tuning and FSDP, then the other modes:
# eval, chat, export, bench, plot.
# =============================================================================


# -----------------------------------------------------------------------------
# The command line: every mode's flags, each with one default and a help line, checked as they
# are given. A mistake is one line that points to the fix, with exit status 2 (1: any other error).

MODES = ("pretrain", "finetune", "sample", "chat", "eval", "export", "bench", "plot")


TRAIN = ("pretrain", "finetune")


def number(kind, low, high=math.inf, above=False):
    """An argparse type: a number of that kind, at least low (above: more than low), at most high,
    so that a value out of its domain (--max_steps -1) is refused as it is given."""
    domain = f"{'>' if above else '>='} {low:g}"
    if high < math.inf:
        domain += f" and <= {high}"

    def parse(text):
        value = kind(text)  # argparse reports a ValueError as "invalid value"
        too_low = value < low or (above and value == low)
        if too_low or value > high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {domain}")
        return value

    return parse


def device_flag(text):
    """An argparse type: auto, or a device this machine has (--device cuda without a GPU is refused)."""
    devices = ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.cuda.is_available():
        devices.append("cuda")
    if torch.backends.mps.is_available():
        devices.append("mps")
    if text not in devices:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device this machine has ({torch.cuda.device_count()} CUDA GPUs): "
            f"use {', '.join(devices)}"
        )
    return text


def flags():
    """Every flag: the modes that take it, its default (another mode's: MODE_DEFAULTS), its type
    (a list: its choices), and a help line true for those modes."""
    count = number(int, 1)
    count0 = number(int, 0)
    seed = number(int, 0, 2**32 - 1)
    length = number(int, 1, 2**20)
    switch = [0, 1]
    # torch.compile needs Triton: Linux with a GPU (Windows has no Triton by default).
    compile_default = int(torch.cuda.is_available() and sys.platform != "win32")
    models = "gpt2, gpt2-medium, gpt2-large, gpt2-xl | a .pt | a run or Hugging Face GPT-2 folder"
    run = "pretrain finetune sample chat eval bench"
    train = " ".join(TRAIN)
    new = "pretrain bench"
    return [
        (
            "--init_from",
            train,
            "scratch",
            str,
            f"{models} | resume (--out_dir's run) | pretrain: scratch",
        ),
        ("--init_from", "sample chat eval export", "gpt2", str, models),
        ("--data_dir", "pretrain finetune eval", "data/fineweb_edu_10B", str, "prepare_data.py's"),
        (
            "--out_dir",
            "pretrain finetune plot",
            "out/pretrain",
            str,
            "the run's: ckpt.pt, log.jsonl",
        ),
        ("--out_dir", "eval", "out/eval", str, "where eval.json is written"),
        ("--out_dir", "export", None, str, "a new, empty folder for the Hugging Face files"),
        ("--device", run, "auto", device_flag, "auto (cuda, else mps, else cpu) | cuda:N"),
        ("--dtype", run, "auto", ["auto", "bfloat16", "float16", "float32"], "of the matmuls"),
        ("--seed", "pretrain finetune bench", 1337, seed, "of the initial weights and data order"),
        ("--seed", "sample chat", None, seed, "of the sampling (default: new samples each time)"),
        ("--model", new, "gpt2", list(PRESETS), "its size"),
        ("--n_layer", new, None, count, "blocks, instead of --model's"),
        ("--n_head", new, None, count, "attention heads, instead of --model's"),
        ("--n_embd", new, None, count, "width, instead of --model's"),
        ("--block_size", train, None, length, "sequence length (default: 1024, or the model's)"),
        ("--block_size", "bench", 1024, length, "sequence length"),
        (
            "--batch_size",
            "pretrain finetune eval bench",
            None,
            count,
            "a micro-batch's sequences (finetune: examples), per GPU (default: what GPT-2 124M fits "
            "in the GPU, 64 in 80 GB; 8 on a CPU)",
        ),
        ("--compile", train + " bench", compile_default, switch, "1: torch.compile the model"),
        ("--val_steps", "pretrain finetune eval", 160, count, "val batches, all GPUs"),
        ("--total_batch_size", train, 524288, count, "a step's tokens (finetune: examples)"),
        ("--max_lr", train, 6e-4, number(float, 0, above=True), "the peak learning rate"),
        ("--min_lr_ratio", train, 0.1, number(float, 0, 1), "the LR decays to max_lr x this"),
        ("--warmup_steps", train, 715, count0, "steps of linear warmup to max_lr"),
        ("--max_steps", train, None, count, "optimizer steps (default: --epochs of the data)"),
        ("--epochs", train, 1, count, "passes over the data, without --max_steps"),
        ("--weight_decay", train, 0.1, number(float, 0), "AdamW's, on matrices only"),
        ("--grad_clip", train, 1.0, number(float, 0), "the gradients' largest norm; 0: any"),
        ("--eval_interval", train, 250, count, "steps between evaluations"),
        ("--eval_samples", train, 4, count0, "samples at each evaluation"),
        ("--prompt", train, None, str, "what they continue (default: the val split's start)"),
        ("--ckpt_interval", train, 5000, count, "steps between checkpoints (and at the end)"),
        (
            "--prompt",
            "sample",
            None,
            "append",
            "again for more (default: Hello, I'm a language model,)",
        ),
        ("--num_samples", "sample", 1, count, "samples of each prompt"),
        ("--max_new_tokens", "sample chat", 64, count0, "tokens generated at most"),
        # nanoGPT's defaults: a small model at temperature 1 drifts into noise.
        ("--temperature", "sample chat", 0.8, number(float, 0), "0: greedy; < 1: sharper"),
        ("--top_k", "sample chat", 200, count0, "sample among the k likeliest; 0: all"),
        ("--top_p", "sample chat", 1.0, number(float, 0, 1, above=True), "nucleus sampling"),
        ("--fsdp", train + " bench", 0, switch, "1: shard over the GPUs (FSDP2)"),
        ("--activation_checkpointing", train + " bench", 0, switch, "1: less memory, slower"),
        ("--wandb_project", train, None, str, "also log to Weights & Biases (pip install wandb)"),
        ("--hellaswag", "pretrain eval", 0, switch, "1: score HellaSwag (at each evaluation)"),
        ("--hellaswag_path", "pretrain eval", "data/hellaswag/hellaswag_val.jsonl", str, ""),
        ("--hellaswag_limit", "pretrain eval", None, count, "its first N items (default: all)"),
        ("--bench_steps", "bench", 20, count, "training steps"),
        ("--bench_warmup", "bench", 5, count0, "of them, the first ones not timed (compiling)"),
    ]


# Where a mode's defaults differ from those above
MODE_DEFAULTS = {
    "finetune": dict(
        init_from="gpt2",
        data_dir="data/alpaca",
        out_dir="out/finetune",
        batch_size=8,
        val_steps=50,
        total_batch_size=32,
        max_lr=2e-5,
        warmup_steps=100,
        epochs=2,
        eval_interval=200,
        ckpt_interval=1000,
    ),
    "chat": dict(init_from="out/finetune", max_new_tokens=256),
    # eval: a run's own data and batches (parse_args reads them), else none.
    "eval": dict(data_dir=None, batch_size=16, hellaswag=1),
    "export": dict(init_from=None),
}


def parse_args(argv):
    """--mode, then that mode's flags. Resuming, the run's own flags are the defaults."""
    first = Parser(add_help=False)
    first.add_argument("--mode", default="sample", choices=MODES)
    mode = first.parse_known_args(argv)[0].mode
    p = Parser(
        prog="train_gpt2.py",
        description=f"GPT-2, --mode {mode}: its flags. Another mode's: --mode MODE --help",
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # --max_l is a mistake, not --max_lr
    )
    p.mode = mode
    p.add_argument("--mode", default="sample", choices=MODES, help="what to do")
    for name, modes, default, kind, text in flags():
        if mode not in modes.split():
            continue
        if kind == "append":
            p.add_argument(name, action="append", help=text)
        elif isinstance(kind, list):
            p.add_argument(name, default=default, type=type(kind[0]), choices=kind, help=text)
        else:
            p.add_argument(name, default=default, type=kind, help=text)
    p.set_defaults(**MODE_DEFAULTS.get(mode, {}))
    args = p.parse_args(argv)
    saved = {}
    if mode in TRAIN and args.init_from == "resume":
        saved = saved_args(args.out_dir)
    if mode == "eval":
        # A run's val loss is measured on its own data and batches: it equals the one it logged.
        saved = saved_args(args.init_from, ("data_dir", "batch_size", "val_steps"))
    p.set_defaults(**saved)
    args = p.parse_args(argv)
    if mode == "sample" and args.prompt is None:
        args.prompt = ["Hello, I'm a language model,"]
    check_args(p, args)
    return args


def check_args(p, args):
    """What no flag's type can check alone, before anything runs."""
    # torch.compiler.set_stance and transformers 5 need 2.6, and 2.6's compiled step gets the tied
    # embedding's gradient wrong on a CPU: 2.7 (dev/check_torch.sh runs every mode on one).
    installed = tuple(int(part) for part in torch.__version__.split(".")[:2])
    if installed < (2, 7):
        p.error(
            f"torch {torch.__version__} is older than 2.7, which this file needs: pip install --upgrade torch"
        )
    # FSDP2 of torch 2.7 and 2.8 sums the ranks' gradients on gloo instead of averaging them; 2.9's
    # clip_grad_norm_ returns one shard's norm: 2.10 is the first to equal DDP.
    if getattr(args, "fsdp", 0) and installed < (2, 10):
        p.error(
            f"--fsdp 1 needs torch 2.10 or newer (this is {torch.__version__}): pip install --upgrade "
            "torch, or train without --fsdp"
        )
    out_dir = getattr(args, "out_dir", None)
    if out_dir == "":
        p.error("--out_dir is empty: name a folder")
    # A link that leads back to itself, a name too long: found now, not after the work.
    try:
        if out_dir is not None:
            os.stat(out_dir)
    except FileNotFoundError:
        pass
    except OSError as e:
        p.error(f"--out_dir {out_dir}: {e.strerror}; choose another folder")
    env = [os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE")]
    if any(env) and not all(value and value.isdigit() for value in env):
        p.error(
            "the environment sets RANK, LOCAL_RANK or WORLD_SIZE, but not as torchrun does: start "
            "with torchrun, or unset them (unset RANK LOCAL_RANK WORLD_SIZE)"
        )
    init_from = getattr(args, "init_from", None)
    if args.mode == "export" and (init_from is None or args.out_dir is None):
        p.error(
            "--mode export needs --init_from (a checkpoint .pt, a Hugging Face GPT-2 folder, a "
            "name such as gpt2) and --out_dir (a new folder)"
        )
    if args.mode == "pretrain" and args.fsdp and args.hellaswag:
        p.error(
            "--hellaswag 1 during pretraining needs --fsdp 0: score a checkpoint with --mode eval"
        )
    if args.mode == "sample" and not all(args.prompt):
        p.error('the prompt is empty: give some text, or --prompt "<|endoftext|>" to sample freely')
    if args.mode == "finetune" and init_from == "scratch":
        p.error(
            "--mode finetune starts from a trained model: --init_from gpt2, a .pt or a run folder "
            "(--mode pretrain trains one from scratch)"
        )
    if init_from in ("resume", "scratch") and args.mode not in TRAIN:
        p.error(
            f"--init_from {init_from} is for training; to {args.mode} a run's model, give its "
            "folder (--init_from out/pretrain)"
        )
    if 0 < getattr(args, "temperature", 1) < 1e-3:
        p.error("--temperature below 0.001 makes the logits overflow: 0 is greedy")
    if args.mode == "bench" and args.bench_warmup >= args.bench_steps:
        p.error("--bench_warmup leaves none of the --bench_steps to time: give fewer warm-up steps")
    if init_from in PRESETS:
        # Said in seconds, rather than after a minute of retries.
        message = not_downloadable(init_from)
        if message is not None:
            p.error(message)
    try:
        if getattr(args, "data_dir", None) is not None:
            check_data(args.data_dir, args.mode)
    # One line, as other mistakes are, but its advice must run as written: no "(see --help)".
    except UserError as e:
        p.exit(2, f"error: {e}\n")


def check_data(data_dir, mode):
    """A data folder, before a run reads it: prepared, of the kind the mode reads, and every shard
    whole and as long as meta.json says."""
    sft = " --sft" if mode == "finetune" else ""
    # A text file, not yet tokenized: how to prepare it.
    if os.path.isfile(data_dir):
        folder = os.path.join("data", os.path.basename(data_dir).split(".")[0])
        raise UserError(
            f"--data_dir {data_dir} is a file: run python prepare_data.py{sft} --files {data_dir} "
            f"--out_dir {folder}, then give --data_dir {folder}"
        )
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        kind = meta["kind"]
        # Each split's shards, and their lengths.
        shards = {}
        if kind == "pretrain":
            for split in ("train", "val"):
                listed = meta["splits"][split]
                shards[split] = list(zip(listed["shards"], listed["shard_tokens"]))
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(
            f"data folder {os.path.abspath(data_dir)} not found, or not prepared (no meta.json): "
            f"run prepare_data.py{sft} (the same command resumes an interrupted one)"
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:  # not JSON, or not prepare_data.py's
        raise UserError(
            f"{data_dir}/meta.json is not prepare_data.py's ({type(e).__name__}: {e}): {REPREPARE}"
        )
    wanted = {"pretrain": "pretrain", "finetune": "sft"}.get(mode, kind)
    if kind != wanted:
        raise UserError(
            f"{data_dir} holds {kind} data, but --mode {mode} reads {wanted} data: run prepare_data.py{sft}"
        )
    for split, named in shards.items():
        if not named:
            raise UserError(f"{data_dir} has no {split} shards: {REPREPARE}")
        for name, length in named:
            load_array(os.path.join(data_dir, name), np.uint16, length)


def load_array(path, dtype, length=None):
    """A .npy file of prepare_data.py's, memory-mapped; its header and length checked (for free)."""
    try:
        array = np.load(path, mmap_mode="r")
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied; check its permissions")
    except OSError as e:  # missing, or unreadable
        raise UserError(f"{path} is {e.strerror}: {REPREPARE}")
    # A header numpy cannot read, or fewer bytes than it says.
    except ValueError:
        raise UserError(f"{path} is cut short or not .npy: {REPREPARE}")
    if array.dtype != dtype or array.ndim != 1 or length not in (None, len(array)):
        expected = np.dtype(dtype).name if length is None else f"{length:,} {np.dtype(dtype)}"
        raise UserError(
            f"{path} holds {array.dtype} of shape {array.shape}, but meta.json says {expected}: "
            f"{REPREPARE}"
        )
    return array


REPREPARE = "re-run prepare_data.py for it (prepare_data.py --verify names the broken file)"


class Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are one line that points to the fix."""

    def error(self, message):
        for flag in re.findall(r"unrecognized arguments: (--\w+)", message):
            message += f"; {flag_hint(flag, self.mode)}"
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # "(default: ...)", unless there is none to show.
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


OTHER_NAMES = {"--learning_rate": "--max_lr", "--lr": "--max_lr", "--max_iters": "--max_steps"}


def flag_hint(flag, mode):
    """What an unknown flag may have meant: another mode's flag, another codebase's name for one
    (nanoGPT's, llm.c's), or a misspelling."""
    modes = [m for name, flag_modes, *_ in flags() if name == flag for m in flag_modes.split()]
    if modes:
        return f"{flag} is a flag of --mode {', '.join(dict.fromkeys(modes))}, not of --mode {mode}"
    ours = {name for name, flag_modes, *_ in flags() if mode in flag_modes.split()}
    close = difflib.get_close_matches(flag, ours, n=1, cutoff=0.75)
    if OTHER_NAMES.get(flag) in ours:
        close = [OTHER_NAMES[flag]]
    return (
        f"did you mean {close[0]}?" if close else f"--mode {mode} takes {', '.join(sorted(ours))}"
    )


def saved_args(path, names=None):
    """The flags a run (its folder, or its ckpt.pt) was started with, or those of them named;
    never those that say what to resume."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    try:  # mmap: only the flags are read, not the weights
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["args"]
    # Missing, unreadable or not ours: what reads it next says what is wrong.
    except Exception:
        return {}
    names = set(names or saved) - {"init_from", "mode", "out_dir"}
    return {name: saved[name] for name in names if name in saved}


def not_downloadable(name):
    """Why OpenAI's checkpoint `name` cannot be had now, or None: it is cached, the hub (or the
    HF_ENDPOINT mirror) answers, or a proxy stands between, which only a download can try."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if endpoint.scheme in proxies or "all" in proxies:
        if not urllib.request.proxy_bypass(endpoint.hostname):
            return None
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as e:
        return (
            f"--init_from {name} is downloaded from {endpoint.hostname} once, and it cannot be "
            f"reached ({e.strerror or e}): connect once, or give a local model (a Hugging Face "
            "GPT-2 folder, an export, a .pt)"
        )
    return None


def total_batch_size_error(args, per_micro_step):
    what = (
        "--batch_size x --block_size x GPUs" if args.mode == "pretrain" else "--batch_size x GPUs"
    )
    lower = max(per_micro_step, args.total_batch_size // per_micro_step * per_micro_step)
    return (
        f"--total_batch_size {args.total_batch_size} is not a multiple of {per_micro_step:,}, a "
        f"micro-step ({what}): give {lower} or {lower + per_micro_step}"
    )


# -----------------------------------------------------------------------------
# The guards of a run: the files it reads, the folder it writes, its stop. What a user gives is
# checked once, where it enters, before step 1 and before any output is touched.

try:
    import fcntl  # the lock on a run's folder (POSIX)
except ImportError:  # Windows: runs are not locked
    fcntl = None


def load_model(init_from, padded_vocab_size=0):
    """A model to sample, evaluate, export or fine-tune, and its prompt template (or None): from
    our .pt or run folder, a Hugging Face GPT-2 folder, or OpenAI's."""
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        # A run folder: its checkpoint.
        init_from = os.path.join(init_from, "ckpt.pt")
    if os.path.isfile(init_from):
        model, checkpoint = load_checkpoint(init_from)
        return model, checkpoint.get("prompt_template")
    if init_from.endswith(".pt") or (init_from not in PRESETS and not os.path.isdir(init_from)):
        raise UserError(
            f"unknown model {init_from!r} (not found): use one of {', '.join(PRESETS)}, a "
            "checkpoint .pt, a run folder holding ckpt.pt, or a folder holding a Hugging Face GPT-2"
        )
    from safetensors import SafetensorError  # comes with transformers
    from transformers import AutoConfig
    from transformers.utils import logging

    # Missing or mismatched weights are errors here, not warnings.
    logging.set_verbosity_error()
    try:
        hf = AutoConfig.from_pretrained(init_from)
        # Another value would silently make another model.
        for field, values in HF_COMPUTATION.items():
            if getattr(hf, field) not in values:
                raise ValueError(f"it sets {field}={getattr(hf, field)!r}: not a GPT-2 as this one")
        if hf.n_inner not in (None, 4 * hf.n_embd):
            raise ValueError(f"it sets n_inner={hf.n_inner}: not a GPT-2 as this one")
        model = GPT.from_pretrained(init_from, padded_vocab_size)
    # weights_only refused a pytorch_model.bin: loading it would run code.
    except pickle.UnpicklingError:
        weights = os.path.join(init_from, "pytorch_model.bin")
        raise UserError(
            f"{weights} holds Python objects, which loading would run: re-save its tensors"
        )
    # A missing, broken or foreign folder.
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"could not load {init_from!r} as a GPT-2 checkpoint: {first_line(e)}")
    # tiktoken's GPT-2 ids would not fit, or not be this vocabulary's.
    if model.config.vocab_size != 50257:
        raise UserError(
            f"{init_from} reads {model.config.vocab_size:,} token ids, not GPT-2's 50,257: "
            "another tokenizer's"
        )
    # An export of a fine-tuned model keeps its template in config.json.
    return model, getattr(hf, "prompt_template", None)


def load_checkpoint(path, keys=("model", "config")):
    """A checkpoint of this file's, and its model, checked before anything trusts them."""
    try:
        # weights_only: a checkpoint is data, and loading it must never run code. mmap: the
        # weights are read from the file as they are copied, not held twice.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # Truncated, random bytes, another program's file, Python objects.
    except Exception as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:  # weights_only refused it: loading it would run code
            raise UserError(
                f"{path} holds a Python object ({refused[1]}), which loading would run: re-save "
                "its tensors"
            )
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line(e)[:150]}): it "
            "may be truncated or not a PyTorch file; pick another checkpoint"
        )
    missing = [key for key in keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        found = (
            ", ".join(map(str, checkpoint))[:200] if isinstance(checkpoint, dict) else checkpoint
        )
        raise UserError(
            f"{path} is not a checkpoint of train_gpt2.py: it has no {', '.join(missing)} (found: "
            f"{found})"
        )
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    # Another model's (nanoGPT's, say).
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not hold this file's GPT-2: {first_line(e)}")
    return model, checkpoint


# GPT2Config's settings that change the computation, and the values this GPT-2 computes
HF_COMPUTATION = {
    "model_type": ("gpt2",),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "tie_word_embeddings": (True,),
    "add_cross_attention": (False,),
}


def first_line(error):
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:200]


class RunGuard:
    """A run's hold on --out_dir: an flock on the folder, which the kernel drops if the process
    dies (not on Windows), since two runs would mix their checkpoints and logs. And its stop
    button: Ctrl-C or SIGTERM saves a checkpoint at the next step, then stops."""

    def __init__(self, out_dir, rank):
        self.out_dir = out_dir
        # Removed again if the run leaves nothing in it.
        self.made = not os.path.exists(out_dir)
        self.folder = None
        self.stop_requested = False
        if rank == 0:
            self.lock()
        self.previous = {
            sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def lock(self):
        if os.path.isfile(self.out_dir):
            raise UserError(f"--out_dir {self.out_dir} is a file: choose a folder")
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to --out_dir {self.out_dir}: {e.strerror}")
        self.folder = os.open(self.out_dir, os.O_RDONLY)
        try:  # LOCK_NB: refuse at once, rather than wait for the other run
            if fcntl is not None:
                fcntl.flock(self.folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise UserError(
                f"another run is using {self.out_dir}: wait for it to end, or choose another --out_dir"
            )

    def handler(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        # A flag only: the loop acts on it between steps, where a checkpoint is whole.
        self.stop_requested = True
        print0("\nstopping at the next step, with a checkpoint; Ctrl-C again quits at once")

    def close(self, tracker=None):
        """Give back the signals and the lock, end wandb, remove the folder if it was made in vain."""
        for sig, handler in getattr(self, "previous", {}).items():
            signal.signal(sig, handler)
        if tracker is not None:
            tracker.finish()
        if self.folder is not None:
            os.close(self.folder)  # releases the lock
            if self.made:
                # rmdir refuses a folder that is not empty.
                with contextlib.suppress(OSError):
                    os.rmdir(self.out_dir)


def raise_if_disk_full(path, error):
    """After a failed write to path: the OSError that the writer's own error ("unexpected pos",
    "I/O error") stands for, when it is a full disk or a limit on a file's size."""
    if isinstance(error, OSError):
        return
    if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**24:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from error
    # ulimit -f (Windows has no such limits).
    with contextlib.suppress(ImportError):
        import resource

        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path) from error


def load_run_to_resume(args):
    """The model and checkpoint of the run in --out_dir, if it is the run these flags describe."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(
            f"nothing to resume: {path} does not exist (start a run with --init_from scratch, or "
            "with a trained model to fine-tune)"
        )
    keys = ("model", "config", "optimizer", "step", "loader", "data", "args")
    model, checkpoint = load_checkpoint(path, keys)
    run = checkpoint["args"]
    if run["mode"] != args.mode:
        raise UserError(
            f"{path} is a --mode {run['mode']} run: resume it with --mode {run['mode']}, or start a "
            f"{args.mode} run with --init_from {path}"
        )
    # What made its weights and its data order. Flags not given now are the run's already.
    ran = {flag: run.get(flag) for flag in ("model", "n_layer", "n_head", "n_embd", "seed")}
    ran["block_size"] = model.config.block_size
    for flag, value in ran.items():
        given = getattr(args, flag, None)
        if given is not None and given != value:
            raise UserError(
                f"--{flag} {given} differs from the run's {value}: a resumed run keeps its model "
                f"and data order; start a new run with --init_from {path}"
            )
    return model, checkpoint


def check_resume(checkpoint, loaders, max_steps, args):
    """A resumed run has steps left, and reads the data it was reading."""
    step = checkpoint["step"]
    if step > max_steps:
        raise UserError(
            f"{args.out_dir} is at step {step}, past --max_steps {max_steps}: give at least {step}"
        )
    # A --max_steps other than the run's reshapes its cosine from here on: said, with the jump.
    before = checkpoint.get("max_steps", max_steps)
    if before != max_steps:
        min_lr = args.max_lr * args.min_lr_ratio
        old_lr = get_lr(step, args.max_lr, min_lr, args.warmup_steps, before)
        new_lr = get_lr(step, args.max_lr, min_lr, args.warmup_steps, max_steps)
        print0(
            f"note: the run's schedule changes: its cosine ends at step {max_steps}, not {before}; "
            f"at step {step} the learning rate goes from {old_lr:.2e} to {new_lr:.2e}"
        )
    # Checked: the shards' names and lengths, each one's first 32 KB (or, fine-tuning, the whole).
    if checkpoint["data"] != [loader.fingerprint for loader in loaders]:
        raise UserError(
            f"{args.data_dir} is not the data this run was reading (prepared again?): resume on "
            f"that data, or start a new run from its weights with --init_from {args.out_dir}/ckpt.pt"
        )


def fitting_batch_size(device):
    """The micro-batch of GPT-2 124M at 1024 tokens that fits the GPU: 64 in 80 GB (its eager loss
    keeps ~53 GiB there), halved for each halving of the memory; 8 on a CPU or a Mac."""
    if not device.startswith("cuda"):
        return 8
    memory = torch.cuda.get_device_properties(device).total_memory
    batch_size = 64
    while batch_size > 1 and memory < 80e9 * batch_size / 64:
        batch_size //= 2
    print0(f"--batch_size {batch_size}: what GPT-2 124M fits in {memory / 2**30:.0f} GiB")
    return batch_size


def non_finite_error(step, loss, grad_norm, checkpoint_path, saved_step):
    """The error of a step whose loss or gradient norm is not finite (its update not applied)."""
    where = "no checkpoint before it to go back to: start again with a lower --max_lr"
    if 0 < saved_step < step:
        where = (
            f"the last good checkpoint is {checkpoint_path} at step {saved_step} (resume it with a "
            "lower --max_lr, or check the data)"
        )
    return UserError(
        f"the loss became non-finite at step {step + 1} (loss {loss:.4g}, gradient norm "
        f"{grad_norm:.4g}); {where}"
    )


def one_line(e, args):
    """main()'s line for what the user can fix (a mistake, memory, a full or read-only disk), or
    None: a bug, which keeps its traceback."""
    if isinstance(e, UserError):
        return str(e)
    # CUDA's out of memory, or a CPU's (torch's allocator says "can't allocate memory").
    if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
        return out_of_memory_advice(args)
    if not isinstance(e, OSError):
        return None
    advice = {
        errno.ENOSPC: "free some space, or ",
        errno.EDQUOT: "free some space, or ",
        errno.ENOTEMPTY: "another command filled it meanwhile: ",
        errno.EEXIST: "another command filled it meanwhile: ",
        errno.EROFS: "",
        errno.EACCES: "check its permissions, or ",
        errno.EPERM: "check its permissions, or ",
        errno.EFBIG: "the file system, or ulimit -f, limits a file's size: ",
        errno.ELOOP: "a link in its path leads back to itself: ",
        errno.ENAMETOOLONG: "",
    }
    if e.errno not in advice:
        return None
    path = e.filename2 or e.filename or getattr(args, "out_dir", None) or "a file"
    return f"cannot use {path}: {e.strerror}; {advice[e.errno]}choose another folder"


def out_of_memory_advice(args):
    """How much memory there is, and a micro-batch half as big (half the activations)."""
    where = "this machine"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        where = f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB on {torch.cuda.get_device_name()}"
    batch_size = getattr(args, "batch_size", 1)
    if batch_size == 1:
        advice = f"the model does not fit in {where}: try a smaller one"
        return advice + (", or --activation_checkpointing 1" if args.mode in TRAIN else "")
    advice = (
        f"--batch_size {batch_size} does not fit in {where}: try --batch_size {batch_size // 2}"
    )
    return advice + ("; --total_batch_size keeps each step the same" if args.mode in TRAIN else "")


def fsdp_on_gloo(args):
    """FSDP on CPUs under torchrun, whose gloo threads (kept alive by FSDP's device meshes) can
    abort Python's shutdown (PyTorch PR 179291): such a process ends with os._exit."""
    if not getattr(args, "fsdp", 0) or "LOCAL_RANK" not in os.environ:
        return False
    return dist.is_initialized() and dist.get_backend() == "gloo"


def exit_with(args, message, code):
    print(message, file=sys.stderr)
    if fsdp_on_gloo(args):
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def end_process_group(args):
    if fsdp_on_gloo(args):
        sys.stdout.flush()
        os._exit(0)
    # A clean exit: NCCL warns about a group left open.
    dist.destroy_process_group()


def truncate_log(path, step):
    """log.jsonl cut after `step`'s entries: a run killed after its checkpoint logged steps that
    it does again now. A line cut short by the kill, or anything but an entry, ends what is kept."""
    if not is_master() or not os.path.exists(path):
        return
    kept = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if line.strip() and (json.loads(line)["step"] > step or not line.endswith(b"\n")):
                    break
            except (ValueError, KeyError, TypeError):
                break
            kept += len(line)
    os.truncate(path, kept)


def start_wandb(args, checkpoint):
    """A Weights & Biases run that receives what log.jsonl receives; a resumed run continues it."""
    if not is_master():
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs wandb: pip install wandb")
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled")
    if not offline and not wandb.login(prompt=False, verify=False):
        raise UserError(
            "--wandb_project needs a Weights & Biases login: run wandb login, or set WANDB_MODE=offline"
        )
    # Saved in every checkpoint.
    run_id = checkpoint.get("wandb_id") if checkpoint else None
    return wandb.init(
        project=args.wandb_project,
        name=os.path.basename(os.path.normpath(args.out_dir)),
        config=vars(args),
        dir=args.out_dir,
        id=run_id,
        resume="allow",
    )


# -----------------------------------------------------------------------------
# Fine-tuning: instruction examples (prepare_data.py --sft), the loss on the answers only


class InstructionLoader:
    """Instruction examples, each with its targets: the next token where it is the answer's (and
    its <|endoftext|>), else -100, not learned. A step's examples, sorted by length, are padded to
    the longest of their micro-batch; the micro-batches are the same on any number of GPUs."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337):
        self.B = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        path = os.path.join(data_dir, split)
        # Every example's tokens, end to end.
        tokens = load_array(f"{path}_tokens.npy", np.uint16)
        # 1 where a token is the answer's.
        mask = load_array(f"{path}_mask.npy", np.uint8)
        # Example i is tokens[offsets[i] : offsets[i + 1]].
        offsets = load_array(f"{path}_offsets.npy", np.int64)
        # Instruction data is small (Alpaca: ~10M tokens): checked whole, up front.
        if len(offsets) < 2 or offsets[-1] != len(tokens) or tokens.max() >= 50257:
            raise UserError(
                f"the {split} files of {data_dir} do not agree (examples, offsets or token ids): "
                "re-run prepare_data.py --sft for this folder"
            )
        ids = torch.from_numpy(tokens.astype(np.int64))
        targets = ids.masked_fill(torch.from_numpy(mask == 0), -100)
        # Example i's inputs, and its targets: each input's next token.
        bounds = zip(offsets[:-1], offsets[1:])
        self.examples = [(ids[start : end - 1], targets[start + 1 : end]) for start, end in bounds]
        self.lengths = np.diff(offsets) - 1
        meta = read_meta(data_dir)
        # Chat and sample wrap a prompt in it.
        self.template = meta["prompt_template"]
        if self.lengths.max() > block_size:
            raise UserError(
                f"{data_dir} has examples of {self.lengths.max() + 1} tokens, more than the model's "
                f"block_size {block_size} + 1: prepare it again for this model, with "
                f"{meta.get('command')} --block_size {block_size} --out_dir {data_dir} --overwrite"
            )
        # On resume, the data must be the same: the three files' sha256 (~20 ms).
        self.fingerprint = [hashlib.sha256(array).hexdigest() for array in (tokens, mask, offsets)]
        self.epoch = 0  # an epoch's order follows from (seed, epoch)
        self.step_in_epoch = 0

    def batch(self, indices):
        """(B, L) inputs and targets of these examples, right-padded to the longest: a causal
        model never reads the padding from the real tokens."""
        x = pad_sequence(
            [self.examples[i][0] for i in indices], batch_first=True, padding_value=EOT_TOKEN
        )
        y = pad_sequence(
            [self.examples[i][1] for i in indices], batch_first=True, padding_value=-100
        )
        return x, y

    def steps_per_epoch(self, grad_accum):
        # The few examples left over sit the epoch out.
        return len(self.examples) // (grad_accum * self.world_size * self.B)

    def next_step(self, grad_accum):
        # Examples in a step, over all ranks.
        per_step = grad_accum * self.world_size * self.B
        if self.step_in_epoch >= self.steps_per_epoch(grad_accum):
            self.epoch += 1
            self.step_in_epoch = 0
        # The epoch's order, made again each step from (seed, epoch): two numbers resume it.
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        first = self.step_in_epoch * per_step
        step = order[first : first + per_step]  # the same on every rank
        # By length (ties keep their order): micro-batches of alike lengths pad little.
        step = step[np.argsort(self.lengths[step], kind="stable")]
        self.step_in_epoch += 1
        # Micro-step m of rank r takes the (m * world_size + r)-th B examples, as pretraining.
        micro_batches = step.reshape(grad_accum, self.world_size, self.B)[:, self.rank]
        return [self.batch(indices) for indices in micro_batches]

    def eval_steps(self, max_batches):
        # The last batch may be short.
        return min(max_batches, math.ceil(len(self.examples) / self.B))

    def eval_batch(self, i):
        return self.batch(range(len(self.examples))[i * self.B : (i + 1) * self.B])

    def state_dict(self):
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]


# -----------------------------------------------------------------------------
# FSDP and activation checkpointing: bigger models on smaller GPUs


def wrap_blocks(model, dtype, args):
    """In place, as torchtitan does: each block checkpointed, compiled and sharded (FSDP2), then
    the root (wte = lm_head) sharded too."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if args.activation_checkpointing:
        for i, block in enumerate(model.transformer.h):
            # The block keeps only its input, and runs again in the backward pass: the saved
            # activations go from ~34 to 2 of (B, T, C).
            model.transformer.h[i] = checkpoint_wrapper(block)
    if not args.fsdp:
        return model
    # FSDP2 gathers the weights cast to the compute dtype (half the traffic); AdamW's float32
    # shards stay the master copy.
    param_dtype = None if dtype == torch.float32 else dtype
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if not dist.is_initialized():
        # One process, to try FSDP on one GPU: a group of one.
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        store = dist.HashStore()
        dist.init_process_group(backend, rank=0, world_size=1, store=store)
    for block in model.transformer.h:
        if args.compile:
            # Each block alone (without FSDP, the whole model is compiled).
            block.compile()
        # One all-gather in the forward pass and one reduce-scatter in the backward, a block.
        fully_shard(block, mp_policy=mp_policy)
    if args.compile:
        # The LM head and the loss too: the step's largest tensors, fused as a whole model's are.
        model.head = torch.compile(model.head)
    # The root's weights are needed again at once (the tied head): not resharded.
    fully_shard(model, mp_policy=mp_policy, reshard_after_forward=False)
    return model


# -----------------------------------------------------------------------------
# HellaSwag and --mode eval. Each rank scores its share and the counts are all-reduced, so that
# the numbers are one process's, whatever the number of GPUs.


def load_hellaswag(path, limit=None):
    """prepare_data.py --hellaswag's items, each checked (a broken one would be scored as wrong)."""
    if not os.path.exists(path):
        raise UserError(
            f"{path} not found: run prepare_data.py --hellaswag (or give --hellaswag_path)"
        )
    # lm-evaluation-harness asks its query with the last three.
    texts = ("ctx", "activity_label", "ctx_a", "ctx_b")
    items = []
    # Bytes: a line that is not UTF-8 is reported as any bad line.
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if len(items) == limit:
                break
            if not line.strip():  # a blank line is no item
                continue
            try:
                item = json.loads(line)
                ok = all(isinstance(item[key], str) for key in texts) and item["label"] in range(4)
                ok = ok and [type(ending) for ending in item["endings"]] == [str] * 4
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise UserError(
                    f"{path}, line {number}: not a HellaSwag item ({', '.join(texts)}, 4 endings, "
                    "a label 0-3): re-run prepare_data.py --hellaswag --overwrite"
                )
            items.append(item)
    if not items:
        raise UserError(f"{path} holds no HellaSwag items: re-run prepare_data.py --hellaswag")
    return items


def harness_item(item):
    """The item as lm-evaluation-harness asks it: the activity label and both halves of the
    context (the second capitalized) as the query; the query and the endings cleaned of WikiHow's
    bracketed tags ("[title]", "[step]")."""

    def clean(text):
        text = text.strip().replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", text).replace("  ", " ")

    query = item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize()
    endings = [clean(ending) for ending in item["endings"]]
    return {"ctx": clean(query), "endings": endings, "label": item["label"]}


@torch.no_grad()
def score_item(model, enc, item, dtype):
    """The 4 endings' losses after the item's context, summed over each ending's tokens (4,), and
    the endings' lengths in tokens (4,)."""
    device = next(model.parameters()).device
    context = enc.encode(item["ctx"])
    inputs = []
    targets = []
    for ending in item["endings"]:
        # The space between them belongs to the ending's first token.
        ending_ids = enc.encode(" " + ending)
        # Of a row too long for the model, its end. Its last token is a target only.
        row = (context + ending_ids)[-model.config.block_size - 1 :]
        inputs.append(torch.tensor(row[:-1]))
        target = torch.tensor(row[1:])
        # -100: not the ending, not counted.
        target[: -len(ending_ids)] = -100
        targets.append(target)
    ids = pad_sequence(inputs, batch_first=True, padding_value=EOT_TOKEN)  # (4, width)
    targets = pad_sequence(targets, batch_first=True, padding_value=-100)
    with autocast(device, dtype):
        logits, _ = model(ids.to(device))  # (4, width, vocab)
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten().to(device), reduction="none"
    )
    sums = losses.view(4, -1).sum(dim=1)  # (4,)
    return sums.cpu(), (targets != -100).sum(dim=1)


def hellaswag_eval(model, items, dtype, harness=False, progress=False):
    """HellaSwag accuracy, the items dealt to the ranks. acc: the ending of least summed loss.
    acc_norm: of least loss per token (GPT-2's and GPT-3's way); with harness=True (lm-evaluation-
    harness's way), of the harness's cleaned query and endings, per character. progress: a
    progress bar on rank 0, in whole items."""
    rank, world_size = rank_and_world_size()
    enc = get_tokenizer()
    mine = items[rank::world_size]
    if progress:
        from tqdm import tqdm

        name = "HellaSwag, lm-evaluation-harness's way" if harness else "HellaSwag, GPT-2's way"
        mine = tqdm(mine, unit="item", desc=name, disable=rank != 0)
    right = torch.zeros(3, dtype=torch.float64)  # acc, acc_norm, items
    for item in mine:
        asked = harness_item(item) if harness else item
        sums, lengths = score_item(model, enc, asked, dtype)
        if harness:
            lengths = torch.tensor([len(ending) for ending in asked["endings"]])
        label = item["label"]
        right += torch.tensor([sums.argmin() == label, (sums / lengths).argmin() == label, 1])
    device = next(model.parameters()).device
    # Every rank's counts.
    acc, acc_norm, n = all_reduce_sum(right.to(device)).tolist()
    prefix = "hellaswag_harness" if harness else "hellaswag"
    return {f"{prefix}_acc": acc / n, f"{prefix}_acc_norm": acc_norm / n, "hellaswag_items": int(n)}


def evaluate(args):
    """--mode eval: a model's val loss and HellaSwag accuracy, as a table and as eval.json."""
    device = setup_distributed(args.device)
    rank, world_size = rank_and_world_size()
    dtype = pick_dtype(device, args.dtype)
    if args.hellaswag:
        limit = args.hellaswag_limit
        # A CPU takes many minutes over all 10,042 items: it takes a quick look, unless told.
        if limit is None and not device.startswith("cuda"):
            limit = 200
            print0(
                "HellaSwag on a CPU: the first 200 items, a quick look (all: --hellaswag_limit 10042)"
            )
        # A bad file fails now, not after the model has loaded (a minute for gpt2-xl).
        items = load_hellaswag(args.hellaswag_path, limit)
    model, _ = load_model(args.init_from)
    model.to(device)
    model.eval()
    results = {"model": args.init_from}
    if args.data_dir is not None:
        # At the model's own block_size; the folder says how to read it (checked by check_args).
        meta = read_meta(args.data_dir)
        Loader = InstructionLoader if meta["kind"] == "sft" else PretrainLoader
        block_size = model.config.block_size
        loader = Loader(args.data_dir, "val", args.batch_size, block_size, rank, world_size)
        results["val_loss"] = evaluate_loss(model, loader, args.val_steps, dtype)
        # What it was measured on: another batch size or block size gives another val loss.
        n = loader.eval_steps(args.val_steps)
        results["val_loss_of"] = f"{n} batches of {args.batch_size} x {block_size}"
    if args.hellaswag:
        t0 = time.time()
        for harness in (False, True):  # both published conventions
            results.update(hellaswag_eval(model, items, dtype, harness, progress=True))
        results["hellaswag_items_per_s"] = results["hellaswag_items"] / (time.time() - t0)
    if rank != 0:  # the results are summed over the ranks already
        return results
    # The numbers as JSON for scripts, then a table (written first: a closed screen loses none).
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "eval.json")
    with atomic_write(path) as f:
        f.write(json.dumps(results, indent=2).encode())
    for key, value in results.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        print(f"{key:<24}  {value}")
    print(f"wrote {path}")
    return results


# -----------------------------------------------------------------------------
# --mode chat


def chat(args):
    """--mode chat: type an instruction, read the answer as it comes; /quit leaves. Single
    turns, as Alpaca teaches."""
    model, template = load_to_sample(args)
    if template is None:
        raise UserError(
            f"{args.init_from} is not fine-tuned (it has no prompt template): chat needs a --mode "
            "finetune checkpoint or its export; --mode sample continues a pretrained model's text"
        )
    enc = get_tokenizer()
    # Line editing and history for input(); not on Windows.
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401
    print("Type an instruction and press Enter; Ctrl-C stops an answer; /quit or Ctrl-D leaves.")
    while True:
        try:
            instruction = input("> ").strip()
        # Ctrl-D or Ctrl-C at the prompt: leave.
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if instruction in ("/quit", "/exit"):
            break
        if not instruction:  # an empty line asks nothing
            continue
        try:
            stream_text(model, enc, encode_prompt(enc, instruction, template), args)
        # Ctrl-C while answering: the answer stops, the chat goes on.
        except KeyboardInterrupt:
            print(" [stopped]")


# -----------------------------------------------------------------------------
# --mode export: a folder that transformers (and vLLM, TGI, llama.cpp's converter...) loads as
# it loads OpenAI's GPT-2: its weights, config and tokenizer files.


def jinja_chat_template(template):
    """The str.format prompt template as a Jinja chat template: a user message renders as the
    template does, an answer as itself and <|endoftext|>. The template's text goes in as Jinja
    string literals, so that no brace in it is read as Jinja."""
    # The parser str.format itself uses: '{{' comes out as '{'.
    from string import Formatter

    pieces = []
    for literal, field, spec, conversion in Formatter().parse(template):
        if literal:
            # A JSON string is a Jinja string literal.
            pieces.append("{{ " + json.dumps(literal, ensure_ascii=False) + " }}")
        if field is None:
            continue
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


def write_hf_folder(model, template, folder):
    """The model as transformers saves a GPT-2 (config.json, generation_config.json,
    model.safetensors), with OpenAI's tokenizer files as tiktoken cached them."""
    from tiktoken.load import read_file_cached
    from transformers import GPT2Config, GPT2LMHeadModel

    config = model.config
    # GPT2Config's defaults for the rest: what this GPT-2 computes.
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    # The plain str.format template, as sample and chat use it.
    hf_config.prompt_template = template
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()  # Conv1D's layout
        if key in ("transformer.wte.weight", "lm_head.weight"):
            value = value[: config.vocab_size]  # without the padded rows
        state[key] = value
    hf_model = GPT2LMHeadModel(hf_config)
    hf_model.load_state_dict(state)
    # generate() samples as --mode sample and chat do, and stops at <|endoftext|>.
    hf_model.generation_config.update(
        do_sample=True, temperature=0.8, top_k=200, pad_token_id=EOT_TOKEN
    )
    hf_model.save_pretrained(folder)
    # model.safetensors as readable as config.json (the umask's), not private
    shutil.copymode(os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors"))
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name, url in (("vocab.json", base + "encoder.json"), ("merges.txt", base + "vocab.bpe")):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(read_file_cached(url))
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": config.block_size,
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    if template is not None:
        tokenizer_config["chat_template"] = jinja_chat_template(template)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)


def export(args):
    """--mode export: --init_from as a Hugging Face GPT-2 folder at --out_dir, built beside it and
    renamed when whole."""
    # No trailing '/', no link: the .partial folder is a sibling of the folder it becomes.
    out_dir = os.path.realpath(args.out_dir)
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise UserError(
            f"{args.out_dir} exists and is not an empty folder: export never overwrites files; "
            "give a new --out_dir, or move that one away first"
        )
    # The tokenizer's files are copied from tiktoken's cache: they must be there.
    get_tokenizer()
    print(f"reading {args.init_from}")
    model, template = load_model(args.init_from)
    # A sibling: the final rename stays on one filesystem.
    tmp = f"{out_dir}.partial-{os.getpid()}"
    try:
        write_hf_folder(model, template, tmp)
        if os.path.isdir(out_dir):
            # Empty, as checked; refused if another command filled it since.
            os.rmdir(out_dir)
        # The finished folder appears at once, under its name.
        os.rename(tmp, out_dir)
    except Exception as e:
        # safetensors says "I/O error" when the disk is full.
        raise_if_disk_full(out_dir, e)
        raise
    finally:  # Ctrl-C too: no .partial folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out_dir}: {', '.join(sorted(os.listdir(out_dir)))}")


# -----------------------------------------------------------------------------
# --mode bench: a training step timed on random tokens, without data; MFU against the GPU's
# peak. (Generation, and comparisons with other codebases: dev/compare.py.)

# Dense bf16 tensor-core peak, TFLOP/s, by the GPU's model as torch names it, matched whole (the
# first match): "L40S" is not "L4".
PEAK_TFLOPS = {
    r"GB200\b.*": 2500,
    r"B[23]00\b.*": 2250,
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
}


def peak_flops(device):
    """The GPU's peak FLOP/s from PEAK_TFLOPS (torch names it "NVIDIA H100 80GB HBM3"), or None on
    a CPU or an unknown GPU: no MFU rather than a wrong one."""
    if not device.startswith("cuda"):
        return None
    name = re.sub(r"^(NVIDIA )?(GeForce |Tesla )?", "", torch.cuda.get_device_name(device))
    # A MIG slice ("H100 80GB HBM3 MIG 3g.40gb") has g of the GPU's 7 compute slices.
    share = 1
    mig = re.search(r" MIG (\d)g\..*", name)
    if mig:
        share = int(mig[1]) / 7
        name = name[: mig.start()]
    for pattern, tflops in PEAK_TFLOPS.items():
        if re.fullmatch(pattern, name):
            return tflops * 1e12 * share
    return None


def flops_per_token(model):
    """Training FLOPs per token (PaLM, appendix B): 6 a parameter (wpe aside), and attention's
    12 * L * C * T."""
    config = model.config
    n_params = num_params(model) - config.block_size * config.n_embd
    return 6 * n_params + 12 * config.n_layer * config.n_embd * config.block_size


def bench(args):
    """--mode bench: the median training step on random tokens (no data): tokens/s, MFU and
    memory (CUDA); DDP or FSDP under torchrun. (Generation: python dev/compare.py generate.)"""
    device = setup_distributed(args.device)
    _, world_size = rank_and_world_size()
    dtype = pick_dtype(device, args.dtype)
    cuda = device.startswith("cuda")
    torch.manual_seed(args.seed)
    if args.batch_size is None:
        args.batch_size = fitting_batch_size(device)
    # Random weights: the speed is the same.
    raw_model = GPT(new_model_config(args)).to(device)
    model = parallelize(raw_model, dtype, args)  # as a training run's
    optimizer = configure_optimizer(raw_model, 0.1, 6e-4)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    B = args.batch_size
    T = raw_model.config.block_size
    print0(
        f"bench: {num_params(raw_model):,} parameters, batch {B} x {T}, {device}, {dtype}, compile "
        f"{args.compile}, {world_size} process(es), FSDP {args.fsdp}, {args.bench_steps} steps, "
        f"the first {args.bench_warmup} not timed"
    )
    times = []
    for i in range(args.bench_steps):
        # Fresh tokens each step, as the inputs and as the targets: the speed is the same.
        x = torch.randint(0, 50257, (B, T), device=device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # The training step, as train()'s.
        forward_backward(model, [(x, x)], dtype, scaler)
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            # The GPU runs behind Python: timed once the step is done.
            torch.cuda.synchronize()
        if i >= args.bench_warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)  # a stray slow step does not count
    tokens_per_s = B * T * world_size / median
    line = f"median step {1000 * median:.1f} ms | {tokens_per_s:,.0f} tokens/s"
    if cuda:
        peak = peak_flops(device)
        if peak is None:
            line += f" | MFU unknown for {torch.cuda.get_device_name(device)}"
        else:
            mfu = flops_per_token(raw_model) * tokens_per_s / (peak * world_size)
            line += f" | MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s"
        line += f" | peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    print0(line)


# -----------------------------------------------------------------------------
# --mode plot

# OpenAI's GPT-2 124M, for the default recipe (124M on FineWeb-Edu): its val loss on FineWeb-Edu's
# val split as build-nanogpt measured it, and its HellaSwag acc_norm (this file's --mode eval).
GPT2_124M = {"val_loss": 3.2924, "hellaswag_acc_norm": 0.2955}


def read_log(path):
    """log.jsonl's entries, each a step and numbers; a line cut short by a crash or edited into
    something else is refused by its number."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: point --out_dir at a training run's folder")
    entries = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                ok = isinstance(entry.get("step"), int)
                ok = ok and all(isinstance(v, (int, float)) for v in entry.values())
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                raise UserError(
                    f"{path}, line {number}, is not a log entry: remove it and plot again"
                )
            entries.append(entry)
    return entries


def plot(args):
    """--mode plot: log.jsonl's losses, learning rate and HellaSwag, drawn into plot.png; for the
    default recipe, OpenAI's GPT-2 124M beside them."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window: works on a server
    import matplotlib.pyplot as plt

    entries = read_log(os.path.join(args.out_dir, "log.jsonl"))  # checked line by line
    run = saved_args(args.out_dir)  # the run's flags, from its checkpoint
    default_recipe = run.get("model") == "gpt2" and run.get("n_layer") is None
    default_recipe = default_recipe and "fineweb_edu" in str(run.get("data_dir"))
    panels = [["loss", "val_loss"], ["lr"], ["hellaswag_acc_norm"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, keys in zip(axes, panels):
        for key in keys:
            steps = [entry["step"] for entry in entries if key in entry]
            ax.plot(steps, [entry[key] for entry in entries if key in entry], label=key)
            if default_recipe and key in GPT2_124M:
                ax.axhline(GPT2_124M[key], color="gray", linestyle="--", label="OpenAI GPT-2 124M")
        ax.set(xlabel="step", ylabel=keys[0])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(args.out_dir)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "plot.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
