"""Benchmarks: speed and memory figures quoted in the README, measured on the machine it runs on.

    python bench.py              # every benchmark
    python bench.py loader eval  # only the named ones

Figures are printed, never asserted: tests check correctness, this file measures cost.
"""
import sys

# ==== loader ====

def bench_loader():
    """Augmented training images/s in one process with one thread (what a DataLoader worker gets):
    data.py's batch pipeline on the uint8 cache vs the community per-image PIL pipeline, same images and batches."""
    import time

    import numpy as np
    import torch
    import torchvision.transforms as T

    import data
    H, W, P, K, n_ids, per_id = 288, 144, 8, 4, 32, 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        labels = np.repeat(np.arange(n_ids), per_id)

        def images(cam):      # random uint8 images at the working size, as the cache holds them
            return data.ImageSet([f"cam{cam}/{i}" for i in range(len(labels))], labels, np.full(len(labels), cam),
                                 rng.integers(0, 256, (len(labels), H, W, 3), dtype=np.uint8))
        ts = data.TrainSet(images(1), images(3), n_ids)
        loader = data.train_loader(ts, P, K, seed=0, augment=data.Augment(H, W))
        community = T.Compose([T.ToPILImage(), T.Pad(10), T.RandomCrop((H, W)), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
                               T.RandomErasing(p=0.5, scale=data.ERASE_AREA, ratio=(0.3, 3.33), value=0)])

        def ours():
            return sum(len(b["x_v"]) + len(b["x_r"]) for b in loader.epoch(1))

        def pil():      # the same sampled images, one at a time
            n = 0
            for idx_v, idx_r in loader.sampler.epoch(1):
                x_v = torch.stack([community(img) for img in ts.v.images[idx_v]])
                x_r = torch.stack([community(img) for img in ts.r.images[idx_r]])
                n += len(x_v) + len(x_r)
            return n

        best = {"ours": 0.0, "pil": 0.0}
        for _ in range(3):      # interleaved rounds, best of each: robust to other processes on the machine
            for name, fn in (("ours", ours), ("pil", pil)):
                start = time.perf_counter()
                n = fn()
                best[name] = max(best[name], n / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    print(f"augmented training images/s per worker process (1 thread, {H}x{W}, P={P} K={K}, "
          f"{n} images per round, best of 3 rounds):")
    print(f"  data.py batch pipeline (uint8 cache, torch ops): {best['ours']:8.0f} images/s")
    print(f"  community per-image PIL pipeline:                 {best['pil']:8.0f} images/s")
    print(f"  ratio: {best['ours'] / best['pil']:.1f}x")


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
