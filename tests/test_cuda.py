"""The fast path of one GPU (docs/gpu.md, "One GPU"), on each device where it exists: bfloat16 and
float16 autocast, float32 log-probs under autocast, the flash-attention path, the packed path,
AdamW's fused kernel, GradScaler, torch.compile (with a bounded number of compilations). A test
takes its device as a parameter; the `cuda` ones are marked `cuda` and skip where PyTorch sees no GPU.
tools/gpu_check.py runs this file first: python -m pytest -m cuda tests/test_cuda.py (on a CPU: -m "not cuda")."""
import os

import pytest
import torch
import torch.nn.functional as F

import packing
import ppo
import train
import vcb
from conftest import TINY, run_train, sharp_gpt
from machinery import config, runtime
from model import GPT, GPTConfig


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]


def small_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(block_size=128, vocab_size=257, n_layer=2, n_head=4, n_embd=128), **kw}))


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_logits_are_close_to_float32(device):
    model = small_gpt().to(device).eval()
    idx = torch.randint(257, (4, 64), device=device)
    with torch.no_grad():
        full = model.logits(model(idx))
        with torch.autocast(device, dtype=torch.bfloat16):
            half = model.logits(model(idx))
    assert (half - full).abs().max() <= 0.02 * full.abs().max() + 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_log_probs_under_autocast_are_float32_from_the_final_hidden_state(device, dtype):
    """Every log-prob that enters a loss, a ratio or a KL is computed in float32 from the final hidden
    state, whatever the autocast dtype: the LM head's logits are not rounded to 16 bits."""
    model = sharp_gpt(3, block_size=64, reward_head=True).to(device)
    p = packing.pack([([256, 3, 4, 5], [[7, 8, 256], [9, 256]]), ([256, 6], [[13, 256]])], 64).to(device)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        hidden = packing.packed_hidden(model, p)
        logps = packing.Reader(model)(p)
        scores = model.score(hidden)
    assert logps.dtype == torch.float32 and scores.dtype == torch.float32
    want = -F.cross_entropy(hidden.index_select(0, p.cols).float() @ model.lm_head.weight.float().t(), p.targets,
                            reduction="none")
    torch.testing.assert_close(logps, want, atol=1e-5, rtol=1e-5)  # a 16-bit head is off by ~1e-2 here


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_sampling_on_cuda_gives_the_cpu_tokens():
    model = small_gpt(1)
    with torch.no_grad():  # weights large enough that the context matters
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
    prompts = [[256, 5, 6, 7], [256, 9], [256, 1, 2, 3, 4, 5]]
    cpu = model.eval().generate(prompts, 20, temperature=0)
    gpu = model.cuda().generate(prompts, 20, temperature=0)  # float32, no autocast: the same arithmetic
    assert gpu == cpu


@pytest.mark.parametrize("device", DEVICES)
def test_the_causal_kernel_equals_the_masked_path(device):
    model = small_gpt(2).to(device).eval()
    idx = torch.randint(257, (3, 50), device=device)
    causal = torch.ones(50, 50, dtype=torch.bool, device=device).tril()[None, None].expand(3, 1, 50, 50)
    pos = torch.arange(50, device=device)[None].expand(3, 50)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        flash = model.lm_head(model(idx)).float()                                   # is_causal: flash attention
        masked = model.lm_head(model(idx, pos=pos, attn_mask=causal)).float()       # an explicit mask: another kernel
    torch.testing.assert_close(flash, masked, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_the_packed_path_equals_the_padded_path(device):
    model = small_gpt(3).to(device).eval()
    groups = [([256, 3, 4, 5], [[7, 8, 256], [9, 256], [10, 11, 12, 256]]), ([256, 6], [[13, 256], [14, 15, 256]])]
    reader = packing.Reader(model)
    with torch.no_grad():
        packed = packing.response_logps(reader, packing.pack(groups, 128).to(device))
        padded = packing.response_logps(reader, packing.pad(groups, 128).to(device))
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_adamw_step_equals_the_unfused_one(device):
    a, b = small_gpt(4).to(device), small_gpt(4).to(device)
    opt_a = a.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device)  # fused on CUDA and the CPU
    assert opt_a.defaults.get("fused")
    groups = [{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt_b = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), foreach=False)  # one tensor at a time
    idx = torch.randint(257, (4, 33), device=device)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            loss = -model.logps(model(idx[:, :-1]), idx[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_training_goes_through_the_gradient_scaler(device, tiny_copy):
    """PPO and RLOO under float16 autocast scale their loss (GradScaler), as SFT and alignment do."""
    cfg = config.parse_args([f"--out_dir={tiny_copy}", *TINY, f"--device={device}", "--dtype=float16", "--methods=rloo",
                             "--online_iters=2"])
    env = runtime.setup(cfg)
    enc = train.tokenizer(cfg)
    task = train.align_task(cfg, "rloo", 0, "align-rloo", str(tiny_copy / "policy_rloo.pt"))
    policy, _ = ppo.train(cfg, env, enc, "rloo", 0, task, train.candidates(cfg, env, enc))
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert ppo.setup(cfg, env, enc, vcb.METHODS["rloo"], 0, train.candidates(cfg, env, enc)).scaler.is_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_training_step_runs_and_learns(tmp_path, device):
    assert run_train(tmp_path / "out", "--stage=data").returncode == 0
    proc = run_train(tmp_path / "out", "--stage=sft", "--compile=true", f"--device={device}", "--sft_steps=8",
                     env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.rsplit("loss ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("sft step")]
    assert len(losses) >= 2 and losses[-1] < losses[0]


@pytest.mark.slow
def test_compilation_is_bounded_whatever_the_lengths_and_tasks(tiny_run, tmp_path, monkeypatch):
    """--compile=true compiles one graph per way of reading a batch (log-probs, the reward, a
    critic's values), not one per shape or per task: every stage of a run (SFT, the reward model,
    offline and online policies, batches of every length) fits well within dynamo's cache, so nothing
    silently falls back to eager, and a second run in the same process compiles nothing new. Counted
    with a backend that counts the graphs and runs them as they are."""
    import shutil

    from torch._dynamo.testing import CompileCounter

    from conftest import run
    counter = CompileCounter()
    monkeypatch.setattr(runtime, "COMPILE", {**runtime.COMPILE, "backend": counter})  # the project's options, counted
    torch._dynamo.reset()
    for k, steps in enumerate((3, 7)):
        out = tmp_path / f"out{k}"
        shutil.copytree(tiny_run[0] / "data", out / "data")
        shutil.copy(tiny_run[0] / "tokenizer.json", out / "tokenizer.json")
        run(out, "--compile=true", "--methods=vcb,dpo,rrhf,ppo,rloo", f"--sft_steps={steps}", f"--align_steps={steps}")
        if k == 0:
            first = counter.frame_count
    assert 0 < first <= 3 < torch._dynamo.config.recompile_limit, first  # log-probs, reward, value; past the limit: eager
    assert counter.frame_count == first  # other steps, other batches, new models: nothing compiled again
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sdpa_has_a_flash_kernel_for_training_shapes():
    q = torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot run this
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
