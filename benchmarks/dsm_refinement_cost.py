"""Cost of DSM stage 2's diffusion-guided refinement step (DQR, eqs. 17-18) at a 3d plan's feature maps: the step as
the package computes it (one neighbour offset at a time on shifted views, ``GuidedFeatureDiffusion``) against the
same equations on the explicit 3^d stack of neighbours (how it was computed before 2026-12-02). Forward + backward
of each, in float32 on the CPU, one process each (peak: the process's max RSS above its start), the same outputs.

    python benchmarks/dsm_refinement_cost.py --shapes 20x48x48 10x24x24 5x12x12 --out benchmarks/dsm_refinement_cpu.md
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shlex
import subprocess
import sys
import time


def stacked_step(block, features, guidance):
    """Eqs. 17-18 on the explicit stack (the former implementation), for comparison."""
    import torch
    import torch.nn.functional as F
    from nnunet_diffusion.architectures.dsm.feature_diffusion import neighbours
    guidance = F.interpolate(guidance, size=features.shape[2:], mode="nearest")
    query, key = block.theta(guidance), block.phi(guidance)
    inside = neighbours(torch.ones_like(features[:, :1]))
    logits = (query.unsqueeze(2) * neighbours(key)).sum(1, keepdim=True) / math.sqrt(query.shape[1])
    weights = torch.softmax(logits.masked_fill(inside == 0, float("-inf")), dim=2)
    return features + (weights * (neighbours(features) - features.unsqueeze(2))).sum(dim=2)


def measure(kind: str, shape: list[int], batch: int, channels: int, repeats: int) -> dict:
    import torch
    from torch import nn
    from nnunet_diffusion.architectures.dsm.feature_diffusion import GuidedFeatureDiffusion
    torch.manual_seed(0)
    block = GuidedFeatureDiffusion(channels, channels, nn.Conv3d)
    features = torch.randn(batch, channels, *shape, requires_grad=True)
    guidance = torch.randn(batch, channels, *[max(1, s // 2) for s in shape])
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = (lambda: block.diffusion_step(features, guidance)) if kind == "views" else \
        (lambda: stacked_step(block, features, guidance))
    seconds = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        out = step()
        out.square().mean().backward()
        seconds.append(time.perf_counter() - tic)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    return {"kind": kind, "shape": shape, "s": sorted(seconds[1:])[len(seconds[1:]) // 2], "peak_mib": peak,
            "checksum": float(out.detach().double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["20x48x48", "10x24x24", "5x12x12"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64, help="DSMOptions.query_dim")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/dsm_refinement_cpu.md")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], [int(s) for s in args.one[1].split("x")], args.batch, args.channels,
                                 args.repeats)))
        return
    command = "python benchmarks/dsm_refinement_cost.py " + shlex.join(sys.argv[1:])
    lines = ["# DSM stage 2: cost of the diffusion-guided refinement step (cpu)", "", f"Command: `{command}`", "",
             f"Batch {args.batch}, {args.channels} channels, forward + backward in float32, median of {args.repeats} "
             "after one warm-up, each in its own process. 'views': the package's step (one offset at a time); "
             "'stack': the same equations on the explicit 3^d stack (before 2026-12-02).", "",
             "| feature map | stack s | views s | time ratio | stack peak MiB | views peak MiB | same output |",
             "|---|---|---|---|---|---|---|"]
    for shape in args.shapes:
        rows = {}
        for kind in ("stack", "views"):
            out = subprocess.run([sys.executable, __file__, "--one", kind, shape, "--batch", str(args.batch),
                                  "--channels", str(args.channels), "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            rows[kind] = json.loads(out.strip().splitlines()[-1])
        a, b = rows["stack"], rows["views"]
        same = math.isclose(a["checksum"], b["checksum"], rel_tol=1e-4, abs_tol=1e-2)
        lines.append(f"| {shape} | {a['s']:.3f} | {b['s']:.3f} | {b['s'] / a['s']:.2f}x | {a['peak_mib']:.0f} | "
                     f"{b['peak_mib']:.0f} | {same} |")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
