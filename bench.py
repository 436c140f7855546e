"""Benchmarks: speed and memory figures quoted in the README, measured on the machine it runs on.

    python bench.py              # every benchmark
    python bench.py loader eval  # only the named ones

Figures are printed, never asserted: tests check correctness, this file measures cost.
"""
import sys


def max_rss_kib():
    """Peak resident memory of this process in KiB. On Linux VmHWM of /proc/self/status, which a new process starts
    afresh; ru_maxrss does not (after fork + exec it starts at the parent's size, so a child process's growth would
    read too small under a large parent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(job, args, queue):
    """Runs job(*args); puts (result, peak RSS growth in MiB, CUDA max_memory_allocated in MiB or None) on `queue`."""
    import torch
    base = max_rss_kib()
    result = job(*args)
    cuda = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
    queue.put((result, (max_rss_kib() - base) / 1024, cuda))


def in_child(job, *args):
    """job(*args) in a fresh (spawned) process, so memory figures of different jobs compare:
    (result, peak RSS growth in MiB, CUDA peak in MiB or None)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(job, args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def peak_memory(rss_mib, cuda_mib):
    """The figure to report: (MiB, what it is): the CUDA peak on a GPU, else the peak RSS growth."""
    return (cuda_mib, "CUDA max_memory_allocated") if cuda_mib is not None else (rss_mib, "peak RSS growth")


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

import time
import tracemalloc

import numpy as np


def _community_loop(distmat, q_pids, g_pids, q_cams, g_cams, protocol, max_rank=20):
    """The community's per-query evaluation (`eval_sysu` / `eval_regdb` of Cross-Modal-Re-ID-baseline),
    re-stated from its description: numpy's default argsort, then one Python iteration per query."""
    indices = np.argsort(distmat, axis=1)
    ranked_ids = g_pids[indices]
    all_matches = (ranked_ids == q_pids[:, None]).astype(np.int32)
    cmcs, aps, inps = [], [], []
    for q in range(len(distmat)):
        keep = np.ones(distmat.shape[1], dtype=bool)
        if protocol == "sysu":                                   # remove same-room camera
            keep = ~((q_cams[q] == 3) & (g_cams[indices[q]] == 2))
        matches = all_matches[q][keep]
        if not matches.any():
            continue
        if protocol == "sysu":                                   # de-duplicate identities, then cumulate
            ids = ranked_ids[q][keep]
            first = np.unique(ids, return_index=True)[1]
            unique_ids = np.asarray([ids[i] for i in sorted(first)])
            cmc = (unique_ids == q_pids[q]).astype(np.int32).cumsum()
        else:
            cmc = matches.cumsum()
            cmc[cmc > 1] = 1
        cmcs.append(cmc[:max_rank])
        hits = matches.cumsum()                                  # average precision
        last = np.flatnonzero(matches).max()
        inps.append(hits[last] / (last + 1.0))
        precision = np.asarray([h / (i + 1.0) for i, h in enumerate(hits)]) * matches
        aps.append(precision.sum() / matches.sum())
    return np.mean(cmcs, axis=0), np.mean(aps), np.mean(inps)


def bench_eval():
    """eval.evaluate against the community per-query loop at the sizes of the papers' test settings,
    on random distances with an identity signal and no ties (so both sorts give one order)."""
    import eval as reid_eval
    rng = np.random.default_rng(0)
    sizes = [("SYSU single-shot", 3803, 301, 96, "sysu"), ("SYSU multi-shot", 3803, 3010, 96, "sysu"),
             ("RegDB", 2060, 2060, 206, "regdb")]
    for name, nq, ng, ids, protocol in sizes:
        q_pids, g_pids = rng.integers(0, ids, nq), np.arange(ng) % ids
        q_cams, g_cams = rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng)
        noisy = rng.random((nq, ng)) - 0.1 * (q_pids[:, None] == g_pids)
        distmat = np.argsort(np.argsort(noisy, axis=1), axis=1).astype(np.float32)   # (nq, ng) distinct ranks
        start = time.perf_counter()
        cmc, mAP, mINP = _community_loop(distmat, q_pids, g_pids, q_cams, g_cams, protocol)
        loop_s = time.perf_counter() - start
        fast_s = []
        for _ in range(3):
            start = time.perf_counter()
            r = reid_eval.evaluate(distmat, q_pids, g_pids, q_cams, g_cams, protocol)
            fast_s.append(time.perf_counter() - start)
        diff = max(np.abs(r["cmc"] - cmc).max(), abs(r["mAP"] - mAP), abs(r["mINP"] - mINP))
        print(f"{name:17s} {nq} x {ng}: loop {loop_s:6.2f} s, evaluate {min(fast_s):.3f} s "
              f"({loop_s / min(fast_s):5.1f}x faster); rank-1 {100 * r['cmc'][0]:.2f} %, mAP {100 * r['mAP']:.2f} %, "
              f"largest difference {diff:.1e}")

    nq, ng = 1000, 100_000
    distmat = rng.random((nq, ng), dtype=np.float32)
    q_pids, g_pids = rng.integers(0, 1000, nq), np.arange(ng) % 1000
    tracemalloc.start()
    start = time.perf_counter()
    reid_eval.evaluate(distmat, q_pids, g_pids, rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng))
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{nq} x {ng}: evaluate {seconds:.2f} s, peak working memory {peak / 2**20:.0f} MiB "
          f"(queries go in chunks, so it does not grow with the number of queries)")


