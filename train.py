"""
train.py: the VCB pipeline (docs/method.md, "The pipeline"), stage by stage, in flat PyTorch loops.

    python train.py                         # every stage; about a minute or two on a 2-core CPU
    python train.py --stage=align --force   # redo one stage
    python train.py --help                  # every option, with its default and meaning
    torchrun --nproc_per_node=2 train.py    # data parallel (GPUs with NCCL, or CPU processes with gloo)
    python experiments.py sweep             # every method over several betas and seeds -> frontier

Stages, each reading the previous one's files in --out_dir:
    data    the task's files (data/*.jsonl) and the tokenizer (tokenizer.json)
    sft     supervised fine-tuning on the demonstrations                      -> sft.pt
    rm      reward model from the SFT weights, Bradley-Terry loss on pairs      -> rm.pt
    sample  n candidates per prompt from SFT, RM scores, SFT log-probs          -> candidates.jsonl
    align   VCB and every baseline, each from SFT: the offline ones on the same  -> policy_<method>.pt
            candidates, PPO and RLOO on their own samples (ppo.py)
    eval    gold and RM reward, KL to SFT, win rates, diversity               -> results.json, frontier.png

Read top to bottom: the one training loop, then the stages in pipeline order, then what each stage
reads and writes (records.py skips a stage whose outputs were made with the same settings; --force
redoes it) and main. The options are in config.py, devices and checkpoints in runtime.py, scoring
and evaluation in evaluate.py, an iteration of PPO and RLOO in ppo.py.
"""
import dataclasses
import functools
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import corpora
import data
import gpt2
import methods
import packing
import ppo
import records
import report
import reviews
import vcb
from config import ONLINE, STAGES, ConfigError, align_settings, method_list, stage_settings
from evaluate import beta_label, decode, evaluate, gold_reward, judge_name, sample_candidates, score_rewards
from model import GPT, GPTConfig, response_logps
from records import Task, mark_done, up_to_date
from runtime import (TrainingError, barrier, batch_indices, check_healthy, command, compiled, encode_groups, kept_checkpoint,
                     load_candidates, load_checkpoint, load_data, load_model, load_tokenizer, log, lr_at, model_args,
                     note_progress, path, progress_file, resume, save_model, save_progress, save_snapshot, start)



# -----------------------------------------------------------------------------
# the one training loop: SFT, reward model, offline alignment, and PPO's and RLOO's iterations

