"""Benchmarks: speed and memory figures quoted in the README, measured on the machine it runs on.

    python bench.py              # every benchmark
    python bench.py loader eval  # only the named ones

One statistic for every time: the best of 3 timed runs after 1 warm-up (`seconds_per_step`), synchronised on CUDA;
only `bench_eval`'s slow per-query loop and its run under tracemalloc are timed once.
A training iteration is a step function, built by `agw_step` or a method's `*_step` around that method's own
`objective` (nothing of a loss is re-typed here), and timed in a fresh process, which also gives its peak memory
(`measure`). Every method's figure is printed beside one AGW reference step (`agw_step`), measured once per
`python bench.py ...` call for each batch and image size and shared by the benchmarks of that call. Steps run on
random images, in float32 (no autocast), on the GPU where there is one.

Figures are printed, never asserted: tests check correctness, this file measures cost.
"""
import contextlib
import dataclasses
import functools
import inspect
import multiprocessing
import sys
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T

import data
import eval as reid_eval
from methods import agw, cmnas, mce, nfs, rfm, ssft

TIMED, WARMUP = 3, 1
STATISTIC = f"best of {TIMED} after {WARMUP} warm-up"
NUM_CLASSES = 100                                # classifier width of every benchmarked network


# ---------------------------------------------------------------- the timer and the fresh process

def seconds_per_step(step, n=TIMED, warmup=WARMUP, device="cpu"):
    """The timer of every figure: seconds of the fastest of `n` calls of step() after `warmup` untimed calls;
    on CUDA each call ends with a synchronisation, so its kernels are inside its time."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


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
    base = max_rss_kib()
    result = job(*args)
    cuda = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
    queue.put((result, (max_rss_kib() - base) / 1024, cuda))


def in_child(job, *args):
    """job(*args) in a fresh (spawned) process, so memory figures of different jobs compare:
    (result, peak RSS growth in MiB, CUDA peak in MiB or None)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(job, args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def peak_memory(rss_mib, cuda_mib):
    """The figure to report in MiB: the CUDA peak on a GPU, else the peak RSS growth."""
    return cuda_mib if cuda_mib is not None else rss_mib


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _time_step(make_step, args):
    """In the fresh process: the step of make_step(*args, device=...) under seed 0, timed."""
    torch.manual_seed(0)
    device = default_device()
    return seconds_per_step(make_step(*args, device=device), device=device)


def measure(make_step, *args):
    """(seconds per step, peak MiB) of the step make_step(*args, device=...) builds, in a fresh process."""
    seconds, *peak = in_child(_time_step, make_step, args)
    return seconds, peak_memory(*peak)


def report(label, measured, reference):
    """One training-step line: `measured` = (seconds, MiB) beside the AGW `reference` of the same sizes."""
    (seconds, mib), (agw_seconds, agw_mib) = measured, reference
    print(f"  {label:48s} {seconds:6.2f} s/it {seconds / agw_seconds:5.2f}x agw   {mib:6.0f} MiB (agw {agw_mib:.0f})")


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as a DataLoader worker process gets it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def images_per_epoch(loader, epoch):
    """Runs one loader epoch; the number of images (visible + infrared) it gave."""
    return sum(len(b["x_v"]) + len(b["x_r"]) for b in loader.epoch(epoch))


# ---------------------------------------------------------------- training steps

def random_batch(P, K, h, w, device, modalities="vr"):
    """A P x K batch of random images per modality ('x_v', 'x_r'[, 'x_a']: (PK, 3, h, w)) with labels 'y_v', 'y_r'."""
    y = torch.arange(P, device=device).repeat_interleave(K)                        # (PK,)
    return {**{f"x_{m}": torch.randn(P * K, 3, h, w, device=device) for m in modalities}, "y_v": y, "y_r": y}


def synthetic(module, **overrides):
    """The method's Settings of its CPU recipe (module.SYNTHETIC), with the benchmark's sizes."""
    return module.Settings(**{**module.SYNTHETIC, **overrides})


def descent_step(objective, optimizer, inputs=None):
    """A training step: (loss, terms) = objective(), gradients of loss (w.r.t. `inputs`, default all), one
    optimizer step."""
    def step():
        loss, _ = objective()
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=inputs)
        optimizer.step()
    return step


