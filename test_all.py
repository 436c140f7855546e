"""The one test file of this project.

Run it from any directory: `python test_all.py` (stdlib unittest) or `python -m pytest test_all.py`; one class with
`python -m unittest test_all.TestRFMLTG` (from the repository root) or `python -m pytest test_all.py -k TestRFMLTG`.
Tests use tiny images, resnet18 and a few iterations, so the whole suite stays under 10 minutes on 2 CPU cores.
They write only into temporary directories and the test cache: $VIREID_TEST_CACHE, else <tmp>/vireid-test-cache,
where the synthetic worlds of the smoke runs are built once and then reused.

Contents (one section per file under test, each opened by a `# ==== ... ====` banner):
  imports, then fixtures   the test cache, the hand-made trees in the layouts of SYSU-MM01, RegDB and LLCM, the
                           tiny synthetic worlds, a tiny train set, random batches, and reid.py run in a subprocess
                           (run_reid) or in this process (reid_smoke, reid_outcome)
  synthetic.py             TestSyntheticSYSU, TestSyntheticMaterials, TestSyntheticRegDB, TestSyntheticCache
  data.py                  TestDataSYSU, TestDataRegDB, TestDataSampler, TestDataLoader, TestDataCache,
                           TestDataErrors, TestDataBadInputs
  eval.py                  TestEvalToy, TestEvalAgainstLoop, TestEvalRunProtocol, TestEvalPicture
  reid.py                  TestCLIPlumbing, TestRecipes, TestReliabilityCLI, TestRecipesEndToEnd, TestCLIEndToEnd,
                           TestOverwriteSafety
  LLCM (data, eval, reid)  TestLLCM
  methods/agw.py           TestAGW
  methods/nfs.py           TestNFSContinuousBernoulli, TestNFSGates, TestNFSSecondOrder, TestNFSLosses,
                           TestNFSGatesFile, TestNFSSearchLoop, TestNFSSmoke
  methods/cmnas.py         TestCMNASSearchSpace, TestCMNASLosses, TestCMNASGenotype, TestCMNASTrain, TestCMNASSmoke,
                           TestCMNASAlternation, TestCMNASPhaseFlags, TestCMNASRelease
  methods/ssft.py          TestSSFTEquations, TestSSFTTest, TestSSFTTraining, TestSSFTAdversarialForms,
                           TestSSFTWiring, TestSSFTSmoke
  methods/rfm.py           TestRFMLTG, TestRFMLosses, TestRFMModel, TestRFMCollapse, TestRFMAlarm, TestRFMSmoke
  methods/mce.py           TestMCEShared, TestMCELosses, TestMCEMemory, TestMCETrain, TestMCESmoke
  copies across methods/   TestCopies
"""

import atexit
import contextlib
import copy
import dataclasses
import errno
import functools
import glob
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import eval as evaluation
import reid
import synthetic
from data import UserError
from methods import METHODS, agw, cmnas, common, mce, nfs, rfm, ssft

# ==== fixtures: paths and the test cache, hand-made trees, synthetic worlds, a tiny train set, reid.py ====

HERE = Path(__file__).resolve().parent   # the repository root
REID = HERE / "reid.py"
# One cache for every test that needs a synthetic world: worlds are deterministic and keyed by their parameters.
TEST_CACHE = os.environ.get("VIREID_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "vireid-test-cache")


def quiet(*args):
    """A log function that prints nothing."""


# ---- hand-made trees in the layouts of the real datasets (exact contents the data tests check against)

TREE_H, TREE_W = 16, 8   # the image size the data tests load them at
# SYSU hand-made tree: {id: {cam: number of images}}; cameras not listed have no directory at all
SYSU_TRAIN = {1: {1: 3, 2: 2, 3: 2, 4: 1, 6: 1}, 2: {1: 2, 3: 1}, 5: {2: 2, 4: 1, 6: 2}}
SYSU_VAL = {7: {1: 1, 5: 2, 3: 3}}
SYSU_TEST = {12: {1: 12, 2: 3, 3: 2, 5: 11, 6: 1}, 345: {1: 2, 4: 5, 5: 1, 6: 3},
             9876: {1: 1, 2: 10, 4: 9, 3: 2}}


def write_image(path, rng, gray=None):
    """A random image of odd size; grayscale ('L') for about a third of the files unless `gray` says."""
    h, w = int(rng.integers(19, 41)), int(rng.integers(9, 31))
    gray = rng.random() < 0.33 if gray is None else gray
    arr = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def hand_made_sysu(root, seed=0):
    rng = np.random.default_rng(seed)
    for cam in range(1, 7):
        os.makedirs(os.path.join(root, f"cam{cam}"), exist_ok=True)
    for spec in (SYSU_TRAIN, SYSU_VAL, SYSU_TEST):
        for pid, cams in spec.items():
            for cam, n in cams.items():
                for k in range(n):
                    write_image(os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{k + 1:04d}.jpg"), rng)
    os.makedirs(os.path.join(root, "exp"), exist_ok=True)
    for name, spec in (("train_id.txt", SYSU_TRAIN), ("val_id.txt", SYSU_VAL), ("test_id.txt", SYSU_TEST)):
        with open(os.path.join(root, "exp", name), "w") as f:
            f.write(",".join(str(i) for i in reversed(list(spec))) + "\n")   # unsorted on purpose


# RegDB hand-made tree: per trial {split: [(id dir, label), ...]}; labels non-contiguous, listed unsorted
REGDB_TRIALS = {1: {"train": [(1, 40), (2, 3), (3, 17)], "test": [(4, 205), (5, 411), (6, 300)]},
                2: {"train": [(4, 8), (5, 1), (6, 90)], "test": [(1, 1000), (2, 2000), (3, 3000)]}}


def hand_made_regdb(root, seed=0):
    rng = np.random.default_rng(seed)
    for d, m, gray in (("Visible", "v", False), ("Thermal", "t", True)):
        for pid in range(1, 7):
            for k in range(3):
                write_image(os.path.join(root, d, str(pid), f"male_front_{m}_{pid:05d}_{k + 1}.bmp"), rng, gray)
    os.makedirs(os.path.join(root, "idx"))
    for trial, splits in REGDB_TRIALS.items():
        for split, pairs in splits.items():
            for name, d, m in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                with open(os.path.join(root, "idx", f"{split}_{name}_{trial}.txt"), "w") as f:
                    for pid, label in pairs:
                        for k in range(3):
                            f.write(f"{d}/{pid}/male_front_{m}_{pid:05d}_{k + 1}.bmp {label}\n")


# hand-made LLCM tree: test ids {id: {modality folder: {camera: images}}}; large ids, ids missing from cameras
LLCM_TEST = {3: {"test_vis": {1: 2, 5: 1}, "test_nir": {2: 2}},
             1234: {"test_vis": {9: 3, 3: 1}, "test_nir": {1: 1, 9: 2}},
             77: {"test_vis": {3: 2}, "test_nir": {4: 1, 8: 1}}}
LLCM_TRAIN = {"train_vis.txt": [("nir_and_vis/vis/cam1/0010", 0, 2), ("nir_and_vis/vis/cam4/0020", 1, 2)],
              "train_nir.txt": [("nir_and_vis/nir/cam2/0010", 0, 1), ("nir_and_vis/nir/cam6/0020", 1, 3)]}


def hand_made_llcm(root, seed=0):
    rng = np.random.default_rng(seed)
    for pid, folders in LLCM_TEST.items():
        for folder, cams in folders.items():
            for cam, n in cams.items():
                for k in range(n):
                    write_image(os.path.join(root, folder, f"cam{cam}", f"{pid:04d}", f"{k + 1:04d}.jpg"), rng,
                                gray=folder == "test_nir")
    os.makedirs(os.path.join(root, "idx"))
    for name, dirs in LLCM_TRAIN.items():
        lines = []
        for d, label, n in dirs:
            for k in range(n):
                write_image(os.path.join(root, d, f"{k + 1:04d}.jpg"), rng)
                lines.append(f"{d}/{k + 1:04d}.jpg {label}")
        with open(os.path.join(root, "idx", name), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "idx", "test_id.txt"), "w") as f:
        f.write("1234,3,77\n")


@functools.cache
def hand_made_tree(layout):
    """The root of the hand-made `layout` tree ('sysu', 'regdb' or 'llcm'), built on first use in a temporary
    directory of its own (removed when the tests end) and shared by every test. Tests only read it: one that
    breaks a file breaks a copy."""
    parent = tempfile.mkdtemp(prefix=f"vireid-test-{layout}-")
    atexit.register(shutil.rmtree, parent, ignore_errors=True)
    root = os.path.join(parent, {"sysu": "SYSU-MM01", "regdb": "RegDB", "llcm": "LLCM"}[layout])
    {"sysu": hand_made_sysu, "regdb": hand_made_regdb, "llcm": hand_made_llcm}[layout](root)
    return root


class HandMadeTrees(unittest.TestCase):
    """The hand-made SYSU and RegDB trees, and a temporary directory per class for copies and caches."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.sysu = hand_made_tree("sysu")
        cls.regdb = hand_made_tree("regdb")
        cls.cache = os.path.join(cls.tmp, "cache")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def copy(self, src, name):
        dst = os.path.join(self.tmp, name)
        shutil.copytree(src, dst)
        return dst

    def load_sysu(self, root=None, log=None, **kw):
        return data.load_sysu(root or self.sysu, TREE_H, TREE_W, self.cache, log=log or (lambda m: None), **kw)


# ---- synthetic worlds, a tiny train set, random batches

def smoke_world(layout):
    """The tiny synthetic world of `layout` that `reid.py --smoke` trains on, in the test cache: built on first use,
    then shared by every test and every reid.py the tests run."""
    return synthetic.ensure_world(Path(TEST_CACHE), layout, **reid.SMOKE_WORLDS[layout], log=quiet)


def tiny_trainset(ids=4, per_v=3, per_r=3, h=32, w=16, seed=0):
    """A TrainSet of random images: `per_v` visible (camera 1) and `per_r` infrared (camera 3) images of each of
    `ids` identities (labels 0..ids-1), the visible ones drawn first."""
    rng = np.random.default_rng(seed)

    def image_set(per, cam):
        labels = np.repeat(np.arange(ids), per)
        return data.ImageSet([f"{cam}-{i}" for i in range(len(labels))], labels, np.full(len(labels), cam),
                             rng.integers(0, 256, (len(labels), h, w, 3), dtype=np.uint8))
    return data.TrainSet(image_set(per_v, 1), image_set(per_r, 3), ids)


def random_batch(n_ids=2, K=2, h=32, w=16, seed=0, dtype=torch.float32, label_offset=0):
    """A training batch of standard normal images, K visible and K infrared of each of `n_ids` identities (labels
    label_offset + 0, 0, ..., 1, 1, ...); x_v is drawn before x_r from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_ids).repeat_interleave(K) + label_offset
    return {"x_v": torch.randn(len(y), 3, h, w, generator=g, dtype=dtype),
            "x_r": torch.randn(len(y), 3, h, w, generator=g, dtype=dtype), "y_v": y, "y_r": y.clone()}


# ---- reid.py: in a subprocess (run_reid) or in this process (reid_smoke, reid_outcome), always with the test cache

