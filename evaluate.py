"""
evaluate.py: models reading text in batches, and the evaluation of policies.

- Sampling in seeded chunks shared round-robin by the processes (what a chunk gets does not depend
  on how many processes there are), reward-model scores r(x, y), summed response log-probs; both
  read a prompt's responses in one batch (packing.py), so the prompt is computed once.
- `evaluate`: each policy samples on the held-out and the out-of-distribution prompts at
  temperature 1 with no top-k/top-p (samples from pi itself, which the KL estimate needs); each
  sample is scored by the gold reward (built-in task), the reward model and both log-probs, and
  `metrics` turns the scored samples into rewards, KL(pi || pi_sft), win rates and diversity. The
  scored samples are kept beside the policy, so a policy is sampled once however many tables read
  it (the eval stage, the sweep, the ablations).

Used by train.py (the sample and eval stages), ppo.py and the experiments.
"""
import math
import os

import torch
from tqdm import tqdm

import data
import packing
from machinery.records import check_inputs, fingerprints, kept
from machinery.runtime import TrainingError, gather, load_model, log, path
from tasks import reviews


def real_mask(ids_list, T):
    """(B, T) True on the real tokens of right-padded rows of the given lengths."""
    lengths = torch.tensor([len(ids) for ids in ids_list])
    return torch.arange(T)[None, :] < lengths[:, None]


def decode(enc, tokens):
    """Response text of sampled tokens, without the final <|endoftext|>."""
    return enc.decode([t for t in tokens if t != enc.eot_token])


def chunks(groups, size):
    """Consecutive groups of about `size` sequences in all (at least one group each)."""
    out, n = [], 0
    for g in groups:
        if out and n + len(g[1]) > size:
            yield out
            out, n = [], 0
        out.append(g)
        n += len(g[1])
    if out:
        yield out


@torch.no_grad()
def score_rewards(cfg, env, rm, groups):
    """RM scores r(x, y) of every response of groups [(prompt ids, [response ids])] (data.encode_group),
    read at each response's last token, in batches of about eval_batch. A flat list."""
    out, reader = [], packing.Reader(rm)
    for chunk in chunks(groups, cfg.eval_batch):
        with env.autocast():
            out += reader(packing.batch_of(chunk, cfg.block_size, cfg.layout).to(env.device), head="reward").tolist()
    return out


@torch.no_grad()
def score_logps(cfg, env, model, groups):
    """Summed response log-probs (float32) of every response of groups under model, in batches of
    about eval_batch. A flat list."""
    out, reader = [], packing.Reader(model)
    for chunk in chunks(groups, cfg.eval_batch):
        with env.autocast():
            out += packing.response_logps(reader, packing.batch_of(chunk, cfg.block_size, cfg.layout).to(env.device)).tolist()
    return out


def sample_chunks(cfg, env, enc, model, prompts, seed, offset=0, desc="sample", size=None, **sampling):
    """Generate for prompts in chunks of `size` prompts (default sample_batch), each chunk with its own
    seed, the chunks shared round-robin by the processes: what a chunk gets does not depend on the
    number of processes. Yields (index of the chunk's first prompt, its prompts, their token ids, the
    generate() output)."""
    max_prompt, size = cfg.block_size - cfg.max_new_tokens, size or cfg.sample_batch
    for c in tqdm(list(range(0, len(prompts), size))[env.rank::env.world], desc=desc,
                  disable=not (env.master and env.bars), leave=False):
        batch = prompts[c:c + size]
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


def gold_reward(cfg, texts, prompts):
    """The built-in task's gold reward of each response, scaled by its prompt's stake on the stakes
    variant (--stakes=true): the judge of every win rate and reward on the built-in task."""
    return reviews.gold_reward(texts, prompts if cfg.stakes else None)


def evaluate(cfg, env, enc, policies, seed):
    """Every policy {name: checkpoint} scored on the held-out and out-of-distribution prompts, then
    compared with SFT (and DPO): {name: {set: metrics}}."""
    refs = reference_models(cfg, env, enc)
    return compare(cfg, env, {name: score_policy(cfg, env, enc, name, file, seed, refs) for name, file in policies.items()})


def reference_models(cfg, env, enc):
    """The models every evaluation reads besides the policy: SFT (the KL's reference) and the RM."""
    return {"sft": load_model(path(cfg, "sft.pt"), env, enc, cfg).eval(), "rm": load_model(path(cfg, "rm.pt"), env, enc, cfg).eval()}


