"""Benchmarks: speed and memory figures quoted in the README, measured on the machine it runs on.

    python bench.py              # every benchmark
    python bench.py loader eval  # only the named ones

Figures are printed, never asserted: tests check correctness, this file measures cost.
"""
import sys

# ==== loader ====

# ==== end loader ====

# ==== eval ====

# ==== end eval ====

# ==== methods ====

# ==== end methods ====


def main(argv):
    benches = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    wanted = argv or list(benches)
    unknown = [w for w in wanted if w not in benches]
    if unknown:
        sys.exit(f"bench.py: unknown benchmark {unknown}; choose from {sorted(benches)}")
    for name in wanted:
        print(f"== {name}")
        benches[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
