"""Datasets, protocols and the training batch pipeline shared by every method.

Implements:
- readers for SYSU-MM01, RegDB and LLCM as they ship (the layouts: README, "Running on the real benchmarks"),
  an automatic uint8 image cache, the cross-modality identity sampler and batch-level augmentation;
- the SYSU-MM01 test protocol of the community (the data manager of the Cross-Modal-Re-ID-baseline that the
  papers' numbers come from), NOT the dataset authors' MATLAB evaluation, which uses fixed pre-drawn
  permutations. Queries are all infrared test images (cams 3, 6; for id in sorted ids, for cam in [3, 6], sorted
  files). For trial t the gallery is drawn with Python's `random` seeded with t, fresh for every (mode, shot,
  trial): for id in sorted ids, for cam in the mode's visible cameras (all: 1, 2, 4, 5; indoor: 1, 2) whose
  directory exists, over the sorted file list, `random.choice(files)` for single shot and
  `random.sample(files, 10)` for multi shot. 10 trials, t = 0..9.

Readings and choices:
- The AGW community baseline has no multi-shot test; the multi-shot rule (`random.sample(files, 10)` after
  `random.seed(trial)`) is the one of the CM-NAS and MCE released code (JDAI-CV/CM-NAS datasets/sysu_dataset.py
  and IDLNL/MCE data_manager.py, process_gallery_sysu).
- Files whose name starts with '.' (e.g. .DS_Store) inside an identity directory are ignored; any other file
  that is not a readable image (Thumbs.db, a truncated .jpg) is an error, all of them named in one message.
- A directory or list that cannot be read is an error naming it, never an empty camera or identity.

Deviations:
- With fewer than 10 images in a camera the multi-shot gallery draws `random.sample(files, len(files))` (all of
  them); the CM-NAS and MCE code raises there (never on the real data).
- Images are resized with PIL bilinear (antialiased when shrinking); the community pre-processing uses LANCZOS
  (`Image.ANTIALIAS`).
- Augmentation runs per batch with torch ops on the uint8 cache instead of per image with PIL; zero pad 10 +
  random crop, horizontal flip p=0.5 and ImageNet normalisation are the community AGW ones
  (Cross-Modal-Re-ID-baseline train.py:114-121, which has no erasing); random erasing (Zhong et al.) is an option
  (each method's `erasing` probability; CAJ's `--rande`, default off, ICCV21_CAJ/train_ext.py:67): area 0.02-0.4,
  aspect uniform in 0.3-3.33, up to 100 tries, erased pixels set to 0 after normalisation (the ImageNet mean
  colour; CAJ and MCE fill the CIFAR means 0.4914, 0.4822, 0.4465 after normalisation, ChannelAug.py:107).
- An epoch has at least one batch, also when max(#v, #r) < P K.
"""
import collections
import errno
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import signal
import stat
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SYNTHETIC_MARKER = "synthetic.json"  # synthetic.py writes it at the root of every world it builds (its MARKER)


class UserError(Exception):
    """A problem the user can fix (a path, a flag value, a file). reid.py prints it as one line and exits 2.
    Defined here, in the lowest layer (this file imports nothing of the project's), so that eval.py and
    synthetic.py need not import the methods package; methods/common.py re-exports it for the methods."""


SYSU_VISIBLE_CAMS = (1, 2, 4, 5)
SYSU_INFRARED_CAMS = (3, 6)
SYSU_GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
SYSU_SHOTS = {"single": 1, "multi": 10}
SYSU_TRIALS = 10
SYSU_PUBLISHED = {"train ids": 395, "train visible images": 22258, "train infrared images": 11909,
                  "test ids": 96, "test queries (infrared)": 3803}
REGDB_TRIALS = range(1, 11)
REGDB_PUBLISHED = {"train ids": 206, "train visible images": 2060, "train thermal images": 2060,
                   "test ids": 206, "test visible images": 2060, "test thermal images": 2060}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASE_AREA = (0.02, 0.4)        # random erasing, Zhong et al. (AAAI 2020), as in CAJ's and MCE's pipelines
ERASE_ASPECT = 0.3              # aspect ratio uniform in [0.3, 1 / 0.3]
ERASE_TRIES = 100
CACHE_VERSION = "uint8-rgb-bilinear-1"   # part of the cache key: bump when the decoding changes
DECODE_PROCESSES = 2
POOL_MIN_IMAGES = 512           # below this, decoding in-process is faster than starting worker processes
PROGRESS_SECONDS = 5.0
DECODE_STALL_SECONDS = 120.0    # a decode process silent this long is stuck: stop and name its image
CONTENT_WINDOW = 16 * 1024      # cache key: bytes hashed at each end of a file (the whole file up to twice this)
BAD_IMAGES_SHOWN = 10           # unreadable images named in the error; the rest are counted
CACHE_SPARE_BYTES = 16 * 2 ** 20  # free space that must remain after the image cache is written


class DataError(UserError):
    """Bad dataset input (path, index file, image, protocol value)."""


class BadImages(DataError):
    """Unreadable image files; `bad` lists them as [(path, reason), ...] so that a loader can report every set's."""

    def __init__(self, message, bad):
        super().__init__(message)
        self.bad = bad


# ---------------------------------------------------------------- containers

@dataclass
class ImageSet:
    """One modality's images, in protocol order."""
    files: list          # absolute paths
    labels: np.ndarray   # (N,) int64 identity labels (training: 0..C-1; test: original ids)
    cams: np.ndarray     # (N,) int64 camera numbers (SYSU 1..6; RegDB 1 visible, 2 thermal)
    images: np.ndarray   # (N, H, W, 3) uint8 RGB at the working resolution (may be a read-only np.memmap)

    def __len__(self):
        return len(self.files)

    def subset(self, idx):
        """The images at `idx` (int indices or a boolean mask), in that order; images are copied into memory."""
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return ImageSet([self.files[i] for i in idx], self.labels[idx], self.cams[idx], self.images[idx])


@dataclass
class TrainSet:
    v: ImageSet
    r: ImageSet
    num_classes: int     # identities; labels are 0..num_classes-1

    def split_ids(self, frac, seed):
        """Split by identity (CM-NAS: 8:2): a random `frac` of the identities, and the rest.

        Labels stay global and both parts keep `num_classes` of the whole set (one classifier serves both)."""
        ids = np.unique(np.concatenate([self.v.labels, self.r.labels]))
        n_a = _split_count(frac, len(ids), "identities")
        a_ids = np.random.default_rng(seed).permutation(ids)[:n_a]
        in_a_v, in_a_r = np.isin(self.v.labels, a_ids), np.isin(self.r.labels, a_ids)
        return (TrainSet(self.v.subset(in_a_v), self.r.subset(in_a_r), self.num_classes),
                TrainSet(self.v.subset(~in_a_v), self.r.subset(~in_a_r), self.num_classes))

    def split_images(self, frac, seed):
        """Split by image (NFS: 80/20), per modality and per identity, so both parts hold every identity.

        Each (modality, identity) with n images gives round(frac n) of them, clipped to 1..n-1 when n >= 2,
        to the first part; a single image goes to the first part. Labels and num_classes stay global."""
        _check_fraction(frac)
        rng = np.random.default_rng(seed)
        parts = []
        for s in (self.v, self.r):
            in_a = np.zeros(len(s), dtype=bool)
            for label in np.unique(s.labels):
                idx = rng.permutation(np.flatnonzero(s.labels == label))
                n_a = len(idx) if len(idx) == 1 else min(max(int(round(frac * len(idx))), 1), len(idx) - 1)
                in_a[idx[:n_a]] = True
            parts.append(in_a)
        in_v, in_r = parts
        return (TrainSet(self.v.subset(in_v), self.r.subset(in_r), self.num_classes),
                TrainSet(self.v.subset(~in_v), self.r.subset(~in_r), self.num_classes))


