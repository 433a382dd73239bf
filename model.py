"""
model.py: one GPT (the GPT-2 architecture), its heads (language model, and a scalar reward head for the
reward model and PPO's critic), and a sampler with a KV cache. It is the model and only the model: it
imports nothing else of the project.

Read top to bottom: the config, the KV cache, the attention, the block, the GPT (its forward gives the
final hidden states; the heads read them), `generate` with its prefill and decode steps, and the
sampling of the next token. GPT-2 weights come in and go out through tools/gpt2.py.

    python -c "import model; m = model.GPT(model.GPTConfig()); print(m)"

Padding conventions, which the whole project relies on:
- Training and scoring read RIGHT-padded rows: real tokens first, padding after. Attention is causal,
  so a real position never sees the padding that follows it; no attention mask is needed.
- packing.py reads a prompt's responses packed after it instead, real tokens only, with the same
  results: the fast form of the same computation, built on this model.
- `generate` LEFT-pads prompts of different lengths, and then needs an explicit mask and positions
  so that each row sees exactly what it would see alone in the batch.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:  # the defaults are the built-in task's model (config.py takes them from here)
    block_size: int = 128     # longest sequence (prompt + response) the model reads
    vocab_size: int = 1024    # the tokenizer's n_vocab, <|endoftext|> included
    n_layer: int = 3          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 96          # width of the residual stream
    dropout: float = 0.0      # keep 0 for alignment: dropout makes log pi(y|x) noisy
    bias: bool = True         # biases in Linear and LayerNorm, as GPT-2 has
    reward_head: bool = False  # add a linear head to one scalar: the reward model (docs/method.md, "The pipeline")


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one
    position of compute instead of the whole prefix. Buffers: (n_layer, B, n_head, max_len, head_dim)."""

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None  # allocated at the first write, with the dtype autocast gives k and v
        self.len = 0             # positions filled; the GPT advances it after its last layer

    def update(self, layer, k, v):  # k, v: (B, n_head, T, head_dim) of the new positions
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep(self, rows):
        """Keep these batch rows (B',), in this order: generation drops the rows that have finished,
        and repeats a prompt's row for each of its samples."""
        self.shape = (self.shape[0], len(rows)) + self.shape[2:]
        if self.k is not None:  # copy the filled positions only; the rest is written later
            k, v = self.k, self.v
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
            self.k[:, :, :, :self.len] = k[:, rows, :, :self.len]
            self.v[:, :, :, :self.len] = v[:, rows, :, :self.len]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.layer = config.n_head, config.dropout, layer

    def forward(self, x, attn_mask=None, cache=None):
        dropout_p = self.dropout if self.training else 0.0
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, T_past + T, hs)
        if attn_mask is None:  # right-padded rows: plain causal, flash attention on CUDA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:                  # (B, 1, T, T_past + T) says which keys each query may see
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    """Pre-LayerNorm transformer block, as in GPT-2."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embedding (GPT-2)
        self.reward_head = nn.Linear(config.n_embd, 1) if config.reward_head else None
        # GPT-2 initialisation. PyTorch's default N(0, 1) embedding makes the first logits huge, and a
        # CPU then crawls through subnormal floats; residual projections are scaled by depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameters, counting the tied embedding once and leaving out positions (as GPT-2 papers do)."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, pos=None, attn_mask=None, cache=None):
        """idx (B, T) token ids of right-padded rows -> the final hidden states (B, T, n_embd); the heads
        below read them (logits, logps, score), only where they are needed. pos (B, T) overrides the
        positions 0..T-1 (left-padded generation); attn_mask (B, 1, T, T_keys) says which keys each
        query may see (None: causal); with a cache, idx holds only the new tokens. This is the plain
        form: packing.py reads a prompt's responses packed after it, with the same results."""
        B, T = idx.size()
        start = cache.len if cache is not None else 0
        if pos is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def logits(self, hidden):
        """The LM head on hidden states (..., C) -> (..., vocab), in float32 whatever the autocast: a
        16-bit head rounds every logit by about 1%, and with it every log-prob that enters a loss, a
        ratio or a KL (docs/gpu.md, "Precision", says what it costs)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.lm_head.weight.float())

    def logps(self, hidden, targets):
        """log p(targets) from the hidden states that predict them: (..., C), (...) -> (...) float32."""
        logits = self.logits(hidden)
        return -F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)

    def score(self, hidden):
        """The reward head on hidden states (..., C) -> (...), in float32 whatever the autocast: the
        rewards and values enter VCB's targets and PPO's advantages."""
        assert self.reward_head is not None, "this GPT has no reward head (GPTConfig.reward_head=False)"
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.reward_head.weight.float(), self.reward_head.bias.float()).squeeze(-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or the head bias)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # one kernel for the whole update (CUDA and CPU): several times faster than a kernel per tensor
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def crop_block_size(self, block_size):
        """Keep the first block_size positions (GPT-2 has 1024; short tasks need far fewer)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    # ---- sampling: a prefill of the prompts, then one decode step per new token

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_token=None, num_samples=1, generator=None, use_cache=True, return_logps=False):
        """Sample continuations of a batch of prompts of any lengths.

        prompts: list of lists of token ids. Returns len(prompts) * num_samples lists of new tokens;
        row i * num_samples + s is sample s of prompt i. A row ends with its first stop_token (kept,
        so the caller can tell a finished response from a cut one); nothing comes after it.
        temperature=0 is argmax; top_k keeps exactly k tokens; top_p keeps the smallest set of tokens
        whose probability reaches top_p. generator: a seeded torch.Generator on the model's device.
        return_logps=True also returns, per row, the summed float32 log-probability of its tokens
        under the model itself (temperature 1, no top-k/top-p): log pi(y|x), for free.
        Each prompt is read once for all its samples, and finished rows leave the batch; neither
        changes what any row gets.
        """
        rows = [list(p) for p in prompts for _ in range(num_samples)]
        if not rows:
            return ([], []) if return_logps else []
        if min(len(r) for r in rows) == 0:
            raise ValueError("every prompt needs at least one token (start it with <|endoftext|>)")
        B, L = len(rows), max(len(r) for r in rows)
        if L + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {L} tokens + {max_new_tokens} new ones exceeds block_size="
                             f"{self.config.block_size}; shorten the prompt from the left")
        idx, pos, mask = left_padded(rows, L + max_new_tokens, self.lm_head.weight.device)
        cache = KVCache(self.config, len(prompts), L + max_new_tokens) if use_cache else None  # grows to B after the prompts
        live = torch.arange(B, device=idx.device)  # the rows still in the batch: finished ones leave it
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logps = torch.zeros(B, dtype=torch.float32, device=idx.device)
        t = L  # tokens so far in every row (padding included)
        broken = torch.zeros((), dtype=torch.bool, device=idx.device)  # a non-finite logit in any step so far
        logits = self.prefill(idx, pos, mask, t, num_samples, cache)              # (B, V)
        for step in range(max_new_tokens):
            broken |= ~torch.isfinite(logits).all()
            # a uniform draw for every row of the whole batch at every step, used or not: what a row
            # samples does not depend on which rows are still in the batch
            u = None if temperature == 0 else torch.rand(B, 1, generator=generator, device=idx.device, dtype=torch.float64)[live]
            next_token = sample_next(logits, temperature, top_k, top_p, u=u)
            done = finished[live]
            if stop_token is not None:
                next_token = torch.where(done, stop_token, next_token)
            if return_logps:  # a finished row adds nothing more
                token_logp = torch.log_softmax(logits, -1).gather(1, next_token[:, None]).squeeze(1)
                logps[live] += torch.where(done, 0.0, token_logp)
            if stop_token is not None:
                finished[live] = done | (next_token == stop_token)
            idx[live, t] = next_token
            t += 1
            # the one read of a step (it waits for the device): how many live rows have finished
            n_done, bad = torch.stack([finished[live].sum(), broken.long()]).tolist()
            if bad:  # else the draws go on from NaNs, and on CUDA may end in a device assert
                raise ValueError("the model's next-token probabilities are not finite: its weights are broken")
            if n_done == len(live) or step == max_new_tokens - 1:  # rows that left the batch had finished
                break
            # Responses end at very different lengths. Computing the finished rows until the longest
            # is done wastes most of the steps, so they leave the batch once they are a quarter of
            # it (not every step: dropping rows copies the cache).
            if n_done * 4 >= len(live):
                going = ~finished[live]
                live = live[going]
                if cache is not None:
                    cache.keep(going.nonzero().squeeze(1))
            logits = self.decode(idx, pos, mask, live, t, cache)
        out = [row[:row.index(stop_token) + 1] if stop_token in row else row for row in idx[:, L:t].tolist()]
        return (out, logps.tolist()) if return_logps else out

    def prefill(self, idx, pos, mask, t, num_samples, cache):
        """The next-token logits (B, V) after the t prompt tokens of every row. With a cache each
        prompt is read once and its samples' rows share its keys and values."""
        if cache is None:
            return self.decode(idx, pos, mask, torch.arange(idx.size(0), device=idx.device), t, None)
        first = torch.arange(0, idx.size(0), num_samples, device=idx.device)  # one row per prompt
        hidden = self(idx[first, :t], pos=pos[first, :t], attn_mask=mask[first, :, :t, :t], cache=cache)
        hidden = hidden.repeat_interleave(num_samples, 0)
        cache.keep(torch.arange(idx.size(0), device=idx.device) // num_samples)
        return self.logits(hidden[:, -1])

    def decode(self, idx, pos, mask, live, t, cache):
        """The next-token logits (B', V) of the live rows after t tokens: the newest token alone,
        reading the cache, or without one the whole prefix again."""
        if cache is None:
            hidden = self(idx[live, :t], pos=pos[live, :t], attn_mask=mask[live, :, :t, :t])
        else:
            hidden = self(idx[live, t - 1:t], pos=pos[live, t - 1:t], attn_mask=mask[live, :, t - 1:t, :t], cache=cache)
        return self.logits(hidden[:, -1])  # only the last position predicts


def left_padded(rows, T_max, device):
    """Prompts of any lengths as one left-padded batch with room for new tokens: ids (B, T_max),
    each row's positions (its first real token at 0), and (B, 1, T_max, T_max) which keys each
    query sees: the real ones at or before it. A padding query sees itself, so no mask row is
    empty (an all-False row makes SDPA return NaN)."""
    B, L = len(rows), max(len(r) for r in rows)
    idx = torch.zeros(B, T_max, dtype=torch.long, device=device)
    real = torch.ones(B, T_max, dtype=torch.bool, device=device)  # False on the left padding
    for b, r in enumerate(rows):
        idx[b, L - len(r):L] = torch.tensor(r, device=device)
        real[b, :L - len(r)] = False
    pos = (real.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T_max, T_max, dtype=torch.bool, device=device).tril()
    eye = torch.eye(T_max, dtype=torch.bool, device=device)
    return idx, pos, ((causal & real[:, None, :]) | eye)[:, None]


def filter_logits(logits, top_k=None, top_p=None):
    """logits (B, V) -> logits with the tokens outside the top-k / top-p set at -inf."""
    if top_k is not None and top_k < logits.size(-1):
        # topk returns exactly k indices, so ties at the k-th value never let more than k through
        v, i = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, i, v)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token once the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, u=None):
    """logits (B, V) float32 -> next token ids (B,). temperature 0 is argmax. u (B, 1) float64: the
    uniform draws to use, in place of drawing them from generator.

    Inverse-CDF sampling: one uniform number per row, the first token whose cumulative probability
    exceeds it. torch.multinomial draws one exponential number per token of the vocabulary for the
    same result in distribution, which made it a quarter of the sampling time on a CPU. A token of
    probability 0 (cut by top-k/top-p) is never chosen: its cumulative probability equals the one
    before it."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    cdf = probs.double().cumsum(-1)                                                   # (B, V)
    if u is None:
        u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=probs.size(-1) - 1)