def agw_step(P, K, h, w, arch, *, device):
    """The AGW reference step that every method is compared with: agw.SYNTHETIC (non-local blocks, GeM, BNNeck) at
    h x w and `arch`, agw.objective on a random batch, and a plain SGD step with agw.train's momentum, Nesterov and
    weight decay over all parameters in one group (agw.train gives backbone and head different learning rates:
    the same work per step)."""
    settings = synthetic(agw, arch=arch, height=h, width=w)
    model = agw.build(settings, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay, nesterov=True)
    batch = random_batch(P, K, h, w, device)
    return descent_step(lambda: agw.objective(model, batch, settings), optimizer)


def ssft_step(P, K, h, w, *, device):
    """ssft.train's iteration: the objective runs Eq. (21)'s max step (the adversaries' Adam) on its forward, then
    L_min steps the network's Adam over Theta_N; both optimizers as ssft.train builds them."""
    settings = synthetic(ssft, height=h, width=w)
    model = ssft.build(settings, NUM_CLASSES).to(device).train()
    net, adversaries = ssft.split_parameters(model)
    opt_net = torch.optim.Adam(net, lr=settings.lr, weight_decay=settings.weight_decay)
    opt_adv = torch.optim.Adam(adversaries, lr=settings.lr, weight_decay=settings.weight_decay)
    batch = random_batch(P, K, h, w, device)

    def adversary_step(out):
        return ssft.max_step(model, out, settings, opt_adv)
    return descent_step(lambda: ssft.objective(model, batch, settings, adversary_step=adversary_step), opt_net,
                        inputs=net)


def mce_step(P, K, h, w, *, device):
    """mce.train's iteration: mce.objective on v, r and the auxiliary a (which also moves the memories by Eq. 3),
    then mce.train's Adam step. The memories start from random unit rows instead of Eq. (1)'s centroid pass."""
    settings = synthetic(mce, height=h, width=w)
    model = mce.build(settings, NUM_CLASSES).to(device).train()
    keys = ("v", "r", "a", "u") if settings.auxiliary else ("v", "r", "u")
    d = model.bnneck.num_features
    memory = mce.Memory(keys, NUM_CLASSES, d, device)
    memory.initialise({m: F.normalize(torch.randn(NUM_CLASSES, d, device=device), dim=1) for m in keys})
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                 weight_decay=settings.weight_decay)
    batch = random_batch(P, K, h, w, device, "vra" if settings.auxiliary else "vr")
    return descent_step(lambda: mce.objective(model, batch, settings, memory), optimizer)


def mce_pass_step(h, w, *, device):
    """The work of mce.class_centroids' pass: eval-mode forwards of 2 batches of mce.EXTRACT_BATCH random images."""
    model = mce.build(synthetic(mce, height=h, width=w), NUM_CLASSES).to(device).eval()
    images = torch.randn(2 * mce.EXTRACT_BATCH, 3, h, w, device=device)

    @torch.no_grad()
    def step():
        for chunk in images.split(mce.EXTRACT_BATCH):
            F.normalize(model(chunk), dim=1)
    return step


# the resnet18 stand-in for a derived CM-NAS genotype (PAPER_GENOTYPES are ResNet-50's)
CMNAS_RESNET18_GENOTYPE = "0 | 00 01 | 001 11 | 111 11 | 111 11"


def cmnas_step(kind, P, K, h, w, arch, *, device):
    """kind 'search': cmnas.search_step (alpha step on a validation batch, then weight step, with L_C3MMD), with
    cmnas.search's two Adams; 'retrain': cmnas.fit's iteration on a derived network (Eq. 10, with L_C3MMD)."""
    settings = synthetic(cmnas, arch=arch, height=h, width=w)
    genotype = cmnas.PAPER_GENOTYPES["paper-sysu"] if arch == "resnet50" else CMNAS_RESNET18_GENOTYPE
    model = cmnas.build(settings, NUM_CLASSES, {"supernet": True} if kind == "search" else {"genotype": genotype})
    model = model.to(device).train()
    optimizer, _ = cmnas.weight_optimizer(settings, model)
    batch = random_batch(P, K, h, w, device)
    if kind == "retrain":
        return descent_step(lambda: cmnas.objective(model, batch, settings,
                                                    c3mmd=settings.c3mmd in ("both", "retrain")), optimizer)
    arch_optimizer = torch.optim.Adam(model.alphas(), lr=settings.arch_lr, betas=tuple(settings.betas),
                                      weight_decay=settings.arch_weight_decay)
    val_batch, c3mmd = random_batch(P, K, h, w, device), settings.c3mmd in ("both", "search")
    return lambda: cmnas.search_step(model, batch, val_batch, settings, c3mmd, optimizer, arch_optimizer,
                                     contextlib.nullcontext)