def _check_fraction(frac):
    if not 0.0 < frac < 1.0:
        raise DataError(f"split fraction {frac} is outside (0, 1); pass a fraction such as 0.8")


def _split_count(frac, n, what):
    _check_fraction(frac)
    n_a = int(round(frac * n))
    if not 0 < n_a < n:
        raise DataError(f"split fraction {frac} of {n} {what} leaves one part empty; use more {what} or another fraction")
    return n_a


@dataclass
class Protocol:
    """One evaluation setting: pool keys, eval kind and per-trial index arrays into the pools."""
    name: str            # 'all-single', ..., 'visible-to-infrared', 'infrared-to-visible'
    query: str           # pool key 'v' or 'r'
    gallery: str
    kind: str            # 'sysu' or 'regdb' (eval.evaluate protocol argument)
    trials: list         # [(query indices (Nq,) int64, gallery indices (Ng,) int64), ...]


@dataclass
class TestSet:
    pools: dict          # {'v': ImageSet, 'r': ImageSet}: all test images of each modality
    protocols: list      # [Protocol, ...]


# ---------------------------------------------------------------- image cache

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _reason(exc, path):
    """'ErrorType: message' of one failed read of `path` (the path itself left out), short enough for one line."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = text.replace(f" {path!r}", "").replace(path, "").strip()
    return f"{type(exc).__name__}: {text}"[:160]


def _decode(path, height, width):
    """One file -> ((height, width, 3) uint8 RGB, None), or (None, reason) when it is not a readable image."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((width, height), Image.BILINEAR)   # Deviation: community LANCZOS
            return np.asarray(im, dtype=np.uint8), None
    except Exception as exc:   # PIL raises many types for broken files; every one means the same to the user
        return None, _reason(exc, path)


def _bad_images_error(bad):
    """[(path, reason), ...] -> one DataError: every unreadable file up to BAD_IMAGES_SHOWN named, the rest counted,
    and the fix for each kind of failure seen."""
    denied = [r.startswith("PermissionError") for _, r in bad]
    stray = [not p.lower().endswith(IMAGE_SUFFIXES) for p, _ in bad]
    fixes = (["make the files readable (chmod a+r)"] * any(denied)
             + ["remove the files that are not images (such as Thumbs.db) from the identity folders"] * any(stray)
             + ["replace or re-extract the broken images"] * any(not d and not s for d, s in zip(denied, stray)))
    if len(bad) == 1:
        return BadImages(f"cannot read image {bad[0][0]} ({bad[0][1]}); " + ", ".join(fixes), bad)
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:BAD_IMAGES_SHOWN])
    more = f"; and {len(bad) - BAD_IMAGES_SHOWN} more" if len(bad) > BAD_IMAGES_SHOWN else ""
    return BadImages(f"cannot read {len(bad)} images: {shown}{more}; " + ", ".join(fixes), bad)


class _EverySet:
    """cached_images for each image set of a dataset in turn; the unreadable images of every set are collected and
    `check` raises them as one DataError, so a broken dataset needs one run to list its bad files, not one a set."""

    def __init__(self, height, width, cache_dir, log):
        self.args, self.log, self.bad = (height, width, cache_dir), log, []

    def __call__(self, files, tag):
        try:
            return cached_images(files, *self.args, tag, self.log)
        except BadImages as e:
            self.bad += e.bad
            return None

    def check(self):
        if self.bad:
            raise _bad_images_error(self.bad)


def _cache_key(files, height, width):
    """-> (hex key, [(path, reason), ...] of the files that cannot be opened).

    The key hashes CACHE_VERSION, (H, W) and, per file, its path, size and its first and last CONTENT_WINDOW bytes
    (the whole file when it is at most twice that long, as every RegDB .bmp and most SYSU .jpg are). Modification
    times are not used, so an image edited in place with its size and mtime restored still changes the key; an edit
    confined to the middle of a file longer than 2 CONTENT_WINDOW, leaving both ends alone, does not."""
    h = hashlib.blake2b(f"{CACHE_VERSION}\n{height}x{width}\n".encode(), digest_size=32)
    bad = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                content = fh.read(CONTENT_WINDOW if size > 2 * CONTENT_WINDOW else size)
                if size > 2 * CONTENT_WINDOW:
                    fh.seek(size - CONTENT_WINDOW)
                    content += fh.read(CONTENT_WINDOW)
        except OSError as exc:
            bad.append((f, _reason(exc, f)))
            continue
        h.update(os.fsencode(f) + f"\t{size}\t{len(content)}\n".encode())
        h.update(content)
    return h.hexdigest(), bad


def _decode_worker(conn, out, jobs, height, width):
    """Forked child: decode [(index, path), ...] into the shared memmap `out`, sending (index, reason or None) after
    each image. It never raises on a bad file, so the parent hears about every image."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's; it stops the children
    try:
        for i, path in jobs:
            img, reason = _decode(path, height, width)
            if img is not None:
                out[i] = img
            conn.send((i, reason))
    except (BrokenPipeError, EOFError):              # the parent is gone
        pass
    finally:
        conn.close()


def _decode_forked(out, files, height, width, tag, log):
    """_decode_into over DECODE_PROCESSES forked children, each with an interleaved share of the files, its own pipe
    and no shared lock. The parent waits on the pipes with a timeout, so it cannot hang: a child that dies (signal
    or exit) or stays silent for DECODE_STALL_SECONDS is a DataError naming the image it was on, and every child is
    killed on the way out. (multiprocessing.Pool, used before, could hang when a worker raised: Pool.terminate
    takes the result queue's lock, which a worker still writing a large result holds; D18.)"""
    ctx = multiprocessing.get_context("fork")
    Image.init()                                     # import every PIL plugin before forking: a file PIL cannot
    sys.stdout.flush()                               # identify makes it try them all; and a forked child must not
    sys.stderr.flush()                               # write out the parent's buffered output a second time
    n = min(DECODE_PROCESSES, len(files))
    procs, conns, pending, bad = [], [], [], []
    start = last = time.time()
    done = 0
    try:
        for w in range(n):
            jobs = [(i, files[i]) for i in range(w, len(files), n)]
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_decode_worker, args=(send, out, jobs, height, width), daemon=True)
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
            pending.append(collections.deque(i for i, _ in jobs))
        live = dict(zip(conns, range(n)))
        while live:
            ready = multiprocessing.connection.wait(list(live), timeout=DECODE_STALL_SECONDS)
            if not ready:
                stuck = ", ".join(files[pending[w][0]] for w in live.values() if pending[w])
                raise DataError(f"decoding {tag} stalled: no image finished in {DECODE_STALL_SECONDS:.0f} s, the "
                                f"decoder is stuck on {stuck}; replace or remove that file and rerun")
            for c in ready:
                w = live[c]
                try:
                    i, reason = c.recv()
                except EOFError:                     # the child exited: finished, or died on pending[w][0]
                    del live[c]
                    procs[w].join()
                    if pending[w]:
                        code = procs[w].exitcode
                        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                        hint = ("; the disk holding the cache may be full: free space or choose another cache "
                                "directory" if code == -signal.SIGBUS else "; replace or remove that file and rerun")
                        raise DataError(f"the decode process for {tag} died ({how}) while reading "
                                        f"{files[pending[w][0]]}{hint}")
                    continue
                pending[w].popleft()
                done += 1
                if reason is not None:
                    bad.append((i, files[i], reason))
                if time.time() - last > PROGRESS_SECONDS:
                    last = time.time()
                    log(f"  {tag}: {done}/{len(files)} images, {done / (last - start):.0f} images/s")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for c in conns:
            c.close()
    return [(f, r) for _, f, r in sorted(bad)]


