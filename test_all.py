"""The one test file of this project.

Run with `python test_all.py` (stdlib unittest) or `python -m pytest test_all.py`.
Each section below belongs to one component; tests use tiny images, resnet18 and a
few iterations so the whole suite stays under 10 minutes on 2 CPU cores.
"""
import unittest

# ==== data.py / synthetic.py tests (TestSynthetic*, TestData*) ====

# ---- synthetic.py (TestSynthetic*) ----
import glob as _sy_glob
import hashlib as _sy_hashlib
import json as _sy_json
import os as _sy_os
import shutil as _sy_shutil
import tempfile as _sy_tempfile

import numpy as _sy_np
from PIL import Image as _sy_Image

import synthetic as _sy
from methods.common import UserError as _sy_UserError


def _sy_quiet(*args):
    """A log function that prints nothing."""


def _sy_digest(root):
    """sha1 over every file's relative path and bytes under root."""
    h = _sy_hashlib.sha1()
    for path in sorted(_sy_glob.glob(_sy_os.path.join(root, "**", "*"), recursive=True)):
        if _sy_os.path.isfile(path):
            h.update(_sy_os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class TestSyntheticSYSU(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = _sy_tempfile.mkdtemp()
        cls.root = str(_sy.make_sysu(_sy_os.path.join(cls.tmp, "sysu"), num_ids=24, num_test=6, images_per_cam=3,
                                     height=64, width=32, seed=0, log=_sy_quiet))

    @classmethod
    def tearDownClass(cls):
        _sy_shutil.rmtree(cls.tmp)

    def test_deterministic_in_seed(self):
        tmp = _sy_tempfile.mkdtemp()
        self.addCleanup(_sy_shutil.rmtree, tmp)
        kw = dict(num_ids=6, num_test=2, images_per_cam=2, height=48, width=24, log=_sy_quiet)
        a = _sy.make_sysu(_sy_os.path.join(tmp, "a"), seed=3, **kw)
        b = _sy.make_sysu(_sy_os.path.join(tmp, "b"), seed=3, **kw)
        c = _sy.make_sysu(_sy_os.path.join(tmp, "c"), seed=4, **kw)
        self.assertEqual(_sy_digest(a), _sy_digest(b))
        self.assertNotEqual(_sy_digest(a), _sy_digest(c))

    def test_layout_and_exp_files_as_the_real_dataset(self):
        self.assertEqual(sorted(_sy_os.listdir(self.root)),
                         ["cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "exp", _sy.MARKER])
        self.assertEqual(_sy_os.listdir(self.tmp), ["sysu"])          # no temporary left behind
        splits = {}
        for split in ("train", "val", "test"):
            with open(_sy_os.path.join(self.root, "exp", f"{split}_id.txt")) as f:
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
            for folder in _sy_os.listdir(_sy_os.path.join(self.root, f"cam{cam}")):
                self.assertRegex(folder, r"^\d{4}$")
                cams_of[int(folder)].add(cam)
                names = sorted(_sy_os.listdir(_sy_os.path.join(self.root, f"cam{cam}", folder)))
                self.assertEqual(names, [f"{n:04d}.jpg" for n in range(1, len(names) + 1)])
        for pid, cams in cams_of.items():
            self.assertTrue(cams & {1, 2, 4, 5} and cams & {3, 6}, (pid, cams))
            if pid in splits["test"]:
                self.assertTrue(cams & {1, 2}, (pid, cams))          # indoor-search gallery exists
        self.assertLess(sum(map(len, cams_of.values())), 6 * 24)    # not every id in every camera
        with open(_sy_os.path.join(self.root, _sy.MARKER)) as f:
            marker = _sy_json.load(f)
        self.assertEqual(marker["kind"], "sysu")
        self.assertEqual(marker["params"]["num_ids"], 24)
        self.assertEqual(sum(marker["counts"].values()),
                         len(_sy_glob.glob(_sy_os.path.join(self.root, "cam*", "*", "*.jpg"))))

    def test_images_per_modality(self):
        sizes = set()
        for cam in range(1, 7):
            for path in sorted(_sy_glob.glob(_sy_os.path.join(self.root, f"cam{cam}", "*", "*.jpg")))[:12]:
                img = _sy_Image.open(path)
                sizes.add(img.size)
                self.assertEqual(img.mode, "L" if cam == 6 else "RGB", path)
                a = _sy_np.asarray(img.convert("RGB"), _sy_np.int16)
                spread = _sy_np.abs(a - a.mean(axis=2, keepdims=True)).mean()
                if cam in (3, 6):
                    self.assertLessEqual(spread, 1.0, path)          # one intensity in three channels
                else:
                    self.assertGreater(spread, 3.0, path)            # colour
                w, h = img.size
                f = _sy.SYSU_CAMERAS[cam]["size"]
                self.assertTrue(abs(h - 64 * f) <= 0.06 * 64 * f + 1 and abs(w - 32 * f) <= 0.06 * 32 * f + 1,
                                (path, h, w))                        # camera size factor, +-6 % jitter
        self.assertGreater(len(sizes), 6)                            # sizes vary: loaders must resize

    def test_modality_gap_with_raw_pixels(self):
        """Raw pixels (16 x 32, central half, camera mean removed, L2-normalised): visible-to-visible
        retrieval across cameras is far better than infrared-to-visible or visible-to-infrared."""
        feats, pids, cams = [], [], []
        for path in sorted(_sy_glob.glob(_sy_os.path.join(self.root, "cam*", "*", "*.jpg"))):
            img = _sy_Image.open(path).convert("RGB").resize((16, 32), _sy_Image.BILINEAR)
            feats.append(_sy_np.asarray(img, _sy_np.float64)[:, 4:12])
            pids.append(int(path.split(_sy_os.sep)[-2]))
            cams.append(int(path.split(_sy_os.sep)[-3][3:]))
        F, P, C = _sy_np.stack(feats), _sy_np.array(pids), _sy_np.array(cams)
        for cam in range(1, 7):
            F[C == cam] -= F[C == cam].mean(axis=0)
        F = F.reshape(len(F), -1)
        F -= F.mean(axis=1, keepdims=True)
        F /= _sy_np.linalg.norm(F, axis=1, keepdims=True)
        visible = _sy_np.isin(C, (1, 2, 4, 5))

        def rank1(q, g):
            """Top-1 accuracy of cosine ranking, gallery images of the query's camera excluded."""
            q, g = _sy_np.flatnonzero(q), _sy_np.flatnonzero(g)
            best = []
            for i in q:
                sims = [(-1e9 if C[j] == C[i] else F[i] @ F[j], j) for j in g]
                best.append(P[max(sims)[1]] == P[i])
            return float(_sy_np.mean(best))

        same = rank1(visible, visible)
        cross = max(rank1(~visible, visible), rank1(visible, ~visible))
        self.assertGreater(same, 4 / 24)                             # well above chance (1/24)
        self.assertGreater(same, 2 * cross, (same, cross))


class TestSyntheticMaterials(unittest.TestCase):
    def test_band_ratio_constant_within_material_and_differs_across(self):
        """RFM Eq. (4): within one material NIR / G is one constant (the shading cancels), and it is the
        material's nir / green reflectance; different materials have very different constants."""
        world = _sy.World([1, 2, 3], seed=0, cameras={1: dict(_sy.SYSU_CAMERAS[1], place=1)}, height=64, width=32)
        factors = {}
        for pid, view in ((1, "front"), (2, "side"), (3, "back")):
            shot = _sy.Shot(view=view, facing=1, phase=0.7, scale=0.85, dx=0.0, foot=0.97, pan=0.4, tilt=0.5,
                            exposure=1.0, gradient=0.2, size=(64, 32), detail=pid, occluded=True)
            cv = world.scene(pid, 1, shot)
            vis = _sy.radiance(cv.label, cv.shade, world.mats.rgb)           # (128, 64, 3)
            nir = _sy.radiance(cv.label, cv.shade, world.mats.nir)[..., 0]   # (128, 64)
            for m in _sy_np.unique(cv.label):
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
        mats = _sy.make_materials(_sy_np.random.default_rng(0))
        fabric = mats.groups["fabric"]
        rgb, nir = mats.rgb[fabric], mats.nir[fabric, 0]
        same_colour = _sy_np.abs(rgb[:, None] - rgb[None]).max(axis=2) < 0.05 * (1 + rgb.max(axis=1)[:, None])
        dnir = _sy_np.abs(nir[:, None] - nir[None])
        self.assertGreater((same_colour & (dnir > 0.3)).sum(), 0)   # same colour, different infrared
        far_colour = _sy_np.abs(rgb[:, None] - rgb[None]).max(axis=2) > 0.3
        self.assertGreater((far_colour & (dnir < 0.03)).sum(), 0)   # different colour, same infrared
        self.assertEqual(mats.rgb.shape, (len(mats.names), 3))
        self.assertEqual(mats.nir.shape, (len(mats.names), 1))


class TestSyntheticRegDB(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = _sy_tempfile.mkdtemp()
        cls.root = str(_sy.make_regdb(_sy_os.path.join(cls.tmp, "regdb"), num_ids=8, images_per_id=3,
                                      height=48, width=24, seed=0, log=_sy_quiet))

    @classmethod
    def tearDownClass(cls):
        _sy_shutil.rmtree(cls.tmp)

    def test_layout_and_idx_files_as_the_real_dataset(self):
        self.assertEqual(sorted(_sy_os.listdir(self.root)), ["Thermal", "Visible", "idx", _sy.MARKER])
        self.assertEqual(sorted(_sy_os.listdir(_sy_os.path.join(self.root, "idx"))),
                         sorted(f"{s}_{m}_{k}.txt" for s in ("train", "test") for m in ("visible", "thermal")
                                for k in range(1, 11)))
        for pid in range(1, 9):
            names = sorted(_sy_os.listdir(_sy_os.path.join(self.root, "Visible", str(pid))))
            self.assertEqual(len(names), 3)
            for name in names:
                self.assertRegex(name, r"^(male|female)_(front|back)_v_\d{5}_[1-3]\.bmp$")
                thermal = name.replace("_v_", "_t_")
                v = _sy_Image.open(_sy_os.path.join(self.root, "Visible", str(pid), name))
                t = _sy_Image.open(_sy_os.path.join(self.root, "Thermal", str(pid), thermal))
                self.assertEqual((v.mode, v.size, t.mode, t.size), ("RGB", (24, 48), "L", (24, 48)))
        splits = set()
        for k in range(1, 11):
            parsed = {}
            for split in ("train", "test"):
                for mod, folder in (("visible", "Visible"), ("thermal", "Thermal")):
                    with open(_sy_os.path.join(self.root, "idx", f"{split}_{mod}_{k}.txt")) as f:
                        rows = [line.split(" ") for line in f.read().splitlines()]
                    for path, label in rows:
                        self.assertTrue(path.startswith(folder + "/"), path)
                        self.assertTrue(_sy_os.path.isfile(_sy_os.path.join(self.root, path)), path)
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
        v = _sy_np.asarray(_sy_Image.open(_sy_glob.glob(_sy_os.path.join(self.root, "Visible", "1", "*_1.bmp"))[0]))
        t = _sy_np.asarray(_sy_Image.open(_sy_glob.glob(_sy_os.path.join(self.root, "Thermal", "1", "*_1.bmp"))[0]))
        warm = t > t.mean() + 0.5 * t.std()                         # the person is warmer than the scene
        cols = _sy_np.flatnonzero(warm.mean(axis=0) > 0.3)
        self.assertTrue(len(cols) > 0 and abs(cols.mean() - 12) < 5, cols)
        self.assertEqual(v.shape, (48, 24, 3))


class TestSyntheticCache(unittest.TestCase):
    def setUp(self):
        self.tmp = _sy_tempfile.mkdtemp()
        self.addCleanup(_sy_shutil.rmtree, self.tmp)

    def test_ensure_world_reuses_a_complete_world(self):
        logs = []
        kw = dict(num_ids=5, num_test=2, images_per_cam=1, height=32, width=16)
        a = _sy.ensure_world(self.tmp, "sysu", log=logs.append, **kw)
        built = len(logs)
        self.assertGreater(built, 0)
        stamp = _sy_os.stat(_sy_os.path.join(a, _sy.MARKER)).st_mtime_ns
        self.assertEqual(_sy.ensure_world(self.tmp, "sysu", log=logs.append, **kw), a)
        self.assertEqual(len(logs), built)                           # nothing regenerated
        self.assertEqual(_sy_os.stat(_sy_os.path.join(a, _sy.MARKER)).st_mtime_ns, stamp)
        b = _sy.ensure_world(self.tmp, "sysu", log=_sy_quiet, seed=1, **kw)
        c = _sy.ensure_world(self.tmp, "regdb", log=_sy_quiet, num_ids=2, images_per_id=1, height=32, width=16)
        self.assertEqual(len({a, b, c}), 3)
        self.assertEqual(sorted(_sy_os.listdir(self.tmp)), sorted(p.name for p in (a, b, c)))
        with open(_sy_os.path.join(a, _sy.MARKER)) as f:
            self.assertEqual(_sy_json.load(f)["params"], dict(kw, seed=0))

    def test_interrupted_build_leaves_nothing(self):
        calls = []

        def log(msg):
            calls.append(msg)
            if len(calls) == 2:                                      # first progress line: mid-build
                raise KeyboardInterrupt

        with self.assertRaises(KeyboardInterrupt):
            _sy.ensure_world(self.tmp, "sysu", log=log, num_ids=8, num_test=2, images_per_cam=1, height=32, width=16)
        self.assertEqual(_sy_os.listdir(self.tmp), [])

    def test_bad_parameters_raise_user_errors(self):
        with self.assertRaisesRegex(_sy_UserError, "market"):
            _sy.ensure_world(self.tmp, "market")
        with self.assertRaisesRegex(_sy_UserError, "num_idz"):
            _sy.ensure_world(self.tmp, "sysu", num_idz=3)
        with self.assertRaisesRegex(_sy_UserError, "num_test"):
            _sy.make_sysu(_sy_os.path.join(self.tmp, "w"), num_ids=3, num_test=2)
        with self.assertRaisesRegex(_sy_UserError, "height"):
            _sy.make_regdb(_sy_os.path.join(self.tmp, "w"), height=8)
        with self.assertRaisesRegex(_sy_UserError, "already exists"):
            _sy.make_sysu(self.tmp)


# ---- end synthetic.py ----


import os as _dt_os
import random as _dt_random
import shutil as _dt_shutil
import tempfile as _dt_tempfile

import numpy as _dt_np
import torch as _dt_torch
from PIL import Image as _dt_Image

import data as _dt_data
from methods.common import UserError as _dt_UserError

_DT_H, _DT_W = 16, 8
# SYSU hand-made tree: {id: {cam: number of images}}; cameras not listed have no directory at all
_DT_SYSU_TRAIN = {1: {1: 3, 2: 2, 3: 2, 4: 1, 6: 1}, 2: {1: 2, 3: 1}, 5: {2: 2, 4: 1, 6: 2}}
_DT_SYSU_VAL = {7: {1: 1, 5: 2, 3: 3}}
_DT_SYSU_TEST = {12: {1: 12, 2: 3, 3: 2, 5: 11, 6: 1}, 345: {1: 2, 4: 5, 5: 1, 6: 3},
                 9876: {1: 1, 2: 10, 4: 9, 3: 2}}


def _dt_write_image(path, rng, gray=None):
    """A random image of odd size; grayscale ('L') for about a third of the files unless `gray` says."""
    h, w = int(rng.integers(19, 41)), int(rng.integers(9, 31))
    gray = rng.random() < 0.33 if gray is None else gray
    arr = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=_dt_np.uint8)
    _dt_os.makedirs(_dt_os.path.dirname(path), exist_ok=True)
    _dt_Image.fromarray(arr).save(path)


def _dt_make_sysu(root, seed=0):
    rng = _dt_np.random.default_rng(seed)
    for cam in range(1, 7):
        _dt_os.makedirs(_dt_os.path.join(root, f"cam{cam}"), exist_ok=True)
    for spec in (_DT_SYSU_TRAIN, _DT_SYSU_VAL, _DT_SYSU_TEST):
        for pid, cams in spec.items():
            for cam, n in cams.items():
                for k in range(n):
                    _dt_write_image(_dt_os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{k + 1:04d}.jpg"), rng)
    _dt_os.makedirs(_dt_os.path.join(root, "exp"), exist_ok=True)
    for name, spec in (("train_id.txt", _DT_SYSU_TRAIN), ("val_id.txt", _DT_SYSU_VAL), ("test_id.txt", _DT_SYSU_TEST)):
        with open(_dt_os.path.join(root, "exp", name), "w") as f:
            f.write(",".join(str(i) for i in reversed(list(spec))) + "\n")   # unsorted on purpose


# RegDB hand-made tree: per trial {split: [(id dir, label), ...]}; labels non-contiguous, listed unsorted
_DT_REGDB = {1: {"train": [(1, 40), (2, 3), (3, 17)], "test": [(4, 205), (5, 411), (6, 300)]},
             2: {"train": [(4, 8), (5, 1), (6, 90)], "test": [(1, 1000), (2, 2000), (3, 3000)]}}


def _dt_make_regdb(root, seed=0):
    rng = _dt_np.random.default_rng(seed)
    for d, m, gray in (("Visible", "v", False), ("Thermal", "t", True)):
        for pid in range(1, 7):
            for k in range(3):
                _dt_write_image(_dt_os.path.join(root, d, str(pid), f"male_front_{m}_{pid:05d}_{k + 1}.bmp"), rng, gray)
    _dt_os.makedirs(_dt_os.path.join(root, "idx"))
    for trial, splits in _DT_REGDB.items():
        for split, pairs in splits.items():
            for name, d, m in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                with open(_dt_os.path.join(root, "idx", f"{split}_{name}_{trial}.txt"), "w") as f:
                    for pid, label in pairs:
                        for k in range(3):
                            f.write(f"{d}/{pid}/male_front_{m}_{pid:05d}_{k + 1}.bmp {label}\n")


def _dt_decode(path):
    with _dt_Image.open(path) as im:
        return _dt_np.asarray(im.convert("RGB").resize((_DT_W, _DT_H), _dt_Image.BILINEAR))


def _dt_community_gallery(root, mode, shot, trial):
    """Direct re-statement of the community data manager (global `random`, seeded per call)."""
    _dt_random.seed(trial)
    rgb_cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    with open(_dt_os.path.join(root, "exp/test_id.txt")) as f:
        ids = ["%04d" % int(y) for y in f.read().splitlines()[0].split(",")]
    files = []
    for pid in sorted(ids):
        for cam in rgb_cameras:
            img_dir = _dt_os.path.join(root, cam, pid)
            if _dt_os.path.isdir(img_dir):
                new_files = sorted([img_dir + "/" + i for i in _dt_os.listdir(img_dir)])
                if shot == "single":
                    files.append(_dt_random.choice(new_files))
                else:
                    files.extend(_dt_random.sample(new_files, min(10, len(new_files))))
    return files


class _DTTree(unittest.TestCase):
    """Builds the hand-made SYSU and RegDB trees once per class in a temporary directory."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = _dt_tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.sysu = _dt_os.path.join(cls.tmp, "SYSU-MM01")
        cls.regdb = _dt_os.path.join(cls.tmp, "RegDB")
        _dt_make_sysu(cls.sysu)
        _dt_make_regdb(cls.regdb)
        cls.cache = _dt_os.path.join(cls.tmp, "cache")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def copy(self, src, name):
        dst = _dt_os.path.join(self.tmp, name)
        _dt_shutil.copytree(src, dst)
        return dst

    def load_sysu(self, root=None, log=None, **kw):
        return _dt_data.load_sysu(root or self.sysu, _DT_H, _DT_W, self.cache, log=log or (lambda m: None), **kw)


class TestDataSYSU(_DTTree):
    def test_train_set(self):
        train, _ = self.load_sysu()
        ids = sorted(list(_DT_SYSU_TRAIN) + list(_DT_SYSU_VAL))          # 1, 2, 5, 7 -> 0..3
        self.assertEqual(train.num_classes, 4)
        for s, cams in ((train.v, (1, 2, 4, 5)), (train.r, (3, 6))):
            expect = [(_dt_os.path.join(self.sysu, f"cam{c}", f"{pid:04d}", f"{k + 1:04d}.jpg"), label, c)
                      for label, pid in enumerate(ids) for c in cams
                      for k in range({**_DT_SYSU_TRAIN, **_DT_SYSU_VAL}[pid].get(c, 0))]
            self.assertEqual(s.files, [e[0] for e in expect])
            self.assertEqual(s.labels.tolist(), [e[1] for e in expect])
            self.assertEqual(s.cams.tolist(), [e[2] for e in expect])
            self.assertEqual(s.labels.dtype, _dt_np.int64)
            self.assertEqual(s.images.shape, (len(expect), _DT_H, _DT_W, 3))
            self.assertEqual(s.images.dtype, _dt_np.uint8)
        gray = 0
        for s in (train.v, train.r):
            for f, img in zip(s.files, s.images):
                _dt_np.testing.assert_array_equal(img, _dt_decode(f))
                with _dt_Image.open(f) as im:
                    if im.mode == "L":
                        gray += 1
                        self.assertTrue((img == img[..., :1]).all())
        self.assertGreater(gray, 0)

    def test_test_pools_and_queries(self):
        _, test = self.load_sysu()
        ids = sorted(_DT_SYSU_TEST)
        q = [(_dt_os.path.join(self.sysu, f"cam{c}", f"{pid:04d}", f"{k + 1:04d}.jpg"), pid, c)
             for pid in ids for c in (3, 6) for k in range(_DT_SYSU_TEST[pid].get(c, 0))]
        self.assertEqual(test.pools["r"].files, [e[0] for e in q])
        self.assertEqual(test.pools["r"].labels.tolist(), [e[1] for e in q])   # original (large) ids
        self.assertEqual(test.pools["r"].cams.tolist(), [e[2] for e in q])
        nv = sum(n for pid in ids for c, n in _DT_SYSU_TEST[pid].items() if c in (1, 2, 4, 5))
        self.assertEqual(len(test.pools["v"]), nv)
        self.assertEqual(set(test.pools["v"].labels.tolist()), {12, 345, 9876})
        self.assertEqual([p.name for p in test.protocols], ["all-single", "all-multi", "indoor-single", "indoor-multi"])
        for p in test.protocols:
            self.assertEqual((p.query, p.gallery, p.kind, len(p.trials)), ("r", "v", "sysu", 10))

    def test_gallery_equals_community_rule(self):
        _, test = self.load_sysu()
        state = _dt_random.getstate()
        try:
            for p in test.protocols:
                mode, shot = p.name.split("-")
                galleries = set()
                for t, (qi, gi) in enumerate(p.trials):
                    self.assertEqual(qi.tolist(), list(range(len(test.pools["r"]))))
                    got = [test.pools["v"].files[i] for i in gi]
                    self.assertEqual(got, _dt_community_gallery(self.sysu, mode, shot, t), (p.name, t))
                    galleries.add(tuple(got))
                    cams = test.pools["v"].cams[gi]
                    self.assertTrue(set(cams.tolist()) <= ({1, 2, 4, 5} if mode == "all" else {1, 2}))
                self.assertGreater(len(galleries), 1)      # trials differ
            single = test.protocols[0].trials[0][1]
            self.assertEqual(len(single), 3 + 3 + 3)       # one per existing (id, cam) dir, cams 1, 2, 4, 5
            multi = test.protocols[1].trials[0][1]
            self.assertEqual(len(multi), 10 + 3 + 10 + 2 + 5 + 1 + 1 + 10 + 9)
        finally:
            _dt_random.setstate(state)

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


class TestDataRegDB(_DTTree):
    def load(self, trial, root=None):
        return _dt_data.load_regdb(root or self.regdb, trial, _DT_H, _DT_W, self.cache, log=lambda m: None)

    def test_trials_relabel_and_test_labels(self):
        for trial, splits in _DT_REGDB.items():
            train, test = self.load(trial)
            order = sorted(label for _, label in splits["train"])
            for s, d, m, cam in ((train.v, "Visible", "v", 1), (train.r, "Thermal", "t", 2)):
                expect = [(_dt_os.path.join(self.regdb, d, str(pid), f"male_front_{m}_{pid:05d}_{k + 1}.bmp"),
                           order.index(label)) for pid, label in splits["train"] for k in range(3)]
                self.assertEqual(s.files, [e[0] for e in expect])
                self.assertEqual(s.labels.tolist(), [e[1] for e in expect])
                self.assertEqual(s.cams.tolist(), [cam] * len(expect))
                for f, img in zip(s.files, s.images):
                    _dt_np.testing.assert_array_equal(img, _dt_decode(f))
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
        names = [n for n in _dt_os.listdir(self.cache) if n.startswith("regdb-")]
        self.assertEqual(len(names), 2)    # one per modality


class TestDataSampler(unittest.TestCase):
    # ids 0..5: visible counts 5,1,4,6,3,0; infrared counts 2,4,0,5,4,3 -> ids with both: 0, 1, 3, 4
    lv = _dt_np.repeat(_dt_np.arange(6), [5, 1, 4, 6, 3, 0])
    lr = _dt_np.repeat(_dt_np.arange(6), [2, 4, 0, 5, 4, 3])

    def test_layout_and_length(self):
        P, K = 2, 3
        s = _dt_data.CrossModalitySampler(self.lv, self.lr, P, K, seed=1)
        self.assertEqual(len(s), 19 // 6)
        seen = set()
        for e in range(20):
            batches = s.epoch(e)
            self.assertEqual(len(batches), 3)
            for iv, ir in batches:
                self.assertEqual((iv.shape, ir.shape, iv.dtype), ((P * K,), (P * K,), _dt_np.int64))
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
        self.assertEqual(len(_dt_data.CrossModalitySampler(self.lv, self.lr, 2, 4, 0)), 19 // 8)

    def test_deterministic_and_resumable(self):
        a = _dt_data.CrossModalitySampler(self.lv, self.lr, 2, 2, seed=5)
        b = _dt_data.CrossModalitySampler(self.lv, self.lr, 2, 2, seed=6)

        def same(x, y):
            return all((p == q).all() and (r == t).all() for (p, r), (q, t) in zip(x, y))
        self.assertTrue(same(a.epoch(3), a.epoch(3)))
        self.assertFalse(same(a.epoch(3), a.epoch(4)))
        self.assertFalse(same(a.epoch(3), b.epoch(3)))
        b.load_state_dict(a.state_dict())
        self.assertTrue(same(a.epoch(3), b.epoch(3)))


def _dt_extra(batch, g):
    """An `extra` hook like MCE's: adds an auxiliary image from a random channel of x_v."""
    c = _dt_torch.randint(0, 3, (1,), generator=g).item()
    batch["x_a"] = batch["x_v"][:, c:c + 1].expand(-1, 3, -1, -1).clone()
    return batch


def _dt_trainset(n_ids=4, per=3, h=12, w=6, seed=0):
    rng = _dt_np.random.default_rng(seed)
    labels = _dt_np.repeat(_dt_np.arange(n_ids), per)

    def s(cam):
        return _dt_data.ImageSet([f"{cam}-{i}" for i in range(len(labels))], labels.copy(),
                                 _dt_np.full(len(labels), cam), rng.integers(0, 256, (len(labels), h, w, 3), dtype=_dt_np.uint8))
    return _dt_data.TrainSet(s(1), s(3), n_ids)


_DT_MEAN = _dt_torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_DT_STD = _dt_torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class TestDataLoader(unittest.TestCase):
    def test_workers_do_not_change_batches(self):
        ts = _dt_trainset()
        aug = _dt_data.Augment(12, 6, pad=2, extra=_dt_extra)
        runs = []
        for workers in (0, 2):
            loader = _dt_data.train_loader(ts, 2, 2, seed=3, augment=aug, workers=workers)
            self.assertEqual(len(loader), 12 // 4)
            runs.append([b for e in (0, 1) for b in loader.epoch(e)])
        self.assertEqual(len(runs[0]), 6)
        for b0, b2 in zip(*runs):
            self.assertEqual(sorted(b0), ["x_a", "x_r", "x_v", "y_r", "y_v"])
            for k in b0:
                self.assertTrue(_dt_torch.equal(b0[k], b2[k]), k)
            self.assertEqual(b0["x_v"].shape, (4, 3, 12, 6))
            self.assertEqual(b0["y_v"].dtype, _dt_torch.int64)
            self.assertEqual(b0["y_v"].tolist(), b0["y_r"].tolist())
        self.assertFalse(_dt_torch.equal(runs[0][0]["x_v"], runs[0][3]["x_v"]))   # epochs differ
        state = _dt_data.train_loader(ts, 2, 2, seed=3, augment=aug).state_dict()
        other = _dt_data.train_loader(ts, 2, 2, seed=9, augment=aug)
        other.load_state_dict(state)
        self.assertTrue(_dt_torch.equal(next(other.epoch(1))["x_r"], runs[0][3]["x_r"]))

    def test_batch_is_labelled_crop_of_sampled_images(self):
        ts = _dt_trainset(h=10, w=5)
        loader = _dt_data.train_loader(ts, 2, 2, seed=0, augment=_dt_data.Augment(10, 5, pad=3, erasing=0))
        batches = loader.sampler.epoch(0)
        flips = set()
        for (iv, ir), b in zip(batches, loader.epoch(0)):
            for key, idx, s in (("x_v", iv, ts.v), ("x_r", ir, ts.r)):
                self.assertEqual(b["y" + key[1:]].tolist(), s.labels[idx].tolist())
                out = ((b[key] * _DT_STD + _DT_MEAN) * 255).round().to(_dt_torch.uint8).permute(0, 2, 3, 1).numpy()
                for img, src in zip(out, s.images[idx]):
                    padded = _dt_np.pad(src, ((3, 3), (3, 3), (0, 0)))
                    found = [(y, x, f) for y in range(7) for x in range(7) for f in (0, 1)
                             if (_dt_np.flip(padded[y:y + 10, x:x + 5], 1) if f else padded[y:y + 10, x:x + 5]).tolist()
                             == img.tolist()]
                    self.assertTrue(found)
                    flips |= {f for _, _, f in found}
        self.assertEqual(flips, {0, 1})

    def test_random_erasing_rectangles(self):
        aug = _dt_data.Augment(40, 20, pad=0, flip=False, erasing=1.0)
        x = _dt_torch.full((16, 40, 20, 3), 200, dtype=_dt_torch.uint8)
        g = _dt_torch.Generator().manual_seed(0)
        out = aug({"x_v": x, "y_v": _dt_torch.zeros(16, dtype=_dt_torch.int64)}, g)["x_v"]
        value = (200 / 255 - _DT_MEAN) / _DT_STD
        for img in out:
            zero = (img == 0).all(0)
            kept = _dt_torch.isclose(img, value.view(3, 1, 1).expand_as(img)).all(0)
            self.assertTrue((zero | kept).all())
            rows, cols = zero.any(1).nonzero()[:, 0], zero.any(0).nonzero()[:, 0]
            self.assertEqual(int(zero.sum()), len(rows) * len(cols))   # one filled rectangle
            self.assertEqual(len(rows), int(rows[-1] - rows[0]) + 1)
            self.assertTrue(0.015 <= zero.float().mean().item() <= 0.45)

    def test_test_batches(self):
        images = _dt_np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3), dtype=_dt_np.uint8)
        got = list(_dt_data.test_batches(images, 2))
        self.assertEqual([b.shape[0] for b in got], [2, 2, 1])
        expect = (_dt_torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - _DT_MEAN) / _DT_STD
        self.assertTrue(_dt_torch.allclose(_dt_torch.cat(got), expect, atol=1e-6))

    def test_splits(self):
        ts = _dt_trainset(n_ids=5, per=5)
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
                _dt_np.testing.assert_array_equal(s.images, full.images[src])
                _dt_np.testing.assert_array_equal(s.labels, full.labels[src])


class TestDataCache(_DTTree):
    def test_rebuilt_only_when_files_or_size_change(self):
        root = self.copy(self.sysu, "sysu-cache")
        cache = _dt_os.path.join(self.tmp, "cache-test")

        def load(h=_DT_H, w=_DT_W):
            logs = []
            train, test = _dt_data.load_sysu(root, h, w, cache, log=logs.append, expect_published=False)
            return train, test, [m for m in logs if m.startswith("caching")]
        _, _, built = load()
        self.assertEqual(len(built), 4)
        train, _, built = load()
        self.assertEqual(built, [])
        self.assertIsInstance(train.v.images, _dt_np.memmap)
        f = train.v.files[2]
        st = _dt_os.stat(f)
        _dt_os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))        # touch
        _, _, built = load()
        self.assertEqual(len(built), 1)
        self.assertIn("train-v", built[0])
        _dt_Image.new("RGB", (13, 29), (255, 0, 0)).save(f)                 # new content
        train, _, built = load()
        self.assertEqual(len(built), 1)
        _dt_np.testing.assert_array_equal(train.v.images[2], _dt_decode(f))
        self.assertTrue((train.v.images[2, ..., 0] > 250).all() and (train.v.images[2, ..., 1:] < 5).all())
        self.assertEqual(len(_dt_os.listdir(cache)), 4)                     # stale files removed
        train, _, built = load(h=20, w=10)
        self.assertEqual(len(built), 4)
        self.assertEqual(train.v.images.shape[1:], (20, 10, 3))
        self.assertFalse([n for n in _dt_os.listdir(cache) if ".tmp" in n])


    def test_decode_pool_matches_in_process(self):
        from unittest import mock
        files = self.load_sysu()[0].v.files
        with mock.patch.object(_dt_data, "POOL_MIN_IMAGES", 1):
            images = _dt_data.cached_images(files, _DT_H, _DT_W, _dt_os.path.join(self.tmp, "cache-pool"), "pool", lambda m: None)
            _dt_np.testing.assert_array_equal(images, _dt_np.stack([_dt_decode(f) for f in files]))
            root = self.copy(self.sysu, "sysu-pool-corrupt")
            bad = _dt_os.path.join(root, "cam2", "0005", "0002.jpg")
            with open(bad, "wb") as f:
                f.write(b"garbage")
            with self.assertRaises(_dt_data.DataError) as cm:
                self.load_sysu(root)
            self.assertIn(bad, str(cm.exception))


class TestDataErrors(_DTTree):
    def assertDataError(self, fn, *needles):
        with self.assertRaises(_dt_data.DataError) as cm:
            fn()
        for n in needles:
            self.assertIn(str(n), str(cm.exception))
        return str(cm.exception)

    def test_is_user_error(self):
        self.assertTrue(issubclass(_dt_data.DataError, _dt_UserError))

    def test_roots(self):
        missing = _dt_os.path.join(self.tmp, "nope")
        self.assertDataError(lambda: self.load_sysu(missing), missing)
        self.assertDataError(lambda: self.load_sysu(self.tmp), self.tmp, self.sysu)         # parent: suggests child
        self.assertDataError(lambda: _dt_data.load_regdb(self.tmp, 1, 8, 4, self.cache), self.regdb)
        self.assertDataError(lambda: _dt_data.load_regdb(missing, 1, 8, 4, self.cache), missing)

    def test_sysu_exp_files(self):
        root = self.copy(self.sysu, "sysu-bad-exp")
        val = _dt_os.path.join(root, "exp", "val_id.txt")
        _dt_os.remove(val)
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
        bad = _dt_os.path.join(root, "cam4", "0345", "0003.jpg")
        with open(bad, "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg")
        self.assertDataError(lambda: self.load_sysu(root), bad)

    def test_regdb_inputs(self):
        for trial in (0, 11, "1", 2.0):
            self.assertDataError(lambda: _dt_data.load_regdb(self.regdb, trial, 8, 4, self.cache), repr(trial), "1 to 10")
        self.assertDataError(lambda: _dt_data.load_regdb(self.regdb, 3, 8, 4, self.cache),
                             _dt_os.path.join(self.regdb, "idx", "train_visible_3.txt"))
        root = self.copy(self.regdb, "regdb-bad")
        idx = _dt_os.path.join(root, "idx", "test_thermal_1.txt")
        with open(idx) as f:
            lines = f.read().splitlines()
        with open(idx, "w") as f:
            f.write("\n".join([lines[0], "Thermal/4/only_a_path.bmp"] + lines[2:]) + "\n")
        self.assertDataError(lambda: _dt_data.load_regdb(root, 1, 8, 4, self.cache), idx, "line 2")
        with open(idx, "w") as f:
            f.write("\n".join([lines[0], "Thermal/4/missing.bmp 205"] + lines[2:]) + "\n")
        self.assertDataError(lambda: _dt_data.load_regdb(root, 1, 8, 4, self.cache), idx, "line 2", "missing.bmp")

    def test_cache_dir_not_writable(self):
        blocker = _dt_os.path.join(self.tmp, "a-file")
        open(blocker, "w").close()
        self.assertDataError(lambda: _dt_data.load_sysu(self.sysu, 8, 4, blocker, log=lambda m: None), blocker)

    def test_sampler_too_many_ids(self):
        labels = _dt_np.array([0, 0, 1, 1, 2])
        self.assertDataError(lambda: _dt_data.CrossModalitySampler(labels, _dt_np.array([0, 1]), 3, 2, 0), "P=3", "2")

# ==== end data ====

# ==== eval.py tests (TestEval*) ====

# ==== end eval ====

# ==== reid.py / agw tests (TestCLI*, TestAGW*) ====

# ==== end cli ====

# ==== methods/nfs.py tests (TestNFS*) ====

# ==== end nfs ====

# ==== methods/cmnas.py tests (TestCMNAS*) ====

# ==== end cmnas ====

# ==== methods/ssft.py tests (TestSSFT*) ====

# ==== end ssft ====

# ==== methods/rfm.py tests (TestRFM*) ====

# ==== end rfm ====

# ==== methods/mce.py tests (TestMCE*) ====

# ==== end mce ====

if __name__ == "__main__":
    unittest.main(verbosity=2)
