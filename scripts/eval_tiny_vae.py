"""How usable the tiny Cosmos VAE's latents are for the motion task: locality in space, reach in time,
reconstruction, against the targets of issue 22 (docs/world_model.md, "Tiny VAE").

    python scripts/eval_tiny_vae.py /tmp/tiny --build --json tiny_vae.json   # the default (trained) VAE, built first, timed
    python scripts/eval_tiny_vae.py ~/.cache/theworld/tiny                   # the default tiny build's VAE as it is
    python -m theworld.tiny /tmp/random --random-vae && python scripts/eval_tiny_vae.py /tmp/random   # the random VAE

DIR is a tiny model directory (`python -m theworld.tiny DIR`, holding `cosmos/`) or a Cosmos repository
(holding `vae/`). The figures (`theworld.tiny.measure_tiny_vae`, on held-out motion-task clips):

- locality: share of the latent change under the square when it moves one latent cell (chance 12.5 %);
- temporal: change of the last latent frame when a clip's last four frames change, over that latent
  frame's across-clip variance;
- PSNR of decoded 9-frame clips (whole frames, and the square's pixels alone), and of single frames
  encoded alone (the spatial layers without the temporal ones).

With `--build`, DIR's tiny models are built first, with the trained VAE, the default (`python -m theworld.tiny
DIR`; a complete directory is reused, and so are trained VAE weights cached by an earlier build:
pass a new DIR and an empty `THEWORLD_TINY_DIR` to time the training) and the build's wall time is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/eval_tiny_vae.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

# Stated in advance in issue 22 (2 shared CPU cores).
TARGETS = {"locality": 0.50, "temporal": 0.30, "psnr_db": 26.0, "build_s": 300.0}


def cosmos_dir_of(path: Path) -> Path:
    """The Cosmos repository in a tiny model directory, or the directory itself if it is one."""
    for candidate in (path / "cosmos", path):
        if (candidate / "vae" / "config.json").is_file():
            return candidate
    raise SystemExit(f"{path} holds neither cosmos/vae/ nor vae/: build the tiny models there "
                     f"(`python -m theworld.tiny {path}`) or pass --build")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", metavar="DIR", type=Path, help="tiny model directory (holding cosmos/) or Cosmos repository")
    parser.add_argument("--build", action="store_true",
                        help="build the tiny models with the trained VAE into DIR first and time the build")
    parser.add_argument("--clips", type=int, default=64, help="held-out clips measured (default: 64)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    import torch
    from diffusers import AutoencoderKLWan

    from theworld.tiny import build_tiny_models, measure_tiny_vae

    figures: dict[str, float] = {}
    if args.build:
        start = time.perf_counter()
        build_tiny_models(args.dir, trained_vae=True)
        figures["build_s"] = time.perf_counter() - start
    vae = AutoencoderKLWan.from_pretrained(cosmos_dir_of(args.dir), subfolder="vae").eval()
    torch.set_num_threads(1)  # the figures then repeat to the last digit on any machine
    figures.update(measure_tiny_vae(vae, clips=args.clips))

    rows = [("locality (latent change under the square, chance 12.5 %)", "locality", f"{figures['locality']:.1%}"),
            ("temporal (last latent frame moved / across-clip variance)", "temporal", f"{figures['temporal']:.1%}"),
            ("held-out clip PSNR", "psnr_db", f"{figures['psnr_db']:.1f} dB"),
            ("  on the square's pixels", "square_psnr_db", f"{figures['square_psnr_db']:.1f} dB"),
            ("single-frame PSNR (first frames encoded alone)", "frame_psnr_db", f"{figures['frame_psnr_db']:.1f} dB"),
            ("  on the square's pixels", "frame_square_psnr_db", f"{figures['frame_square_psnr_db']:.1f} dB")]
    if "build_s" in figures:
        rows.append(("build time, all tiny models", "build_s", f"{figures['build_s']:.0f} s"))
    for label, key, value in rows:
        target = TARGETS.get(key)
        if target is None:
            verdict = ""
        elif key == "build_s":
            verdict = f"target <= {target:.0f} s: {'met' if figures[key] <= target else 'MISSED'}"
        else:
            shown = f"{target:.0f} dB" if key == "psnr_db" else f"{target:.0%}"
            verdict = f"target >= {shown}: {'met' if figures[key] >= target else 'MISSED'}"
        print(f"{label:<60} {value:>9}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
