"""
tools/rehearse.py: the GPT-2 user's path, end to end, at GPT-2-small's size, with nothing downloaded.

    python -m tools.rehearse                            # on a GPU: bfloat16 autocast, --compile=true
    python -m tools.rehearse --device=cpu --out=reh     # the same on a CPU (docs/gpu.md says how long it takes)

What a user with GPT-2 weights and Anthropic HH does, each step run as that user runs it:
  1. HH-RLHF files in their published format (train.jsonl.gz, test.jsonl.gz of "\\n\\nHuman: ...
     \\n\\nAssistant: ..." transcripts), made from the built-in task's reviews;
  2. the data stage with presets/gpt2-hh.json; the tokenizer is this project's BPE (GPT-2's own
     needs tiktoken's cache, which an offline machine does not have);
  3. a GPT-2-small-shaped checkpoint (12 layers x 768, 12 heads, 1024 positions; the tokenizer's
     vocabulary; random weights) in the model.safetensors + config.json layout, as if downloaded;
  4. every stage from it with the preset, a few steps each, methods vcb and dpo, under the dtype and
     --compile of the options;
  5. python -m tools.gpt2 export of the VCB policy, read back by gpt2.from_pretrained: the same logits.
Each step's time and the peak memory of the processes go into rehearsal.md in --out.
"""
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import data
from machinery.config import ConfigError, parse_options
from machinery.files import atomic_path, make_folder, write_text
from machinery.runtime import command, load_checkpoint
from model import GPT, GPTConfig
from tasks import reviews
from tools import gpt2


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
FEW = ["--n_sft=256", "--n_prefs=128", "--n_align=8", "--n_eval=4", "--vocab_size=8192", "--max_new_tokens=16",
       "--grad_accum=1", "--warmup_steps=1", "--sft_batch=8", "--rm_batch=8", "--align_batch=4", "--n_candidates=4",
       "--sample_batch=8", "--eval_samples=1", "--eval_batch=16", "--log_interval=1", "--ckpt_interval=1000",
       "--methods=vcb,dpo"]


@dataclass
class RehearseConfig:
    out: str = "rehearsal"           # folder for the data, the checkpoint, the run and rehearsal.md
    device: str = "auto"             # auto, cpu, cuda, cuda:N
    dtype: str = "bfloat16"          # autocast dtype of every stage
    compile: bool = True             # --compile of every stage
    steps: int = 2                   # optimizer steps of SFT, the reward model and each policy


def write_hh(folder, n=300):
    """The built-in task's reviews as HH-RLHF transcripts: the chosen and the rejected response of a
    preference pair after the same "Human:" turn; SFT reads the chosen ones."""
    make_folder(folder)
    prefs = reviews.builtin_task(seed=0, n_sft=0, n_prefs=n, n_align=0, n_eval=0, n_ood=0)["prefs"]
    for split, part in (("train", prefs[:n - 40]), ("test", prefs[n - 40:])):
        lines = [json.dumps({"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['chosen']}",
                             "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['rejected']}"}) for r in part]
        with atomic_path(os.path.join(folder, f"{split}.jsonl.gz")) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def main(argv):
    opts = parse_options(RehearseConfig(), argv, __doc__)
    out, log = os.path.abspath(opts.out), []
    run_dir, weights = os.path.join(out, "run"), os.path.join(out, "gpt2-small")
    options = ["--preset=" + os.path.join(ROOT, "presets", "gpt2-hh.json"), f"--out_dir={run_dir}",
               f"--data_dir={os.path.join(out, 'hh')}", "--tokenizer=bpe", f"--device={opts.device}", f"--dtype={opts.dtype}",
               f"--compile={opts.compile}", f"--sft_steps={opts.steps}", f"--rm_steps={opts.steps}",
               f"--align_steps={opts.steps}", *FEW]

    def step(name, fn):
        t0 = time.time()
        print(f"==> {name}", flush=True)
        fn()
        log.append((name, time.time() - t0))

    def train(*args):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *options, *args], cwd=ROOT)
        if proc.returncode:
            raise ConfigError(f"train.py {' '.join(args)} failed (exit status {proc.returncode}); its output is above")

    def checkpoint():  # random weights of GPT-2-small's shape and the tokenizer's vocabulary, as a download would be
        torch.manual_seed(0)
        vocab = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json")).n_vocab
        gpt2.save_pretrained(GPT(GPTConfig(block_size=1024, vocab_size=vocab, n_layer=12, n_head=12, n_embd=768)), weights)

    def export():
        proc = subprocess.run([sys.executable, "-m", "tools.gpt2", "export",
                               os.path.join(run_dir, "policy_vcb.pt"), os.path.join(out, "vcb-gpt2")], cwd=ROOT)
        if proc.returncode:
            raise ConfigError(f"python -m tools.gpt2 export failed (exit status {proc.returncode})")
        ck = load_checkpoint(os.path.join(run_dir, "policy_vcb.pt"))
        ours = GPT(GPTConfig(**ck["model_args"]))
        ours.load_state_dict(ck["model"])
        back = gpt2.from_pretrained(os.path.join(out, "vcb-gpt2", "model.safetensors"))
        idx = torch.randint(ours.config.vocab_size, (2, 32))
        with torch.no_grad():
            diff = (ours.logits(ours.eval()(idx)) - back.logits(back.eval()(idx))).abs().max().item()
        if diff > 1e-4:
            raise ConfigError(f"the exported policy's logits differ from the policy's by {diff:.2e}")
        log.append(("exported logits against the policy's (max |difference|)", diff))

    step("HH-RLHF files", lambda: write_hh(os.path.join(out, "hh")))
    step("data stage (tokenizer, files)", lambda: train("--stage=data"))
    step("GPT-2-small-shaped checkpoint", checkpoint)
    step("sft, rm, sample, align (vcb, dpo), eval", lambda: train(f"--init_from={os.path.join(weights, 'model.safetensors')}"))
    step("export and read back", export)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB (Linux reports KiB)
    device = torch.cuda.get_device_name() if opts.device != "cpu" and torch.cuda.is_available() else "CPU"
    lines = [f"# rehearsal on {device}", "", f"`python -m tools.rehearse {' '.join(argv)}`: dtype {opts.dtype}, compile "
             f"{opts.compile}, {opts.steps} steps of each training stage", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {v:.3g} |" if "difference" in name else f"| {name} | {v:.1f} |" for name, v in log]
    lines += ["", f"Peak memory of a stage's process (RSS): {peak:.2f} GiB" +
              ("; peak GPU memory is in the run's log (stage times)" if device != "CPU" else "")]
    write_text(os.path.join(out, "rehearsal.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    command(main)
