"""Pool the imagination experiment over seeds: paired differences between arms, with t intervals over seeds.

One seed of `scripts/eval_imagination.py` measures which runs happened to learn: at the same arm and budget a
run of the motion task either learns "future" or stalls, and the spread between seeds (tens of points) is far
wider than the Wilson intervals of one run, which count held-out questions, not runs (docs/imagination.md).
This script reads the reports of several seeds (each the `--json` of one `eval_imagination.py --seed S`
invocation) and compares the arms where the seed-to-seed error is counted:

- per arm and budget, the mean accuracy over seeds with its standard deviation, the lowest and highest seed,
  and the range of the held-out majority answer (the baseline);
- per pair of arms (imagined - observed, random_world_model - observed, imagined - random_world_model,
  oracle - imagined, oracle - observed, and the ablations of imagined: imagined_shuffled - observed,
  imagined - imagined_shuffled, imagined - imagined_reversed) and budget, the mean of the per-seed
  differences with a Student t 95 % interval over seeds, and how many seeds put the first arm above, level
  with, or below the second (above or below: the two runs' Wilson intervals apart), and the exact two-sided p
  of a Wilcoxon signed-rank test on the same differences;
- each seed's accuracy per arm, one table per budget that several seeds ran.

Arguments are `SEED=REPORT` or a bare `REPORT`, labelled by the number after "seed" in its file name
(`seed7.json`, `seed7_oracle.json`: seed 7), else by its position; a seed may be given several
reports (arms run by separate invocations), which are merged, a later report's entries replacing an
earlier's. Only seeds that have both arms of a pair at a budget count for that pair.

    python scripts/pool_imagination.py 0=runs/s0.json 1=runs/s1.json 1=runs/s1_random.json --json pooled.json
    python scripts/pool_imagination.py docs/images/imagination_seeds/*.json --plot seeds.png
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

QUESTION = "future"
PAIRS = (("imagined", "observed"), ("random_world_model", "observed"), ("imagined", "random_world_model"),
         ("oracle", "imagined"), ("oracle", "observed"), ("imagined_shuffled", "observed"), ("imagined", "imagined_shuffled"),
         ("imagined", "imagined_reversed"))
# Two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom (beyond: the normal's 1.960).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(degrees: int) -> float:
    return _T975[degrees - 1] if degrees <= len(_T975) else 1.960


def mean_interval(values: list[float]) -> dict:
    """Mean, standard deviation and Student t 95 % interval of the mean (no interval for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "sd": None, "ci_low": None, "ci_high": None, "n": n}
    sd = statistics.stdev(values)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def wilcoxon_p(differences: list[float]) -> float | None:
    """Exact two-sided p of the Wilcoxon signed-rank test (zero differences dropped, tied magnitudes given their
    mean rank): the chance, under a symmetric null, of a signed-rank sum at least as far from its centre."""
    nonzero = [d for d in differences if d != 0]
    if not nonzero:
        return None
    ordered = sorted(abs(d) for d in nonzero)
    doubled = {}  # |d| -> twice its mean rank (an integer, so the null distribution can be counted exactly)
    for start in range(len(ordered)):
        end = max(i for i, value in enumerate(ordered) if value == ordered[start])
        doubled.setdefault(ordered[start], start + end + 2)
    ranks = [doubled[abs(d)] for d in nonzero]
    counts = {0: 1}  # null distribution of twice the positive-rank sum: each rank's sign a fair coin
    for rank in ranks:
        shifted = dict(counts)
        for total, ways in counts.items():
            shifted[total + rank] = shifted.get(total + rank, 0) + ways
        counts = shifted
    observed = sum(rank for rank, d in zip(ranks, nonzero) if d > 0)
    distance = abs(observed - sum(ranks) / 2)
    extreme = sum(ways for total, ways in counts.items() if abs(total - sum(ranks) / 2) >= distance - 1e-9)
    return min(1.0, extreme / 2 ** len(ranks))


