"""
evaluate.py: models reading text in batches, and the evaluation of policies.

- Sampling in seeded chunks shared round-robin by the processes (what a chunk gets does not depend
  on how many processes there are), reward-model scores r(x, y), summed response log-probs.
- `evaluate`: each policy samples on the held-out and the out-of-distribution prompts at
  temperature 1 with no top-k/top-p (samples from pi itself, which the KL estimate needs); each
  sample is scored by the gold reward (built-in task), the reward model and both log-probs, and
  report.metrics turns the scored samples into rewards, KL(pi || pi_sft), win rates and diversity.

Used by train.py (the sample and eval stages) and experiments.py.
"""
import torch
from tqdm import tqdm

import data
import report
import reviews
import vcb
from runtime import TrainingError, gather, load_data, load_model, log, path


def real_mask(ids_list, T):
    """(B, T) True on the real tokens of right-padded rows of the given lengths."""
    lengths = torch.tensor([len(ids) for ids in ids_list])
    return torch.arange(T)[None, :] < lengths[:, None]


def decode(enc, tokens):
    """Response text of sampled tokens, without the final <|endoftext|>."""
    return enc.decode([t for t in tokens if t != enc.eot_token])


@torch.no_grad()
def score_rewards(cfg, env, rm, enc, pairs):
    """RM scores r(x, y) of (prompt, response) pairs, in batches of eval_batch."""
    examples = [data.encode_example(enc, p, r, cfg.block_size)[:2] for p, r in pairs]
    out = []
    for k in range(0, len(examples), cfg.eval_batch):
        chunk = examples[k:k + cfg.eval_batch]
        x, _ = data.collate(chunk, enc.eot_token)
        with env.autocast():
            out += rm(x.to(env.device), reward_mask=real_mask([ids for ids, _ in chunk], x.size(1)).to(env.device)).tolist()
    return out


@torch.no_grad()
def score_logps(cfg, env, model, enc, examples):
    """Summed response log-probs of [(ids, start)] under model, float32, in batches of eval_batch."""
    out = []
    for k in range(0, len(examples), cfg.eval_batch):
        x, mask = data.collate(examples[k:k + cfg.eval_batch], enc.eot_token)
        x, mask = x.to(env.device), mask.to(env.device)
        with env.autocast():
            out += vcb.sequence_logps(model(x), x, mask).tolist()
    return out


def sample_chunks(cfg, env, enc, model, prompts, seed, offset=0, desc="sample", **sampling):
    """Generate for prompts in chunks of sample_batch, each chunk with its own seed, the chunks shared
    round-robin by the processes: what a chunk gets does not depend on the number of processes.
    Yields (index of the chunk's first prompt, its prompts, their token ids, the generate() output)."""
    max_prompt = cfg.block_size - cfg.max_new_tokens
    for c in tqdm(list(range(0, len(prompts), cfg.sample_batch))[env.rank::env.world], desc=desc,
                  disable=not env.master, leave=False):
        batch = prompts[c:c + cfg.sample_batch]
        ids = [data.encode_prompt(enc, p, max_prompt) for p in batch]
        g = torch.Generator(env.device).manual_seed(seed * 1_000_003 + offset + c)
        try:
            with env.autocast():
                outs = model.generate(ids, cfg.max_new_tokens, stop_token=enc.eot_token, generator=g, **sampling)
        except ValueError as e:
            raise TrainingError(f"{desc}: {e}") from None
        yield c, batch, ids, outs


def judge_name(cfg):
    """Win rates are judged by the gold reward on the built-in task, by the reward model elsewhere."""
    return "gold" if cfg.data == "builtin" else "rm"


def beta_label(method, beta):
    return "-" if method in ("sft", "rrhf") or beta is None else f"{beta:g}"  # SFT and RRHF have no beta


def evaluate(cfg, env, enc, policies, seed, cache=None):
    """For each policy {name: checkpoint}, on the held-out and out-of-distribution prompts: samples
    at temperature 1 with no top-k/top-p (samples from pi itself, which the KL estimate needs),
    scored by the gold reward, the RM and both log-probs. cache {(file, seed): scored} reuses work."""
    cache = {} if cache is None else cache
    sets = {"eval": [r["prompt"] for r in load_data(cfg, "eval_prompts")],
            "ood": [r["prompt"] for r in load_data(cfg, "ood_prompts")]}
    sft = load_model(path(cfg, "sft.pt"), env, enc, cfg).eval()
    rm = load_model(path(cfg, "rm.pt"), env, enc, cfg).eval()
    scored = {}
    for name, file in policies.items():
        if (file, seed) not in cache:
            pi = sft if file == path(cfg, "sft.pt") else load_model(file, env, enc, cfg).eval()
            cache[(file, seed)] = {s: sample_and_score(cfg, env, enc, name, pi, sft, rm, prompts, seed, s)
                                   for s, prompts in sets.items() if prompts}
        scored[name] = cache[(file, seed)]
    judge, results = judge_name(cfg), {}
    for name, by_set in scored.items():
        results[name] = {s: report.metrics(rows, scored["sft"][s], scored["dpo"][s] if "dpo" in scored else None, judge)
                         for s, rows in by_set.items()}
        log(env, f"eval {name}: " + "; ".join(f"{s} {judge} {v[report.reward_key(judge)]:.3f} "
                                              f"rm {v['rm_reward']:.3f} kl {v['kl']:.2f}" for s, v in results[name].items()))
        if by_set.get("eval"):
            log(env, f"  e.g. {by_set['eval'][0]['prompt']!r} -> {by_set['eval'][0]['text']!r}")
    return results


@torch.no_grad()
def sample_and_score(cfg, env, enc, name, pi, sft, rm, prompts, seed, set_name):
    """eval_samples samples per prompt from pi, each with logp_pi, logp_sft (on the exact sampled
    tokens), its RM score and gold reward. Chunked like the sample stage, so results do not depend
    on the number of processes."""
    k, offset = cfg.eval_samples, {"eval": 0, "ood": 500_009}[set_name]  # other seeds for the other set
    rows = []
    for c, batch, ids, outs in sample_chunks(cfg, env, enc, pi, prompts, seed, offset, f"eval {name} {set_name}",
                                             temperature=1.0, num_samples=k):
        chunk = [{"prompt_idx": c + j // k, "sample": j % k, "prompt": batch[j // k], "text": decode(enc, o)}
                 for j, o in enumerate(outs)]
        sampled = [(ids[j // k] + o, len(ids[j // k])) for j, o in enumerate(outs)]  # the exact tokens
        scores = dict(logp_pi=score_logps(cfg, env, pi, enc, sampled),
                      logp_sft=score_logps(cfg, env, sft, enc, sampled),
                      rm=score_rewards(cfg, env, rm, enc, [(r["prompt"], r["text"]) for r in chunk]))
        if cfg.data == "builtin":
            scores["gold"] = reviews.gold_reward([r["text"] for r in chunk])
        for j, r in enumerate(chunk):
            r.update({key: v[j] for key, v in scores.items()})
        rows += chunk
    return sorted(gather(env, rows), key=lambda r: (r["prompt_idx"], r["sample"]))
