"""
model.py: one GPT (the GPT-2 architecture), a scalar reward head, and a sampler with a KV cache.

Read top to bottom: the config, the attention (which can read and write a KV cache), the block,
the GPT with its three ways of reading a sequence (`forward`: logits, per-token log-probs, or the
reward model's score), loading GPT-2 weights, and `generate`.

    python -c "import model; m = model.GPT(model.GPTConfig()); print(m)"

Padding conventions, which the whole project relies on:
- Training and scoring use RIGHT padding: real tokens first, padding after. Attention is causal, so a
  real position never sees the padding that follows it; no attention mask is needed.
- `generate` LEFT-pads prompts of different lengths, and then needs an explicit mask and positions
  so that each row sees exactly what it would see alone in the batch.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128     # longest sequence (prompt + response) the model reads
    vocab_size: int = 1024    # the tokenizer's n_vocab, <|endoftext|> included
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 128         # width of the residual stream
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
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, T_past + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # right-padded training batch: plain causal, flash attention on CUDA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:                  # generation: (B, 1, T, T_past + T) says which keys each query may see
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

    def hidden(self, idx, pos=None, attn_mask=None, cache=None):
        """idx (B, T) token ids -> (B, T, n_embd) final hidden states. pos (B, T) overrides the
        positions 0..T-1 (left-padded generation); with a cache, idx holds only the new tokens."""
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

    def forward(self, idx, targets=None, pos=None, attn_mask=None, cache=None, reward_mask=None, at=None):
        """The ways of reading a sequence idx (B, T):
        - logits (B, T, vocab) for every position (the default);
        - with targets (B, T): the float32 per-token log-probabilities log p(targets[:, t] | idx[:, :t+1]),
          targets already shifted (targets[:, t] is the token after idx[:, t]; vcb.sequence_logps
          does the shift for you);
        - with reward_mask (B, T), 1 on real tokens of right-padded rows: the reward model's score
          r(x, y), (B,) float32, read at each row's last real token. Attention is causal, so the
          score depends neither on the padding after that token nor on the other rows;
        - at=(rows, cols), each (N,), reads only those positions (packed sequences, data.pack): with
          targets (N,) the float32 log p(targets[i] | position i), else the reward head there (N,),
          which is also the value of every position for a critic. The LM head then runs on N
          positions, not B * T.
        It is all one forward so that DistributedDataParallel sees every use of the model."""
        h = self.hidden(idx, pos, attn_mask, cache)                      # (B, T, C)
        if at is not None:
            h = h[at[0], at[1]]                                          # (N, C)
            if targets is None:
                assert self.reward_head is not None, "this GPT has no reward head (GPTConfig.reward_head=False)"
                return self.reward_head(h).squeeze(-1).float()
            return -F.cross_entropy(self.lm_head(h).float(), targets, reduction="none")
        if reward_mask is not None:
            assert self.reward_head is not None, "this GPT has no reward head (GPTConfig.reward_head=False)"
            last = reward_mask.long().sum(1) - 1                         # (B,) index of the last real token
            h_last = h[torch.arange(idx.size(0), device=idx.device), last]  # (B, C)
            return self.reward_head(h_last).squeeze(-1).float()
        logits = self.lm_head(h)
        if targets is None:
            return logits
        # float32: a bfloat16 log-softmax loses the small differences that preference losses feed on
        logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return logp.view_as(targets)

    def reward(self, idx, mask):
        """r(x, y) for right-padded rows idx (B, T) with mask (B, T) 1 on real tokens: (B,) float32."""
        return self(idx, reward_mask=mask)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or the head bias)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"  # one kernel for the whole update on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_flops_per_token(self, T):
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B."""
        N, cfg = self.num_params(), self.config
        return 6 * N + 12 * cfg.n_layer * cfg.n_embd * T

    def crop_block_size(self, block_size):
        """Keep the first block_size positions (GPT-2 has 1024; short tasks need far fewer)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    @classmethod
    def from_pretrained(cls, path, block_size=None, log=print, **overrides):
        """A GPT initialised from a GPT-2 checkpoint in the common `model.safetensors` layout (the
        layout of the public GPT-2 releases), read from a local file: nothing is downloaded. The shape
        comes from the config.json beside it (n_head cannot be read off the weights); without one,
        n_head = n_embd / 64 as in the four OpenAI sizes, and log says so. What our GPT cannot
        represent (another activation, LayerNorm epsilon or MLP width) is refused. Every key and
        shape is checked. block_size crops the positions; overrides: other GPTConfig fields
        (dropout, reward_head)."""
        from safetensors.torch import load_file
        try:
            sd_hf = load_file(str(path))
        except Exception as e:  # a missing, truncated or foreign file
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        sd_hf = {k.removeprefix("transformer."): v for k, v in sd_hf.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers, not weights
        sd_hf.pop("lm_head.weight", None)  # tied to wte
        for key in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight"):
            if key not in sd_hf:
                raise ValueError(f"{path}: no '{key}': not a GPT-2 checkpoint")
        n_embd = sd_hf["wte.weight"].shape[1]
        args = dict(block_size=sd_hf["wpe.weight"].shape[0], vocab_size=sd_hf["wte.weight"].shape[0],
                    n_layer=1 + max(int(k.split(".")[1]) for k in sd_hf if k.startswith("h.")),
                    n_head=max(1, n_embd // 64), n_embd=n_embd, bias=True)  # GPT-2's heads are 64 wide
        config = read_gpt2_config(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
        if config is not None:
            args["n_head"] = gpt2_config(config, args)
        else:
            log(f"{path}: no GPT-2 config.json beside it; n_head = n_embd / 64 = {args['n_head']} as in OpenAI's GPT-2 "
                f"sizes (a checkpoint with other heads needs its config.json)")
        model = cls(GPTConfig(**{**args, **overrides}))
        sd = model.state_dict()
        ours = {k for k in sd if not k.startswith(("lm_head.", "reward_head."))}
        theirs = {"transformer." + k for k in sd_hf}
        if ours != theirs:
            raise ValueError(f"{path}: keys differ from GPT-2's: missing {sorted(ours - theirs)[:3]}, "
                             f"unexpected {sorted(theirs - ours)[:3]}")
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in sd_hf.items():
                v = v.t() if k.endswith(conv1d) else v  # GPT-2 stores these as Conv1D: (in, out)
                target = sd["transformer." + k]
                if v.shape != target.shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(target.shape)}")
                target.copy_(v)
        if block_size is not None and block_size < model.config.block_size:
            model.crop_block_size(block_size)
        return model

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
        device = self.lm_head.weight.device
        rows = [list(p) for p in prompts for _ in range(num_samples)]
        if not rows:
            return []
        if min(len(r) for r in rows) == 0:
            raise ValueError("every prompt needs at least one token (start it with <|endoftext|>)")
        B, L = len(rows), max(len(r) for r in rows)
        T_max = L + max_new_tokens
        if T_max > self.config.block_size:
            raise ValueError(f"prompt of {L} tokens + {max_new_tokens} new ones exceeds block_size="
                             f"{self.config.block_size}; shorten the prompt from the left")
        idx = torch.zeros(B, T_max, dtype=torch.long, device=device)  # left-padded prompts, then new tokens
        real = torch.ones(B, T_max, dtype=torch.bool, device=device)  # False on left padding
        for b, r in enumerate(rows):
            idx[b, L - len(r):L] = torch.tensor(r, device=device)
            real[b, :L - len(r)] = False
        pos = (real.long().cumsum(1) - 1).clamp(min=0)  # each row's first real token is at position 0
        # a query sees real keys at or before it; a padding query sees itself, so no mask row is
        # empty (an all-False row makes SDPA return NaN). Shape (B, 1, T_max, T_max).
        causal = torch.ones(T_max, T_max, dtype=torch.bool, device=device).tril()
        eye = torch.eye(T_max, dtype=torch.bool, device=device)
        mask = ((causal & real[:, None, :]) | eye)[:, None]

        cache = KVCache(self.config, len(prompts), T_max) if use_cache else None  # grows to B after the prompts
        live = torch.arange(B, device=device)  # the rows still in the batch: finished ones leave it
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        logps = torch.zeros(B, dtype=torch.float32, device=device)
        t = L  # tokens so far in every row (padding included)
        for _ in range(max_new_tokens):
            if cache is not None and cache.len == 0:  # the prompts, each once: their samples share its cache
                first = torch.arange(0, B, num_samples, device=device)
                h = self.hidden(idx[first, :t], pos=pos[first, :t], attn_mask=mask[first, :, :t, :t], cache=cache)
                h = h.repeat_interleave(num_samples, 0)
                cache.keep(torch.arange(B, device=device) // num_samples)
            elif cache is None:                  # no cache: the whole prefix, every step
                h = self.hidden(idx[live, :t], pos=pos[live, :t], attn_mask=mask[live, :, :t, :t])
            else:                                # only the newest token, reading the cache
                h = self.hidden(idx[live, t - 1:t], pos=pos[live, t - 1:t], attn_mask=mask[live, :, t - 1:t, :t], cache=cache)
            logits = self.lm_head(h[:, -1]).float()  # (B', V): only the last position predicts
            # a uniform draw for every row of the whole batch at every step, used or not: what a row
            # samples does not depend on which rows are still in the batch
            u = None if temperature == 0 else torch.rand(B, 1, generator=generator, device=device, dtype=torch.float64)[live]
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
            if finished.all():
                break
            # Responses end at very different lengths. Computing the finished rows until the longest
            # is done wastes most of the steps, so they leave the batch once they are a quarter of
            # it (not every step: dropping rows copies the cache).
            going = ~finished[live]
            if (~going).sum() * 4 >= len(live):
                live = live[going]
                if cache is not None:
                    cache.keep(going.nonzero().squeeze(1))
        out = []
        for row in idx[:, L:t].tolist():
            if stop_token is not None and stop_token in row:
                row = row[:row.index(stop_token) + 1]
            out.append(row)
        return (out, logps.tolist()) if return_logps else out


def read_gpt2_config(file):
    """(file, its dict) when file is a Hugging Face GPT-2 config.json (model_type gpt2), else None: a
    missing file, or another program's config.json (a run folder of ours has one)."""
    try:
        with open(file, encoding="utf-8") as f:
            c = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable config.json ({e})") from None
    return (file, c) if isinstance(c, dict) and c.get("model_type") == "gpt2" else None


