"""Does the motion result hold for every seed? `python -m theworld.train --seed S` for each seed, one table.

    python scripts/seed_sweep.py --seeds 0-9 --json sweep.json
    python scripts/seed_sweep.py --seeds 0,6 --runs-dir runs/sweep --json sweep.json -- --cosmos-model OUT/cosmos

For each seed, in sequence, the script runs `python -m theworld.train --seed S --output-dir DIR/seed-S`
with the flags after `--` passed through unchanged (`--cosmos-model`, `--max-steps`, ...), prints a progress
line per seed, and reads the run's `summary.json`. It resumes: a seed whose `summary.json` exists is read,
not run again, and a seed whose run stopped midway continues from its last checkpoint (`--resume`). From the
summary's final evaluation table (`eval_by_question`, as the trainer wrote it) it takes the direction accuracy,
the fraction of direction answers that flip on time-reversed clips, the direction accuracy with the world
latents shuffled across samples, and the colour accuracy, and checks them against the motion task's targets
(issue 22): direction >= 80 %, reversed flips >= 80 %, shuffled <= 35 %, colour >= 70 %.

`--json OUT` writes:

    {
      "targets": {"direction": 0.8, "reversed_flips": 0.8, "shuffled": 0.35, "colour": 0.7},
      "seeds": [
        {"seed": 0, "output_dir": "runs/seed_sweep/seed-0", "status": "ran" | "read" | "failed",
         "direction": 0.916, "reversed_flips": 0.932, "shuffled": 0.236, "colour": 1.0,
         "meets": {"direction": true, "reversed_flips": true, "shuffled": true, "colour": true},
         "meets_all": true, "wall_seconds": 212.4, "error": null},
        ...
      ],
      "meeting_all": 9,
      "count": 10,
      "trainer_flags": ["--max-steps", "600"]
    }

A figure the summary does not have (a `--no-enable-world` run has no shuffled or reversed figures; a failed
run has none) is `null` and does not meet its target. `wall_seconds` is the run's wall time in this
invocation (`null` for a seed read from an earlier one); `error` is the last lines of a failed run's output.
The exit code is 0 when every run finished (whatever the figures), 1 when a run failed, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The motion task's targets (issue 22), each with the side of the threshold that meets it.
TARGETS = {"direction": 0.80, "reversed_flips": 0.80, "shuffled": 0.35, "colour": 0.70}
AT_MOST = {"shuffled"}  # the others are "at least"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"  # theworld.training.checkpoints.CHECKPOINT_DIR (not imported: that pulls in torch)


def parse_seeds(text: str) -> list[int]:
    """`"0-9"`, `"0,3,6"` or `"0-3,6"` -> the seeds in order, each once."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            span = range(int(low), int(high) + 1) if dash else [int(low)]
        except ValueError:
            raise ValueError(f"--seeds {text!r}: use non-negative seeds and ranges such as 0-9 or 0,3,6") from None
        if not span:
            raise ValueError(f"--seeds {text!r}: the range {part} is empty (write low-high)")
        seeds += [s for s in span if s not in seeds]
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    return seeds


def figures(summary: dict) -> dict:
    """The four figures of a run's `summary.json` (`None` where the summary has no such figure)."""
    table = summary.get("eval_by_question") or {}
    direction, colour = table.get("direction") or {}, table.get("colour") or {}
    return {"direction": direction.get("accuracy"), "reversed_flips": direction.get("reversed_flips"),
            "shuffled": direction.get("shuffled_world"), "colour": colour.get("accuracy")}


def meets(values: dict) -> dict:
    """Per target, whether the figure meets it (a missing figure does not)."""
    return {name: values[name] is not None and (values[name] <= limit if name in AT_MOST else values[name] >= limit)
            for name, limit in TARGETS.items()}


