"""
GPT-2 in one file: the model, OpenAI's weights, generation, pretraining (DDP),
instruction fine-tuning, evaluation (validation loss, HellaSwag) and plots.

Sample from OpenAI's GPT-2 (downloads the weights through Hugging Face once):
    python train_gpt2.py --mode sample --init_from gpt2 --prompt "Hello, I'm a language model,"

Pretrain GPT-2 124M on FineWeb-Edu 10B (first: python prepare_data.py):
    one GPU, a Mac or a CPU:  python train_gpt2.py --mode pretrain
    8 GPUs on one node:       torchrun --standalone --nproc_per_node=8 train_gpt2.py --mode pretrain
    2 nodes of 8 GPUs:        on each node, with --node_rank=0 on the first and 1 on the second:
        torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=IP_OF_NODE_0 --master_port=29500 \
            train_gpt2.py --mode pretrain
    a tiny model on a laptop: python train_gpt2.py --mode pretrain --data_dir data/shakespeare \
                                  --n_layer 4 --n_head 4 --n_embd 128 --block_size 256 --batch_size 8 --total_batch_size 4096

Fine-tune on Alpaca, then talk to it (first: python prepare_data.py --sft):
    python train_gpt2.py --mode finetune --init_from gpt2 --data_dir data/alpaca
    python train_gpt2.py --mode chat --init_from out/finetune/ckpt.pt

Evaluate (first: python prepare_data.py --hellaswag):
    python train_gpt2.py --mode eval --init_from gpt2 --data_dir data/fineweb_edu_10B

Every flag: python train_gpt2.py --help
"""

import argparse
import codecs
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# The model

EOT_TOKEN = 50256  # <|endoftext|>: separates documents, ends an answer, stops generation


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can read (learned positions)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary: the token ids the model reads and writes
    # Rows of the embedding / LM head. 50304 = 128 * 393 makes the biggest matmul of the model
    # tile evenly on a GPU; the extra rows are never read or predicted (forward cuts them off).
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