def run_steps(cfg, env, task, total, state, step, probe, enc, unit="step", extra=None):
    """What every training does around its steps: step(i, extra) -> metrics, for i from where the task's
    checkpoint left off to total. state {name: model or optimizer} is what the checkpoint holds (the
    first model is the one trained), extra the plain values the steps change (PPO's adaptive beta).

    The metrics stay tensors (reading one waits for the device) and are read together every
    log_interval steps: then each step's go to curves.jsonl beside the task's output, and a line to
    the log. A non-finite "loss" among them stops the run with its step, keeping the last good
    checkpoint: nothing is saved between two readings. Every ckpt_interval steps, after a health
    check (finite weights, a finite probe()), a resumable checkpoint <name>.ckpt.pt. Returns extra."""
    extra = dict(extra or {})
    start, saved = resume(cfg, env, task, state)
    extra.update(saved)
    models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    optimizer = next(v for v in state.values() if isinstance(v, torch.optim.Optimizer))
    curves = os.path.join(os.path.dirname(task.outputs[0]), "curves.jsonl")
    if env.master:
        records.curves_from(curves, task.name, start)  # a resumed run continues its curve, a new one starts afresh
    last_good, pending = start or None, []  # pending: (step, lr, metrics) not read yet
    bar = tqdm(range(start, total), desc=task.name, initial=start, total=total, disable=not (env.master and env.bars),
               dynamic_ncols=True, leave=False)

    def read():  # every pending step's metrics in one read: check, record, log
        tensors = [v.detach().float().reshape(()) for _, _, m in pending for v in m.values() if torch.is_tensor(v)]
        values = iter(torch.stack([v.to(tensors[0].device) for v in tensors]).tolist() if tensors else [])
        rows = [(i, lr, {k: next(values) if torch.is_tensor(v) else v for k, v in m.items()}) for i, lr, m in pending]
        pending.clear()
        for i, _, m in rows:
            if not math.isfinite(m.get("loss", 0.0)):
                raise TrainingError(f"{task.name}: the loss is {m['loss']} at {unit} {i}; stopped, and "
                                    f"{kept_checkpoint(cfg, task, last_good)}")
        if env.master:
            records.curves_append(curves, *({"task": task.name, "step": i + 1, "lr": lr, **m} for i, lr, m in rows))
        i, _, m = rows[-1]
        bar.set_postfix({k: f"{v:.3g}" for k, v in m.items()})
        if (i + 1) % cfg.log_interval == 0 or i + 1 == total:
            log(env, f"{task.name} {unit} {i + 1}/{total}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))

    for i in bar:
        note_progress(f"{task.name} {unit} {i + 1}/{total}")
        pending.append((i, optimizer.param_groups[0]["lr"], step(i, extra)))
        snapshot, checkpoint = i + 1 in task.snapshots, (i + 1) % cfg.ckpt_interval == 0 and i + 1 < total
        if (i + 1) % cfg.log_interval == 0 or i + 1 == total or snapshot or checkpoint:
            read()
        save_snapshot(cfg, env, task, i + 1, models[0], enc)
        if checkpoint:
            check_healthy(cfg, env, task, models, probe, i + 1, last_good)
            save_progress(cfg, env, task, i + 1, state, **extra)
            last_good = i + 1
    bar.close()
    if total > start:
        check_healthy(cfg, env, task, models, probe, None, last_good)
    return extra


def train(cfg, env, task, model, n_examples, steps, batch_size, lr, loss_fn, count_fn, seed, enc=None):
    """Optimise model for `steps` steps as task (a records.Task); returns the trained (unwrapped) model.

    Each step takes batch_size example indices (all processes together): this process takes every
    world-th one and splits them into grad_accum micro-batches. loss_fn(model, indices) -> (summed
    loss of those examples, metrics); count_fn(indices) -> how many items (tokens, pairs, prompts)
    the summed loss counts. Dividing by the whole step's count makes the gradient the same mean over
    items whatever the number of processes and micro-batches. The batch order is a function of
    (seed, step), so a run resumed from its checkpoint sees the batches it would have seen."""
    if batch_size < env.world * cfg.grad_accum:
        raise ConfigError(f"{task.name}: a batch of {batch_size} cannot feed {env.world} processes x {cfg.grad_accum} micro-batches")
    optimizer = model.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), env.device_type)
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == torch.float16)
    raw, runner = model, compiled(cfg, model)
    if env.world > 1:
        runner = DDP(runner, device_ids=[env.device] if env.device_type == "cuda" else None)
    runner.train()
    last = {}  # the step's last micro-batch: the health check reads it again

    def step(i, extra):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i, steps, lr, cfg.warmup_steps)
        idx = batch_indices(n_examples, batch_size, i, seed)
        total = max(count_fn(idx), 1)
        mine = idx[env.rank::env.world]
        micro = [mine[k::cfg.grad_accum] for k in range(cfg.grad_accum)]
        step_loss, metrics = torch.zeros((), device=env.device), {}
        for k, mb in enumerate(micro):
            sync = runner.no_sync() if env.world > 1 and k < len(micro) - 1 else nullcontext()
            with sync:
                with env.autocast():
                    loss_sum, m = loss_fn(runner, mb)
                loss = loss_sum * env.world / total  # DDP averages gradients over processes
                scaler.scale(loss).backward()
            step_loss += loss.detach() / env.world
            for key, v in m.items():
                metrics[key] = metrics.get(key, 0.0) + v / len(micro)
        last["micro"] = micro[-1]
        if env.world > 1:
            dist.all_reduce(step_loss)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, **metrics}  # tensors: run_steps reads them every log_interval

    run_steps(cfg, env, task, steps, {"model": raw, "optimizer": optimizer}, step,
              lambda: loss_fn(raw, last["micro"])[0], enc)
    return raw


def finish(cfg, env, task, model, enc, **extra):
    """Write a trained model atomically, then drop its resumable checkpoint."""
    save_model(cfg, env, task.outputs[0], model, enc, **extra)
    if env.master and os.path.exists(progress_file(cfg, task)):
        os.remove(progress_file(cfg, task))
    barrier(env)


# -----------------------------------------------------------------------------
# stage: data

