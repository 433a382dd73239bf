"""
packing.py: a batch of prompts, each with its responses, as the model reads it, and their
log-probabilities. Two layouts give the same numbers (tests/test_packing.py checks values and
gradients):

- pad(): the plain form. Each (prompt, response) is its own right-padded row, read by model.GPT's
  forward with plain causal attention. A prompt is computed once per response, and every row is as
  long as the longest.
- pack(): the fast form. The batch as one flat sequence of real tokens: prompt 0, its responses,
  prompt 1, its responses... A prompt is read once, not once per response, nothing is padding, and
  the attention follows the layout (packed_attention): a response sees its prompt and its own
  earlier tokens, at the positions it would have alone; nothing is computed between responses.

--layout chooses (packed by default; python -m tools.bench measures both on the task's lengths).
Reader is the one module that reads a batch of either layout (SFT, the reward model, sampling's
scores, alignment, PPO, evaluation), and response_logps gives log p(y|x) of each response:

    groups = [data.encode_group(enc, prompt, responses), ...]   # token ids, cut by data.fit
    batch = batch_of(groups, block_size, "packed")             # or "padded"
    logps = response_logps(Reader(model), batch)               # (S,) float32, one per response
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from data import fit


# -----------------------------------------------------------------------------
# reading a batch: the same heads on either layout

class Reader(nn.Module):
    """A GPT reading a batch of prompts with their responses (pad() or pack()), in one call of forward,
    so that torch.compile and DDP see every use of the model. head "lm": the float32 log-prob of every
    response token (N,); "reward": the reward model's score of every response, read at its last token
    (S,); "value": the reward head before every response token (N,), PPO's critic. The heads run only
    where they are read."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, batch, head="lm"):
        hidden = batch.hidden_states(self.gpt)                        # (places, C), the batch's tokens
        if head == "reward":
            return self.gpt.score(hidden.index_select(0, batch.last))
        before = hidden.index_select(0, batch.cols)                   # (N, C): what predicts each response token
        return self.gpt.logps(before, batch.targets) if head == "lm" else self.gpt.score(before)


def response_logps(reader, batch, average=False):
    """log p(y|x) of every response of a batch, (S,) float32: its tokens' log-probs summed, or averaged
    (RRHF). reader: a Reader, or one wrapped by DistributedDataParallel or torch.compile."""
    token_logps = reader(batch)                                                      # (N,)
    total = torch.zeros(len(batch.lengths), dtype=torch.float32, device=token_logps.device)
    total = total.index_add(0, batch.seq, token_logps.float())
    return total / batch.lengths.clamp(min=1) if average else total


def by_response(batch, flat):
    """Per-token values (N,) in response order as rows (S, T) right-padded with 0, one per response,
    and the (S, T) float mask of its real tokens (PPO's per-token tensors)."""
    rows = pad_sequence(flat.split(batch.lengths.tolist()), batch_first=True)       # (S, T)
    mask = torch.arange(rows.size(1), device=rows.device)[None, :] < batch.lengths[:, None]
    return rows, mask.float()


def batch_of(groups, block_size, layout):
    """groups [(prompt ids, [response ids, ...])] (data.encode_group), each cut to fit block_size by
    data.fit, as one batch of the layout: "packed" or "padded"."""
    return pack(groups, block_size) if layout == "packed" else pad(groups, block_size)


def move(obj, device):
    """A batch's dataclass with every tensor on the device."""
    fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in obj.__dict__.items()}
    if "buckets" in fields:
        fields["buckets"] = [move(b, device) for b in fields["buckets"]]
    return type(obj)(**fields)


# -----------------------------------------------------------------------------
# the plain form: one right-padded row per response

@dataclass
class Padded:
    """Each (prompt, response) as its own row, right-padded to the longest: S rows of L tokens, N
    response tokens. Places are row * L + column, in the rows flattened."""
    idx: torch.Tensor      # (S, L) token ids: the prompt, then the response, then padding
    cols: torch.Tensor     # (N,) place of the token that predicts each response token: the one before it
    targets: torch.Tensor  # (N,) the response tokens
    seq: torch.Tensor      # (N,) which response each token belongs to, 0..S-1, prompt-major
    last: torch.Tensor     # (S,) place of each response's last token (where the reward model reads)
    lengths: torch.Tensor  # (S,) tokens per response
    cut: int               # sequences cut to fit block_size

    def to(self, device):
        return move(self, device)

    def hidden_states(self, gpt):
        return gpt(self.idx).flatten(0, 1)                           # (S * L, C), causal attention