def gpt2_config(config, args):
    """The n_head of a GPT-2 config.json, (file, dict), after checking that the rest of it describes a
    model our GPT is (args: the shape read off the weights); anything else is a one-line ValueError."""
    file, c = config
    checks = [("n_embd", args["n_embd"]), ("n_layer", args["n_layer"]), ("vocab_size", args["vocab_size"]),
              ("n_positions", args["block_size"])]
    for key, want in checks:
        if key in c and c[key] != want:
            raise ValueError(f"{file}: {key} is {c[key]} but the weights say {want}")
    n_head = c.get("n_head", c.get("num_attention_heads"))
    if not isinstance(n_head, int) or n_head < 1 or args["n_embd"] % n_head:
        raise ValueError(f"{file}: n_head is {n_head!r}, not a whole divisor of n_embd={args['n_embd']}")
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{file}: activation_function {c['activation_function']!r} is not GPT-2's tanh GELU, "
                         f"the only one this GPT has")
    if abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"{file}: layer_norm_epsilon {c['layer_norm_epsilon']} is not GPT-2's 1e-5, the only one this GPT has")
    if c.get("n_inner") not in (None, 4 * args["n_embd"]):
        raise ValueError(f"{file}: n_inner {c['n_inner']} is not 4 * n_embd, the only MLP width this GPT has")
    for key, fine in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if c.get(key, fine) != fine:
            raise ValueError(f"{file}: {key}={c[key]} is not what this GPT computes")
    return n_head


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
    if not torch.isfinite(probs).all():  # else the draw fails with a bare error, or a device assert on CUDA
        raise ValueError("the model's next-token probabilities are not finite: its weights are broken")
    cdf = probs.double().cumsum(-1)                                                   # (B, V)
    if u is None:
        u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=probs.size(-1) - 1)