class KVCache:
    """Keys and values of the positions seen so far, for every layer, so that generating
    one more token costs one position's work instead of the whole sequence's."""

    def __init__(self, n_layer, batch_size, n_head, capacity, head_size, device, dtype):
        shape = (n_layer, batch_size, n_head, capacity, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already stored; GPT.forward advances it after the last layer

    def update(self, layer, k, v):
        """Store this step's (B, nh, T, hs) keys and values; return all of them so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of a KVCache is ours
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1  # adds into the residual stream: see GPT._init_weights

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        if attn_mask is not None:  # padding in the batch: an explicit (B, 1, T, past + T) mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:  # no padding: is_causal lets PyTorch pick the flash kernel
            # with a cache and T == 1 the one query may see every stored key, so no mask at all
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
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

    def forward(self, idx, targets=None, attention_mask=None, kv_cache=None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -100 where no loss is wanted.
        attention_mask: (B, past + T), 1 for real tokens and 0 for (left) padding, as in
        transformers; positions count real tokens only, so a padded row computes exactly
        what it computes alone. kv_cache: a KVCache to read past positions from and append
        to; then only the last position's logits are returned, as generation needs no more."""
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        attn_mask = None
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        else:
            real = attention_mask.bool()  # (B, past + T)
            pos = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            query_pos = torch.arange(past, past + T, device=idx.device).view(T, 1)
            key_pos = torch.arange(past + T, device=idx.device).view(1, past + T)
            # A query sees earlier real tokens, and always itself: a padding query with
            # nothing to see would make softmax return NaN, which then leaks everywhere.
            attn_mask = (key_pos <= query_pos) & (real[:, None, None, :] | (key_pos == query_pos))  # (B, 1, T, past + T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.length += T
            if targets is None:
                x = x[:, -1:, :]  # generating: the next token depends on the last position only
        # The matmul runs over the padded vocabulary (fast shapes); the padded columns are cut
        # off before softmax, so they are never sampled and never change a loss.
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path, padded_vocab_size=None):
        """OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", from the Hugging
        Face hub) or a local directory with a Hugging Face GPT-2 checkpoint. Pass
        padded_vocab_size=50304 to train it further at full speed."""
        if name_or_path not in PRESETS and not os.path.isdir(name_or_path):
            raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(PRESETS)}, "
                             "or a directory holding a Hugging Face GPT-2 checkpoint")
        try:
            from transformers import GPT2LMHeadModel  # only needed here, so imported here
        except ImportError:
            raise ValueError("reading Hugging Face GPT-2 weights needs transformers: pip install transformers") from None
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()  # we report missing or mismatched weights ourselves
            hf_logging.disable_progress_bar()
            hf_model, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"could not load {name_or_path!r} as a GPT-2 checkpoint: {first_line}") from None
        for problem in ("missing_keys", "mismatched_keys"):
            if info[problem]:
                raise ValueError(f"checkpoint {name_or_path!r} is broken: {problem.replace('_', ' ')}: "
                                 f"{', '.join(sorted(map(str, info[problem])))}")
        hf = hf_model.config
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or hf.scale_attn_by_inverse_layer_idx or hf.reorder_and_upcast_attn:
            raise ValueError(f"checkpoint {name_or_path!r} is a GPT-2 variant this model does not implement")
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd,
                           padded_vocab_size=max(padded_vocab_size or 0, hf.vocab_size))
        model = cls(config)
        ours, theirs = model.state_dict(), hf_model.state_dict()
        # OpenAI's checkpoint stores these four as Conv1D, i.e. (in, out); nn.Linear wants (out, in).
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for key, param in ours.items():
                if key not in theirs:
                    raise ValueError(f"checkpoint {name_or_path!r} has no weight {key!r}")
                src = theirs[key].t() if key.endswith(transposed) else theirs[key]
                if key in ("transformer.wte.weight", "lm_head.weight"):
                    param[src.size(0):].normal_(0.0, 0.02)  # padded rows: never used, just tidy
                    param = param[:src.size(0)]
                if src.shape != param.shape:
                    raise ValueError(f"checkpoint {name_or_path!r}: weight {key!r} has shape "
                                     f"{tuple(src.shape)}, expected {tuple(param.shape)}")
                param.copy_(src)
        return model

    # -- generation ------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=64, temperature=1.0,
                 top_k=None, top_p=None, eos_token_id=EOT_TOKEN, generator=None):
        """The prompt followed by up to max_new_tokens new tokens, (B, T + new), like
        transformers' generate; a row that stopped early is padded with eos_token_id."""
        new_tokens = list(self.stream(input_ids, attention_mask, max_new_tokens, temperature,
                                      top_k, top_p, eos_token_id, generator))
        return torch.cat([input_ids] + [t[:, None] for t in new_tokens], dim=1)

    @torch.no_grad()
    def stream(self, input_ids, attention_mask=None, max_new_tokens=64, temperature=1.0,
               top_k=None, top_p=None, eos_token_id=EOT_TOKEN, generator=None):
        """Yields the next token of every row, (B,), as soon as it is chosen (see generate).
        The prompt is left-padded where rows differ in length, with attention_mask 0 there."""
        B, T = input_ids.size()
        if T == 0:
            raise ValueError("the prompt is empty: give at least one token")
        window = self.config.block_size
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = attention_mask[:, -window:].bool() if padded else None
        ids = input_ids[:, -window:]  # a prompt longer than the model can read: keep its end
        head_size = self.config.n_embd // self.config.n_head
        cache = KVCache(self.config.n_layer, B, self.config.n_head, min(window, T + max_new_tokens),
                        head_size, input_ids.device, self.lm_head.weight.dtype)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if step == 0:
                logits, _ = self(ids, attention_mask=mask, kv_cache=cache)
            elif ids.size(1) <= window:  # the usual step: one new position, the rest is cached
                logits, _ = self(ids[:, -1:], attention_mask=mask, kv_cache=cache)
            else:
                # Past block_size the window slides. Positions are baked into the cached keys,
                # so the cache cannot shift with it: recompute the window, as without a cache.
                ids = ids[:, -window:]
                mask = mask[:, -window:] if padded else None
                cache.length = 0
                logits, _ = self(ids, attention_mask=mask, kv_cache=cache)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            yield next_token
            if eos_token_id is not None and bool(finished.all()):
                return
            ids = torch.cat([ids, next_token[:, None]], dim=1)
            if padded:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)


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