def _decode_into(out, files, height, width, tag, log):
    """Decode `files` into the (N, H, W, 3) uint8 array `out` -> [(path, reason), ...] of the files that are not
    readable images; every file is tried. Large lists go to forked processes (_decode_forked)."""
    if len(files) >= POOL_MIN_IMAGES and DECODE_PROCESSES > 1 and "fork" in multiprocessing.get_all_start_methods():
        return _decode_forked(out, files, height, width, tag, log)
    bad = []
    for i, f in enumerate(files):
        img, reason = _decode(f, height, width)
        if img is None:
            bad.append((f, reason))
        else:
            out[i] = img
    return bad


def check_cache_dir(cache_dir):
    """Create `cache_dir` if needed; a DataError naming it when it is a file, lies under a file or is not writable."""
    cache_dir = os.fspath(cache_dir)
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise DataError(f"cache directory {cache_dir} is a file, not a directory; choose a directory for the image "
                        f"cache (--cache-dir)")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache directory {cache_dir} ({exc.strerror or exc}); choose a writable "
                        f"directory (--cache-dir)") from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise DataError(f"cache directory {cache_dir} is not writable; choose a writable directory (--cache-dir)")


def _pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_orphans(cache_dir, prefix):
    """Remove `<prefix>*.npy.tmp<pid>` files left by a process that was killed (its pid no longer runs)."""
    for name in os.listdir(cache_dir):
        pid = name.rsplit(".npy.tmp", 1)[1] if name.startswith(prefix) and ".npy.tmp" in name else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_running(int(pid)):
            try:
                os.remove(os.path.join(cache_dir, name))
            except OSError:
                pass


def _reserve(path):
    """Allocate the blocks of `path` now, so that a full disk is an OSError here, not a SIGBUS in the memmap later."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in _FULL_DISK:
            raise
    finally:
        os.close(fd)


def _mb(n):
    return f"{n / 2 ** 20:.1f} MB" if n >= 2 ** 20 else f"{n / 1024:.0f} KB"


def cached_images(files, height, width, cache_dir, tag, log=print):
    """Decode `files` once into `cache_dir/<tag>-<H>x<W>-<key>.npy`; return it as a read-only memmap (N, H, W, 3) uint8.

    The key (_cache_key) hashes (H, W) and each file's path, size and first and last bytes: any change gives a new
    key and a rebuild (the stale file of the same tag and size is removed). Every file is opened before anything is
    written and every image is decoded before any error is raised, so one DataError lists all unreadable files
    (BAD_IMAGES_SHOWN named, the rest counted). The free space is checked and the file's blocks reserved before
    decoding; the array is built in a temporary file, renamed into place when complete (atomic), and removed on any
    failure; temporary files of killed runs are removed."""
    if not files:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    key, bad = _cache_key(files, height, width)
    if bad:
        raise _bad_images_error(bad)
    cache_dir = os.fspath(cache_dir)
    prefix = f"{tag}-{height}x{width}-"
    path = os.path.join(cache_dir, f"{prefix}{key[:24]}.npy")
    shape = (len(files), height, width, 3)
    if os.path.exists(path):
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass    # a damaged cache file is rebuilt below
    check_cache_dir(cache_dir)
    _remove_orphans(cache_dir, prefix)
    need, free = int(np.prod(shape)), shutil.disk_usage(cache_dir).free
    if need + CACHE_SPARE_BYTES > free:
        raise DataError(f"the image cache {path} needs {_mb(need)} (and {_mb(CACHE_SPARE_BYTES)} to spare) but "
                        f"{cache_dir} has {_mb(free)} free; free disk space or choose another cache directory "
                        f"(--cache-dir)")
    log(f"caching {len(files)} images ({tag}) at {height}x{width} into {path} (once)")
    start = time.time()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(tmp)
        bad = _decode_into(out, files, height, width, tag, log)
        if bad:
            raise _bad_images_error(bad)
        out.flush()
        del out
        os.replace(tmp, path)
        for name in os.listdir(cache_dir):
            if name.startswith(prefix) and name.endswith(".npy") and name != os.path.basename(path):
                os.remove(os.path.join(cache_dir, name))
    except OSError as exc:
        fix = ("free disk space or choose another cache directory" if exc.errno in _FULL_DISK
               else "choose a writable cache directory")
        raise DataError(f"cannot write the image cache {path} ({exc.strerror or exc}); {fix} (--cache-dir)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"  {tag}: {len(files)} images cached in {time.time() - start:.1f} s")
    return np.load(path, mmap_mode="r")


def _root_tag(root):
    return hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]


# ---------------------------------------------------------------- checks shared by both readers

def _kind(path, what):
    """'dir', 'file' or None (missing) for `path`; a DataError naming it when it cannot be examined (permissions):
    os.path.isdir/isfile would answer False there and silently drop the path."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise DataError(f"cannot read the {what} {path} ({exc.strerror or exc}); make it and its parent directories "
                        f"readable (chmod a+rX)") from None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def _listdir(path, what):
    """os.listdir(path); a DataError naming `path` when it cannot be read, never an empty answer."""
    try:
        return os.listdir(path)
    except OSError as exc:
        raise DataError(f"cannot read the {what} {path} ({exc.strerror or exc}); make it readable "
                        f"(chmod -R a+rX {path})") from None