def run_seed(seed: int, output_dir: Path, trainer_flags: list[str], log) -> tuple[str, float | None, str | None]:
    """Run (or resume) the trainer for one seed; `(status, wall_seconds, error)`."""
    if (output_dir / SUMMARY).is_file():
        return "read", None, None
    command = [sys.executable, "-m", "theworld.train", "--seed", str(seed), "--output-dir", str(output_dir),
               *trainer_flags]
    if any((output_dir / CHECKPOINTS).glob("step-*")):
        command.append("--resume")  # a run stopped midway continues where it was, exactly
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # The trainer's own output goes to a file beside its outputs: the sweep prints one line per seed.
    with open(output_dir / "train.log", "ab") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    if code != 0 or not (output_dir / SUMMARY).is_file():
        tail = (output_dir / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
        log(f"seed {seed}: the trainer exited with code {code}; its output is in {output_dir / 'train.log'}")
        return "failed", wall, "\n".join(tail)
    return "ran", wall, None


def seed_record(seed: int, output_dir: Path, status: str, wall: float | None, error: str | None) -> dict:
    values = (figures(json.loads((output_dir / SUMMARY).read_text())) if status != "failed"
              else dict.fromkeys(TARGETS))
    met = meets(values)
    return {"seed": seed, "output_dir": str(output_dir), "status": status, **values, "meets": met,
            "meets_all": all(met.values()), "wall_seconds": wall, "error": error}


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(records: list[dict]) -> str:
    header = f"{'seed':>4}  {'direction':>9}  {'reversed':>8}  {'shuffled':>8}  {'colour':>7}  {'meets all':>9}  status"
    targets = (f"{'':>4}  {'>= 80%':>9}  {'>= 80%':>8}  {'<= 35%':>8}  {'>= 70%':>7}")
    lines = [header, targets]
    for r in records:
        cells = [f"{format_percent(r[name]) + ('' if r['meets'][name] else '*'):>{width}}"
                 for name, width in (("direction", 9), ("reversed_flips", 8), ("shuffled", 8), ("colour", 7))]
        lines.append(f"{r['seed']:>4}  {'  '.join(cells)}  {'yes' if r['meets_all'] else 'no':>9}  {r['status']}")
    lines.append(f"seeds meeting every target: {sum(r['meets_all'] for r in records)} of {len(records)}"
                 "   (* misses its target)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after `--` belongs to the trainer, untouched (argparse would otherwise try to read it).
    trainer_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [-h] --seeds SEEDS [--runs-dir DIR] [--json OUT] "
                                           "[-- TRAINER FLAGS ...]",
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", required=True, help="seeds to run: a range (0-9), a list (0,3,6) or both (0-3,6)")
    parser.add_argument("--runs-dir", default="runs/seed_sweep", metavar="DIR",
                        help="each seed's run goes to DIR/seed-S (default runs/seed_sweep); runs already "
                             "there are read or resumed, not repeated")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the table to this file (layout above)")
    args = parser.parse_args(own)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        parser.error(str(e))
    for flag in ("--seed", "--output-dir", "--resume"):
        if any(f == flag or f.startswith(flag + "=") for f in trainer_flags):
            parser.error(f"{flag} is set by the sweep for every seed; drop it from the trainer flags after --")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    runs_dir = Path(args.runs_dir)
    records = []
    for done, seed in enumerate(seeds):
        output_dir = runs_dir / f"seed-{seed}"
        log(f"[{done + 1}/{len(seeds)}] seed {seed}: "
            f"{'reading' if (output_dir / SUMMARY).is_file() else 'training'} {output_dir}")
        record = seed_record(seed, output_dir, *run_seed(seed, output_dir, trainer_flags, log))
        records.append(record)
        wall = "" if record["wall_seconds"] is None else f" in {record['wall_seconds']:.0f} s"
        log(f"[{done + 1}/{len(seeds)}] seed {seed}: {record['status']}{wall}: direction "
            f"{format_percent(record['direction'])}, reversed flips {format_percent(record['reversed_flips'])}, "
            f"shuffled {format_percent(record['shuffled'])}, colour {format_percent(record['colour'])}; "
            f"{'meets every target' if record['meets_all'] else 'misses a target'}")
    print(format_table(records))
    if args.json:
        result = {"targets": TARGETS, "seeds": records, "meeting_all": sum(r["meets_all"] for r in records),
                  "count": len(records), "trainer_flags": trainer_flags}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