def run_reid(*args, timeout=600, cwd=None, preexec_fn=None):
    """`python reid.py ARGS` in a subprocess: this repository's reid.py, run from the repository root (or from `cwd`,
    for a test of the working directory), with `--cache-dir TEST_CACHE` unless ARGS name a cache directory, and a
    timeout. Returns the CompletedProcess (text)."""
    if "--cache-dir" not in args:
        args = (*args, "--cache-dir", TEST_CACHE)
    return subprocess.run([sys.executable, str(REID), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(cwd or HERE), preexec_fn=preexec_fn)


def reid_smoke(method, out, *extra):
    """One --smoke train + evaluate through reid.main in this process; returns results.json as a dict."""
    reid.main(["--method", method, "--smoke", "--out", str(out), "--cache-dir", TEST_CACHE, "--overwrite",
               *extra])
    return json.loads((Path(out) / "results.json").read_text())


def reid_outcome(argv):
    """(exit status, message) of reid.main(argv) in this process, as the command line would give them: 0; 2 and
    the UserError's text; or argparse's status and its stderr line. The test cache is added as by run_reid."""
    if "--cache-dir" not in argv:
        argv = [*argv, "--cache-dir", TEST_CACHE]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            reid.main(argv)
        return 0, ""
    except UserError as e:
        return 2, str(e)
    except SystemExit as e:
        return e.code, err.getvalue()


# ==== synthetic.py (TestSynthetic*) ====

def digest(root):
    """sha1 over every file's relative path and bytes under root."""
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class TestSyntheticSYSU(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        cls.root = str(synthetic.make_sysu(os.path.join(cls.tmp, "sysu"), num_ids=24, num_test=6, images_per_cam=3,
                                           height=64, width=32, seed=0, log=quiet))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def test_deterministic_in_seed(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        kw = dict(num_ids=6, num_test=2, images_per_cam=2, height=48, width=24, log=quiet)
        a = synthetic.make_sysu(os.path.join(tmp, "a"), seed=3, **kw)
        b = synthetic.make_sysu(os.path.join(tmp, "b"), seed=3, **kw)
        c = synthetic.make_sysu(os.path.join(tmp, "c"), seed=4, **kw)
        self.assertEqual(digest(a), digest(b))
        self.assertNotEqual(digest(a), digest(c))

    def test_layout_and_exp_files_as_the_real_dataset(self):
        self.assertEqual(sorted(os.listdir(self.root)),
                         ["cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "exp", synthetic.MARKER])
        self.assertEqual(os.listdir(self.tmp), ["sysu"])              # no temporary left behind
        splits = {}
        for split in ("train", "val", "test"):
            with open(os.path.join(self.root, "exp", f"{split}_id.txt")) as f:
                lines = f.read().splitlines()
            self.assertEqual(len(lines), 1)                          # one comma-separated line, like SYSU
            self.assertRegex(lines[0], r"^[1-9]\d*(,[1-9]\d*)*$")    # integers, no zero padding
            splits[split] = [int(t) for t in lines[0].split(",")]
            self.assertEqual(splits[split], sorted(splits[split]))
        self.assertEqual({k: len(v) for k, v in splits.items()}, {"train": 13, "val": 5, "test": 6})
        ids = set(splits["train"]) | set(splits["val"]) | set(splits["test"])
        self.assertEqual(len(ids), 24)                               # disjoint
        self.assertNotEqual(ids, set(range(1, 25)))                  # non-contiguous, like SYSU's 1..533
        cams_of = {i: set() for i in ids}
        for cam in range(1, 7):
            for folder in os.listdir(os.path.join(self.root, f"cam{cam}")):
                self.assertRegex(folder, r"^\d{4}$")
                cams_of[int(folder)].add(cam)
                names = sorted(os.listdir(os.path.join(self.root, f"cam{cam}", folder)))
                self.assertEqual(names, [f"{n:04d}.jpg" for n in range(1, len(names) + 1)])
        for pid, cams in cams_of.items():
            self.assertTrue(cams & {1, 2, 4, 5} and cams & {3, 6}, (pid, cams))
            if pid in splits["test"]:
                self.assertTrue(cams & {1, 2}, (pid, cams))          # indoor-search gallery exists
        self.assertLess(sum(map(len, cams_of.values())), 6 * 24)    # not every id in every camera
        with open(os.path.join(self.root, synthetic.MARKER)) as f:
            marker = json.load(f)
        self.assertEqual(marker["kind"], "sysu")
        self.assertEqual(marker["params"]["num_ids"], 24)
        self.assertEqual(sum(marker["counts"].values()),
                         len(glob.glob(os.path.join(self.root, "cam*", "*", "*.jpg"))))

    def test_images_per_modality(self):
        sizes = set()
        for cam in range(1, 7):
            for path in sorted(glob.glob(os.path.join(self.root, f"cam{cam}", "*", "*.jpg")))[:12]:
                img = Image.open(path)
                sizes.add(img.size)
                self.assertEqual(img.mode, "L" if cam == 6 else "RGB", path)
                a = np.asarray(img.convert("RGB"), np.int16)
                spread = np.abs(a - a.mean(axis=2, keepdims=True)).mean()
                if cam in (3, 6):
                    self.assertLessEqual(spread, 1.0, path)          # one intensity in three channels
                else:
                    self.assertGreater(spread, 3.0, path)            # colour
                w, h = img.size
                f = synthetic.SYSU_CAMERAS[cam]["size"]
                self.assertTrue(abs(h - 64 * f) <= 0.06 * 64 * f + 1 and abs(w - 32 * f) <= 0.06 * 32 * f + 1,
                                (path, h, w))                        # camera size factor, +-6 % jitter
        self.assertGreater(len(sizes), 6)                            # sizes vary: loaders must resize

    def test_modality_gap_with_raw_pixels(self):
        """Raw pixels (16 x 32, central half, camera mean removed, L2-normalised): visible-to-visible
        retrieval across cameras is far better than infrared-to-visible or visible-to-infrared."""
        feats, pids, cams = [], [], []
        for path in sorted(glob.glob(os.path.join(self.root, "cam*", "*", "*.jpg"))):
            img = Image.open(path).convert("RGB").resize((16, 32), Image.BILINEAR)
            feats.append(np.asarray(img, np.float64)[:, 4:12])
            pids.append(int(path.split(os.sep)[-2]))
            cams.append(int(path.split(os.sep)[-3][3:]))
        F, P, C = np.stack(feats), np.array(pids), np.array(cams)
        for cam in range(1, 7):
            F[C == cam] -= F[C == cam].mean(axis=0)
        F = F.reshape(len(F), -1)
        F -= F.mean(axis=1, keepdims=True)
        F /= np.linalg.norm(F, axis=1, keepdims=True)
        visible = np.isin(C, (1, 2, 4, 5))

        def rank1(q, g):
            """Top-1 accuracy of cosine ranking, gallery images of the query's camera excluded."""
            q, g = np.flatnonzero(q), np.flatnonzero(g)
            best = []
            for i in q:
                sims = [(-1e9 if C[j] == C[i] else F[i] @ F[j], j) for j in g]
                best.append(P[max(sims)[1]] == P[i])
            return float(np.mean(best))

        same = rank1(visible, visible)
        cross = max(rank1(~visible, visible), rank1(visible, ~visible))
        self.assertGreater(same, 4 / 24)                             # well above chance (1/24)
        self.assertGreater(same, 2 * cross, (same, cross))


class TestSyntheticMaterials(unittest.TestCase):
    def test_band_ratio_constant_within_material_and_differs_across(self):
        """RFM Eq. (4): within one material NIR / G is one constant (the shading cancels), and it is the
        material's nir / green reflectance; different materials have very different constants."""
        world = synthetic.World([1, 2, 3], seed=0, cameras={1: dict(synthetic.SYSU_CAMERAS[1], place=1)}, height=64,
                                width=32)
        factors = {}
        for pid, view in ((1, "front"), (2, "side"), (3, "back")):
            shot = synthetic.Shot(view=view, facing=1, phase=0.7, scale=0.85, dx=0.0, foot=0.97, pan=0.4, tilt=0.5,
                                  exposure=1.0, gradient=0.2, size=(64, 32), detail=pid, occluded=True)
            cv = world.scene(pid, 1, shot)
            vis = synthetic.radiance(cv.label, cv.shade, world.mats.rgb)     # (128, 64, 3)
            nir = synthetic.radiance(cv.label, cv.shade, world.mats.nir)[..., 0]  # (128, 64)
            for m in np.unique(cv.label):
                mask = cv.label == m
                if mask.sum() < 20:
                    continue
                self.assertGreater(vis[mask][:, 1].std() / vis[mask][:, 1].mean(), 0.02)  # pixels do vary
                ratio = nir[mask] / vis[mask][:, 1]
                self.assertLess(ratio.std() / ratio.mean(), 1e-5)
                self.assertAlmostEqual(ratio.mean() / (world.mats.nir[m, 0] / world.mats.rgb[m, 1]), 1.0, places=5)
                factors[int(m)] = float(ratio.mean())
        self.assertGreater(len(factors), 10)
        self.assertGreater(max(factors.values()) / min(factors.values()), 10.0)

    def test_colour_does_not_determine_infrared(self):
        mats = synthetic.make_materials(np.random.default_rng(0))
        fabric = mats.groups["fabric"]
        rgb, nir = mats.rgb[fabric], mats.nir[fabric, 0]
        same_colour = np.abs(rgb[:, None] - rgb[None]).max(axis=2) < 0.05 * (1 + rgb.max(axis=1)[:, None])
        dnir = np.abs(nir[:, None] - nir[None])
        self.assertGreater((same_colour & (dnir > 0.3)).sum(), 0)   # same colour, different infrared
        far_colour = np.abs(rgb[:, None] - rgb[None]).max(axis=2) > 0.3
        self.assertGreater((far_colour & (dnir < 0.03)).sum(), 0)   # different colour, same infrared
        self.assertEqual(mats.rgb.shape, (len(mats.names), 3))
        self.assertEqual(mats.nir.shape, (len(mats.names), 1))


class TestSyntheticRegDB(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        cls.root = str(synthetic.make_regdb(os.path.join(cls.tmp, "regdb"), num_ids=8, images_per_id=3,
                                            height=48, width=24, seed=0, log=quiet))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def test_layout_and_idx_files_as_the_real_dataset(self):
        self.assertEqual(sorted(os.listdir(self.root)), ["Thermal", "Visible", "idx", synthetic.MARKER])
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, "idx"))),
                         sorted(f"{s}_{m}_{k}.txt" for s in ("train", "test") for m in ("visible", "thermal")
                                for k in range(1, 11)))
        for pid in range(1, 9):
            names = sorted(os.listdir(os.path.join(self.root, "Visible", str(pid))))
            self.assertEqual(len(names), 3)
            for name in names:
                self.assertRegex(name, r"^(male|female)_(front|back)_v_\d{5}_[1-3]\.bmp$")
                thermal = name.replace("_v_", "_t_")
                v = Image.open(os.path.join(self.root, "Visible", str(pid), name))
                t = Image.open(os.path.join(self.root, "Thermal", str(pid), thermal))
                self.assertEqual((v.mode, v.size, t.mode, t.size), ("RGB", (24, 48), "L", (24, 48)))
        splits = set()
        for k in range(1, 11):
            parsed = {}
            for split in ("train", "test"):
                for mod, folder in (("visible", "Visible"), ("thermal", "Thermal")):
                    with open(os.path.join(self.root, "idx", f"{split}_{mod}_{k}.txt")) as f:
                        rows = [line.split(" ") for line in f.read().splitlines()]
                    for path, label in rows:
                        self.assertTrue(path.startswith(folder + "/"), path)
                        self.assertTrue(os.path.isfile(os.path.join(self.root, path)), path)
                    parsed[split, mod] = [(int(path.split("/")[1]), int(label)) for path, label in rows]
            for split in ("train", "test"):                           # same identities in both modalities
                self.assertEqual(parsed[split, "visible"], parsed[split, "thermal"])
            train_ids = sorted({p for p, _ in parsed["train", "visible"]})
            test_ids = sorted({p for p, _ in parsed["test", "visible"]})
            self.assertEqual(len(train_ids), 4)
            self.assertEqual(sorted(train_ids + test_ids), list(range(1, 9)))
            self.assertEqual(len(parsed["train", "visible"]), 12)
            for pid, label in parsed["train", "visible"]:            # relabelled 0..N-1 in id order
                self.assertEqual(label, train_ids.index(pid))
            for pid, label in parsed["test", "visible"]:             # test labels: the folder ids
                self.assertEqual(label, pid)
            splits.add(tuple(train_ids))
        self.assertGreater(len(splits), 1)                           # trials differ

    def test_thermal_and_visible_are_a_pair(self):
        """The dual camera sees one walk: the thermal silhouette overlaps the visible figure's place."""
        v = np.asarray(Image.open(glob.glob(os.path.join(self.root, "Visible", "1", "*_1.bmp"))[0]))
        t = np.asarray(Image.open(glob.glob(os.path.join(self.root, "Thermal", "1", "*_1.bmp"))[0]))
        warm = t > t.mean() + 0.5 * t.std()                         # the person is warmer than the scene
        cols = np.flatnonzero(warm.mean(axis=0) > 0.3)
        self.assertTrue(len(cols) > 0 and abs(cols.mean() - 12) < 5, cols)
        self.assertEqual(v.shape, (48, 24, 3))


class TestSyntheticCache(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def test_ensure_world_reuses_a_complete_world(self):
        logs = []
        kw = dict(num_ids=5, num_test=2, images_per_cam=1, height=32, width=16)
        a = synthetic.ensure_world(self.tmp, "sysu", log=logs.append, **kw)
        built = len(logs)
        self.assertGreater(built, 0)
        stamp = os.stat(os.path.join(a, synthetic.MARKER)).st_mtime_ns
        self.assertEqual(synthetic.ensure_world(self.tmp, "sysu", log=logs.append, **kw), a)
        self.assertEqual(len(logs), built)                           # nothing regenerated
        self.assertEqual(os.stat(os.path.join(a, synthetic.MARKER)).st_mtime_ns, stamp)
        b = synthetic.ensure_world(self.tmp, "sysu", log=quiet, seed=1, **kw)
        c = synthetic.ensure_world(self.tmp, "regdb", log=quiet, num_ids=2, images_per_id=1, height=32, width=16)
        self.assertEqual(len({a, b, c}), 3)
        self.assertEqual(sorted(os.listdir(self.tmp)), sorted(p.name for p in (a, b, c)))
        with open(os.path.join(a, synthetic.MARKER)) as f:
            self.assertEqual(json.load(f)["params"], dict(kw, seed=0))

    def test_interrupted_build_leaves_nothing(self):
        calls = []

        def log(msg):
            calls.append(msg)
            if len(calls) == 2:                                      # first progress line: mid-build
                raise KeyboardInterrupt

        with self.assertRaises(KeyboardInterrupt):
            synthetic.ensure_world(self.tmp, "sysu", log=log, num_ids=8, num_test=2, images_per_cam=1, height=32,
                                   width=16)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_bad_parameters_raise_user_errors(self):
        with self.assertRaisesRegex(UserError, "market"):
            synthetic.ensure_world(self.tmp, "market")
        with self.assertRaisesRegex(UserError, "num_idz"):
            synthetic.ensure_world(self.tmp, "sysu", num_idz=3)
        with self.assertRaisesRegex(UserError, "num_test"):
            synthetic.make_sysu(os.path.join(self.tmp, "w"), num_ids=3, num_test=2)
        with self.assertRaisesRegex(UserError, "height"):
            synthetic.make_regdb(os.path.join(self.tmp, "w"), height=8)
        with self.assertRaisesRegex(UserError, "already exists"):
            synthetic.make_sysu(self.tmp)


# ==== data.py (TestData*) ====

def decode(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((TREE_W, TREE_H), Image.BILINEAR))


def community_gallery(root, mode, shot, trial):
    """Direct re-statement of the community data manager (global `random`, seeded per call)."""
    random.seed(trial)
    rgb_cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    with open(os.path.join(root, "exp/test_id.txt")) as f:
        ids = ["%04d" % int(y) for y in f.read().splitlines()[0].split(",")]
    files = []
    for pid in sorted(ids):
        for cam in rgb_cameras:
            img_dir = os.path.join(root, cam, pid)
            if os.path.isdir(img_dir):
                new_files = sorted([img_dir + "/" + i for i in os.listdir(img_dir)])
                if shot == "single":
                    files.append(random.choice(new_files))
                else:
                    files.extend(random.sample(new_files, min(10, len(new_files))))
    return files


class TestDataSYSU(HandMadeTrees):
    def test_train_set(self):
        train, _ = self.load_sysu()
        ids = sorted(list(SYSU_TRAIN) + list(SYSU_VAL))                  # 1, 2, 5, 7 -> 0..3
        self.assertEqual(train.num_classes, 4)
        for s, cams in ((train.v, (1, 2, 4, 5)), (train.r, (3, 6))):
            expect = [(os.path.join(self.sysu, f"cam{c}", f"{pid:04d}", f"{k + 1:04d}.jpg"), label, c)
                      for label, pid in enumerate(ids) for c in cams
                      for k in range({**SYSU_TRAIN, **SYSU_VAL}[pid].get(c, 0))]
            self.assertEqual(s.files, [e[0] for e in expect])
            self.assertEqual(s.labels.tolist(), [e[1] for e in expect])
            self.assertEqual(s.cams.tolist(), [e[2] for e in expect])
            self.assertEqual(s.labels.dtype, np.int64)
            self.assertEqual(s.images.shape, (len(expect), TREE_H, TREE_W, 3))
            self.assertEqual(s.images.dtype, np.uint8)
        gray = 0
        for s in (train.v, train.r):
            for f, img in zip(s.files, s.images):
                np.testing.assert_array_equal(img, decode(f))
                with Image.open(f) as im:
                    if im.mode == "L":
                        gray += 1
                        self.assertTrue((img == img[..., :1]).all())
        self.assertGreater(gray, 0)

    def test_test_pools_and_queries(self):
        _, test = self.load_sysu()
        ids = sorted(SYSU_TEST)
        q = [(os.path.join(self.sysu, f"cam{c}", f"{pid:04d}", f"{k + 1:04d}.jpg"), pid, c)
             for pid in ids for c in (3, 6) for k in range(SYSU_TEST[pid].get(c, 0))]
        self.assertEqual(test.pools["r"].files, [e[0] for e in q])
        self.assertEqual(test.pools["r"].labels.tolist(), [e[1] for e in q])   # original (large) ids
        self.assertEqual(test.pools["r"].cams.tolist(), [e[2] for e in q])
        nv = sum(n for pid in ids for c, n in SYSU_TEST[pid].items() if c in (1, 2, 4, 5))
        self.assertEqual(len(test.pools["v"]), nv)
        self.assertEqual(set(test.pools["v"].labels.tolist()), {12, 345, 9876})
        self.assertEqual([p.name for p in test.protocols], ["all-single", "all-multi", "indoor-single", "indoor-multi"])
        for p in test.protocols:
            self.assertEqual((p.query, p.gallery, p.kind, len(p.trials)), ("r", "v", "sysu", 10))

    def test_gallery_equals_community_rule(self):
        """Single shot: the AGW baseline's data_manager.py (random.choice). Multi shot (the AGW baseline has none):
        restated from JDAI-CV/CM-NAS datasets/sysu_dataset.py process_gallery_sysu, `random.sample(files, shot)`
        after `random.seed(trial)` for both shots (IDLNL/MCE data_manager.py: the same with 10); that code raises
        on a camera with fewer than `shot` images, where the project takes them all (data.py's deviation)."""
        def cmnas_gallery(mode, shot, trial):
            random.seed(trial)
            cams = {"all": ["cam1", "cam2", "cam4", "cam5"], "indoor": ["cam1", "cam2"]}[mode]
            with open(os.path.join(self.sysu, "exp", "test_id.txt")) as fh:
                ids = ["%04d" % int(x) for x in fh.read().splitlines()[0].split(",")]
            paths = []
            for pid in sorted(ids):
                for cam in cams:
                    d = os.path.join(self.sysu, cam, pid)
                    if os.path.isdir(d):
                        names = sorted(d + "/" + n for n in os.listdir(d))
                        paths += random.sample(names, min(shot, len(names)))
            return paths

        _, test = self.load_sysu()
        state = random.getstate()
        try:
            for p in test.protocols:
                mode, shot = p.name.split("-")
                galleries = set()
                for t, (qi, gi) in enumerate(p.trials):
                    self.assertEqual(qi.tolist(), list(range(len(test.pools["r"]))))
                    got = [test.pools["v"].files[i] for i in gi]
                    self.assertEqual(got, cmnas_gallery(mode, {"single": 1, "multi": 10}[shot], t), (p.name, t))
                    if shot == "single":
                        self.assertEqual(got, community_gallery(self.sysu, mode, shot, t), (p.name, t))
                    galleries.add(tuple(got))
                    cams = test.pools["v"].cams[gi]
                    self.assertTrue(set(cams.tolist()) <= ({1, 2, 4, 5} if mode == "all" else {1, 2}))
                self.assertGreater(len(galleries), 1)      # trials differ
            single = test.protocols[0].trials[0][1]
            self.assertEqual(len(single), 3 + 3 + 3)       # one per existing (id, cam) dir, cams 1, 2, 4, 5
            multi = test.protocols[1].trials[0][1]
            self.assertEqual(len(multi), 10 + 3 + 10 + 2 + 5 + 1 + 1 + 10 + 9)
        finally:
            random.setstate(state)

    def test_published_statistics_warning(self):
        logs = []
        self.load_sysu(log=logs.append)
        warn = [m for m in logs if "WARNING" in m]
        self.assertEqual(len(warn), 1)
        self.assertIn("train ids 4 (published 395)", warn[0])
        self.assertIn("test queries (infrared) 8 (published 3803)", warn[0])
        logs = []
        self.load_sysu(log=logs.append, expect_published=False)
        self.assertFalse([m for m in logs if "WARNING" in m])
        self.assertTrue(any("train ids 4" in m for m in logs))


class TestDataRegDB(HandMadeTrees):
    def load(self, trial, root=None):
        return data.load_regdb(root or self.regdb, trial, TREE_H, TREE_W, self.cache, log=lambda m: None)

    def test_trials_relabel_and_test_labels(self):
        for trial, splits in REGDB_TRIALS.items():
            train, test = self.load(trial)
            order = sorted(label for _, label in splits["train"])
            for s, d, m, cam in ((train.v, "Visible", "v", 1), (train.r, "Thermal", "t", 2)):
                expect = [(os.path.join(self.regdb, d, str(pid), f"male_front_{m}_{pid:05d}_{k + 1}.bmp"),
                           order.index(label)) for pid, label in splits["train"] for k in range(3)]
                self.assertEqual(s.files, [e[0] for e in expect])
                self.assertEqual(s.labels.tolist(), [e[1] for e in expect])
                self.assertEqual(s.cams.tolist(), [cam] * len(expect))
                for f, img in zip(s.files, s.images):
                    np.testing.assert_array_equal(img, decode(f))
            self.assertEqual(train.num_classes, 3)
            for key, cam in (("v", 1), ("r", 2)):
                self.assertEqual(test.pools[key].labels.tolist(), [lab for _, lab in splits["test"] for _ in range(3)])
                self.assertEqual(test.pools[key].cams.tolist(), [cam] * 9)
            self.assertTrue((test.pools["r"].images == test.pools["r"].images[..., :1]).all())   # thermal is grey
            names = [(p.name, p.query, p.gallery, p.kind, len(p.trials)) for p in test.protocols]
            self.assertEqual(names, [("visible-to-infrared", "v", "r", "regdb", 1),
                                     ("infrared-to-visible", "r", "v", "regdb", 1)])
            for p in test.protocols:
                qi, gi = p.trials[0]
                self.assertEqual(qi.tolist(), list(range(9)))
                self.assertEqual(gi.tolist(), list(range(9)))

    def test_trials_share_one_cache(self):
        self.load(1)
        self.load(2)
        names = [n for n in os.listdir(self.cache) if n.startswith("regdb-")]
        self.assertEqual(len(names), 2)    # one per modality


class TestDataSampler(unittest.TestCase):
    # ids 0..5: visible counts 5,1,4,6,3,0; infrared counts 2,4,0,5,4,3 -> ids with both: 0, 1, 3, 4
    lv = np.repeat(np.arange(6), [5, 1, 4, 6, 3, 0])
    lr = np.repeat(np.arange(6), [2, 4, 0, 5, 4, 3])

    def test_layout_and_length(self):
        P, K = 2, 3
        s = data.CrossModalitySampler(self.lv, self.lr, P, K, seed=1)
        self.assertEqual(len(s), 19 // 6)
        seen = set()
        for e in range(20):
            batches = s.epoch(e)
            self.assertEqual(len(batches), 3)
            for iv, ir in batches:
                self.assertEqual((iv.shape, ir.shape, iv.dtype), ((P * K,), (P * K,), np.int64))
                yv, yr = self.lv[iv].reshape(P, K), self.lr[ir].reshape(P, K)
                self.assertTrue((yv == yv[:, :1]).all() and (yr == yr[:, :1]).all())
                self.assertEqual(yv[:, 0].tolist(), yr[:, 0].tolist())        # same identity order
                self.assertEqual(len(set(yv[:, 0].tolist())), P)               # no identity twice
                self.assertTrue(set(yv[:, 0].tolist()) <= {0, 1, 3, 4})
                for row_v, row_r in zip(iv.reshape(P, K), ir.reshape(P, K)):
                    for row, labels in ((row_v, self.lv), (row_r, self.lr)):
                        if (labels == labels[row[0]]).sum() >= K:
                            self.assertEqual(len(set(row.tolist())), K)        # no replacement when enough
                seen |= set(yv[:, 0].tolist())
        self.assertEqual(seen, {0, 1, 3, 4})
        self.assertEqual(len(data.CrossModalitySampler(self.lv, self.lr, 2, 4, 0)), 19 // 8)

    def test_deterministic_and_resumable(self):
        a = data.CrossModalitySampler(self.lv, self.lr, 2, 2, seed=5)
        b = data.CrossModalitySampler(self.lv, self.lr, 2, 2, seed=6)

        def same(x, y):
            return all((p == q).all() and (r == t).all() for (p, r), (q, t) in zip(x, y))
        self.assertTrue(same(a.epoch(3), a.epoch(3)))
        self.assertFalse(same(a.epoch(3), a.epoch(4)))
        self.assertFalse(same(a.epoch(3), b.epoch(3)))
        b.load_state_dict(a.state_dict())
        self.assertTrue(same(a.epoch(3), b.epoch(3)))


def extra_hook(batch, g):
    """An `extra` hook like MCE's: adds an auxiliary image from a random channel of x_v."""
    c = torch.randint(0, 3, (1,), generator=g).item()
    batch["x_a"] = batch["x_v"][:, c:c + 1].expand(-1, 3, -1, -1).clone()
    return batch


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class TestDataLoader(unittest.TestCase):
    def test_workers_do_not_change_batches(self):
        ts = tiny_trainset(h=12, w=6)
        aug = data.Augment(12, 6, pad=2, extra=extra_hook)
        runs = []
        for workers in (0, 2):
            loader = data.train_loader(ts, 2, 2, seed=3, augment=aug, workers=workers)
            self.assertEqual(len(loader), 12 // 4)
            runs.append([b for e in (0, 1) for b in loader.epoch(e)])
        self.assertEqual(len(runs[0]), 6)
        for b0, b2 in zip(*runs):
            self.assertEqual(sorted(b0), ["x_a", "x_r", "x_v", "y_r", "y_v"])
            for k in b0:
                self.assertTrue(torch.equal(b0[k], b2[k]), k)
            self.assertEqual(b0["x_v"].shape, (4, 3, 12, 6))
            self.assertEqual(b0["y_v"].dtype, torch.int64)
            self.assertEqual(b0["y_v"].tolist(), b0["y_r"].tolist())
        self.assertFalse(torch.equal(runs[0][0]["x_v"], runs[0][3]["x_v"]))       # epochs differ
        state = data.train_loader(ts, 2, 2, seed=3, augment=aug).state_dict()
        other = data.train_loader(ts, 2, 2, seed=9, augment=aug)
        other.load_state_dict(state)
        self.assertTrue(torch.equal(next(other.epoch(1))["x_r"], runs[0][3]["x_r"]))

    def test_batch_is_labelled_crop_of_sampled_images(self):
        ts = tiny_trainset(h=10, w=5)
        loader = data.train_loader(ts, 2, 2, seed=0, augment=data.Augment(10, 5, pad=3, erasing=0))
        batches = loader.sampler.epoch(0)
        flips = set()
        for (iv, ir), b in zip(batches, loader.epoch(0)):
            for key, idx, s in (("x_v", iv, ts.v), ("x_r", ir, ts.r)):
                self.assertEqual(b["y" + key[1:]].tolist(), s.labels[idx].tolist())
                out = ((b[key] * STD + MEAN) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                for img, src in zip(out, s.images[idx]):
                    padded = np.pad(src, ((3, 3), (3, 3), (0, 0)))
                    found = [(y, x, f) for y in range(7) for x in range(7) for f in (0, 1)
                             if (np.flip(padded[y:y + 10, x:x + 5], 1) if f else padded[y:y + 10, x:x + 5]).tolist()
                             == img.tolist()]
                    self.assertTrue(found)
                    flips |= {f for _, _, f in found}
        self.assertEqual(flips, {0, 1})

    def test_random_erasing_rectangles(self):
        aug = data.Augment(40, 20, pad=0, flip=False, erasing=1.0)
        x = torch.full((16, 40, 20, 3), 200, dtype=torch.uint8)
        g = torch.Generator().manual_seed(0)
        out = aug({"x_v": x, "y_v": torch.zeros(16, dtype=torch.int64)}, g)["x_v"]
        value = (200 / 255 - MEAN) / STD
        for img in out:
            zero = (img == 0).all(0)
            kept = torch.isclose(img, value.view(3, 1, 1).expand_as(img)).all(0)
            self.assertTrue((zero | kept).all())
            rows, cols = zero.any(1).nonzero()[:, 0], zero.any(0).nonzero()[:, 0]
            self.assertEqual(int(zero.sum()), len(rows) * len(cols))   # one filled rectangle
            self.assertEqual(len(rows), int(rows[-1] - rows[0]) + 1)
            self.assertTrue(0.015 <= zero.float().mean().item() <= 0.45)

    def test_test_batches(self):
        images = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3), dtype=np.uint8)
        got = list(data.test_batches(images, 2))
        self.assertEqual([b.shape[0] for b in got], [2, 2, 1])
        expect = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
        self.assertTrue(torch.allclose(torch.cat(got), expect, atol=1e-6))

    def test_splits(self):
        ts = tiny_trainset(ids=5, per_v=5, per_r=5, h=12, w=6)
        a, b = ts.split_ids(0.8, seed=0)
        self.assertEqual((a.num_classes, b.num_classes), (5, 5))
        ids_a, ids_b = set(a.v.labels.tolist()), set(b.v.labels.tolist())
        self.assertEqual((len(ids_a), len(ids_b), ids_a & ids_b), (4, 1, set()))
        self.assertEqual(set(a.r.labels.tolist()), ids_a)
        a, b = ts.split_images(0.8, seed=0)
        self.assertEqual((len(a.v), len(b.v), len(a.r), len(b.r)), (20, 5, 20, 5))
        self.assertEqual(set(b.v.labels.tolist()), set(range(5)))
        self.assertFalse(set(a.v.files) & set(b.v.files))
        for part in (a, b):
            for s, full in ((part.v, ts.v), (part.r, ts.r)):
                src = [full.files.index(f) for f in s.files]
                np.testing.assert_array_equal(s.images, full.images[src])
                np.testing.assert_array_equal(s.labels, full.labels[src])


class TestDataCache(HandMadeTrees):
    def test_rebuilt_only_when_files_or_size_change(self):
        root = self.copy(self.sysu, "sysu-cache")
        cache = os.path.join(self.tmp, "cache-test")

        def load(h=TREE_H, w=TREE_W):
            logs = []
            train, test = data.load_sysu(root, h, w, cache, log=logs.append, expect_published=False)
            return train, test, [m for m in logs if m.startswith("caching")]
        _, _, built = load()
        self.assertEqual(len(built), 4)
        train, _, built = load()
        self.assertEqual(built, [])
        self.assertIsInstance(train.v.images, np.memmap)
        f = train.v.files[2]
        st = os.stat(f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))            # touch: same content, no rebuild
        _, _, built = load()
        self.assertEqual(built, [])
        Image.new("RGB", (13, 29), (255, 0, 0)).save(f)                     # new content
        train, _, built = load()
        self.assertEqual(len(built), 1)
        self.assertIn("train-v", built[0])
        np.testing.assert_array_equal(train.v.images[2], decode(f))
        self.assertTrue((train.v.images[2, ..., 0] > 250).all() and (train.v.images[2, ..., 1:] < 5).all())
        self.assertEqual(len(os.listdir(cache)), 4)                         # stale files removed
        train, _, built = load(h=20, w=10)
        self.assertEqual(len(built), 4)
        self.assertEqual(train.v.images.shape[1:], (20, 10, 3))
        self.assertFalse([n for n in os.listdir(cache) if ".tmp" in n])

    def test_edit_with_size_and_mtime_restored_is_redecoded(self):
        """D16: thermal .bmp pixels changed in place, size and mtime put back: the content key sees it."""
        root = self.copy(self.regdb, "regdb-d16")
        cache = os.path.join(self.tmp, "cache-d16")

        def load():
            logs = []
            train, _ = data.load_regdb(root, 1, TREE_H, TREE_W, cache, log=logs.append)
            return train, [m for m in logs if m.startswith("caching")]
        train, built = load()
        self.assertEqual(len(built), 2)
        f = train.r.files[4]
        before, st = train.r.images[4].copy(), os.stat(f)
        with open(f, "rb") as fh:
            raw = bytearray(fh.read())
        mid = (int.from_bytes(raw[10:14], "little") + len(raw)) // 2   # middle of the pixel array (BMP bfOffBits)
        raw[mid:mid + 40] = bytes(255 - b for b in raw[mid:mid + 40])
        with open(f, "wb") as fh:
            fh.write(raw)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertEqual((os.stat(f).st_size, os.stat(f).st_mtime_ns), (st.st_size, st.st_mtime_ns))
        train, built = load()
        self.assertEqual(len(built), 1)
        self.assertIn("-r-", built[0])
        np.testing.assert_array_equal(train.r.images[4], decode(f))
        self.assertFalse((train.r.images[4] == before).all())
        self.assertEqual(load()[1], [])                       # and then cached again

    def test_decode_pool_matches_in_process(self):
        files = self.load_sysu()[0].v.files
        with mock.patch.object(data, "POOL_MIN_IMAGES", 1):
            images = data.cached_images(files, TREE_H, TREE_W, os.path.join(self.tmp, "cache-pool"), "pool",
                                        lambda m: None)
            np.testing.assert_array_equal(images, np.stack([decode(f) for f in files]))
            root = self.copy(self.sysu, "sysu-pool-corrupt")
            bad = os.path.join(root, "cam2", "0005", "0002.jpg")
            with open(bad, "wb") as f:
                f.write(b"garbage")
            with self.assertRaises(data.DataError) as cm:
                self.load_sysu(root)
            self.assertIn(bad, str(cm.exception))


class TestDataErrors(HandMadeTrees):
    def assertDataError(self, fn, *needles):
        with self.assertRaises(data.DataError) as cm:
            fn()
        for n in needles:
            self.assertIn(str(n), str(cm.exception))
        return str(cm.exception)

    def test_is_user_error(self):
        self.assertTrue(issubclass(data.DataError, UserError))

    def test_roots(self):
        missing = os.path.join(self.tmp, "nope")
        self.assertDataError(lambda: self.load_sysu(missing), missing)
        parent = os.path.dirname(self.sysu)
        self.assertDataError(lambda: self.load_sysu(parent), parent, self.sysu)             # parent: suggests child
        self.assertDataError(lambda: data.load_regdb(os.path.dirname(self.regdb), 1, 8, 4, self.cache), self.regdb)
        self.assertDataError(lambda: data.load_regdb(missing, 1, 8, 4, self.cache), missing)

    def test_sysu_exp_files(self):
        root = self.copy(self.sysu, "sysu-bad-exp")
        val = os.path.join(root, "exp", "val_id.txt")
        os.remove(val)
        self.assertDataError(lambda: self.load_sysu(root), val)
        with open(val, "w") as f:
            f.write("7,x8\n")
        self.assertDataError(lambda: self.load_sysu(root), val, "line 1", "x8")
        with open(val, "w") as f:
            f.write("7\n8\n")
        self.assertDataError(lambda: self.load_sysu(root), val, "line 2")
        with open(val, "w") as f:
            f.write("7,4444\n")
        self.assertDataError(lambda: self.load_sysu(root), "4444", "val_id.txt")              # no images at all

    def test_corrupt_image(self):
        root = self.copy(self.sysu, "sysu-corrupt")
        bad = os.path.join(root, "cam4", "0345", "0003.jpg")
        with open(bad, "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg")
        self.assertDataError(lambda: self.load_sysu(root), bad)

    def test_regdb_inputs(self):
        for trial in (0, 11, "1", 2.0):
            self.assertDataError(lambda: data.load_regdb(self.regdb, trial, 8, 4, self.cache), repr(trial), "1 to 10")
        self.assertDataError(lambda: data.load_regdb(self.regdb, 3, 8, 4, self.cache),
                             os.path.join(self.regdb, "idx", "train_visible_3.txt"))
        root = self.copy(self.regdb, "regdb-bad")
        idx = os.path.join(root, "idx", "test_thermal_1.txt")
        with open(idx) as f:
            lines = f.read().splitlines()
        with open(idx, "w") as f:
            f.write("\n".join([lines[0], "Thermal/4/only_a_path.bmp"] + lines[2:]) + "\n")
        self.assertDataError(lambda: data.load_regdb(root, 1, 8, 4, self.cache), idx, "line 2")
        with open(idx, "w") as f:
            f.write("\n".join([lines[0], "Thermal/4/missing.bmp 205"] + lines[2:]) + "\n")
        self.assertDataError(lambda: data.load_regdb(root, 1, 8, 4, self.cache), idx, "line 2", "missing.bmp")

    def test_cache_dir_not_writable(self):
        blocker = os.path.join(self.tmp, "a-file")
        open(blocker, "w").close()
        self.assertDataError(lambda: data.load_sysu(self.sysu, 8, 4, blocker, log=lambda m: None), blocker)

    def test_sampler_too_many_ids(self):
        labels = np.array([0, 0, 1, 1, 2])
        self.assertDataError(lambda: data.CrossModalitySampler(labels, np.array([0, 1]), 3, 2, 0), "P=3", "2")


# ---- bad inputs of issue 19, one row each (review ids of shared/reviews/reliability.md)


def edit_lines(path, edit):
    """Rewrite a text file through edit(list of lines) -> list of lines."""
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(edit(lines)) + "\n")


def refuse(call, target):
    """A patch making call ('listdir' or 'open') raise PermissionError for the path `target` only, as a chmod 000
    does for a user without CAP_DAC_OVERRIDE (the tests may run as root, where a real chmod changes nothing)."""
    real = {"listdir": os.listdir, "open": open}[call]

    def fake(path, *a, **k):
        if os.path.abspath(os.fspath(path)) == target:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *a, **k)
    if call == "listdir":
        return mock.patch.object(data.os, "listdir", fake)
    return mock.patch.object(data, "open", fake, create=True)


def decode_patch(bad_name, action):
    """Patch data._decode so that the image named `bad_name` kills its decode process or hangs it."""
    real = data._decode

    def fake(path, h, w):
        if os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path) == bad_name:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
        return real(path, h, w)
    return mock.patch.object(data, "_decode", fake)


def garbage(root, rels):
    for rel in rels:
        with open(os.path.join(root, rel), "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg")
    return []


def decode_pool():
    return mock.patch.object(data, "POOL_MIN_IMAGES", 1)


TRAIN_V1 = "idx/train_visible_1.txt"
TEST_V1 = "idx/test_visible_1.txt"
SYSU_BAD12 = [f"cam1/0012/{k:04d}.jpg" for k in range(1, 13)]
# (case, dataset, setup(root, cache) -> [patches active during the load], exception, words the message must
#  contain ({root}, {cache} filled in), files (relative to root) that must still exist afterwards)
BAD_INPUTS = [
    ("D13_extra_column", "regdb",
     lambda r, c: edit_lines(os.path.join(r, TRAIN_V1), lambda ls: ls[:2] + [ls[2] + " 7"] + ls[3:]) or [],
     data.DataError, ["train_visible_1.txt line 3", "malformed", "3 fields"], [TRAIN_V1]),
    ("D13b_extra_column_all", "regdb",
     lambda r, c: edit_lines(os.path.join(r, TRAIN_V1), lambda ls: [x + " 7" for x in ls]) or [],
     data.DataError, ["train_visible_1.txt line 1", "malformed"], [TRAIN_V1]),
    ("D13c_label_dashdash", "regdb",
     lambda r, c: edit_lines(os.path.join(r, TRAIN_V1),
                             lambda ls: ls[:2] + [ls[2].split()[0] + " --1"] + ls[3:]) or [],
     data.DataError, ["train_visible_1.txt line 3", "malformed", "'--1'"], [TRAIN_V1]),
    ("D13c_label_negative", "regdb",
     lambda r, c: edit_lines(os.path.join(r, TRAIN_V1), lambda ls: [ls[0].split()[0] + " -1"] + ls[1:]) or [],
     data.DataError, ["line 1", "non-negative"], []),
    ("D13d_test_lists_are_train_lists", "regdb",
     lambda r, c: [shutil.copy(os.path.join(r, f"idx/train_{m}_1.txt"), os.path.join(r, f"idx/test_{m}_1.txt"))
                   for m in ("visible", "thermal")] and [],
     data.DataError, ["train_visible_1.txt and idx/test_visible_1.txt share 9 images", "disjoint"], [TEST_V1]),
    ("D13d_identity_in_both", "regdb",   # one image of folder 1 moved from the train list to the test list
     lambda r, c: (edit_lines(os.path.join(r, TRAIN_V1), lambda ls: ls[:2] + ls[3:]),
                   edit_lines(os.path.join(r, TEST_V1),
                              lambda ls: ls + ["Visible/1/male_front_v_00001_3.bmp 205"])) and [],
     data.DataError, ["identity folders ['1']", "disjoint"], []),
    ("D13f_duplicate_line", "regdb",
     lambda r, c: edit_lines(os.path.join(r, TRAIN_V1), lambda ls: ls + [ls[1]]) or [],
     data.DataError, ["train_visible_1.txt line 10", "already listed on line 2"], [TRAIN_V1]),
    ("D10g_regdb_index_unreadable", "regdb",
     lambda r, c: [refuse("open", os.path.join(r, TRAIN_V1))],
     data.DataError, ["{root}/idx/train_visible_1.txt", "Permission denied"], [TRAIN_V1]),
    ("D10e_camera_unreadable", "sysu",
     lambda r, c: [refuse("listdir", os.path.join(r, "cam1"))],
     data.DataError, ["camera directory {root}/cam1", "Permission denied", "chmod"], ["cam1/0001/0001.jpg"]),
    ("D10d_identity_folder_unreadable", "sysu",
     lambda r, c: [refuse("listdir", os.path.join(r, "cam1", "0001"))],
     data.DataError, ["identity folder {root}/cam1/0001", "Permission denied"], ["cam1/0001/0001.jpg"]),
    ("D10f_test_id_unreadable", "sysu",
     lambda r, c: [refuse("open", os.path.join(r, "exp", "test_id.txt"))],
     data.DataError, ["{root}/exp/test_id.txt", "Permission denied"], ["exp/test_id.txt"]),
    ("D10c_image_unreadable", "sysu",
     lambda r, c: [refuse("open", os.path.join(r, "cam2", "0005", "0002.jpg"))],
     data.DataError, ["{root}/cam2/0005/0002.jpg", "PermissionError", "chmod"], ["cam2/0005/0002.jpg"]),
    ("D18_thumbs_db_in_process", "sysu",
     lambda r, c: garbage(r, ["cam1/0001/Thumbs.db"]),
     data.DataError, ["{root}/cam1/0001/Thumbs.db", "not images"], ["cam1/0001/Thumbs.db"]),
    ("D18_thumbs_db_decode_processes", "sysu",
     lambda r, c: garbage(r, ["cam1/0001/Thumbs.db"]) + [decode_pool()],
     data.DataError, ["{root}/cam1/0001/Thumbs.db", "not images"], ["cam1/0001/Thumbs.db"]),
    ("D18_decode_process_killed", "sysu",
     lambda r, c: [decode_pool(), decode_patch("0005/0002.jpg", "kill")],
     data.DataError, ["died (signal SIGKILL) while reading {root}/cam2/0005/0002.jpg"], []),
    ("D18_decode_process_stuck", "sysu",
     lambda r, c: [decode_pool(), decode_patch("0005/0002.jpg", "hang"),
                   mock.patch.object(data, "DECODE_STALL_SECONDS", 1.0)],
     data.DataError, ["stalled", "{root}/cam2/0005/0002.jpg"], []),
    ("every_bad_image_reported", "sysu",
     lambda r, c: garbage(r, SYSU_BAD12) + [decode_pool()],
     data.DataError, ["cannot read 12 images", "{root}/cam1/0012/0001.jpg", "{root}/cam1/0012/0010.jpg",
                      "and 2 more", "replace or re-extract"], SYSU_BAD12),
    ("every_bad_image_of_every_set", "sysu",   # a training and a test image: both named in one run
     lambda r, c: garbage(r, ["cam2/0005/0002.jpg", "cam1/0012/0001.jpg"]),
     data.DataError, ["cannot read 2 images", "{root}/cam2/0005/0002.jpg", "{root}/cam1/0012/0001.jpg"], []),
    ("every_bad_image_of_every_set_regdb", "regdb",   # a visible and a thermal image
     lambda r, c: garbage(r, ["Visible/1/male_front_v_00001_1.bmp", "Thermal/5/male_front_t_00005_2.bmp"]),
     data.DataError, ["cannot read 2 images", "{root}/Visible/1/male_front_v_00001_1.bmp",
                      "{root}/Thermal/5/male_front_t_00005_2.bmp"], []),
    ("every_bad_image_reported_in_process", "sysu",
     lambda r, c: garbage(r, SYSU_BAD12[:3]),
     data.DataError, ["cannot read 3 images", "{root}/cam1/0012/0003.jpg"], []),
    ("O06_disk_too_small", "sysu",
     lambda r, c: [mock.patch.object(data.shutil, "disk_usage", lambda p: mock.Mock(free=2 * 2 ** 20))],
     data.DataError, ["needs", "has 2.0 MB free", "free disk space"], []),
    ("O06_disk_full_while_reserving", "sysu",
     lambda r, c: [mock.patch.object(data.os, "posix_fallocate",
                                     mock.Mock(side_effect=OSError(errno.ENOSPC, "No space left on device")),
                                     create=True)],
     data.DataError, ["cannot write the image cache", "No space left", "free disk space"], []),
    ("F11_cache_dir_is_a_file", "sysu",
     lambda r, c: open(c, "w").close() or [],
     data.DataError, ["cache directory {cache} is a file", "--cache-dir"], []),
    ("F11_cache_dir_under_a_file", "sysu",
     lambda r, c: open(c, "w").close() or [],                    # the cache directory given is <that file>/sub
     data.DataError, ["cannot create the cache directory {cache}/sub", "Not a directory"], []),
    ("F11d_cache_dir_read_only", "sysu",
     lambda r, c: [mock.patch.object(data.os, "access", lambda p, mode: False)],
     data.DataError, ["cache directory {cache} is not writable", "--cache-dir"], []),
]


class TestDataBadInputs(HandMadeTrees):
    """Each row of BAD_INPUTS on a fresh copy of the hand-made tree and a fresh cache directory: the loader
    raises the row's exception with a one-line message holding every word, the listed files are still there, and
    the cache holds no temporary file."""

    def test_rows(self):
        for case, dataset, setup, exc, words, keep in BAD_INPUTS:
            with self.subTest(case):
                root = self.copy(self.sysu if dataset == "sysu" else self.regdb, f"bad-{case}")
                cache = os.path.join(self.tmp, f"cache-{case}")
                patches = setup(root, cache)
                target = cache + "/sub" if case == "F11_cache_dir_under_a_file" else cache
                with self.assertRaises(exc) as cm:
                    with contextlib.ExitStack() as stack:
                        for p in patches:
                            stack.enter_context(p)
                        if dataset == "sysu":
                            data.load_sysu(root, TREE_H, TREE_W, target, log=lambda m: None)
                        else:
                            data.load_regdb(root, 1, TREE_H, TREE_W, target, log=lambda m: None)
                msg = str(cm.exception)
                self.assertNotIn("\n", msg)
                for w in words:
                    self.assertIn(w.format(root=root, cache=cache), msg)
                for rel in keep:
                    self.assertTrue(os.path.exists(os.path.join(root, rel)), rel)
                if os.path.isdir(target):
                    self.assertEqual([n for n in os.listdir(target) if ".tmp" in n], [])

    def test_rows_cover_the_review_cases(self):
        ids = {row[0].split("_")[0] for row in BAD_INPUTS}
        self.assertTrue({"D10c", "D10d", "D10e", "D10f", "D10g", "D13", "D13b", "D13c", "D13d", "D13f", "D18", "O06",
                         "F11", "F11d"} <= ids)

    def test_file_size_limit_is_a_full_disk(self):
        """O06 without mocks: a child process whose files may not grow past 4 KB (RLIMIT_FSIZE) builds the cache."""
        cache = os.path.join(self.tmp, "cache-fsize")
        code = ("import sys, data\n"
                "try:\n"
                f"    data.load_sysu({self.sysu!r}, 64, 32, {cache!r}, log=lambda m: None)\n"
                "except data.DataError as e:\n"
                "    print(e); sys.exit(2)\n")

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        done = subprocess.run([sys.executable, "-c", code], cwd=str(HERE), preexec_fn=limit, capture_output=True,
                              text=True, timeout=300)
        self.assertEqual(done.returncode, 2, done.stderr[-2000:])
        self.assertIn("cannot write the image cache", done.stdout)
        self.assertIn("free disk space", done.stdout)
        self.assertEqual(done.stdout.count("\n"), 1)
        self.assertEqual([n for n in os.listdir(cache) if ".tmp" in n], [])

    def test_good_variants_still_load(self):
        root = self.copy(self.sysu, "good-bom")
        edit_lines(os.path.join(root, "exp", "test_id.txt"), lambda ls: ["\ufeff" + ls[0]])           # Notepad BOM
        _, test = self.load_sysu(root)
        self.assertEqual(sorted(set(test.pools["r"].labels.tolist())), sorted(SYSU_TEST))

    def test_orphaned_temporary_cache_file_removed(self):
        cache = os.path.join(self.tmp, "cache-orphan")
        os.makedirs(cache)
        dead = os.path.join(cache, f"sysu-x-train-v-{TREE_H}x{TREE_W}-0.npy.tmp999999991")
        alive = os.path.join(cache, f"sysu-x-train-v-{TREE_H}x{TREE_W}-0.npy.tmp999999992")
        for p in (dead, alive):
            open(p, "w").close()
        self.assertFalse(data._pid_running(999999991))       # above the largest pid Linux hands out
        self.assertTrue(data._pid_running(os.getpid()))
        with mock.patch.object(data, "_pid_running", lambda pid: pid == 999999992):
            data.cached_images(self.load_sysu()[0].v.files, TREE_H, TREE_W, cache, "sysu-x-train-v", lambda m: None)
        self.assertFalse(os.path.exists(dead))
        self.assertTrue(os.path.exists(alive))


# ==== eval.py (TestEval*) ====

def evaluate_lists(dist, q_pids, g_pids, q_cams, g_cams, protocol="sysu", max_rank=3):
    arrays = [np.asarray(x) for x in (dist, q_pids, g_pids, q_cams, g_cams)]
    return evaluation.evaluate(*arrays, protocol=protocol, max_rank=max_rank)


class TestEvalToy(unittest.TestCase):
    """Hand-computed cases; the ranked lists and numbers are worked out in the comments."""

    def assertResult(self, r, cmc, cmc_standard, mAP, mINP, num_valid, num_skipped):
        np.testing.assert_allclose(r["cmc"], cmc, atol=1e-12)
        np.testing.assert_allclose(r["cmc_standard"], cmc_standard, atol=1e-12)
        self.assertAlmostEqual(r["mAP"], mAP, places=12)
        self.assertAlmostEqual(r["mINP"], mINP, places=12)
        self.assertEqual((r["num_valid"], r["num_skipped"]), (num_valid, num_skipped))

    def test_sysu_same_room_camera(self):
        # gallery: g0 id 1 cam 2, g1 id 2 cam 1, g2 id 1 cam 4; both queries are id 1, distances 0.1 < 0.2 < 0.3.
        # query A (cam 3): g0 removed (cam 2, same room) -> kept list [id 2, id 1]: first match at rank 2,
        #   AP = (1/2) / 1 = 1/2, INP = 1/2.
        # query B (cam 6): nothing removed -> [id 1, id 2, id 1]: matches at ranks 1 and 3,
        #   AP = (1/1 + 2/3) / 2 = 5/6, INP = 2/3.
        # cmc: rank 1 only B, rank 2 both -> [1/2, 1, 1]; mAP = (1/2 + 5/6) / 2 = 2/3; mINP = (1/2 + 2/3) / 2 = 7/12.
        dist = [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]
        r = evaluate_lists(dist, [1, 1], [1, 2, 1], [3, 6], [2, 1, 4])
        self.assertResult(r, [0.5, 1, 1], [0.5, 1, 1], 2 / 3, 7 / 12, 2, 0)
        # RegDB has no camera rule: A ranks like B -> cmc [1, 1, 1], mAP 5/6, mINP 2/3.
        r = evaluate_lists(dist, [1, 1], [1, 2, 1], [3, 6], [2, 1, 4], protocol="regdb")
        self.assertResult(r, [1, 1, 1], [1, 1, 1], 5 / 6, 2 / 3, 2, 0)

    def test_identity_deduplication(self):
        # query A: id 1, cam 6; gallery ranked by distance: ids [2, 2, 3, 1, 2, 1], cams all 1.
        #   standard list: first match at rank 4 -> cmc_standard [0, 0, 0, 1, 1].
        #   de-duplicated list [2, 3, 1] -> match at rank 3 -> cmc [0, 0, 1, 1, 1] (padded with its last value).
        #   AP = (1/4 + 2/6) / 2 = 7/24; INP = 2/6 = 1/3.
        r = evaluate_lists([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], [1], [2, 2, 3, 1, 2, 1], [6], [1] * 6, max_rank=5)
        self.assertResult(r, [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], 7 / 24, 1 / 3, 1, 0)
        # query B: id 1, cam 3; gallery ranked: ids [2, 3, 3, 1], cams [2, 1, 1, 1]. The same-room rule
        #   comes first: id 2 (cam 2) is removed -> kept [3, 3, 1]: standard rank 3, de-duplicated [3, 1]: rank 2.
        #   (Ignoring the removal would give [2, 3, 1]: rank 3.) AP = 1/3, INP = 1/3.
        r = evaluate_lists([[0.1, 0.2, 0.3, 0.4]], [1], [2, 3, 3, 1], [3], [2, 1, 1, 1], max_rank=4)
        self.assertResult(r, [0, 1, 1, 1], [0, 0, 1, 1], 1 / 3, 1 / 3, 1, 0)

    def test_ties_earlier_gallery_index_first(self):
        # all distances equal: the ranked list is the gallery order [id 2, id 1, id 2, id 1]:
        #   matches at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 1/2, INP = 2/4; de-duplicated [2, 1]: rank 2.
        r = evaluate_lists([[0.5] * 4], [1], [2, 1, 2, 1], [6], [1] * 4)
        self.assertResult(r, [0, 1, 1], [0, 1, 1], 0.5, 0.5, 1, 0)
        # the gallery reversed: [id 1, id 2, id 1, id 2]: ranks 1 and 3: AP = (1 + 2/3) / 2 = 5/6, INP = 2/3.
        r = evaluate_lists([[0.5] * 4], [1], [1, 2, 1, 2], [6], [1] * 4)
        self.assertResult(r, [1, 1, 1], [1, 1, 1], 5 / 6, 2 / 3, 1, 0)
        # -0.0 ties with 0.0 (earlier index first: id 2 then id 1); a negative distance ranks before a
        # less negative one: -2 (id 1) before -1 (id 2).
        r = evaluate_lists([[0.0, -0.0], [-1.0, -2.0]], [1, 1], [2, 1], [6, 6], [1, 1], max_rank=2)
        self.assertResult(r, [0.5, 1], [0.5, 1], (1 / 2 + 1) / 2, (1 / 2 + 1) / 2, 2, 0)

    def test_query_without_match_is_skipped(self):
        # gallery: g0 id 1 cam 2, g1 id 2 cam 1.
        # q0 id 1 cam 6: [id 1, id 2] -> rank 1, AP 1, INP 1.   q1 id 9: not in the gallery -> skipped.
        # q2 id 1 cam 3: g0 removed -> [id 2] -> no match left -> skipped.
        dist = [[0.1, 0.2]] * 3
        r = evaluate_lists(dist, [1, 9, 1], [1, 2], [6, 6, 3], [2, 1])
        self.assertResult(r, [1, 1, 1], [1, 1, 1], 1.0, 1.0, 1, 2)
        # RegDB keeps g0 for q2 -> q2 like q0; only q1 skipped.
        r = evaluate_lists(dist, [1, 9, 1], [1, 2], [6, 6, 3], [2, 1], protocol="regdb")
        self.assertResult(r, [1, 1, 1], [1, 1, 1], 1.0, 1.0, 2, 1)
        with self.assertRaisesRegex(UserError, "no query has a matching identity"):
            evaluate_lists(dist[:2], [9, 8], [1, 2], [6, 6], [2, 1])

    def test_regdb_standard_cmc(self):
        # RegDB does not de-duplicate: ranked ids [2, 2, 3, 1, 2, 1] -> cmc = cmc_standard = [0, 0, 0, 1, 1];
        # cameras 3 and 2 mean nothing here. AP = (1/4 + 2/6) / 2 = 7/24, INP = 1/3.
        r = evaluate_lists([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], [1], [2, 2, 3, 1, 2, 1], [3], [2] * 6, "regdb", max_rank=5)
        self.assertResult(r, [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], 7 / 24, 1 / 3, 1, 0)

    def test_minp(self):
        # gallery ids [1, 5, 1, 1, 6]; both queries are id 1.
        # q0 ranks g0..g4 -> ids [1, 5, 1, 1, 6]: matches at ranks 1, 3, 4:
        #   AP = (1/1 + 2/3 + 3/4) / 3 = 29/36, INP = 3 / 4 (3 matches, the hardest at rank 4).
        # q1 ranks g1, g2, g3, g4, g0 -> ids [5, 1, 1, 6, 1]: matches at ranks 2, 3, 5:
        #   AP = (1/2 + 2/3 + 3/5) / 3 = 53/90, INP = 3 / 5.
        # mAP = (29/36 + 53/90) / 2 = (145 + 106) / 360 = 251/360; mINP = (3/4 + 3/5) / 2 = 27/40.
        # cmc: rank 1 only q0, rank 2 both -> [1/2, 1, 1].
        dist = [[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.1, 0.2, 0.3, 0.4]]
        r = evaluate_lists(dist, [1, 1], [1, 5, 1, 1, 6], [1, 1], [2] * 5, "regdb")
        self.assertResult(r, [0.5, 1, 1], [0.5, 1, 1], 251 / 360, 27 / 40, 2, 0)

    def test_torch_inputs(self):
        dist, q, g, qc, gc = [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], [1, 1], [1, 2, 1], [3, 6], [2, 1, 4]
        a = evaluate_lists(dist, q, g, qc, gc)
        b = evaluation.evaluate(*(torch.tensor(x) for x in (dist, q, g, qc, gc)), max_rank=3)
        np.testing.assert_array_equal(a["cmc"], b["cmc"])
        self.assertEqual((a["mAP"], a["mINP"]), (b["mAP"], b["mINP"]))
        c = evaluation.evaluate(torch.tensor(dist, dtype=torch.bfloat16), q, g, qc, gc, max_rank=3)  # autocast output
        self.assertEqual((a["mAP"], a["mINP"]), (c["mAP"], c["mINP"]))

    def test_nan_distance_is_an_error(self):
        with self.assertRaisesRegex(UserError, "contains NaN"):
            evaluate_lists([[0.1, float("nan")]], [1], [1, 2], [6], [1, 1])


def loop_evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank):
    """Independent re-statement of the protocol, one query at a time."""
    cmcs, standard, aps, inps, skipped = [], [], [], [], 0
    for i in range(len(dist)):
        order = np.argsort(dist[i].astype(np.float32), kind="stable")
        ids = g_pids[order]
        if protocol == "sysu" and q_cams[i] == 3:
            ids = ids[g_cams[order] != 2]
        match = ids == q_pids[i]
        if not match.any():
            skipped += 1
            continue
        unique_ids = []
        for pid in ids:
            if pid not in unique_ids:
                unique_ids.append(pid)
        dedup = np.array(unique_ids) == q_pids[i]
        pad = lambda c: np.concatenate([c, np.full(max_rank, c[-1])])[:max_rank]
        standard.append(pad(np.minimum(np.cumsum(match), 1)))
        cmcs.append(pad(np.cumsum(dedup)) if protocol == "sysu" else standard[-1])
        positions = np.flatnonzero(match) + 1
        aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
        inps.append(len(positions) / positions[-1])
    return np.mean(cmcs, 0), np.mean(standard, 0), np.mean(aps), np.mean(inps), skipped