def nfs_settings(kind, h, w):
    """nfs.SYNTHETIC at h x w; kind 'first-order', 'finite-difference' or 'exact' picks the gate gradient."""
    return synthetic(nfs, height=h, width=w, first_order=kind == "first-order",
                     hessian="autograd" if kind == "exact" else "finite-difference")


def nfs_step(kind, P, K, h, w, *, device):
    """kind 'retrain': nfs.fit's iteration (fixed gates, Alg. 1 line 6); else nfs.search's iteration (Alg. 1 lines
    3-4): a weight step on L_train, then a gate step on L_val of a second batch, with the gate gradient of `kind`
    ('first-order', 'finite-difference', 'exact'), nfs.weight_optimizer and search's gate Adam."""
    settings = nfs_settings(kind, h, w)
    model = nfs.build(settings, NUM_CLASSES, {"nfs_model": "retrain" if kind == "retrain" else "search"})
    model = model.to(device).train()
    optimizer = nfs.weight_optimizer(model, settings)
    batch = random_batch(P, K, h, w, device)
    if kind == "retrain":
        return descent_step(lambda: nfs.objective(model, batch, settings), optimizer)
    weight_step = descent_step(lambda: nfs.objective(model, batch, settings), optimizer, inputs=model.weights())
    gate_optimizer = torch.optim.Adam(model.fields(), lr=settings.gate_lr, betas=nfs.GATE_BETAS)
    xi, val_batch = nfs.step_sizes(model, optimizer), random_batch(P, K, h, w, device)

    def step():
        weight_step()                                                            # Alg. 1 line 3
        grads, _ = nfs.gate_gradient(model, batch, val_batch, settings, xi)      # Alg. 1 line 4
        for p, g in zip(model.fields(), grads):
            p.grad = g
        gate_optimizer.step()
    return step


def nfs_gate_agreement(P, K, h, w):
    """||g_fd - g_exact|| / ||g_exact|| of the second-order gate gradient of a fresh search network on one pair of
    random batches, the same gate draws for both."""
    torch.manual_seed(0)
    device = default_device()
    settings = nfs_settings("exact", h, w)
    model = nfs.build(settings, NUM_CLASSES, {"nfs_model": "search"}).to(device).train()
    xi = nfs.step_sizes(model, nfs.weight_optimizer(model, settings))
    batch, val_batch = random_batch(P, K, h, w, device), random_batch(P, K, h, w, device)
    grads = []
    for hessian in ("autograd", "finite-difference"):
        torch.manual_seed(1)
        g, _ = nfs.gate_gradient(model, batch, val_batch, dataclasses.replace(settings, hessian=hessian), xi)
        grads.append(torch.cat([t.flatten() for t in g]))
    return float((grads[1] - grads[0]).norm() / grads[0].norm())