def _read_lines(path, layout):
    """The lines of a text file (a UTF-8 byte-order mark is dropped); a DataError naming it when unreadable."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().split("\n")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; expected {layout}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}); make it readable (chmod a+r)") from None


def _check_root(root, marker, name, layout):
    """`root` must be a directory holding `marker`; otherwise say what is wrong and suggest a child that has it."""
    kind = _kind(root, f"{name} root")
    if kind is None:
        raise DataError(f"{name} root {root} does not exist; pass the directory that holds {layout}")
    if kind != "dir":
        raise DataError(f"{name} root {root} is not a directory; pass the directory that holds {layout}")
    _listdir(root, f"{name} root")
    if _kind(os.path.join(root, marker), f"{name} directory") == "dir":
        return
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if marker in dirnames and dirpath != root and SYNTHETIC_MARKER not in filenames:
            found.append(dirpath)  # a generated world (a cache beside the dataset) is never the one meant
        if dirpath.count(os.sep) - root.rstrip(os.sep).count(os.sep) >= 2:
            dirnames[:] = []
    if found:
        more = f" (or one of {', '.join(found[1:4])}{', ...' if len(found) > 4 else ''})" if len(found) > 1 else ""
        raise DataError(f"{root} has no {marker}/ directory; it looks like the parent of the dataset: "
                        f"pass {found[0]}{more} as the {name} root")
    raise DataError(f"{root} has no {marker}/ directory; expected the {name} layout: {layout}")


def _report(name, counts, published, expect_published, log):
    log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not expect_published:
        return
    bad = [f"{k} {counts[k]} (published {v})" for k, v in published.items() if counts[k] != v]
    if bad:
        log(f"WARNING: {name} differs from the published statistics: " + ", ".join(bad)
            + "; check that the dataset is complete and unmodified")


# ---------------------------------------------------------------- SYSU-MM01

def _read_sysu_ids(root, name):
    path = os.path.join(root, "exp", name)
    layout = "one line of comma-separated identity numbers, e.g. 1,2,4,5"
    if _kind(path, "identity list") != "file":
        raise DataError(f"{path} is missing; expected {layout} (SYSU-MM01 ships exp/train_id.txt, val_id.txt, test_id.txt)")
    lines = [(n, line.strip()) for n, line in enumerate(_read_lines(path, layout), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path} is empty; expected {layout}")
    if len(lines) > 1:
        raise DataError(f"{path} line {lines[1][0]}: unexpected second line {lines[1][1][:40]!r}; expected {layout}")
    n, line = lines[0]
    ids = []
    for tok in line.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if not tok.isdigit():
            raise DataError(f"{path} line {n}: {tok[:40]!r} is not an identity number; expected {layout}")
        ids.append(int(tok))
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"{path} line {n}: identities listed twice: {dup[:10]}; expected each id once")
    return ids


def _sysu_files(root, pid, cam, present):
    """Sorted files of one (identity, camera); [] when cam<cam>/ has no folder for it. present: {cam: set of the
    names in cam<cam>/}. An identity folder that cannot be read is a DataError, not an empty camera."""
    d = os.path.join(root, f"cam{cam}", f"{pid:04d}")
    if f"{pid:04d}" not in present[cam] or _kind(d, "identity folder") != "dir":
        return []
    return sorted(os.path.join(d, f) for f in _listdir(d, "identity folder") if not f.startswith("."))


def _image_set(entries):
    """[(path, label, cam), ...] -> ImageSet without images (filled by the caller)."""
    files = [e[0] for e in entries]
    labels = np.array([e[1] for e in entries], dtype=np.int64)
    cams = np.array([e[2] for e in entries], dtype=np.int64)
    return ImageSet(files, labels, cams, None)


def sysu_gallery(files, ids, mode, shot, trial):
    """The community gallery of one trial: [path, ...] (see the module docstring).

    files: {(id, cam): sorted paths}; ids: test ids. Seeds a private random.Random(trial), which draws the
    same numbers as the community's `random.seed(trial)` without touching the global generator."""
    rng = random.Random(trial)
    out = []
    for pid in sorted(ids):
        for cam in SYSU_GALLERY_CAMS[mode]:
            fs = files.get((pid, cam))
            if not fs:
                continue
            if SYSU_SHOTS[shot] == 1:
                out.append(rng.choice(fs))
            else:
                out.extend(rng.sample(fs, min(SYSU_SHOTS[shot], len(fs))))   # Deviation: all if fewer than 10
    return out


def load_sysu(root, height, width, cache_dir, log=print, expect_published=True, split="test"):
    """SYSU-MM01 -> (TrainSet, TestSet). Train = train + val ids relabelled 0..C-1 in sorted id order.

    Test pools: 'r' = all infrared test images (the queries), 'v' = all visible test images (cams 1, 2, 4, 5);
    protocols all/indoor x single/multi with 10 community trials each (gallery = index subset of pool 'v').
    split='val' (recipe choices): train on exp/train_id.txt alone and evaluate the exp/val_id.txt identities
    with the same query and gallery rules; the test identities are not read at all."""
    layout = "cam1..cam6/<4-digit id>/<n>.jpg and exp/{train,val,test}_id.txt"
    root = os.path.abspath(root)
    _check_root(root, "exp", "SYSU-MM01", layout)
    present = {}
    for cam in range(1, 7):
        cam_dir = os.path.join(root, f"cam{cam}")
        if _kind(cam_dir, "camera directory") != "dir":
            raise DataError(f"{cam_dir} is missing; expected the SYSU-MM01 layout {layout}")
        present[cam] = set(_listdir(cam_dir, "camera directory"))   # unreadable: an error, never an empty camera
    if split not in ("test", "val"):
        raise DataError(f"split {split!r} is unknown; choose test or val")
    id_files = {name: _read_sysu_ids(root, name) for name in ("train_id.txt", "val_id.txt", "test_id.txt")}
    train_ids = sorted(id_files["train_id.txt"] + id_files["val_id.txt"])
    test_ids = sorted(id_files["test_id.txt"])
    if split == "val":
        val_overlap = sorted(set(id_files["val_id.txt"]) & set(test_ids))
        if val_overlap:
            raise DataError(f"identities {val_overlap[:10]} are in exp/val_id.txt and exp/test_id.txt; "
                            f"--split val needs disjoint validation and test ids")
    if len(set(train_ids)) != len(train_ids):
        both = sorted(set(id_files["train_id.txt"]) & set(id_files["val_id.txt"]))
        raise DataError(f"identities {both[:10]} are in both exp/train_id.txt and exp/val_id.txt; each id belongs to one split")
    overlap = sorted(set(train_ids) & set(test_ids))
    if overlap:
        raise DataError(f"identities {overlap[:10]} are in exp/test_id.txt and in the training ids; the splits must be disjoint")
    if split == "val":  # evaluate the validation identities as if they were the test split
        train_ids, test_ids = sorted(id_files["train_id.txt"]), sorted(id_files["val_id.txt"])

    def scan(ids):
        files = {}
        for pid in ids:
            for cam in range(1, 7):
                files[(pid, cam)] = _sysu_files(root, pid, cam, present)
            if not any(files[(pid, cam)] for cam in range(1, 7)):
                listed = next(name for name, listed in id_files.items() if pid in listed)
                raise DataError(f"identity {pid} listed in {os.path.join(root, 'exp', listed)} has no images "
                                f"in {root}/cam1..cam6/{pid:04d}; restore its images or remove it from the list")
        return files

    rt = _root_tag(root) + ("-val" if split == "val" else "")
    cache = _EverySet(height, width, cache_dir, log)
    train_files = scan(train_ids)
    label = {pid: i for i, pid in enumerate(train_ids)}
    train = {}
    for m, cams in (("v", SYSU_VISIBLE_CAMS), ("r", SYSU_INFRARED_CAMS)):
        s = _image_set([(f, label[pid], cam) for pid in train_ids for cam in cams for f in train_files[(pid, cam)]])
        s.images = cache(s.files, f"sysu-{rt}-train-{m}")
        train[m] = s
    trainset = TrainSet(train["v"], train["r"], len(train_ids))

    test_files = scan(test_ids)
    pools = {}
    for m, cams in (("v", SYSU_VISIBLE_CAMS), ("r", SYSU_INFRARED_CAMS)):
        s = _image_set([(f, pid, cam) for pid in test_ids for cam in cams for f in test_files[(pid, cam)]])
        s.images = cache(s.files, f"sysu-{rt}-test-{m}")
        pools[m] = s
    cache.check()
    position = {f: i for i, f in enumerate(pools["v"].files)}
    queries = np.arange(len(pools["r"]), dtype=np.int64)
    protocols = []
    for mode in SYSU_GALLERY_CAMS:
        for shot in SYSU_SHOTS:
            trials = [(queries, np.array([position[f] for f in sysu_gallery(test_files, test_ids, mode, shot, t)],
                                         dtype=np.int64)) for t in range(SYSU_TRIALS)]
            protocols.append(Protocol(f"{mode}-{shot}", "r", "v", "sysu", trials))

    counts = {"train ids": trainset.num_classes, "train visible images": len(trainset.v),
              "train infrared images": len(trainset.r), "test ids": len(test_ids),
              "test queries (infrared)": len(pools["r"]), "test visible images": len(pools["v"])}
    if split == "val":
        counts = {("val" + k[4:] if k.startswith("test") else k): v for k, v in counts.items()}
        expect_published = False  # the published counts describe the test split
    _report(f"SYSU-MM01 {root}" + (" (split val)" if split == "val" else ""), counts, SYSU_PUBLISHED,
            expect_published, log)
    return trainset, TestSet(pools, protocols)


