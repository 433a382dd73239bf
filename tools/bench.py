"""
tools/bench.py: how fast the hot paths run on this machine, each comparison made within one run.

    python -m tools.bench                   # the built-in task's GPT; float32 on CPU, bfloat16 autocast on CUDA
    python -m tools.bench --preset=gpt2     # GPT-2-small-sized (124M parameters, 1024 positions)
    python -m tools.bench --compile=true    # the same with torch.compile (CUDA)

It measures
  1. the device's matmul peak (the best of repeated large matmuls), in TFLOP/s;
  2. training tokens/s, and model FLOPs utilisation (MFU) against that measured peak (and on a GPU
     against its datasheet's bfloat16 peak);
  3. sampling tokens/s at 128 new tokens, with and without the KV cache (same greedy tokens);
  4. the two layouts of packing.py (--layout): the attention scores the packed layout computes
     against the plain padded rows, at the built-in task's lengths and the GPT-2 HH preset's; one
     alignment (VCB) step with each layout, in response tokens/s, back to back, and which is faster
     here; and that step per response token against an SFT step as the pipeline runs both (the
     reference log-probs are precomputed, so alignment needs one model: the target is <= 1.2x);
and then prints the estimated peak GPU memory and time per stage of presets/gpt2-hh.json with GPT-2
small (estimates(): train.py --plan prints them for the run at hand).
"""
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import packing
import vcb
from machinery.config import Config, ConfigError, apply_options, method_list, parse_options, read_options
from machinery.runtime import command, setup
from model import GPT, GPTConfig


DEFAULT = GPTConfig()  # the built-in task's model
PRESETS = {  # model shape and the batch of each measurement
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=160, batch=8, seq_len=16, sample_batch=2,
                 prompt_len=4, steps=2, lengths=(2, 6, 1, 8)),  # seconds on a CPU: that every measurement runs (tests)
    "default": dict(n_layer=DEFAULT.n_layer, n_head=DEFAULT.n_head, n_embd=DEFAULT.n_embd, vocab_size=DEFAULT.vocab_size,
                    block_size=DEFAULT.block_size + 128, batch=64, seq_len=DEFAULT.block_size, sample_batch=8, prompt_len=32,
                    steps=6, lengths=(12, 32, 2, 26)),  # room for the 128 tokens the KV-cache measurement samples
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, batch=8, seq_len=1024,
                 sample_batch=16, prompt_len=64, steps=20, lengths=(64, 384, 32, 128)),
}
# lengths: (shortest, longest prompt, shortest, longest response) of the candidates the alignment step
# reads, drawn uniformly: the built-in task's prompts are 12 to 32 tokens and its responses 14 on
# average; the GPT-2 HH preset (docs/gpu.md) has room for 384 prompt and 128 response tokens
# dense bfloat16 tensor-core peaks from the vendors' datasheets, TFLOP/s (matched in the device name, in order)
DATASHEET_BF16 = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("A100", 312), ("L40S", 362),
                  ("L4", 121), ("A10G", 70), ("RTX 4090", 165), ("RTX 3090", 71)]


@dataclass
class BenchConfig:
    preset: str = "default"          # tiny, default (the built-in task's model), gpt2 (GPT-2-small's shape: 12 x 768, 50257 tokens, 1024 positions)
    device: str = "auto"             # auto, cpu, cuda, cuda:N
    dtype: str = "auto"              # auto (bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16, float16
    compile: bool = False            # torch.compile the model for the training measurements (CUDA)
    new_tokens: int = 128            # tokens sampled in the KV-cache measurement
    n_candidates: int = 8            # candidates per prompt in the alignment step
    run: str = ""                    # a run's folder (out): also measure precision with its SFT model and candidates


def parse(argv):
    opts = parse_options(BenchConfig(), argv, __doc__)
    if opts.preset not in PRESETS:
        raise ConfigError(f"--preset={opts.preset}: expected one of {', '.join(PRESETS)}")
    if opts.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype={opts.dtype}: expected auto, float32, bfloat16 or float16")
    return vars(opts)


