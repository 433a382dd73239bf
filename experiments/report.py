"""
experiments/report.py: from the metrics of scored policies (evaluate.metrics) to the tables and
figures of train.py's eval stage and of the experiments: results tables, the reward/KL plots, the
training curves, means over seeds with their 95% intervals and the verdicts of paired differences.
No models here: plain Python on lists of dicts, and matplotlib for the figures. Run alone, it copies
the tables and figures a run wrote into the documentation:

    python -m experiments.report --out_dir=out   # every `<!-- from FILE -->` block of README.md and docs/*.md
"""
import glob
import math
import os
import re
import shutil
import textwrap
from dataclasses import dataclass

from evaluate import mean, reward_key
from machinery import records
from machinery.files import atomic_path, write_text
from vcb import METHODS


COLORS = {"sft": "black", **{name: m.color for name, m in METHODS.items()}}  # SFT, then each method's own


def label(name):
    """A policy's name in figures: the method's label (vcb.METHODS), or SFT's."""
    return METHODS[name].label if name in METHODS else name.upper()


def beta_label(name, beta):
    """The beta column of a table: '-' for SFT and the methods without one (RRHF)."""
    return f"{beta:g}" if name in METHODS and METHODS[name].beta and beta is not None else "-"


def spread(values):
    """(mean, population std) of values, or None when there are none: a cell's spread over seeds."""
    if not values:
        return None
    m = mean(values)
    return (m, math.sqrt(mean([(v - m) ** 2 for v in values])))


def pearson(a, b):
    ma, mb = mean(a), mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    norm = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return cov / norm if norm > 0 else float("nan")


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (tuple, list)):  # (mean, std) over seeds
        return f"{v[0]:.3f} ± {v[1]:.3f}"
    return f"{v:.3f}"