def pad(groups, block_size):
    """groups: [(prompt ids, [response ids, ...])] as data.encode_group gives them, each cut to fit
    block_size by data.fit. Returns Padded: every (prompt, response) its own right-padded row."""
    rows, starts, cut = [], [], 0
    for prompt, responses in groups:
        prompt, responses, n_cut = fit(prompt, responses, block_size)
        cut += n_cut
        rows += [prompt + r for r in responses]
        starts += [len(prompt)] * len(responses)
    L = max(map(len, rows))
    cols, targets, seq, last = [], [], [], []
    for s, (row, start) in enumerate(zip(rows, starts)):
        cols += range(s * L + start - 1, s * L + len(row) - 1)       # token t is predicted at t - 1
        targets += row[start:]
        seq += [s] * (len(row) - start)
        last.append(s * L + len(row) - 1)
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    idx = t([row + [0] * (L - len(row)) for row in rows])
    return Padded(idx, t(cols), t(targets), t(seq), t(last), t([len(row) - start for row, start in zip(rows, starts)]), cut)


# -----------------------------------------------------------------------------
# the fast form: real tokens only, each prompt read once

@dataclass
class Bucket:
    """Responses read together: the places in the flat sequence of their tokens, and of the keys each
    attends to (its prompt's tokens, then its own), each right-padded to the longest of the bucket
    (padding points at place 0 and is masked or dropped)."""
    tokens: torch.Tensor   # (S_b, R_b) place of each response token
    lengths: torch.Tensor  # (S_b,) tokens per response
    keys: torch.Tensor     # (S_b, P_b + R_b) places of its prompt's tokens (padded to P_b), then of its own
    group: torch.Tensor    # (S_b,) the prompt each response follows
    prompt_lengths: torch.Tensor  # (S_b,) tokens in that prompt
    real: torch.Tensor     # (sum of lengths,) where the real entries of tokens are, flattened


@dataclass
class Packed:
    """Prompts, each followed by its responses, as one flat sequence of real tokens: prompt 0, its
    responses, prompt 1, its responses... No token is padding, and the linear layers and heads run on
    real tokens only. Attention follows the layout (packed_attention): a prompt's tokens see
    the prompt's earlier tokens, a response's tokens see their prompt and their own earlier tokens, at
    the positions they would have alone; nothing is computed between responses. The prompt is read
    once, not once per response. Shapes: T tokens in all, G prompts, S responses, N response tokens."""
    idx: torch.Tensor      # (T,) token ids
    pos: torch.Tensor      # (T,) each token's position in its own sequence: its prompt, then itself
    prompts: torch.Tensor  # (G, P) place of each prompt's tokens, right-padded (with place 0)
    prompt_lengths: torch.Tensor  # (G,)
    prompt_real: torch.Tensor  # (sum of prompt_lengths,) where the real entries of prompts are, flattened
    buckets: list          # [Bucket]: the responses in one or two groups by length, so that little is padded
    queries: torch.Tensor  # (M,) places whose queries the attention reads: the prompts', then each bucket's tokens
    keys: torch.Tensor     # (K,) places whose keys and values it reads: the prompts', then each bucket's keys
    outputs: torch.Tensor  # (M,) where each of those queries' output goes: its place, or T for padding (dropped)
    cols: torch.Tensor     # (N,) place of the token that predicts each response token: the one before it in its sequence
    targets: torch.Tensor  # (N,) the response tokens
    seq: torch.Tensor      # (N,) which response each token belongs to, 0..S-1, prompt-major
    last: torch.Tensor     # (S,) place of each response's last token (where the reward model reads)
    lengths: torch.Tensor  # (S,) tokens per response
    cut: int               # sequences cut to fit block_size

    def to(self, device):
        return move(self, device)

    def hidden_states(self, gpt):
        return packed_hidden(gpt, self)                               # (T, C)

    def dense(self):
        """The same batch as rows, one per prompt (the prompt, then its responses, right-padded), with
        the (G, 1, L, L) mask that lets each token see what it sees in the packed layout: the reference
        that packed_attention must equal (tests, bench.py). Returns (idx, pos, mask, where):
        where (T,) is each token's place in the rows, flattened (row * L + column)."""
        G, T = len(self.prompts), len(self.idx)
        seg = torch.zeros(T, dtype=torch.long)  # 0: a prompt token, k + 1: a token of response k
        group = torch.zeros(T, dtype=torch.long)
        for g in range(G):
            group[self.prompts[g, :self.prompt_lengths[g]]] = g
        for s, b in enumerate(self.buckets):
            for i in range(len(b.lengths)):
                places = b.tokens[i, :b.lengths[i]]
                seg[places], group[places] = 1 + s * 10_000 + i, b.group[i]
        starts = torch.searchsorted(group, torch.arange(G))                      # groups are contiguous
        col = torch.arange(T) - starts[group]
        L = int(col.max()) + 1
        idx, pos, segs = (torch.zeros(G, L, dtype=torch.long) for _ in range(3))
        segs -= 1                                                               # -1: padding
        idx[group, col], pos[group, col], segs[group, col] = self.idx, self.pos, seg
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        same = (segs[:, None, :] == 0) | (segs[:, None, :] == segs[:, :, None])  # the prompt, or my own response
        mask = (causal & same & (segs[:, None, :] >= 0)) | torch.eye(L, dtype=torch.bool)  # padding sees itself: no NaN
        return idx, pos, mask[:, None], group * L + col


