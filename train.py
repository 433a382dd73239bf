"""
train.py: the VCB pipeline (docs/method.md, "The pipeline"), stage by stage, in flat PyTorch loops.

    python train.py                         # every stage; about a minute or two on a 2-core CPU
    python train.py --stage=align --force   # redo one stage
    python train.py --help                  # every option, with its default and meaning
    python train.py --preset=presets/gpt2-hh.json --plan   # what a run needs, checked, and its stages estimated
    torchrun --nproc_per_node=2 train.py --methods=vcb,dpo,ipo,slic,rrhf   # data parallel (docs/gpu.md)
    python -m experiments sweep             # every method over several betas and seeds -> frontier

Stages, each reading the previous one's files in --out_dir:
    data    the task's files (data/*.jsonl) and the tokenizer (tokenizer.json)
    sft     supervised fine-tuning on the demonstrations                      -> sft.pt
    rm      reward model from the SFT weights, Bradley-Terry loss on pairs      -> rm.pt
    sample  n candidates per prompt from SFT, RM scores, SFT log-probs          -> candidates.jsonl
    align   VCB and every baseline, each from SFT: the offline ones on the same  -> policy_<method>.pt
            candidates, PPO and RLOO on their own samples (ppo.py)
    eval    gold and RM reward, KL to SFT, win rates, diversity               -> results.json, results.md

Read top to bottom: the training loop, then the stages in pipeline order, then what each stage reads
and writes, and main. A stage whose outputs were made from the same files with the same settings is
skipped (machinery/records.py; --force redoes it). The losses and the methods are in vcb.py, how a
batch of prompts with their responses is read in packing.py, the options in machinery/config.py.
"""
import functools
import os
import time

import torch

import data
import evaluate
import packing
import ppo
import vcb
from experiments import report
from machinery import processes, records
from machinery.config import STAGES, as_dict, method_list
from machinery.files import DataError, remove, write_json, write_jsonl, write_text
from machinery.progress import Progress, finish_task
from machinery.records import Task
from machinery.runtime import (all_reduce, barrier, batch_indices, close, command, load_checkpoint, load_model, log, lr_at,
                               micro_batches, model_args, no_sync, path, start, wrap)
from model import GPT, GPTConfig
from tasks import corpora, reviews
from tools import gpt2


# -----------------------------------------------------------------------------
# the training loop: SFT, the reward model and every offline method