def stage_data(cfg, env, task):
    if env.master:
        if cfg.data == "builtin":
            files = reviews.builtin_task(cfg.seed, cfg.n_sft, cfg.n_prefs, cfg.n_align, cfg.n_eval, cfg.n_eval, cfg.pref_tau,
                                         cfg.stakes)
        else:
            limits = dict(sft=cfg.n_sft, prefs=cfg.n_prefs, align_prompts=cfg.n_align, eval_prompts=cfg.n_eval,
                          ood_prompts=cfg.n_eval)
            files, notes = corpora.load_task(cfg.data, cfg.data_dir, limits, cfg.seed)
            for note in notes:
                log(env, note)
        t0 = time.time()  # the tokenizer first: a failure there (or Ctrl-C in BPE training) leaves no file changed
        if cfg.tokenizer == "bpe":
            enc = data.train_bpe("\n".join(r["prompt"] + r["response"] for r in files["sft"])[:5_000_000], cfg.vocab_size)
        else:
            enc = data.gpt2_tokenizer()
        t_tok = time.time() - t0
        for name in data.TASK_FILES:
            if files.get(name):
                data.write_jsonl(path(cfg, "data", f"{name}.jsonl"), files[name])
            elif os.path.exists(path(cfg, "data", f"{name}.jsonl")):
                os.remove(path(cfg, "data", f"{name}.jsonl"))
        data.save_tokenizer(enc, path(cfg, "tokenizer.json"))
        log(env, f"data: {', '.join(f'{len(files[n])} {n}' for n in data.TASK_FILES if files.get(n))}; "
                 f"tokenizer {enc.name} with {enc.n_vocab} tokens ({t_tok:.1f}s)")
    barrier(env)


# -----------------------------------------------------------------------------
# stage: sft

def stage_sft(cfg, env, task):
    enc, demos = load_tokenizer(cfg), load_data(cfg, "sft")
    examples = encode_groups(cfg, env, enc, [r["prompt"] for r in demos], [[r["response"]] for r in demos], "sft")
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(**model_args(cfg, enc.n_vocab)))
    else:
        model = gpt2.from_pretrained(cfg.init_from, block_size=cfg.block_size, dropout=cfg.dropout, log=lambda m: log(env, m))
        if model.config.vocab_size != enc.n_vocab:
            raise data.DataError(f"{cfg.init_from}: vocab_size is {model.config.vocab_size} but the tokenizer has "
                                 f"{enc.n_vocab} tokens (GPT-2 weights need --tokenizer=gpt2)")
        if model.config.block_size < cfg.block_size:
            raise data.DataError(f"{cfg.init_from}: has {model.config.block_size} positions, fewer than "
                                 f"--block_size={cfg.block_size}")
    model.to(env.device)
    log(env, f"sft: {model.num_params() / 1e6:.2f}M parameters, {len(examples)} demonstrations")

    tokens = [len(packing.fit(p, rs, cfg.block_size)[1][0]) for p, rs in examples]  # response tokens of each, once cut

    def loss_fn(m, idx):  # summed NLL of the response tokens (the prompt is given, not learned)
        p = packing.pack([examples[i] for i in idx], cfg.block_size).to(env.device)
        return -m(p).sum(), {}                                       # m(p): (N,) float32 log-probs

    def count_fn(idx):  # response tokens in the step
        return sum(tokens[i] for i in idx)

    model = train(cfg, env, task, model, len(examples), cfg.sft_steps, cfg.sft_batch, cfg.sft_lr, loss_fn, count_fn, cfg.seed)
    finish(cfg, env, task, model, enc)
    if env.master:
        model.eval()
        prompts = [data.encode_prompt(enc, r["prompt"], cfg.block_size - cfg.max_new_tokens) for r in demos[:2]]
        with env.autocast():
            outs = model.generate(prompts, cfg.max_new_tokens, stop_token=enc.eot_token,
                                  generator=torch.Generator(env.device).manual_seed(cfg.seed))
        for r, out in zip(demos, outs):
            log(env, f"sft sample: {r['prompt']!r} -> {decode(enc, out)!r}")


# -----------------------------------------------------------------------------
# stage: rm

def stage_rm(cfg, env, task):
    enc = load_tokenizer(cfg)
    model, metrics = train_rm(cfg, env, enc, load_data(cfg, "prefs"), task)
    finish(cfg, env, task, model, enc, metrics=metrics)