def pack(groups, block_size):
    """groups: [(prompt ids, [response ids, ...])] as data.encode_group gives them, cut to fit
    block_size by data.fit. Returns Packed; the attention's masks are built from its lengths on the
    device."""
    ids, pos, prompts, cut = [], [], [], 0
    cols, targets, seq, last, lengths, responses_at = [], [], [], [], [], []
    for g, (prompt, responses) in enumerate(groups):
        prompt, responses, n_cut = fit(prompt, responses, block_size)
        cut += n_cut
        P, start = len(prompt), len(ids)
        prompts.append(list(range(start, start + P)))
        ids += prompt
        pos += range(P)
        for r in responses:
            here = len(ids)
            responses_at.append((list(range(here, here + len(r))), g))
            cols += [start + P - 1] + list(range(here, here + len(r) - 1))  # the first token is predicted by the prompt's last
            ids += r
            pos += range(P, P + len(r))
            targets += r
            seq += [len(lengths)] * len(r)
            last.append(here + len(r) - 1)
            lengths.append(len(r))
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731

    def padded(rows):  # rows of places -> (rows, longest) right-padded with place 0, and where the real entries are
        width = max(map(len, rows))
        return (t([row + [0] * (width - len(row)) for row in rows]),
                t([i * width + j for i, row in enumerate(rows) for j in range(len(row))]))

    buckets = []
    for members in split_by_length(responses_at, [len(p) for p in prompts]):
        tokens, real = padded([places for places, _ in members])
        P_b = max(len(prompts[g]) for _, g in members)
        keys = [prompts[g] + [0] * (P_b - len(prompts[g])) + places for places, g in members]
        buckets.append(Bucket(tokens, t([len(places) for places, _ in members]), padded(keys)[0], t([g for _, g in members]),
                              t([len(prompts[g]) for _, g in members]), real))
    prompt_places, prompt_real = padded(prompts)
    T = len(ids)

    def outputs(places, lengths):  # places (rows, L) -> the same, padding sent to T
        return torch.where(torch.arange(places.size(1))[None, :] < lengths[:, None], places, T).flatten()

    plengths = t([len(p) for p in prompts])
    queries = torch.cat([prompt_places.flatten()] + [b.tokens.flatten() for b in buckets])
    keys_at = torch.cat([prompt_places.flatten()] + [b.keys.flatten() for b in buckets])
    out = torch.cat([outputs(prompt_places, plengths)] + [outputs(b.tokens, b.lengths) for b in buckets])
    return Packed(t(ids), t(pos), prompt_places, plengths, prompt_real, buckets, queries, keys_at, out,
                  t(cols), t(targets), t(seq), t(last), t(lengths), cut)