def train(cfg, env, task, model, n_examples, steps, batch_size, lr, loss_fn, count_fn, seed, enc=None):
    """Optimise model for `steps` steps as task (a records.Task); returns the trained model.

    loss_fn(reader, indices) -> (the summed loss of those examples, metrics); count_fn(indices) -> how
    many items (tokens, pairs, prompts) the summed loss counts. Dividing by the whole step's count makes
    the gradient the same mean over items whatever the number of processes and micro-batches. The
    batch order is a function of (seed, step), so a resumed run sees the batches it would have seen."""
    optimizer = model.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), env.device_type)
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == torch.float16)
    reader = packing.Reader(model)
    runner = wrap(cfg, env, reader)  # torch.compile and DDP, when asked for
    runner.train()
    progress = Progress(cfg, env, task, {"model": model, "optimizer": optimizer}, steps)  # resumes from the task's checkpoint

    def probe():  # the health check's forward pass: the last micro-batch again
        return loss_fn(reader, micro[-1])[0]

    for step in range(progress.start, steps):
        lr_now = lr_at(step, steps, lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        indices = batch_indices(n_examples, batch_size, step, seed)
        count = max(count_fn(indices), 1)
        micro = micro_batches(indices, env, cfg.grad_accum)  # this process's share of the step
        step_loss, metrics = torch.zeros((), device=env.device), {}
        for k, mb in enumerate(micro):
            with no_sync(runner, env, last=k == len(micro) - 1):
                with env.autocast():
                    loss_sum, m = loss_fn(runner, mb)
                loss = loss_sum * env.world / count  # the step's mean over its items (DDP averages the processes)
                scaler.scale(loss).backward()
            step_loss += loss.detach() / env.world
            metrics = {key: metrics.get(key, 0.0) + v / len(micro) for key, v in m.items()}
        all_reduce(env, step_loss)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.record(step, lr_now, {"loss": step_loss, **metrics})  # read from the device every log_interval
        progress.snapshot(step + 1, model, enc)
        progress.checkpoint(step + 1, probe)  # every ckpt_interval: a health check, then a resumable checkpoint
    progress.finish(probe)
    return model


# -----------------------------------------------------------------------------
# stage: data

def stage_data(cfg, env, task):
    if env.master:
        if cfg.data == "builtin":
            files = reviews.builtin_task(cfg.seed, cfg.n_sft, cfg.n_prefs, cfg.n_align, cfg.n_eval, cfg.n_eval, cfg.pref_tau,
                                         cfg.stakes, n_val=cfg.n_eval)
        else:
            limits = dict(sft=cfg.n_sft, prefs=cfg.n_prefs, align_prompts=cfg.n_align, eval_prompts=cfg.n_eval,
                          ood_prompts=cfg.n_eval, val_prompts=cfg.n_eval)
            files, notes = corpora.load_task(cfg.data, cfg.data_dir, limits, cfg.seed)
            for note in notes:
                log(env, note)
        t0 = time.time()  # the tokenizer first: a failure there (or Ctrl-C in BPE training) leaves no file changed
        if cfg.tokenizer == "bpe":
            enc = data.train_bpe("\n".join(r["prompt"] + r["response"] for r in files["sft"])[:5_000_000], cfg.vocab_size)
        else:
            enc = data.gpt2_tokenizer(gpt2_folder(cfg))
        t_tok = time.time() - t0
        for name in data.TASK_FILES:
            if files.get(name):
                write_jsonl(path(cfg, "data", f"{name}.jsonl"), files[name])
            else:
                remove(path(cfg, "data", f"{name}.jsonl"))
        data.save_tokenizer(enc, path(cfg, "tokenizer.json"))
        log(env, f"data: {', '.join(f'{len(files[n])} {n}' for n in data.TASK_FILES if files.get(n))}; "
                 f"tokenizer {enc.name} with {enc.n_vocab} tokens ({t_tok:.1f}s)")
    barrier(env)


# -----------------------------------------------------------------------------
# stage: sft

def stage_sft(cfg, env, task):
    enc, demos = tokenizer(cfg), data.read_task_file(cfg.out_dir, "sft")
    examples = encode(cfg, env, enc, [r["prompt"] for r in demos], [[r["response"]] for r in demos], "sft")
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(**model_args(cfg, enc.n_vocab)))
    else:
        model = gpt2.from_pretrained(cfg.init_from, block_size=cfg.block_size, dropout=cfg.dropout, log=lambda m: log(env, m))
        if model.config.vocab_size != enc.n_vocab:
            raise DataError(f"{cfg.init_from}: vocab_size is {model.config.vocab_size} but the tokenizer has "
                            f"{enc.n_vocab} tokens (GPT-2 weights need --tokenizer=gpt2)")
        if model.config.block_size < cfg.block_size:
            raise DataError(f"{cfg.init_from}: has {model.config.block_size} positions, fewer than --block_size={cfg.block_size}")
    model.to(env.device)
    log(env, f"sft: {model.num_params() / 1e6:.2f}M parameters, {len(examples)} demonstrations")
    tokens = [len(data.fit(p, rs, cfg.block_size)[1][0]) for p, rs in examples]  # response tokens of each, once cut

    def loss_fn(reader, idx):  # summed NLL of the response tokens (the prompt is given, not learned)
        batch = packing.batch_of([examples[i] for i in idx], cfg.block_size, cfg.layout).to(env.device)
        return -reader(batch).sum(), {}                                       # (N,) float32 log-probs

    def count_fn(idx):  # response tokens in the step
        return sum(tokens[i] for i in idx)

    model = train(cfg, env, task, model, len(examples), cfg.sft_steps, cfg.sft_batch, cfg.sft_lr, loss_fn, count_fn, cfg.seed)
    finish_task(cfg, env, task, model, enc)
    if env.master:
        model.eval()
        prompts = [data.encode_prompt(enc, r["prompt"], cfg.block_size - cfg.max_new_tokens) for r in demos[:2]]
        with env.autocast():
            outs = model.generate(prompts, cfg.max_new_tokens, stop_token=enc.eot_token,
                                  generator=torch.Generator(env.device).manual_seed(cfg.seed))
        for r, out in zip(demos, outs):
            log(env, f"sft sample: {r['prompt']!r} -> {evaluate.decode(enc, out)!r}")


# -----------------------------------------------------------------------------
# stage: rm

def stage_rm(cfg, env, task):
    enc = tokenizer(cfg)
    model, metrics = train_rm(cfg, env, enc, data.read_task_file(cfg.out_dir, "prefs"), task)
    finish_task(cfg, env, task, model, enc, metrics=metrics)