class TestEvalAgainstLoop(unittest.TestCase):
    def test_random_matrices(self):
        rng = np.random.default_rng(0)
        nq, ng = 50, 70
        q_pids, g_pids = rng.integers(0, 10, nq), rng.integers(0, 8, ng)   # ids 8, 9: no match
        q_cams, g_cams = rng.choice([3, 6], nq), rng.choice([1, 2, 4, 5], ng)
        matrices = {"real": rng.standard_normal((nq, ng)).astype(np.float32),
                    "tied": rng.integers(0, 4, (nq, ng)).astype(np.float64)}
        for (name, dist), protocol, chunk in [(m, p, c) for m in matrices.items() for p in ("sysu", "regdb")
                                              for c in (ng * 7, evaluation.CHUNK_ELEMENTS)]:
            with self.subTest(matrix=name, protocol=protocol, chunk=chunk):
                with mock.patch.object(evaluation, "CHUNK_ELEMENTS", chunk):  # 7 queries per chunk, or all
                    r = evaluation.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank=20)
                cmc, standard, mAP, mINP, skipped = loop_evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol, 20)
                np.testing.assert_allclose(r["cmc"], cmc, atol=1e-6)
                np.testing.assert_allclose(r["cmc_standard"], standard, atol=1e-6)
                self.assertAlmostEqual(r["mAP"], mAP, delta=1e-6)
                self.assertAlmostEqual(r["mINP"], mINP, delta=1e-6)
                self.assertEqual(r["num_skipped"], skipped)
                self.assertGreater(skipped, 0)


def fake_testset(rng, kind):
    """A TestSet-like object: 6 identities, infrared queries and a visible gallery, 2 trials."""
    pool = lambda n, cams: SimpleNamespace(labels=rng.integers(0, 6, n), cams=rng.choice(cams, n))
    pools = {"r": pool(30, [3, 6]), "v": pool(40, [1, 2, 4, 5])}
    trials = [(np.arange(30), rng.choice(40, 24, replace=False)) for _ in range(2)]
    return SimpleNamespace(pools=pools, protocols=[SimpleNamespace(name="x", query="r", gallery="v", kind=kind,
                                                                   trials=trials)])


class TestEvalRunProtocol(unittest.TestCase):
    def test_identity_features_are_perfect(self):
        # features = one-hot identity: every match is at distance 0, before every non-match (distance sqrt 2).
        testset = fake_testset(np.random.default_rng(1), "regdb")
        features = {k: torch.eye(6)[torch.as_tensor(p.labels)] for k, p in testset.pools.items()}
        res = evaluation.run_protocol(features, testset, torch.cdist, torch.device("cpu"))["x"]
        for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"):
            self.assertAlmostEqual(res[key], 100.0)
            self.assertAlmostEqual(res[f"{key}_std"], 0.0)

    def test_mean_and_std_over_trials(self):
        rng = np.random.default_rng(2)
        testset = fake_testset(rng, "sysu")
        features = {k: torch.randn(len(p.labels), 5, generator=torch.Generator().manual_seed(3))
                    for k, p in testset.pools.items()}
        res = evaluation.run_protocol(features, testset, torch.cdist, torch.device("cpu"))["x"]
        q, g = testset.pools["r"], testset.pools["v"]
        direct = [evaluation.evaluate(torch.cdist(features["r"][qi], features["v"][gi]), q.labels[qi], g.labels[gi],
                                      q.cams[qi], g.cams[gi], "sysu") for qi, gi in testset.protocols[0].trials]
        rank5 = [100 * d["cmc"][4] for d in direct]
        mAP = [100 * d["mAP"] for d in direct]
        self.assertAlmostEqual(res["rank5"], np.mean(rank5), places=9)
        self.assertAlmostEqual(res["mAP"], np.mean(mAP), places=9)
        self.assertAlmostEqual(res["mAP_std"], abs(mAP[0] - mAP[1]) / 2, places=9)   # population std of 2 values
        self.assertEqual([t["mINP"] for t in res["trials"]], [100 * d["mINP"] for d in direct])
        self.assertEqual(res["num_skipped"], sum(d["num_skipped"] for d in direct))


class TestEvalPicture(unittest.TestCase):
    def test_borders_and_order(self):
        # 1 query (id 1, cam 3), 4 gallery images of plain colours, distances 0.1 (id 1, cam 2), 0.2 (id 2),
        # 0.3 (id 1), 0.4 (id 3). The cam-2 image is skipped (same room): shown are g1 (red border), g2 (green).
        q_images = np.full((1, 8, 6, 3), 200, np.uint8)
        g_images = np.stack([np.full((8, 6, 3), 40 * (i + 1), np.uint8) for i in range(4)])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ranks.png")
            evaluation.ranked_list_picture(path, q_images, g_images, np.array([[0.1, 0.2, 0.3, 0.4]]), [1],
                                           [1, 2, 1, 3], top=2, q_cams=[3], g_cams=[2, 1, 1, 1])
            picture = np.asarray(Image.open(path).convert("RGB"))
        border, w = 4, 6 + 8                                      # cell width = image + 2 borders
        self.assertEqual(picture.shape[1], 3 * w + border)
        cell = lambda col: col * w + (border if col else 0)     # left edge of a cell
        self.assertEqual(tuple(picture[0, cell(1)]), (255, 0, 0))          # g1: wrong identity, red
        self.assertEqual(tuple(picture[0, cell(2)]), (0, 128, 0))          # g2: right identity, green
        self.assertEqual(tuple(picture[border, cell(1) + border]), (80,) * 3)    # g1's pixels
        self.assertEqual(tuple(picture[border, cell(2) + border]), (120,) * 3)   # g2's pixels
        self.assertEqual(tuple(picture[border, border]), (200,) * 3)            # the query


# ==== reid.py (TestCLI*, TestRecipes*, TestReliabilityCLI, TestOverwriteSafety) ====

class TestCLIPlumbing(unittest.TestCase):
    def test_warmup_multistep_factors(self):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = common.WarmupMultiStep(opt, milestones=(20, 50), gamma=0.1, warmup=10)
        # warm-up (e + 1) / 10, then 1, 0.1 from epoch 20, 0.01 from epoch 50
        for epoch, lr in [(0, 0.01), (4, 0.05), (9, 0.1), (10, 0.1), (19, 0.1), (20, 0.01), (49, 0.01),
                          (50, 0.001), (79, 0.001)]:
            sched.step_epoch(epoch)
            self.assertAlmostEqual(opt.param_groups[0]["lr"], lr, places=12)

    def test_settings_resolution_order(self):
        # paper defaults < synthetic recipe < --smoke < explicit flags
        parser = reid.common_parser()
        reid.add_settings_options(parser, agw)
        argv = ["--method", "agw", "--smoke", "--lr", "0.5", "--milestones", "3", "4", "--non-local", "false"]
        args = parser.parse_args(argv)
        s, _ = reid.resolve_settings(agw, args, reid.flags_given(argv))
        self.assertEqual((s.lr, s.milestones, s.non_local), (0.5, (3, 4), False))
        self.assertEqual((s.height, s.arch, s.pretrained), (agw.SMOKE["height"], "resnet18", "none"))
        s, _ = reid.resolve_settings(agw, parser.parse_args(["--method", "agw", "--dataset", "sysu"]), {"method"})
        self.assertEqual(s, agw.Settings())  # a real benchmark gets the paper's recipe untouched

    def test_help_lists_the_methods_settings(self):
        # --help with --method shows that method's settings, the paper's default and the synthetic recipe's
        text = io.StringIO()
        with contextlib.redirect_stdout(text), self.assertRaises(SystemExit):
            reid.main(["--method", "rfm", "--help"])
        self.assertIn("--ltg true|false", text.getvalue())
        self.assertIn(f"paper {rfm.Settings().epochs}", text.getvalue())
        self.assertIn(f"synthetic {rfm.SYNTHETIC['epochs']}", text.getvalue())

    def test_every_method_parser_builds(self):
        # no Settings field may collide with a shared option (argparse refuses the duplicate at --help time),
        # and every RELEASE / SYNTHETIC / SMOKE key names a field
        for name in METHODS:
            with self.subTest(method=name):
                method = importlib.import_module(f"methods.{name}")
                reid.add_settings_options(reid.common_parser(), method)
                fields = {f.name for f in dataclasses.fields(method.Settings)}
                for layer in ("RELEASE", "RELEASE_REGDB", "SYNTHETIC", "SMOKE"):
                    self.assertLessEqual(set(getattr(method, layer, None) or {}), fields, layer)
                for fn in ("build", "objective", "train", "extract"):   # methods/__init__.py's interface
                    self.assertTrue(callable(getattr(method, fn, None)), fn)
                self.assertEqual(list(inspect.signature(method.objective).parameters)[:3], ["model", "batch", "settings"])