def datasheet_peak(name):
    """The datasheet's dense bfloat16 peak of a GPU by its name, in FLOP/s, or None."""
    return next((tflops * 1e12 for key, tflops in DATASHEET_BF16 if key in name), None)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def candidate_groups(lengths, G, n, vocab_size, seed):
    """G prompts with n responses each, of random tokens and lengths drawn from lengths (see PRESETS)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    tokens = lambda k: torch.randint(vocab_size - 1, (k,), generator=g).tolist()  # noqa: E731
    p_lo, p_hi, r_lo, r_hi = lengths
    return [(tokens(draw(p_lo, p_hi)), [tokens(draw(r_lo, r_hi)) for _ in range(n)]) for _ in range(G)]


def attention_scores(groups):
    """Query-key scores per head and layer of a batch: (the plain padded rows compute, the packed
    layout computes, the layout needs). The padded rows are each prompt with one response, padded to
    the longest row, every token against every other; packed_attention computes its prompts (padded
    to the longest) and its buckets (responses and their prompts' keys each padded to the bucket's
    longest); what is needed is each token against the tokens it sees."""
    rows, p = packing.pad(groups, 10_000).idx.shape, packing.pack(groups, 10_000)
    needed = sum(P * (P + 1) // 2 for P in p.prompt_lengths.tolist())
    for b in p.buckets:
        needed += sum(R * P + R * (R + 1) // 2 for R, P in zip(b.lengths.tolist(), b.prompt_lengths.tolist()))
    computed = len(p.prompts) * p.prompts.size(1) ** 2 + sum(b.keys.numel() * b.tokens.size(1) for b in p.buckets)
    return rows[0] * rows[1] ** 2, computed, needed


def attention_line(name, lengths, n, G):
    padded, packed, needed = attention_scores(candidate_groups(lengths, G, n, 1000, seed=0))
    return (f"attention at the {name}'s lengths, {G} prompts x {n} candidates: the padded rows compute {padded:,} query-key "
            f"scores per head and layer, the packed layout {packed:,} ({padded / packed:.1f}x fewer; the layout "
            f"needs {needed:,})")


def flops_per_token(model, T):
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B."""
    N, cfg = model.num_params(), model.config
    return 6 * N + 12 * cfg.n_layer * cfg.n_embd * T


def matmul_peak(device, dtype):
    n = 8192 if device.startswith("cuda") else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = min(timed(lambda: [a @ b for _ in range(10)], device, 1) for _ in range(5))
    return 2 * n ** 3 * 10 / best, n