PROMPT_SETS = {"eval": "eval_prompts", "ood": "ood_prompts", "val": "val_prompts"}  # held out, out of distribution, validation


def score_policy(cfg, env, enc, name, file, seed, refs, sets=("eval", "ood")):
    """One policy's samples on each prompt set (PROMPT_SETS) at temperature 1 with no top-k/top-p
    (samples from pi itself, which the KL estimate needs), scored by the gold reward, the RM and both
    log-probs. They are kept beside the policy (<policy>.seed<seed>.scored.json; the validation
    prompts' in <policy>.seed<seed>.val.scored.json) and read back while the policy, the models and
    prompts that judge it and the options they were made with are the same; each of those files must
    be what the task that wrote it recorded (records.check_inputs)."""
    judges = [file, path(cfg, "sft.pt"), path(cfg, "rm.pt"), path(cfg, "tokenizer.json")]
    judges += [path(cfg, "data", f"{PROMPT_SETS[s]}.jsonl") for s in sets]
    check_inputs(cfg, judges)  # each the file its task wrote: an experiment scores policies (and snapshots) outside any task
    key = {"seed": seed, "inputs": fingerprints(cfg, judges)}

    def sample():
        pi = refs["sft"] if file == path(cfg, "sft.pt") else load_model(file, env, enc, cfg).eval()
        prompts = {s: data.read_task_file(cfg.out_dir, PROMPT_SETS[s]) for s in sets}
        return {s: sample_and_score(cfg, env, enc, name, pi, refs["sft"], refs["rm"], [r["prompt"] for r in ps], seed, s)
                for s, ps in prompts.items() if ps}

    tag = "" if tuple(sets) == ("eval", "ood") else "." + "-".join(sets)
    return kept(os.path.splitext(file)[0] + f".seed{seed}{tag}.scored.json", key, sample, cfg, env)


SFT = "sft"         # the reference policy: every policy is compared with it
BASELINE = "dpo"    # the method every other is compared with (win rates at the same beta, at matched KL)


def compare(cfg, env, scored):
    """{name: {set: scored samples}} -> {name: {set: metrics}}, win rates against SFT (and the BASELINE
    method when it is there), all on the same prompts and sample slots."""
    judge, results = judge_name(cfg), {}
    for name, by_set in scored.items():
        results[name] = {s: metrics(rows, scored[SFT][s], scored[BASELINE][s] if BASELINE in scored else None, judge)
                         for s, rows in by_set.items()}
        log(env, f"eval {name}: " + "; ".join(f"{s} {judge} {v[reward_key(judge)]:.3f} "
                                              f"rm {v['rm_reward']:.3f} kl {v['kl']:.2f}" for s, v in results[name].items()))
        if by_set.get("eval"):
            log(env, f"  e.g. {by_set['eval'][0]['prompt']!r} -> {by_set['eval'][0]['text']!r}")
    return results