def train_rm(cfg, env, enc, prefs, task):
    """A reward model from the SFT weights on preference pairs; returns it and its held-out accuracy
    (and, on the built-in task, its correlation with the gold reward)."""
    train_pairs, held = split_holdout(cfg, prefs)
    pairs = encode(cfg, env, enc, [r["prompt"] for r in train_pairs], [[r["chosen"], r["rejected"]] for r in train_pairs], "rm")
    torch.manual_seed(cfg.seed)
    model = load_model(path(cfg, "sft.pt"), env, enc, cfg, reward_head=True, dropout=cfg.dropout)

    def loss_fn(reader, idx):  # Bradley-Terry on each pair, the prompt read once for both responses
        r = reader(packing.batch_of([pairs[i] for i in idx], cfg.block_size, cfg.layout).to(env.device), head="reward")
        r_w, r_l = r[0::2], r[1::2]                                               # (b,) chosen, (b,) rejected
        return vcb.bradley_terry_loss(r_w, r_l).sum(), {"acc": (r_w > r_l).float().mean()}

    model = train(cfg, env, task, model, len(pairs), cfg.rm_steps, cfg.rm_batch, cfg.rm_lr, loss_fn, len, cfg.seed)
    model.eval()
    metrics = {}
    if held:
        scores = evaluate.score_rewards(cfg, env, model, [data.encode_group(enc, r["prompt"], [r["chosen"], r["rejected"]])
                                                          for r in held])
        r_w, r_l = scores[0::2], scores[1::2]
        metrics["heldout_accuracy"] = sum(a > b for a, b in zip(r_w, r_l)) / len(held)
        if cfg.data == "builtin":
            gold = evaluate.gold_reward(cfg, [r["chosen"] for r in held] + [r["rejected"] for r in held],
                                        [r["prompt"] for r in held] * 2)
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
    enc = tokenizer(cfg)
    prompts = [r["prompt"] for r in data.read_task_file(cfg.out_dir, "align_prompts")]
    cands = evaluate.sample_candidates(cfg, env, enc, prompts, cfg.n_candidates, cfg.seed)
    if env.master:
        write_jsonl(task.outputs[0], cands)
        n, sigmas = cfg.n_candidates, [vcb.reward_sigma(torch.tensor([r["rewards"]])).item() for r in cands]
        log(env, f"sample: {len(cands)} prompts x {n} candidates; mean RM reward "
                 f"{sum(sum(r['rewards']) for r in cands) / (n * len(cands)):.3f}, mean sigma(x) {sum(sigmas) / len(sigmas):.3f}")
    barrier(env)


# -----------------------------------------------------------------------------
# stage: align

def stage_align(cfg, env, task, method, shared):
    """One method's policy; shared: what every method reads (the tokenizer and the candidates), read
    by the first one that runs."""
    if not shared:
        shared["enc"] = tokenizer(cfg)
        shared["cands"] = candidates(cfg, env, shared["enc"])
    align(cfg, env, shared["enc"], shared["cands"], method, cfg.seed, task)


def align(cfg, env, enc, cands, name, seed, task):
    """Train one policy from the SFT weights with the method `name` (vcb.METHODS), and save it: an
    offline method on the scored candidates, an online one (PPO, RLOO) on its own samples."""
    if vcb.METHODS[name].online:
        model, _ = ppo.train(cfg, env, enc, name, seed, task, cands)
    else:
        model = offline(cfg, env, enc, cands, name, seed, task)
    finish_task(cfg, env, task, model, enc)


def offline(cfg, env, enc, cands, name, seed, task):
    """An offline method: its loss (vcb.METHODS) on the candidates' log-probs and rewards, in train()."""
    method, B = vcb.METHODS[name], len(cands.groups)
    dead = sum(method.count(r[None], cfg.sigma_floor) == 0 for r in cands.rewards)
    if dead:
        log(env, f"{task.name}: {dead} of {B} prompts have candidates of equal reward and give no loss")
    torch.manual_seed(seed)
    model = load_model(path(cfg, "sft.pt"), env, enc, cfg)
    spread = vcb.reward_sigma(cands.rewards.flatten()[None]).to(env.device)  # (1,): the candidate set's one scale
    sigma = spread if method.sigma == "set" or cfg.vcb_sigma == "global" else None  # None: each prompt's own sigma(x)
    return train(cfg, env, task, model, B, cfg.align_steps, cfg.align_batch, cfg.align_lr,
                 lambda reader, idx: align_loss(cfg, env, reader, cands, method, idx, sigma),
                 lambda idx: method.count(cands.rewards[idx], cfg.sigma_floor), seed, enc)