def load_reports(specs: list[str]) -> dict[str, dict]:
    """`SEED=PATH` or `PATH` -> {seed: {"arms": {arm: {budget: {question: entry}}}}}, merged per seed."""
    seeds: dict[str, dict] = {}
    for position, spec in enumerate(specs):
        label, sep, path = spec.partition("=")
        if not sep:
            named = re.search(r"seed[-_]?(\d+)", Path(spec).name)
            label, path = (named.group(1) if named else str(position)), spec
        report = json.loads(Path(path).read_text())
        if "arms" not in report:
            raise SystemExit(f"{path}: not a report of scripts/eval_imagination.py (no 'arms')")
        merged = seeds.setdefault(label, {"arms": {}})
        # The ablations of `imagined` ("future" only) are compared like arms.
        for arm, per_budget in {**report["arms"], **report.get("ablations", {})}.items():
            merged["arms"].setdefault(arm, {}).update(per_budget)
    if all(label.isdigit() for label in seeds):
        seeds = dict(sorted(seeds.items(), key=lambda item: int(item[0])))
    return seeds


def pool(seeds: dict[str, dict], question: str = QUESTION) -> dict:
    arms: dict[str, dict[str, dict]] = {}
    for per_seed in seeds.values():
        for arm, per_budget in per_seed["arms"].items():
            for budget, by_question in per_budget.items():
                if question in by_question:
                    arms.setdefault(arm, {}).setdefault(budget, []).append(by_question[question])
    pooled_arms = {arm: {budget: {**mean_interval([e["accuracy"] for e in entries]),
                                  "min": min(e["accuracy"] for e in entries), "max": max(e["accuracy"] for e in entries),
                                  "majority_min": min(e["majority"] for e in entries),
                                  "majority_max": max(e["majority"] for e in entries)}
                         for budget, entries in sorted(per_budget.items(), key=lambda kv: int(kv[0]))}
                   for arm, per_budget in arms.items()}
    pairs = {}
    for first, second in PAIRS:
        budgets = sorted({b for s in seeds.values() for b in s["arms"].get(first, {})}, key=int)
        for budget in budgets:
            differences, above, level, below, labels = [], 0, 0, 0, []
            for label, per_seed in seeds.items():
                a = per_seed["arms"].get(first, {}).get(budget, {}).get(question)
                b = per_seed["arms"].get(second, {}).get(budget, {}).get(question)
                if a is None or b is None:
                    continue
                labels.append(label)
                differences.append(a["accuracy"] - b["accuracy"])
                if a["ci_low"] > b["ci_high"]:
                    above += 1
                elif a["ci_high"] < b["ci_low"]:
                    below += 1
                else:
                    level += 1
            if differences:
                pairs.setdefault(f"{first} - {second}", {})[budget] = {
                    **mean_interval(differences), "wilcoxon_p": wilcoxon_p(differences), "differences": differences,
                    "seeds": labels, "above": above, "level": level, "below": below}
    return {"question": question, "seeds": list(seeds), "arms": pooled_arms, "pairs": pairs}


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def format_pooled(pooled: dict) -> str:
    lines = [f'"{pooled["question"]}" over seeds {", ".join(pooled["seeds"])}', "",
             f"{'arm':<20} {'budget':>6} {'seeds':>5} {'mean':>7} {'sd':>6} {'lowest':>7} {'highest':>7} {'majority':>13}"]
    for arm, per_budget in pooled["arms"].items():
        for budget, entry in per_budget.items():
            sd = "-" if entry["sd"] is None else f"{100 * entry['sd']:.1f}"
            majority = f"{100 * entry['majority_min']:.1f}-{100 * entry['majority_max']:.1f}%"
            lines.append(f"{arm:<20} {budget:>6} {entry['n']:>5} {100 * entry['mean']:>6.1f}% {sd:>6} "
                         f"{100 * entry['min']:>6.1f}% {100 * entry['max']:>6.1f}% {majority:>13}")
    lines += ["", f"{'paired difference (points)':<40} {'budget':>6} {'seeds':>5} {'mean':>7} {'95% CI (t)':>16} "
              f"{'above/level/below':>18} {'Wilcoxon p':>10}"]
    for pair, per_budget in pooled["pairs"].items():
        for budget, entry in per_budget.items():
            interval = "-" if entry["ci_low"] is None else f"[{_points(entry['ci_low'])}, {_points(entry['ci_high'])}]"
            lines.append(f"{pair:<40} {budget:>6} {entry['n']:>5} {_points(entry['mean']):>7} {interval:>16} "
                         f"{entry['above']:>6}/{entry['level']}/{entry['below']:<9} "
                         f"{'-' if entry['wilcoxon_p'] is None else format(entry['wilcoxon_p'], '.4f'):>10}")
    return "\n".join(lines)