# ==== end eval ====

# ==== methods ====

def _ssft_train_iteration(method_name, iters=2, P=8, K=4, h=128, w=64):
    """Seconds per training iteration (best of `iters` after a warm-up) of `method_name` on random images."""
    import time

    import torch
    import torch.nn.functional as F

    from methods import agw, ssft
    torch.manual_seed(0)
    B, device = P * K, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {"x_v": torch.randn(B, 3, h, w, device=device), "x_r": torch.randn(B, 3, h, w, device=device),
             "y_v": torch.arange(P, device=device).repeat_interleave(K), "y_r": torch.arange(P, device=device).repeat_interleave(K)}
    if method_name == "agw":
        model = agw.build(agw.Settings(**agw.SYNTHETIC), 100).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            f, logits = model(batch["x_v"], batch["x_r"])
            y = torch.cat([batch["y_v"], batch["y_r"]])
            loss = F.cross_entropy(logits, y) + agw.L_wrt(f, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        settings = ssft.Settings(**{**ssft.SYNTHETIC, "height": h, "width": w})
        model = ssft.build(settings, 100).to(device).train()
        net_params, adv_params = ssft.split_parameters(model)
        opt_net, opt_adv = torch.optim.Adam(net_params, lr=1e-4), torch.optim.Adam(adv_params, lr=1e-4)

        def step():
            out = model(batch["x_v"], batch["x_r"])
            ssft.max_step(model, out, settings, opt_adv)
            ssft.min_step(model, out, batch, settings, opt_net, net_params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters + 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return min(times[1:]), gpu


def _ssft_test_cost(Nq=3803, Ng=3010, c=2048, single_queries=100):
    """Test-time SSTN at SYSU-MM01 multi-shot size with ResNet-50 feature sizes, on random features:
    seconds for the transductive pass over all Nq + Ng samples, and for `single_queries` single-query (Eq. 22) rows."""
    import time
    from types import SimpleNamespace

    import torch

    from methods import ssft
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = SimpleNamespace(c=c, sht=True, spt=True, sstn=ssft.SSTN(c, 395, bnneck=True).to(device).eval())
    H, P = torch.randn(Nq + Ng, c, device=device), torch.randn(Nq + Ng, c, device=device)
    is_r = torch.arange(Nq + Ng, device=device) < Nq                 # queries infrared, gallery visible
    with torch.no_grad():
        start = time.perf_counter()
        T = ssft.sstn_transductive(model, H, P, is_r, 4)
        torch.cdist(T[:Nq], T[Nq:])
        if device.type == "cuda":
            torch.cuda.synchronize()
        transductive = time.perf_counter() - start
        start = time.perf_counter()
        ssft.sstn_single_query(model, H[:single_queries], P[:single_queries], is_r[:single_queries],
                               H[Nq:], P[Nq:], is_r[Nq:], 4)
        if device.type == "cuda":
            torch.cuda.synchronize()
        single = time.perf_counter() - start
    return transductive, single


def bench_ssft():
    """cm-SSFT: a training iteration (forward, max step, min step) against an AGW iteration at the same batch and
    image size, and test-time SSTN at SYSU-MM01 multi-shot size. Each measurement runs in a fresh process, so the
    memory figures are the peak resident-set growth of that measurement alone (plus CUDA peak where a GPU is)."""
    import functools

    import torch
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    (agw_s, agw_gpu), agw_mb, _ = in_child(functools.partial(_ssft_train_iteration, "agw"))
    (ssft_s, ssft_gpu), ssft_mb, _ = in_child(functools.partial(_ssft_train_iteration, "ssft"))
    (recipe_s, _), _, _ = in_child(functools.partial(_ssft_train_iteration, "ssft", h=96, w=48))
    print(f"training iteration, resnet18 from scratch, 128x64, P=8 K=4 (32 visible + 32 infrared), {device}:")
    print(f"  agw : {agw_s:6.2f} s/it   peak RSS growth {agw_mb:7.0f} MB"
          + (f"   CUDA peak {agw_gpu:7.0f} MB" if agw_gpu else ""))
    print(f"  ssft: {ssft_s:6.2f} s/it   peak RSS growth {ssft_mb:7.0f} MB"
          + (f"   CUDA peak {ssft_gpu:7.0f} MB" if ssft_gpu else "")
          + f"   ({ssft_s / agw_s:.1f}x agw's time)")
    print(f"  ssft at its SYNTHETIC size 96x48: {recipe_s:6.2f} s/it ({recipe_s / agw_s:.1f}x agw's 128x64 iteration)")
    nq, ng, c, n_single = 3803, 3010, 2048, 50
    (transductive, single), test_mb, _ = in_child(functools.partial(_ssft_test_cost, nq, ng, c, n_single))
    print(f"test-time SSTN at SYSU-MM01 multi-shot size ({nq} queries + {ng} gallery, c={c} as ResNet-50, "
          f"random features, {device}):")
    print(f"  transductive (all queries + gallery, one pass): {transductive:6.2f} s")
    print(f"  single-query (Eq. 22): {single:6.2f} s for {n_single} queries -> {single * nq / n_single:6.1f} s "
          f"for all {nq} (extrapolated)")
    n = nq + ng
    print(f"  peak RSS growth of both: {test_mb:.0f} MB; linear in N = {n}: no N x N matrix is formed (the inputs H, P "
          f"take {2 * n * c * 4 / 2 ** 20:.0f} MB, Z = [H; P; 0] {n * 3 * c * 4 / 2 ** 20:.0f} MB, a dense affinity "
          f"would take {n * n * 4 / 2 ** 20:.0f} MB)")


def _mce_iteration(method_name, P, K, h, w, iters=3, num_classes=100):
    """Seconds per training iteration (best of `iters` after a warm-up) on random images; for mce also the
    images/s of the centroid pass (eval-mode forward in batches of mce.EXTRACT_BATCH)."""
    import time

    import torch
    import torch.nn.functional as F

    from methods import agw, mce
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B = P * K
    y = torch.arange(P, device=device).repeat_interleave(K)                       # (B,)
    x = {m: torch.randn(B, 3, h, w, device=device) for m in "vra"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if method_name == "agw":
        model = agw.build(agw.Settings(**agw.SYNTHETIC), num_classes).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

        def step():
            f, logits = model(x["v"], x["r"])
            y2 = torch.cat([y, y])
            loss = F.cross_entropy(logits, y2) + agw.L_wrt(f, y2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        settings = mce.Settings(**mce.SYNTHETIC)
        model = mce.build(settings, num_classes).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        keys = ("v", "r", "a", "u")
        d = model.bnneck.num_features
        memory = mce.Memory(keys, num_classes, d, device)
        memory.initialise({m: F.normalize(torch.randn(num_classes, d, device=device), dim=1) for m in keys})

        def step():   # restates mce.train's iteration, full objective (Eq. 2-10); no test keeps them equal
            f_all = F.normalize(model(torch.cat([x["v"], x["r"], x["a"]])), dim=1)
            f = dict(zip("vra", f_all.split(B)))
            f["u"] = f_all
            ys = {"v": y, "r": y, "a": y, "u": torch.cat([y, y, y])}
            loss = (sum(mce.L_W(f, ys, memory.W, settings.tau).values())
                    + settings.lambda1 * mce.L_MI(f, memory.C, settings.tau)
                    + settings.lambda2 * mce.L_GC(f["u"], ys["u"], memory.C["u"], settings.alpha))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for m in keys:
                memory.update(m, f[m].detach(), ys[m], settings.gamma_agnostic if m == "u" else settings.gamma_aware)
    times = []
    for _ in range(iters + 1):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    result = {"iteration": min(times[1:])}
    if method_name == "mce":
        model.eval()
        images = torch.randn(2 * mce.EXTRACT_BATCH, 3, h, w, device=device)
        with torch.no_grad():
            model(images[:mce.EXTRACT_BATCH])
            sync()
            start = time.perf_counter()
            for chunk in images.split(mce.EXTRACT_BATCH):
                F.normalize(model(chunk), dim=1)
            sync()
        result["pass_images_per_s"] = len(images) / (time.perf_counter() - start)
    return result


def bench_mce():
    """MCE: a training iteration (v, r and the auxiliary a; Eq. 2-10 and the Eq. 3 updates) against an
    AGW iteration (v, r) at the same P, K and image size; peak memory; and the share of an epoch spent on the
    end-of-epoch centroid pass (2 N_v + N_r images, eval-mode forward only)."""
    import torch
    P, K, h, w = 8, 4, 128, 64
    device = "GPU" if torch.cuda.is_available() else "CPU"
    print(f"resnet18 (the CPU recipe's backbone), {h}x{w}, P={P} K={K}, random images, on {device}; "
          f"each method in a fresh process")
    mce_r, *mce_peak = in_child(_mce_iteration, "mce", P, K, h, w)
    agw_r, *agw_peak = in_child(_mce_iteration, "agw", P, K, h, w)
    (mce_mem, what), (agw_mem, _) = peak_memory(*mce_peak), peak_memory(*agw_peak)
    print(f"  agw iteration ({2 * P * K} images):  {agw_r['iteration']:.3f} s, peak memory {agw_mem:.0f} MiB ({what})")
    print(f"  mce iteration ({3 * P * K} images):  {mce_r['iteration']:.3f} s, peak memory {mce_mem:.0f} MiB "
          f"-> {mce_r['iteration'] / agw_r['iteration']:.2f}x the time, {mce_mem / max(agw_mem, 1):.2f}x the memory")
    rate = mce_r["pass_images_per_s"]
    print(f"  centroid pass: {rate:.0f} images/s (eval forward, batches of 128)")
    for name, n_v, n_r in (("synthetic world", 1474, 756), ("SYSU-MM01", 22258, 11909), ("RegDB", 2060, 2060)):
        its = max(n_v, n_r) // (P * K)
        train_s, pass_s = its * mce_r["iteration"], (2 * n_v + n_r) / rate
        print(f"  {name:15s}: {its} iterations ({train_s:.0f} s) + pass over {2 * n_v + n_r} images ({pass_s:.0f} s) "
              f"per epoch -> the pass is {100 * pass_s / (train_s + pass_s):.0f} % of the epoch")


def _cmnas_iteration(kind, arch="resnet18", h=128, w=64, P=8, K=4, iters=2):
    """Seconds per training iteration (best of `iters` after a warm-up) and CUDA peak MiB (None on CPU):
    kind 'agw' (methods.agw), 'search' (CM-NAS alpha step + weight step) or 'retrain' (a derived network)."""
    import tempfile
    import time

    import torch
    import torch.nn.functional as F

    from methods import agw, cmnas, common
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B = P * K

    def batch():
        y = torch.arange(P, device=device).repeat_interleave(K)
        return {"x_v": torch.randn(B, 3, h, w, device=device), "x_r": torch.randn(B, 3, h, w, device=device),
                "y_v": y, "y_r": y.clone()}

    if kind == "agw":
        model = agw.build(agw.Settings(arch=arch, pretrained="none"), 100).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        b = batch()

        def step():
            f, logits = model(b["x_v"], b["x_r"])
            y = torch.cat([b["y_v"], b["y_r"]])
            loss = F.cross_entropy(logits, y) + agw.L_wrt(f, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        s = cmnas.Settings(arch=arch, pretrained="none")
        scratch = tempfile.TemporaryDirectory(prefix="bench-cmnas-")  # removed when this function returns
        run = common.Run(scratch.name, device)
        genotype = None if kind == "search" else (cmnas.PAPER_GENOTYPES["paper-sysu"] if arch == "resnet50"
                                                  else "0 | 00 01 | 001 11 | 111 11 | 111 11")
        model = cmnas.CMNASNet(s, 100, genotype).to(device).train()
        opt, _ = cmnas.weight_optimizer(s, model)
        b, b_val = batch(), batch()
        if kind == "search":
            arch_opt = torch.optim.Adam(model.alphas(), lr=s.arch_lr)

            def step():
                cmnas.search_step(model, b, b_val, s, True, opt, arch_opt, run)
        else:
            def step():
                cmnas.weight_step(model, b, s, True, opt, run)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters + 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:]), (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None)


def bench_cmnas():
    """CM-NAS: a search iteration (alpha step on a validation batch + weight step, both with L_C3MMD) and a
    retrain iteration of a derived network, against an AGW iteration at the same batch and image size. Each
    measurement runs in a fresh process: memory = its peak resident-set growth (and CUDA peak where a GPU is)."""
    import functools

    import torch
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"
    arch, h, w = ("resnet50", 256, 128) if gpu else ("resnet18", 128, 64)
    print(f"training iteration, {arch} from scratch, {h}x{w}, P=8 K=4 (32 visible + 32 infrared), {device}; "
          f"agw with its non-local blocks and GeM:")
    agw_s = None
    for kind in ("agw", "search", "retrain"):
        (sec, cuda_mb), rss_mb, _ = in_child(functools.partial(_cmnas_iteration, kind, arch, h, w))
        agw_s = agw_s or sec
        print(f"  {kind:8s}: {sec:6.2f} s/it ({sec / agw_s:4.2f}x agw)   peak RSS growth {rss_mb:6.0f} MiB"
              + (f"   CUDA peak {cuda_mb:7.0f} MiB" if cuda_mb else ""))


def _nfs_iteration(kind, iters, P, K, h, w):
    """Seconds per training iteration (mean of `iters` after one warm-up) of one kind of step on random images:
    'agw' (methods.agw), 'retrain' (NFS with fixed gates, Alg. 1 line 6), or an NFS search iteration (Alg. 1
    lines 3-4: weight step + gate step) 'first-order', 'finite-difference', 'autograd'. For 'autograd' also the
    relative difference of the finite-difference gate gradient from the exact one on the same batches."""
    import dataclasses
    import time

    import torch
    import torch.nn.functional as F

    from methods import agw, nfs
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    y = torch.arange(P, device=device).repeat_interleave(K)

    def batch():
        return {"x_v": torch.randn(P * K, 3, h, w, device=device), "x_r": torch.randn(P * K, 3, h, w, device=device),
                "y_v": y, "y_r": y}
    if kind == "agw":
        model = agw.build(agw.Settings(**{**agw.SYNTHETIC, "height": h, "width": w}), 100).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            b = batch()
            f, logits = model(b["x_v"], b["x_r"])
            yy = torch.cat([b["y_v"], b["y_r"]])
            loss = F.cross_entropy(logits, yy) + agw.L_wrt(f, yy)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        settings = nfs.Settings(**{**dataclasses.asdict(nfs.Settings()), **nfs.SYNTHETIC, "height": h, "width": w,
                                   "first_order": kind == "first-order",
                                   "hessian": "autograd" if kind == "autograd" else "finite-difference"})
        model = nfs.build(settings, 100, {"nfs_model": "retrain" if kind == "retrain" else "search"})
        model = model.to(device).train()
        opt = nfs.weight_optimizer(model, settings)
        gate_opt = torch.optim.Adam(model.fields(), lr=settings.gate_lr) if model.fields() else None
        xi = [settings.backbone_lr] * len(model.weights())

        def step():
            loss, _ = nfs.L(model, batch(), settings)
            opt.zero_grad()
            loss.backward(inputs=model.weights())
            opt.step()
            if gate_opt is not None:
                grads, _ = nfs.gate_gradient(model, batch(), batch(), settings, xi)
                for p, g in zip(model.fields(), grads):
                    p.grad = g
                gate_opt.step()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    agreement = None
    if kind == "autograd":
        bt, bv = batch(), batch()
        grads = []
        for s in (settings, dataclasses.replace(settings, hessian="finite-difference")):
            torch.manual_seed(1)
            grads.append(torch.cat([g.flatten() for g in nfs.gate_gradient(model, bt, bv, s, xi)[0]]))
        agreement = float((grads[1] - grads[0]).norm() / grads[0].norm())
    return seconds, agreement


def bench_nfs():
    """NFS: one search iteration (Alg. 1 lines 3-4, first- and second-order) and one retrain iteration (line 6)
    against one AGW iteration at the same batch and image size; each in a fresh process, with its peak memory."""
    import torch
    P, K, h, w, iters = 8, 4, 128, 64, 2
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"training iterations, resnet18 from scratch, {h}x{w}, P={P} K={K} (32 visible + 32 infrared), "
          f"search cells after stages 1-3, {device}, mean of {iters} after a warm-up:")
    base = None
    for kind, label in (("agw", "agw"), ("retrain", "nfs retrain (fixed gates)"),
                        ("first-order", "nfs search, first order"),
                        ("finite-difference", "nfs search, second order (DARTS finite diff.)"),
                        ("autograd", "nfs search, second order (exact, the default)")):
        (seconds, agreement), *peak = in_child(_nfs_iteration, kind, iters, P, K, h, w)
        memory, what = peak_memory(*peak)
        base = base or seconds
        print(f"  {label:46s} {seconds:6.2f} s/it  {seconds / base:4.1f}x agw   {what} {memory:6.0f} MiB")
    print(f"  finite-difference vs exact second-order gate gradient (eps = 0.01 / ||v||): relative difference "
          f"{agreement:.3f} (the step crosses ReLU kinks; see the NFS docstring)")


def _rfm_iteration(method, device, arch, height, width, P, K, iters):
    """Seconds per training iteration (forward, loss, backward, SGD step) of `method` ('agw' or 'rfm') on random
    images, and peak memory in MiB (CPU: growth of the process's max RSS; GPU: max allocated)."""
    import time

    import torch
    import torch.nn.functional as F

    from methods import agw, rfm
    rss0 = max_rss_kib()
    torch.manual_seed(0)
    module = agw if method == "agw" else rfm
    settings = module.Settings(arch=arch, pretrained="none", height=height, width=width, P=P, K=K,
                               **({"parts": 4} if method == "rfm" and height < 192 else {}))
    model = module.build(settings, 100).to(device).train()
    y = torch.arange(P, device=device).repeat_interleave(K)
    batch = {"x_v": torch.randn(P * K, 3, height, width, device=device), "y_v": y, "y_r": y,
             "x_r": torch.randn(P * K, 3, height, width, device=device)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        if method == "agw":
            f, logits = model(batch["x_v"], batch["x_r"])
            labels = torch.cat([y, y])
            loss = F.cross_entropy(logits, labels) + agw.L_wrt(f, labels)
        else:
            loss = rfm.objective(model, batch, settings)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()                                                  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = (max_rss_kib() - rss0) / 1024
    return (time.perf_counter() - start) / iters, peak


def bench_rfm():
    """RFM (methods/rfm.py): the LTG's images/s per f_g (one thread, as a loader worker), the loader's images/s
    with and without it, and a training iteration's time and peak memory relative to an AGW iteration at the same
    batch and image size. CPU: resnet18 at 128x64, P=8 K=4 (the synthetic recipes), each model in a fresh
    process so max RSS compares; on a GPU also resnet50 at 288x144."""
    import time

    import numpy as np
    import torch

    import data
    from methods import rfm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        for H, W in ((128, 64), (384, 192)):
            blocks = rng.random((64, 3, H // 16, W // 16), dtype=np.float32)       # blocky images, 16 px cells
            x = torch.from_numpy(blocks.repeat(16, 2).repeat(16, 3))
            line = []
            for f_g in rfm.F_G:
                ltg = rfm.LTG(p=0.5, f_g=f_g)
                best, rects = 0.0, []
                for r in range(3):
                    start = time.perf_counter()
                    _, _, n = ltg.transform(x, np.random.default_rng(r))
                    best = max(best, len(x) / (time.perf_counter() - start))
                    rects.append(n[n > 0].float().mean().item())
                line.append(f"{f_g} {best:6.0f} img/s ({np.mean(rects):4.1f} rect/img)")
            print(f"LTG alone, {H}x{W}, p=0.5, 1 thread: " + ", ".join(line))
        H, W, P, K = 128, 64, 8, 4
        labels = np.repeat(np.arange(32), 8)
        images = data.ImageSet([f"{i}" for i in range(len(labels))], labels, np.ones(len(labels), np.int64),
                               rng.integers(0, 256, (len(labels), H, W, 3), dtype=np.uint8))
        trainset = data.TrainSet(images, images, 32)
        for name, extra in (("without LTG", None), ("with LTG", rfm.LTG())):
            loader = data.train_loader(trainset, P, K, 0, data.Augment(H, W, erasing=0.0, extra=extra))
            start = time.perf_counter()
            n = sum(len(b["x_v"]) + len(b["x_r"]) for b in loader.epoch(0))
            print(f"loader {name} (random images {H}x{W}, 1 thread): {n / (time.perf_counter() - start):6.0f} img/s")
    finally:
        torch.set_num_threads(threads)

    runs = [("cpu", "resnet18", 128, 64)] + ([("cuda", "resnet50", 288, 144)] if torch.cuda.is_available() else [])
    for device, arch, h, w in runs:
        if device == "cpu":
            (a_s, a_mem), (r_s, r_mem) = (in_child(_rfm_iteration, m, device, arch, h, w, 8, 4, 3)[0]
                                          for m in ("agw", "rfm"))
        else:
            (a_s, a_mem), (r_s, r_mem) = (_rfm_iteration(m, device, arch, h, w, 8, 4, 10) for m in ("agw", "rfm"))
        where = f"cpu, {torch.get_num_threads()} threads" if device == "cpu" else device
        print(f"training iteration ({where}, {arch}, {h}x{w}, P=8 K=4): "
              f"agw {a_s:.2f} s, {a_mem:.0f} MiB; rfm {r_s:.2f} s ({r_s / a_s:.2f}x), {r_mem:.0f} MiB "
              f"({r_mem / a_mem:.2f}x) (memory: {'max RSS growth' if device == 'cpu' else 'max allocated'})")


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