class TestRecipes(HandMadeTrees):
    """--recipe, --split val, --seeds, --report (issue: recipes a researcher can trust)."""

    def fake_method(self):
        @dataclasses.dataclass
        class Settings:
            height: int = 288
            width: int = 144
            lr: float = 0.1
            t_min: float = 1e-6
            cc: str = "euclidean"
            epochs: int = 80
        return SimpleNamespace(
            __name__="methods.fake", Settings=Settings, CHOICES={"cc": ("euclidean", "squared-unit")},
            RELEASE=dict(lr=0.01, t_min=1e-2, cc="squared-unit", epochs=101), RELEASE_REGDB=dict(epochs=61),
            SYNTHETIC=dict(height=128, width=64, epochs=10), SMOKE=dict(height=64, epochs=1))

    def resolve(self, method, *argv):
        parser = reid.common_parser()
        reid.add_settings_options(parser, method)
        argv = ["--method", "agw", *argv]
        return reid.resolve_settings(method, parser.parse_args(argv), reid.flags_given(argv))

    def test_precedence_one_layer_at_a_time(self):
        m = self.fake_method()
        s, src = self.resolve(m, "--dataset", "sysu")                                  # paper
        self.assertEqual((s.lr, s.t_min, s.cc, s.epochs, s.height), (0.1, 1e-6, "euclidean", 80, 288))
        self.assertEqual(set(src.values()), {"paper"})
        s, src = self.resolve(m, "--dataset", "sysu", "--recipe", "release")           # release over paper
        self.assertEqual((s.lr, s.t_min, s.cc, s.epochs, s.height), (0.01, 1e-2, "squared-unit", 101, 288))
        self.assertEqual((src["lr"], src["height"]), ("release", "paper"))
        s, src = self.resolve(m, "--dataset", "regdb", "--recipe", "release")          # the per-dataset release
        self.assertEqual((s.epochs, s.lr, src["epochs"]), (61, 0.01, "release"))
        s, src = self.resolve(m, "--recipe", "release")                                # synthetic over release
        self.assertEqual((s.epochs, s.lr, s.height, src["epochs"], src["lr"]), (10, 0.01, 128, "synthetic", "release"))
        s, src = self.resolve(m, "--recipe", "release", "--smoke")                     # smoke over synthetic
        self.assertEqual((s.epochs, s.height, s.width, src["height"], src["width"]), (1, 64, 64, "smoke", "synthetic"))
        s, src = self.resolve(m, "--recipe", "release", "--smoke", "--epochs", "3", "--cc", "euclidean")  # flags
        self.assertEqual((s.epochs, s.cc, src["epochs"], src["cc"]), (3, "euclidean", "flag", "flag"))

    def test_choices_and_no_release(self):
        m = self.fake_method()
        with self.assertRaises(SystemExit):
            self.resolve(m, "--cc", "manhattan")
        m.RELEASE = None
        with self.assertRaisesRegex(UserError, "no code was published for fake"):
            self.resolve(m, "--recipe", "release")
        self.assertEqual(reid.RECIPES, ("paper", "release"))

    def test_val_split_holds_no_test_id_and_trains_on_no_val_id(self):
        val_ids, test_ids, train_ids = set(SYSU_VAL), set(SYSU_TEST), set(SYSU_TRAIN)
        trainset, valset = self.load_sysu(split="val")
        _, testset = self.load_sysu()
        self.assertEqual(trainset.num_classes, len(train_ids))
        trained_files = set(trainset.v.files) | set(trainset.r.files)
        self.assertFalse(any(f"{pid:04d}" in Path(f).parts for f in trained_files for pid in val_ids | test_ids))
        pool_ids = set(valset.pools["v"].labels) | set(valset.pools["r"].labels)
        self.assertEqual(pool_ids, val_ids)
        self.assertEqual(set(testset.pools["v"].labels) | set(testset.pools["r"].labels), test_ids)
        # RegDB: round(0.2 n) held-out training identities, disjoint from what is trained, test lists unused
        train, val = data.load_regdb(self.regdb, 1, TREE_H, TREE_W, self.cache, log=lambda m: None, split="val")
        self.assertEqual(train.num_classes + len(set(val.pools["v"].labels)), 3)
        self.assertEqual(len(set(val.pools["v"].labels)), 1)  # round(0.2 * 3)
        self.assertFalse(set(train.v.files) & set(val.pools["v"].files))
        self.assertTrue(set(val.pools["v"].labels) <= {40, 3, 17})
        self.assertEqual(data.regdb_val_labels(range(206), 1), data.regdb_val_labels(list(reversed(range(206))), 1))
        self.assertEqual(len(data.regdb_val_labels(range(206), 1)), 41)

    def test_seed_aggregation_by_hand(self):
        per_seed = [{"all-single": {k: v for k in reid.KEYS}} for v in (10.0, 20.0, 36.0)]
        agg = reid.aggregate_seeds(per_seed)["all-single"]
        # mean (10 + 20 + 36) / 3 = 22; sample variance ((12^2 + 2^2 + 14^2) / 2) = 172
        self.assertAlmostEqual(agg["rank1"], 22.0)
        self.assertAlmostEqual(agg["rank1_std"], 172 ** 0.5)
        self.assertEqual(agg["per_seed"]["mAP"], [10.0, 20.0, 36.0])
        self.assertEqual(reid.mean_std([5.0]), (5.0, 0.0))

    def test_within_modality_fit_by_hand(self):
        # visible, cameras 1, 2, 1, 2: each image's nearest image of the other camera is of its class -> 100 %
        v = torch.tensor([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.8, 0.6]])
        self.assertEqual(reid.cross_camera_rank1(v, np.array([0, 0, 1, 1]), np.array([1, 2, 1, 2]), np.arange(4)),
                         100.0)
        # infrared, cameras 3, 3, 6 (distances q0-q1 0.632, q0-q2 0.283, q1-q2 0.358): q0's identity has no image
        # in camera 6 (skipped); q1 finds q2 (label 1), q2 finds q0 (label 0) -> 50 %
        r = torch.tensor([[0, 0, 1], [0, 0.6, 0.8], [0, 0.28, 0.96]])
        y, cams = np.array([0, 1, 1]), np.array([3, 3, 6])
        self.assertEqual(reid.cross_camera_rank1(r, y, cams, np.arange(3)), 50.0)
        self.assertEqual(reid.cross_camera_rank1(r, y, cams, np.array([1])), 100.0)   # a subset of queries
        self.assertIsNone(reid.cross_camera_rank1(r, y, np.array([3, 3, 3]), np.arange(3)))   # one camera
        # a same-camera near-duplicate does not count: q0's nearest is q1 (its class, camera 1), but among
        # camera 2 it is q3 (class 1, distance 0.894 against 1.414 to q2)
        near = torch.tensor([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0.6, 0.8, 0]])
        self.assertEqual(reid.cross_camera_rank1(near, np.array([0, 0, 0, 1]), np.array([1, 1, 2, 2]),
                                                 np.array([0])), 0.0)

    def test_centroid_cosines_by_hand(self):
        v = torch.tensor([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.8, 0.6]])
        r = torch.tensor([[0, 0, 1], [0, 0.6, 0.8], [0, 0.28, 0.96]])
        # centroids: v0 = (1.8, 0.6, 0) / sqrt(3.6), v1 = (0, 1.8, 0.6) / sqrt(3.6), r0 = (0, 0, 1),
        # r1 = (0, 0.88, 1.76) / sqrt(3.872); same: (0 + (1.584 + 1.056) / sqrt(3.6 * 3.872)) / 2,
        # other: (v0 . r1 + v1 . r0) / 2 = (0.528 / sqrt(3.6 * 3.872) + 0.6 / sqrt(3.6)) / 2
        same, other = reid.centroid_cosines(v, np.array([0, 0, 1, 1]), r, np.array([0, 1, 1]))
        self.assertAlmostEqual(same, 2.64 / (3.6 * 3.872) ** 0.5 / 2, places=5)
        self.assertAlmostEqual(other, (0.528 / (3.6 * 3.872) ** 0.5 + 0.6 / 3.6 ** 0.5) / 2, places=5)
        # an identity seen in one modality only is left out; scaled features give the same cosines
        same2, other2 = reid.centroid_cosines(torch.cat([v, v[:1]]) * 3, np.array([0, 0, 1, 1, 7]), r,
                                              np.array([0, 1, 1]))
        self.assertAlmostEqual(same2, same, places=5)
        self.assertAlmostEqual(other2, other, places=5)

    def test_report_of_two_results_files(self):
        a = {"method": "agw", "recipe": "paper", "split": "val", "seeds": [0, 1, 2], "seed": None,
             "command": "python reid.py --method agw --seeds 0 1 2",
             "results": {"all-single": {"rank1": 16.04, "rank1_std": 1.26, "mAP": 21.9, "mAP_std": 0.75,
                                        "mINP": 14.0, "mINP_std": 0.5}},
             "fit": {"rank1": 27.44, "rank1_std": 2.0, "mAP": 30.0, "mAP_std": 1.04},
             "time": {"train_s": 1500.0, "test_s": 300.0}}
        b = {"method": "rfm", "recipe": "release", "split": "test", "seed": 0, "command": "python reid.py --method rfm",
             "results": {"indoor-single": {"rank1": 9.0, "rank1_std": 0.0, "mAP": 8.0, "mAP_std": 0.0,
                                           "mINP": 7.0, "mINP_std": 0.0}}}
        with tempfile.TemporaryDirectory() as tmp:
            for name, r in (("a", a), ("b", b)):
                (Path(tmp) / name).mkdir()
                (Path(tmp) / name / "results.json").write_text(json.dumps(r))
            with contextlib.redirect_stdout(io.StringIO()):
                text = reid.main(["--report", str(Path(tmp) / "a"), str(Path(tmp) / "b" / "results.json")])
        lines = text.splitlines()
        self.assertEqual(lines[0], "| method | recipe | split | seeds | all-single R1 / mAP / mINP | indoor-single R1 / "
                                   "mAP / mINP | training fit R1 / mAP | time per seed (min) | command |")
        self.assertEqual(lines[2], "| agw | paper | val | 3 | 16.0 ± 1.3 / 21.9 ± 0.8 / 14.0 ± 0.5 | – | 27.4 ± 2.0 / "
                                   "30.0 ± 1.0 | 10.0 | `python reid.py --method agw --seeds 0 1 2` |")
        self.assertEqual(lines[3], "| rfm | release | test | 1 | – | 9.0 ± 0.0 / 8.0 ± 0.0 / 7.0 ± 0.0 | – | – | "
                                   "`python reid.py --method rfm` |")

    def test_bad_input_writes_nothing(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            no_val = tmp / "no-val"
            shutil.copytree(self.sysu, no_val)
            (no_val / "exp" / "val_id.txt").unlink()
            empty_val = tmp / "empty-val"
            shutil.copytree(self.sysu, empty_val)
            (empty_val / "exp" / "val_id.txt").write_text("\n")
            val_test = tmp / "val-test"
            shutil.copytree(self.sysu, val_test)
            (val_test / "exp" / "val_id.txt").write_text("7,12\n")
            val_train = tmp / "val-train"
            shutil.copytree(self.sysu, val_train)
            (val_train / "exp" / "val_id.txt").write_text("7,1\n")
            (tmp / "nothing").mkdir()
            smoke = ["--method", "agw", "--smoke", "--cache-dir", str(tmp / "cache")]
            sysu = smoke + ["--dataset", "sysu", "--split", "val", "--data-root"]
            cases = [
                (["--method", "nfs", "--recipe", "release", "--smoke"], "no code was published"),
                (["--method", "agw", "--recipe", "author"], "invalid choice: 'author'"),
                (sysu + [str(no_val)], "val_id.txt is missing"),
                (sysu + [str(empty_val)], "val_id.txt is empty"),
                (sysu + [str(val_test)], "val_id.txt and exp/test_id.txt"),
                (sysu + [str(val_train)], "both exp/train_id.txt and exp/val_id.txt"),
                (smoke + ["--seeds", "0", "1", "0"], "distinct seeds"),
                (smoke + ["--seeds", "-1"], "distinct seeds"),
                (["--report", str(tmp / "nothing")], "no results.json"),
            ]
            for argv, word in cases:
                with self.subTest(argv=argv):
                    out = tmp / "out"
                    p = run_reid(*argv, "--out", str(out)) if "--report" not in argv else run_reid(*argv)
                    self.assertEqual(p.returncode, 2, p.stderr[-2000:])
                    self.assertNotIn("Traceback", p.stderr)
                    self.assertIn(word, p.stderr)
                    self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                    self.assertFalse(out.exists(), "a refused run left its output directory behind")


class TestReliabilityCLI(HandMadeTrees):
    """One row per bad input or fault of the reliability review that reid.py itself must catch: the exit status,
    a word the one-line message must hold, and the files that must still exist afterwards."""

    def test_table(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            smoke = ["--method", "agw", "--smoke", "--cache-dir", TEST_CACHE]
            settings = dataclasses.asdict(agw.Settings(**agw.SMOKE))
            ckpt = lambda name, **kw: torch.save({"method": "agw", "settings": settings, "model": {},  # noqa: E731
                                                  "num_classes": 3, **kw}, tmp / name) or str(tmp / name)
            run = tmp / "run"   # a started run to resume: its args.json and marker
            run.mkdir()
            (run / ".reid-run").write_text("")
            (run / "args.json").write_text(json.dumps({"argv": smoke + ["--out", str(run)]}))
            for name, text in (("corrupt", '{"argv": ["--meth'), ("no-argv", '{"method": "agw"}')):
                (tmp / name).mkdir()
                (tmp / name / "args.json").write_text(text)
            (tmp / "a-file").write_text("not a directory")
            (tmp / "text.pth").write_text("hello")
            torch.save([1, 2, 3], tmp / "list.pth")
            parent = tmp / "parent"  # D02c: the dataset at fix/SYSU-MM01, a generated world sorted before it
            shutil.copytree(self.sysu, parent / "fix" / "SYSU-MM01")
            (parent / "cache" / "synthetic-sysu-0" / "exp").mkdir(parents=True)
            (parent / "cache" / "synthetic-sysu-0" / "synthetic.json").write_text("{}")
            rows = [  # (case, argv, exit status, a word of the message)
                ("D15f", smoke + ["--data-root", self.sysu], 2, "pass --dataset sysu"),
                ("D02c", smoke + ["--dataset", "sysu", "--data-root", str(parent)], 2,
                 f"pass {parent / 'fix' / 'SYSU-MM01'} as the SYSU-MM01 root"),
                ("R04", smoke + ["--eval-only", "--checkpoint", ckpt("sysu.pt", dataset="sysu")], 2,
                 "was trained on sysu"),
                ("R10", ["--resume", str(run), "--lr", "0.5", "--epochs", "8"], 2, "--epochs, --lr would change"),
                ("R01c", ["--resume", str(run), "--data-root", self.sysu], 2, "--data-root would change"),
                ("R02d", ["--resume", str(run), "--method", "nfs"], 2, "--method would change"),
                ("R05d", ["--resume", str(tmp / "corrupt")], 2, "damaged or incomplete"),
                ("R05e", ["--resume", str(tmp / "no-argv")], 2, "damaged or incomplete"),
                ("F02", smoke + ["--epochs", "-1"], 2, "--epochs -1: must be >= 1"),
                ("F02b", smoke + ["--epochs", "0"], 2, "--epochs 0: must be >= 1"),
                ("F12e", ["--method", "cmnas", "--smoke", "--epochs", "0", "--search-epochs", "0"], 2, "--epochs 0"),
                ("F12d", ["--method", "nfs", "--smoke", "--cache-dir", TEST_CACHE, "--search-epochs", "0"], 2,
                 "--search-epochs 0: must be >= 1"),
                ("F10i", smoke + ["--erasing", "2"], 2, "probability"),
                ("D14f", smoke + ["--trial", "5"], 2, "only for --dataset regdb"),
                ("D14g", smoke + ["--dataset", "sysu", "--data-root", self.sysu, "--trial", "0"], 2,
                 "only for --dataset regdb"),
                ("R08d", smoke + ["--checkpoint", ckpt("plain.pt")], 2, "only read with --eval-only"),
                ("F04", smoke + ["--height", "7"], 2, "at least 16"),
                ("F04b", smoke + ["--height", "0"], 2, "--height 0: must be >= 1"),
                ("F04c", smoke + ["--width=-5"], 2, "--width -5: must be >= 1"),
                ("F05", smoke + ["--workers", "-1"], 2, "--workers -1: must be >= 0"),
                ("F10", smoke + ["--log-every", "0"], 2, "--log-every 0: must be >= 1"),
                ("F10f", smoke + ["--seed=-1"], 2, "--seed -1: must be >= 0"),
                ("F10e", smoke + ["--lr=-1"], 2, "--lr -1.0: must be > 0"),
                ("F03c", smoke + ["--K", "0"], 2, "--K 0: must be >= 1"),
                ("F03e", smoke + ["--K", "500"], 2, "lower --K to at most"),
                ("F08b", smoke + ["--pretrained", str(tmp / "text.pth")], 2, "cannot be read"),
                ("F08d", smoke + ["--pretrained", str(tmp / "list.pth")], 2, "holds a list"),
                ("R09", ["--eval-only", "--checkpoint", ckpt("common.pt", method="common") and
                         str(torch.save({"method": "common", "settings": {}, "model": {}, "num_classes": 1},
                                        tmp / "common.pt") or tmp / "common.pt")], 2, "none of agw"),
                *[(case, ["--eval-only", "--checkpoint", str(torch.save(
                    {"method": name, "settings": {}, "model": {}, "num_classes": 1}, tmp / f"{case}.pt")
                    or tmp / f"{case}.pt")], 2, f"names method {name!r}, which is none of")
                  for case, name in (("R09b", "os"), ("R09c", "..evil"))],
                ("R09e", ["--eval-only", "--checkpoint", str(torch.save(
                    {"method": "agw", "settings": {**settings, "bogus": 1}, "model": {}, "num_classes": 3},
                    tmp / "bogus.pt") or tmp / "bogus.pt")], 2, "['bogus']"),
                ("O01", smoke + ["--out", str(tmp / "a-file")], 2, "is a file"),
                ("O01b", smoke + ["--out", str(tmp / "a-file"), "--overwrite"], 2, "is a file"),
                ("O01c", smoke + ["--out", str(tmp / "a-file" / "sub")], 2, "cannot write there"),
                ("F11", ["--method", "agw", "--smoke", "--cache-dir", str(tmp / "a-file")], 2, "is a file"),
                ("F11b", smoke + ["--dataset", "sysu", "--data-root", self.sysu, "--cache-dir", str(tmp / "a-file")], 2,
                 "cache directory"),
                ("F10d", smoke + ["--lr", "1e6", "--backbone-lr", "1e6"], 2, "diverged"),
                ("O02", smoke + ["--out", str(tmp / "read-only" / "run")], 2, "cannot write there (Read-only file"),
                ("O02b", smoke + ["--out", str(tmp / "read-only")], 2, "cannot write there (Read-only file"),
            ]
            read_only = tmp / "read-only"  # O02, O02b: a mocked read-only file system below this directory
            read_only.mkdir()

            real_mkdir = Path.mkdir

            def read_only_fs(real):
                def write(path, *a, **k):  # mkdir of a directory that exists succeeds (exist_ok), as on Linux
                    if read_only in (path, *path.parents) and not (real is real_mkdir and path.is_dir()):
                        raise OSError(errno.EROFS, "Read-only file system", str(path))
                    return real(path, *a, **k)
                return write
            for case, argv, status, word in rows:
                with self.subTest(case=case), mock.patch.object(Path, "mkdir", read_only_fs(Path.mkdir)), \
                        mock.patch.object(Path, "write_text", read_only_fs(Path.write_text)):
                    if "--out" not in argv and "--resume" not in argv:
                        argv = argv + ["--out", str(tmp / "out" / case)]
                    got, message = reid_outcome(argv)
                    self.assertEqual(got, status, message)
                    self.assertIn(word, message)
                    self.assertEqual(len(message.strip().splitlines()), 1, message)
                    if case == "F10d":  # diverged after epoch 1's checkpoint: no model.pt of NaN weights
                        self.assertFalse((tmp / "out" / case / "model.pt").exists())
                    else:
                        self.assertFalse((tmp / "out" / case).exists(), "a refused run left files behind")
                    self.assertEqual((tmp / "a-file").read_text(), "not a directory")
                    self.assertTrue((run / "args.json").is_file())

    def test_notes_and_disk_full(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "amp"
            p = run_reid("--method", "agw", "--smoke", "--cache-dir", TEST_CACHE, "--amp", "--out", str(out))
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            self.assertIn("--amp has no effect on the CPU", p.stdout)              # F07
            # a finished run whose train.pt is gone: --resume says it starts over (R05c)
            (out / "train.pt").unlink()
            (out / "model.pt").unlink()
            p = run_reid("--resume", str(out), "--workers", "0")
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            self.assertIn("holds no checkpoint yet; training starts at epoch 1", p.stdout)

            def small_disk():  # files above 1 MB cannot be written: the per-epoch train.pt fails (O05, O07)
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

            out = Path(tmp) / "full"
            p = run_reid("--method", "agw", "--smoke", "--cache-dir", TEST_CACHE, "--out", str(out),
                         preexec_fn=small_disk)
            self.assertEqual(p.returncode, 2, p.stderr[-2000:])
            self.assertIn("cannot write", p.stderr)
            self.assertIn("free disk space", p.stderr)
            self.assertNotIn("Traceback", p.stderr)
            self.assertFalse(out.exists() and list(out.rglob("*.tmp")), "a temporary file was left behind")

    def test_full_disk_at_each_output(self):
        """O04 features.pt, the ranked-list pictures, O03 results.json and log.txt: a full disk at any of them is
        one line naming the file (or the run directory) and 'free disk space'; no temporary or half-written file
        stays behind. --eval-only writes no checkpoint, so a file-size limit between the sizes of features.pt and
        of a picture stops at the picture; results.json and log.txt get a mocked write."""
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            run = tmp / "run"
            self.assertEqual(run_reid("--method", "agw", "--smoke", "--cache-dir", TEST_CACHE, "--out",
                                      str(run)).returncode, 0)
            feats, picture = (run / "features.pt").stat().st_size, (run / "ranked-all-single.png").stat().st_size
            self.assertLess(feats, picture)  # the limits below rely on it
            evaluate = ["--eval-only", "--checkpoint", str(run / "model.pt"), "--smoke", "--cache-dir", TEST_CACHE]
            for case, limit, word in (("O04", feats // 2, "features.pt"), ("picture", (feats + picture) // 2,
                                                                           "ranked-all-single.png")):
                with self.subTest(case=case):
                    def small_disk():
                        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
                    out = tmp / case
                    p = run_reid(*evaluate, "--out", str(out), preexec_fn=small_disk)
                    self.assertEqual(p.returncode, 2, p.stderr[-2000:])
                    self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                    self.assertIn(f"cannot write {out / word}", p.stderr)
                    self.assertIn("free disk space", p.stderr)
                    self.assertFalse(out.exists(), "a failed --eval-only run left files behind")
            real_write_text, real_open = Path.write_text, open

            def full_at_results(path, text, *a, **k):  # half the file reaches the disk, then ENOSPC
                if path.name.startswith("results.json"):
                    real_write_text(path, text[:len(text) // 2], *a, **k)
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_write_text(path, text, *a, **k)

            class FullLog:
                def __init__(self, f):
                    self.f = f

                def write(self, line):
                    raise OSError(errno.ENOSPC, "No space left on device")

                def __getattr__(self, name):
                    return getattr(self.f, name)

                def __enter__(self):    # reid.py opens log.txt with `with`
                    return self

                def __exit__(self, *exc):
                    self.f.close()

            def full_at_log(path, *a, **k):
                f = real_open(path, *a, **k)
                return FullLog(f) if str(path).endswith("log.txt") else f

            for case, patch, word in (("O03", mock.patch.object(Path, "write_text", full_at_results),
                                       "results.json"),
                                      ("log", mock.patch.object(reid, "open", full_at_log, create=True), "")):
                with self.subTest(case=case), patch:
                    out = tmp / case
                    status, message = reid_outcome([*evaluate, "--out", str(out)])
                    self.assertEqual(status, 2, message)
                    self.assertIn(f"cannot write {out / word}" if word else f"cannot write into {out}", message)
                    self.assertIn("free disk space", message)
                    self.assertFalse(out.exists(), "a failed --eval-only run left files behind")

    def test_kill_9_then_resume(self):
        """SIGKILL in the middle of epoch 2 of 3, then --resume: results and weights equal an uninterrupted run's."""
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["--method", "agw", "--smoke", "--epochs", "3", "--log-every", "1", "--cache-dir", TEST_CACHE]
            whole, killed = Path(tmp) / "whole", Path(tmp) / "killed"
            self.assertEqual(run_reid(*argv, "--out", str(whole)).returncode, 0)
            p = subprocess.Popen([sys.executable, str(REID), *argv, "--out", str(killed)],  # streamed, to kill it
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(HERE))
            for line in p.stdout:
                if line.startswith("[train] ep 2/3 it 1/"):
                    p.send_signal(signal.SIGKILL)
                    break
            p.stdout.close()
            self.assertEqual(p.wait(timeout=60), -signal.SIGKILL)
            self.assertFalse((killed / "results.json").exists())
            p = run_reid("--resume", str(killed))
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            self.assertIn("resumed from", p.stdout)
            a, b = (json.loads((d / "results.json").read_text()) for d in (whole, killed))
            self.assertEqual((a["results"], a["fit"]), (b["results"], b["fit"]))
            wa, wb = (torch.load(d / "model.pt", weights_only=True)["model"] for d in (whole, killed))
            for k in wa:
                self.assertTrue(torch.equal(wa[k], wb[k]), k)


class TestRecipesEndToEnd(unittest.TestCase):
    def test_eval_every_leaves_the_run_unchanged(self):
        # --eval-every (the best-epoch minus final-epoch gap, on --split val) draws no random numbers and
        # leaves the model in training mode: the final numbers equal those of a run without it
        with tempfile.TemporaryDirectory() as tmp:
            flags = ("--split", "val", "--epochs", "2")
            plain = reid_smoke("agw", Path(tmp) / "plain", *flags)
            curve = reid_smoke("agw", Path(tmp) / "curve", *flags, "--eval-every", "1")
            reid.main(["--resume", str(Path(tmp) / "curve")])     # a finished run resumed: the curve is on disk
            resumed = json.loads((Path(tmp) / "curve" / "results.json").read_text())
            seeds = reid_smoke("agw", Path(tmp) / "seeds", *flags, "--eval-every", "1", "--seeds", "0", "1")
        self.assertEqual((resumed["curve"], resumed["best_minus_final"]), (curve["curve"], curve["best_minus_final"]))
        self.assertEqual(resumed["time"]["train_s"], curve["time"]["train_s"])     # training time kept, not reset
        per_seed = seeds["best_minus_final"]["all-single"]["per_seed"]["rank1"]
        self.assertEqual(per_seed[0], curve["best_minus_final"]["all-single"]["rank1"])   # seed 0 = the run above
        self.assertAlmostEqual(seeds["best_minus_final"]["all-single"]["rank1"], sum(per_seed) / 2)
        self.assertEqual(plain["results"], curve["results"])
        self.assertEqual([c["epoch"] for c in curve["curve"]], [1, 2])
        self.assertEqual(curve["curve"][-1]["all-single"]["rank1"], curve["results"]["all-single"]["rank1"])
        gap = max(c["all-single"]["mAP"] for c in curve["curve"]) - curve["results"]["all-single"]["mAP"]
        self.assertAlmostEqual(curve["best_minus_final"]["all-single"]["mAP"], gap)
        self.assertEqual(reid_outcome(["--method", "agw", "--smoke", "--eval-every", "2"])[0], 2)  # test split


    def test_seeds_and_val_write_complete_results(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "seeds"
            smoke = ["--method", "agw", "--smoke", "--cache-dir", TEST_CACHE]
            p = run_reid(*smoke, "--seeds", "0", "1", "--out", str(out))
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            top = json.loads((out / "results.json").read_text())
            per = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
            self.assertEqual(top["seeds"], [0, 1])
            for name, r in top["results"].items():
                values = [q["results"][name]["rank1"] for q in per]
                self.assertEqual(r["per_seed"]["rank1"], values)
                self.assertAlmostEqual(r["rank1"], sum(values) / 2)
                self.assertAlmostEqual(r["rank1_std"], abs(values[0] - values[1]) / 2 ** 0.5)
            self.assertIn("mean ± std over 2 seeds", p.stdout)
            for key in ("fit", "time", "machine", "setting_sources", "command"):
                self.assertIn(key, top)
            self.assertEqual(top["command"], "python reid.py --method agw --smoke --seeds 0 1")
            args = json.loads((out / "args.json").read_text())
            self.assertEqual(args["setting_sources"]["height"], "smoke")
            self.assertEqual(args["setting_sources"]["momentum"], "paper")
            out = Path(tmp) / "val"
            p = run_reid(*smoke, "--split", "val", "--out", str(out))
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            r = json.loads((out / "results.json").read_text())
            self.assertEqual(r["split"], "val")
            self.assertIn("validation identities", p.stdout)
            self.assertEqual(set(r["results"]), {"all-single", "all-multi", "indoor-single", "indoor-multi"})
            self.assertGreater(r["fit"]["rank1"], 0)


class TestCLIEndToEnd(unittest.TestCase):
    def test_agw_smoke_on_sysu_and_regdb_layouts(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = reid_smoke("agw", Path(tmp) / "syn")
            syn = results
            names = {"all-single", "all-multi", "indoor-single", "indoor-multi"}
            self.assertEqual(set(results["results"]), names)
            for r in results["results"].values():
                for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"):
                    self.assertTrue(0 <= r[key] <= 100 and key + "_std" in r)
                self.assertEqual(len(r["trials"]), 10)
            for name in ("model.pt", "features.pt", "args.json", "ranked-all-single.png"):
                self.assertTrue((Path(tmp) / "syn" / name).is_file(), name)
            sysu = smoke_world("sysu")
            results = reid_smoke("agw", Path(tmp) / "sysu", "--dataset", "sysu", "--data-root", str(sysu))
            self.assertEqual(set(results["results"]), names)
            regdb = smoke_world("regdb")
            results = reid_smoke("agw", Path(tmp) / "regdb", "--dataset", "regdb", "--data-root", str(regdb),
                                 "--trial", "3")
            self.assertEqual(set(results["results"]), {"visible-to-infrared", "infrared-to-visible"})
            self.assertEqual(results["trial"], "3")
            # --eval-only on the saved model reproduces the numbers without training
            again = reid_smoke("agw", Path(tmp) / "again", "--dataset", "regdb", "--data-root", str(regdb),
                               "--trial", "3", "--eval-only", "--checkpoint", str(Path(tmp) / "regdb" / "model.pt"))
            self.assertEqual(again["results"]["visible-to-infrared"]["rank1"],
                             results["results"]["visible-to-infrared"]["rank1"])
            self.assertIsNone(again["fit"])      # a RegDB checkpoint does not record its trial: no training fit
            # on the training set it was trained on, --eval-only measures the saved model's training fit again
            again = reid_smoke("agw", Path(tmp) / "again-syn", "--eval-only", "--checkpoint",
                               str(Path(tmp) / "syn" / "model.pt"))
            for key in reid.FIT_KEYS:
                self.assertAlmostEqual(again["fit"][key], syn["fit"][key], places=4, msg=key)

    def test_resume_gives_the_same_weights(self):
        # A run killed after epoch 1 of 2 and resumed must end with the weights of an uninterrupted run.
        s = agw.Settings(**{**agw.SMOKE, "epochs": 2})
        root = smoke_world("sysu")
        trainset, _ = data.load_sysu(root, s.height, s.width, TEST_CACHE, log=lambda s: None,
                                     expect_published=False)

        class Killed(Exception):
            pass

        def killer(line):
            if "epoch 1/2 done" in line:
                raise Killed

        with tempfile.TemporaryDirectory() as tmp:
            reid.seed_everything(0)
            full = agw.train(s, trainset, common.Run(Path(tmp) / "a", "cpu", max_its=3, say=quiet)).state_dict()
            reid.seed_everything(0)
            with self.assertRaises(Killed):
                agw.train(s, trainset, common.Run(Path(tmp) / "b", "cpu", max_its=3, say=killer))
            reid.seed_everything(0)
            resumed = agw.train(s, trainset, common.Run(Path(tmp) / "b", "cpu", max_its=3, say=quiet)).state_dict()
            for k in full:
                self.assertTrue(torch.equal(full[k], resumed[k]), k)

    def test_diverged_loss_stops_training(self):
        class OneBatch:  # the two things Run.batches asks of a loader
            def __len__(self):
                return 1

            def epoch(self, epoch):
                return iter([{"x_v": torch.zeros(2, 3, 4, 4)}])

        lines = []
        with tempfile.TemporaryDirectory() as tmp:
            run = common.Run(tmp, "cpu", say=lines.append)
            for it, _ in run.batches(OneBatch(), 0):
                run.log(0, it, {"L_id": torch.tensor(1.5)}, lr=0.1)
                with self.assertRaisesRegex(common.UserError, r"L_tri is not finite.*--lr, now 1\.00e-01"):
                    run.log(0, it, {"L_id": torch.tensor(1.5), "L_tri": torch.tensor(float("nan"))}, lr=0.1)
        self.assertEqual(len(lines), 1)
        self.assertIn("L_id 1.5000", lines[0])

    def test_bad_input_is_one_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            regdb_like = Path(tmp) / "regdb"
            (regdb_like / "idx").mkdir(parents=True)
            (regdb_like / "Thermal").mkdir()
            busy = Path(tmp) / "busy"
            busy.mkdir()
            (busy / "args.json").write_text("{}")
            (busy / ".reid-run").write_text("")
            junk = Path(tmp) / "junk.pt"
            junk.write_bytes(b"not a checkpoint")
            cases = [
                (["--method", "nope"], "invalid choice"),
                (["--method", "agw", "--lr", "fast"], "invalid float"),
                (["--method", "agw", "--device", "tpu"], "invalid choice"),
                (["--method", "agw", "--dataset", "sysu", "--data-root", str(regdb_like)], "use --dataset regdb"),
                (["--method", "agw", "--dataset", "sysu"], "needs --data-root"),
                (["--method", "agw", "--dataset", "regdb", "--data-root", str(regdb_like), "--trial", "11"],
                 "trials 1..10"),
                (["--method", "agw", "--out", str(busy)], "already holds a run"),
                (["--eval-only", "--checkpoint", str(junk)], "cannot be read"),
                (["--eval-only", "--checkpoint", str(Path(tmp) / "missing.pt")], "does not exist"),
                (["--method", "agw", "--smoke", "--arch", "vgg16", "--out", str(Path(tmp) / "o"),
                  "--cache-dir", TEST_CACHE], "--arch"),
            ]
            for argv, expected in cases:
                with self.subTest(argv=argv):
                    if "--out" not in argv:  # never write into the repository
                        argv = argv + ["--out", str(Path(tmp) / "out")]
                    p = run_reid(*argv)
                    self.assertEqual(p.returncode, 2)
                    self.assertNotIn("Traceback", p.stderr)
                    self.assertIn(expected, p.stderr)


class TestOverwriteSafety(unittest.TestCase):
    """--overwrite removes only a directory reid.py wrote (its .reid-run marker), never one that is or holds the
    working directory, the repository, the data root, the cache or the checkpoint being evaluated."""

    def test_refusals_delete_nothing(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            user = tmp / "user"
            user.mkdir()
            (user / "thesis.tex").write_text("years of work")
            ours = tmp / "ours"  # a directory with reid.py's marker, but also the data root / cwd / checkpoint's home
            ours.mkdir()
            (ours / ".reid-run").write_text("")
            (ours / "model.pt").write_bytes(b"x")
            smoke = ["--method", "agw", "--smoke", "--cache-dir", TEST_CACHE]
            cases = [  # (cwd, argv, a word of the message, a word it must not contain)
                (tmp, [*smoke, "--out", str(user), "--overwrite"], "not written by reid.py", "--overwrite"),
                (tmp, [*smoke, "--out", str(user)], "never deletes", "holds a run"),
                (user, [*smoke, "--out", ".", "--overwrite"], "not written by reid.py", "--overwrite to"),
                (HERE, [*smoke, "--out", ".", "--overwrite"], "not written by reid.py", "--overwrite to"),
                (ours, [*smoke, "--out", ".", "--overwrite"], "must not delete", None),
                (ours / "..", [*smoke, "--out", str(tmp), "--overwrite"], "not written by reid.py", None),
                (tmp, ["--method", "agw", "--smoke", "--cache-dir", str(ours), "--out", str(ours), "--overwrite"],
                 "must not delete", None),
                (tmp, [*smoke, "--dataset", "sysu", "--data-root", str(ours), "--out", str(ours), "--overwrite"],
                 "must not delete", None),
                (tmp, [*smoke, "--eval-only", "--checkpoint", str(ours / "model.pt"), "--out", str(ours),
                       "--overwrite"], None, None),
            ]
            for cwd, argv, word, absent in cases:
                with self.subTest(cwd=cwd, argv=argv):
                    p = run_reid(*argv, cwd=cwd)
                    self.assertEqual(p.returncode, 2, p.stderr)
                    self.assertNotIn("Traceback", p.stderr)
                    self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                    if word:
                        self.assertIn(word, p.stderr)
                    if absent:
                        self.assertNotIn(absent, p.stderr)
                    self.assertEqual((user / "thesis.tex").read_text(), "years of work")
                    self.assertTrue((ours / "model.pt").is_file() and (ours / ".reid-run").is_file())
            self.assertTrue(REID.is_file() and (HERE / ".git").exists())

    def test_overwrite_replaces_its_own_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            smoke = ["--method", "agw", "--smoke", "--cache-dir", TEST_CACHE, "--out", str(out)]
            self.assertEqual(run_reid(*smoke).returncode, 0)
            self.assertTrue((out / ".reid-run").is_file())
            (out / "stale.txt").write_text("from the first run")
            p = run_reid(*smoke)
            self.assertEqual(p.returncode, 2)
            self.assertIn("already holds a run", p.stderr)
            p = run_reid(*smoke, "--overwrite")
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            self.assertFalse((out / "stale.txt").exists())
            self.assertTrue((out / "results.json").is_file())


# ==== LLCM: data.load_llcm, the eval protocol 'llcm', reid.py on an LLCM tree (TestLLCM) ====

class TestLLCM(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()   # copies and the cache
        cls.root = hand_made_tree("llcm")
        cls.cache = os.path.join(cls._tmp.name, "cache")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def load(self, root=None, **kw):
        return data.load_llcm(root or self.root, 16, 8, self.cache, log=lambda m: None, **kw)

    def test_layout_reader(self):
        trainset, testset = self.load(expect_published=False)
        self.assertEqual((trainset.num_classes, len(trainset.v), len(trainset.r)), (2, 4, 4))
        self.assertEqual(list(trainset.v.cams), [1, 1, 4, 4])
        v, r = testset.pools["v"], testset.pools["r"]
        # (sorted id, camera, sorted file) order; every test_vis / test_nir image once
        self.assertEqual(list(zip(v.labels, v.cams)), [(3, 1), (3, 1), (3, 5), (77, 3), (77, 3), (1234, 3),
                                                       (1234, 9), (1234, 9), (1234, 9)])
        self.assertEqual(list(zip(r.labels, r.cams)), [(3, 2), (3, 2), (77, 4), (77, 8), (1234, 1), (1234, 9),
                                                       (1234, 9)])
        self.assertEqual(v.images.shape, (9, 16, 8, 3))
        self.assertEqual([p.name for p in testset.protocols], ["infrared-to-visible", "visible-to-infrared"])

    def test_gallery_draws_restated(self):
        _, testset = self.load(expect_published=False)

        def draw(folder, cams, trial):  # the release's rule, restated: seed, then one random.choice per dir
            random.seed(trial)
            out = []
            for pid in sorted(LLCM_TEST):
                for cam in cams:
                    d = os.path.join(self.root, folder, f"cam{cam}", f"{pid:04d}")
                    if os.path.isdir(d):
                        out.append(random.choice(sorted(os.path.join(d, f) for f in os.listdir(d))))
            return out
        i2v, v2i = testset.protocols
        pools = testset.pools
        for t in range(10):
            q, g = i2v.trials[t]
            self.assertEqual([pools["r"].files[i] for i in q], pools["r"].files)                # every infrared
            self.assertEqual([pools["v"].files[i] for i in g], draw("test_vis", range(1, 10), t))
            q, g = v2i.trials[t]   # as released: the sampled infrared set queries the full visible set
            self.assertEqual([pools["r"].files[i] for i in q], draw("test_nir", (1, 2, 4, 5, 6, 7, 8, 9), t))
            self.assertEqual([pools["v"].files[i] for i in g], pools["v"].files)

    def test_same_camera_removal_by_hand(self):
        # gallery: pid 5 cam 2, pid 7 cam 1, pid 5 cam 4, pid 7 cam 2
        g_pids, g_cams = np.array([5, 7, 5, 7]), np.array([2, 1, 4, 2])
        q_pids, q_cams = np.array([5, 7]), np.array([2, 3])
        d = np.array([[0.1, 0.2, 0.3, 0.4],     # q0: g0 removed (its id, its camera): kept 7, 5, 7 -> match at 2
                      [0.1, 0.4, 0.2, 0.3]])    # q1: nothing removed: 5, 5, 7, 7 -> match at 3, de-duplicated 2
        r = evaluation.evaluate(d, q_pids, g_pids, q_cams, g_cams, protocol="llcm", max_rank=4)
        self.assertEqual(list(r["cmc"]), [0.0, 1.0, 1.0, 1.0])
        self.assertEqual(list(r["cmc_standard"]), [0.0, 0.5, 1.0, 1.0])
        self.assertAlmostEqual(r["mAP"], (1 / 2 + (1 / 3 + 2 / 4) / 2) / 2)   # AP q0 1/2, q1 (1/3 + 2/4) / 2
        self.assertAlmostEqual(r["mINP"], (1 / 2 + 2 / 4) / 2)

    def test_val_split(self):
        with self.assertRaisesRegex(data.DataError, "2 training identities are too few"):
            self.load(split="val")                   # round(0.2 * 2) = 0 held out
        root = smoke_world("llcm")
        full, test = self.load(root, expect_published=False)
        train, val = self.load(root, split="val")
        self.assertEqual(train.num_classes + 2, full.num_classes)  # round(0.2 * 10) identities held out
        self.assertFalse(set(train.v.files) & set(val.pools["v"].files))
        self.assertFalse(set(val.pools["v"].files) & set(test.pools["v"].files))
        self.assertEqual(len(set(val.pools["r"].labels)), 2)

    def test_bad_input(self):
        cases = [  # (what to break, a word of the message)
            (lambda r: os.remove(os.path.join(r, "idx", "train_nir.txt")), "train_nir.txt is missing"),
            (lambda r: open(os.path.join(r, "idx", "train_vis.txt"), "a").write("x.jpg 0 7\n"), "malformed"),
            (lambda r: open(os.path.join(r, "idx", "train_vis.txt"), "a").write("x.jpg --1\n"), "malformed"),
            (lambda r: open(os.path.join(r, "idx", "train_vis.txt"), "a").write(
                "nir_and_vis/vis/cam1/0010/0001.jpg 0\n"), "listed twice"),
            (lambda r: open(os.path.join(r, "idx", "test_id.txt"), "w").write("1234,3,77,555\n"), "identity 555"),
            (lambda r: open(os.path.join(r, "idx", "test_id.txt"), "w").write("1234;3\n"), "not an identity"),
            (lambda r: os.remove(os.path.join(r, "idx", "test_id.txt")), "test_id.txt is missing"),
            (lambda r: shutil.rmtree(os.path.join(r, "idx")), "no idx/ directory"),
        ]
        for k, (breaking, word) in enumerate(cases):
            with self.subTest(word=word):
                root = os.path.join(self._tmp.name, f"bad{k}")
                shutil.copytree(self.root, root)
                breaking(root)
                with self.assertRaises(data.DataError) as cm:
                    self.load(root)
                self.assertIn(word, str(cm.exception))
                self.assertEqual(len(str(cm.exception).splitlines()), 1)

    def test_smoke_run_on_an_llcm_tree(self):
        root = smoke_world("llcm")
        _, testset = self.load(root, expect_published=False)
        self.assertEqual(len(testset.pools["v"]), len(list(Path(root, "test_vis").rglob("*.jpg"))))
        with tempfile.TemporaryDirectory() as tmp:
            results = reid_smoke("agw", Path(tmp) / "llcm", "--dataset", "llcm", "--data-root", str(root))
        self.assertEqual(set(results["results"]), {"infrared-to-visible", "visible-to-infrared"})
        self.assertEqual(results["dataset"], "llcm")
        for r in results["results"].values():
            self.assertEqual(len(r["trials"]), 10)


# ==== methods/agw.py (TestAGW) ====

class TestAGW(unittest.TestCase):
    def test_wrt_against_loop(self):
        g = torch.Generator().manual_seed(0)
        f, y = torch.randn(8, 5, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
        total = 0.0
        for i in range(8):  # re-statement: softmax-weighted positive and negative distances per anchor
            d = [math.dist(f[i].tolist(), f[j].tolist()) for j in range(8)]
            pos = [j for j in range(8) if y[j] == y[i]]
            neg = [j for j in range(8) if y[j] != y[i]]
            zp = sum(math.exp(d[j]) for j in pos)
            zn = sum(math.exp(-d[j]) for j in neg)
            d_p = sum(math.exp(d[j]) / zp * d[j] for j in pos)
            d_n = sum(math.exp(-d[j]) / zn * d[j] for j in neg)
            total += math.log(1 + math.exp(d_p - d_n))
        self.assertAlmostEqual(agw.L_wrt(f, y).item(), total / 8, places=4)

    def test_gem_and_non_local(self):
        x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # GeM p=3: ((1 + 8 + 27 + 64) / 4)^(1/3) = 25^(1/3)
        self.assertAlmostEqual(agw.gem(x, 3.0).item(), 25 ** (1 / 3), places=5)
        self.assertAlmostEqual(agw.gem(x, 1.0).item(), 2.5, places=5)  # p = 1 is average pooling
        block = agw.NonLocal(8).eval()
        z = torch.randn(2, 8, 4, 3)
        self.assertTrue(torch.equal(block(z), z))  # W_z's BN starts at zero: the block starts as the identity

    def test_two_stream_layout(self):
        s = agw.Settings(**agw.SMOKE)
        model = agw.build(s, 5).eval()
        x = torch.randn(3, 3, s.height, s.width)
        f, logits = model(x, x)
        # visible stem first, infrared stem second; the shared layers and head are the same
        self.assertTrue(torch.allclose(f[:3], model.features(x, "v")[0], atol=1e-5))
        self.assertTrue(torch.allclose(f[3:], model.features(x, "r")[0], atol=1e-5))
        self.assertEqual(tuple(logits.shape), (6, 5))
        self.assertFalse(model.bnneck.bias.requires_grad)

    def test_resnet50_trainable_parameters_are_the_community_count(self):
        """One training step of the ResNet-50 model for 395 classes: the parameters that receive a gradient number
        24,357,263, the community AGW's count (two stems 2 x 9,536 less one, shared layer1-4 23,508,032 - 9,536,
        five 1-channel non-local blocks 7C + 3 each = 28,687, BNNeck weight 2,048, classifier 2,048 x 395)."""
        torch.manual_seed(0)
        model = agw.build(agw.Settings(pretrained="none"), 395)
        x, y = torch.randn(4, 3, 32, 16), torch.tensor([0, 1, 0, 1])
        f, logits = model(x, x)
        y2 = torch.cat([y, y])
        (F.cross_entropy(logits, y2) + agw.L_wrt(f, y2)).backward()
        self.assertEqual(sum(p.numel() for p in model.parameters() if p.grad is not None), 24_357_263)
        blocks = [m for m in model.modules() if isinstance(m, agw.NonLocal)]
        self.assertEqual(sorted(b.theta.in_channels for b in blocks), [512, 512, 1024, 1024, 1024])
        for b in blocks:   # inner width 1: theta, phi, g squeeze C to 1 channel, W expands 1 to C
            self.assertEqual((b.theta.out_channels, b.phi.out_channels, b.g.out_channels, b.W[0].in_channels),
                             (1, 1, 1, 1))
        half = agw.build(agw.Settings(pretrained="none", non_local_inner="half"), 395)
        blocks = [m for m in half.modules() if isinstance(m, agw.NonLocal)]
        self.assertEqual([b.theta.out_channels for b in blocks], [256, 256, 512, 512, 512])
        self.assertEqual(sum(p.numel() for b in blocks for p in b.parameters()), 7_358_464)   # C/2: 3 (C^2/2 + C/2)
        #                                                                                     + (C^2/2 + C) + 2C

    def test_head_initialisation(self):
        """BNNeck weight ~ N(1, 0.01), bias 0; classifier ~ N(0, 0.001) (community model.py:80-89)."""
        torch.manual_seed(0)
        model = agw.build(agw.Settings(**agw.SMOKE), 300)
        w, c = model.bnneck.weight.detach(), model.classifier.weight.detach()
        self.assertAlmostEqual(w.mean().item(), 1.0, delta=0.003)
        self.assertAlmostEqual(w.std().item(), 0.01, delta=0.002)
        self.assertEqual(model.bnneck.bias.abs().max().item(), 0.0)
        self.assertAlmostEqual(c.mean().item(), 0.0, delta=2e-5)
        self.assertAlmostEqual(c.std().item(), 0.001, delta=5e-5)

    def test_recipes(self):
        """Paper recipe: community non-local width, no erasing, project sampler; RELEASE: 81 epochs, community
        sampler; a bad choice is one UserError line."""
        paper = agw.Settings()
        self.assertEqual((paper.non_local_inner, paper.erasing, paper.sampler), ("one", 0.0, "without-replacement"))
        release = agw.Settings(**{**dataclasses.asdict(paper), **agw.RELEASE})
        self.assertEqual((release.epochs, release.sampler, release.non_local_inner), (81, "community", "one"))
        self.assertEqual(set(agw.RELEASE) - set(dataclasses.asdict(paper)), set())
        for bad in ({"sampler": "random"}, {"non_local_inner": "two"}):
            with self.assertRaises(common.UserError):
                agw.check(agw.Settings(**bad))

    def test_community_sampler(self):
        """mode "community" (Cross-Modal-Re-ID-baseline utils.py:73-78): each identity's K images with replacement,
        int(N / (P K)) + 1 batches; "without-replacement": no repeated image within an identity, N // (P K)."""
        labels = np.repeat(np.arange(6), 2)                    # 6 ids x 2 images per modality, N = 12
        com = data.CrossModalitySampler(labels, labels, 2, 2, seed=0, mode="community")
        own = data.CrossModalitySampler(labels, labels, 2, 2, seed=0)
        self.assertEqual((len(com), len(own)), (12 // 4 + 1, 12 // 4))
        repeats = {"community": 0, "own": 0}
        for name, s in (("community", com), ("own", own)):
            for e in range(20):
                for idx_v, idx_r in s.epoch(e):
                    for idx in (idx_v, idx_r):
                        for group in idx.reshape(2, 2):
                            self.assertEqual(len(set(labels[group])), 1)
                            repeats[name] += group[0] == group[1]
        self.assertEqual(repeats["own"], 0)
        self.assertGreater(repeats["community"], 0.3 * 20 * 4 * 4)   # P(repeat) = 1/2 per group of two
        with self.assertRaises(data.DataError):
            data.CrossModalitySampler(labels, labels, 2, 2, seed=0, mode="other")


# ==== methods/nfs.py (TestNFS*) ====

def nfs_settings(**kw):
    """The --smoke settings (resnet18, 64 x 32) with overrides."""
    return nfs.Settings(**{**dataclasses.asdict(nfs.Settings()), **nfs.SMOKE, **kw})


def cb_density(x, lam):
    """Eq. (7) re-stated: C(lam) lam^x (1 - lam)^(1 - x), float64 numpy."""
    return float(nfs.C(torch.tensor(lam, dtype=torch.float64))) * lam ** x * (1 - lam) ** (1 - x)


def cb_cdf_at_half(lam):
    """F(1/2) of the continuous Bernoulli re-stated from its CDF: (sqrt(lam (1 - lam)) + lam - 1) / (2 lam - 1)."""
    return (lam * (1 - lam)).sqrt().add(lam - 1).div(2 * lam - 1)


def gate_opens(u, lam, rule):
    """The gate value re-stated from the noise u: quantile, x > F^-1(1 - lam) iff u > 1 - lam; round, x > 1/2 iff
    u > F(1/2)."""
    return u > (1 - lam if rule == "quantile" else cb_cdf_at_half(lam))


class TinyNFS(nfs.NFS):
    """A tiny two-stream network with NFS's interface and real search cells after its two shared stages:
    8 x 8 inputs, stems 3 -> 4 channels (stride 2), stage 1: 4 -> 6 (4 x 4), stage 2: 6 -> 8 (2 x 2)."""

    def __init__(self, act=nn.ReLU):
        nn.Module.__init__(self)

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), act())
        self.stem_v, self.stem_r = block(3, 4, 2), block(3, 4, 2)
        self.stages = nn.ModuleList([block(4, 6, 1), block(6, 8, 2)])
        self.bnneck = nn.BatchNorm1d(8)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(8, 3, bias=False)
        self.cells = nn.ModuleDict({"layer1": nfs.SearchCell(6, 4, 4, (-1.0, 1.0), 0.5),
                                    "layer2": nfs.SearchCell(8, 2, 2, (-1.0, 1.0), 0.5)})


def flat_cat(tensors):
    return torch.cat([t.flatten() for t in tensors])


class TestNFSContinuousBernoulli(unittest.TestCase):
    """Eq. (6)-(8): normalising constant, density, inverse-CDF sampler."""

    LAMS = (0.003, 0.2, 0.5 - 1e-4, 0.5, 0.5 + 1e-4, 0.5 + 0.0049, 0.5 + 0.0051, 0.8, 0.999)

    def test_C_against_closed_form_and_at_one_half(self):
        for lam in self.LAMS:
            z = 1 - 2 * lam
            expect = 2.0 if lam == 0.5 else 2 * math.atanh(z) / z
            got = float(nfs.C(torch.tensor(lam, dtype=torch.float64)))
            self.assertAlmostEqual(got, expect, delta=1e-13 * expect, msg=lam)
        self.assertEqual(float(nfs.C(torch.tensor(0.5))), 2.0)
        lam = torch.tensor([0.5 - 1e-4, 0.5, 0.5 + 1e-4], requires_grad=True)
        c = nfs.C(lam)                                            # float32: series branch, no 0/0
        self.assertTrue(torch.allclose(c, torch.tensor([2 + 8e-8 / 3, 2.0, 2 + 8e-8 / 3]), atol=1e-7))
        c.sum().backward()                                        # dC/dlam = -(8/3) z ... -> 0 at 1/2, finite
        self.assertTrue(torch.isfinite(lam.grad).all())
        self.assertAlmostEqual(float(lam.grad[1]), 0.0, places=6)

    def test_density_integrates_to_one(self):
        x = np.linspace(0, 1, 2001)
        for lam in self.LAMS:
            p = cb_density(x, lam)
            simpson = (x[1] - x[0]) / 3 * (p[0] + p[-1] + 4 * p[1:-1:2].sum() + 2 * p[2:-1:2].sum())
            self.assertAlmostEqual(simpson, 1.0, delta=1e-9, msg=lam)

    def test_samples_follow_the_density(self):
        """Kolmogorov-Smirnov distance of 20 000 samples to the CDF integrated numerically from Eq. (7)."""
        grid = np.linspace(0, 1, 20001)
        g = torch.Generator().manual_seed(0)
        n = 20000
        for lam in self.LAMS:
            p = cb_density(grid, lam)
            cdf = np.concatenate([[0.0], np.cumsum((p[1:] + p[:-1]) / 2 * np.diff(grid))])
            u = torch.rand(n, generator=g, dtype=torch.float64)
            x = nfs.sample_cb(torch.tensor(lam, dtype=torch.float64), u).numpy()
            self.assertTrue(((x >= 0) & (x <= 1)).all())
            F = np.interp(np.sort(x), grid, cdf)
            ks = max((np.arange(1, n + 1) / n - F).max(), (F - np.arange(n) / n).max())
            self.assertLess(ks, 1.95 / n ** 0.5, msg=lam)           # 0.1 % level of the KS test
            counts = np.histogram(x, bins=10, range=(0, 1))[0] / n
            expect = np.diff(np.interp(np.linspace(0, 1, 11), grid, cdf))
            self.assertLess(np.abs(counts - expect).max(), 0.012, msg=lam)

    def test_float32_sampler_is_stable_near_one_half(self):
        u = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for lam in (0.5 - 1e-4, 0.5 - 1e-7, 0.5, 0.5 + 1e-7, 0.5 + 1e-4, 0.505):
            x32 = nfs.sample_cb(torch.tensor(lam), u.float())
            x64 = nfs.sample_cb(torch.tensor(lam, dtype=torch.float64), u)
            self.assertTrue(torch.isfinite(x32).all(), lam)
            self.assertLess(float((x32.double() - x64).abs().max()), 1e-6, lam)
        self.assertTrue(torch.equal(nfs.sample_cb(torch.tensor(0.5, dtype=torch.float64), u), u))

    def test_rounded_sample_is_bernoulli_of_sigmoid_half_logit(self):
        """--gate-sample round: P(x > 1/2) = 1 - F(1/2) = sqrt(lam) / (sqrt(lam) + sqrt(1 - lam)) = sigmoid(P / 2)."""
        P = torch.tensor([-6.0, -1.0, 0.0, 0.3, 2.0, 8.0])
        n = 100000
        u = torch.rand(n, len(P), generator=torch.Generator().manual_seed(2))
        share = nfs.gate(P, u, "round").mean(0)
        p = torch.sigmoid(P / 2)
        self.assertLess(float(((share - p).abs() / (p * (1 - p) / n).sqrt()).max()), 4.5)

    def test_gate_opens_with_probability_P_tilde(self):
        """Eq. (6): the sample above its own (1 - P~)-quantile is Bernoulli(P~); P~ = 1 / (1 + e^-P) by math."""
        logits = (-6.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.0, 2.0, 4.0, 8.0)
        P = torch.tensor(logits, requires_grad=True)
        n = 100000
        u = torch.rand(n, len(P), generator=torch.Generator().manual_seed(5))
        G = nfs.gate(P, u)
        share = G.detach().mean(0)
        for j, logit in enumerate(logits):
            p = 1 / (1 + math.exp(-logit))
            sd = (p * (1 - p) / n) ** 0.5
            self.assertLess(abs(float(share[j]) - p), 4.5 * sd + 1e-12, msg=logit)
        # element by element, in float64: the gate is 1 exactly where u > 1 - P~
        P64 = torch.tensor(logits, dtype=torch.float64)
        lam = 1 / (1 + torch.exp(-P64))
        self.assertTrue(torch.equal(nfs.gate(P64, u.double()).bool(), gate_opens(u.double(), lam, "quantile")))
        # the straight-through estimator is kept: d sum(G) / dP = n sigma'(P)
        G.sum().backward()
        want = torch.tensor([n * math.exp(-x) / (1 + math.exp(-x)) ** 2 for x in logits])
        self.assertTrue(torch.allclose(P.grad, want, rtol=1e-4))

    def test_saturated_fields_stay_finite(self):
        P = torch.tensor([-1e4, -100.0, -20.0, 20.0, 100.0, 1e4], requires_grad=True)
        G = nfs.gate(P, torch.rand(500, len(P), generator=torch.Generator().manual_seed(3)))
        G_value = G.detach()
        self.assertTrue(torch.isfinite(G).all())
        # P~ is clamped to [1e-6, 1 - 1e-6]: a saturated gate flips with probability sigmoid(-13.8 / 2) = 1e-3
        self.assertLess(float(G_value[:, :3].mean()), 0.005)
        self.assertGreater(float(G_value[:, 3:].mean()), 0.995)
        G.sum().backward()
        self.assertTrue(torch.isfinite(P.grad).all())


class TestNFSGates(unittest.TestCase):
    """Eq. (4) and Eq. (9) in a search cell; gates per modality; stage shapes."""

    def setUp(self):
        torch.manual_seed(0)
        self.cell = nfs.SearchCell(5, 3, 2, (-1.0, 1.0), 0.5).train()
        self.y = torch.rand(6, 5, 3, 2, dtype=torch.float64) + 0.5                 # rows 0-3 visible, 4-5 infrared
        self.n_v = 4
        self.noise = self.cell.draw_noise(6)

    def expected_gates(self, rule):
        """(6, 5, 3, 2) 0/1 per element, re-stated from the noise (gate_opens)."""
        u_pix, u_ch = self.noise
        out = []
        for i in range(6):
            m = "v" if i < self.n_v else "r"
            g_pix = gate_opens(u_pix[i], torch.sigmoid(self.cell.P_pix[m].detach()), rule)
            g_ch = gate_opens(u_ch[i], torch.sigmoid(self.cell.P_ch[m].detach()), rule)
            out.append((g_pix & g_ch[:, None, None]).double())
        return torch.stack(out)

    def test_eq4_unselected_exactly_zero_selected_unchanged(self):
        for rule in ("quantile", "round"):
            self.cell.sample = rule
            out = self.cell(self.y, self.n_v, self.noise)
            G = self.expected_gates(rule)
            self.assertTrue(0 < float(G.mean()) < 1)
            self.assertTrue(torch.equal(out[G == 0], torch.zeros_like(out[G == 0])), rule)
            self.assertTrue(torch.equal(out[G == 1], self.y[G == 1]), rule)

    def test_search_time_keep_rate_at_initialisation(self):
        """U(0, 1) logits, pixel x channel gates: E[kept] = E[sigma(U)]^2 = ln((1 + e) / 2)^2 = 0.385 (quantile),
        (2 ln((1 + e^(1/2)) / 2))^2 = 0.316 (round); the derived gates keep everything."""
        torch.manual_seed(1)
        cell = nfs.SearchCell(128, 8, 4, (0.0, 1.0), 0.5).train()
        y = torch.ones(64, 128, 8, 4)
        lam_pix, lam_ch = torch.sigmoid(cell.P_pix["v"].detach()), torch.sigmoid(cell.P_ch["v"].detach())
        realised = float((lam_pix * lam_ch[:, None, None]).mean())
        for rule, closed in (("quantile", math.log((1 + math.e) / 2) ** 2),
                             ("round", (2 * math.log((1 + math.e ** 0.5) / 2)) ** 2)):
            cell.sample = rule
            kept = float(cell(y, 64).detach().mean())
            if rule == "quantile":
                self.assertAlmostEqual(kept, realised, delta=0.003)
            self.assertAlmostEqual(kept, closed, delta=0.02, msg=rule)
        self.assertAlmostEqual(math.log((1 + math.e) / 2) ** 2, 0.385, places=3)             # the docstring's figure
        self.assertEqual(float(cell.eval()(y, 64).mean()), 1.0)

    def test_eq9_gradient_reaches_fields_through_hard_gates(self):
        w = torch.randn(6, 5, 3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        (self.cell(self.y, self.n_v, self.noise) * w).sum().backward()
        u_pix, u_ch = self.noise
        for m, rows in (("v", slice(0, 4)), ("r", slice(4, 6))):
            lam_pix = torch.sigmoid(self.cell.P_pix[m].detach())
            lam_ch = torch.sigmoid(self.cell.P_ch[m].detach())
            g_pix = gate_opens(u_pix[rows], lam_pix, "quantile").double()            # (n_m, C, H, W)
            g_ch = gate_opens(u_ch[rows], lam_ch, "quantile").double()[:, :, None, None]
            up = w[rows] * self.y[rows]                                             # dL/dY~ * Y
            # straight-through: dL/dP~ = dL/dG, then dP~/dP = P~ (1 - P~)
            want_pix = (up * g_ch).sum(0) * lam_pix * (1 - lam_pix)
            want_ch = (up * g_pix).sum((0, 2, 3)) * lam_ch * (1 - lam_ch)
            self.assertTrue(torch.allclose(self.cell.P_pix[m].grad.double(), want_pix, atol=1e-6, rtol=1e-5), m)
            self.assertTrue(torch.allclose(self.cell.P_ch[m].grad.double(), want_ch, atol=1e-6, rtol=1e-5), m)
            self.assertGreater(float(self.cell.P_pix[m].grad.abs().sum()), 0)

    def test_each_modality_uses_its_own_fields(self):
        with torch.no_grad():
            for field in (self.cell.P_pix, self.cell.P_ch):
                field["v"].fill_(30.0)
                field["r"].fill_(-30.0)
        for train in (True, False):
            self.cell.train(train)
            out = self.cell(self.y, self.n_v, self.noise).detach()
            self.assertTrue(torch.equal(out[:4], self.y[:4]))
            self.assertEqual(float(out[4:].abs().max()), 0.0)

    def test_derived_gates_threshold_and_eval_forward(self):
        with torch.no_grad():
            self.cell.P_pix["v"][0, 0, 0] = 0.0                                     # P~ = 0.5 is not > 0.5
        self.cell.threshold = 0.6
        d = self.cell.derived()
        for m in ("v", "r"):
            self.assertTrue(torch.equal(d[f"{m}.pixel"], torch.sigmoid(self.cell.P_pix[m]) > 0.6))
            self.assertTrue(torch.equal(d[f"{m}.channel"], torch.sigmoid(self.cell.P_ch[m]) > 0.6))
        self.cell.eval()
        out = self.cell(self.y, self.n_v)
        for i, m in enumerate("vvvvrr"):
            keep = d[f"{m}.pixel"] & d[f"{m}.channel"][:, None, None]
            self.assertTrue(torch.equal(out[i], self.y[i] * keep))
        fixed = nfs.GateCell(5, 3, 2)
        fixed.set(d)
        self.assertTrue(torch.equal(fixed(self.y, self.n_v), out))

    def test_stage_shapes_match_a_dry_forward(self):
        net = common.resnet("resnet18").eval()
        for h, w in ((64, 32), (100, 50), (97, 33)):
            y = common.stem(net)(torch.zeros(1, 3, h, w))
            got = []
            with torch.no_grad():
                for stage in common.stages(net):
                    y = stage(y)
                    got.append(tuple(y.shape[1:]))
            self.assertEqual(nfs.stage_shapes("resnet18", h, w), got, (h, w))
        self.assertEqual(nfs.stage_shapes("resnet50", 288, 144),
                         [(256, 72, 36), (512, 36, 18), (1024, 18, 9), (2048, 18, 9)])        # Table 5

    def test_model_fields_follow_the_input_size(self):
        for h, w in ((64, 32), (96, 40)):
            model = nfs.build(nfs_settings(height=h, width=w, search_stages=(1, 3)), 4, {"nfs_model": "search"})
            self.assertEqual(list(model.cells), ["layer1", "layer3"])
            shapes = nfs.stage_shapes("resnet18", h, w)
            self.assertEqual(tuple(model.cells["layer3"].P_pix["r"].shape), shapes[2])
            self.assertEqual(tuple(model.cells["layer1"].P_ch["v"].shape), (64,))
            model.train()
            f, logits = model(torch.randn(2, 3, h, w), torch.randn(2, 3, h, w))
            self.assertEqual((tuple(f.shape), tuple(logits.shape)), ((4, 512), (4, 4)))


class TestNFSSecondOrder(unittest.TestCase):
    """Alg. 1 line 4 on a tiny network in float64."""

    def grad(self, model, settings, seed=7, **kw):
        torch.manual_seed(seed)
        xi = [0.05 if name.startswith("classifier") else 0.1 for name, _ in model.named_weights()]
        batch_t, batch_v = (random_batch(h=8, w=8, seed=k, dtype=torch.float64) for k in (1, 2))
        g, l_val = nfs.gate_gradient(model, batch_t, batch_v, settings, xi, **kw)
        return flat_cat(g), l_val

    def setUp(self):
        torch.manual_seed(0)
        self.model = TinyNFS().double().train()
        self.settings = nfs_settings(hessian="finite-difference")
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def assert_untouched(self):
        for k, v in self.model.state_dict().items():
            self.assertTrue(torch.equal(v, self.state[k]), k)

    def test_finite_difference_matches_exact_autograd(self):
        exact, l_exact = self.grad(self.model, dataclasses.replace(self.settings, hessian="autograd"))
        self.assert_untouched()
        fd, l_fd = self.grad(self.model, self.settings, fd_scale=1e-7)      # small step: no ReLU kink crossed
        self.assert_untouched()
        self.assertAlmostEqual(float(l_fd), float(l_exact), places=12)
        self.assertLess(float((fd - exact).norm() / exact.norm()), 1e-5)
        first, _ = self.grad(self.model, dataclasses.replace(self.settings, first_order=True))
        self.assertGreater(float((first - exact).norm() / exact.norm()), 1e-3)   # the second-order term matters

    def test_finite_difference_at_the_default_step_on_a_smooth_network(self):
        torch.manual_seed(0)
        self.model = TinyNFS(nn.Softplus).double().train()
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        exact, _ = self.grad(self.model, dataclasses.replace(self.settings, hessian="autograd"))
        fd, _ = self.grad(self.model, self.settings)
        self.assert_untouched()
        self.assertLess(float((fd - exact).norm() / exact.norm()), 1e-3)

    def test_exact_equals_an_independent_restatement(self):
        """d/dP L_val(W - xi grad_W L_train(W, P), P) by hand: direct term - (d/dP of <grad_W L_train, xi v>)."""
        settings = dataclasses.replace(self.settings, hessian="autograd")
        exact, _ = self.grad(self.model, settings)
        torch.manual_seed(7)
        names, W = zip(*self.model.named_weights())
        xi = [0.05 if n.startswith("classifier") else 0.1 for n in names]
        P = self.model.fields()
        u_t, u_v = self.model.draw_noise(8), self.model.draw_noise(8)
        l_t = nfs.objective(self.model, random_batch(h=8, w=8, seed=1, dtype=torch.float64), settings, noise=u_t)[0]
        g = torch.autograd.grad(l_t, W, create_graph=True)
        virtual = copy.deepcopy(self.model)                                 # the network at W' = W - xi g
        with torch.no_grad():
            for w, x, gw in zip(virtual.weights(), xi, g):
                w.sub_(x * gw)
        l_v = nfs.objective(virtual, random_batch(h=8, w=8, seed=2, dtype=torch.float64), settings, noise=u_v)[0]
        d = torch.autograd.grad(l_v, virtual.weights() + virtual.fields())
        dW, dP = d[:len(W)], d[len(W):]
        hvp = torch.autograd.grad(sum((gw * x * dw).sum() for gw, x, dw in zip(g, xi, dW)), P)
        want = flat_cat(dP) - flat_cat(hvp)
        self.assertLess(float((exact - want).norm() / want.norm()), 1e-10)

    def test_finite_difference_runs_in_float32_under_amp(self):
        """--amp with --hessian finite-difference: the gate gradient is the float32 one (bf16 autocast on the CPU)."""
        torch.manual_seed(0)
        model = TinyNFS().train()
        xi = [0.1] * len(model.weights())
        b1, b2 = random_batch(h=8, w=8, seed=1), random_batch(h=8, w=8, seed=2)

        def bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        out = {}
        for hessian in ("finite-difference", "autograd"):
            for name, ctx in (("fp32", contextlib.nullcontext), ("bf16", bf16)):
                torch.manual_seed(7)
                g, _ = nfs.gate_gradient(model, b1, b2, dataclasses.replace(self.settings, hessian=hessian), xi, ctx)
                out[hessian, name] = flat_cat(g)
        self.assertTrue(torch.equal(out["finite-difference", "bf16"], out["finite-difference", "fp32"]))
        self.assertFalse(torch.equal(out["autograd", "bf16"], out["autograd", "fp32"]))        # autocast was live

    def test_first_order_is_the_gradient_at_W(self):
        got, l_val = self.grad(self.model, dataclasses.replace(self.settings, first_order=True))
        self.assert_untouched()
        torch.manual_seed(7)
        loss = nfs.objective(self.model, random_batch(h=8, w=8, seed=2, dtype=torch.float64), self.settings)[0]
        want = flat_cat(torch.autograd.grad(loss, self.model.fields()))
        self.assertTrue(torch.equal(got, want))
        self.assertEqual(float(l_val), float(loss.detach()))


class TestNFSLosses(unittest.TestCase):

    def test_eq13_by_hand(self):
        f_v = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        f_r = torch.tensor([[0.0, 1.0], [6.0, 8.0]])
        y_v, y_r = torch.tensor([0, 1]), torch.tensor([0, 2])
        # pairs: (v0, r0) positive, d = 1 -> 1; (v0, r1) negative, d = 10 >= T -> 0;
        # (v1, r0) negative, d = sqrt(18) -> (6 - 3 sqrt 2)^2; (v1, r1) negative, d = 5 -> 1
        want = (1 + 0 + (6 - 3 * 2 ** 0.5) ** 2 + 1) / 4
        self.assertAlmostEqual(float(nfs.L_c(f_v, f_r, y_v, y_r, T=6.0)), want, places=5)

    def test_eq13_against_a_pair_loop(self):
        g = torch.Generator().manual_seed(0)
        f_v, f_r = torch.randn(6, 5, generator=g) * 4, torch.randn(6, 5, generator=g) * 4
        y = torch.tensor([0, 0, 1, 1, 2, 2])
        terms = []
        for i in range(6):
            for j in range(6):
                d = float((f_v[i] - f_r[j]).norm())
                terms.append(d ** 2 if y[i] == y[j] else max(0.0, 8.0 - d) ** 2)
        self.assertAlmostEqual(float(nfs.L_c(f_v, f_r, y, y, T=8.0)), sum(terms) / 36, places=3)

    def test_eq14_total(self):
        torch.manual_seed(0)
        model = TinyNFS().train()
        batch = random_batch(h=8, w=8, seed=3)
        noise = model.draw_noise(8)
        settings = nfs_settings(lam=0.5, T=3.0)
        loss, terms = nfs.objective(model, batch, settings, noise=noise)
        self.assertAlmostEqual(float(loss), float(terms["L_id"] + terms["L_tri"] + 0.5 * terms["L_c"]), places=5)
        f, logits = model(batch["x_v"], batch["x_r"], noise)
        y = torch.cat([batch["y_v"], batch["y_r"]])
        self.assertAlmostEqual(float(terms["L_id"]), float(torch.nn.functional.cross_entropy(logits, y)), places=5)
        self.assertAlmostEqual(float(terms["L_c"]), float(nfs.L_c(f[:4], f[4:], y[:4], y[4:], 3.0)), places=4)
        loss_b, terms_b = nfs.objective(model, batch, dataclasses.replace(settings, contrastive=False), noise=noise)
        self.assertEqual(set(terms_b), {"L_id", "L_tri"})
        self.assertAlmostEqual(float(loss_b), float(terms["L_id"] + terms["L_tri"]), places=5)


class TestNFSGatesFile(unittest.TestCase):
    """Alg. 1 lines 5-6: derived gates, the gates file, the retrain network and its checkpoint."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.settings = nfs_settings(search_stages=(1, 2))
        self.search = nfs.initial_model(self.settings, 4, "search", seed=3)
        with torch.no_grad():
            for p in self.search.fields():
                p.uniform_(-1, 1)

    def tearDown(self):
        self.tmp.cleanup()

    def test_round_trip_into_the_retrain_network(self):
        path = os.path.join(self.tmp.name, "gates.pt")
        nfs.save_gates(self.search, self.settings, path)
        retrain = nfs.initial_model(self.settings, 4, "retrain", seed=3)
        gates = nfs.load_gates(path, retrain, self.settings)
        retrain.set_gates(gates)
        for k, g in self.search.gates().items():
            self.assertTrue(torch.equal(retrain.gates()[k], g), k)
            self.assertTrue(0.2 < float(g.float().mean()) < 0.8, k)
        saved = torch.load(path, weights_only=True)
        p = saved["probabilities"]["layer2.r.pixel"]
        self.assertTrue(torch.equal(saved["gates"]["layer2.r.pixel"], p > 0.5))
        # the retrain network starts from the weights the search started from
        ws, wr = self.search.state_dict(), retrain.state_dict()
        for k in ws:
            if not k.startswith("cells."):
                self.assertTrue(torch.equal(ws[k], wr[k]), k)
        # build() for --eval-only: the gates come back with the state dict
        rebuilt = nfs.build(self.settings, 4, {"nfs_model": "retrain"})
        common.load_model_state(rebuilt, retrain.state_dict(), "test")
        x = torch.randn(2, 3, 64, 32)
        retrain.eval(), rebuilt.eval(), self.search.eval()
        for m in ("v", "r"):
            self.assertTrue(torch.equal(nfs.extract(rebuilt, x, m), nfs.extract(retrain, x, m)))
        self.assertTrue(torch.allclose(nfs.extract(retrain, x, "r"), nfs.extract(self.search, x, "r")))

    def test_mismatched_or_missing_gates_file(self):
        path = os.path.join(self.tmp.name, "gates.pt")
        nfs.save_gates(self.search, self.settings, path)
        other = nfs_settings(search_stages=(1, 2, 3))
        with self.assertRaisesRegex(UserError, "search-stages 1 2, this run has .*search-stages 1 2 3"):
            nfs.load_gates(path, nfs.build(other, 4, {"nfs_model": "retrain"}), other)
        other = nfs_settings(search_stages=(1, 2), height=96, width=48)
        with self.assertRaisesRegex(UserError, "--height 64 --width 32"):
            nfs.load_gates(path, nfs.build(other, 4, {"nfs_model": "retrain"}), other)
        with self.assertRaisesRegex(UserError, "no such file"):
            nfs.load_gates(path + ".missing", self.search, self.settings)
        with self.assertRaisesRegex(UserError, "needs --gates"):
            nfs.load_gates("", self.search, self.settings)
        bad = os.path.join(self.tmp.name, "bad.pt")
        with open(bad, "w") as f:
            f.write("not a checkpoint")
        with self.assertRaisesRegex(UserError, "cannot be read"):
            nfs.load_gates(bad, self.search, self.settings)

    def test_settings_a_user_gets_wrong(self):
        for kw, text in ((dict(phase="serch"), "--phase 'serch'"), (dict(hessian="exact"), "--hessian"),
                         (dict(search_stages=(1, 5)), "--search-stages 1 5"), (dict(search_stages=()), "stages"),
                         (dict(gates="x.pt"), "--gates is for --phase retrain"),
                         (dict(feature_search=False, phase="search"), "--feature-search false"),
                         (dict(threshold=1.0), "--threshold"), (dict(gate_init=(1.0, 0.0)), "--gate-init"),
                         (dict(gate_sample="median"), "--gate-sample 'median'")):
            with self.assertRaisesRegex(UserError, re.escape(text)):
                nfs.check(nfs_settings(**kw))
        self.assertEqual([nfs.model_kind(nfs_settings(**kw)) for kw in
                          (dict(), dict(phase="search"), dict(phase="retrain"), dict(feature_search=False))],
                         ["retrain", "search", "retrain", "baseline"])


def coded_trainset(ids=4, per_id=5, h=32, w=16):
    """A TrainSet of flat images whose red value 1 + index names the image (green: 10 visible, 200 infrared), so an
    augmented batch (crop with zero padding, flip) still tells which images it holds: see image_names."""
    def image_set(green, prefix):
        labels = np.repeat(np.arange(ids), per_id)
        images = np.zeros((len(labels), h, w, 3), dtype=np.uint8)
        images[..., 0] = (1 + np.arange(len(labels)))[:, None, None]
        images[..., 1] = green
        return data.ImageSet([f"{prefix}{i}" for i in range(len(labels))], labels, np.ones_like(labels),
                             images)
    return data.TrainSet(image_set(10, "v"), image_set(200, "r"), ids)


def image_names(batch):
    """{'v3', 'r0', ...}: the images of a batch, from the largest red value of each (ImageNet normalisation undone)."""
    names = set()
    for key, prefix in (("x_v", "v"), ("x_r", "r")):
        red = (batch[key][:, 0] * 0.229 + 0.485) * 255                # (B, H, W)
        names |= {f"{prefix}{int(round(float(v))) - 1}" for v in red.flatten(1).max(1).values}
    return names


class TestNFSSearchLoop(unittest.TestCase):
    """Alg. 1 lines 1-4 in search() itself, and the BN re-estimation of --phase search."""

    def settings(self, **kw):
        return nfs_settings(**{**dict(height=32, width=16, P=2, K=2, search_epochs=2, epochs=1, warmup=2,
                                      milestones=(), lr=0.1, backbone_lr=0.02), **kw})

    def test_line3_moves_weights_line4_moves_fields_each_on_its_split(self):
        settings = self.settings()
        trainset = coded_trainset()
        d_train, d_val = trainset.split_images(settings.search_split, 0)
        train_names = set(d_train.v.files) | set(d_train.r.files)
        val_names = set(d_val.v.files) | set(d_val.r.files)
        self.assertFalse(train_names & val_names)
        events = []                                    # ("line3" | "line4", snapshot, ...) in call order
        real_L, real_gate_gradient = nfs.objective, nfs.gate_gradient
        inside = []

        def snapshot(model):
            return {"W": [w.detach().clone() for w in model.weights()],
                    "P": [p.detach().clone() for p in model.fields()],
                    "B": [b.clone() for b in model.buffers()]}

        def L(model, batch, settings, *args, **kw):
            before = None if inside else snapshot(model)          # before the forward moves BN statistics
            loss, terms = real_L(model, batch, settings, *args, **kw)
            if not inside:                                         # Alg. 1 line 3's L_train
                g = torch.autograd.grad(loss, model.weights(), retain_graph=True)
                events.append(("line3", before, image_names(batch), [x.clone() for x in g]))
            return loss, terms

        def gate_gradient(model, batch_t, batch_v, settings, xi, *args, **kw):
            events.append(("line4", snapshot(model), image_names(batch_t), image_names(batch_v), list(xi)))
            inside.append(1)
            try:
                return real_gate_gradient(model, batch_t, batch_v, settings, xi, *args, **kw)
            finally:
                inside.pop()

        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(nfs, "objective", L), \
                mock.patch.object(nfs, "gate_gradient", gate_gradient):
            run = common.Run(tmp, "cpu", say=lambda line: None, max_its=2)
            model = nfs.search(settings, trainset, run)
        events.append(("end", snapshot(model)))
        kinds = [e[0] for e in events]
        self.assertEqual(kinds, ["line3", "line4"] * 4 + ["end"])       # 2 epochs x 2 iterations
        names = [n for n, _ in model.named_weights()]
        head = [n.startswith(("bnneck.", "classifier.")) for n in names]
        momentum, wd = settings.momentum, settings.weight_decay
        buf = None
        for k in range(4):
            epoch = k // 2
            factor = (epoch + 1) / 2                                      # warm-up of 2 epochs, by hand
            lr = [(0.1 if h else 0.02) * factor for h in head]
            _, s3, names3, g = events[2 * k]
            _, s4, names_t, names_v, xi = events[2 * k + 1]
            after = events[2 * k + 2][1]
            # each on its own split: line 3 and the virtual step on D_train, L_val on D_val
            self.assertTrue(names3 <= train_names and names_t == names3, k)
            self.assertTrue(names_v <= val_names, k)
            # line 3 moves only W (by one Nesterov SGD step at the current lr), never the fields
            for a, b in zip(s3["P"], s4["P"]):
                self.assertTrue(torch.equal(a, b), k)
            d = [gi + wd * w for gi, w in zip(g, s3["W"])]
            buf = d if buf is None else [momentum * bi + di for bi, di in zip(buf, d)]
            for w0, w1, di, bi, step in zip(s3["W"], s4["W"], d, buf, lr):
                torch.testing.assert_close(w1, w0 - step * (di + momentum * bi), rtol=1e-4, atol=1e-6)
            # line 4: xi = the current lr of each weight's group; only the fields move (BN statistics restored)
            self.assertEqual(xi, lr, k)
            for a, b in zip(s4["W"] + s4["B"], after["W"] + after["B"]):
                self.assertTrue(torch.equal(a, b), k)
            self.assertTrue(all(not torch.equal(a, b) for a, b in zip(s4["P"], after["P"])), k)

    def test_reestimated_statistics_are_those_of_the_derived_network(self):
        """After reestimate_bn on one batch, every BN's running mean / variance is the mean / variance of what it
        receives in an eval-mode forward of that batch (read by hooks); under the stochastic gates they were not."""
        torch.manual_seed(0)
        model = TinyNFS()
        with torch.no_grad():
            for p in model.fields():
                p.uniform_(0.0, 3.0)                    # derived gates all open, stochastic ones 2/3 open or less
        batch = random_batch(16, h=8, w=8, seed=5)
        model.train()
        with torch.no_grad():
            for _ in range(30):
                model(batch["x_v"], batch["x_r"])       # running statistics under the stochastic gates
        norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        seen = {}
        hooks = [bn.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0].detach())) for bn in norms]

        def eval_inputs():
            model.eval()
            with torch.no_grad():
                model(batch["x_v"], batch["x_r"])
            return {bn: (x.transpose(0, 1).flatten(1).mean(1), x.transpose(0, 1).flatten(1).var(1))
                    for bn, x in seen.items()}

        before = eval_inputs()
        gap = max(float(((bn.running_mean - before[bn][0]).abs() / before[bn][0].abs().clamp(min=0.1)).max())
                  for bn in norms)
        self.assertGreater(gap, 0.1)
        weights = [w.clone() for w in model.weights() + model.fields()]
        self.assertEqual(nfs.reestimate_bn(model, [batch]), 1)
        after = eval_inputs()
        for bn in norms:
            self.assertEqual(bn.momentum, 0.1)
            torch.testing.assert_close(bn.running_mean, after[bn][0], rtol=0.02, atol=0.02)
            torch.testing.assert_close(bn.running_var, after[bn][1], rtol=0.03, atol=0.02)
        for a, b in zip(weights, model.weights() + model.fields()):
            self.assertTrue(torch.equal(a, b))
        for h in hooks:
            h.remove()

    def test_phase_search_tests_reestimated_statistics(self):
        settings = self.settings(phase="search", search_epochs=1)
        with tempfile.TemporaryDirectory() as tmp:
            lines = []
            run = common.Run(tmp, "cpu", say=lines.append, max_its=2)
            model = nfs.train(settings, coded_trainset(), run)
            self.assertEqual(run.meta["nfs_model"], "search")
            self.assertIn("re-estimated with the derived gates over 2 D_train batches", run.meta["nfs_bn"])
            searched = common.load_checkpoint(os.path.join(tmp, "search.pt"))["model"]
            state = model.state_dict()
            self.assertEqual(int(state["stages.1.0.bn1.num_batches_tracked"]), 2)
            self.assertFalse(torch.equal(state["stages.1.0.bn1.running_mean"],
                                         searched["stages.1.0.bn1.running_mean"]))
            for k in state:
                if "running" not in k and "num_batches" not in k:
                    self.assertTrue(torch.equal(state[k], searched[k]), k)

    def test_initial_model_leaves_the_random_generators_alone(self):
        settings = self.settings()
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        a = nfs.initial_model(settings, 4, "search", seed=3)
        self.assertTrue(torch.equal(torch.get_rng_state(), cpu))
        if torch.cuda.is_available():
            for x, y in zip(torch.cuda.get_rng_state_all(), cuda):
                self.assertTrue(torch.equal(x, y))
        b = nfs.initial_model(settings, 4, "retrain", seed=3)
        c = nfs.initial_model(settings, 4, "retrain", seed=4)
        self.assertTrue(torch.equal(a.classifier.weight, b.classifier.weight))
        self.assertFalse(torch.equal(b.classifier.weight, c.classifier.weight))


class TestNFSSmoke(unittest.TestCase):
    """Alg. 1 end to end through reid.py: search -> derive -> retrain -> test; then retrain from the saved gates."""

    def reid(self, *args):
        done = run_reid("--method", "nfs", "--smoke", *args)
        self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-3000:])
        return done.stdout

    def test_search_derive_retrain(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "both")
            log = self.reid("--out", out)
            self.assertIn("[search] epoch 1/1", log)
            self.assertIn("[retrain] epoch 1/1", log)
            for name in ("gates.pt", "gates.png", "features.png", "results.json", "model.pt"):
                self.assertTrue(os.path.isfile(os.path.join(out, name)), name)
            results = json.load(open(os.path.join(out, "results.json")))["results"]
            self.assertIn("all-single", results)
            ckpt = torch.load(os.path.join(out, "model.pt"), weights_only=True)
            self.assertEqual(ckpt["meta"]["nfs_model"], "retrain")
            gates = torch.load(os.path.join(out, "gates.pt"), weights_only=True)["gates"]
            self.assertTrue(torch.equal(ckpt["model"]["cells.layer2.G_pix_r"], gates["layer2.r.pixel"]))

            again = os.path.join(tmp, "retrain")
            log = self.reid("--out", again, "--phase", "retrain", "--gates", os.path.join(out, "gates.pt"))
            self.assertNotIn("[search]", log)
            ckpt2 = torch.load(os.path.join(again, "model.pt"), weights_only=True)
            for k in ckpt["model"]:
                if k.startswith("cells."):
                    self.assertTrue(torch.equal(ckpt["model"][k], ckpt2["model"][k]), k)
            # the same data, seed and initial weights: the retrain phase gives the same model
            self.assertTrue(torch.equal(ckpt["model"]["classifier.weight"], ckpt2["model"]["classifier.weight"]))

            log = self.reid("--eval-only", "--checkpoint", os.path.join(out, "model.pt"),
                            "--out", os.path.join(tmp, "eval"))
            r1 = json.load(open(os.path.join(tmp, "eval", "results.json")))["results"]["all-single"]
            self.assertAlmostEqual(r1["mAP"], results["all-single"]["mAP"], places=4)


# ==== methods/cmnas.py (TestCMNAS*) ====

def cmnas_settings(**kw):
    return dataclasses.replace(cmnas.Settings(arch="resnet18", pretrained="none"), **kw)


def bn_by_hand(x, weight, bias, eps, mean=None, var=None):
    """BatchNorm restated: per-channel batch mean and biased variance (or the given statistics)."""
    mean = x.mean(dim=(0, 2, 3)) if mean is None else mean
    var = x.var(dim=(0, 2, 3), unbiased=False) if var is None else var
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / (var.view(shape) + eps).sqrt() * weight.view(shape) + bias.view(shape)


class TestCMNASSearchSpace(unittest.TestCase):
    """Eq. (1)-(2): the searchable BN unit."""

    def setUp(self):
        torch.manual_seed(0)
        self.bn = nn.BatchNorm2d(3, momentum=1.0)       # momentum 1: running stats = the last batch's
        self.bn.weight.data.uniform_(0.5, 2.0)
        self.bn.bias.data.uniform_(-1.0, 1.0)
        # visible and infrared halves with very different statistics
        self.x_v = torch.randn(4, 3, 5, 3) * 2 + 5
        self.x_r = torch.randn(4, 3, 5, 3) * 0.5 - 3
        self.x = torch.cat([self.x_v, self.x_r])

    def expected(self, unit):
        sep, shared = unit.o1, unit.o2
        o1 = torch.cat([bn_by_hand(self.x_v, sep.v.weight, sep.v.bias, sep.v.eps),
                        bn_by_hand(self.x_r, sep.r.weight, sep.r.bias, sep.r.eps)])
        return o1, bn_by_hand(self.x, shared.weight, shared.bias, shared.eps)

    def test_saturated_alpha_gives_separate_or_shared_bn(self):
        unit = cmnas.MixedBN(self.bn)
        unit.o1.r.weight.data.mul_(1.5)                 # the two separate BNs hold their own parameters
        o1, o2 = self.expected(unit)
        with torch.no_grad():
            unit.alpha.copy_(torch.tensor([40.0, -40.0]))
            torch.testing.assert_close(unit(self.x), o1, atol=1e-5, rtol=1e-5)
            unit.alpha.copy_(torch.tensor([-40.0, 40.0]))
            torch.testing.assert_close(unit(self.x), o2, atol=1e-5, rtol=1e-5)

    def test_weighted_sum_with_softmax(self):
        unit = cmnas.MixedBN(self.bn)
        with torch.no_grad():
            unit.alpha.copy_(torch.tensor([math.log(3.0), 0.0]))           # p = (3/4, 1/4) by Eq. (1)
            torch.testing.assert_close(unit.probabilities(), torch.tensor([0.75, 0.25]))
            o1, o2 = self.expected(unit)
            torch.testing.assert_close(unit(self.x), 0.75 * o1 + 0.25 * o2, atol=1e-5, rtol=1e-5)

    def test_separate_running_statistics_see_only_their_modality(self):
        unit = cmnas.MixedBN(self.bn)
        unit(self.x)
        for bn, x in ((unit.o1.v, self.x_v), (unit.o1.r, self.x_r), (unit.o2, self.x)):
            torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)))
            torch.testing.assert_close(bn.running_var, x.var(dim=(0, 2, 3), unbiased=True))
        # at test time a one-modality batch is normalised with that modality's statistics
        sep = unit.o1.eval()
        sep.modality = "r"
        want = bn_by_hand(self.x_r, sep.r.weight, sep.r.bias, sep.r.eps, sep.r.running_mean, sep.r.running_var)
        torch.testing.assert_close(sep(self.x_r), want, atol=1e-5, rtol=1e-5)

    def test_network_routes_each_half_to_its_modality(self):
        for network in ("two-stream-bn", "two-stream"):
            model = cmnas.CMNASNet(cmnas_settings(network=network), 5).eval()
            for m in model.modules():
                if isinstance(m, cmnas.SeparateBN):
                    m.r.bias.data.add_(0.5)             # the infrared BNs now differ from the visible ones
            x = torch.randn(2, 3, 32, 16)
            with torch.no_grad():
                f_v, _ = model(x, "v")
                f_r, _ = model(x, "r")
                f_vr, _ = model(torch.cat([x, x]), "vr")
            torch.testing.assert_close(f_vr, torch.cat([f_v, f_r]))
            self.assertGreater((f_v - f_r).abs().max().item(), 1e-3, network)


class TestCMNASLosses(unittest.TestCase):
    """Eq. (4)-(10)."""

    def test_kernel_mmd_equals_explicit_feature_map(self):
        torch.manual_seed(1)
        a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        psi = lambda x: (x[:, :, None] * x[:, None, :]).flatten(1)      # k(x, y) = (x . y)^2 = psi(x) . psi(y)
        want = (psi(a).mean(0) - psi(b).mean(0)).pow(2).sum()
        torch.testing.assert_close(cmnas.mmd2(a, b), want)

    def test_L_CMMD_is_the_class_average_of_feature_map_distances(self):
        torch.manual_seed(2)
        f_v, f_r = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
        y_v = torch.tensor([7, 7, 2, 2, 9, 9])
        y_r = torch.tensor([7, 7, 2, 2, 9, 9])
        n_v, n_r = f_v / f_v.norm(dim=1, keepdim=True), f_r / f_r.norm(dim=1, keepdim=True)
        psi = lambda x: (x[:, :, None] * x[:, None, :]).flatten(1)
        per_class = []
        for c in (7, 2, 9):   # Eq. (4) with the norm squared, on L2-normalised features
            per_class.append((psi(n_v[y_v == c]).mean(0) - psi(n_r[y_r == c]).mean(0)).pow(2).sum())
        torch.testing.assert_close(cmnas.L_CMMD(f_v, f_r, y_v, y_r), sum(per_class) / 3)
        # plain MMD (Table 1): all visible against all infrared
        want = (psi(n_v).mean(0) - psi(n_r).mean(0)).pow(2).sum()
        torch.testing.assert_close(cmnas.L_MMD(f_v, f_r), want)

    def test_L_CC_hand_computed(self):
        F_vis = torch.tensor([[1.0, 0.0], [0.0, 1.0]])       # Gram I -> rows (1, 0), (0, 1)
        F_ir = torch.tensor([[1.0, 0.0], [1.0, 1.0]])        # Gram [[1, 1], [1, 2]] -> (1, 1)/sqrt2, (1, 2)/sqrt5
        # ((1 - 1/sqrt2)^2 + (1/sqrt2)^2 + (1/sqrt5)^2 + (1 - 2/sqrt5)^2) / 2^2
        #   = (0.0857864 + 0.5 + 0.2 + 0.0111456) / 4 = 0.1992330
        self.assertAlmostEqual(cmnas.L_CC(F_vis, F_ir).item(), 0.1992330, places=6)
        self.assertAlmostEqual(cmnas.L_CC(F_ir, F_ir).item(), 0.0, places=7)

    def test_L_train_sums_the_terms_with_the_lambdas(self):
        class Stub(nn.Module):       # features = the first 4 pixels, the BN feature = twice that
            def __init__(self):
                super().__init__()
                self.classifier = nn.Linear(4, 3, bias=False)

            def forward(self, x):
                f = x.flatten(1)[:, :4]
                return f, 2 * f

        torch.manual_seed(3)
        batch = {"x_v": torch.randn(4, 3, 2, 2), "x_r": torch.randn(4, 3, 2, 2),
                 "y_v": torch.tensor([0, 0, 1, 1]), "y_r": torch.tensor([0, 0, 1, 1])}
        model = Stub()
        s = cmnas_settings(lambdas=(0.3, 2.0))
        loss, terms = cmnas.objective(model, batch, s, c3mmd=True)
        self.assertEqual(set(terms), {"L_cls", "L_triplet", "L_CMMD", "L_CC"})
        torch.testing.assert_close(loss, terms["L_cls"] + terms["L_triplet"] + 0.3 * terms["L_CMMD"]
                                   + 2.0 * terms["L_CC"])
        f = torch.cat([batch["x_v"], batch["x_r"]]).flatten(1)[:, :4]
        torch.testing.assert_close(terms["L_CC"], cmnas.L_CC(2 * f[:4], 2 * f[4:]))
        loss, terms = cmnas.objective(model, batch, dataclasses.replace(s, class_specific=False), c3mmd=True)
        self.assertIn("L_MMD", terms)
        loss, terms = cmnas.objective(model, batch, s, c3mmd=False)
        self.assertEqual(set(terms), {"L_cls", "L_triplet"})
        torch.testing.assert_close(loss, terms["L_cls"] + terms["L_triplet"])


class TestCMNASGenotype(unittest.TestCase):

    def test_paper_genotypes_have_53_bits_and_round_trip(self):
        s = cmnas_settings(arch="resnet50")
        for name, text in cmnas.PAPER_GENOTYPES.items():
            model = cmnas.CMNASNet(s, 10, cmnas.read_genotype(name))
            self.assertEqual(len(cmnas.flat(cmnas.bn_layers(model.body))), 53)
            self.assertEqual(cmnas.genotype_of(model.body), text)      # bits -> model -> bits, Fig. 4 grouping
            separate = sum(isinstance(m, cmnas.SeparateBN) for m in model.modules())
            self.assertEqual(separate, text.count("0"))
            # s3_1 is layer2[0]: 4 bits, downsample BN first, then bn1, bn2, bn3
            block = model.body[2][0]
            units = [block.downsample[1], block.bn1, block.bn2, block.bn3]
            bits = text.split(" | ")[2].split()[0]
            self.assertEqual("".join("0" if isinstance(u, cmnas.SeparateBN) else "1" for u in units), bits)
            self.assertIsInstance(model.body[0][1], cmnas.SeparateBN if text[0] == "0" else nn.BatchNorm2d)

    def test_resnet18_layout_derivation_and_length_check(self):
        model = cmnas.CMNASNet(cmnas_settings(), 10)               # the search space
        self.assertEqual(len(model.alphas()), 20)                   # 1 + 2x2 + 3x(3 + 2)
        torch.manual_seed(4)
        with torch.no_grad():
            for a in model.alphas():
                a.normal_()
        bits = "".join("0" if a[0] > a[1] else "1" for a in
                       (getattr(parent, name).alpha for parent, name, _ in cmnas.flat(cmnas.bn_layers(model.body))))
        text = cmnas.genotype_of(model.body)
        self.assertEqual(text.replace(" ", "").replace("|", ""), bits)
        self.assertEqual(len(text.split(" | ")), 5)
        again = cmnas.CMNASNet(cmnas_settings(), 10, text)
        self.assertEqual(cmnas.genotype_of(again.body), text)
        with self.assertRaisesRegex(common.UserError, "20 BN layers"):
            cmnas.CMNASNet(cmnas_settings(), 10, cmnas.PAPER_GENOTYPES["paper-sysu"])
        with self.assertRaisesRegex(common.UserError, "20 BN layers"):
            cmnas.CMNASNet(cmnas_settings(), 10, "2" * 20)

    def test_baselines(self):
        self.assertEqual(cmnas.genotype_of(cmnas.CMNASNet(cmnas_settings(network="two-stream-bn"), 3).body),
                         "0 | 00 00 | 111 11 | 111 11 | 111 11")
        self.assertEqual(cmnas.genotype_of(cmnas.CMNASNet(cmnas_settings(network="one-stream"), 3).body),
                         "1 | 11 11 | 111 11 | 111 11 | 111 11")
        two = cmnas.CMNASNet(cmnas_settings(network="two-stream"), 3)
        self.assertIsNot(two.specific["v"][0][0], two.specific["r"][0][0])   # separate stem convolutions
        for network in ("one-stream-in", "two-stream-in"):
            model = cmnas.CMNASNet(cmnas_settings(network=network), 3)
            kinds = {type(m) for m in model.modules()}
            self.assertNotIn(nn.BatchNorm2d, kinds)
            self.assertIn(nn.InstanceNorm2d, kinds)

    def test_build_from_meta_and_genotype_files(self):
        s = cmnas_settings()
        text = "0 | 01 10 | 001 11 | 111 11 | 111 11"
        model = cmnas.build(s, 7, {"genotype": text, "supernet": False})
        self.assertEqual(cmnas.genotype_of(model.body), text)
        common.load_model_state(cmnas.build(s, 7, {"genotype": text}), model.state_dict(), "test")
        self.assertEqual(len(cmnas.build(s, 7, {"genotype": text, "supernet": True}).alphas()), 20)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "g.txt")
            with open(path, "w") as f:
                f.write("# a comment\n" + text + "\n# s1.bn1 0.6 0.4 0\n")
            self.assertEqual(cmnas.read_genotype(path), text)
            self.assertEqual(cmnas.genotype_of(cmnas.build(dataclasses.replace(s, genotype=path), 7).body), text)
        with self.assertRaisesRegex(common.UserError, "paper-sysu"):
            cmnas.read_genotype("/no/such/genotype.txt")

    def test_settings_errors(self):
        for kw, pattern in ((dict(network="three-stream"), "--network"), (dict(phase="all"), "--phase"),
                            (dict(c3mmd="phase1"), "--c3mmd"), (dict(lambdas=(1.0,)), "--lambdas"),
                            (dict(phase="retrain"), "--genotype"), (dict(genotype="paper-sysu"), "--phase retrain"),
                            (dict(network="one-stream", phase="search"), "--network cm-nas")):
            with self.assertRaisesRegex(common.UserError, pattern):
                cmnas.check(cmnas_settings(**kw))


class TestCMNASTrain(unittest.TestCase):
    """Search -> derive -> retrain, retrain from a genotype file, and resume, on a tiny in-memory set."""

    def test_search_then_retrain_and_resume(self):
        s = cmnas_settings(height=32, width=16, P=2, K=2, epochs=1, search_epochs=1, warmup=1, milestones=(),
                           search_split=0.5, arch_lr=0.05)
        with tempfile.TemporaryDirectory() as tmp:
            run = common.Run(tmp, "cpu", say=lambda line: None, max_its=2)
            model = cmnas.train(s, tiny_trainset(ids=6, per_v=4, per_r=2), run)
            genotype = run.meta["genotype"]
            self.assertEqual(cmnas.genotype_of(model.body), genotype)
            self.assertFalse(run.meta["supernet"])
            self.assertFalse(any(isinstance(m, cmnas.MixedBN) for m in model.modules()))
            written = cmnas.read_genotype(os.path.join(tmp, "genotype.txt"))
            self.assertEqual(written, genotype)
            search = common.load_checkpoint(os.path.join(tmp, "search.pt"))
            alphas = [v for k, v in search["model"].items() if k.endswith("alpha")]
            self.assertEqual(len(alphas), 20)
            self.assertTrue(any((a != 0).any() for a in alphas))         # the alpha steps moved alpha
            # a resumed run (both phases finished) rebuilds the same model
            run2 = common.Run(tmp, "cpu", say=lambda line: None, max_its=2)
            again = cmnas.train(s, tiny_trainset(ids=6, per_v=4, per_r=2), run2)
            for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
                torch.testing.assert_close(a, b, msg=k)
            # phase 2 alone from the written genotype file
            run3 = common.Run(os.path.join(tmp, "retrain"), "cpu", say=lambda line: None, max_its=1)
            retrained = cmnas.train(dataclasses.replace(s, phase="retrain", genotype=os.path.join(tmp, "genotype.txt")),
                                    tiny_trainset(ids=6, per_v=4, per_r=2), run3)
            self.assertEqual(cmnas.genotype_of(retrained.body), genotype)
            feats = cmnas.extract(retrained.eval(), torch.randn(3, 3, 32, 16), "r")
            torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))


class TestCMNASSmoke(unittest.TestCase):
    def test_reid_smoke_search_retrain_and_eval_only(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run")
            done = run_reid("--method", "cmnas", "--smoke", "--out", out)
            self.assertEqual(done.returncode, 0, done.stderr[-2000:])
            self.assertIn("[search] genotype", done.stdout)
            results = json.load(open(os.path.join(out, "results.json")))
            self.assertTrue(results["results"])
            checkpoint = common.load_checkpoint(os.path.join(out, "model.pt"))
            genotype = checkpoint["meta"]["genotype"]
            self.assertEqual(genotype, cmnas.read_genotype(os.path.join(out, "genotype.txt")))
            # --eval-only rebuilds the retrained network from the stored genotype (in-process: no second start-up)
            with contextlib.redirect_stdout(io.StringIO()):
                again = reid.main(["--eval-only", "--checkpoint", os.path.join(out, "model.pt"), "--smoke",
                                   "--out", os.path.join(tmp, "eval"), "--cache-dir", TEST_CACHE])
            self.assertEqual(again["all-single"]["rank1"], results["results"]["all-single"]["rank1"])


class TestCMNASAlternation(unittest.TestCase):
    """Eq. (3), first order: the alpha step moves only alpha, on the validation batch; the weight step only the
    weights, on the training batch; --val-cls false makes L_val independent of the classifier."""

    def _setup(self, lr=0.01, arch_lr=0.05, **kw):
        torch.manual_seed(0)
        s = cmnas_settings(lr=lr, backbone_lr=lr, arch_lr=arch_lr, **kw)
        model = cmnas.CMNASNet(s, 12)
        optimizer, _ = cmnas.weight_optimizer(s, model)
        arch_optimizer = torch.optim.Adam(model.alphas(), lr=s.arch_lr, betas=tuple(s.betas))
        run = common.Run(tempfile.mkdtemp(), "cpu", say=lambda line: None)
        return s, model.train(), optimizer, arch_optimizer, run

    @staticmethod
    def _params(model):
        alphas = {id(a) for a in model.alphas()}
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in alphas}
        return [a.detach().clone() for a in model.alphas()], weights

    def test_alpha_step_moves_only_alpha_on_the_validation_batch(self):
        s, model, opt, arch_opt, run = self._setup(lr=0.0)      # weight step of size 0: what moves is the alpha step's
        a0, w0 = self._params(model)
        train_a, train_b = random_batch(3, seed=1), random_batch(3, seed=2)
        val = random_batch(3, seed=3, label_offset=6)
        state = copy.deepcopy(model.state_dict())
        cmnas.search_step(model, train_a, val, s, True, opt, arch_opt, run.autocast)
        a1, w1 = self._params(model)
        for n in w0:
            torch.testing.assert_close(w1[n], w0[n], rtol=0, atol=0, msg=n)
        self.assertTrue(all((x != y).all() for x, y in zip(a0, a1)))   # every alpha moved
        # the alpha step saw only the validation batch: another training batch gives the same alphas
        s, model, opt, arch_opt, run = self._setup(lr=0.0)
        model.load_state_dict(state)
        cmnas.search_step(model, train_b, val, s, True, opt, arch_opt, run.autocast)
        for x, y in zip(a1, self._params(model)[0]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)

    def test_weight_step_moves_only_weights_on_the_training_batch(self):
        s, model, opt, arch_opt, run = self._setup(arch_lr=0.0)   # alpha step of size 0
        a0, w0 = self._params(model)
        train = random_batch(3, seed=1)
        val_a, val_b = random_batch(3, seed=2, label_offset=6), random_batch(3, seed=3, label_offset=6)
        state = copy.deepcopy(model.state_dict())
        cmnas.search_step(model, train, val_a, s, True, opt, arch_opt, run.autocast)
        a1, w1 = self._params(model)
        for x, y in zip(a0, a1):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        moved = [n for n in w0 if not torch.equal(w0[n], w1[n])]
        self.assertIn("classifier.weight", moved)
        self.assertGreater(len(moved), len(w0) // 2)
        # the weight step saw only the training batch: another validation batch gives the same weights
        s, model, opt, arch_opt, run = self._setup(arch_lr=0.0)
        model.load_state_dict(state)
        cmnas.search_step(model, train, val_b, s, True, opt, arch_opt, run.autocast)
        for n, p in self._params(model)[1].items():
            torch.testing.assert_close(p, w1[n], rtol=0, atol=0, msg=n)

    def test_val_cls_false_makes_the_alpha_step_independent_of_the_classifier(self):
        val = random_batch(3, seed=3, label_offset=6)
        for val_cls, same in ((False, True), (True, False)):
            alphas = []
            for scale in (1.0, 50.0):
                s, model, opt, arch_opt, run = self._setup(lr=0.0, val_cls=val_cls)
                with torch.no_grad():
                    model.classifier.weight.mul_(scale)
                cmnas.search_step(model, random_batch(3, seed=1), val, s, True, opt, arch_opt, run.autocast)
                alphas.append(torch.cat(self._params(model)[0]))
            self.assertEqual(torch.equal(alphas[0], alphas[1]), same, f"val_cls={val_cls}")
        loss, terms = cmnas.objective(model, val, s, c3mmd=True, cls=False)
        self.assertNotIn("L_cls", terms)
        lambda1, lambda2 = s.lambdas
        torch.testing.assert_close(loss.detach(), terms["L_triplet"] + lambda1 * terms["L_CMMD"]
                                   + lambda2 * terms["L_CC"])


class TestCMNASPhaseFlags(unittest.TestCase):
    """--c3mmd both | search | retrain | none switches L_C3MMD in the search steps (alpha and w) and in phase 2."""

    def test_c3mmd_per_phase(self):
        expected = {"both": [True, True, True], "search": [True, True, False], "retrain": [False, False, True],
                    "none": [False, False, False]}
        original = cmnas.objective
        for c3mmd, want in expected.items():
            seen = []

            def recording(model, batch, settings, c3mmd=True, cls=True):
                on = c3mmd
                loss, terms = original(model, batch, settings, c3mmd=c3mmd, cls=cls)
                seen.append(on)
                self.assertEqual("L_CMMD" in terms and "L_CC" in terms, on)
                return loss, terms

            s = cmnas_settings(height=32, width=16, P=2, K=2, epochs=1, search_epochs=1, warmup=1, milestones=(),
                               search_split=0.5, c3mmd=c3mmd)
            with tempfile.TemporaryDirectory() as tmp, mock.patch.object(cmnas, "objective", recording):
                cmnas.train(s, tiny_trainset(ids=6, per_v=4, per_r=2),
                            common.Run(tmp, "cpu", say=lambda line: None, max_its=1))
            self.assertEqual(seen, want, c3mmd)      # alpha step, w step (search), w step (retrain)


class TestCMNASRelease(unittest.TestCase):
    """The release's recipe: RELEASE / RELEASE_REGDB, four-term triplet, head init, warm-up, EMA, float32 C3MMD."""

    def test_release_dicts_are_settings_and_cited(self):
        fields = {f.name for f in dataclasses.fields(cmnas.Settings)}
        for layer in (cmnas.RELEASE, cmnas.RELEASE_REGDB):
            self.assertLessEqual(set(layer), fields)
        self.assertEqual((cmnas.RELEASE["P"], cmnas.RELEASE["K"]), (16, 4))
        self.assertEqual((cmnas.RELEASE["ema_decay"], cmnas.RELEASE["ema_every"]), (0.997, 2))
        self.assertEqual((cmnas.RELEASE_REGDB["ema_decay"], cmnas.RELEASE_REGDB["ema_every"]), (0.968, 10))
        source = inspect.getsource(cmnas).split("\nRELEASE = dict(\n")[1].split("\nSYNTHETIC")[0]
        for line in source.splitlines():
            if "=" in line and not line.lstrip().startswith("#") and "dict(" not in line:
                self.assertRegex(line, r"# .*\.(py|sh):\d+", line)       # every entry cites file:line
        s = cmnas_settings(**{**cmnas.RELEASE, "arch": "resnet18", "pretrained": "none"})
        cmnas.check(s)
        self.assertEqual(cmnas.Settings().ema_decay, 0.0)                 # the paper: no EMA

    def test_four_term_triplet_against_a_loop(self):
        g = torch.Generator().manual_seed(0)
        f = torch.randn(12, 5, generator=g, dtype=torch.float64)
        y = torch.tensor([0, 0, 1, 1, 2, 2] * 2)
        m = 0.4

        def term(a, b, ya, yb):
            total = 0.0
            for i in range(len(a)):
                dists = [float((a[i] - b[j]).norm()) for j in range(len(b))]
                ap = max(dd for dd, yj in zip(dists, yb) if yj == ya[i])
                an = min(dd for dd, yj in zip(dists, yb) if yj != ya[i])
                total += max(0.0, ap - an + m)
            return total / len(a)

        want = (term(f[:6], f[:6], y[:6], y[:6]) + term(f[6:], f[6:], y[6:], y[6:]) +
                term(f[:6], f[6:], y[:6], y[6:]) + term(f[6:], f[:6], y[6:], y[:6])) / 4
        got = cmnas.L_triplet(f, y, 6, cmnas_settings(triplet="four-term", margin=m))
        self.assertAlmostEqual(float(got), want, places=5)
        joint = cmnas.L_triplet(f, y, 6, cmnas_settings(triplet="joint", margin=m))
        self.assertAlmostEqual(float(joint), term(f, f, y, y), places=5)

    def test_head_init_and_warmup(self):
        torch.manual_seed(0)
        model = cmnas.CMNASNet(cmnas_settings(head_init="release"), 200)
        self.assertAlmostEqual(float(model.classifier.weight.detach().std()), 0.001, delta=1e-4)
        self.assertAlmostEqual(float(model.bnneck.weight.detach().mean()), 1.0, delta=0.003)
        self.assertAlmostEqual(float(model.bnneck.weight.detach().std()), 0.01, delta=0.002)
        default = cmnas.CMNASNet(cmnas_settings(), 200)
        self.assertTrue(torch.equal(default.bnneck.weight, torch.ones(512)))
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        release = cmnas.ReleaseWarmup(opt, (40, 70), warmup=10)
        # utils/lr_scheduler.py: 0.01 (1 - e/10) + e/10 below 10, then 0.1 ** (milestones passed)
        for e, f in ((0, 0.01), (5, 0.505), (9, 0.901), (10, 1.0), (39, 1.0), (40, 0.1), (70, 0.01)):
            self.assertAlmostEqual(release.factor(e), f, places=12)
        self.assertAlmostEqual(common.WarmupMultiStep(opt, (40, 70), warmup=10).factor(0), 0.1)

    def test_ema_recursion_and_copy_back_schedule(self):
        net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        ema = cmnas.EMA(net, 0.9)
        w0 = net[0].weight.detach().clone()
        steps = [w0]
        for k in range(3):
            with torch.no_grad():
                net[0].weight.add_(1.0)
            net(torch.randn(4, 2))                              # moves the running statistics too
            ema.update()
            steps.append(net[0].weight.detach().clone())
        by_hand = w0
        for w in steps[1:]:
            by_hand = 0.9 * by_hand + 0.1 * w
        torch.testing.assert_close(ema.shadow["0.weight"], by_hand)
        self.assertEqual(int(ema.shadow["1.num_batches_tracked"]), 3)
        self.assertFalse(torch.equal(ema.shadow["1.running_mean"], torch.zeros(2)))
        ema.copy_back()
        torch.testing.assert_close(net[0].weight, by_hand)
        # fit copies back after every ema_every epochs, except after the last (the release tests the raw weights)
        for epochs, every, copies in ((5, 2, 2), (4, 2, 1), (3, 1, 2)):
            calls = []
            s = cmnas_settings(network="one-stream", height=32, width=16, P=2, K=2, epochs=epochs, warmup=1,
                               milestones=(), ema_decay=0.5, ema_every=every)
            with tempfile.TemporaryDirectory() as tmp, \
                    mock.patch.object(cmnas.EMA, "copy_back", lambda self: calls.append(1)):
                cmnas.train(s, tiny_trainset(ids=6, per_v=4, per_r=2),
                            common.Run(tmp, "cpu", say=lambda line: None, max_its=1))
            self.assertEqual(len(calls), copies, (epochs, every))
        for bad in (dict(ema_decay=1.0), dict(ema_decay=-0.1), dict(ema_every=0), dict(triplet="x")):
            with self.assertRaises(common.UserError):
                cmnas.check(cmnas_settings(**bad))

    def test_c3mmd_inputs_are_float32_under_bf16_autocast(self):
        model = cmnas.CMNASNet(cmnas_settings(), 5).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f, f_bn = model(torch.randn(4, 3, 32, 16))
        self.assertEqual((f.dtype, f_bn.dtype), (torch.float32, torch.float32))


# ==== methods/ssft.py (TestSSFT*) ====

def ssft_settings(**kw):
    return ssft.Settings(**{**dict(arch="resnet18", pretrained="none", height=32, width=16, P=2, K=2), **kw})


def ssft_features(Nv, Nr, c, seed=0):
    """Random H, P (Nv + Nr, c) and is_r (visible rows first)."""
    g = torch.Generator().manual_seed(seed)
    N = Nv + Nr
    return (torch.randn(N, c, generator=g), torch.randn(N, c, generator=g),
            torch.arange(N) >= Nv)


class TestSSFTEquations(unittest.TestCase):
    def test_eq7_normalised_distance(self):
        a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
        d = ssft.d(a, torch.cat([a, -a]))                            # (3, 6)
        torch.testing.assert_close(d[:, :3].diagonal(), torch.ones(3), atol=1e-5, rtol=0)           # d(a, a) = 1
        torch.testing.assert_close(d[:, 3:].diagonal(), torch.zeros(3), atol=1e-5, rtol=0)          # d(a, -a) = 0
        torch.testing.assert_close(d[1, 2], torch.tensor(1 - 0.5 * math.sqrt(2)))                 # orthogonal
        torch.testing.assert_close(d[:, :3], d[:, :3].t())                                        # symmetric
        self.assertTrue(bool(((d >= -1e-6) & (d <= 1 + 1e-6)).all()))

    def test_eq8_keeps_k_per_row_of_each_block(self):
        H, P, is_r = ssft_features(5, 7, 6)
        A = ssft.affinity(H, P, is_r, 3)
        same = is_r[:, None] == is_r[None, :]
        for i in range(12):
            for block, S in ((same[i], ssft.d(P, P)[i]), (~same[i], ssft.d(H, H)[i])):  # Eq. (6): P intra, H inter
                kept = (A[i] != 0) & block
                self.assertEqual(int(kept.sum()), 3)
                self.assertEqual(set(kept.nonzero().flatten().tolist()),
                                 set(block.nonzero().flatten()[S[block].topk(3).indices].tolist()))
                torch.testing.assert_close(A[i][kept], S[kept])
        # a block narrower than k keeps all of it
        self.assertEqual(int((ssft.affinity(H, P, is_r, 6)[0] != 0)[:5].sum()), 5)

    def test_eq10_hand_computed(self):
        A = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]])        # degrees 2, 2, 1, 2
        Z = torch.tensor([[1.0, 2, 0], [0, 1, 3], [0, -1, -2], [2, 0, 0]])                 # c = 1: [P_v; H; P_r]
        sstn = ssft.SSTN(1, 3, bnneck=True)
        with torch.no_grad():
            sstn.W.weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))                           # Z W = row sums 3, 4, -3, 2
        # D^-1/2 A D^-1/2 Z W: row 0: 3/2 + 4/2 = 3.5; row 1: 4/2 - 3/sqrt(2) < 0 -> ReLU 0; row 2: -3 -> 0;
        # row 3: 3/2 + 2/2 = 2.5
        Z_tilde, _ = sstn(A, Z)
        torch.testing.assert_close(Z_tilde, torch.tensor([[3.5], [0.0], [0.0], [2.5]]))
        A_hat = ssft.normalised_affinity(A)
        self.assertAlmostEqual(float(A_hat[1, 2]), 1 / math.sqrt(2), places=6)
        self.assertAlmostEqual(float(A_hat[3, 0]), 0.5, places=6)

    def test_normalised_affinity_is_its_definition(self):
        A = torch.rand(6, 6) * (torch.rand(6, 6) > 0.4) + torch.eye(6)
        D = torch.diag(A.sum(1))
        torch.testing.assert_close(ssft.normalised_affinity(A),
                                   torch.linalg.inv(D).sqrt() @ A @ torch.linalg.inv(D).sqrt())

    def test_eq5_padding_layout(self):
        H = torch.tensor([[1.0, 2], [3, 4]])
        P = torch.tensor([[5.0, 6], [7, 8]])
        is_r = torch.tensor([False, True])
        torch.testing.assert_close(ssft.pad(H, P, is_r), torch.tensor([[5.0, 6, 1, 2, 0, 0],           # [P^R; H^R; 0]
                                                                             [0, 0, 3, 4, 7, 8]]))  # [0; H^I; P^I]
        torch.testing.assert_close(ssft.pad(H, P, is_r, sht=False), torch.tensor([[5.0, 6, 0, 0, 0, 0],
                                                                                  [0, 0, 0, 0, 7, 8]]))
        torch.testing.assert_close(ssft.pad(H, P, is_r, spt=False), torch.tensor([[0.0, 0, 1, 2, 0, 0],
                                                                                  [0, 0, 3, 4, 0, 0]]))

    def test_eq15_projection_loss(self):
        projection = torch.nn.ModuleDict({m: torch.nn.Linear(2, 2, bias=False) for m in "vr"})
        with torch.no_grad():
            projection["v"].weight.copy_(2 * torch.eye(2))
            projection["r"].weight.copy_(torch.tensor([[0.0, 1], [1, 0]]))
        P = torch.tensor([[1.0, 0], [1, 2]])
        H = torch.tensor([[2.0, 3], [2, 1]])
        # visible: 2 P - H = (0, -3) -> 3; infrared: swap(P) - H = (2, 1) - (2, 1) = 0 -> mean 1.5
        with torch.no_grad():
            self.assertAlmostEqual(float(ssft.L_pa(projection, P, H, torch.tensor([False, True]))), 1.5, places=6)

    def test_eq17_reconstruction_loss(self):
        X = torch.zeros(2, 3, 2, 2)
        X_hat = torch.zeros(2, 3, 2, 2)
        X_hat[0, 0, 0, 0], X_hat[1, 2, 1, 1] = 2.0, -4.0
        self.assertAlmostEqual(float(ssft.L_re(X_hat, X)), (4 + 16) / 24, places=6)

    def test_eq14_modality_loss(self):
        discriminator = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            discriminator.weight.copy_(torch.eye(2))
        H = torch.tensor([[1.0, 0], [0, 2]])                     # logits = H; labels 0 (visible), 1 (infrared)
        expected = 0.5 * (-math.log(math.e / (math.e + 1)) - math.log(math.e ** 2 / (1 + math.e ** 2)))
        with torch.no_grad():
            self.assertAlmostEqual(float(ssft.L_ma(discriminator, H, torch.tensor([False, True]))), expected, places=6)

    def test_triplets_against_loops(self):
        g = torch.Generator().manual_seed(1)
        f_v, f_r = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
        y = torch.tensor([0, 0, 1, 1, 2, 2])
        self.assertAlmostEqual(float(ssft.L_smT(f_v, f_r, y, y, 0.5)),
                               hard_loop(f_v, f_v, y, y, 0.5) + hard_loop(f_r, f_r, y, y, 0.5), places=4)    # Eq. (3)
        self.assertAlmostEqual(float(ssft.L_cmT(f_v, f_r, y, y, 0.5)),
                               hard_loop(f_v, f_r, y, y, 0.5) + hard_loop(f_r, f_v, y, y, 0.5), places=4)    # Eq. (4)
        self.assertAlmostEqual(float(ssft.L_t(f_v, f_r, y, y, 0.5, 0.2)),
                               float(ssft.L_cmT(f_v, f_r, y, y, 0.5) + ssft.L_smT(f_v, f_r, y, y, 0.2)), places=5)


class TestSSFTTest(unittest.TestCase):
    """Test-time SSTN (sparse, chunked) against the dense equations."""

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.model = ssft.build(ssft_settings(), 5).eval()
        with torch.no_grad():                # a BNNeck with non-trivial running statistics
            cls.model.sstn.feat.layer.running_mean.normal_()
            cls.model.sstn.feat.layer.running_var.uniform_(0.5, 2)

    def test_transductive_equals_dense(self):
        c = self.model.c
        H, P, is_r = ssft_features(7, 9, c)
        is_r = is_r[torch.randperm(16)]                      # modalities interleaved
        with torch.no_grad():
            _, T = self.model.sstn(ssft.affinity(H, P, is_r, 4), ssft.pad(H, P, is_r))  # Eq. (6)-(11), dense
            sparse = ssft.sstn_transductive(self.model, H, P, is_r, 4)
            torch.testing.assert_close(sparse, T, atol=1e-5, rtol=1e-4)
            old = ssft.CHUNK_ELEMENTS
            try:
                ssft.CHUNK_ELEMENTS = 40                     # rows in chunks of 2
                torch.testing.assert_close(ssft.sstn_transductive(self.model, H, P, is_r, 4), sparse)
            finally:
                ssft.CHUNK_ELEMENTS = old

    def test_eq22_single_query_equals_dense(self):
        c, k, Ng = self.model.c, 2, 5
        H, P, is_r = ssft_features(Ng, 3, c, seed=3)         # gallery visible (rows 0..4), queries infrared
        Hg, Pg, Hq, Pq = H[:Ng], P[:Ng], H[Ng:], P[Ng:]
        with torch.no_grad():
            dist = ssft.sstn_single_query(self.model, Hq, Pq, is_r[Ng:], Hg, Pg, is_r[:Ng], k)
            for q in range(3):
                # Eq. (22) written out: A = [[k A^{q,q}, T(A^{q,G}, k)], [k A^{G,q}, T(A^{G,G}, k)]]
                A = torch.zeros(Ng + 1, Ng + 1)
                A[0, 0] = k * 1.0                                                     # d(P^q, P^q) = 1
                a_qG = ssft.d(Hq[q:q + 1], Hg)[0]
                top = a_qG.topk(k).indices
                A[0, 1 + top] = a_qG[top]
                A[1:, 0] = k * a_qG                                                   # amplified left column
                A[1:, 1:] = ssft.T(ssft.d(Pg, Pg), k)
                self.assertEqual(int((A[0] != 0).sum()), k + 1)
                self.assertEqual(int((A[1:] != 0).sum(1).min()), k + 1)
                Z = ssft.pad(torch.cat([Hq[q:q + 1], Hg]), torch.cat([Pq[q:q + 1], Pg]),
                             torch.tensor([True] + [False] * Ng))
                _, T = self.model.sstn(A, Z)
                T = torch.nn.functional.normalize(T, dim=1)
                torch.testing.assert_close(dist[q], (T[0] - T[1:]).norm(dim=1), atol=1e-5, rtol=1e-4)
            old = ssft.CHUNK_ELEMENTS
            try:
                ssft.CHUNK_ELEMENTS = Ng * c                 # one query per chunk
                torch.testing.assert_close(
                    ssft.sstn_single_query(self.model, Hq, Pq, is_r[Ng:], Hg, Pg, is_r[:Ng], k), dist)
            finally:
                ssft.CHUNK_ELEMENTS = old

    def test_extract_layout_and_distance(self):
        x = torch.randn(3, 3, 32, 16)
        c = self.model.c
        for m, flag in (("v", 0.0), ("r", 1.0)):
            f = ssft.extract(self.model, x, m)
            self.assertEqual(tuple(f.shape), (3, 2 * c + 1))
            with torch.no_grad():
                out = self.model.encode(**{f"x_{m}": x})
            torch.testing.assert_close(f[:, :c], out["H"])
            torch.testing.assert_close(f[:, c:2 * c], out["P"])
            self.assertTrue(bool((f[:, -1] == flag).all()))
        q, g = ssft.extract(self.model, x, "r"), ssft.extract(self.model, torch.randn(4, 3, 32, 16), "v")
        for mode in ssft.TEST_MODES:
            dist = ssft.distance(self.model, q, g, ssft_settings(ssft_test=mode))
            self.assertEqual(tuple(dist.shape), (3, 4))
            self.assertTrue(bool(torch.isfinite(dist).all()))
        with self.assertRaises(UserError):                    # Eq. (22) needs query and gallery modalities apart
            ssft.distance(self.model, q, q, ssft_settings(ssft_test="single-query"))
        with self.assertRaises(UserError):
            ssft.distance(self.model, q, g, ssft_settings(ssft_test="both"))


class TestSSFTTraining(unittest.TestCase):
    def adversarial_losses(self, model, batch):
        with torch.no_grad():
            out = model(batch["x_v"], batch["x_r"])
            is_r = torch.arange(8) >= 4
            return (float(ssft.L_ma(model.discriminator, out["H"], is_r)),
                    float(ssft.L_pa(model.projection, out["P"], out["H"], is_r)))

    def test_eq20_21_signs(self):
        """One max step lowers L_ma and L_pa, one min step raises them (the network fools the adversaries)."""
        torch.manual_seed(0)
        # the min step sees mostly the adversarial terms: large lambda2, lambda3 and no SSTN or decoder
        s = ssft_settings(shl=False, sht=False, spt=False, re=False, lambda2=50.0, lambda3=50.0)
        model = ssft.build(s, 2).train()
        net_params, adv_params = ssft.split_parameters(model)
        self.assertEqual(len(adv_params), sum(1 for m in model.adversaries() for _ in m.parameters()))
        opt_net = torch.optim.SGD(net_params, lr=1e-3)             # small first-order steps: the signs show
        opt_adv = torch.optim.SGD(adv_params, lr=1e-3)
        batch = random_batch(seed=2)
        ma0, pa0 = self.adversarial_losses(model, batch)
        net_before = [p.detach().clone() for p in net_params]
        ssft.max_step(model, model(batch["x_v"], batch["x_r"]), s, opt_adv)
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(net_before, net_params)))       # Theta_N fixed
        ma1, pa1 = self.adversarial_losses(model, batch)
        self.assertLess(ma1, ma0)
        self.assertLess(pa1, pa0)
        adv_before = [p.detach().clone() for p in adv_params]
        L_min, _ = ssft.objective(model, batch, s)
        L_min.backward(inputs=net_params)
        opt_net.step()
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(adv_before, adv_params)))       # Theta_D, Theta^m fixed
        ma2, pa2 = self.adversarial_losses(model, batch)
        self.assertGreater(ma2, ma1)
        self.assertGreater(pa2, pa1)

    def test_forward_shapes_and_switches(self):
        torch.manual_seed(0)
        model = ssft.build(ssft_settings(), 3).train()
        out = model(random_batch(seed=2)["x_v"], random_batch(seed=2)["x_r"])
        c = model.c
        self.assertEqual(tuple(out["H"].shape), (8, c))
        self.assertEqual(tuple(out["T"].shape), (8, c))
        self.assertEqual(tuple(out["logits_T"].shape), (8, 3))
        self.assertEqual(tuple(out["X_hat"].shape), (8, 3, 32, 16))               # Eq. (16): back to input size
        fc = ssft.build(ssft_settings(aug=False), 3).train()                     # Table 4 'wo aug': FC blocks
        out = fc(random_batch(seed=2)["x_v"], random_batch(seed=2)["x_r"])
        self.assertIsInstance(fc.sstn.feat.layer, torch.nn.Linear)
        self.assertIs(out["H_tri"], out["H"])
        bare = ssft.build(ssft_settings(spl=False, sht=False, spt=False, pa=False, re=False, moa=False), 3)
        self.assertIsNone(bare.sstn)
        self.assertEqual(bare.adversaries(), [])
        self.assertEqual(tuple(ssft.extract(bare.eval(), torch.randn(2, 3, 32, 16), "v").shape), (2, c + 1))
        for bad in (dict(ssft_test="all"), dict(spl=False), dict(height=40), dict(k=0),
                    dict(shl=False, spl=False, sht=False, spt=False, pa=False, re=False)):
            with self.assertRaises(UserError):
                ssft.check(ssft_settings(**bad))


def ce_loop(logits, y):
    """Cross-entropy written out: mean of logsumexp(row) - row[y]."""
    return sum(float(torch.logsumexp(logits[i], 0) - logits[i, y[i]]) for i in range(len(y))) / len(y)


def hard_loop(anchors, candidates, y_a, y_c, margin):
    """Batch-hard triplet term by loops: mean over anchors of max(0, margin + farthest positive - closest negative)."""
    losses = []
    for i in range(len(anchors)):
        dist = [float((anchors[i] - candidates[j]).norm()) for j in range(len(candidates))]
        pos = max(dist[j] for j in range(len(candidates)) if y_c[j] == y_a[i])
        neg = min(dist[j] for j in range(len(candidates)) if y_c[j] != y_a[i])
        losses.append(max(margin + pos - neg, 0.0))
    return sum(losses) / len(losses)


class TestSSFTAdversarialForms(unittest.TestCase):
    """--pa-form scale-free and --ma-form confusion (deviations), and the scale argument against the literal L_pa."""

    def projection(self, c=2, seed=0):
        torch.manual_seed(seed)
        return torch.nn.ModuleDict({m: torch.nn.Linear(c, c, bias=False) for m in "vr"})

    def test_literal_L_pa_scales_with_the_features(self):
        """Eq. (15) is linear in the scale of P and H: the reason its min-max has no bound."""
        projection = self.projection(6)
        P, H, is_r = ssft_features(4, 3, 6)
        with torch.no_grad():
            base = float(ssft.L_pa(projection, P, H, is_r))
            for s in (0.5, 2.0, 4.0):
                self.assertAlmostEqual(float(ssft.L_pa(projection, s * P, s * H, is_r)), s * base, places=4)

    def test_scale_free_L_pa_invariant_to_scale(self):
        projection = self.projection(6)
        P, H, is_r = ssft_features(4, 3, 6, seed=1)
        with torch.no_grad():
            base = float(ssft.L_pa(projection, P, H, is_r, "scale-free"))
            for s in (0.01, 2.0, 4.0, 100.0):
                self.assertAlmostEqual(float(ssft.L_pa(projection, s * P, s * H, is_r, "scale-free")), base, places=5)
                self.assertAlmostEqual(float(ssft.L_pa(projection, s * P, H, is_r, "scale-free")), base, places=5)

    def test_scale_free_L_pa_hand_computed(self):
        projection = self.projection()
        with torch.no_grad():
            projection["v"].weight.copy_(torch.eye(2))
            projection["r"].weight.copy_(torch.tensor([[0.0, 1], [1, 0]]))
        P = torch.tensor([[3.0, 4], [0, 2]])
        H = torch.tensor([[0.0, 5], [7, 0]])
        # visible: P/|P| = (0.6, 0.8), H/|H| = (0, 1): |(0.6, -0.2)| = sqrt(0.4)
        # infrared: swap((0, 1)) = (1, 0) = H/|H|: 0
        with torch.no_grad():
            value = float(ssft.L_pa(projection, P, H, torch.tensor([False, True]), "scale-free"))
        self.assertAlmostEqual(value, math.sqrt(0.4) / 2, places=6)

    def test_confusion_L_ma_hand_computed(self):
        discriminator = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            discriminator.weight.copy_(torch.eye(2))
        H = torch.tensor([[1.0, 0], [0, 2]])                     # logits = H
        # row (1, 0): -1/2 [log(e / (e + 1)) + log(1 / (e + 1))] = log(1 + e) - 1/2; row (0, 2): log(1 + e^2) - 1
        e = math.e
        expected = 0.5 * ((math.log(1 + e) - 0.5) + (math.log(1 + e ** 2) - 1))
        with torch.no_grad():
            self.assertAlmostEqual(float(ssft.L_conf(discriminator, H)), expected, places=6)

    def test_confusion_L_ma_minimum_at_uniform(self):
        identity = torch.nn.Identity()                           # the 'discriminator' returns H as its logits
        values = {}
        for p in (0.01, 0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 0.99):
            logits = torch.tensor([[math.log(p), math.log(1 - p)]])
            values[p] = float(ssft.L_conf(identity, logits))
            self.assertAlmostEqual(values[p], -0.5 * (math.log(p) + math.log(1 - p)), places=5)
        self.assertAlmostEqual(values[0.5], math.log(2), places=6)
        self.assertEqual(min(values, key=values.get), 0.5)
        H = torch.zeros(3, 2, requires_grad=True)                # uniform predictions: a stationary point
        ssft.L_conf(identity, H).backward()
        torch.testing.assert_close(H.grad, torch.zeros(3, 2))

    def test_choices_are_checked(self):
        for bad in (dict(pa_form="normalised"), dict(ma_form="uniform")):
            with self.assertRaises(UserError):
                ssft.check(ssft_settings(**bad))
        self.assertEqual(ssft.CHOICES["pa_form"], ("literal", "scale-free"))
        self.assertEqual(ssft.CHOICES["ma_form"], ("literal", "confusion"))


class TestSSFTWiring(unittest.TestCase):
    """Eq. 1 and Eq. 16 wiring, the Eq. 18-20 composition inside objective, the Sec. 4.1 defaults, the test distance."""

    def test_sec41_defaults(self):
        s = ssft.Settings()
        paper = dict(arch="resnet50", pretrained="imagenet", lr=3.5e-4, epochs=120, milestones=(40, 70), warmup=0,
                     k=4, lambda1=1.0, lambda2=0.2, lambda3=0.2, P=8, K=4, aug=True, ssft_test="transductive",
                     pa_form="literal", ma_form="literal")
        for name, value in paper.items():
            self.assertEqual(getattr(s, name), value, name)
        for switch in ("shl", "spl", "moa", "pa", "re", "sht", "spt"):    # Table 3 row 11: everything on
            self.assertIs(getattr(s, switch), True, switch)
        self.assertEqual(ssft.ERASING, 0.5)                               # BoT's random erasing, Sec. 4.1 (2)

    def test_optimisers_and_logged_norm(self):
        """train() builds Adam for the network and Adam for the adversaries at the Settings' lr and weight decay,
        and every progress line prints ||H||."""
        made = []

        class Recording(torch.optim.Adam):
            def __init__(self, params, **kw):
                super().__init__(params, **kw)
                made.append(self)

        s = ssft_settings(epochs=1, milestones=(), lr=3.5e-4)
        lines = []
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(torch.optim, "Adam", Recording):
            run = common.Run(tmp, "cpu", say=lines.append, max_its=1, log_every=1)
            model = ssft.train(s, tiny_trainset(ids=4, per_v=4, per_r=2), run)
        self.assertEqual(len(made), 2)
        net, adv = ssft.split_parameters(model)
        for opt, params in zip(made, (net, adv)):
            self.assertEqual([id(p) for g in opt.param_groups for p in g["params"]], [id(p) for p in params])
            self.assertEqual(opt.defaults["lr"], 3.5e-4)
            self.assertEqual(opt.defaults["weight_decay"], 5e-4)
            self.assertEqual(opt.defaults["betas"], (0.9, 0.999))
        self.assertTrue(any(" ||H|| " in line for line in lines), lines)

    def test_eq1_parameter_identity(self):
        """Conv1^v, Conv1^r, Conv2^S, Conv2^v, Conv2^r, the feature blocks and heads own disjoint parameters that
        together are the model's; Conv1 = stem + layer1 + layer2, Conv2 = layer3 + layer4 of a ResNet."""
        model = ssft.build(ssft_settings(), 3)
        parts = {"conv1.v": model.conv1["v"], "conv1.r": model.conv1["r"], "conv2_s": model.conv2_s,
                 "conv2.v": model.conv2["v"], "conv2.r": model.conv2["r"], "feat_s": model.feat_s,
                 "feat.v": model.feat["v"], "feat.r": model.feat["r"], "classifier_h": model.classifier_h,
                 "classifier_p.v": model.classifier_p["v"], "classifier_p.r": model.classifier_p["r"],
                 "sstn": model.sstn, "decoder.v": model.decoder["v"], "decoder.r": model.decoder["r"],
                 "discriminator": model.discriminator, "projection.v": model.projection["v"],
                 "projection.r": model.projection["r"]}
        owned = {name: {id(p) for p in m.parameters()} for name, m in parts.items()}
        names = list(owned)
        for i, a in enumerate(names):
            self.assertTrue(owned[a], a)
            for b in names[i + 1:]:
                self.assertFalse(owned[a] & owned[b], f"{a} and {b} share parameters")
        self.assertEqual(set().union(*owned.values()), {id(p) for p in model.parameters()})
        _, adv = ssft.split_parameters(model)
        self.assertEqual({id(p) for p in adv}, owned["discriminator"] | owned["projection.v"] | owned["projection.r"])
        net = common.resnet("resnet18", "none")
        count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())
        stem_to_2 = count([net.conv1, net.bn1, net.layer1, net.layer2])
        for m in "vr":
            self.assertEqual(count([model.conv1[m]]), stem_to_2)
            self.assertEqual(count([model.conv2[m]]), count([net.layer3, net.layer4]))
        self.assertEqual(count([model.conv2_s]), count([net.layer3, net.layer4]))
        with torch.no_grad():                                            # last stride 1: maps at stride 16
            out = model.eval().encode(torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 32))
        self.assertEqual(tuple(out["S"].shape[2:]), (4, 2))
        self.assertEqual(tuple(out["Pmap"].shape[2:]), (4, 2))

    def test_eq1_gradient_paths(self):
        """In eval mode (no BN batch coupling), visible P depends only on Conv1^v, Conv2^v, Feat^v; infrared H only
        on Conv1^r, Conv2^S, Feat^S."""
        model = ssft.build(ssft_settings(), 3).eval()
        b = random_batch(seed=2)

        def reached(select):
            model.zero_grad(set_to_none=True)
            select(model.encode(b["x_v"], b["x_r"])).sum().backward()
            return {name for name, m in (("conv1.v", model.conv1["v"]), ("conv1.r", model.conv1["r"]),
                                         ("conv2_s", model.conv2_s), ("conv2.v", model.conv2["v"]),
                                         ("conv2.r", model.conv2["r"]), ("feat_s", model.feat_s),
                                         ("feat.v", model.feat["v"]), ("feat.r", model.feat["r"]))
                    if any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())}

        self.assertEqual(reached(lambda o: o["P"][:4]), {"conv1.v", "conv2.v", "feat.v"})
        self.assertEqual(reached(lambda o: o["P"][4:]), {"conv1.r", "conv2.r", "feat.r"})
        self.assertEqual(reached(lambda o: o["H"][:4]), {"conv1.v", "conv2_s", "feat_s"})
        self.assertEqual(reached(lambda o: o["H"][4:]), {"conv1.r", "conv2_s", "feat_s"})

    def test_eq16_decoder_wiring(self):
        """X^_m = De^m([P^m; H^m]) on the maps H and P are pooled from: visible rows through De^v, infrared through
        De^r, specific channels first."""
        torch.manual_seed(0)
        model = ssft.build(ssft_settings(), 3).eval()
        b = random_batch(seed=2)
        with torch.no_grad():
            out = model(b["x_v"], b["x_r"])
            enc = model.encode(b["x_v"], b["x_r"])
            torch.testing.assert_close(out["H"], enc["H"])                    # eval mode: the same encoding
            for m, rows in (("v", slice(0, 4)), ("r", slice(4, 8))):
                expected = model.decoder[m](torch.cat([enc["Pmap"][rows], enc["S"][rows]], dim=1))
                torch.testing.assert_close(out["X_hat"][rows], expected)
                other = model.decoder["r" if m == "v" else "v"](torch.cat([enc["Pmap"][rows], enc["S"][rows]], 1))
                swapped = model.decoder[m](torch.cat([enc["S"][rows], enc["Pmap"][rows]], dim=1))
                self.assertFalse(torch.allclose(out["X_hat"][rows], other))
                self.assertFalse(torch.allclose(out["X_hat"][rows], swapped))
            self.assertEqual(out["X_hat"].shape, torch.cat([b["x_v"], b["x_r"]]).shape)

    def min_step_grads(self, s, seed=0):
        """(logs, {param: grad}) of one min step with lr 0 (the parameters stay, the gradients remain)."""
        torch.manual_seed(seed)
        model = ssft.build(s, 2).train()
        net, _ = ssft.split_parameters(model)
        b = random_batch(seed=2)
        L_min, logs = ssft.objective(model, b, s)
        L_min.backward(inputs=net)
        return model, b, logs, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net]

    def test_eq18_20_composition(self):
        """L(H), L(P), L(T) (Eq. 18) recomputed with loops and a written-out cross-entropy; L_min (Eq. 19-20,
        in each form) rebuilt from them has the gradient objective gives; ||H|| is logged, not optimised."""
        for pa_form, ma_form in (("literal", "literal"), ("scale-free", "confusion")):
            s = ssft_settings(pa_form=pa_form, ma_form=ma_form, rho1=0.5, rho2=0.2)
            model, b, logs, grads = self.min_step_grads(s)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            out = model(b["x_v"], b["x_r"])                # same parameters, same batch: the same forward
            y, yv, yr = torch.cat([b["y_v"], b["y_r"]]), b["y_v"], b["y_r"]
            with torch.no_grad():
                H, P, T = out["H_tri"], out["P_tri"], out["T_tri"]
                L_H = ce_loop(out["logits_H"], y) + 0.5 * (hard_loop(H[:4], H[4:], yv, yr, 0.5)
                                                           + hard_loop(H[4:], H[:4], yr, yv, 0.5))
                L_P = (0.5 * (ce_loop(out["logits_P"][0], yv) + ce_loop(out["logits_P"][1], yr))
                       + 0.5 * (hard_loop(P[:4], P[:4], yv, yv, 0.2) + hard_loop(P[4:], P[4:], yr, yr, 0.2)))
                L_T = ce_loop(out["logits_T"], y) + 0.25 * (
                    hard_loop(T[:4], T[4:], yv, yr, 0.5) + hard_loop(T[4:], T[:4], yr, yv, 0.5)
                    + hard_loop(T[:4], T[:4], yv, yv, 0.2) + hard_loop(T[4:], T[4:], yr, yr, 0.2))
            for name, value in (("L(H)", L_H), ("L(P)", L_P), ("L(T)", L_T)):
                self.assertAlmostEqual(float(logs[name]), value, places=4, msg=name)
            self.assertAlmostEqual(float(logs["||H||"]), float(out["H"].detach().norm(dim=1).mean()), places=4)
            # L_min from the logged (now verified) terms and the weights of Eq. (20), differentiated again
            Hf, Pf = out["H"], out["P"]
            x = torch.cat([b["x_v"], b["x_r"]])
            L_re = ((out["X_hat"] - x) ** 2).mean()
            p = torch.softmax(model.discriminator(Hf), dim=1)                              # (8, 2)
            if ma_form == "literal":
                adversarial_ma = -0.2 * -torch.log(torch.cat([p[:4, 0], p[4:, 1]])).mean()
            else:
                adversarial_ma = 0.2 * -0.5 * torch.log(p).sum(1).mean()
            if pa_form == "scale-free":
                Pf, Hf = Pf / Pf.norm(dim=1, keepdim=True), Hf / Hf.norm(dim=1, keepdim=True)
            proj = torch.cat([Pf[:4] @ model.projection["v"].weight.t(), Pf[4:] @ model.projection["r"].weight.t()])
            L_pa = (proj - Hf).norm(dim=1).mean()
            feat = (ssft.L_c(out["logits_H"], y) + 0.5 * ssft.L_cmT(H[:4], H[4:], yv, yr, 0.5)
                    + 0.5 * (ssft.L_c(out["logits_P"][0], yv) + ssft.L_c(out["logits_P"][1], yr))
                    + 0.5 * ssft.L_smT(P[:4], P[4:], yv, yr, 0.2)
                    + ssft.L_c(out["logits_T"], y) + 0.25 * ssft.L_t(T[:4], T[4:], yv, yr, 0.5, 0.2))
            self.assertAlmostEqual(float(feat.detach()), L_H + L_P + L_T, places=4)        # Eq. (19)
            L_min = feat + 1.0 * L_re + adversarial_ma - 0.2 * L_pa                        # Eq. (20)
            net, _ = ssft.split_parameters(model)
            reference = torch.autograd.grad(L_min, net, allow_unused=True)
            for g, r in zip(grads, reference):
                torch.testing.assert_close(g, r if r is not None else torch.zeros_like(g),
                                           atol=1e-5, rtol=1e-4)

    def test_distance_label_free_and_order_invariant(self):
        """distance sees only [H | P | m] rows (no labels, no cameras), and permuting the queries and the gallery
        permutes its result the same way."""
        self.assertEqual(list(inspect.signature(ssft.distance).parameters),
                         ["model", "q_feat", "g_feat", "settings"])
        torch.manual_seed(0)
        model = ssft.build(ssft_settings(), 5).eval()
        with torch.no_grad():
            q = ssft.extract(model, torch.randn(7, 3, 32, 16), "r")
            g = ssft.extract(model, torch.randn(9, 3, 32, 16), "v")
        self.assertEqual(q.shape[1], 2 * model.c + 1)
        pq, pg = torch.randperm(7), torch.randperm(9)
        for mode in ssft.TEST_MODES:
            s = ssft_settings(ssft_test=mode)
            dist = ssft.distance(model, q, g, s)
            permuted = ssft.distance(model, q[pq], g[pg], s)
            # to float32 rounding: with more than one thread the BLAS sums in another order for another row order
            # (measured: up to 1e-6 on distances of about 0.25 in single-query mode, 0 transductive)
            torch.testing.assert_close(permuted, dist[pq][:, pg], rtol=1e-5, atol=1e-5, msg=mode)
            self.assertTrue(torch.equal(permuted.argsort(1), dist[pq][:, pg].argsort(1)), mode)   # same ranking

    def test_distance_eval_mode_and_H_fallback(self):
        """distance puts the model in eval mode (BN running statistics); without SSTN (Table 3 rows 1-5) it is the
        Euclidean distance of the L2-normalised H."""
        torch.manual_seed(0)
        model = ssft.build(ssft_settings(), 5)
        with torch.no_grad():
            model.sstn.feat.layer.running_mean.normal_()
            q = ssft.extract(model.eval(), torch.randn(3, 3, 32, 16), "r")
            g = ssft.extract(model, torch.randn(4, 3, 32, 16), "v")
        expected = ssft.distance(model, q, g, ssft_settings())
        model.train()
        torch.testing.assert_close(ssft.distance(model, q, g, ssft_settings()), expected)
        self.assertFalse(model.training)
        bare_s = ssft_settings(sht=False, spt=False)
        bare = ssft.build(bare_s, 5).eval()
        with torch.no_grad():
            q = ssft.extract(bare, torch.randn(3, 3, 32, 16), "r")
            g = ssft.extract(bare, torch.randn(4, 3, 32, 16), "v")
        c = bare.c
        Hq, Hg = q[:, :c] / q[:, :c].norm(dim=1, keepdim=True), g[:, :c] / g[:, :c].norm(dim=1, keepdim=True)
        expected = torch.tensor([[float((Hq[i] - Hg[j]).norm()) for j in range(4)] for i in range(3)])
        torch.testing.assert_close(ssft.distance(bare, q, g, bare_s), expected, atol=1e-5, rtol=0)

    def test_single_query_chunk_from_free_memory(self):
        cpu = torch.device("cpu")
        self.assertEqual(ssft.single_query_chunk(3010, 2048, cpu), 2)      # SYSU-MM01 multi-shot size on CPU
        cuda = torch.device("cuda")
        with mock.patch.object(torch.cuda, "mem_get_info", return_value=(100 * 2 ** 30, 140 * 2 ** 30)):
            # half of 100 GiB over 4 float32 blocks of 3010 x 2048 x n elements: n = 544
            self.assertEqual(ssft.single_query_chunk(3010, 2048, cuda), 50 * 2 ** 30 // (4 * 4 * 3010 * 2048))
        with mock.patch.object(torch.cuda, "mem_get_info", return_value=(2 ** 20, 140 * 2 ** 30)):
            self.assertEqual(ssft.single_query_chunk(3010, 2048, cuda), 2)  # never below the CPU bound


class TestSSFTSmoke(unittest.TestCase):
    def reid(self, *flags):
        done = run_reid("--method", "ssft", "--smoke", *flags, timeout=300)
        self.assertEqual(done.returncode, 0, done.stdout[-2000:] + done.stderr[-2000:])
        return done.stdout

    def test_transductive_then_single_query(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "train")
            stdout = self.reid("--out", out)                                     # transductive test (default)
            for term in ("L_max", "L(H)", "L(P)", "L(T)", "L_re", "L_ma", "L_pa", "||H||"):
                self.assertIn(f" {term} ", stdout)
            self.assertTrue(os.path.isfile(os.path.join(out, "reconstruction.png")))
            # the same model through the single-query path (Eq. 22): a test-time flag given with --eval-only wins
            # over the checkpoint's settings, and the log says so
            sq = os.path.join(tmp, "single-query")
            stdout = self.reid("--eval-only", "--checkpoint", os.path.join(out, "model.pt"),
                               "--ssft-test", "single-query", "--out", sq)
            self.assertIn('evaluating with settings other than the training run\'s: {"ssft_test": "single-query"}',
                          stdout)
            for run, mode in ((out, "transductive"), (sq, "single-query")):
                saved = json.load(open(os.path.join(run, "results.json")))
                self.assertEqual(saved["settings"]["ssft_test"], mode)
                self.assertIn("rank1", saved["results"]["all-single"])


# ==== methods/rfm.py (TestRFM*) ====

class RecordingLTG(rfm.LTG):
    """The LTG, recording the rectangles and f_g draws it makes, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn = []

    def rectangle(self, rng, H, W):
        self.drawn.append(super().rectangle(rng, H, W))
        return self.drawn[-1]

    def draw_f_g(self, rng, n):
        self.drawn.append(super().draw_f_g(rng, n))
        return self.drawn[-1]


def alg1_restated(I, steps, t_min):
    """Alg. 1's loop, channel by channel in float64, replaying given (rectangle, f_g draws) steps."""
    I = I.double().clone()
    M = torch.ones_like(I)
    used = 0
    for (y, x, h, w), f in steps:
        used += 1
        for c in range(I.shape[0]):
            peak = I[c, y:y + h, x:x + w].max().item()
            alpha = f[c] / peak if peak > 0 else 1.0
            I[c, y:y + h, x:x + w] *= alpha
            M[c, y:y + h, x:x + w] *= alpha
        if M.min() <= t_min:
            break
    return I, M, used


def rfm_features(B=8, n_ids=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_ids).repeat_interleave(B // n_ids)
    return torch.randn(B, d, generator=g), y, torch.randn(B, d, generator=g), y[torch.randperm(B, generator=g)]


class TestRFMLTG(unittest.TestCase):
    def images(self, n=12, H=32, W=16):
        x = torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
        x[0] *= 0.3                       # an image whose maximum is far below 1
        x[1, :, :12] = 0                  # black rows (like the crop padding): all-zero rectangles keep alpha = 1
        return x

    def test_range_and_memory_matrix(self):
        x = self.images()
        ltg = rfm.LTG(p=1.0)
        I, M, rects = ltg.transform(x, np.random.default_rng(0))
        self.assertTrue(bool(((I >= 0) & (I <= 1)).all()))          # alpha_max = 1 / max keeps I* <= 1
        nonzero = x > 0
        torch.testing.assert_close(I[nonzero] / x[nonzero], M[nonzero], rtol=1e-5, atol=0)
        done = M.flatten(1).amin(1) <= ltg.t_min
        self.assertTrue(bool((done | (rects == ltg.max_rects)).all()))
        self.assertTrue(bool((rects >= 1).all()))
        self.assertTrue(bool(torch.equal(x, self.images())))       # the input batch is not modified

    def test_matches_alg1_restated(self):
        x = self.images()
        for f_g in rfm.F_G:
            ltg = RecordingLTG(p=0.7, f_g=f_g, max_rects=30)
            I, M, rects = ltg.transform(x, np.random.default_rng(3))
            steps = list(zip(ltg.drawn[0::2], ltg.drawn[1::2]))
            for i in range(len(x)):
                mine, steps = steps[:rects[i]], steps[rects[i]:]
                I_ref, M_ref, used = alg1_restated(x[i], mine, ltg.t_min)
                self.assertEqual(used, rects[i].item())
                torch.testing.assert_close(I[i].double(), I_ref, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(M[i].double(), M_ref, rtol=1e-4, atol=1e-12)
            self.assertEqual(steps, [])

    def test_p_zero_is_identity(self):
        x = self.images()
        I, M, rects = rfm.LTG(p=0.0).transform(x, np.random.default_rng(0))
        self.assertTrue(bool(torch.equal(I, x)) and bool((M == 1).all()) and int(rects.sum()) == 0)

    def test_bound_on_rectangles(self):
        # t_min = 0 is never reached with uniform factors: Alg. 1 would loop forever, the bound stops it
        ltg = rfm.LTG(p=1.0, f_g="uniform", t_min=0.0, max_rects=7)
        _, _, rects = ltg.transform(self.images(), np.random.default_rng(0))
        self.assertTrue(bool((rects == 7).all()))

    def test_constant_is_one_black_rectangle(self):
        x = self.images()[2:]
        I, _, rects = rfm.LTG(p=1.0, f_g="constant").transform(x, np.random.default_rng(0))
        self.assertTrue(bool((rects == 1).all()))
        for image in I:
            black = (image == 0).all(0)
            rows, cols = black.any(1).nonzero()[:, 0], black.any(0).nonzero()[:, 0]
            box = black[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            self.assertTrue(bool(box.all()) and int(black.sum()) == box.numel())    # one rectangle
            self.assertTrue(0.01 * 32 * 16 <= box.numel() <= 0.5 * 32 * 16)

    def test_rectangles_inside_with_the_drawn_area_and_aspect(self):
        ltg = rfm.LTG()
        rng = np.random.default_rng(0)
        for _ in range(300):
            y, x, h, w = ltg.rectangle(rng, 128, 64)
            self.assertTrue(0 <= y and y + h <= 128 and 0 <= x and x + w <= 64)
            self.assertTrue(0.015 * 128 * 64 <= h * w <= 0.42 * 128 * 64)
            self.assertTrue(0.25 <= h / w <= 3.8)

    def test_factors_follow_f_g(self):
        # one rectangle on white images: inside, each channel is its draw of f_g (alpha_max = 1)
        x = torch.ones(2000, 3, 8, 8)
        cdf = {"uniform": lambda t: t, "beta0.5": lambda t: 2 / np.pi * np.arcsin(np.sqrt(t))}
        var = {"uniform": 1 / 12, "beta0.5": 1 / 8, "beta0.3": 1 / (4 * 1.6)}       # Beta(a, a): 1 / (4 (2a + 1))
        for f_g in var:
            ltg = rfm.LTG(p=1.0, f_g=f_g, t_min=0.0, max_rects=1)
            I, _, _ = ltg.transform(x, np.random.default_rng(0))
            f = np.sort(I.flatten(2).amin(2).flatten().double().numpy())           # (6000,) the draws
            self.assertAlmostEqual(f.mean(), 0.5, delta=0.02)
            self.assertAlmostEqual(f.var(), var[f_g], delta=0.006)
            if f_g in cdf:                                                          # Kolmogorov-Smirnov distance
                ks = np.abs(cdf[f_g](f) - np.arange(1, len(f) + 1) / len(f)).max()
                self.assertLess(ks, 0.03)

    def test_hook_changes_both_modalities_and_is_deterministic(self):
        ltg = rfm.LTG(p=1.0)
        batch = {"x_v": self.images(4), "x_r": self.images(4) * 0.5, "y_v": torch.arange(4),
                 "y_r": torch.arange(4)}
        a = ltg(batch, torch.Generator().manual_seed(5))
        b = ltg(batch, torch.Generator().manual_seed(5))
        for k in ("x_v", "x_r"):
            self.assertEqual(a[k].shape, batch[k].shape)
            self.assertFalse(bool(torch.equal(a[k], batch[k])))
            self.assertTrue(bool(torch.equal(a[k], b[k])))

    def test_bad_settings(self):
        for kwargs in (dict(f_g="beta"), dict(ltg_area=(0.5, 0.1)), dict(ltg_area=(0.95, 1.0), ltg_aspect=(8.0, 9.0)),
                       dict(ltg_p=1.5), dict(ltg_max_rects=0)):
            settings = rfm.Settings(**{**rfm.SMOKE, "height": 32, "width": 16, **kwargs})
            with self.assertRaises(UserError):
                rfm.check(settings)
            rfm.check(rfm.Settings(**{**rfm.SMOKE, "height": 32, "width": 16, **kwargs, "ltg": False}))


class TestRFMLosses(unittest.TestCase):
    def test_L_tri_hard_against_loop(self):
        f, y, _, _ = rfm_features(B=12, n_ids=4)
        total = 0.0
        for i in range(len(y)):
            d = [float((f[i] - f[j]).norm()) for j in range(len(y))]
            d_ap = max(d[j] for j in range(len(y)) if y[j] == y[i])
            d_an = min(d[j] for j in range(len(y)) if y[j] != y[i])
            total += max(0.0, d_ap - d_an + 0.3)
        self.assertAlmostEqual(rfm.L_tri_hard(f, y, 0.3).item(), total / len(y), places=4)

    def test_L_c_and_L_cc_against_loop(self):
        f_v, y_v, f_n, y_n = rfm_features()
        f, y = torch.cat([f_v, f_n]), torch.cat([y_v, y_n])
        centre = {k: f[y == k].mean(0) for k in y.unique().tolist()}
        L_c = 0.5 * sum(float((f[i] - centre[int(y[i])]).norm()) for i in range(len(y))) / len(y)
        self.assertAlmostEqual(rfm.L_c(f, y).item(), L_c, places=5)                     # Eq. (5)
        c_v = {k: f_v[y_v == k].mean(0) for k in y_v.unique().tolist()}
        c_n = {k: f_n[y_n == k].mean(0) for k in y_n.unique().tolist()}
        L_cc = 0.5 * (sum(float((f_v[i] - c_n[int(y_v[i])]).norm()) for i in range(len(y_v)))     # to the NIR centre
                      + sum(float((f_n[i] - c_v[int(y_n[i])]).norm()) for i in range(len(y_n))))  # to the VIS centre
        self.assertAlmostEqual(rfm.L_cc(f_v, y_v, f_n, y_n).item(), L_cc / len(y), places=5)    # Eq. (6)
        # release cross_center_loss.py:13,33-36: per class, MSELoss(sum) of each of its 2 x feat_num samples to the
        # other modality's centre, averaged over the samples of the class, then over the classes
        per_class = []
        for k in c_v:
            sq = [float((f_v[i] - c_n[k]).pow(2).sum()) for i in range(len(y_v)) if y_v[i] == k] \
                + [float((f_n[i] - c_v[k]).pow(2).sum()) for i in range(len(y_n)) if y_n[i] == k]
            per_class.append(sum(sq) / len(sq))
        self.assertAlmostEqual(rfm.L_cc(f_v, y_v, f_n, y_n, "squared-unit").item(),
                               sum(per_class) / len(per_class), places=4)
        L_hc = sum(float((c_v[k] - c_n[k]).pow(2).sum()) for k in c_v)
        self.assertAlmostEqual(rfm.L_hc(f_v, y_v, f_n, y_n).item(), L_hc, places=4)

    def test_L_cc_needs_both_modalities(self):
        f_v, y_v, f_n, y_n = rfm_features()
        with self.assertRaises(ValueError):
            rfm.L_cc(f_v, y_v, f_n, torch.zeros_like(y_n))

    def test_centre_losses_have_gradients(self):
        f_v, y_v, f_n, y_n = rfm_features()
        f = torch.cat([f_v, f_n]).requires_grad_()
        for kind in ("cross", "center", "hetero"):
            f.grad = None
            rfm.center_term(kind, f, y_v, y_n).backward()
            self.assertTrue(bool(torch.isfinite(f.grad).all()) and f.grad.abs().sum() > 0)


class TestRFMModel(unittest.TestCase):
    def settings(self, **kw):
        return rfm.Settings(**{**rfm.SYNTHETIC, "height": 64, "width": 32, "parts": 4, "part_dim": 16, **kw})

    def test_mam_attention_and_parts(self):
        torch.manual_seed(0)
        model = rfm.build(self.settings(), 10).eval()
        x = torch.randn(3, 3, 64, 32)
        with torch.no_grad():
            F_m = model.backbone(x)
            for modality in ("v", "r"):
                A, high = model.attend(F_m, modality)
                self.assertEqual(A.shape, (3, 1) + F_m.shape[2:])                 # Eq. (7): spatial size of F
                self.assertTrue(bool(((A > 0) & (A < 1)).all()))
                torch.testing.assert_close(A, torch.sigmoid(high.mean(1, keepdim=True)))
            self.assertEqual(len(model.part_features(F_m)), 4)
            f, logits, high = model(x, x)
            self.assertEqual((len(f), f[0].shape, logits[0].shape, high[0].shape), (4, (6, 16), (6, 10), (3, 10)))
            e = rfm.extract(model, x, "v")
            self.assertEqual(e.shape, (3, 64))
            torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
            fc, bn = model.reduce[0]                                                 # part 1: FC, then BN
            V_1 = torch.nn.functional.adaptive_avg_pool2d(F_m * model.attend(F_m, "v")[0], (4, 1))[:, :, 0, 0]
            bn_f_1 = (fc(V_1) - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias
            torch.testing.assert_close(e[:, :16] * 2, torch.nn.functional.normalize(bn_f_1, dim=1))
            torch.testing.assert_close(f[0].norm(dim=1), torch.ones(6))            # metric losses see unit m_k
            model.f_n[0].conv1.weight.mul_(2)                                        # the NIR branch is its own
            self.assertFalse(bool(torch.allclose(rfm.extract(model, x, "r"), e)))

    def test_part_pooling_is_stripes(self):
        model = rfm.build(self.settings(), 10).eval()
        F_att = torch.randn(2, model.reduce[0][0].in_features, 4, 2)
        with torch.no_grad():
            h = model.part_features(F_att)
            torch.testing.assert_close(h[2], model.reduce[2](F_att[:, :, 2].mean(-1)))       # part 3 = row 3 averaged

    def test_other_attentions(self):
        x = torch.randn(2, 3, 64, 32)
        for attention in ("spatial", "none"):
            model = rfm.build(self.settings(attention=attention), 10).eval()
            f, logits, high = model(x, x)
            self.assertIsNone(high)
            self.assertFalse(hasattr(model, "f_v"))
            A, _ = model.attend(model.backbone(x), "v")
            self.assertTrue(bool(((A > 0) & (A <= 1)).all()))

    def test_objective_for_every_ablation(self):
        y = torch.arange(2).repeat_interleave(2)
        batch = {"x_v": torch.randn(4, 3, 32, 16), "x_r": torch.randn(4, 3, 32, 16), "y_v": y, "y_r": y}
        names = {"cross": "L_cc", "center": "L_c", "hetero": "L_hc", "none": None}
        for center, attention in [(c, "mam") for c in rfm.CENTERS] + [("cross", "spatial"), ("none", "none")]:
            settings = self.settings(center=center, attention=attention, height=32, width=16, parts=2)
            model = rfm.build(settings, 5)
            loss, terms = rfm.objective(model, batch, settings)
            expected = {"L_id", "L_tri"} | ({names[center]} if names[center] else set()) \
                | ({"L_id^v", "L_id^n"} if attention == "mam" else set())
            self.assertEqual(set(terms), expected)
            lam = {k: settings.lam if k == names[center] else 1.0 for k in terms}
            self.assertAlmostEqual(loss.item(), sum(lam[k] * v.item() for k, v in terms.items()), places=3)
            loss.backward()

    def test_pcb_on_layer4(self):
        """--pcb-map stage4 (finding 6): Table II's baseline as PCB [29], the stripes cut from a shared layer4 (last
        stride 1) on F; parameters = the stage-3 baseline + one layer4 + the wider FC of each part head."""
        x = torch.randn(2, 3, 64, 32)
        count = lambda m: sum(p.numel() for p in m.parameters())
        base = rfm.build(self.settings(attention="none"), 10).eval()
        pcb = rfm.build(self.settings(attention="none", pcb_map="stage4"), 10).eval()
        layer4 = common.stages(common.resnet("resnet18", "none", last_stride=1))[3]
        self.assertEqual(count(pcb) - count(base), count(layer4) + 4 * (512 - 256) * 16)   # resnet18: C3 256, C4 512
        with torch.no_grad():
            F_m = pcb.backbone(x)
            h = pcb.part_features(F_m)
            map4 = pcb.f_S(F_m)
            self.assertEqual(map4.shape[2:], F_m.shape[2:])                                  # stride 1
            torch.testing.assert_close(h[1], pcb.reduce[1](map4[:, :, 1].mean(-1)))        # part 2 = row 2 of layer4
        with self.assertRaises(UserError):
            rfm.check(self.settings(pcb_map="stage4"))                                        # with MAM: refused

    def test_bad_settings(self):
        for kw in (dict(center="hc"), dict(attention="cbam"), dict(parts=5), dict(parts=0), dict(pcb_map="layer5")):
            with self.assertRaises(UserError):
                rfm.check(self.settings(**kw))


def pattern_world(n_ids=6, n=4, seed=0, noise_seed=None):
    """A tiny two-modality world: each identity a smooth random 3x32x16 pattern; visible = pattern + noise,
    infrared = its grey level + noise. -> x_v, x_r (n_ids * n, 3, 32, 16), y (n_ids * n,). The patterns come
    from `seed`; the noise too, or from `noise_seed` (the same identities seen again with new noise)."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.nn.functional.interpolate(torch.rand(n_ids, 3, 8, 4, generator=g), size=(32, 16))
    if noise_seed is not None:
        g = torch.Generator().manual_seed(10_000 + noise_seed)
    y = torch.arange(n_ids).repeat_interleave(n)
    x_v = pattern[y] + 0.1 * torch.randn(len(y), 3, 32, 16, generator=g)
    x_r = pattern[y].mean(1, keepdim=True).expand(-1, 3, -1, -1) + 0.1 * torch.randn(len(y), 3, 32, 16,
                                                                                             generator=g)
    return x_v, x_r, y


class TestRFMCollapse(unittest.TestCase):
    def test_short_training_separates_identities(self):
        """Finding 1 of the review: with L_tri and L_cc on the raw FC output and lambda = 3 the part features
        collapse towards one point. On the release's placement (unit BN output) 30 steps on a tiny world of six
        identities (new noise each step) make same-identity part features far closer than other-identity ones,
        and the features stay spread. With the losses put back on the raw FC output both assertions fail
        (checked by hand: same / other 0.17 and 0.13, other / norm 0.076 and 0.070 for the two parts; here
        0.016 / 0.017 and 1.53 / 1.54)."""
        torch.manual_seed(0)
        settings = rfm.Settings(**{**rfm.SYNTHETIC, "height": 32, "width": 16, "parts": 2, "part_dim": 16})
        model = rfm.build(settings, 6)
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=5e-4)
        for it in range(30):
            x_v, x_r, y = pattern_world(noise_seed=it + 1)
            loss, terms = rfm.objective(model, {"x_v": x_v, "x_r": x_r, "y_v": y, "y_r": y}, settings)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x_v, x_r, y = pattern_world(noise_seed=1000)                   # batch statistics, as the losses see
        with torch.no_grad():
            f, _, _ = model(x_v, x_r)
        y2 = torch.cat([y, y])
        same = (y2[:, None] == y2[None, :]) & ~torch.eye(len(y2), dtype=bool)
        other = y2[:, None] != y2[None, :]
        for f_k in f:
            d = torch.cdist(f_k, f_k)
            self.assertLess(float(d[same].mean()), 0.1 * float(d[other].mean()))
            self.assertGreater(float(d[other].mean()), 0.5 * float(f_k.norm(dim=1).mean()))   # not a point


class TestRFMAlarm(unittest.TestCase):
    def run_epoch(self, features, losses):
        lines = []
        run = common.Run(tempfile.mkdtemp(), "cpu", say=lines.append, log_every=1000)
        run._phase, run._num_epochs, run._its, run._timer = "train", 1, len(losses), {"start": 0.0, "wait": 0.0,
                                                                                      "images": 0}
        for it, (feature, loss) in enumerate(zip(features, losses)):
            run.watch("L_tri on part 1 m_k", feature, loss=loss, margin=0.3)
            run.log(0, it, {"L": loss}, 0.1)
        return [line for line in lines if "WARNING" in line]

    def test_collapsing_configuration_warns(self):
        """A deliberately collapsed configuration: the end state the review measured (finding 1), an FC part head
        whose weight has shrunk to almost nothing, so every part feature is its bias plus a trace of the input
        and batch-hard L_tri sits at its margin. The alarm must name the loss and the feature; both checks fire."""
        torch.manual_seed(0)
        fc = torch.nn.Linear(20, 16)
        with torch.no_grad():
            fc.weight.mul_(1e-3)
        y = torch.arange(6).repeat_interleave(4)
        features, losses = [], []
        for it in range(20):
            f = fc(torch.randn(24, 20)).detach()
            features.append(f)
            losses.append(rfm.L_tri_hard(f, y, 0.3))
        warnings = self.run_epoch(features, losses)
        self.assertEqual(len(warnings), 2, warnings)
        self.assertTrue(all("L_tri on part 1 m_k" in w for w in warnings))
        self.assertIn("margin", warnings[0])
        self.assertIn("pairwise distance", warnings[1])

    def test_healthy_features_are_quiet(self):
        g = torch.Generator().manual_seed(0)
        features = [torch.randn(24, 16, generator=g) for _ in range(10)]
        self.assertEqual(self.run_epoch(features, [torch.tensor(0.1)] * 10), [])
        self.assertEqual(len(self.run_epoch([torch.ones(24, 16)] * 10, [torch.tensor(0.31)] * 10)), 2)


class TestRFMSmoke(unittest.TestCase):
    def run_smoke(self, *flags):
        with tempfile.TemporaryDirectory() as out:
            done = run_reid("--method", "rfm", "--smoke", "--out", out, *flags, timeout=300)
            self.assertEqual(done.returncode, 0, done.stdout[-2000:] + done.stderr[-2000:])
            results = json.load(open(f"{out}/results.json"))["results"]
            self.assertIn("rank1", results["all-single"])
            return done.stdout, sorted(p.name for p in Path(out).iterdir())

    def test_default(self):
        stdout, files = self.run_smoke()
        for term in ("L_id", "L_tri", "L_cc", "L_id^v", "L_id^n"):
            self.assertIn(f" {term} ", stdout)
        self.assertTrue({"ltg.png", "attention.png", "model.pt"} <= set(files))

    def test_ablations(self):
        stdout, files = self.run_smoke("--ltg", "false", "--center", "hetero", "--attention", "spatial")
        self.assertIn(" L_hc ", stdout)
        self.assertNotIn("L_id^v", stdout)
        self.assertIn("attention.png", files)


# ==== methods/mce.py (TestMCE*) ====

def memory_spies():
    """(seen_W, seen_C, spy_L_W, spy_L_MI): stand-ins for mce.L_W and mce.L_MI that record a copy of the memories
    W and the historical centroids C of every call, then compute the real loss."""
    seen_W, seen_C = [], []
    real_L_W, real_L_MI = mce.L_W, mce.L_MI

    def spy_L_W(f, y, W, tau):
        seen_W.append({m: w.clone() for m, w in W.items()})
        return real_L_W(f, y, W, tau)

    def spy_L_MI(f, C, tau, form="paper"):
        seen_C.append({m: c.clone() for m, c in C.items()})
        return real_L_MI(f, C, tau, form)
    return seen_W, seen_C, spy_L_W, spy_L_MI


def mce_settings(**kw):
    return mce.Settings(**{**mce.SMOKE, "height": 32, "width": 16, "P": 2, "K": 2, **kw})


class TestMCEShared(unittest.TestCase):
    def test_channel_exchange(self):
        x = torch.rand(64, 3, 4, 2)
        a = mce.channel_exchange(x, torch.Generator().manual_seed(0))
        seen = set()
        for i in range(64):
            c = [k for k in range(3) if torch.equal(x[i, k], a[i, 0])]
            self.assertEqual(len(c), 1)
            self.assertTrue(torch.equal(a[i, 1], a[i, 0]) and torch.equal(a[i, 2], a[i, 0]))
            seen.add(c[0])
        self.assertEqual(seen, {0, 1, 2})

    def test_auxiliary_batches(self):
        """The Augment hook adds 'x_a': one channel of the (cropped, flipped) visible image in all three."""
        augment = data.Augment(32, 16, erasing=0.0, extra=mce.add_auxiliary)
        batch = next(data.train_loader(tiny_trainset(ids=3, per_v=4, per_r=4), 2, 2, 0, augment).epoch(0))
        mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
        x_v, x_a = batch["x_v"] * std + mean, batch["x_a"] * std + mean                  # back to [0, 1]
        for i in range(len(x_a)):
            self.assertTrue(torch.allclose(x_a[i, 1], x_a[i, 0], atol=1e-5))
            self.assertTrue(torch.allclose(x_a[i, 2], x_a[i, 0], atol=1e-5))
            self.assertTrue(any(torch.allclose(x_a[i, 0], x_v[i, c], atol=1e-5) for c in range(3)))

    def test_bad_choices(self):
        with self.assertRaises(common.UserError):
            mce.check(mce_settings(objective="W+GC"))
        with self.assertRaises(common.UserError):
            mce.check(mce_settings(centroids="old"))
        for name in ("mi_form", "agnostic_update", "agnostic_centroid", "gc_negatives", "sampler", "non_local_inner"):
            with self.assertRaises(common.UserError):
                mce.check(mce_settings(**{name: "nonsense"}))

    def test_release_recipe(self):
        """RELEASE and RELEASE_REGDB name Settings fields; the release backbone's 1-channel non-local blocks."""
        fields = set(dataclasses.asdict(mce.Settings()))
        self.assertEqual(set(mce.RELEASE) - fields, set())
        self.assertEqual(set(mce.RELEASE_REGDB) - fields, set())
        s = mce.Settings(**{**dataclasses.asdict(mce.Settings()), **mce.RELEASE, "arch": "resnet18",
                            "pretrained": "none"})
        mce.check(s)
        blocks = [m for m in mce.build(s, 3).modules() if isinstance(m, mce.NonLocal)]
        self.assertEqual({b.theta.out_channels for b in blocks}, {1})


class TestMCELosses(unittest.TestCase):
    def test_eq2_is_log_softmax(self):
        g = torch.Generator().manual_seed(0)
        f = F.normalize(torch.randn(5, 4, generator=g), dim=1)
        W = F.normalize(torch.randn(3, 4, generator=g), dim=1)
        y = torch.tensor([0, 2, 1, 1, 0])
        tau = 0.05
        expected = 0.0
        for i in range(5):
            s = [sum(f[i, j].item() * W[k, j].item() for j in range(4)) / tau for k in range(3)]
            expected -= math.log(math.exp(s[y[i]]) / sum(math.exp(v) for v in s)) / 5
        self.assertAlmostEqual(mce.L_m(f, y, W, tau).item(), expected, places=4)

    def test_eq7_hand_case(self):
        # tau = 0.5: logits f^m C^m / tau = (2, 0), f^m C^n / tau = (0, 2); log p - log q = (-2, +2), so
        # KL(p || q) = 2 (p_1 - p_0) = 2 (e^2 - 1) / (e^2 + 1) = 2 tanh(1), and the same for f^n
        f_m = torch.tensor([[1.0, 0.0]], requires_grad=True)
        f_n = torch.tensor([[0.0, 1.0]])
        C_m, C_n = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        loss = mce.L_MI_mn(f_m, f_n, C_m, C_n, 0.5)                      # one row per sample: (2,)
        self.assertEqual(tuple(loss.shape), (2,))
        self.assertAlmostEqual(loss.sum().item(), 4 * math.tanh(1.0), places=5)
        loss.sum().backward()
        # the cross-modality response is a fixed target: d KL(p || softmax(z)) / dz = softmax(z) - p, z = f C^T / tau
        t = math.tanh(1.0)
        self.assertTrue(torch.allclose(f_m.grad, torch.tensor([[2 * t, -2 * t]]), atol=1e-5))
        self.assertAlmostEqual(mce.L_MI_mn(f_m, f_n, C_m, C_m, 0.5).sum().item(), 0.0, places=6)

    @staticmethod
    def _kl_loop(x, own, cross, tau):
        """sum_k p_k log(p_k / q_k), p = softmax(x . cross_k / tau), q = softmax(x . own_k / tau), in plain floats."""
        def softmax(C):
            s = [sum(a * b for a, b in zip(x.tolist(), c.tolist())) / tau for c in C]
            z = sum(math.exp(v) for v in s)
            return [math.exp(v) / z for v in s]
        p, q = softmax(cross), softmax(own)
        return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))

    def test_eq8_restated_paper_form(self):
        """Eq. (8) = L^{v<->r} + L^{a<->r}, each Eq. (7) row KL(P(f | C_cross) || P(f | C_own)); aggregated as the
        release does: the mean over all 4B rows (a quarter of the sum of the four batch-mean terms)."""
        g = torch.Generator().manual_seed(1)
        f = {m: F.normalize(torch.randn(4, 6, generator=g), dim=1) for m in "vra"}
        C = {m: F.normalize(torch.randn(3, 6, generator=g), dim=1) for m in "vra"}
        tau = 0.5
        rows = []
        for feat, own, cross in (("v", "v", "r"), ("r", "r", "v"), ("a", "a", "r"), ("r", "r", "a")):
            rows += [self._kl_loop(x, C[own], C[cross], tau) for x in f[feat]]
        self.assertAlmostEqual(mce.L_MI(f, C, tau).item(), sum(rows) / len(rows), places=5)
        two = {m: f[m] for m in "vr"}
        self.assertAlmostEqual(mce.L_MI(two, C, tau).item(), sum(rows[:8]) / 8, places=5)

    def test_F1_release_aggregation(self):
        """mi_form "release" against the released computation written out (IDLNL/MCE model.py:97-115): the three
        blocks' logits concatenated, KLDivLoss(batchmean)(log_softmax(own), softmax(cross)) over 3n rows; and a
        per-row loop of the same."""
        g = torch.Generator().manual_seed(2)
        n, tau = 4, 0.05
        f = {m: F.normalize(torch.randn(n, 6, generator=g), dim=1) for m in "vra"}
        C = {m: F.normalize(torch.randn(5, 6, generator=g), dim=1) for m in "vra"}
        own = torch.cat([f["v"] @ C["v"].t(), f["r"] @ C["r"].t(), f["a"] @ C["a"].t()]) / tau
        cross = torch.cat([f["r"] @ C["v"].t(), f["v"] @ C["r"].t(), f["a"] @ C["r"].t()]) / tau
        expected = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(own, 1), F.softmax(cross, 1))
        self.assertAlmostEqual(mce.L_MI(f, C, tau, "release").item(), expected.item(), places=4)
        loop = []
        for i in range(n):
            for own_f, cross_f, c in (("v", "r", "v"), ("r", "v", "r")):   # target P(f^cross_i | C^c)
                s_own = [(f[own_f][i] @ ck).item() / tau for ck in C[c]]
                s_cross = [(f[cross_f][i] @ ck).item() / tau for ck in C[c]]
                zp, zq = sum(map(math.exp, s_cross)), sum(map(math.exp, s_own))
                loop.append(sum(math.exp(a) / zp * (a - math.log(zp) - b + math.log(zq))
                                for a, b in zip(s_cross, s_own)))
            loop.append(self._kl_loop(f["a"][i], C["a"], C["r"], tau))
        self.assertAlmostEqual(mce.L_MI(f, C, tau, "release").item(), sum(loop) / (3 * n), places=4)

    def test_eq10_weights(self):
        """Eq. (10) with Eq. (4): L^v + L^r + w_a L^a + L^u + lambda1 L_MI + lambda2 L_GC, distinct numbers."""
        terms = {"L_v": 1.0, "L_r": 2.0, "L_a": 4.0, "L_u": 8.0, "L_MI": 16.0, "L_GC": 32.0}
        s = mce_settings(lambda1=1.2, lambda2=0.5, weight_a=0.4)
        self.assertAlmostEqual(mce.total_loss(terms, s), 1 + 2 + 0.4 * 4 + 8 + 1.2 * 16 + 0.5 * 32)
        self.assertAlmostEqual(mce.total_loss({"L_CE": 3.0}, s), 3.0)
        self.assertAlmostEqual(mce.total_loss({"L_u": 3.0}, s), 3.0)

    def test_eq9_hand_case(self):
        C_u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
        y = torch.tensor([0, 1, 0])
        # sample 0: 0 - sqrt(2) + 0.3 < 0 -> 0; sample 1: sqrt(2) - 0 + 0.3; sample 2: sqrt(.8) - sqrt(.4) + 0.3
        expected = (0.0 + (math.sqrt(2) + 0.3) + (math.sqrt(0.8) - math.sqrt(0.4) + 0.3)) / 3
        self.assertAlmostEqual(mce.L_GC(f, y, C_u, 0.3).item(), expected, places=5)

    def test_eq9_batch_negatives(self):
        """gc_negatives "batch" (the release): class 2's centroid is nearest but absent from the batch labels."""
        C_u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
        f, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        every = ((1 - math.sqrt(0.4)) + (1 - math.sqrt(0.8))) / 2                # alpha = 1, d_pos = 0
        self.assertAlmostEqual(mce.L_GC(f, y, C_u, 1.0).item(), every, places=5)
        self.assertAlmostEqual(mce.L_GC(f, y, C_u, 1.0, "batch").item(), 0.0, places=6)    # 1 - sqrt(2) < 0


class TestMCEMemory(unittest.TestCase):
    def test_eq3_update(self):
        g = torch.Generator().manual_seed(0)
        W0 = F.normalize(torch.randn(3, 4, generator=g), dim=1)
        memory = mce.Memory(("v",), 3, 4, torch.device("cpu"))
        memory.W["v"] = W0.clone()
        f = F.normalize(torch.randn(4, 4, generator=g), dim=1)
        memory.update("v", f, torch.tensor([2, 0, 2, 2]), 0.3)
        for k, expected in ((0, 0.3 * W0[0] + 0.7 * f[1]), (1, W0[1]),
                            (2, 0.3 * W0[2] + 0.7 * (f[0] + f[2] + f[3]) / 3)):
            self.assertTrue(torch.allclose(memory.W["v"][k], expected / expected.norm(), atol=1e-6), k)

    def test_hardest_update(self):
        """agnostic_update "hardest" (IDLNL/MCE memory.py:27-39): the class's batch feature of lowest f . W_y."""
        W0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        memory = mce.Memory(("u",), 2, 2, torch.device("cpu"))
        memory.W["u"] = W0.clone()
        f = torch.tensor([[0.8, 0.6], [0.6 ** 0.5, 0.4 ** 0.5], [1.0, 0.0], [0.6, 0.8]])
        memory.update("u", f, torch.tensor([0, 0, 0, 1]), 0.1, "hardest")
        e0 = 0.1 * W0[0] + 0.9 * f[1]                                   # f[1] . W_0 = 0.775 < 0.8 < 1
        e1 = 0.1 * W0[1] + 0.9 * f[3]
        self.assertTrue(torch.allclose(memory.W["u"][0], e0 / e0.norm(), atol=1e-6))
        self.assertTrue(torch.allclose(memory.W["u"][1], e1 / e1.norm(), atol=1e-6))

    def test_eq1_class_means(self):
        """The centroid pass equals a per-image loop: class means of L2-normalised features, normalised; the
        auxiliary images use the pass generator's channels; u pools v, r and a."""
        torch.manual_seed(0)
        settings = mce_settings()
        trainset = tiny_trainset(ids=3)
        model = mce.build(settings, 3)
        run = common.Run(tempfile.mkdtemp(), "cpu", say=lambda *a: None)
        got = mce.class_centroids(model, trainset, ("v", "r", "a", "u"), run, mce.pass_generator(0, 4))
        model.eval()
        channels = torch.randint(0, 3, (len(trainset.v),), generator=mce.pass_generator(0, 4))
        feats = {m: [[] for _ in range(3)] for m in "vrau"}
        for m, images in (("v", trainset.v), ("r", trainset.r), ("a", trainset.v)):
            for i, (img, label) in enumerate(zip(images.images, images.labels)):
                img = img.astype(np.float32) / 255                                      # (H, W, 3)
                if m == "a":
                    img = np.repeat(img[:, :, channels[i].item(), None], 3, axis=2)
                x = data.normalize(torch.from_numpy(img).permute(2, 0, 1)[None])
                with torch.no_grad():
                    f = F.normalize(model(x), dim=1)[0]
                feats[m][label].append(f)
                feats["u"][label].append(f)
        for m in "vrau":
            for k in range(3):
                mean = torch.stack(feats[m][k]).mean(0)
                self.assertTrue(torch.allclose(got[m][k], mean / mean.norm(), atol=1e-5), (m, k))


class TestMCETrain(unittest.TestCase):
    def _train(self, out, settings, trainset, **run_kw):
        run = common.Run(out, "cpu", say=run_kw.pop("log", lambda *a: None), **run_kw)
        return mce.train(settings, trainset, run)

    def test_memories_and_historical_centroids(self):
        """Eq. 1: the first memories are the class means of the initial model; W moves every iteration (Eq. 3);
        C stays fixed during an epoch and is the class means of the model at the end of the previous one."""
        settings, trainset = mce_settings(epochs=2), tiny_trainset(ids=3, per_v=4, per_r=4)
        seen_W, seen_C, spy_L_W, spy_L_MI = memory_spies()

        passes, real_pass = [], mce.class_centroids

        def spy_pass(*a, **kw):
            passes.append(1)
            return real_pass(*a, **kw)

        with tempfile.TemporaryDirectory() as out, mock.patch.object(mce, "L_W", spy_L_W), \
                mock.patch.object(mce, "L_MI", spy_L_MI), mock.patch.object(mce, "class_centroids",
                                                                            spy_pass):
            torch.manual_seed(0)
            self._train(out, settings, trainset, max_its=2)
            state = torch.load(f"{out}/train.pt", weights_only=True)
            run = common.Run(out, "cpu", say=lambda *a: None)
        self.assertEqual(len(passes), 2)      # the initial pass and the one after epoch 0; none after the last
        torch.manual_seed(0)
        initial = mce.class_centroids(mce.build(settings, 3), trainset, ("v", "r", "a", "u"), run,
                                      mce.pass_generator(0, -1))
        its = len(seen_C) // 2
        self.assertEqual(len(seen_C), 2 * its)
        self.assertGreater(its, 1)
        for m in "vrau":
            self.assertTrue(torch.allclose(seen_W[0][m], initial[m], atol=1e-5), m)            # Eq. 1
            self.assertTrue(torch.allclose(seen_C[0][m], initial[m], atol=1e-5), m)
            self.assertFalse(torch.allclose(seen_W[1][m], seen_W[0][m]), m)                       # Eq. 3
            for e in range(2):
                for i in range(its):
                    self.assertTrue(torch.equal(seen_C[e * its + i][m], seen_C[e * its][m]), (m, e, i))
            self.assertFalse(torch.allclose(seen_C[its][m], seen_C[0][m]), m)                    # refreshed
            self.assertTrue(torch.equal(state["memory"]["C"][m], seen_C[its][m]), m)            # no final pass

    def test_reinit_memory(self):
        """reinit_memory (the release, train.py:184-212): W at the start of epoch 1 is the pass after epoch 0 (= C);
        agnostic_centroid "modality-mean": C^u is the unnormalised mean of the modality centroids."""
        settings = mce_settings(epochs=2, reinit_memory=True, agnostic_centroid="modality-mean")
        seen_W, seen_C, spy_L_W, spy_L_MI = memory_spies()

        with tempfile.TemporaryDirectory() as out, mock.patch.object(mce, "L_W", spy_L_W), \
                mock.patch.object(mce, "L_MI", spy_L_MI):
            torch.manual_seed(0)
            self._train(out, settings, tiny_trainset(ids=3, per_v=4, per_r=4), max_its=2)
        its = len(seen_W) // 2
        for m in "vrau":
            self.assertTrue(torch.equal(seen_W[its][m], seen_C[its][m]), m)
            self.assertFalse(torch.allclose(seen_W[its - 1][m], seen_W[its][m]), m)
        u = sum(seen_C[its][m] for m in "vra") / 3
        self.assertTrue(torch.allclose(seen_C[its]["u"], u, atol=1e-6))
        self.assertTrue((seen_C[its]["u"].norm(dim=1) < 1 - 1e-4).all())

    def test_resume_is_exact(self):
        settings, trainset = mce_settings(epochs=2), tiny_trainset(ids=3, per_v=4, per_r=4)
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            torch.manual_seed(0)
            self._train(a, settings, trainset, max_its=1)
            real_epochs = common.Run.epochs

            def first_epoch_only(run, phase, num_epochs, **objects):     # killed after epoch 0's checkpoint
                for e in real_epochs(run, phase, num_epochs, **objects):
                    if e >= 1:
                        return
                    yield e

            torch.manual_seed(0)
            with mock.patch.object(common.Run, "epochs", first_epoch_only):
                self._train(b, settings, trainset, max_its=1)
            torch.manual_seed(123)                                       # resume restores every state
            self._train(b, settings, trainset, max_its=1)
            sa, sb = (torch.load(f"{d}/train.pt", weights_only=True) for d in (a, b))
        for k, v in sa["model"].items():
            self.assertTrue(torch.equal(v, sb["model"][k]), k)
        for kind in "WC":
            for m, v in sa["memory"][kind].items():
                self.assertTrue(torch.equal(v, sb["memory"][kind][m]), (kind, m))


MCE_TERMS = ("L_CE", "L_v", "L_r", "L_a", "L_u", "L_MI", "L_GC")


class TestMCESmoke(unittest.TestCase):
    def _terms(self, out):
        """The loss terms named on the last progress line of OUT/log.txt, checked to be finite."""
        line = [l for l in open(f"{out}/log.txt") if l.startswith("[train] ep ")][-1].split()
        terms = {t for t in MCE_TERMS if t in line}
        for t in terms:
            self.assertTrue(math.isfinite(float(line[line.index(t) + 1])), (out, t))
        return terms

    def test_reid_smoke(self):
        """python reid.py --method mce --smoke, the paper's objective (Eq. 10) with three modalities."""
        with tempfile.TemporaryDirectory() as out:
            proc = run_reid("--method", "mce", "--smoke", "--out", out, "--cache-dir", TEST_CACHE, "--log-every", "1")
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:] + proc.stdout[-2000:])
            self.assertIn("all-single", proc.stdout)
            self.assertTrue(os.path.exists(f"{out}/results.json"))
            self.assertEqual(self._terms(out), {"L_v", "L_r", "L_a", "L_u", "L_MI", "L_GC"})

    def test_reid_ablations(self):
        """Every value of every ablation switch (Table 3) through reid.main --smoke: the logged terms follow."""
        cases = [(["--objective", "CE", "--auxiliary", "false"], {"L_CE"}),
                 (["--objective", "u"], {"L_u"}),
                 (["--objective", "W", "--auxiliary", "false"], {"L_v", "L_r", "L_u"}),
                 (["--objective", "W+MI", "--centroids", "dynamic"], {"L_v", "L_r", "L_a", "L_u", "L_MI"})]
        for flags, terms in cases:
            with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
                results = reid.main(["--method", "mce", "--smoke", "--out", out, "--cache-dir", TEST_CACHE,
                                     "--log-every", "1", *flags])
                self.assertIn("all-single", results, flags)
                self.assertEqual(self._terms(out), terms, flags)