def main(argv):
    opts = parse(argv)
    p = PRESETS[opts["preset"]]
    # the same device, precision and TF32 settings as train.py
    env = setup(SimpleNamespace(device=opts["device"], dtype=opts["dtype"]))
    device, device_type, dtype = env.device, env.device_type, env.dtype
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=p["block_size"], vocab_size=p["vocab_size"], n_layer=p["n_layer"],
                    n_head=p["n_head"], n_embd=p["n_embd"])
    model = GPT(cfg).to(device)
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; compile {opts['compile']}; "
          f"preset {opts['preset']}: {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
          f"{model.num_params() / 1e6:.1f}M parameters")

    peak, n = matmul_peak(device, dtype)
    print(f"matmul peak (measured, {n}x{n} {str(dtype).removeprefix('torch.')}): {peak / 1e12:.2f} TFLOP/s")

    # 2. training throughput and MFU
    optimizer = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device_type)
    runner = torch.compile(model) if opts["compile"] else model
    B, T = p["batch"], p["seq_len"]
    x = torch.randint(cfg.vocab_size, (B, T + 1), device=device)

    def train_step():
        with env.autocast():
            loss = -model.logps(runner(x[:, :-1]), x[:, 1:]).mean()  # next-token NLL, float32 head
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dt = timed(train_step, device, p["steps"])
    tokens_per_s = B * T / dt
    flops = flops_per_token(model, T) * tokens_per_s
    sheet = datasheet_peak(name) if device_type == "cuda" and dtype == torch.bfloat16 else None
    print(f"train: {tokens_per_s:,.0f} tokens/s (batch {B} x {T}), MFU {100 * flops / peak:.1f}% of the measured peak"
          + (f", {100 * flops / sheet:.1f}% of the datasheet's {sheet / 1e12:.0f} TFLOP/s" if sheet else ""))

    # 3. sampling with and without the KV cache
    model.eval()
    prompts = torch.randint(cfg.vocab_size, (p["sample_batch"], p["prompt_len"])).tolist()
    new = opts["new_tokens"]
    outs, speed = {}, {}
    for use_cache in (True, False):
        def sample():
            with env.autocast():
                outs[use_cache] = model.generate(prompts, new, temperature=0, use_cache=use_cache)
        speed[use_cache] = len(prompts) * new / timed(sample, device, 1 if not use_cache else 3)
    same = "same tokens" if outs[True] == outs[False] else "DIFFERENT tokens (check the cache)"
    print(f"sample {new} new tokens, batch {len(prompts)}: KV cache {speed[True]:,.0f} tokens/s, recomputing "
          f"the prefix {speed[False]:,.0f} tokens/s: {speed[True] / speed[False]:.1f}x ({same}; target >= 5x)")

    # 4. the packed layout and an alignment step, on candidates with the lengths of the preset's task
    print(attention_line("built-in task", PRESETS["default"]["lengths"], 8, 8))
    print(attention_line("GPT-2 HH preset", PRESETS["gpt2"]["lengths"], 8, 2))
    model.train()
    reader = packing.Reader(model)
    n, G = opts["n_candidates"], max(1, B // opts["n_candidates"])
    groups = candidate_groups(p["lengths"], G, n, cfg.vocab_size, seed=0)
    batches = {layout: packing.batch_of(groups, cfg.block_size, layout).to(device) for layout in ("packed", "padded")}
    demos = packing.pack(candidate_groups(p["lengths"], G * n, 1, cfg.vocab_size, seed=1), cfg.block_size).to(device)
    ref, rewards = torch.randn(G, n, device=device) - 50, torch.randn(G, n, device=device)

    def vcb_step(layout):
        with env.autocast():
            logps = packing.response_logps(reader, batches[layout])
        loss = vcb.vcb_loss(logps.view(G, n), ref, rewards, beta=1.0, lam=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sft_step():  # as the pipeline runs it: each demonstration a prompt with one response, packed
        with env.autocast():
            loss = -reader(demos).sum() / len(demos.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {"packed": [], "padded": [], "sft": []}
    for _ in range(max(3, p["steps"] // 2)):  # interleaved, so all see the same machine load
        for name, fn in (("packed", lambda: vcb_step("packed")), ("padded", lambda: vcb_step("padded")), ("sft", sft_step)):
            times[name].append(timed(fn, device, 1))
    n_tokens = len(batches["packed"].targets)
    per_token = {k: statistics.median(v) / (n_tokens if k != "sft" else len(demos.targets)) for k, v in times.items()}
    faster = min(("packed", "padded"), key=per_token.get)
    print(f"align (VCB) step, {G} prompts x {n} candidates ({n_tokens} response tokens): "
          f"{1 / per_token['packed']:,.0f} response tokens/s with the packed layout, {1 / per_token['padded']:,.0f} "
          f"with the padded rows ({per_token['padded'] / per_token['packed']:.2f}x): faster here: --layout={faster} "
          f"(the default is packed); per response token {per_token['packed'] / per_token['sft']:.2f}x an SFT step "
          f"(target <= 1.2x)")
    if opts["run"]:
        print(precision(opts["run"], env))
    preset_estimates(peak if device_type == "cuda" else None)


# ---- precision: what the autocast dtype does to the log-probs of a run's SFT model

def precision(out_dir, env, n_prompts=64):
    """How far from 0 two quantities are that are 0 in exact arithmetic, under env's autocast, with
    the run's SFT model: delta = logp_pi - logp_sft at step 0 (the policy is the SFT model), the
    reference log-probs scored as the sample stage scores them (chunks of eval_batch sequences) and
    the policy's as the align step does (micro-batches of align_batch prompts); and KL(pi || pi)
    estimated as the evaluation does (the sampler's log-probs of pi's own samples against the
    scorer's)."""
    import data
    import evaluate
    from machinery.config import run_config
    from machinery.runtime import load_model
    cfg = dataclasses.replace(run_config(out_dir), device=env.device)
    enc = data.load_tokenizer(os.path.join(out_dir, "tokenizer.json"))
    model = load_model(os.path.join(out_dir, "sft.pt"), env, enc, cfg).eval()
    groups = data.read_candidates(os.path.join(out_dir, "candidates.jsonl"), enc).groups[:n_prompts]
    reader = packing.Reader(model)
    with torch.no_grad():
        ref = torch.tensor(evaluate.score_logps(cfg, env, model, groups))
        policy = []
        for i in range(0, len(groups), cfg.align_batch):
            with env.autocast():
                batch = packing.batch_of(groups[i:i + cfg.align_batch], cfg.block_size, cfg.layout).to(env.device)
                policy += packing.response_logps(reader, batch).tolist()
        delta = (torch.tensor(policy) - ref).abs()
        prompts = [g[0] for g in groups[:16]]  # <|endoftext|> + prompt, as the candidates were sampled
        with env.autocast():
            outs, sampled = model.generate(prompts, cfg.max_new_tokens, stop_token=enc.eot_token, num_samples=4,
                                           generator=torch.Generator(env.device).manual_seed(0), return_logps=True)
        scored = evaluate.score_logps(cfg, env, model, [(prompts[i], outs[4 * i:4 * i + 4]) for i in range(len(prompts))])
        kl = torch.tensor(sampled) - torch.tensor(scored)
    return (f"precision ({str(env.dtype).removeprefix('torch.')}, {out_dir}/sft.pt): |delta| at step 0 max {delta.max():.2e}, "
            f"mean {delta.mean():.2e} over {len(delta)} candidates; KL(pi||pi) from pi's own samples {kl.mean():.2e} "
            f"(largest |logp_sampler - logp_scorer| {kl.abs().max():.2e}, {len(kl)} samples)")


# ---- estimates for a real run: what `python train.py --plan` prints for the run at hand, and this
# command for presets/gpt2-hh.json with GPT-2 small

PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets", "gpt2-hh.json")
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)


def estimates(cfg, shape, world=1, peak=989e12, mfu=0.4, bandwidth=3.35e12):
    """[(stage, micro-batch, peak GPU memory in bytes, seconds)] of a run with the options cfg (a
    Config) and the model shape (a GPTConfig) on `world` GPUs. Memory from parameter, optimizer and
    activation sizes, time from FLOPs at an assumed MFU, or for sampling from memory bandwidth (each new
    token reads the weights and the KV cache). Estimates, not measurements: peak defaults to an H100's
    dense bfloat16 989 TFLOP/s and bandwidth to its 3.35 TB/s; every sequence is counted at block_size
    tokens, the most it can have; Python overhead per token is left out."""
    with torch.device("meta"):
        N = GPT(shape).num_params()
    L, C, V, S, n = shape.n_layer, shape.n_embd, shape.vocab_size, cfg.block_size, cfg.n_candidates
    train_state = 16 * N  # float32 weights and gradients, AdamW's two moments

    def activations(rows):  # bfloat16, flash attention (no T^2 term): ~34 s b h bytes per layer
        # (Korthikanti et al. 2022), plus the logits: bfloat16, a float32 copy and its gradient
        return L * 34 * S * rows * C + rows * S * V * (2 + 4 + 4)

    kv = lambda rows: 2 * L * rows * S * C * 2  # noqa: E731  bfloat16 keys and values
    train = lambda seqs: 6 * N * seqs * S / (mfu * peak)  # noqa: E731

    def decode(seqs, batch):  # each new token reads the bfloat16 weights and half a full KV cache on average
        step = max((2 * N + kv(batch) / 2) / bandwidth, 2 * N * batch / (mfu * peak))
        return seqs / batch * cfg.max_new_tokens * step

    split, methods = world * cfg.grad_accum, method_list(cfg)
    n_align, n_eval = cfg.n_align or 1000, cfg.n_eval or 1000  # 0 (all): counted as 1,000
    sft, rm, align, sample = cfg.sft_batch // split, 2 * cfg.rm_batch // split, cfg.align_batch * n // split, cfg.sample_batch * n
    rows = [("sft", f"{sft} x {S} tokens", train_state + activations(sft), train(cfg.sft_steps * cfg.sft_batch) / world),
            ("rm", f"{rm} x {S} tokens", train_state + activations(rm), train(cfg.rm_steps * cfg.rm_batch * 2) / world),
            ("sample", f"{sample} rows, KV cache", 4 * N + kv(sample) + sample * V * 4,
             (decode(n_align * n, sample) + 2 * train(n_align * n) / 3) / world)]  # then the SFT and RM scores
    offline = [m for m in methods if not vcb.METHODS[m].online]
    if offline:
        rows.append((f"align: {', '.join(offline)}", f"{align} x {S} tokens", train_state + activations(align),
                     len(offline) * train(cfg.align_steps * cfg.align_batch * n) / world))
    for m in (m for m in methods if vcb.METHODS[m].online):  # one process: policy, reference, RM, PPO's critic
        critic, R = vcb.METHODS[m].critic, cfg.online_prompts * cfg.online_k
        mb = R // cfg.ppo_minibatches if critic else R
        iteration = decode(R, R) + (4 if critic else 3) / 3 * train(R) + (2 * cfg.ppo_epochs if critic else 1) * train(R)
        rows.append((f"align: {m}", f"{mb} x {S} tokens, {R} rollouts", (2 if critic else 1) * train_state + 8 * N +
                     max((2 if critic else 1) * activations(mb), kv(R)), cfg.online_iters * iteration))
    rows.append(("eval", f"{cfg.eval_batch} rows, 3 models", 3 * 4 * N + kv(cfg.eval_batch) + cfg.eval_batch * V * 4,
                 (1 + len(methods)) * cfg.eval_samples * (decode(n_eval, cfg.eval_batch) + train(n_eval) / 2) / world))
    return rows


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def print_estimates(rows, what, peak=989e12, mfu=0.4):
    """estimates() as a table, with the whole run's peak memory and time; marked as estimates."""
    print(f"\nestimated (not measured) for {what}, at {100 * mfu:.0f}% MFU of {peak / 1e12:.0f} TFLOP/s per GPU:")
    print("| stage | micro-batch | peak GPU memory | time |\n|---|---|---|---|")
    for stage, batch, memory, seconds in rows:
        print(f"| {stage} | {batch} | {memory / 2 ** 30:.1f} GiB | {duration(seconds)} |")
    print(f"| all | | {max(r[2] for r in rows) / 2 ** 30:.1f} GiB | {duration(sum(r[3] for r in rows))} |")


def preset_estimates(peak=None):
    """The estimates of presets/gpt2-hh.json with GPT-2 small's shape."""
    cfg = apply_options(Config(), read_options(PRESET), PRESET)
    shape = GPTConfig(block_size=cfg.block_size, **GPT2_SMALL)
    print_estimates(estimates(cfg, shape, peak=peak or 989e12), "presets/gpt2-hh.json with GPT-2 small", peak=peak or 989e12)


if __name__ == "__main__":
    command(main)