# ---------------------------------------------------------------- RegDB

def _read_regdb_index(root, name):
    """idx/<name> -> [(absolute path, label), ...]: every non-blank line holds exactly two fields, a relative image
    path and a non-negative integer label, and names an existing image not listed on an earlier line."""
    path = os.path.join(root, "idx", name)
    layout = "lines '<relative image path> <label>', e.g. 'Visible/1/male_front_v_00007_1.bmp 0'"
    if _kind(path, "RegDB index") != "file":
        raise DataError(f"{path} is missing; expected {layout}")
    entries, seen = [], {}
    for n, line in enumerate(_read_lines(path, layout), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path} line {n}: {line[:60]!r} is malformed ({len(parts)} fields, not 2); "
                            f"expected {layout}")
        if not (parts[1].isascii() and parts[1].isdigit()):
            raise DataError(f"{path} line {n}: {line[:60]!r} is malformed (label {parts[1][:20]!r} is not a "
                            f"non-negative integer); expected {layout}")
        img = os.path.normpath(os.path.join(root, parts[0]))
        if img in seen:
            raise DataError(f"{path} line {n}: image {parts[0]} is already listed on line {seen[img]}; each image "
                            f"once: remove the duplicate line")
        seen[img] = n
        if _kind(img, "image") != "file":
            raise DataError(f"{path} line {n}: image {img} does not exist; check the dataset tree")
        entries.append((img, int(parts[1])))
    if not entries:
        raise DataError(f"{path} lists no images; expected {layout}")
    return entries


def _check_regdb_disjoint(lists, trial):
    """The train and test lists of a trial share no image and no identity. The identity of an image is its folder
    (Visible/<id>/, Thermal/<id>/: the same person in both), not its label: the lists may number labels per split."""
    for m, name in (("v", "visible"), ("r", "thermal")):
        shared = sorted({f for f, _ in lists[("train", m)]} & {f for f, _ in lists[("test", m)]})
        if shared:
            raise DataError(f"idx/train_{name}_{trial}.txt and idx/test_{name}_{trial}.txt share {len(shared)} images "
                            f"(e.g. {shared[0]}); train and test must be disjoint: restore the original index files")
    folders = {part: {os.path.basename(os.path.dirname(f)) for m in "vr" for f, _ in lists[(part, m)]}
               for part in ("train", "test")}
    shared = sorted(folders["train"] & folders["test"], key=lambda s: (len(s), s))
    if shared:
        raise DataError(f"RegDB trial {trial}: identity folders {shared[:10]} are in both idx/train_*_{trial}.txt "
                        f"and idx/test_*_{trial}.txt; train and test identities must be disjoint: restore the original "
                        f"index files")


REGDB_VAL_FRACTION = 0.2  # --split val: this share of each trial's training identities becomes the validation set


def regdb_val_labels(labels, trial):
    """The validation identities of RegDB trial `trial` under --split val: a fixed 20 % of its training labels,
    round(0.2 n) of them drawn by numpy's default_rng([trial, 20]) from the sorted labels."""
    labels = sorted(labels)
    n = int(round(REGDB_VAL_FRACTION * len(labels)))
    if not 0 < n < len(labels):
        raise DataError(f"{len(labels)} training identities are too few to hold out {REGDB_VAL_FRACTION:.0%} "
                        f"of them for --split val")
    return sorted(int(x) for x in np.random.default_rng([trial, 20]).choice(labels, n, replace=False))


def load_regdb(root, trial, height, width, cache_dir, log=print, expect_published=True, split="test"):
    """RegDB trial `trial` (1..10) -> (TrainSet, TestSet).

    split='val' (recipe choices): the identities regdb_val_labels() picks from the trial's training lists are
    evaluated instead of the test lists (same two protocols), the remaining 80 % are trained on.

    Train labels are relabelled 0..C-1 in sorted order of the index files' labels; test labels stay as given.
    Cams: 1 visible, 2 thermal. Protocols 'visible-to-infrared' (query pool 'v', gallery 'r') and
    'infrared-to-visible', one trial each over all test images."""
    layout = "Visible/, Thermal/ and idx/{train,test}_{visible,thermal}_{1..10}.txt"
    if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)) or trial not in REGDB_TRIALS:
        raise DataError(f"RegDB trial {trial!r} is invalid; choose an integer from 1 to 10")
    root = os.path.abspath(root)
    _check_root(root, "idx", "RegDB", layout)
    if split not in ("test", "val"):
        raise DataError(f"split {split!r} is unknown; choose test or val")
    lists = {(part, m): _read_regdb_index(root, f"{part}_{name}_{trial}.txt")
             for part in ("train", "test") for m, name in (("v", "visible"), ("r", "thermal"))}
    _check_regdb_disjoint(lists, trial)
    if split == "val":  # hold out validation identities from the training lists; the test lists are not used
        held = set(regdb_val_labels({lab for m in "vr" for _, lab in lists[("train", m)]}, trial))
        for m in "vr":
            train = lists[("train", m)]
            lists[("test", m)] = [e for e in train if e[1] in held]
            lists[("train", m)] = [e for e in train if e[1] not in held]
    train_labels = sorted({lab for m in "vr" for _, lab in lists[("train", m)]})
    relabel = {lab: i for i, lab in enumerate(train_labels)}
    rt = _root_tag(root)
    cache = _EverySet(height, width, cache_dir, log)
    sets = {}
    for m, cam in (("v", 1), ("r", 2)):
        # one cache per modality over the union of this trial's train and test images: on the real data the
        # union is the same for every trial, so the ten trials share it
        union = sorted({f for part in ("train", "test") for f, _ in lists[(part, m)]})
        images = cache(union, f"regdb-{rt}-{m}")
        position = {f: i for i, f in enumerate(union)}
        for part in ("train", "test"):
            entries = lists[(part, m)]
            s = _image_set([(f, relabel[lab] if part == "train" else lab, cam) for f, lab in entries])
            if images is not None:
                s.images = images[np.array([position[f] for f, _ in entries], dtype=np.int64)]
            sets[(part, m)] = s
    cache.check()
    trainset = TrainSet(sets[("train", "v")], sets[("train", "r")], len(train_labels))
    pools = {"v": sets[("test", "v")], "r": sets[("test", "r")]}
    all_v, all_r = np.arange(len(pools["v"]), dtype=np.int64), np.arange(len(pools["r"]), dtype=np.int64)
    protocols = [Protocol("visible-to-infrared", "v", "r", "regdb", [(all_v, all_r)]),
                 Protocol("infrared-to-visible", "r", "v", "regdb", [(all_r, all_v)])]
    test_ids = np.unique(np.concatenate([pools["v"].labels, pools["r"].labels]))
    counts = {"train ids": trainset.num_classes, "train visible images": len(trainset.v),
              "train thermal images": len(trainset.r), "test ids": len(test_ids),
              "test visible images": len(pools["v"]), "test thermal images": len(pools["r"])}
    if split == "val":
        counts = {("val" + k[4:] if k.startswith("test") else k): v for k, v in counts.items()}
        expect_published = False
    _report(f"RegDB {root} trial {trial}" + (" (split val)" if split == "val" else ""), counts, REGDB_PUBLISHED,
            expect_published, log)
    return trainset, TestSet(pools, protocols)


