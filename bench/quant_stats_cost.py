"""What measuring each layer's quantization error costs a load (server/loading/quant_stats.py).

    python bench/quant_stats_cost.py [--model FOLDER] [--formats nf4,nf4+dq,int8] [--rounds 5]

Loads alternate with the measurement on and off (LoadConfig.quant_stats) in one process, so that
both see the same machine; prints the median load time of each and the measurement's own seconds
(LoadReport.stats_seconds) as a share of the measured loads.
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="folder (default: the built-in default model)")
    parser.add_argument("--formats", default="nf4,nf4+dq,int8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    from quantserve.server.loading.loader import LoadConfig, load_model
    from quantserve.server.loading.verify import quant_config

    load_model(LoadConfig(args.model, progress=False))  # warm: caches, kernels, imports
    print("| format | load, stats off (median s) | load, stats on (median s) | stats (median s) | stats / load |")
    print("|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        off, on, stats = [], [], []
        for _ in range(args.rounds):
            for measure in (False, True):
                report = load_model(LoadConfig(args.model, quant=quant_config(fmt), progress=False,
                                               quant_stats=measure)).report
                (on if measure else off).append(report.load_seconds)
                if measure:
                    stats.append(report.stats_seconds)
        share = statistics.median(s / t for s, t in zip(stats, on))
        print(f"| {fmt} | {statistics.median(off):.2f} | {statistics.median(on):.2f} | {statistics.median(stats):.3f} | "
              f"{share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