# -----------------------------------------------------------------------------
# Devices, tokenizer and loading a model to use


def pick_device(requested="auto"):
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device):
    """bf16 autocast on CUDA (the weights stay float32, the matmuls run in bf16); elsewhere a no-op."""
    device_type = device.split(":")[0]
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")


def get_tokenizer():
    import tiktoken  # imported late so the model above can be copied without it
    return tiktoken.get_encoding("gpt2")


def load_model(init_from, padded_vocab_size=None):
    """A model from a checkpoint of ours (a .pt file) or from Hugging Face GPT-2 weights,
    with the checkpoint's dict (None for Hugging Face weights)."""
    if os.path.isfile(init_from):
        checkpoint = load_checkpoint(init_from)
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        return model, checkpoint
    if init_from.endswith(".pt"):
        raise FileNotFoundError(f"checkpoint {init_from} not found")
    return GPT.from_pretrained(init_from, padded_vocab_size), None


def load_checkpoint(path):
    try:
        # weights_only: a checkpoint is data, and loading it must not run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}): re-save it, or pick another") from None


# -----------------------------------------------------------------------------
# Sampling


def encode_prompts(enc, prompts, template=None):
    """Token ids of each prompt, wrapped in the fine-tuning template when there is one.
    <|endoftext|> is allowed, so '--prompt "<|endoftext|>"' samples unconditionally."""
    token_lists = []
    for prompt in prompts:
        text = template.format(instruction=prompt) if template else prompt
        token_lists.append(enc.encode(text, allowed_special={"<|endoftext|>"}))
    return token_lists


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


def stream_text(model, enc, tokens, device, args, generator=None):
    """Print one answer token by token as it is generated; return its text."""
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    # BPE tokens can split a UTF-8 character: decode bytes incrementally, never mid-character.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    with autocast(device):
        for token in model.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, generator=generator):
            if token.item() == EOT_TOKEN:
                break
            pieces.append(decoder.decode(enc.decode_single_token_bytes(token.item())))
            print(pieces[-1], end="", flush=True)
    pieces.append(decoder.decode(b"", final=True))
    print(pieces[-1])
    return "".join(pieces)


def sample(args):
    device = pick_device(args.device)
    prompts = args.prompt or ["Hello, I'm a language model,"]
    if not all(prompts):  # before loading a model that may take a minute
        raise ValueError('the prompt is empty: give some text, or --prompt "<|endoftext|>" to sample unconditionally')
    model, checkpoint = load_model(args.init_from or "gpt2")
    model.to(device).eval()
    enc = get_tokenizer()
    template = (checkpoint or {}).get("prompt_template")  # set by --mode finetune
    token_lists = encode_prompts(enc, prompts, template)
    for prompt, tokens in zip(prompts, token_lists):
        if len(tokens) > model.config.block_size:
            print(f"note: prompt {prompt[:30]!r}... has {len(tokens)} tokens; the model reads only its last {model.config.block_size}")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    if len(prompts) == 1 and args.num_samples == 1:
        print(prompts[0], end="" if template is None else "\n", flush=True)
        stream_text(model, enc, token_lists[0], device, args, generator)
        return
    # Every prompt times num_samples, generated as one left-padded batch.
    batch = [tokens for tokens in token_lists for _ in range(args.num_samples)]
    ids, mask = left_pad(batch)
    with autocast(device):
        out = model.generate(ids.to(device), mask.to(device), max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             generator=generator)
    for row, tokens in enumerate(batch):
        new = out[row, ids.size(1):].tolist()
        new = new[:new.index(EOT_TOKEN)] if EOT_TOKEN in new else new
        text = prompts[row // args.num_samples] if template is None else ""
        print(f"--- sample {row % args.num_samples + 1} of prompt {row // args.num_samples + 1}\n{text}{enc.decode(new)}")


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPT-2: pretrain, fine-tune, evaluate, sample.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["sample"], default="sample")
    p.add_argument("--init_from", default=None,
                   help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face GPT-2 directory | a checkpoint .pt")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", action="append", help="repeat for several prompts")
    g.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    g.add_argument("--max_new_tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--top_p", type=float, default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.mode == "sample":
            sample(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