def rfm_step(P, K, h, w, arch, *, device):
    """RFM at its paper Settings with `arch` from scratch at h x w (4 parts below 192 pixels), rfm.objective on a
    random batch, and a plain SGD step with rfm.train's momentum, Nesterov and weight decay over all parameters
    in one group (rfm.train gives backbone and heads different learning rates: the same work per step)."""
    settings = rfm.Settings(arch=arch, pretrained="none", height=h, width=w, P=P, K=K,
                            **({"parts": 4} if h < 192 else {}))
    model = rfm.build(settings, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    batch = random_batch(P, K, h, w, device)
    return descent_step(lambda: rfm.objective(model, batch, settings), optimizer)


# ---------------------------------------------------------------- benchmarks

def bench_loader():
    """Augmented training images/s in one process with one thread (what a DataLoader worker gets):
    data.py's batch pipeline on the uint8 cache vs the community per-image PIL pipeline, same images and batches."""
    H, W, P, K, n_ids, per_id = 288, 144, 8, 4, 32, 16
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

    def pil():      # the same sampled images, one at a time
        for idx_v, idx_r in loader.sampler.epoch(1):
            torch.stack([community(img) for img in ts.v.images[idx_v]])
            torch.stack([community(img) for img in ts.r.images[idx_r]])
    n = 2 * P * K * len(loader)
    with one_thread():
        ours_s, pil_s = seconds_per_step(lambda: images_per_epoch(loader, 1)), seconds_per_step(pil)
    print(f"augmented training images/s per worker process (1 thread, {H}x{W}, P={P} K={K}, {n} images per epoch):")
    print(f"  data.py batch pipeline (uint8 cache, torch ops): {n / ours_s:8.0f} images/s")
    print(f"  community per-image PIL pipeline:                 {n / pil_s:8.0f} images/s")
    print(f"  ratio: {pil_s / ours_s:.1f}x")


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
    rng = np.random.default_rng(0)
    sizes = [("SYSU single-shot", 3803, 301, 96, "sysu"), ("SYSU multi-shot", 3803, 3010, 96, "sysu"),
             ("RegDB", 2060, 2060, 206, "regdb")]
    for name, nq, ng, ids, protocol in sizes:
        q_pids, g_pids = rng.integers(0, ids, nq), np.arange(ng) % ids
        q_cams, g_cams = rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng)
        noisy = rng.random((nq, ng)) - 0.1 * (q_pids[:, None] == g_pids)
        distmat = np.argsort(np.argsort(noisy, axis=1), axis=1).astype(np.float32)   # (nq, ng) distinct ranks
        args = (distmat, q_pids, g_pids, q_cams, g_cams, protocol)
        loop = []
        loop_s = seconds_per_step(lambda: loop.append(_community_loop(*args)), n=1, warmup=0)   # slow: timed once
        (cmc, mAP, mINP), r = loop[0], reid_eval.evaluate(*args)
        fast_s = seconds_per_step(lambda: reid_eval.evaluate(*args))
        diff = max(np.abs(r["cmc"] - cmc).max(), abs(r["mAP"] - mAP), abs(r["mINP"] - mINP))
        print(f"{name:17s} {nq} x {ng}: loop {loop_s:6.2f} s, evaluate {fast_s:.3f} s "
              f"({loop_s / fast_s:5.1f}x faster); rank-1 {100 * r['cmc'][0]:.2f} %, mAP {100 * r['mAP']:.2f} %, "
              f"largest difference {diff:.1e}")

    nq, ng = 1000, 100_000
    distmat = rng.random((nq, ng), dtype=np.float32)
    q_pids, g_pids = rng.integers(0, 1000, nq), np.arange(ng) % 1000
    q_cams, g_cams = rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng)
    tracemalloc.start()
    seconds = seconds_per_step(lambda: reid_eval.evaluate(distmat, q_pids, g_pids, q_cams, g_cams), n=1, warmup=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{nq} x {ng}: evaluate {seconds:.2f} s (once, under tracemalloc), peak working memory "
          f"{peak / 2**20:.0f} MiB (queries go in chunks, so it does not grow with the number of queries)")


def ssft_test_seconds(Nq, Ng, c, n_single):
    """Test-time SSTN at SYSU-MM01 multi-shot size with ResNet-50 feature sizes, on random features: seconds of
    the transductive pass over all Nq + Ng samples (and the query-gallery distances), and of `n_single`
    single-query (Eq. 22) rows."""
    torch.manual_seed(0)
    device = default_device()
    model = SimpleNamespace(c=c, sht=True, spt=True, sstn=ssft.SSTN(c, 395, bnneck=True).to(device).eval())
    H, P = torch.randn(Nq + Ng, c, device=device), torch.randn(Nq + Ng, c, device=device)
    is_r = torch.arange(Nq + Ng, device=device) < Nq                 # queries infrared, gallery visible

    def transductive():
        T_all = ssft.sstn_transductive(model, H, P, is_r, 4)
        torch.cdist(T_all[:Nq], T_all[Nq:])

    def single_query():
        ssft.sstn_single_query(model, H[:n_single], P[:n_single], is_r[:n_single], H[Nq:], P[Nq:], is_r[Nq:], 4)
    with torch.no_grad():
        return seconds_per_step(transductive, device=device), seconds_per_step(single_query, device=device)