@torch.no_grad()
def sample_and_score(cfg, env, enc, name, pi, sft, rm, prompts, seed, set_name):
    """eval_samples samples per prompt from pi (val_samples on the validation prompts), each with
    logp_pi (from the sampler itself) and logp_sft on the exact sampled tokens, its RM score and gold
    reward. Chunked like the sample stage, so results do not depend on the number of processes."""
    k = cfg.val_samples if set_name == "val" else cfg.eval_samples
    offset = {"eval": 0, "ood": 500_009, "val": 900_007}[set_name]  # other seeds for the other sets
    rows, size = [], max(1, cfg.eval_batch // k)  # eval_batch sequences per generate() call: fewer, fuller steps
    for c, batch, ids, (outs, logp_pi) in sample_chunks(cfg, env, enc, pi, prompts, seed, offset, f"eval {name} {set_name}",
                                                        size, temperature=1.0, num_samples=k, return_logps=True):
        chunk = [{"prompt_idx": c + j // k, "sample": j % k, "prompt": batch[j // k], "text": decode(enc, o)}
                 for j, o in enumerate(outs)]
        sampled = [(ids[i], outs[i * k:(i + 1) * k]) for i in range(len(batch))]  # the exact tokens
        texts = [data.encode_group(enc, p, [r["text"] for r in chunk[i * k:(i + 1) * k]]) for i, p in enumerate(batch)]
        # logp_pi comes with the samples; logp_sft needs the SFT model on the same tokens (SFT: the same number)
        scores = dict(logp_pi=logp_pi, logp_sft=logp_pi if pi is sft else score_logps(cfg, env, sft, sampled),
                      rm=score_rewards(cfg, env, rm, texts))
        if cfg.data == "builtin":
            scores["gold"] = gold_reward(cfg, [r["text"] for r in chunk], [r["prompt"] for r in chunk])
        for j, r in enumerate(chunk):
            r.update({key: v[j] for key, v in scores.items()})
        rows += chunk
    return sorted(gather(env, rows), key=lambda r: (r["prompt_idx"], r["sample"]))


def sample_candidates(cfg, env, enc, prompts, n, seed):
    """n candidates per prompt from SFT, as records {prompt, responses, rewards, ref_logps}."""
    sft = load_model(path(cfg, "sft.pt"), env, enc, cfg).eval()
    max_prompt = cfg.block_size - cfg.max_new_tokens
    long = sum(len(enc.encode_ordinary(p)) + 1 > max_prompt for p in prompts)
    if long:
        log(env, f"sample: {long} prompts are longer than block_size - max_new_tokens = {max_prompt} tokens and are cut from the left")
    # Every chunk is scored on its own, so the candidates file is the same whatever the number of
    # processes. Generation and SFT log-probs first, then the RM (one model at a time).
    mine = []  # per chunk: its first prompt's index, prompts, responses, token ids, SFT log-probs
    for c, batch, _, outs in sample_chunks(cfg, env, enc, sft, prompts, seed, temperature=cfg.temperature,
                                           top_k=cfg.top_k or None, top_p=cfg.top_p, num_samples=n):
        texts = [[decode(enc, o) for o in outs[i * n:(i + 1) * n]] for i in range(len(batch))]
        groups = [data.encode_group(enc, p, ys) for p, ys in zip(batch, texts)]  # the text, as alignment reads it
        mine.append((c, batch, texts, groups, score_logps(cfg, env, sft, groups)))
    del sft
    rm = load_model(path(cfg, "rm.pt"), env, enc, cfg).eval()
    out = []
    for c, batch, texts, groups, logps in mine:
        rewards = score_rewards(cfg, env, rm, groups)
        if not all(math.isfinite(v) for v in rewards + logps):
            raise TrainingError(f"sample: non-finite scores for the prompts from {c}; check rm.pt and sft.pt")
        for i, (prompt, ys) in enumerate(zip(batch, texts)):
            k = slice(i * n, (i + 1) * n)
            out.append({"i": c + i, "prompt": prompt, "responses": ys, "rewards": rewards[k], "ref_logps": logps[k]})
    return [{k: v for k, v in r.items() if k != "i"} for r in sorted(gather(env, out), key=lambda r: r["i"])]


# -----------------------------------------------------------------------------
# from scored samples to numbers

def reward_key(judge):
    """The reward a judge reads: the gold one on the built-in task, else the reward model's."""
    return "gold_reward" if judge == "gold" else "rm_reward"


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def win_rate(rows, baseline_rows, key):
    """Share of (prompt, sample) slots where this policy's sample beats the baseline's; ties count half."""
    return mean([1.0 if a[key] > b[key] else 0.5 if a[key] == b[key] else 0.0 for a, b in zip(rows, baseline_rows)])


def distinct_n(texts, n):
    """Distinct word n-grams over all n-grams of the samples: 1 is all different, near 0 is repetition."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def metrics(rows, sft_rows, dpo_rows, judge):
    """One policy on one prompt set. KL(pi || pi_sft) is the mean of logp_pi - logp_sft over samples
    drawn from pi itself. judge: 'gold' or 'rm', the reward that decides the win rates."""
    return {"gold_reward": mean([r["gold"] for r in rows]) if judge == "gold" else None,
            "rm_reward": mean([r["rm"] for r in rows]),
            "kl": mean([r["logp_pi"] - r["logp_sft"] for r in rows]),
            "win_rate_vs_sft": win_rate(rows, sft_rows, judge),
            "win_rate_vs_dpo": win_rate(rows, dpo_rows, judge) if dpo_rows is not None else None,
            "distinct_2": distinct_n([r["text"] for r in rows], 2),
            "length": mean([len(r["text"].split()) for r in rows]),
            "samples": len(rows)}