# ---------------------------------------------------------------- LLCM

LLCM_VISIBLE_CAMS = tuple(range(1, 10))       # test_vis/cam1..cam9
LLCM_INFRARED_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)  # test_nir/: there is no infrared camera 3
LLCM_TRIALS = 10
LLCM_PUBLISHED = {"ids": 1064, "images": 46767}  # Zhang and Wang, CVPR 2023: the dataset's totals


def _llcm_cam(rel):
    """Camera number of an LLCM path: the digit after its 'cam' directory (test_vis/cam3/0012/... -> 3)."""
    for part in rel.replace("\\", "/").split("/"):
        if len(part) == 4 and part.startswith("cam") and part[3].isdigit():
            return int(part[3])
    return 0


def _read_llcm_index(root, name):
    """idx/<name> -> [(absolute path, label, camera), ...]; camera 0 where the path names none."""
    path = os.path.join(root, "idx", name)
    layout = "lines '<image path relative to the LLCM root> <label>', labels 0..N-1"
    if _kind(path, "LLCM index") != "file":
        raise DataError(f"{path} is missing; expected {layout} (LLCM ships idx/train_vis.txt and idx/train_nir.txt)")
    entries, seen = [], set()
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{path} line {n}: {line[:60]!r} is malformed; expected {layout}")
        if parts[0] in seen:
            raise DataError(f"{path} line {n}: {parts[0]} is listed twice; list each image once")
        seen.add(parts[0])
        img = os.path.join(root, parts[0])
        if _kind(img, "image") != "file":
            raise DataError(f"{path} line {n}: image {img} does not exist; check the dataset tree")
        entries.append((img, int(parts[1]), _llcm_cam(parts[0])))
    if not entries:
        raise DataError(f"{path} lists no images; expected {layout}")
    return entries


def _read_llcm_ids(path):
    """idx/test_id.txt: one line of comma-separated identity numbers -> [id, ...]."""
    layout = "one line of comma-separated identity numbers, e.g. 1,2,4,5"
    if _kind(path, "identity list") != "file":
        raise DataError(f"{path} is missing; expected {layout}")
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if len(lines) != 1:
        raise DataError(f"{path} holds {len(lines)} non-empty lines; expected {layout}")
    toks = [t.strip() for t in lines[0].split(",") if t.strip()]
    bad = [t for t in toks if not t.isdigit()]
    if bad or not toks:
        raise DataError(f"{path} line 1: {(bad or [''])[0][:40]!r} is not an identity number; expected {layout}")
    ids = [int(t) for t in toks]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path} line 1: identities listed twice: {sorted({i for i in ids if ids.count(i) > 1})[:10]}")
    return ids


def _llcm_test_files(root, folder, cams, ids):
    """{(id, cam): sorted paths} of test_vis or test_nir; an absent (id, cam) directory gives no entry."""
    files = {}
    for pid in ids:
        for cam in cams:
            d = os.path.join(root, folder, f"cam{cam}", f"{pid:04d}")
            if _kind(d, "identity folder") == "dir":   # an unreadable camera is an error, not a missing folder
                try:
                    names = os.listdir(d)
                except OSError as e:
                    raise DataError(f"cannot read {d} ({e.strerror}); check its permissions") from None
                fs = sorted(os.path.join(d, f) for f in names if not f.startswith("."))
                if fs:
                    files[(pid, cam)] = fs
    return files


def llcm_sample(files, ids, cams, trial):
    """One image per (identity, camera) of one trial: for id in sorted ids, for cam in `cams` with images,
    `random.choice` over the sorted files after `random.seed(trial)` (ZYK100/LLCM DEEN/data_manager.py,
    process_gallery_llcm; a private random.Random(trial) draws the same numbers)."""
    rng = random.Random(trial)
    return [rng.choice(files[(pid, cam)]) for pid in sorted(ids) for cam in cams if (pid, cam) in files]