def bench_ssft(reference):
    """cm-SSFT: a training iteration (forward, max step, min step) against the AGW step at the same batch and
    image size, and test-time SSTN at SYSU-MM01 multi-shot size (its memory: the fresh process's peak growth)."""
    P, K, h, w = 8, 4, 128, 64
    print(f"training iteration, resnet18 from scratch, {h}x{w}, P={P} K={K} ({P * K} visible + {P * K} infrared):")
    agw_ref = reference(P, K, h, w, "resnet18")
    report("agw", agw_ref, agw_ref)
    report("ssft (max step and min step)", measure(ssft_step, P, K, h, w), agw_ref)
    report("ssft at its SYNTHETIC size 96x48 (vs agw 128x64)", measure(ssft_step, P, K, 96, 48), agw_ref)
    nq, ng, c, n_single = 3803, 3010, 2048, 50
    (transductive, single), *peak = in_child(ssft_test_seconds, nq, ng, c, n_single)
    print(f"test-time SSTN at SYSU-MM01 multi-shot size ({nq} queries + {ng} gallery, c={c} as ResNet-50, "
          f"random features):")
    print(f"  transductive (all queries + gallery, one pass): {transductive:6.2f} s")
    print(f"  single-query (Eq. 22): {single:6.2f} s for {n_single} queries -> {single * nq / n_single:6.1f} s "
          f"for all {nq} (extrapolated)")
    n = nq + ng
    print(f"  peak memory of both: {peak_memory(*peak):.0f} MiB; linear in N = {n}: no N x N matrix is formed (the "
          f"inputs H, P take {2 * n * c * 4 / 2 ** 20:.0f} MiB, Z = [H; P; 0] {n * 3 * c * 4 / 2 ** 20:.0f} MiB, a "
          f"dense affinity would take {n * n * 4 / 2 ** 20:.0f} MiB)")


def bench_mce(reference):
    """MCE: a training iteration (v, r and the auxiliary a; Eq. 2-10 and the Eq. 3 updates) against the AGW step
    (v, r) at the same P, K and image size, and the share of an epoch spent on the end-of-epoch centroid pass
    (2 N_v + N_r images, eval-mode forward only), at 128 x 64 and at the SYNTHETIC recipe's size."""
    P, K, h, w = 8, 4, 128, 64
    print(f"training iteration, resnet18 from scratch, {h}x{w}, P={P} K={K}:")
    agw_ref, mce_it = reference(P, K, h, w, "resnet18"), measure(mce_step, P, K, h, w)
    report(f"agw ({2 * P * K} images: v, r)", agw_ref, agw_ref)
    report(f"mce ({3 * P * K} images: v, r and the auxiliary a)", mce_it, agw_ref)
    sh, sw = mce.SYNTHETIC["height"], mce.SYNTHETIC["width"]
    for h, w, it_s in ((h, w, mce_it[0]), (sh, sw, measure(mce_step, P, K, sh, sw)[0])):
        rate = 2 * mce.EXTRACT_BATCH / measure(mce_pass_step, h, w)[0]
        print(f"  {h}x{w}: iteration {it_s:.2f} s; centroid pass {rate:.0f} images/s (eval forward, batches of "
              f"{mce.EXTRACT_BATCH})")
        for name, n_v, n_r in (("synthetic world", 1474, 756), ("SYSU-MM01", 22258, 11909), ("RegDB", 2060, 2060)):
            its = max(n_v, n_r) // (P * K)
            train_s, pass_s = its * it_s, (2 * n_v + n_r) / rate
            print(f"    {name:15s}: {its} iterations ({train_s:.0f} s) + pass over {2 * n_v + n_r} images "
                  f"({pass_s:.0f} s) per epoch -> the pass is {100 * pass_s / (train_s + pass_s):.0f} % of the epoch")


def bench_cmnas(reference):
    """CM-NAS: a search iteration (alpha step on a validation batch + weight step, both with L_C3MMD) and a
    retrain iteration of a derived network, against the AGW step (with its non-local blocks and GeM) at the same
    batch and image size; resnet50 at 256x128 on a GPU."""
    P, K = 8, 4
    arch, h, w = ("resnet50", 256, 128) if torch.cuda.is_available() else ("resnet18", 128, 64)
    print(f"training iteration, {arch} from scratch, {h}x{w}, P={P} K={K} ({P * K} visible + {P * K} infrared):")
    agw_ref = reference(P, K, h, w, arch)
    report("agw", agw_ref, agw_ref)
    for kind in ("search", "retrain"):
        report(f"cmnas {kind}", measure(cmnas_step, kind, P, K, h, w, arch), agw_ref)