# ==== deliberate copies across the method files (TestCopies) ====

# Each method file is self-contained: what two methods share is copied, not imported. COPIES lists every copy as
# (copy, original), each "module.name" in methods/; a copy's source text equals its original's, and the comment
# above the copy names the original.
COPIES = [
    ("mce.NonLocal", "agw.NonLocal"),
    ("mce.with_non_local", "agw.with_non_local"),
    ("mce.gem", "agw.gem"),
    ("mce.pairwise_distance", "agw.pairwise_distance"),
    ("nfs.pairwise_distance", "agw.pairwise_distance"),
    ("nfs.L_wrt", "agw.L_wrt"),
    ("ssft.pairwise_distance", "agw.pairwise_distance"),
    ("cmnas.L_tri_hard", "rfm.L_tri_hard"),
    ("ssft.L_tri_hard", "rfm.L_tri_hard"),
]


def method_object(dotted):
    """'module.name' -> that function or class of methods/module.py."""
    module, name = dotted.split(".")
    return getattr(importlib.import_module("methods." + module), name)


class TestCopies(unittest.TestCase):
    def test_each_copy_is_verbatim(self):
        for copy, original in COPIES:
            self.assertEqual(inspect.getsource(method_object(copy)), inspect.getsource(method_object(original)),
                             f"{copy} is no longer a verbatim copy of {original}")

    def test_each_copy_names_its_original(self):
        for copy, original in COPIES:
            self.assertIn(f"# Copy of {original};", inspect.getcomments(method_object(copy)) or "", copy)


if __name__ == "__main__":
    result = unittest.main(verbosity=2, exit=False).result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, {len(result.skipped)} skipped")
    sys.exit(0 if result.wasSuccessful() else 1)