def load_llcm(root, height, width, cache_dir, log=print, expect_published=True, split="test"):
    """LLCM (Zhang and Wang, CVPR 2023) as it ships -> (TrainSet, TestSet).

    Train: idx/train_vis.txt and idx/train_nir.txt, labels relabelled 0..C-1 in sorted order. Test: the ids of
    idx/test_id.txt, images test_vis/cam1..cam9/<id>/ and test_nir/cam{1,2,4..9}/<id>/; pools 'v' = every
    test_vis image, 'r' = every test_nir image, in (sorted id, camera, sorted file) order. Protocols, ten trials
    each, as ZYK100/LLCM DEEN/test.py evaluates them:
    - infrared-to-visible: every infrared image queries, per trial, one visible image per (identity, camera);
    - visible-to-infrared: the released code samples one infrared image per (identity, camera) per trial and
      passes that sampled set to the metric as the queries, against every visible image as the gallery
      (test.py builds the matrix sampled x full in that branch); this function does the same, so the
      "visible-to-infrared" numbers are those of the literature: sampled infrared queries, full visible gallery.
    The metric (protocol 'llcm') drops, per query, the gallery images of its identity under its camera number.
    split='val': a fixed 20 % of the training identities (regdb_val_labels with trial 0) are evaluated instead,
    with the same two protocols; their cameras are read from the training paths."""
    layout = "idx/train_vis.txt, idx/train_nir.txt, idx/test_id.txt, test_vis/cam1..cam9/ and test_nir/cam*/"
    if split not in ("test", "val"):
        raise DataError(f"split {split!r} is unknown; choose test or val")
    root = os.path.abspath(root)
    _check_root(root, "idx", "LLCM", layout)
    train_lists = {"v": _read_llcm_index(root, "train_vis.txt"), "r": _read_llcm_index(root, "train_nir.txt")}
    id_path = os.path.join(root, "idx", "test_id.txt")
    test_ids = _read_llcm_ids(id_path)
    for folder in ("test_vis", "test_nir"):
        if _kind(os.path.join(root, folder), "LLCM directory") != "dir":
            raise DataError(f"{os.path.join(root, folder)} is missing; expected the LLCM layout {layout}")
    labels = sorted({lab for m in "vr" for _, lab, _ in train_lists[m]})
    rt = _root_tag(root) + ("-val" if split == "val" else "")
    if split == "val":
        held = set(regdb_val_labels(labels, 0))
        if any(cam == 0 for m in "vr" for _, lab, cam in train_lists[m] if lab in held):
            raise DataError(f"--split val on LLCM reads each validation image's camera from its path (a "
                            f"'camN' directory), and {root}/idx/train_*.txt has paths without one")
        files = {m: {} for m in "vr"}
        for m in "vr":
            for f, lab, cam in train_lists[m]:
                if lab in held:
                    files[m].setdefault((lab, cam), []).append(f)
            files[m] = {k: sorted(v) for k, v in files[m].items()}
            train_lists[m] = [e for e in train_lists[m] if e[1] not in held]
        labels, test_ids = sorted(set(labels) - held), sorted(held)
    else:
        files = {"v": _llcm_test_files(root, "test_vis", LLCM_VISIBLE_CAMS, test_ids),
                 "r": _llcm_test_files(root, "test_nir", LLCM_INFRARED_CAMS, test_ids)}
        listed = {f for m in "vr" for f, _, _ in train_lists[m]}
        shared = sorted(f for m in "vr" for fs in files[m].values() for f in fs if f in listed)
        if shared:
            raise DataError(f"{shared[0]} is a test image and is listed in {root}/idx/train_*.txt "
                            f"({len(shared)} such images); training and test images must be disjoint")
        missing = [pid for pid in test_ids if not any((pid, c) in files["v"] or (pid, c) in files["r"]
                                                         for c in LLCM_VISIBLE_CAMS)]
        if missing:
            raise DataError(f"identity {missing[0]} listed in {id_path} has no images under test_vis/ or test_nir/ "
                            f"({len(missing)} such ids); restore its images or remove it from the list")
    relabel = {lab: i for i, lab in enumerate(labels)}
    cache = _EverySet(height, width, cache_dir, log)
    train = {}
    for m in "vr":
        s = _image_set([(f, relabel[lab], cam) for f, lab, cam in train_lists[m]])
        s.images = cache(s.files, f"llcm-{rt}-train-{m}")
        train[m] = s
    trainset = TrainSet(train["v"], train["r"], len(labels))
    cams = {"v": LLCM_VISIBLE_CAMS, "r": LLCM_INFRARED_CAMS}
    pools = {}
    for m in "vr":
        s = _image_set([(f, pid, cam) for pid in sorted(test_ids) for cam in cams[m]
                        for f in files[m].get((pid, cam), [])])
        s.images = cache(s.files, f"llcm-{rt}-test-{m}")
        pools[m] = s
    cache.check()
    position = {m: {f: i for i, f in enumerate(pools[m].files)} for m in "vr"}
    full = {m: np.arange(len(pools[m]), dtype=np.int64) for m in "vr"}

    def sampled(m, t):
        return np.array([position[m][f] for f in llcm_sample(files[m], test_ids, cams[m], t)], dtype=np.int64)

    protocols = [Protocol("infrared-to-visible", "r", "v", "llcm",
                          [(full["r"], sampled("v", t)) for t in range(LLCM_TRIALS)]),
                 Protocol("visible-to-infrared", "r", "v", "llcm",   # as released: sampled infrared queries
                          [(sampled("r", t), full["v"]) for t in range(LLCM_TRIALS)])]
    counts = {"train ids": trainset.num_classes, "train visible images": len(trainset.v),
              "train infrared images": len(trainset.r), "test ids": len(test_ids),
              "test visible images": len(pools["v"]), "test infrared images": len(pools["r"])}
    if split == "val":
        counts = {("val" + k[4:] if k.startswith("test") else k): v for k, v in counts.items()}
    _report(f"LLCM {root}" + (" (split val)" if split == "val" else ""), counts, {}, False, log)
    totals = {"ids": counts["train ids"] + len(test_ids), "images": sum(v for k, v in counts.items() if "images" in k)}
    if expect_published and split == "test" and totals != LLCM_PUBLISHED:
        log(f"WARNING: LLCM {root} has {totals['ids']} identities and {totals['images']} images, the published "
            f"dataset {LLCM_PUBLISHED['ids']} and {LLCM_PUBLISHED['images']}; check that it is complete and unmodified")
    return trainset, TestSet(pools, protocols)


# ---------------------------------------------------------------- sampler

SAMPLERS = ("without-replacement", "community")


class CrossModalitySampler:
    """P identities x (K visible + K infrared) per batch, identities drawn without replacement in a batch.

    Only identities with images in both modalities are drawn. `mode`:
    - "without-replacement" (the project default, so that no batch repeats an image): an identity's K images are
      drawn without replacement (with replacement only when it has fewer than K in that modality), and an epoch
      has max(#v, #r) // (P K) batches;
    - "community": an identity's K images are drawn with replacement and an epoch has int(max(#v, #r) / (P K)) + 1
      batches, as mangye16/Cross-Modal-Re-ID-baseline utils.py:73-78 (IdentitySampler; 696 batches on SYSU, 65 on
      RegDB; IDLNL/MCE utils.py:62-91 is the same sampler)."""

    def __init__(self, labels_v, labels_r, P, K, seed, mode="without-replacement"):
        labels_v, labels_r = np.asarray(labels_v), np.asarray(labels_r)
        self.ids = np.intersect1d(labels_v, labels_r)
        if mode not in SAMPLERS:
            raise DataError(f"sampler {mode!r} is not one of {', '.join(SAMPLERS)}")
        if P < 1 or K < 1:
            raise DataError(f"sampler needs P >= 1 and K >= 1, got P={P}, K={K}")
        if P > len(self.ids):
            raise DataError(f"sampler asked for P={P} identities per batch, but only {len(self.ids)} identities have "
                            f"both visible and infrared training images; lower P to at most {len(self.ids)}")
        self.pos_v = {i: np.flatnonzero(labels_v == i) for i in self.ids}
        self.pos_r = {i: np.flatnonzero(labels_r == i) for i in self.ids}
        self.P, self.K, self.seed, self.mode = P, K, seed, mode
        self.num_batches = max(len(labels_v), len(labels_r)) // (P * K) + (mode == "community")

    def __len__(self):
        return max(self.num_batches, 1)

    def epoch(self, e):
        """[(idx_v (P*K,), idx_r (P*K,)), ...]; identity-major, same identity order in both halves."""
        rng = np.random.default_rng([self.seed, e])
        batches = []
        for _ in range(len(self)):
            idx_v, idx_r = [], []
            for pid in rng.choice(self.ids, self.P, replace=False):
                for pos, out in ((self.pos_v[pid], idx_v), (self.pos_r[pid], idx_r)):
                    out.append(rng.choice(pos, self.K, replace=self.mode == "community" or len(pos) < self.K))
            batches.append((np.concatenate(idx_v).astype(np.int64), np.concatenate(idx_r).astype(np.int64)))
        return batches

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state):
        self.seed = state["seed"]


# ---------------------------------------------------------------- augmentation

def normalize(x):
    """(B, 3, H, W) float in [0, 1] -> ImageNet-normalised (a new tensor)."""
    return _normalize_(x.clone(), 1.0)


def _normalize_(x, scale):
    """In place: (B, 3, H, W) float in [0, scale] -> ImageNet-normalised; returns x."""
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.mul_(1 / (scale * std)).sub_(mean / std)          # (x / scale - mean) / std