def bench_nfs(reference):
    """NFS: one search iteration (Alg. 1 lines 3-4, first- and second-order) and one retrain iteration (line 6)
    against the AGW step at the same batch and image size."""
    P, K, h, w = 8, 4, 128, 64
    print(f"training iterations, resnet18 from scratch, {h}x{w}, P={P} K={K} ({P * K} visible + {P * K} infrared), "
          f"search cells after stages 1-3:")
    agw_ref = reference(P, K, h, w, "resnet18")
    report("agw", agw_ref, agw_ref)
    for kind, label in (("retrain", "nfs retrain (fixed gates)"), ("first-order", "nfs search, first order"),
                        ("finite-difference", "nfs search, second order (DARTS finite diff.)"),
                        ("exact", "nfs search, second order (exact, the default)")):
        report(label, measure(nfs_step, kind, P, K, h, w), agw_ref)
    agreement = in_child(nfs_gate_agreement, P, K, h, w)[0]
    print(f"  finite-difference vs exact second-order gate gradient of a fresh search network (eps = 0.01 / ||v||): "
          f"relative difference {agreement:.3f} (the step crosses ReLU kinks; see the NFS docstring)")


def bench_rfm(reference):
    """RFM (methods/rfm.py): the LTG's images/s per f_g (one thread, as a loader worker), the loader's images/s
    with and without it, and a training iteration against the AGW step at the same batch and image size:
    resnet18 at 128x64, P=8 K=4 (the synthetic recipes); on a GPU also resnet50 at 288x144."""
    rng = np.random.default_rng(0)
    with one_thread():
        for H, W in ((128, 64), (384, 192)):
            blocks = rng.random((64, 3, H // 16, W // 16), dtype=np.float32)       # blocky images, 16 px cells
            x = torch.from_numpy(blocks.repeat(16, 2).repeat(16, 3))
            line = []
            for f_g in rfm.F_G:
                ltg, ltg_rng, rects = rfm.LinearTransformationGenerator(p=0.5, f_g=f_g), np.random.default_rng(0), []

                def transform():
                    n = ltg.transform(x, ltg_rng)[2]
                    rects.append(n[n > 0].float().mean().item())
                seconds = seconds_per_step(transform)
                line.append(f"{f_g} {len(x) / seconds:6.0f} img/s ({np.mean(rects):4.1f} rect/img)")
            print(f"LTG alone, {H}x{W}, p=0.5, 1 thread: " + ", ".join(line))
        H, W, P, K = 128, 64, 8, 4
        labels = np.repeat(np.arange(32), 8)
        images = data.ImageSet([f"{i}" for i in range(len(labels))], labels, np.ones(len(labels), np.int64),
                               rng.integers(0, 256, (len(labels), H, W, 3), dtype=np.uint8))
        trainset = data.TrainSet(images, images, 32)
        for name, extra in (("without LTG", None), ("with LTG", rfm.LTG())):
            loader = data.train_loader(trainset, P, K, 0, data.Augment(H, W, erasing=0.0, extra=extra))
            seconds = seconds_per_step(lambda: images_per_epoch(loader, 0))
            print(f"loader {name} (random images {H}x{W}, 1 thread): {2 * P * K * len(loader) / seconds:6.0f} img/s")

    sizes = [("resnet18", 128, 64)] + ([("resnet50", 288, 144)] if torch.cuda.is_available() else [])
    for arch, h, w in sizes:
        print(f"training iteration, {arch} from scratch, {h}x{w}, P={P} K={K}:")
        agw_ref = reference(P, K, h, w, arch)
        report("agw", agw_ref, agw_ref)
        report("rfm", measure(rfm_step, P, K, h, w, arch), agw_ref)


def main(argv):
    benches = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    wanted = argv or list(benches)
    unknown = [w for w in wanted if w not in benches]
    if unknown:
        sys.exit(f"bench.py: unknown benchmark {unknown}; choose from {sorted(benches)}")
    gpu = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if gpu else f"cpu, {torch.get_num_threads()} threads"
    memory = "CUDA max_memory_allocated" if gpu else "peak RSS growth (VmHWM)"
    print(f"bench.py on {where}; times: {STATISTIC} (eval's per-query loop and tracemalloc run: once); a training "
          f"iteration: a fresh process each, random images, float32, memory = its {memory}, beside one AGW step "
          f"measured once in this call per size")
    reference = functools.cache(functools.partial(measure, agw_step))   # (P, K, h, w, arch) -> AGW's (s, MiB)
    for name in wanted:
        print(f"== {name}")
        bench = benches[name]
        bench(reference) if "reference" in inspect.signature(bench).parameters else bench()


if __name__ == "__main__":
    main(sys.argv[1:])