def train_rm(cfg, env, enc, prefs, task):
    """A reward model from the SFT weights on preference pairs; returns it and its held-out accuracy
    (and, on the built-in task, its correlation with the gold reward)."""
    train_pairs, held = split_holdout(cfg, prefs)
    pairs = encode_groups(cfg, env, enc, [r["prompt"] for r in train_pairs], [[r["chosen"], r["rejected"]] for r in train_pairs],
                          "rm")
    torch.manual_seed(cfg.seed)
    model = load_model(path(cfg, "sft.pt"), env, enc, cfg, reward_head=True, dropout=cfg.dropout)

    def loss_fn(m, idx):  # Bradley-Terry on each pair, the prompt read once for both responses
        r = m(packing.pack([pairs[i] for i in idx], cfg.block_size).to(env.device), head="reward")  # (2b,): chosen, rejected, ...
        r_w, r_l = r[0::2], r[1::2]
        return vcb.bradley_terry_loss(r_w, r_l).sum(), {"acc": (r_w > r_l).float().mean()}

    model = train(cfg, env, task, model, len(pairs), cfg.rm_steps, cfg.rm_batch, cfg.rm_lr, loss_fn, len, cfg.seed)
    model.eval()
    metrics = {}
    if held:
        scores = score_rewards(cfg, env, model, enc, [packing.encode_group(enc, r["prompt"], [r["chosen"], r["rejected"]])
                                                      for r in held])
        r_w, r_l = scores[0::2], scores[1::2]
        metrics["heldout_accuracy"] = sum(a > b for a, b in zip(r_w, r_l)) / len(held)
        if cfg.data == "builtin":
            gold = gold_reward(cfg, [r["chosen"] for r in held] + [r["rejected"] for r in held], [r["prompt"] for r in held] * 2)
            metrics["gold_correlation"] = report.pearson(r_w + r_l, gold)
        log(env, f"{task.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" on {len(held)} held-out pairs")
    return model, metrics


def split_holdout(cfg, prefs):
    """(training pairs, held-out pairs): the last rm_holdout share of the preference pairs is kept out
    of training, to measure the reward model on."""
    n_held = max(1, int(len(prefs) * cfg.rm_holdout)) if cfg.rm_holdout > 0 and len(prefs) > 1 else 0
    return prefs[:len(prefs) - n_held], prefs[len(prefs) - n_held:]


# -----------------------------------------------------------------------------
# stage: sample

def stage_sample(cfg, env, task):
    """n candidates per prompt from the SFT model, each scored by the RM, with its SFT log-prob
    (docs/method.md, "The pipeline", step 2): alignment then needs one model in memory."""
    enc = load_tokenizer(cfg)
    cands = sample_candidates(cfg, env, enc, [r["prompt"] for r in load_data(cfg, "align_prompts")], cfg.n_candidates, cfg.seed)
    if env.master:
        data.write_jsonl(task.outputs[0], cands)
        n, sigmas = cfg.n_candidates, [vcb.reward_sigma(torch.tensor([r["rewards"]])).item() for r in cands]
        log(env, f"sample: {len(cands)} prompts x {n} candidates; mean RM reward "
                 f"{sum(sum(r['rewards']) for r in cands) / (n * len(cands)):.3f}, mean sigma(x) {sum(sigmas) / len(sigmas):.3f}")
    barrier(env)


# -----------------------------------------------------------------------------
# stage: align

def stage_align(cfg, env, task, method, shared):
    """One method's policy; shared: what every method reads (the tokenizer and the candidates), loaded
    by the first one that runs."""
    if not shared:
        shared["enc"] = load_tokenizer(cfg)
        shared["cands"] = load_candidates(cfg, env, shared["enc"])
    align(cfg, env, shared["enc"], shared["cands"], method, cfg.seed, task)


def align(cfg, env, enc, cands, method, seed, task):
    """Train one policy from the SFT weights with one method, and save it: an offline one on the scored
    candidates, or an online one (ppo, rloo) on its own samples."""
    if method in ONLINE:
        model, _ = online(cfg, env, enc, method, seed, task, cands)
    else:
        model = offline(cfg, env, enc, cands, method, seed, task)
    finish(cfg, env, task, model, enc)


def offline(cfg, env, enc, cands, method, seed, task):
    """VCB and the order-based methods: their loss of the candidates' log-probs and rewards, in train()."""
    name, B = task.name, len(cands.groups)
    if method == "vcb" and vcb.vcb_count(cands.rewards, cfg.sigma_floor) < B:
        log(env, f"{name}: {B - vcb.vcb_count(cands.rewards, cfg.sigma_floor)} of {B} prompts have candidates of equal "
                 f"reward (sigma <= {cfg.sigma_floor:g}) and are skipped")
    no_pair = sum(vcb.pair_count(r[None]) == 0 for r in cands.rewards)
    if method in methods.PAIR_LOSSES and no_pair:
        log(env, f"{name}: {no_pair} of {B} prompts have no strictly ordered pair and give no loss")
    torch.manual_seed(seed)
    model = load_model(path(cfg, "sft.pt"), env, enc, cfg)
    spread = methods.reward_spread(cands.rewards).to(env.device)
    return train(cfg, env, task, model, B, cfg.align_steps, cfg.align_batch, cfg.align_lr,
                 lambda m, idx: align_loss(cfg, env, enc, m, cands, method, idx, spread),
                 lambda idx: methods.loss_count(cfg, method, cands.rewards[idx]), seed, enc)


def align_loss(cfg, env, enc, model, cands, method, idx, spread):
    """One micro-batch of an offline method: the prompts idx with their candidates packed after them
    (the prompt is read once, not n times). spread: reward_spread. Returns (the summed loss, metrics)."""
    n = cands.rewards.size(1)
    p = packing.pack([cands.groups[i] for i in idx], cfg.block_size).to(env.device)
    logps = response_logps(model, p, average=method == "rrhf").view(-1, n)                # (b, n)
    ref, rewards = cands.ref_logps[idx].to(env.device), cands.rewards[idx].to(env.device)
    loss = methods.offline_loss(cfg, method, logps, ref, rewards, spread)
    return loss, methods.align_metrics(method, logps.detach(), ref, rewards, cfg, spread)


def online(cfg, env, enc, method, seed, task, cands):
    """PPO or RLOO from the SFT weights: iterations of ppo.py in the training loop. Returns the policy
    and the critic (PPO's; None for RLOO)."""
    if env.world > 1:
        raise ConfigError(f"{task.name}: ppo and rloo run in one process (run them without torchrun)")
    o = ppo.setup(cfg, env, enc, method, seed, cands)
    last = {}  # the iteration's rollouts: the health check reads one of them again

    def step(it, extra):
        metrics, extra["beta"], last["batch"] = ppo.iteration(cfg, env, enc, o, method, seed, it, extra["beta"])
        return metrics

    def probe():
        return response_logps(o.policy, ppo.packed(cfg, enc, last["batch"]["groups"][:1], env)).sum()

    run_steps(cfg, env, task, cfg.online_iters, o.state, step, probe, enc, unit="iteration", extra={"beta": cfg.beta})
    return o.policy, o.critic


# -----------------------------------------------------------------------------
# stage: eval

def stage_eval(cfg, env, task):
    enc = load_tokenizer(cfg)
    results = evaluate(cfg, env, enc, eval_policies(cfg), cfg.seed)
    if env.master:
        judge = judge_name(cfg)
        rm_metrics = load_checkpoint(path(cfg, "rm.pt")).get("metrics", {})
        data.write_json(path(cfg, "results.json"), {"judge": judge, "beta": cfg.beta, "reward_model": rm_metrics,
                                                     "methods": results, "config": dataclasses.asdict(cfg)})
        table = report.results_table({m: {beta_label(m, cfg.beta): r} for m, r in results.items()}, judge)
        data.write_text(path(cfg, "results.md"), table + "\n")
        print("\n" + table + "\n")
        reward = report.reward_key(judge)
        points = [dict(method=m, kl=r["eval"]["kl"], reward=r["eval"][reward]) for m, r in results.items()]
        report.plot_frontier(points, path(cfg, "frontier.png"), f"Reward against KL (beta = {cfg.beta:g}, seed {cfg.seed})", judge)
        log(env, f"eval: wrote {path(cfg, 'results.json')}, {path(cfg, 'results.md')} and {path(cfg, 'frontier.png')}")
    barrier(env)


def eval_policies(cfg):
    return {"sft": path(cfg, "sft.pt"), **{m: path(cfg, f"policy_{m}.pt") for m in method_list(cfg)}}


# -----------------------------------------------------------------------------
# what each stage reads and writes: stages.json records it, so that a finished stage is skipped

def stage_tasks(cfg, stage):
    """[(records.Task, run)] of a stage; run(cfg, env, task) does the work. align has one per method."""
    data_files = [path(cfg, "data", f"{n}.jsonl") for n in data.TASK_FILES if n != "ood_prompts"]
    if stage == "data":
        inputs = [os.path.join(d, f) for d, _, fs in os.walk(cfg.data_dir) for f in sorted(fs)] if cfg.data != "builtin" else []
        return [(Task("data", "data", stage_settings(cfg, "data"), inputs, data_files + [path(cfg, "tokenizer.json")],
                      optional=[path(cfg, "data", "ood_prompts.jsonl")]), stage_data)]
    if stage == "sft":
        inputs = [path(cfg, "data", "sft.jsonl"), path(cfg, "tokenizer.json")] + ([cfg.init_from] if cfg.init_from != "scratch" else [])
        return [(Task("sft", "sft", stage_settings(cfg, "sft"), inputs, [path(cfg, "sft.pt")]), stage_sft)]
    if stage == "rm":
        inputs = [path(cfg, "data", "prefs.jsonl"), path(cfg, "tokenizer.json"), path(cfg, "sft.pt")]
        return [(Task("rm", "rm", stage_settings(cfg, "rm"), inputs, [path(cfg, "rm.pt")]), stage_rm)]
    if stage == "sample":
        inputs = [path(cfg, "data", "align_prompts.jsonl"), path(cfg, "tokenizer.json"), path(cfg, "sft.pt"), path(cfg, "rm.pt")]
        return [(Task("sample", "sample", stage_settings(cfg, "sample"), inputs, [path(cfg, "candidates.jsonl")]), stage_sample)]
    if stage == "align":
        shared = {}
        return [(align_task(cfg, m, cfg.seed, f"align-{m}", path(cfg, f"policy_{m}.pt")),
                 functools.partial(stage_align, method=m, shared=shared)) for m in method_list(cfg)]
    prompts = [path(cfg, "data", f) for f in ("eval_prompts.jsonl", "ood_prompts.jsonl") if os.path.exists(path(cfg, "data", f))]
    inputs = prompts + [path(cfg, "tokenizer.json"), path(cfg, "rm.pt")] + list(eval_policies(cfg).values())
    outputs = [path(cfg, "results.json"), path(cfg, "results.md"), path(cfg, "frontier.png")]
    return [(Task("eval", "eval", stage_settings(cfg, "eval"), inputs, outputs), stage_eval)]


def align_task(cfg, method, seed, name, file, candidates=None):
    """Training one policy: what it depends on, for the stage records. candidates: the scored
    candidates it learns from (default the sample stage's; experiments bring others)."""
    inputs = [candidates or path(cfg, "candidates.jsonl"), path(cfg, "tokenizer.json"), path(cfg, "sft.pt")]
    if method in ONLINE:  # the online methods sample their own responses: the prompts and the RM instead
        inputs += [path(cfg, "data", "align_prompts.jsonl"), path(cfg, "rm.pt")]
    return Task(name, "align", align_settings(cfg, method, seed), inputs, [file])


def run_stage(cfg, env, stage):
    """Every task of a stage that is not up to date, each recorded when done."""
    for task, run in stage_tasks(cfg, stage):
        if not up_to_date(cfg, env, task):
            run(cfg, env, task)
            mark_done(cfg, env, task)


def main(argv, then=None, doc=__doc__):
    """The stages (--stage, default all), each task skipped when up to date, then `then(cfg, env)`
    if given (experiments.py)."""
    cfg, env = start(argv, doc)
    t0, times = time.time(), []
    for stage in STAGES if cfg.stage == "all" else [cfg.stage]:
        if env.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        t = time.time()
        run_stage(cfg, env, stage)
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(env.device) / 2**30:.2f} GiB" if env.device_type == "cuda" else ""
        times.append(f"{stage} {time.time() - t:.1f}s{peak}")
    log(env, "stage times: " + "; ".join(times))
    if cfg.compile:  # one graph per way of reading a batch; past the limit, dynamo would fall back to eager
        from torch._dynamo.utils import counters
        log(env, f"torch.compile: {counters['stats']['unique_graphs']} graphs compiled in this process "
                 f"(torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit} per function)")
    if env.master:
        report.plot_curves(path(cfg, "curves.jsonl"), path(cfg, "curves.png"))
    if then is not None:
        then(cfg, env)
    log(env, f"done in {time.time() - t0:.0f}s")
    if env.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    command(main)