def split_by_length(responses, prompt_lengths):
    """The responses [(places, prompt)] in two buckets (one if there is one response), split by length
    where the attention computes the fewest scores: each bucket pads its responses and its prompts'
    keys to its longest. Two, not more: on a CPU each costs about as much in small kernels as it saves
    in padding. Always two, with two responses or more each where there are four, so that a
    compiled model sees one layout whatever the lengths (torch.compile specialises sizes 0 and 1)."""
    by_length = sorted(responses, key=lambda m: len(m[0]))

    def scores(members):
        R, P = max(len(p) for p, _ in members), max(prompt_lengths[g] for _, g in members)
        return len(members) * R * (P + R)

    if len(by_length) < 2:
        return [by_length]
    least = 2 if len(by_length) >= 4 else 1
    split = min(range(least, len(by_length) - least + 1),
                key=lambda k: (scores(by_length[:k]) + scores(by_length[k:]), abs(2 * k - len(by_length))))
    return [by_length[:split], by_length[split:]]


def packed_hidden(gpt, p):
    """The final hidden states (T, n_embd) of the real tokens of a Packed batch: model.GPT's forward
    on this layout. The linear layers run on the T tokens only; the attention follows the layout."""
    x = gpt.transformer.drop(gpt.transformer.wte(p.idx) + gpt.transformer.wpe(p.pos))
    masks = attention_masks(p)
    for block in gpt.transformer.h:
        attn, h = block.attn, block.ln_1(x)
        T, C = h.size()
        qkv = attn.c_attn(h).view(T, 3, attn.n_head, C // attn.n_head)
        y = packed_attention(qkv, p, masks, attn.dropout if attn.training else 0.0).reshape(T, C)
        x = x + attn.resid_dropout(attn.c_proj(y))
        x = x + block.mlp(block.ln_2(x))
    return gpt.transformer.ln_f(x)


def packed_attention(qkv, p, masks, dropout_p=0.0):
    """Attention at the T real tokens of a Packed batch: qkv (T, 3, n_head, head_dim), the queries,
    keys and values of each token -> (T, n_head, head_dim). The prompts attend causally among
    themselves, all at once (G, P); each response attends to its prompt's keys and values and,
    causally, to its own, in one or two buckets of responses of about the same length
    (Bucket). Nothing is computed between responses. masks: attention_masks(p), made once for
    all layers. The queries, and the keys and values, are read in one gather each and the outputs
    written in place: few kernels, and each one's backward adds in a fixed order, so the same batch
    gives the same gradients, bit for bit, run after run."""
    T, _, H, D = qkv.shape
    shapes = [tuple(p.prompts.shape)] + [tuple(b.tokens.shape) for b in p.buckets]        # (rows, L) of each part
    key_shapes = [tuple(p.prompts.shape)] + [tuple(b.keys.shape) for b in p.buckets]

    def parts(x, shapes):  # x (sum of rows * L, ..., H, D) -> per part (..., rows, H, L, D)
        return [part.view(*shape, *x.shape[1:]).movedim(1, -2).movedim(0, -4)
                for part, shape in zip(x.split([a * b for a, b in shapes]), shapes)]
    queries = parts(qkv[:, 0].index_select(0, p.queries), shapes)
    keys = parts(qkv[:, 1:].index_select(0, p.keys), key_shapes)                        # k and v in one gather
    out = qkv.new_zeros(T + 1, H, D)                                                   # padding lands on row T
    for i, (places, q) in enumerate(zip(p.outputs.split([a * b for a, b in shapes]), queries)):
        k, v = keys[i].unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p) if i == 0 else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=masks[i - 1], dropout_p=dropout_p)
        out.index_copy_(0, places, y.transpose(1, 2).reshape(-1, H, D))
    return out[:T]


def attention_masks(p):
    """Per bucket of a Packed batch, (S, 1, R, P + R): a response's token sees the real tokens of
    its prompt and, causally, its own. Built on the device, from the lengths."""
    masks = []
    for b in p.buckets:
        (S, R), P = b.tokens.shape, b.keys.size(1) - b.tokens.size(1)
        prompt = torch.arange(P, device=b.keys.device)[None, :] < b.prompt_lengths[:, None]      # (S, P)
        own = torch.ones(R, R, dtype=torch.bool, device=b.keys.device).tril()                    # (R, R)
        masks.append(torch.cat([prompt[:, None, :].expand(S, R, P), own.expand(S, R, R)], -1)[:, None])
    return masks
