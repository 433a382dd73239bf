"""
packing.py: a batch of prompts, each followed by its candidate responses, as one flat sequence of
real tokens (Packed). The prompt is read once, not once per response, and nothing is padding; the
attention that goes with this layout is model.packed_attention. Every stage that reads responses
(SFT, the reward model, sampling's scores, alignment, evaluation) reads them packed.

    groups = [encode_group(enc, prompt, responses), ...]   # token ids: <|endoftext|> + prompt, [response + <|endoftext|>]
    batch = pack(groups, block_size)                       # cut to fit block_size as training cuts a pair (fit)
"""
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


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
    real tokens only. Attention follows the layout (model.packed_attention): a prompt's tokens see
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
        move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
        fields = {k: move(v) for k, v in self.__dict__.items()}
        fields["buckets"] = [Bucket(**{k: move(v) for k, v in b.__dict__.items()}) for b in self.buckets]
        return Packed(**fields)

    def by_response(self, flat):
        """Per-token values (N,) in response order as rows (S, T) right-padded with 0, one per
        response, and the (S, T) float mask of its real tokens (PPO's per-token tensors)."""
        rows = pad_sequence(flat.split(self.lengths.tolist()), batch_first=True)        # (S, T)
        mask = torch.arange(rows.size(1), device=rows.device)[None, :] < self.lengths[:, None]
        return rows, mask.float()

    def dense(self):
        """The same batch as rows, one per prompt (the prompt, then its responses, right-padded), with
        the (G, 1, L, L) mask that lets each token see what it sees in the packed layout: the reference
        that model.packed_attention must equal (tests, bench.py). Returns (idx, pos, mask, where):
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


def encode_group(enc, prompt, responses):
    """A prompt and its responses as token ids for pack(): (<|endoftext|> + prompt, [response +
    <|endoftext|>, ...]), the same tokens encode_example gives each pair."""
    return [enc.eot_token] + enc.encode_ordinary(prompt), [enc.encode_ordinary(r) + [enc.eot_token] for r in responses]


def fit(prompt, responses, block_size):
    """Cut a group to block_size as encode_example cuts a pair: the prompt from the left (its first
    token, <|endoftext|>, stays) to leave room for its longest response, a response that alone does
    not fit from the right. Returns (prompt, responses, how many sequences were cut)."""
    keep = max(block_size - max(len(r) for r in responses), 2)  # <|endoftext|> and one prompt token
    cut = 0
    if len(prompt) > keep:
        prompt, cut = prompt[:1] + prompt[len(prompt) - keep + 1:], len(responses)
    room = block_size - len(prompt)
    return prompt, [r[:room] for r in responses], max(cut, sum(len(r) > room for r in responses))


def pack(groups, block_size):
    """groups: [(prompt ids, [response ids, ...])] as encode_group gives them, cut to fit block_size
    by fit(). Returns Packed; the attention's masks are built from its lengths on the device."""
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