def align_loss(cfg, env, reader, cands, method, idx, sigma):
    """One micro-batch of an offline method: the prompts idx, each with its n scored candidates.
    Returns (the loss summed over the prompts, metrics)."""
    batch = packing.batch_of([cands.groups[i] for i in idx], cfg.block_size, cfg.layout).to(env.device)
    logps = packing.response_logps(reader, batch, average=method.length_averaged).view(len(idx), -1)  # (b, n) log pi(y|x)
    ref_logps, rewards = cands.ref_logps[idx].to(env.device), cands.rewards[idx].to(env.device)       # (b, n), (b, n)
    loss = method.loss(logps, ref_logps, rewards, cfg.beta, cfg.lam, sigma, cfg.sigma_floor)
    return loss, align_metrics(method, logps.detach(), ref_logps, rewards, cfg.beta, sigma, cfg.sigma_floor)


@torch.no_grad()
def align_metrics(method, logps, ref_logps, rewards, beta, sigma, sigma_floor):
    """What a user watches, for every offline method on the same footing: over the step's ordered
    pairs, the implicit reward margin beta * h and the pair accuracy (h > 0); the mean delta of the
    candidates (`level`: the common level of a prompt's candidates, which the difference methods
    leave free); and the method's own diagnostics (VCB: the gap correlation and the share of skipped
    prompts). A method without a reference (RRHF) has no level, and its h is the gap in its own
    log-probs. 0-dim tensors, read when logged."""
    b, w, l = vcb.preference_pairs(rewards)
    ref = ref_logps if method.reference else torch.zeros_like(ref_logps)
    h = vcb.margin(logps[b, w], logps[b, l], ref[b, w], ref[b, l])
    out = {"margin": (beta * h).mean() if len(h) else 0.0, "acc": (h > 0).float().mean() if len(h) else 0.0}
    if method.reference:
        out["level"] = (logps - ref).mean()
    if method.diagnostics is not None:
        out.update(method.diagnostics(logps, ref, rewards, beta, sigma, sigma_floor))
    return out


# -----------------------------------------------------------------------------
# stage: eval

def stage_eval(cfg, env, task):
    enc = tokenizer(cfg)
    results = evaluate.evaluate(cfg, env, enc, eval_policies(cfg), cfg.seed)
    if env.master:
        judge = evaluate.judge_name(cfg)
        rm_metrics = load_checkpoint(path(cfg, "rm.pt")).get("metrics", {})
        write_json(path(cfg, "results.json"), {"judge": judge, "beta": cfg.beta, "reward_model": rm_metrics,
                                               "methods": results, "config": as_dict(cfg)})
        table = report.results_table({m: {report.beta_label(m, cfg.beta): r} for m, r in results.items()}, judge)
        write_text(path(cfg, "results.md"), table + "\n")
        print("\n" + table + "\n")
        reward = report.reward_key(judge)
        points = [dict(method=m, kl=r["eval"]["kl"], reward=r["eval"][reward]) for m, r in results.items()]
        report.plot_frontier(points, path(cfg, "frontier.png"), f"Reward against KL (beta = {cfg.beta:g}, seed {cfg.seed})", judge)
        log(env, f"eval: wrote {path(cfg, 'results.json')}, {path(cfg, 'results.md')} and {path(cfg, 'frontier.png')}")
    barrier(env)


def eval_policies(cfg):
    return {"sft": path(cfg, "sft.pt"), **{m: path(cfg, f"policy_{m}.pt") for m in method_list(cfg)}}


# -----------------------------------------------------------------------------
# what the stages share: the run's tokenizer, and the groups of token ids they read

def tokenizer(cfg):
    return data.load_tokenizer(path(cfg, "tokenizer.json"))


def gpt2_folder(cfg):
    """Where --tokenizer=gpt2 finds vocab.bpe and encoder.json: --tokenizer_dir, else beside the GPT-2
    weights, else gpt2/ (python -m tools.prepare gpt2 puts all of them there)."""
    if cfg.tokenizer_dir:
        return cfg.tokenizer_dir
    return os.path.dirname(cfg.init_from) if cfg.init_from != "scratch" else "gpt2"


def encode(cfg, env, enc, prompts, responses, what):
    """Each prompt with its responses (one demonstration, or a chosen and a rejected one) as token ids,
    logging how many sequences will be cut to fit block_size."""
    groups = [data.encode_group(enc, p, rs) for p, rs in zip(prompts, responses)]
    note = data.cut_note(what, groups, cfg.block_size)
    if note:
        log(env, note)
    return groups


