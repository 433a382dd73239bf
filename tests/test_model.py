"""The GPT, its reward head and the sampler: shapes, padding, batch independence, the KV cache,
and the exact meaning of temperature, top-k, top-p and the stop token."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from model import GPT, GPTConfig, filter_logits, sample_next


V = 50


@pytest.fixture(scope="module")
def gpt():
    """A small GPT with large random weights: unlike a freshly initialised one, its next token depends
    strongly on every earlier token and position, so a wrong mask, position or cache entry shows."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=32, reward_head=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return m


PROMPTS = [[3, 7, 1, 9, 4, 4, 2], [5], [11, 12, 13]]


def test_forward_gives_hidden_states_and_the_heads_logits_and_float32_logps(gpt):
    idx = torch.randint(V, (3, 10))
    hidden = gpt(idx)
    assert hidden.shape == (3, 10, 32)
    logits = gpt.logits(hidden)
    assert logits.shape == (3, 10, V)
    logp = gpt.logps(gpt(idx[:, :-1]), idx[:, 1:])
    assert logp.shape == (3, 9) and logp.dtype == torch.float32
    expected = logits[:, :-1].log_softmax(-1).gather(2, idx[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected)


def test_gpt2_init_keeps_first_logits_small():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=64))
    assert m.logits(m(torch.randint(V, (2, 16)))).std() < 0.5  # N(0, 1) embeddings would give std ~ 8
    assert m.lm_head.weight is m.transformer.wte.weight  # tied


def reward(gpt, idx, mask):
    """r(x, y) of right-padded rows idx (B, T), mask (B, T) on the real tokens: the reward head at each
    row's last real token, as packing.pad's rows are read."""
    last = mask.long().sum(1) - 1
    return gpt.score(gpt(idx)[torch.arange(idx.size(0)), last])


def test_reward_ignores_trailing_padding_and_batch_companions(gpt):
    seq = torch.tensor([4, 8, 15, 16, 23, 42])
    alone = reward(gpt, seq[None], torch.ones(1, 6, dtype=torch.bool))
    for pad in (1, 5, 20):
        idx = torch.cat([seq, torch.full((pad,), 7)])[None]
        mask = torch.cat([torch.ones(6), torch.zeros(pad)]).bool()[None]
        torch.testing.assert_close(reward(gpt, idx, mask), alone)
    other = torch.randint(V, (1, 26))
    batch = torch.cat([torch.cat([seq, torch.zeros(20, dtype=torch.long)])[None], other])
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[0, :6], mask[1, :] = True, True
    torch.testing.assert_close(reward(gpt, batch, mask)[:1], alone, atol=1e-5, rtol=1e-5)


def test_greedy_output_does_not_depend_on_batch_companions(gpt):
    together = gpt.generate(PROMPTS, 12, temperature=0)
    for p, out in zip(PROMPTS, together):
        assert gpt.generate([p], 12, temperature=0)[0] == out


@pytest.mark.parametrize("temperature,top_k,top_p", [(0, None, None), (1.0, None, None), (0.8, 5, 0.9)])
def test_kv_cache_gives_the_same_tokens_as_recomputing_the_prefix(gpt, temperature, top_k, top_p):
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, num_samples=2)
    cached = gpt.generate(PROMPTS, 15, generator=torch.Generator().manual_seed(1), use_cache=True, **kw)
    recomputed = gpt.generate(PROMPTS, 15, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert cached == recomputed
    assert all(len(row) == 15 for row in cached)


def test_stop_token_ends_each_row_and_nothing_follows(gpt):
    free = gpt.generate(PROMPTS, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    stop = free[0][5]  # a token the sampler is known to produce in row 0
    out = gpt.generate(PROMPTS, 20, temperature=1.0, generator=torch.Generator().manual_seed(3), stop_token=stop)
    for row_free, row in zip(free, out):
        if stop in row_free:
            k = row_free.index(stop)
            assert row == row_free[:k + 1]  # ends with its first stop token, and the same draws before it
        else:
            assert row == row_free
    assert out[0][-1] == stop and len(out[0]) <= 6


def test_finished_rows_leave_the_batch_without_changing_any_row(gpt):
    """generate drops finished rows from the batch and reads each prompt once for all its samples:
    every row still gets the draws, tokens and log-probs it gets without either."""
    kw = dict(temperature=1.0, num_samples=3, return_logps=True)
    free, _ = gpt.generate(PROMPTS, 20, generator=torch.Generator().manual_seed(3), **kw)
    stop = free[0][2]
    cached, logps = gpt.generate(PROMPTS, 20, generator=torch.Generator().manual_seed(3), stop_token=stop, **kw)
    plain, plain_logps = gpt.generate(PROMPTS, 20, generator=torch.Generator().manual_seed(3), stop_token=stop,
                                      use_cache=False, **kw)
    assert cached == plain
    torch.testing.assert_close(torch.tensor(logps), torch.tensor(plain_logps))
    assert len({len(row) for row in cached}) > 2  # rows ended at different steps, some early
    for row_free, row in zip(free, cached):
        assert row == (row_free[:row_free.index(stop) + 1] if stop in row_free else row_free)


def test_several_samples_per_prompt_and_a_seeded_generator(gpt):
    out = gpt.generate(PROMPTS, 8, temperature=1.0, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert len(out) == 12
    again = gpt.generate(PROMPTS, 8, temperature=1.0, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert out == again
    assert len({tuple(r) for r in out[:4]}) > 1  # the samples of one prompt differ
    greedy = gpt.generate(PROMPTS, 8, temperature=0, num_samples=3)
    assert greedy[0] == greedy[1] == greedy[2]
    top1 = gpt.generate(PROMPTS, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(5))
    assert top1 == gpt.generate(PROMPTS, 8, temperature=0)


def test_generate_refuses_what_does_not_fit(gpt):
    with pytest.raises(ValueError, match="block_size"):
        gpt.generate([[1] * 60], 10)
    with pytest.raises(ValueError, match="at least one token"):
        gpt.generate([[]], 3)


@given(st.lists(st.integers(-3, 3), min_size=2, max_size=30), st.integers(1, 30))
def test_top_k_keeps_exactly_k_tokens_even_with_ties(values, k):
    logits = torch.tensor([values], dtype=torch.float32)
    kept = torch.isfinite(filter_logits(logits, top_k=k))
    assert kept.sum() == min(k, len(values))
    if k < len(values):  # the kept ones are the largest
        assert logits[kept].min() >= logits[~kept].max()


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=30), st.floats(0.05, 0.99))
def test_top_p_keeps_the_smallest_set_that_reaches_p(values, p):
    logits = torch.tensor([values], dtype=torch.float32)
    probs = F.softmax(logits, -1)[0]
    kept = torch.isfinite(filter_logits(logits, top_p=p))[0]
    mass = probs[kept].sum().item()
    assert mass >= p - 1e-6 or kept.all()
    assert mass - probs[kept].min().item() < p + 1e-6  # dropping the least likely kept token falls short
    assert probs[kept].min() >= probs[~kept].max() if (~kept).any() else True


def test_temperature_zero_is_argmax_and_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.5]])
    assert sample_next(logits, temperature=0).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {1, 3}
    share = (draws == 3).float().mean().item()
    assert share == pytest.approx(torch.softmax(torch.tensor([2.0, 2.5]), 0)[1].item(), abs=0.08)