def results_table(results, judge):
    """results {method: {beta label: {"eval": metrics, "ood": metrics}}} -> a markdown table."""
    has_ood = any("ood" in r for by_beta in results.values() for r in by_beta.values())
    head = ["method", "beta", f"{judge} reward", "RM reward", "KL(pi||sft)", "win vs SFT", "win vs DPO", "distinct-2"]
    head += [f"OOD {judge} reward", "OOD win vs SFT", "OOD win vs DPO"] if has_ood else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reward = reward_key(judge)
    for method, by_beta in results.items():
        for beta, r in by_beta.items():
            e, o = r["eval"], r.get("ood", {})
            cells = [method, beta, fmt(e[reward]), fmt(e["rm_reward"]), fmt(e["kl"]), fmt(e["win_rate_vs_sft"]),
                     fmt(e["win_rate_vs_dpo"]), fmt(e["distinct_2"])]
            if has_ood:
                cells += [fmt(o.get(reward)), fmt(o.get("win_rate_vs_sft")), fmt(o.get("win_rate_vs_dpo"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on its file-only backend, imported when a figure is drawn (nothing else needs it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, file, dpi=120):
    """The figure as a PNG, written whole or not at all (files.atomic_path)."""
    with atomic_path(file) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_frontier(points, file, title, judge):
    """Reward (gold, or the RM's without a gold one) against KL(pi || pi_sft), one colour per method,
    like the paper's reward/KL figure. points: dicts of method, beta, kl, reward and optional
    kl_std, reward_std (error bars over seeds); a method with several betas is drawn as a curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    variants = list(dict.fromkeys(m.partition(" ")[2] for m in (p["method"] for p in points) if " " in m))
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        base, _, variant = method.partition(" ")  # "vcb (gold)": VCB's colour, the variant's line style
        style = ["-", "--", ":", "-."][variants.index(variant) % 4] if variant else "-"
        ax.errorbar([p["kl"] for p in pts], [p["reward"] for p in pts], xerr=[p.get("kl_std", 0) for p in pts],
                    yerr=[p.get("reward_std", 0) for p in pts], marker="o", capsize=3, color=COLORS.get(base),
                    label=label(base) + (f" {variant}" if variant else ""), linestyle=style if len(pts) > 1 else "none")
        for p in pts:
            if p.get("beta") is not None and len(pts) > 1:
                ax.annotate(f"{p['beta']:g}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(pi || pi_sft), nats per response")
    ax.set_ylabel(f"{'gold' if judge == 'gold' else 'reward-model'} reward (held-out prompts)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, file)


# -----------------------------------------------------------------------------
# training curves: curves.png from curves.jsonl (machinery/records.py), one line per step of every training task

def plot_curves(file, png):
    """One panel per metric (loss, lr, margin, acc, gap_corr, ...), one line per training task,
    coloured and labelled by its method (a sweep's seeds and betas share their method's colour).
    Does nothing when there is no curves file or the figure is newer than it."""
    if not os.path.exists(file):
        return
    if os.path.exists(png) and os.path.getmtime(png) >= os.path.getmtime(file):
        return  # nothing new since the last drawing
    recorded = records.read_curves(file)
    if not recorded:
        return
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in recorded))
    metrics = [k for k in dict.fromkeys(["loss", "lr"] + [k for r in recorded for k in r]) if k not in ("task", "step")]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        labelled = set()
        for task in tasks:
            pts = [(r["step"], r[metric]) for r in recorded if r["task"] == task and r.get(metric) is not None]
            method = task.split("-")[1] if "-" in task else task  # align-vcb, sweep-vcb-beta1-seed0 -> vcb
            if pts:
                ax.plot(*zip(*pts), label=None if method in labelled else method, color=COLORS.get(method),
                        linewidth=1, alpha=0.8)
                labelled.add(method)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(plt, fig, png, dpi=110)


# -----------------------------------------------------------------------------
# over seeds: means with their 95% intervals, and what an interval of a difference says

T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df):
    """Student's t quantile for a two-sided 95% interval with df degrees of freedom: the usual table up
    to 30, then the Cornish-Fisher expansion around the normal's 1.96 (within 1e-3 beyond)."""
    if df <= len(T95):
        return T95[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values):
    """The mean of values over seeds with its 95% t-interval (sample standard deviation, n - 1 degrees
    of freedom): {"mean", "lo", "hi", "n"}; with one value there is no interval (lo, hi None)."""
    n = len(values)
    if not n:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m = mean(values)
    if n == 1:
        return {"mean": m, "lo": None, "hi": None, "n": 1}
    half = t95(n - 1) * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def ci(d, signed=False):
    """An interval as a table shows it: 0.706 [0.690, 0.722] (signed: +0.012 [-0.010, +0.034])."""
    if not d or d["mean"] is None:
        return "-"
    f = (lambda x: f"{x:+.3f}") if signed else (lambda x: f"{x:.3f}")  # noqa: E731
    return f(d["mean"]) + (f" [{f(d['lo'])}, {f(d['hi'])}]" if d["lo"] is not None else " (one seed)")


def verdict(d):
    """What the 95% interval of a paired difference says: ahead (above 0), behind (below 0), or level
    (it holds 0); '-' without an interval."""
    if not d or d["lo"] is None:
        return "-"
    return "ahead" if d["lo"] > 0 else "behind" if d["hi"] < 0 else "level"


def plot_budgets(rows, file, title, judge):
    """Each method's reward against the KL it was measured at, one point per KL budget (the mean over
    seeds, with the 95% interval of the reward), from the rows of experiments/sweep.summary."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"]))
    for name in dict.fromkeys(r["label"] for r in rows):
        pts = [r for r in rows if r["label"] == name and r["n"]]
        if not pts:
            continue
        base, variant = pts[0]["method"], pts[0]["variant"]
        yerr = [[r["reward"]["mean"] - (r["reward"]["lo"] if r["reward"]["lo"] is not None else r["reward"]["mean"]) for r in pts],
                [(r["reward"]["hi"] if r["reward"]["hi"] is not None else r["reward"]["mean"]) - r["reward"]["mean"] for r in pts]]
        style = ["-", "--", ":", "-."][variants.index(variant) % 4] if variant else "-"
        ax.errorbar([r["kl"] for r in pts], [r["reward"]["mean"] for r in pts], yerr=yerr, marker="o", capsize=3,
                    color=COLORS.get(base), linestyle=style, label=label(base) + (f" {variant}" if variant else ""))
    ax.set_xlabel("KL(pi || pi_sft), nats per response (held-out)")
    ax.set_ylabel(f"{'gold' if judge == 'gold' else 'reward-model'} reward (held-out prompts)")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)  # a long title on two lines, not cut at the edge
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, file)


def plot_steps(table, file, judge, factor):
    """The steps ablation: reward and KL against the fraction of training, a line per method (mean ±
    std over seeds). table {method: {multiple of the usual steps: [runs]}}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, [reward_key(judge), "kl"], [f"{judge} reward", "KL(pi || pi_sft)"]):
        for method, by_frac in table.items():
            xs = sorted(by_frac)
            stats = [spread([r["eval"][key] for r in by_frac[x]]) for x in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        markersize=3, capsize=2, color=COLORS.get(method), label=label(method))
        ax.axvline(1, color="grey", linewidth=0.8, linestyle=":")  # the usual number of steps
        ax.set_xlabel("training, in multiples of the usual steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, file)


# -----------------------------------------------------------------------------
# the documentation's tables and figures are the files the runs wrote, copied in, never retyped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
BLOCK = re.compile(r"(<!-- from (\S+) -->\n)(.*?)(<!-- end -->)", re.S)
IMAGE = re.compile(r"<!-- image (\S+) -->\n!\[[^\]]*\]\(([^)]+)\)")


def sync_docs(out_dir, files=None):
    """In each documentation file, the text between `<!-- from FILE -->` and `<!-- end -->` becomes
    FILE's (a path inside out_dir), and the image after `<!-- image FILE -->` becomes a copy of
    FILE. Files the run has not written are left as they were and listed. Returns (blocks copied,
    missing files)."""
    copied, missing = 0, []
    for doc in files or [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        with open(doc, encoding="utf-8") as f:
            text = f.read()

        def fill(m):
            nonlocal copied
            source = os.path.join(out_dir, m[2])
            if not os.path.isfile(source):
                missing.append(m[2])
                return m[0]
            copied += 1
            with open(source, encoding="utf-8") as f:
                body = f.read()
            return m[1] + "```\n" + body.strip("\n") + "\n```\n" + m[4] if m[2].endswith((".txt", ".log")) else \
                m[1] + body.rstrip() + "\n" + m[4]

        new = BLOCK.sub(fill, text)
        for m in IMAGE.finditer(new):
            source = os.path.join(out_dir, m[1])
            if os.path.isfile(source):
                with atomic_path(os.path.join(os.path.dirname(doc), m[2])) as tmp:  # the image's path is the doc's own
                    shutil.copyfile(source, tmp)
                copied += 1
            else:
                missing.append(m[1])
        if new != text:
            write_text(doc, new)
    return copied, sorted(set(missing))


@dataclass
class SyncConfig:
    out_dir: str = "out"             # the run whose files the documentation quotes


def main(argv):
    from machinery.config import parse_options  # only this command needs the option parser
    opts = parse_options(SyncConfig(), argv, __doc__)
    n, missing = sync_docs(opts.out_dir)
    print(f"copied {n} tables and figures from {opts.out_dir}" +
          (f"; not written yet, left as they were: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    from machinery.runtime import command  # one line and exit status 2 for a bad option or file
    command(main)
