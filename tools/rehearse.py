"""
tools/rehearse.py: the GPT-2 user's path, end to end, at GPT-2-small's size, with nothing downloaded.

    python -m tools.rehearse                            # on a GPU: bfloat16 autocast, --compile=true
    python -m tools.rehearse --device=cpu --out=reh     # the same on a CPU (docs/gpu.md says how long it takes)

What a user does after python -m tools.prepare gpt2 hh, each step run as that user runs it, on
stand-ins of the fetched files written in --out in the very layout the fetch command writes:
  1. hh-rlhf/helpful-base/train.jsonl.gz and test.jsonl.gz in HH-RLHF's published format ("\\n\\nHuman:
     ...\\n\\nAssistant: ..." transcripts), made from the built-in task's reviews;
  2. gpt2/vocab.bpe and encoder.json, a BPE trained on that text written in GPT-2's format (GPT-2's
     own files are not here offline), and gpt2/model.safetensors + config.json, a GPT-2-small-shaped
     checkpoint (12 layers x 768, 12 heads, 1024 positions; the tokenizer's vocabulary; random weights);
  3. python train.py --preset=presets/gpt2-hh.json --plan, from --out, so that the preset's own paths
     find the files;
  4. every stage with the preset, a few steps each, methods vcb and dpo, under the dtype and --compile
     of the options;
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
FEW = ["--n_sft=256", "--n_prefs=128", "--n_align=8", "--n_eval=4", "--max_new_tokens=16", "--grad_accum=1",
       "--warmup_steps=1", "--sft_batch=8", "--rm_batch=8", "--align_batch=4", "--n_candidates=4", "--sample_batch=8",
       "--eval_samples=1", "--eval_batch=16", "--log_interval=1", "--ckpt_interval=1000", "--methods=vcb,dpo"]


@dataclass
class RehearseConfig:
    out: str = "rehearsal"           # folder for the data, the checkpoint, the run and rehearsal.md
    device: str = "auto"             # auto, cpu, cuda, cuda:N
    dtype: str = "bfloat16"          # autocast dtype of every stage
    compile: bool = True             # --compile of every stage
    steps: int = 2                   # optimizer steps of SFT, the reward model and each policy


def write_hh(folder, n=300):
    """The built-in task's reviews as HH-RLHF transcripts: the chosen and the rejected response of a
    preference pair after the same "Human:" turn; SFT reads the chosen ones. Returns their text."""
    make_folder(folder)
    prefs = reviews.builtin_task(seed=0, n_sft=0, n_prefs=n, n_align=0, n_eval=0, n_ood=0)["prefs"]
    for split, part in (("train", prefs[:n - 40]), ("test", prefs[n - 40:])):
        lines = [json.dumps({"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['chosen']}",
                             "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['rejected']}"}) for r in part]
        with atomic_path(os.path.join(folder, f"{split}.jsonl.gz")) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return "\n".join(f"{r['prompt']}{r['chosen']}" for r in prefs)


def write_gpt2(folder, text, vocab_size=8192):
    """GPT-2's four files as python -m tools.prepare gpt2 writes them: a BPE trained on text in GPT-2's
    tokenizer format, and random weights of GPT-2-small's shape with that vocabulary."""
    enc = data.train_bpe(text, vocab_size)
    data.write_gpt2_files(enc, folder)
    torch.manual_seed(0)
    gpt2.save_pretrained(GPT(GPTConfig(block_size=1024, vocab_size=enc.n_vocab, n_layer=12, n_head=12, n_embd=768)), folder)


def main(argv):
    opts = parse_options(RehearseConfig(), argv, __doc__)
    out, log, text = os.path.abspath(opts.out), [], []
    run_dir = os.path.join(out, "out-hh")  # the preset's out_dir, below --out where the files are
    options = ["--preset=" + os.path.join(ROOT, "presets", "gpt2-hh.json"), f"--device={opts.device}", f"--dtype={opts.dtype}",
               f"--compile={opts.compile}", f"--sft_steps={opts.steps}", f"--rm_steps={opts.steps}",
               f"--align_steps={opts.steps}", *FEW]

    def step(name, fn):
        t0 = time.time()
        print(f"==> {name}", flush=True)
        fn()
        log.append((name, time.time() - t0))

    def train(*args):  # from --out, as a user runs it from the folder the fetch command filled
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *options, *args], cwd=out)
        if proc.returncode:
            raise ConfigError(f"train.py {' '.join(args)} failed (exit status {proc.returncode}); its output is above")

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

    step("HH-RLHF files (hh-rlhf/helpful-base)", lambda: text.append(write_hh(os.path.join(out, "hh-rlhf", "helpful-base"))))
    step("GPT-2 files (gpt2/: tokenizer, GPT-2-small-shaped checkpoint)", lambda: write_gpt2(os.path.join(out, "gpt2"), text[0]))
    step("plan", lambda: train("--plan"))
    step("data, sft, rm, sample, align (vcb, dpo), eval", train)
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