def candidates(cfg, env, enc, file=None):
    """The scored candidates alignment learns from (the sample stage's, unless file names others)."""
    cands = data.read_candidates(file or path(cfg, "candidates.jsonl"), enc)
    note = data.cut_note("candidates", cands.groups, cfg.block_size)
    if note:
        log(env, note)
    return cands


# -----------------------------------------------------------------------------
# what each stage reads and writes: stages.json records it, so that a finished stage is skipped

def stage_tasks(cfg, stage):
    """[(records.Task, run)] of a stage; run(cfg, env, task) does the work. align has one per method."""
    data_files = [path(cfg, "data", f"{n}.jsonl") for n in data.TASK_FILES if n not in data.OPTIONAL_FILES]
    if stage == "data":
        inputs = [os.path.join(d, f) for d, _, fs in os.walk(cfg.data_dir) for f in sorted(fs)] if cfg.data != "builtin" else []
        if cfg.tokenizer == "gpt2":  # GPT-2's files: another copy of them makes the run's tokenizer anew
            inputs += [os.path.join(gpt2_folder(cfg), name) for name in data.GPT2_FILES]
        return [(Task("data", "data", inputs, data_files + [path(cfg, "tokenizer.json")],
                      optional=[path(cfg, "data", f"{n}.jsonl") for n in data.OPTIONAL_FILES]), stage_data)]
    if stage == "sft":
        inputs = [path(cfg, "data", "sft.jsonl"), path(cfg, "tokenizer.json")] + ([cfg.init_from] if cfg.init_from != "scratch" else [])
        return [(Task("sft", "sft", inputs, [path(cfg, "sft.pt")]), stage_sft)]
    if stage == "rm":
        return [(Task("rm", "rm", [path(cfg, "data", "prefs.jsonl"), path(cfg, "tokenizer.json"), path(cfg, "sft.pt")],
                      [path(cfg, "rm.pt")]), stage_rm)]
    if stage == "sample":
        inputs = [path(cfg, "data", "align_prompts.jsonl"), path(cfg, "tokenizer.json"), path(cfg, "sft.pt"), path(cfg, "rm.pt")]
        return [(Task("sample", "sample", inputs, [path(cfg, "candidates.jsonl")]), stage_sample)]
    if stage == "align":
        shared = {}  # the tokenizer and the candidates, read once for every method
        return [(align_task(cfg, m, cfg.seed, f"align-{m}", path(cfg, f"policy_{m}.pt")),
                 functools.partial(stage_align, method=m, shared=shared)) for m in method_list(cfg)]
    prompts = [path(cfg, "data", f) for f in ("eval_prompts.jsonl", "ood_prompts.jsonl") if os.path.exists(path(cfg, "data", f))]
    inputs = prompts + [path(cfg, "tokenizer.json"), path(cfg, "rm.pt")] + list(eval_policies(cfg).values())
    outputs = [path(cfg, "results.json"), path(cfg, "results.md"), path(cfg, "frontier.png")]
    return [(Task("eval", "eval", inputs, outputs), stage_eval)]


def align_task(cfg, method, seed, name, file, candidates=None):
    """Training one policy: what it depends on, for the stage records. candidates: the scored
    candidates it learns from (default the sample stage's; experiments bring others)."""
    inputs = [candidates or path(cfg, "candidates.jsonl"), path(cfg, "tokenizer.json"), path(cfg, "sft.pt")]
    if vcb.METHODS[method].online:  # the online methods sample their own responses: the prompts and the RM too
        inputs += [path(cfg, "data", "align_prompts.jsonl"), path(cfg, "rm.pt")]
    return Task(name, "align", inputs, [file], extra={"method": method, "align_seed": seed})


def run_stage(cfg, env, stage):
    """Every task of a stage that is not up to date, each recorded when done."""
    for task, run in stage_tasks(cfg, stage):
        records.run(cfg, env, task, lambda: run(cfg, env, task))


def main(argv, then=None, doc=__doc__, check=None):
    """The stages (--stage, default all), each task skipped when up to date, then `then(cfg, env)` if
    given (the experiments); check(cfg): what `then` needs of the options, checked before anything
    runs. The run holds --out_dir until it ends: a second run into it is refused (machinery/processes.py)."""
    cfg, env = start(argv, doc, check)
    if cfg.plan:  # every file and option checked, the stages estimated; nothing runs (tools/plan.py)
        from tools.plan import plan
        return plan(cfg, int(os.environ.get("WORLD_SIZE", "1")), stage_tasks, gpt2_folder(cfg))
    try:
        run_all(cfg, env, then)
    finally:
        processes.release(cfg.out_dir)


def run_all(cfg, env, then):
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
    close(env)


if __name__ == "__main__":
    command(main)