class Augment:
    """Batch-level training augmentation on uint8 images; deterministic given a torch.Generator.

    __call__(batch, g): batch {'x_v', 'x_r': (B, H0, W0, 3) uint8 tensors, 'y_v', 'y_r': (B,) int64}
    -> {'x_*': (B, 3, height, width) float32 normalised, 'y_*', and whatever `extra` adds}.
    Order: zero pad + random crop, horizontal flip, to [0, 1], extra(batch, g), ImageNet normalisation of
    every 'x_*' key, random erasing of every 'x_*' key (independently per image).
    Random numbers are drawn per batch as vectors; pixels move with one slice copy per image; without `extra`
    the scaling to [0, 1] is folded into the normalisation (same numbers up to float rounding)."""

    def __init__(self, height, width, pad=10, flip=True, erasing=0.5, extra=None):
        self.height, self.width, self.pad, self.flip, self.erasing, self.extra = height, width, pad, flip, erasing, extra

    def crop_flip(self, x, g):
        """(B, H0, W0, 3) uint8 -> (B, 3, height, width) float32 in [0, 255]: zero pad, random crop, flip."""
        B, H0, W0, _ = x.shape
        p, h, w = self.pad, self.height, self.width
        oy = torch.randint(0, H0 + 2 * p - h + 1, (B,), generator=g).tolist()   # crop origin in the padded image
        ox = torch.randint(0, W0 + 2 * p - w + 1, (B,), generator=g).tolist()
        flip = (torch.rand(B, generator=g) < 0.5).tolist() if self.flip else [False] * B
        src = x.permute(0, 3, 1, 2).contiguous()                                 # (B, 3, H0, W0) uint8
        out = torch.zeros(B, 3, h, w)
        for b in range(B):
            # the crop covers rows oy-p .. oy-p+h-1 of the unpadded image; the rest stays 0 (the padding)
            y0, x0 = oy[b] - p, ox[b] - p
            ys, ye, xs, xe = max(y0, 0), min(y0 + h, H0), max(x0, 0), min(x0 + w, W0)
            if flip[b]:   # flipped output column j shows crop column w-1-j
                out[b, :, ys - y0:ye - y0, w - (xe - x0):w - (xs - x0)] = src[b, :, ys:ye, xs:xe].flip(-1)
            else:
                out[b, :, ys - y0:ye - y0, xs - x0:xe - x0] = src[b, :, ys:ye, xs:xe]
        return out

    def erase(self, x, g):
        """Random erasing (Zhong et al.) in place on normalised (B, 3, H, W): per image with prob. `erasing`, one
        rectangle of area 0.02-0.4 of the image and aspect uniform in [0.3, 3.33] (first of 100 tries that fits) set to 0."""
        B, _, H, W = x.shape
        do = torch.rand(B, generator=g) < self.erasing
        area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * torch.rand(B, ERASE_TRIES, generator=g)) * (H * W)
        aspect = ERASE_ASPECT + (1 / ERASE_ASPECT - ERASE_ASPECT) * torch.rand(B, ERASE_TRIES, generator=g)
        eh = torch.sqrt(area * aspect).round().long()                           # (B, tries)
        ew = torch.sqrt(area / aspect).round().long()
        fits = (eh < H) & (ew < W)
        first = fits.long().argmax(1, keepdim=True)                             # first try that fits
        eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]           # (B,)
        do &= fits.any(1)
        ey = (torch.rand(B, generator=g) * (H - eh + 1)).long()
        ex = (torch.rand(B, generator=g) * (W - ew + 1)).long()
        for b, y0, x0, rh, rw in zip(do.nonzero()[:, 0].tolist(), ey[do].tolist(), ex[do].tolist(),
                                     eh[do].tolist(), ew[do].tolist()):
            x[b, :, y0:y0 + rh, x0:x0 + rw] = 0.0
        return x

    def __call__(self, batch, g):
        batch = {k: self.crop_flip(v, g) if k.startswith("x_") else v for k, v in batch.items()}
        scale = 255.0
        if self.extra is not None:
            for k in batch:
                if k.startswith("x_"):
                    batch[k].div_(255)
            batch = self.extra(batch, g)
            scale = 1.0
        for k in sorted(batch):
            if k.startswith("x_"):
                _normalize_(batch[k], scale)
                if self.erasing > 0:
                    self.erase(batch[k], g)
        return batch


# ---------------------------------------------------------------- loaders

def _batch_seed(seed, epoch, index):
    a, b = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return (int(a) << 32 | int(b)) & (2 ** 63 - 1)


class _EpochBatches(torch.utils.data.Dataset):
    """Item i = augmented batch i of one epoch (for DataLoader with batch_size=None)."""

    def __init__(self, trainset, batches, augment, seed, epoch):
        self.trainset, self.batches, self.augment, self.seed, self.epoch = trainset, batches, augment, seed, epoch

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        idx_v, idx_r = self.batches[i]
        v, r = self.trainset.v, self.trainset.r
        batch = {"x_v": torch.from_numpy(v.images[idx_v]), "x_r": torch.from_numpy(r.images[idx_r]),
                 "y_v": torch.from_numpy(v.labels[idx_v]), "y_r": torch.from_numpy(r.labels[idx_r])}
        g = torch.Generator().manual_seed(_batch_seed(self.seed, self.epoch, i))
        return self.augment(batch, g)


class TrainLoader:
    """Augmented cross-modality batches; batch i of epoch e depends only on (seed, e, i), whatever `workers`."""

    def __init__(self, trainset, sampler, augment, workers):
        self.trainset, self.sampler, self.augment, self.workers = trainset, sampler, augment, workers

    def __len__(self):
        return len(self.sampler)

    def epoch(self, e):
        """Yields {'x_v', 'x_r': (P*K, 3, H, W) float32 normalised, 'y_v', 'y_r': (P*K,) int64, ...extra}."""
        data = _EpochBatches(self.trainset, self.sampler.epoch(e), self.augment, self.sampler.seed, e)
        if self.workers == 0:
            return (data[i] for i in range(len(data)))
        return iter(torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=self.workers,
                                                pin_memory=torch.cuda.is_available()))

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def check_K(trainset, K):
    """--K against the whole training set: a K above every identity's image count in each modality would repeat
    images within every identity's K (never a recipe, always a typo). Sub-splits (NFS's D_val, CM-NAS's val part)
    may hold fewer; there the sampler draws with replacement."""
    most = max(np.bincount(np.asarray(labels)).max() for labels in (trainset.v.labels, trainset.r.labels))
    if K > most:
        raise DataError(f"--K {K}: no training identity has more than {most} images in one modality; lower --K to at "
                        f"most {most}")


def train_loader(trainset, P, K, seed, augment, workers=0, sampler="without-replacement"):
    """The training loader; `sampler`: one of SAMPLERS (see CrossModalitySampler)."""
    return TrainLoader(trainset, CrossModalitySampler(trainset.v.labels, trainset.r.labels, P, K, seed, sampler),
                       augment, workers)


def test_batches(images, batch_size):
    """(N, H, W, 3) uint8 -> iterator of (B, 3, H, W) float32 ImageNet-normalised batches, in order."""
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[s:s + batch_size]))
        yield _normalize_(x.permute(0, 3, 1, 2).float(), 255.0)