def format_per_seed(seeds: dict[str, dict], question: str = QUESTION) -> str:
    """Each seed's accuracy (%) per arm, one table per budget that more than one seed ran."""
    order = ("observed", "imagined", "random_world_model", "oracle", "imagined_shuffled", "imagined_reversed")
    lines = []
    budgets = sorted({b for s in seeds.values() for per_budget in s["arms"].values() for b in per_budget}, key=int)
    for budget in budgets:
        ran = {label: per_seed for label, per_seed in seeds.items()
               if any(question in per_seed["arms"].get(arm, {}).get(budget, {}) for arm in order)}
        arms = [arm for arm in order if any(question in s["arms"].get(arm, {}).get(budget, {}) for s in ran.values())]
        if len(ran) < 2:
            continue
        lines += ["", f'"{question}" per seed at {budget} labels (%)', f"{'seed':>4} " + " ".join(f"{arm:>18}" for arm in arms)]
        for label, per_seed in ran.items():
            cells = [per_seed["arms"].get(arm, {}).get(budget, {}).get(question) for arm in arms]
            lines.append(f"{label:>4} " + " ".join(f"{'-' if c is None else format(100 * c['accuracy'], '.1f'):>18}" for c in cells))
    return "\n".join(lines)


def plot(pooled: dict, seeds: dict[str, dict], budget: str, path: str | Path) -> None:
    """Each seed's accuracy per arm at one budget (dots, a seed's runs joined by a thin line), with the mean over
    seeds and its t 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    question = pooled["question"]
    arms = [arm for arm in ("observed", "imagined", "random_world_model", "oracle", "imagined_shuffled") if budget in pooled["arms"].get(arm, {})]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, per_seed in seeds.items():
        points = [(x, per_seed["arms"][arm][budget][question]["accuracy"]) for x, arm in enumerate(arms)
                  if question in per_seed["arms"].get(arm, {}).get(budget, {})]
        ax.plot([x for x, _ in points], [y for _, y in points], "-o", color="grey", alpha=0.35, markersize=3, linewidth=0.7)
    for x, arm in enumerate(arms):
        entry = pooled["arms"][arm][budget]
        low = entry["ci_low"] if entry["ci_low"] is not None else entry["mean"]
        high = entry["ci_high"] if entry["ci_high"] is not None else entry["mean"]
        ax.errorbar([x + 0.12], [entry["mean"]], yerr=[[entry["mean"] - low], [high - entry["mean"]]], fmt="s",
                    color="C3", capsize=4, label="mean over seeds, t 95 % interval" if x == 0 else None)
    ax.set_xticks(range(len(arms)), [f"{arm}\n({pooled['arms'][arm][budget]['n']} seeds)" for arm in arms], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f'held-out accuracy on "{question}"')
    ax.set_title(f"{budget} labelled samples: one grey line per seed", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", metavar="[SEED=]REPORT", help="reports of eval_imagination.py, one or more per seed")
    parser.add_argument("--question", default=QUESTION, help=f"question type to compare (default: {QUESTION})")
    parser.add_argument("--json", metavar="OUT", help="also write the pooled figures here")
    parser.add_argument("--plot", metavar="PNG", help="also draw each seed's accuracy per arm at --plot-budget")
    parser.add_argument("--plot-budget", default=None,
                        help="budget of the plot (default: the one with the most seeds of 'imagined')")
    args = parser.parse_args(argv)
    seeds = load_reports(args.reports)
    pooled = pool(seeds, args.question)
    print(format_pooled(pooled))
    print(format_per_seed(seeds, args.question))
    if args.json:
        Path(args.json).write_text(json.dumps(pooled, indent=2) + "\n")
    if args.plot:
        budgets = pooled["arms"].get("imagined") or next(iter(pooled["arms"].values()), {})
        budget = args.plot_budget or max(budgets, key=lambda b: (budgets[b]["n"], -int(b)), default=None)
        if budget is None:
            raise SystemExit(f"nothing to plot: no arm answered {args.question!r}")
        plot(pooled, seeds, budget, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
