"""A synthetic visible-infrared person re-identification world, written in the real dataset layouts.

Real benchmarks cannot be downloaded by a script (SYSU-MM01 and RegDB both need a signed request), so the
default run and the tests use a generated world. It is built to pose the real problem:

- Identities are person-like figures: head, hair style, upper and lower clothing, shoes, an optional bag,
  a clothing pattern (stripes, logo, open jacket, two-tone sleeves), per-identity body proportions and gait.
  Clothing is drawn from a shared palette weighted by popularity, so many identities share colours and some
  share materials.
- Every surface is a *material* with a visible RGB reflectance, an independent near-infrared reflectance and
  a thermal emission value. Rendering follows RFM's reflection model (Tan et al., Sec. III): a pixel is
  shading x illumination x material reflectance, with the same shading (surface orientation, folds,
  shadows) in every band, so within one material the infrared / visible ratio is a constant and the
  constant differs between materials (Eq. 4). Colour does not carry over to infrared; shape, pattern
  geometry, bag and layout do (unless two materials of a pattern happen to match in infrared).
- Six SYSU-MM01-like cameras: visible 1, 2 (indoor), 4, 5 (outdoor); infrared 3 (indoor, active
  illumination: dark background, vignetting) and 6 (outdoor). Each has its own scene, illumination colour,
  exposure, gamma, saturation, blur, noise, JPEG quality and image size. Per (identity, camera) the images
  form a tracklet (one walking direction, advancing gait phase, occasional turn) with scale and position
  jitter, partial occlusion (poles, railings, other pedestrians) and sensor noise. Infrared images are one
  intensity replicated to three channels (camera 6 is written as single-channel grayscale JPEG files).
- LLCM-like: nine places, each a low-light visible camera and (but place 3) a near-infrared one.
- RegDB-like pairs: one dual camera (visible + thermal) captures the same walk; thermal pixels show
  emission (skin warm, clothing by material, background cool) rather than reflection.

Written layouts (those of the real datasets; README, "Running on the real benchmarks"):
    SYSU:  root/cam1..cam6/<4-digit id>/<4-digit n>.jpg, root/exp/{train,val,test}_id.txt
    RegDB: root/Visible/<id>/<gender>_<view>_v_<5-digit>_<k>.bmp, root/Thermal/<id>/..._t_..., and
           root/idx/{train,test}_{visible,thermal}_{1..10}.txt with lines "Visible/<id>/<name> <label>";
           train labels are relabelled 0..N-1 per trial, test labels are the folder ids (not 0..N-1).
    LLCM:  root/test_vis/cam1..cam9/<4-digit id>/*.jpg, root/test_nir/cam{1,2,4..9}/..., root/idx/test_id.txt,
           root/train_vis/cam<k>/<id>/*.jpg, root/train_nir/..., root/idx/train_{vis,nir}.txt ("<path> <label>");
           visible images are dark, noisy and low in contrast and colour (night-time cameras).
Every world is written into a temporary directory and renamed into place when complete, with
`synthetic.json` (kind, version, parameters, counts) as the completion marker; `ensure_world` reuses a
finished world with the same parameters. Everything is deterministic in the seed.

    python synthetic.py --out DIR [--regdb | --llcm] [--num-ids N] [--seed S] ...

Simplifications (this is a model of the datasets, not a paper method):
- Figures are 2-D layered shapes (ellipses, tapered limbs, trapezoids) with analytic shading, not 3-D models.
- Thermal emission is one value per material with a weak view-angle falloff; no heat transfer.
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from data import SYNTHETIC_MARKER as MARKER, UserError  # MARKER: the file at a world's root that names it synthetic

VERSION = 1              # bump when the rendering changes, so cached worlds are rebuilt
SUPERSAMPLE = 2          # render at 2x and box-filter down (anti-aliasing)
ANKLE_Y = 0.955          # body units: top of head 0, sole 1
TURN = 0.25              # probability that a walk changes view (front / back / side) once
OCCLUSION = 0.15         # probability that an image is partly occluded

# --------------------------------------------------------------------------------------------------
# Materials: sRGB colour (0-255), near-infrared reflectance range, thermal emission range
# --------------------------------------------------------------------------------------------------
# clothing colours and their popularity weight
FABRIC_COLOURS = {
    "black": ((22, 22, 24), 6), "charcoal": ((58, 58, 64), 3), "grey": ((125, 125, 128), 3),
    "white": ((232, 232, 226), 4), "navy": ((26, 34, 78), 4), "denim": ((60, 84, 122), 3),
    "blue": ((40, 80, 168), 2), "light blue": ((140, 172, 212), 2), "red": ((176, 32, 36), 2),
    "maroon": ((98, 26, 36), 1), "pink": ((226, 150, 168), 1), "yellow": ((228, 198, 52), 1),
    "green": ((42, 108, 60), 1), "olive": ((98, 104, 52), 1), "khaki": ((188, 168, 120), 2),
    "brown": ((108, 74, 46), 1), "beige": ((214, 200, 170), 1), "orange": ((228, 120, 42), 0.5),
    "purple": ((98, 60, 138), 0.5),
}
# fibre/dye families: how the infrared reflectance relates to the colour
#   cotton: dyes are transparent in near infrared, bright whatever the colour
#   synthetic: infrared follows the visible luminance with a material factor
#   carbon: carbon-black pigment, dark in infrared (dark colours only)
FIBRES = ("cotton", "synthetic", "carbon")
SKINS = [(250, 218, 190), (236, 192, 158), (206, 158, 120), (168, 118, 84), (108, 74, 54)]
HAIRS = {"black": ((24, 20, 18), (0.10, 0.20)), "dark brown": ((54, 36, 26), (0.18, 0.30)),
         "brown": ((100, 66, 40), (0.30, 0.42)), "blond": ((198, 168, 110), (0.50, 0.62)),
         "grey": ((160, 158, 156), (0.42, 0.55))}
SHOES = {"black leather": ((26, 26, 26), (0.06, 0.30)), "white sneaker": ((228, 228, 226), (0.62, 0.80)),
         "brown leather": ((92, 60, 40), (0.30, 0.45)), "grey sneaker": ((120, 120, 126), (0.25, 0.50))}
BAGS = {"black nylon": ((26, 26, 30), (0.04, 0.55)), "brown leather": ((110, 70, 42), (0.35, 0.50)),
        "navy": ((30, 40, 80), (0.15, 0.50)), "red": ((170, 40, 42), (0.45, 0.70)),
        "grey": ((112, 112, 112), (0.20, 0.45)), "khaki": ((180, 160, 112), (0.45, 0.65))}
# background materials: colour, infrared range, thermal range
INDOOR = {
    "wall white": ((226, 226, 216), (0.65, 0.80), (0.22, 0.28)), "wall cream": ((230, 214, 178), (0.60, 0.75), (0.22, 0.28)),
    "wall green": ((186, 208, 188), (0.45, 0.65), (0.22, 0.28)), "wall grey": ((186, 186, 192), (0.40, 0.60), (0.22, 0.28)),
    "floor tile": ((140, 140, 134), (0.35, 0.50), (0.20, 0.26)), "floor wood": ((150, 104, 64), (0.45, 0.60), (0.22, 0.28)),
    "floor dark": ((78, 78, 84), (0.15, 0.30), (0.20, 0.26)), "floor marble": ((204, 198, 188), (0.55, 0.70), (0.20, 0.26)),
    "door wood": ((118, 80, 50), (0.40, 0.55), (0.22, 0.28)), "door metal": ((150, 156, 162), (0.25, 0.40), (0.18, 0.24)),
    "glass": ((168, 198, 218), (0.20, 0.45), (0.12, 0.18)), "poster red": ((198, 42, 42), (0.60, 0.80), (0.22, 0.28)),
    "poster blue": ((40, 72, 160), (0.10, 0.30), (0.22, 0.28)), "poster yellow": ((230, 200, 62), (0.65, 0.85), (0.22, 0.28)),
    "skirting": ((58, 54, 50), (0.10, 0.25), (0.20, 0.26)), "bench": ((96, 62, 40), (0.30, 0.50), (0.20, 0.26)),
}
OUTDOOR = {
    "asphalt": ((70, 70, 72), (0.12, 0.22), (0.30, 0.38)), "pavement": ((160, 154, 144), (0.40, 0.50), (0.24, 0.32)),
    "brick paving": ((150, 82, 62), (0.50, 0.62), (0.24, 0.32)), "concrete": ((180, 178, 170), (0.45, 0.58), (0.18, 0.26)),
    "brick": ((140, 72, 52), (0.55, 0.68), (0.18, 0.26)), "foliage": ((48, 90, 40), (0.65, 0.85), (0.08, 0.14)),
    "grass": ((80, 128, 50), (0.60, 0.80), (0.08, 0.14)), "sky": ((172, 200, 234), (0.20, 0.35), (0.00, 0.04)),
    "metal": ((90, 96, 102), (0.20, 0.35), (0.12, 0.18)), "window": ((88, 108, 120), (0.10, 0.20), (0.10, 0.16)),
    "kerb": ((190, 190, 184), (0.50, 0.60), (0.24, 0.32)), "bark": ((80, 60, 44), (0.35, 0.45), (0.10, 0.16)),
    "car red": ((150, 30, 34), (0.45, 0.60), (0.14, 0.20)), "car white": ((220, 222, 224), (0.60, 0.75), (0.14, 0.20)),
}

# --------------------------------------------------------------------------------------------------
# Cameras. band: which reflectance the sensor sees; light: per-channel illumination (white balance);
# gain: exposure; background: infrared illuminator fall-off on distant surfaces; vignette: centre
# brightening of active illumination; size: image size factor; blur: Gaussian sigma (output pixels).
# --------------------------------------------------------------------------------------------------
SYSU_CAMERAS = {
    1: dict(band="rgb", indoor=True, light=(1.08, 1.0, 0.82), gain=1.05, gamma=2.2, saturation=0.95,
            background=1.0, vignette=0.0, size=1.0, blur=0.5, noise=0.012, quality=92, gray=False),
    2: dict(band="rgb", indoor=True, light=(0.92, 1.0, 1.06), gain=0.80, gamma=2.0, saturation=0.75,
            background=1.0, vignette=0.1, size=1.125, blur=0.9, noise=0.020, quality=85, gray=False),
    3: dict(band="nir", indoor=True, light=(1.0,), gain=1.0, gamma=2.0, saturation=1.0,
            background=0.4, vignette=0.45, size=0.875, blur=0.8, noise=0.015, quality=88, gray=False),
    4: dict(band="rgb", indoor=False, light=(1.0, 1.0, 1.04), gain=1.20, gamma=2.2, saturation=1.0,
            background=1.0, vignette=0.0, size=1.0, blur=0.6, noise=0.010, quality=92, gray=False),
    5: dict(band="rgb", indoor=False, light=(1.02, 1.0, 0.94), gain=0.95, gamma=2.4, saturation=0.85,
            background=1.0, vignette=0.0, size=1.25, blur=1.1, noise=0.015, quality=80, gray=False),
    6: dict(band="nir", indoor=False, light=(1.0,), gain=0.9, gamma=2.2, saturation=1.0,
            background=0.55, vignette=0.25, size=0.875, blur=1.0, noise=0.020, quality=85, gray=True),
}
SYSU_VISIBLE = (1, 2, 4, 5)
SYSU_INFRARED = (3, 6)
LLCM_VISIBLE = tuple(range(1, 10))       # LLCM: nine cameras film in visible light at night ...
LLCM_INFRARED = (1, 2, 4, 5, 6, 7, 8, 9)  # ... and eight of them in near infrared (no infrared camera 3)


def llcm_cameras():
    """LLCM-like cameras: each place k has a low-light visible camera 'v<k>' (dark, noisy, low contrast and
    colour) and, except place 3, a near-infrared one 'r<k>' (active illumination)."""
    cams = {}
    for k in LLCM_VISIBLE:
        indoor = k in (1, 2, 3)
        cams[f"v{k}"] = dict(band="rgb", indoor=indoor, light=(1.0, 0.92, 0.78), gain=0.28 + 0.03 * (k % 3),
                             gamma=1.8, saturation=0.45, background=1.0, vignette=0.15, size=1.0, blur=1.0,
                             noise=0.045, quality=80, gray=False, place=k)
        if k in LLCM_INFRARED:
            cams[f"r{k}"] = dict(band="nir", indoor=indoor, light=(1.0,), gain=0.9, gamma=2.0, saturation=1.0,
                                 background=0.45, vignette=0.35, size=1.0, blur=0.9, noise=0.02, quality=85,
                                 gray=False, place=k)
    return cams
REGDB_CAMERAS = {
    "v": dict(band="rgb", indoor=False, light=(1.0, 0.96, 0.86), gain=0.85, gamma=2.2, saturation=0.8,
              background=1.0, vignette=0.0, size=1.0, blur=0.7, noise=0.020, quality=None, gray=False),
    "t": dict(band="thermal", indoor=False, light=(1.0,), gain=1.0, gamma=1.0, saturation=1.0,
              background=1.0, vignette=0.0, size=1.0, blur=1.6, noise=0.020, quality=None, gray=True),
}


def _linear(srgb):
    """sRGB 0-255 -> linear reflectance in [0, 1] (gamma 2.2)."""
    return (np.asarray(srgb, np.float64) / 255.0) ** 2.2


@dataclass
class Materials:
    rgb: np.ndarray        # (M, 3) linear visible reflectance
    nir: np.ndarray        # (M, 1) near-infrared reflectance
    thermal: np.ndarray    # (M, 1) thermal emission
    names: list            # (M,) human-readable names
    groups: dict           # 'fabric' | 'skin' | 'hair' | 'shoes' | 'bag' | 'indoor' | 'outdoor' -> index array
    fabric_weight: np.ndarray  # (n_fabric,) popularity of each fabric material
    first_background: int  # labels >= this are scenery (infrared illuminator fall-off applies)

    def band(self, band):
        """(M, C) reflectance (or emission) table of band 'rgb', 'nir' or 'thermal'."""
        return {"rgb": self.rgb, "nir": self.nir, "thermal": self.thermal}[band]


def make_materials(rng):
    """The material table of one world. Infrared reflectance depends on the fibre family (cotton: bright
    whatever the colour; synthetic: a random multiple of the luminance; carbon black: dark), so the
    per-material factor NIR / visible (RFM Eq. 4) varies widely: same colour, different infrared."""
    rgb, nir, thermal, names, groups, weight = [], [], [], [], {}, []

    def add(group, name, srgb, ir, th):
        groups.setdefault(group, []).append(len(names))
        jitter = rng.uniform(0.92, 1.08, 3)
        rgb.append(np.clip(_linear(srgb) * jitter, 0.004, 0.92))
        nir.append(ir)
        thermal.append(th)
        names.append(f"{group}: {name}")

    for colour, (srgb, popularity) in FABRIC_COLOURS.items():
        dark = np.mean(srgb) < 70
        fibres = rng.choice(FIBRES if dark else FIBRES[:2], size=2, replace=False)
        for fibre in fibres:
            lum = float(_linear(srgb) @ (0.2126, 0.7152, 0.0722))
            ir = {"cotton": rng.uniform(0.35, 0.80),
                  "synthetic": np.clip(lum * rng.uniform(0.5, 2.5) + rng.uniform(0.0, 0.15), 0.03, 0.9),
                  "carbon": rng.uniform(0.03, 0.12)}[fibre]
            add("fabric", f"{colour} {fibre}", srgb, ir, rng.uniform(0.50, 0.80))
            weight.append(popularity)
    for i, srgb in enumerate(SKINS):
        add("skin", f"tone {i}", srgb, 0.60 - 0.03 * i + rng.uniform(-0.03, 0.03), rng.uniform(0.90, 0.96))
    for group, table, heat in (("hair", HAIRS, (0.60, 0.70)), ("shoes", SHOES, (0.36, 0.48)),
                               ("bag", BAGS, (0.28, 0.40))):
        for name, (srgb, ir_range) in table.items():
            add(group, name, srgb, rng.uniform(*ir_range), rng.uniform(*heat))
    first_background = len(names)
    for group, table in (("indoor", INDOOR), ("outdoor", OUTDOOR)):
        for name, (srgb, ir_range, heat) in table.items():
            add(group, name, srgb, rng.uniform(*ir_range), rng.uniform(*heat))
    weight = np.asarray(weight, np.float64)
    return Materials(rgb=np.asarray(rgb, np.float32), nir=np.asarray(nir, np.float32)[:, None],
                     thermal=np.asarray(thermal, np.float32)[:, None], names=names,
                     groups={k: np.asarray(v) for k, v in groups.items()},
                     fabric_weight=weight / weight.sum(), first_background=first_background)


def material_index(mats, group, name):
    """Index of a named material, e.g. material_index(mats, 'indoor', 'wall white')."""
    return mats.names.index(f"{group}: {name}")


# --------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------
@dataclass
class Person:
    male: bool
    # proportions, body units (height 1)
    head_ry: float; head_rx: float; shoulder_y: float; shoulder_hw: float; waist_y: float; waist_hw: float
    crotch_y: float; hip_hw: float; hem_y: float; arm_len: float; arm_r: float; leg_r: float
    arm_out: float; stride: float
    # appearance
    skin: int; hair: int; hair_style: str; hair_end: float; hat: int
    upper: int; upper2: int; sleeves: str; pattern: str; pattern_size: float; pattern_phase: float
    logo: str; lower: int; lower_style: str; legwear: int; shoes: int    # legwear -1: bare legs
    bag: int; bag_style: str; bag_side: int; bag_w: float; bag_h: float


def make_person(rng, mats):
    """One identity: proportions, clothing materials, pattern, hair, bag (all from `rng`)."""
    male = bool(rng.random() < 0.55)
    fabrics, weight = mats.groups["fabric"], mats.fabric_weight

    def fabric(exclude=()):
        w = weight.copy()
        w[np.isin(fabrics, exclude)] = 0
        return int(rng.choice(fabrics, p=w / w.sum()))

    head_ry = rng.uniform(0.060, 0.070)
    shoulder_y = 2 * head_ry + rng.uniform(0.030, 0.045)
    waist_y = shoulder_y + rng.uniform(0.25, 0.30)
    crotch_y = waist_y + rng.uniform(0.06, 0.09)
    shoulder_hw = rng.uniform(0.115, 0.145) if male else rng.uniform(0.100, 0.125)
    hip_hw = rng.uniform(0.085, 0.105) if male else rng.uniform(0.095, 0.115)
    upper = fabric()
    pattern = rng.choice(["plain", "hstripes", "vstripes", "logo", "twotone", "jacket"],
                         p=[0.34, 0.16, 0.07, 0.18, 0.10, 0.15])
    styles = (["short", "cropped", "cap", "long"], [0.62, 0.18, 0.14, 0.06]) if male else \
        (["long", "ponytail", "short", "cap"], [0.45, 0.27, 0.18, 0.10])
    hair_style = str(rng.choice(styles[0], p=styles[1]))
    lower_style = str(rng.choice(["trousers", "shorts", "skirt"], p=[0.8, 0.2, 0.0] if male else [0.55, 0.15, 0.30]))
    bag_style = str(rng.choice(["none", "backpack", "shoulder", "handbag"],
                               p=[0.38, 0.28, 0.20, 0.14] if male else [0.30, 0.22, 0.26, 0.22]))
    return Person(
        male=male, head_ry=head_ry, head_rx=head_ry * rng.uniform(0.74, 0.86), shoulder_y=shoulder_y,
        shoulder_hw=shoulder_hw, waist_y=waist_y, waist_hw=min(shoulder_hw, hip_hw) * rng.uniform(0.80, 0.95),
        crotch_y=crotch_y, hip_hw=hip_hw, hem_y=waist_y + rng.uniform(-0.02, 0.12),
        arm_len=rng.uniform(0.33, 0.38), arm_r=rng.uniform(0.024, 0.032), leg_r=rng.uniform(0.038, 0.050),
        arm_out=rng.uniform(0.04, 0.14), stride=rng.uniform(0.22, 0.42),
        skin=int(rng.choice(mats.groups["skin"])), hair=int(rng.choice(mats.groups["hair"], p=[0.45, 0.25, 0.15, 0.1, 0.05])),
        hair_style=hair_style, hair_end=rng.uniform(0.25, 0.38), hat=fabric(),
        upper=upper, upper2=fabric(exclude=(upper,)), sleeves=str(rng.choice(["long", "short"], p=[0.6, 0.4])),
        pattern=str(pattern), pattern_size=rng.uniform(0.030, 0.070), pattern_phase=rng.uniform(0.3, 0.6),
        logo=str(rng.choice(["circle", "square", "diamond", "bar"])), lower=fabric(exclude=(upper,)),
        lower_style=lower_style, legwear=fabric() if rng.random() < 0.3 else -1,
        shoes=int(rng.choice(mats.groups["shoes"])), bag=int(rng.choice(mats.groups["bag"])), bag_style=bag_style,
        bag_side=int(rng.choice([-1, 1])), bag_w=rng.uniform(0.06, 0.10), bag_h=rng.uniform(0.12, 0.22))


# --------------------------------------------------------------------------------------------------
# Rasterisation: a canvas of material labels and shading, painted back to front
# --------------------------------------------------------------------------------------------------
class Canvas:
    """label (H, W) uint8 material index; shade (H, W) float32 Lambertian shading shared by all bands."""

    def __init__(self, label, shade):
        self.label, self.shade = label, shade

    def _window(self, y0, y1, x0, x1):
        H, W = self.label.shape
        r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, H)
        c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, W)
        if r0 >= r1 or c0 >= c1:
            return None
        Y = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5   # (h, 1) pixel centres
        X = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5   # (1, w)
        return (slice(r0, r1), slice(c0, c1)), Y, X

    def _paint(self, sl, Y, X, mask, sigma, material, pattern, dim):
        lab = np.full(mask.shape, material, np.uint8)
        if pattern is not None:
            second, where = pattern
            lab[np.broadcast_to(where(Y, X), mask.shape)] = second
        self.label[sl][mask] = lab[mask]
        self.shade[sl][mask] = dim * sigma[mask]

    def ellipse(self, cy, cx, ry, rx, material, pattern=None, dim=1.0):
        win = self._window(cy - ry, cy + ry, cx - rx, cx + rx)
        if win is None:
            return
        sl, Y, X = win
        rho2 = ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2          # (h, w)
        mask = rho2 <= 1
        self._paint(sl, Y, X, mask, 0.5 + 0.5 * np.sqrt(np.clip(1 - rho2, 0, 1)), material, pattern, dim)

    def limb(self, y0, x0, y1, x1, r0, r1, material, pattern=None, dim=1.0):
        """Tapered capsule from (y0, x0) radius r0 to (y1, x1) radius r1."""
        r = max(r0, r1)
        win = self._window(min(y0, y1) - r, max(y0, y1) + r, min(x0, x1) - r, max(x0, x1) + r)
        if win is None:
            return
        sl, Y, X = win
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((Y - y0) * dy + (X - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        dist = np.hypot(Y - (y0 + t * dy), X - (x0 + t * dx))       # (h, w)
        rad = r0 + t * (r1 - r0)
        mask = dist <= rad
        sigma = 0.5 + 0.5 * np.sqrt(np.clip(1 - (dist / rad) ** 2, 0, 1))
        self._paint(sl, Y, X, mask, sigma, material, pattern, dim)

    def quad(self, y0, y1, l0, r0, l1, r1, material, pattern=None, dim=1.0, flat=False):
        """Trapezoid between rows y0 < y1 whose left/right edges run from l0/r0 (top) to l1/r1 (bottom)."""
        win = self._window(y0, y1, min(l0, l1), max(r0, r1))
        if win is None or y1 <= y0:
            return
        sl, Y, X = win
        a = np.clip((Y - y0) / (y1 - y0), 0, 1)
        left, right = l0 + a * (l1 - l0), r0 + a * (r1 - r0)          # (h, 1)
        mask = (Y >= y0) & (Y < y1) & (X >= left) & (X < right)
        u = (2 * X - left - right) / np.maximum(right - left, 1e-3)
        sigma = np.ones_like(u) if flat else 0.6 + 0.4 * np.sqrt(np.clip(1 - u * u, 0, 1))
        self._paint(sl, Y, X, np.broadcast_to(mask, u.shape), sigma, material, pattern, dim)

    def darken(self, cy, cx, ry, rx, factor):
        """Soft shadow (e.g. under the feet): multiply shading inside an ellipse."""
        win = self._window(cy - ry, cy + ry, cx - rx, cx + rx)
        if win is not None:
            sl, Y, X = win
            rho2 = ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2
            self.shade[sl] *= np.where(rho2 <= 1, factor + (1 - factor) * rho2, 1.0).astype(np.float32)


def _torso_pattern(p, view, Y, X, S, cx):
    """(second material, where(Y, X)) for the upper garment, in pixel coordinates; None if plain."""
    top = Y(p.shoulder_y)
    period = p.pattern_size * S
    if p.pattern == "hstripes":
        return p.upper2, lambda y, x: ((y - top) / period) % 1.0 < p.pattern_phase
    if p.pattern == "vstripes":
        return p.upper2, lambda y, x: ((x - cx) / period + 0.5 * p.pattern_phase) % 1.0 < p.pattern_phase
    if p.pattern == "jacket" and view == "front":
        half = (0.02 + 0.3 * p.pattern_size) * S
        return p.upper2, lambda y, x: np.abs(x - cx) < half
    if p.pattern == "logo" and (view == "front" or p.logo == "bar"):
        ly, r = Y(p.shoulder_y + 0.09), 0.6 * period + 0.02 * S
        shapes = {"circle": lambda y, x: (y - ly) ** 2 + (x - cx) ** 2 < r * r,
                  "square": lambda y, x: np.maximum(np.abs(y - ly), np.abs(x - cx)) < 0.8 * r,
                  "diamond": lambda y, x: np.abs(y - ly) + np.abs(x - cx) < 1.1 * r,
                  "bar": lambda y, x: np.abs(y - ly) < 0.45 * r}
        return p.upper2, shapes[p.logo]
    return None


def draw_person(cv, p, view, phase, cx, foot, S, facing=1):
    """Paint person `p` on canvas `cv`. view: 'front' | 'back' | 'side'; facing: +1 right / -1 left (side);
    phase: gait phase (radians); cx, foot: pixel column of the body axis and row of the soles; S: height px."""
    top = foot - S
    m = -1 if view == "back" else 1                      # mirror handed features seen from the back

    def Y(y):
        return top + y * S

    def X(x):
        return cx + x * S

    ry, rx = p.head_ry * S, p.head_rx * S
    hcy = Y(p.head_ry + 0.005)
    sy, wy, cy_ = p.shoulder_y, p.waist_y, p.crotch_y
    knee = 0.5 * (cy_ + ANKLE_Y)
    pattern = _torso_pattern(p, view, Y, X, S, cx)
    sleeve = p.upper2 if p.pattern == "twotone" else p.upper
    side = view == "side"
    d = facing if side else 1

    def leg(hip_x, ankle_y, ankle_x, dim=1.0):
        hy, r = Y(cy_ - 0.03), p.leg_r * S
        ay, ax, hx = Y(ankle_y), X(ankle_x), X(hip_x)
        ky, kx = 0.5 * (hy + ay), 0.5 * (hx + ax)
        bare = p.skin if p.legwear < 0 else p.legwear
        if p.lower_style == "trousers":
            cv.limb(hy, hx, ay, ax, r, 0.72 * r, p.lower, dim=dim)
        else:
            cv.limb(hy, hx, ay, ax, 0.9 * r, 0.62 * r, bare, dim=dim)
            if p.lower_style == "shorts":
                cv.limb(hy, hx, ky, kx, 1.05 * r, 0.95 * r, p.lower, dim=dim)
        cv.ellipse(ay + 0.018 * S, ax + d * (0.022 * S if side else 0), 0.022 * S,
                   (0.046 if side else 0.032) * S, p.shoes, dim=dim)

    def arm(sx, angle, dim=1.0):
        """Arm hanging from shoulder column sx (body units), swung by `angle` (radians, + = towards +x)."""
        y0, x0 = Y(sy + 0.03), X(sx)
        length, r = p.arm_len * S, p.arm_r * S
        y1, x1 = y0 + length * math.cos(angle), x0 + length * math.sin(angle)
        if p.sleeves == "long":
            cv.limb(y0, x0, y0 + 0.93 * (y1 - y0), x0 + 0.93 * (x1 - x0), r, 0.8 * r, sleeve, dim=dim)
        else:
            cv.limb(y0, x0, y1, x1, 0.85 * r, 0.7 * r, p.skin, dim=dim)
            cv.limb(y0, x0, y0 + 0.45 * (y1 - y0), x0 + 0.45 * (x1 - x0), 1.1 * r, r, sleeve, dim=dim)
        cv.ellipse(y1, x1, 0.85 * r, 0.75 * r, p.skin, dim=dim)
        return y1, x1

    def bag_box(y, x, dim=1.0):
        w, h = p.bag_w * S, p.bag_h * S * (0.6 if p.bag_style == "handbag" else 0.75)
        cv.quad(y, y + h, x - w, x + w, x - 1.05 * w, x + 1.05 * w, p.bag, dim=dim)

    def head():
        if p.hair_style == "ponytail" and view != "front":
            cv.limb(hcy, X(-d * p.head_rx * 0.9 if side else 0), hcy + 0.13 * S,
                    X(-d * p.head_rx * 1.4 if side else 0), 0.02 * S, 0.012 * S, p.hair)
        cv.ellipse(hcy, cx, ry, rx, p.skin)                                  # face / skull
        if p.hair_style == "cropped":
            cv.ellipse(hcy - 0.45 * ry, cx - (d * 0.1 * rx if side else 0), 0.6 * ry, 0.97 * rx, p.hair)
        elif view == "front":
            cv.ellipse(hcy - 0.45 * ry, cx, 0.62 * ry, 1.04 * rx, p.hair)
            if p.hair_style == "long":
                for s in (-1, 1):
                    cv.limb(hcy - 0.3 * ry, cx + s * 0.85 * rx, hcy + 1.1 * ry, cx + s * 0.95 * rx,
                            0.22 * rx, 0.25 * rx, p.hair)
        elif view == "back":
            cv.ellipse(hcy - 0.12 * ry, cx, 0.92 * ry, 1.05 * rx, p.hair)
        else:
            cv.ellipse(hcy - 0.15 * ry, cx - d * 0.22 * rx, 0.88 * ry, 0.85 * rx, p.hair)
        if p.hair_style == "cap":
            cv.ellipse(hcy - 0.45 * ry, cx, 0.62 * ry, 1.07 * rx, p.hat)
            if view == "front":
                cv.ellipse(hcy - 0.1 * ry, cx, 0.16 * ry, 1.12 * rx, p.hat, dim=0.8)
            elif side:
                cv.limb(hcy - 0.18 * ry, cx, hcy - 0.15 * ry, cx + d * 1.6 * rx, 0.1 * ry, 0.1 * ry, p.hat, dim=0.8)

    if not side:
        if p.hair_style == "long" and view == "front":       # long hair seen behind the shoulders
            cv.quad(hcy, Y(p.hair_end), cx - 1.15 * rx, cx + 1.15 * rx, cx - 1.3 * rx, cx + 1.3 * rx, p.hair)
        for i in (-1, 1):
            lift = 0.035 * max(0.0, math.sin(phase + (i > 0) * math.pi))
            leg(i * p.hip_hw * 0.5, ANKLE_Y - lift, i * p.hip_hw * 0.45)
        if p.lower_style == "skirt":
            cv.quad(Y(wy - 0.01), Y(knee + 0.03), X(-p.waist_hw), X(p.waist_hw), X(-1.5 * p.hip_hw), X(1.5 * p.hip_hw), p.lower)
        else:
            cv.quad(Y(wy - 0.01), Y(cy_ + 0.02), X(-p.waist_hw), X(p.waist_hw), X(-p.hip_hw), X(p.hip_hw), p.lower)
        cv.quad(Y(sy), Y(wy), X(-p.shoulder_hw), X(p.shoulder_hw), X(-p.waist_hw), X(p.waist_hw), p.upper, pattern)
        cv.quad(Y(wy - 0.005), Y(max(p.hem_y, wy)), X(-p.waist_hw), X(p.waist_hw),
                X(-1.04 * p.hip_hw), X(1.04 * p.hip_hw), p.upper, pattern)
        hands = {}
        for i in (-1, 1):
            swing = math.sin(phase + (i < 0) * math.pi)
            cv.ellipse(Y(sy + 0.03), X(i * (p.shoulder_hw - p.arm_r)), 0.035 * S, 0.035 * S, sleeve)
            hands[i] = arm(i * (p.shoulder_hw - p.arm_r), i * (p.arm_out + 0.04 * swing))
        cv.limb(hcy + 0.6 * ry, cx, Y(sy + 0.01), cx, 0.028 * S, 0.032 * S, p.skin)   # neck
        head()
        if view == "back" and p.hair_style == "long":
            cv.quad(hcy, Y(p.hair_end), cx - 1.05 * rx, cx + 1.05 * rx, cx - 1.25 * rx, cx + 1.25 * rx, p.hair)
        b = p.bag_side * m
        if p.bag_style == "backpack":
            if view == "back":
                w = p.bag_w * 1.3 * S
                cv.quad(Y(sy + 0.03), Y(sy + 0.03 + p.bag_h * 1.2), cx - w, cx + w, cx - 1.08 * w, cx + 1.08 * w, p.bag)
            else:
                for s in (-1, 1):
                    cv.limb(Y(sy), X(s * 0.55 * p.shoulder_hw), Y(sy + 0.17), X(s * 0.62 * p.shoulder_hw),
                            0.013 * S, 0.013 * S, p.bag, dim=0.9)
        elif p.bag_style == "shoulder":
            cv.limb(Y(sy), X(-b * 0.5 * p.shoulder_hw), Y(wy), X(b * p.hip_hw), 0.009 * S, 0.009 * S, p.bag, dim=0.9)
            bag_box(Y(wy - 0.02), X(b * (p.hip_hw + 0.5 * p.bag_w)))
        elif p.bag_style == "handbag":
            hy, hx = hands[b]
            bag_box(hy + 0.015 * S, hx)
        return

    # side view: far limbs first (dimmed), then body, then near limbs
    near_bag = p.bag_side * facing > 0
    swing = math.sin(phase)
    arm_sx = -facing * 0.01
    if p.bag_style in ("shoulder", "handbag") and not near_bag:
        y = Y(wy - 0.02) if p.bag_style == "shoulder" else Y(sy + 0.03 + p.arm_len)
        bag_box(y, X(facing * 0.03 * swing), dim=0.8)
    arm(arm_sx, facing * 0.7 * p.stride * swing, dim=0.8)
    for i, dim in ((-1, 0.82), (1, 1.0)):
        theta = i * p.stride * swing
        length = ANKLE_Y - (cy_ - 0.03)
        leg(0.0, cy_ - 0.03 + length * math.cos(theta), facing * length * math.sin(theta), dim)
    td, wd, hd = 0.55 * p.shoulder_hw, 0.75 * p.waist_hw, 0.8 * p.hip_hw    # half depths of the body
    if p.bag_style == "backpack":
        x0, x1 = sorted((X(-facing * td * 0.8), X(-facing * (td + 0.5 * p.bag_w + 0.03))))
        cv.quad(Y(sy + 0.03), Y(sy + 0.03 + p.bag_h), x0, x1, x0, x1, p.bag)
    chest = facing * 0.01
    if p.lower_style == "skirt":
        cv.quad(Y(wy - 0.01), Y(knee + 0.03), X(-wd), X(wd), X(-1.4 * hd), X(1.4 * hd), p.lower)
    else:
        cv.quad(Y(wy - 0.01), Y(cy_ + 0.02), X(-wd), X(wd), X(-hd), X(hd), p.lower)
    cv.quad(Y(sy), Y(wy), X(chest - td), X(chest + td), X(-wd), X(wd), p.upper, pattern)
    cv.quad(Y(wy - 0.005), Y(max(p.hem_y, wy)), X(-wd), X(wd), X(-1.04 * hd), X(1.04 * hd), p.upper, pattern)
    if p.hair_style == "long":
        x0, x1 = sorted((cx - facing * 0.1 * rx, cx - facing * 1.1 * rx))
        cv.quad(hcy, Y(p.hair_end), x0, x1, x0, x1, p.hair)
    cv.limb(hcy + 0.6 * ry, cx, Y(sy + 0.01), cx, 0.028 * S, 0.03 * S, p.skin)
    head()
    if p.bag_style == "shoulder" and near_bag:
        cv.limb(Y(sy), X(-facing * 0.3 * td), Y(wy), X(facing * 0.3 * td), 0.009 * S, 0.009 * S, p.bag, dim=0.9)
    hy, hx = arm(arm_sx, -facing * 0.7 * p.stride * swing)
    if near_bag and p.bag_style == "shoulder":
        bag_box(Y(wy - 0.02), X(-facing * 0.02))
    elif near_bag and p.bag_style == "handbag":
        bag_box(hy + 0.015 * S, hx)


# --------------------------------------------------------------------------------------------------
# Scenery: one panorama (label + shade) per camera; each image crops a window of it
# --------------------------------------------------------------------------------------------------
def smooth_noise(rng, h, w, cell):
    """(h, w) float32 smooth noise, unit-ish variance, correlation length ~`cell` pixels."""
    coarse = rng.standard_normal((h // cell + 3, w // cell + 3)).astype(np.float32)
    big = Image.fromarray(coarse).resize(((w // cell + 3) * cell, (h // cell + 3) * cell), Image.BICUBIC)
    return np.asarray(big)[cell:cell + h, cell:cell + w]


def make_scene(rng, mats, indoor, H, W):
    """A camera's surroundings as a Canvas of size (H, W): walls, floor, doors, posters (indoor) or
    buildings, vegetation, sky, paving, poles, kerbs (outdoor)."""
    cv = Canvas(np.zeros((H, W), np.uint8), np.ones((H, W), np.float32))
    group = "indoor" if indoor else "outdoor"

    def mat(*names):
        return material_index(mats, group, str(rng.choice(names)))

    ground = int(H * rng.uniform(0.70, 0.80))
    Yc = np.arange(H, dtype=np.float32)[:, None]
    Xc = np.arange(W, dtype=np.float32)[None, :]
    if indoor:
        wall, floor = mat("wall white", "wall cream", "wall green", "wall grey"), \
            mat("floor tile", "floor wood", "floor dark", "floor marble")
        cv.label[:ground], cv.label[ground:] = wall, floor
        if rng.random() < 0.5:                                   # dado band
            cv.label[int(ground - H * rng.uniform(0.2, 0.32)):ground] = mat("wall grey", "wall green", "floor wood")
        x = rng.uniform(0, 0.3) * W
        while x < W:                                             # doors, windows, notice boards
            kind = rng.choice(["door", "glass", "poster", "gap"])
            w = rng.uniform(0.08, 0.16) * W
            if kind == "door":
                cv.quad(ground - 0.62 * H, ground, x, x + w, x, x + w, mat("door wood", "door metal"), flat=True)
                cv.quad(ground - 0.62 * H, ground, x, x + 0.06 * w, x, x + 0.06 * w, mat("skirting"), flat=True)
            elif kind == "glass":
                cv.quad(ground - 0.6 * H, ground - 0.22 * H, x, x + w, x, x + w, mat("glass"), flat=True)
            elif kind == "poster":
                y0 = ground - rng.uniform(0.45, 0.6) * H
                cv.quad(y0, y0 + 0.2 * H, x, x + 0.6 * w, x, x + 0.6 * w,
                        mat("poster red", "poster blue", "poster yellow"), flat=True)
            x += w + rng.uniform(0.05, 0.25) * W
        cv.label[ground - max(2, H // 60):ground] = mat("skirting")
        spacing = rng.uniform(0.05, 0.1) * W                     # floor tile grout lines
        cv.shade[ground:] *= np.where((Xc % spacing) < 1.5, 0.8, 1.0) * \
            np.where(((Yc[ground:] - ground) % (spacing * 0.35)) < 1.2, 0.85, 1.0)
        cv.shade[:ground] *= (0.8 + 0.2 * Yc[:ground] / ground)  # ceiling light falls off downwards
    else:
        pave = mat("asphalt", "pavement", "brick paving")
        cv.label[ground:] = pave
        back = rng.choice(["building", "hedge", "open"])
        if back == "building":
            cv.label[:ground] = mat("concrete", "brick")
            win_w, win_h = rng.uniform(0.05, 0.1) * W, rng.uniform(0.12, 0.2) * H
            for x in np.arange(rng.uniform(0, win_w), W, win_w * rng.uniform(1.6, 2.4)):
                for y in np.arange(rng.uniform(0, 0.1) * H, ground - win_h - 0.1 * H, win_h * 1.8):
                    cv.quad(y, y + win_h, x, x + win_w, x, x + win_w, mat("window"), flat=True)
        else:
            cv.label[:ground] = mat("sky")
            hedge = ground - rng.uniform(0.15, 0.35 if back == "hedge" else 0.2) * H
            cv.quad(hedge, ground, 0, W, 0, W, mat("foliage", "grass"), flat=True)
            for x in rng.uniform(0, W, int(W / H * 2) + 1):      # trees
                cv.limb(hedge - 0.25 * H, x, ground, x, 0.02 * H, 0.03 * H, mat("bark"))
                cv.ellipse(hedge - 0.35 * H, x, 0.3 * H, 0.25 * H, mat("foliage"))
        cv.label[ground:ground + max(2, H // 40)] = mat("kerb")
        for x in rng.uniform(0, W, int(W / H * 1.5) + 1):        # lamp posts, bollards
            tall = rng.random() < 0.5
            cv.limb(ground - (0.9 if tall else 0.2) * H, x, ground + 0.02 * H, x,
                    0.012 * H, 0.015 * H, mat("metal"))
        spacing = rng.uniform(0.06, 0.12) * W
        cv.shade[ground:] *= np.where((Xc % spacing) < 1.2, 0.85, 1.0)
    cv.shade *= 1 + 0.08 * smooth_noise(rng, H, W, max(4, H // 12))
    return cv


# --------------------------------------------------------------------------------------------------
# Imaging: Eq. (4) radiance, then illumination, exposure, gamma, blur, noise
# --------------------------------------------------------------------------------------------------
def radiance(label, shade, reflectance):
    """Lambertian image of one band: (H, W, C) = shade (H, W) x reflectance[label] ((M, C) table).
    Within one material every band scales with the same shade, so band ratios are per-material constants."""
    # Eq. (4): rho_N / rho_G = omega_N M(N) / (omega_G M(G)): the shading sigma(x, y) cancels
    return shade[..., None] * reflectance[label]


def _illumination(cam, H, W, gradient):
    """(H, W) spatial illumination: directional gradient and, for infrared illuminators, vignetting."""
    Y = (np.arange(H, dtype=np.float32)[:, None] + 0.5) / H - 0.5
    X = (np.arange(W, dtype=np.float32)[None, :] + 0.5) / W - 0.5
    light = 1 + gradient * X
    if cam["vignette"]:
        light = light * (1 - cam["vignette"] * (2 * X * X + 1.2 * Y * Y))
    return np.broadcast_to(light, (H, W))


def expose(cv, mats, cam, rng, exposure, gradient):
    """Camera pipeline: radiance -> illumination -> pixel integration (downsample) -> gamma -> blur -> noise.
    Returns (h, w, 3) uint8 (visible) or (h, w) uint8 (infrared / thermal intensity)."""
    band = cam["band"]
    shade = cv.shade if band != "thermal" else 0.85 + 0.15 * cv.shade     # emission: weak view-angle falloff
    img = radiance(cv.label, shade, mats.band(band))                         # (H, W, C)
    light = _illumination(cam, *cv.label.shape, gradient)
    if cam["background"] != 1.0:
        light = np.where(cv.label >= mats.first_background, cam["background"] * light, light)
    img *= light[..., None] * np.float32(exposure * cam["gain"]) * np.asarray(cam["light"], np.float32)
    img = sum(img[i::SUPERSAMPLE, j::SUPERSAMPLE] for i in range(SUPERSAMPLE)
              for j in range(SUPERSAMPLE)) / SUPERSAMPLE ** 2                # (h, w, C) sensor pixels
    img = np.clip(img, 0, 1) ** np.float32(1 / cam["gamma"])
    if band == "rgb" and cam["saturation"] != 1.0:
        grey = img.mean(axis=2, keepdims=True)
        img = np.clip(grey + np.float32(cam["saturation"]) * (img - grey), 0, 1)
    pil = Image.fromarray(np.uint8(img[..., 0] * 255 + 0.5 if img.shape[2] == 1 else img * 255 + 0.5))
    pil = pil.filter(ImageFilter.GaussianBlur(cam["blur"] * rng.uniform(0.7, 1.4)))
    out = np.asarray(pil, np.float32) + np.float32(cam["noise"] * 255) * rng.standard_normal(pil.size[::-1] + (() if pil.mode == "L" else (3,)), np.float32)
    return np.uint8(np.clip(out + 0.5, 0, 255))


# --------------------------------------------------------------------------------------------------
# A world: materials, identities, camera scenes; renders one shot of one identity in one camera
# --------------------------------------------------------------------------------------------------
@dataclass
class Shot:
    """Everything that varies per image (besides sensor noise)."""
    view: str            # 'front' | 'back' | 'side'
    facing: int          # +1 / -1: walking direction in side view
    phase: float         # gait phase, radians
    scale: float         # person height / image height
    dx: float            # body axis offset from the image centre, fraction of the width
    foot: float          # sole row, fraction of the height
    pan: float           # crop position in the camera's scene, in [0, 1]
    tilt: float
    exposure: float
    gradient: float      # left-right illumination gradient
    size: tuple          # (h, w) output pixels
    detail: int          # seed of occluder and cloth folds (shared by a RegDB visible/thermal pair)
    occluded: bool


class World:
    """Materials, identities and per-camera scenes of one synthetic world (deterministic in `seed`)."""

    def __init__(self, ids, seed, cameras, height, width):
        self.mats = make_materials(np.random.default_rng([seed, 0]))
        self.ids = [int(i) for i in ids]
        self.people = {pid: make_person(np.random.default_rng([seed, 1, pid]), self.mats) for pid in self.ids}
        self.cameras = cameras
        self.scenes = {}
        for cam in cameras.values():
            if cam["place"] not in self.scenes:
                size = max(c["size"] for c in cameras.values() if c["place"] == cam["place"])
                H = SUPERSAMPLE * math.ceil(1.3 * height * size * 1.06)
                W = SUPERSAMPLE * math.ceil(4 * width * size * 1.06)
                self.scenes[cam["place"]] = make_scene(np.random.default_rng([seed, 2, cam["place"]]),
                                                       self.mats, cam["indoor"], H, W)
        big = max(s.label.shape for s in self.scenes.values())
        self.folds = smooth_noise(np.random.default_rng([seed, 3]), big[0] * 2, big[1], 6)

    def render(self, pid, cam_name, shot, rng):
        """(h, w, 3) or (h, w) uint8 image of identity `pid` seen by camera `cam_name`."""
        cam = self.cameras[cam_name]
        return expose(self.scene(pid, cam_name, shot), self.mats, cam, rng, shot.exposure, shot.gradient)

    def scene(self, pid, cam_name, shot):
        """Canvas (material labels + shading, supersampled) of identity `pid` in camera `cam_name`'s place."""
        cam = self.cameras[cam_name]
        scene = self.scenes[cam["place"]]
        H, W = SUPERSAMPLE * shot.size[0], SUPERSAMPLE * shot.size[1]
        y0 = int(shot.tilt * (scene.label.shape[0] - H))
        x0 = int(shot.pan * (scene.label.shape[1] - W))
        cv = Canvas(scene.label[y0:y0 + H, x0:x0 + W].copy(), scene.shade[y0:y0 + H, x0:x0 + W].copy())
        S, foot, cx = shot.scale * H, shot.foot * H, W / 2 + shot.dx * W
        cv.darken(foot, cx, 0.035 * S, 0.22 * S, 0.55)                          # shadow on the ground
        draw_person(cv, self.people[pid], shot.view, shot.phase, cx, foot, S, shot.facing)
        detail = np.random.default_rng(shot.detail)
        if shot.occluded:
            self._occlude(cv, detail, cam["indoor"], S, foot)
        fy = int(detail.integers(0, self.folds.shape[0] - H + 1))
        fx = int(detail.integers(0, self.folds.shape[1] - W + 1))
        cv.shade *= 1 + 0.07 * self.folds[fy:fy + H, fx:fx + W]                 # cloth folds, dirt
        return cv

    def _occlude(self, cv, rng, indoor, S, foot):
        """Partial occlusion: another pedestrian at the side, a pole, or a low object (bench, car, hedge)."""
        H, W = cv.label.shape
        kind = rng.choice(["pedestrian", "pole", "low"], p=[0.45, 0.25, 0.3])
        group = "indoor" if indoor else "outdoor"
        if kind == "pedestrian":
            other = self.people[self.ids[int(rng.integers(len(self.ids)))]]
            side = rng.choice([-1, 1])
            draw_person(cv, other, str(rng.choice(["front", "back", "side"])), rng.uniform(0, 2 * math.pi),
                        W / 2 + side * W * rng.uniform(0.55, 0.8), foot + rng.uniform(-0.04, 0.04) * H,
                        S * rng.uniform(0.95, 1.1), int(side))
        elif kind == "pole":
            x, r = rng.uniform(0.15, 0.85) * W, rng.uniform(0.04, 0.08) * W
            cv.limb(-r, x, H + r, x, r, r, material_index(self.mats, group, "door metal" if indoor else "metal"))
        else:
            names = ["bench", "door wood", "wall grey"] if indoor else ["car red", "car white", "foliage", "metal"]
            y = rng.uniform(0.62, 0.82) * H
            cv.quad(y, H + 1, -1, W + 1, -1, W + 1, material_index(self.mats, group, str(rng.choice(names))))


def make_track(rng, n, height, width, size, views=("front", "back", "side"), jitter=0.06):
    """Shots of one walk past one camera: a view (sometimes changing once), gait phase advancing, placement,
    exposure and size jittering around track-level values."""
    view = str(rng.choice(views))
    facing = int(rng.choice([-1, 1]))
    turn_at = int(rng.integers(1, n)) if n > 1 and len(views) > 1 and rng.random() < TURN else n
    phase, step = rng.uniform(0, 2 * math.pi), rng.uniform(0.7, 1.6)
    scale, dx, foot = rng.uniform(0.80, 0.92), rng.uniform(-0.06, 0.06), rng.uniform(0.95, 1.0)
    pan, drift, tilt = rng.random(), rng.uniform(-0.08, 0.08), rng.uniform(0.2, 0.8)
    exposure, gradient = rng.uniform(0.8, 1.2), rng.uniform(-0.35, 0.35)
    shots = []
    for k in range(n):
        if k == turn_at:
            view = str(rng.choice([v for v in views if v != view]))
        h = int(round(height * size * rng.uniform(1 - jitter, 1 + jitter)))
        w = int(round(width * size * rng.uniform(1 - jitter, 1 + jitter)))
        shots.append(Shot(view=view, facing=facing, phase=phase + k * step + rng.normal(0, 0.3),
                          scale=scale * rng.uniform(0.97, 1.03), dx=dx + rng.normal(0, 0.015),
                          foot=foot + rng.normal(0, 0.01), pan=(pan + k * drift) % 1.0,
                          tilt=float(np.clip(tilt + rng.normal(0, 0.05), 0, 1)),
                          exposure=exposure * rng.uniform(0.95, 1.05), gradient=gradient, size=(h, w),
                          detail=int(rng.integers(2 ** 63)), occluded=bool(rng.random() < OCCLUSION)))
    return shots


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------
class _Atomic:
    """Build a directory tree in a hidden sibling, write the marker last, rename into place."""

    def __init__(self, root, marker):
        self.root, self.marker = Path(root), marker
        if self.root.exists():
            raise UserError(f"{self.root} already exists; remove it or choose a new directory "
                            f"(synthetic.ensure_world reuses a finished world)")
        self.tmp = self.root.parent / f".{self.root.name}.tmp-{os.getpid()}"

    def __enter__(self):
        self.root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            (self.tmp / MARKER).write_text(json.dumps(self.marker, indent=1, sort_keys=True) + "\n")
            try:
                os.rename(self.tmp, self.root)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise UserError(f"cannot move the finished world to {self.root} ({e}); "
                                f"remove that directory or choose a new one") from e
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _check(name, value, low):
    if not isinstance(value, (int, np.integer)) or value < low:
        raise UserError(f"synthetic world: {name}={value!r} is invalid; use an integer >= {low}")


def _check_split_world(kind, **params):
    """The parameters of a world with a test split (sysu, llcm), checked; returns them as a dict."""
    for name, low in (("num_ids", 3), ("num_test", 1), ("images_per_cam", 1), ("height", 32), ("width", 16),
                      ("seed", 0)):
        _check(name, params[name], low)
    if params["num_ids"] - params["num_test"] < 2:
        raise UserError(f"synthetic {kind}: num_ids={params['num_ids']} leaves fewer than 2 training ids after "
                        f"num_test={params['num_test']}; raise num_ids or lower num_test")
    return params


def _progress(log, kind, done, total, images, start):
    if done == total or done % max(1, total // 4) == 0:
        log(f"synthetic {kind}: {done}/{total} identities, {images} images, {time.time() - start:.1f}s")


def make_sysu(root, num_ids=140, num_test=40, images_per_cam=5, height=128, width=64, seed=0, log=print):
    """Write a synthetic world in the SYSU-MM01 layout to `root` (which must not exist); returns Path(root).

    num_ids: identities in all; num_test of them form the test split, the rest is split train : val as
    SYSU's 296 : 99. Ids are non-contiguous numbers in 1..~1.09 num_ids (like SYSU's 491 ids in 1..533).
    Each identity walks past a random subset of the cameras (at least one visible and one infrared camera;
    test identities at least one indoor visible camera), images_per_cam +- images_per_cam // 2 images each.
    height, width: nominal image size; each camera scales it (0.875 .. 1.25) and each image jitters +-6 %.
    """
    params = _check_split_world("sysu", num_ids=num_ids, num_test=num_test, images_per_cam=images_per_cam,
                                height=height, width=width, seed=seed)
    rng = np.random.default_rng([seed, 4])
    span = math.ceil(num_ids * 533 / 491)
    ids = np.sort(rng.choice(np.arange(1, span + 1), num_ids, replace=False))
    perm = rng.permutation(ids)
    num_val = max(1, round((num_ids - num_test) * 99 / 395))
    splits = {"test": perm[:num_test], "val": perm[num_test:num_test + num_val], "train": perm[num_test + num_val:]}
    world = World(ids, seed, {c: dict(cfg, place=c) for c, cfg in SYSU_CAMERAS.items()}, height, width)
    marker = dict(kind="sysu", version=VERSION, params=params)
    atomic = _Atomic(root, marker)
    counts = {c: 0 for c in SYSU_CAMERAS}
    start = time.time()
    log(f"synthetic sysu: generating {num_ids} identities into {root}")
    with atomic as tmp:
        for done, pid in enumerate(ids, 1):
            prng = np.random.default_rng([seed, 5, pid])
            visible = [c for c in SYSU_VISIBLE if prng.random() < 0.7]
            infrared = [c for c in SYSU_INFRARED if prng.random() < 0.7] or [int(prng.choice(SYSU_INFRARED))]
            if pid in splits["test"] and not {1, 2} & set(visible):
                visible.append(int(prng.choice([1, 2])))          # the indoor-search gallery needs it
            visible = visible or [int(prng.choice(SYSU_VISIBLE))]
            for cam in sorted(visible + infrared):
                trng = np.random.default_rng([seed, 6, pid, cam])
                n = max(1, images_per_cam + int(trng.integers(-(images_per_cam // 2), images_per_cam // 2 + 1)))
                folder = tmp / f"cam{cam}" / f"{pid:04d}"
                folder.mkdir(parents=True)
                for k, shot in enumerate(make_track(trng, n, height, width, SYSU_CAMERAS[cam]["size"]), 1):
                    img = world.render(pid, cam, shot, trng)
                    Image.fromarray(img if SYSU_CAMERAS[cam]["gray"] or img.ndim == 3 else np.repeat(img[..., None], 3, 2)) \
                        .save(folder / f"{k:04d}.jpg", quality=SYSU_CAMERAS[cam]["quality"])
                counts[cam] += n
            _progress(log, "sysu", done, num_ids, sum(counts.values()), start)
        (tmp / "exp").mkdir()
        for split, members in splits.items():
            (tmp / "exp" / f"{split}_id.txt").write_text(",".join(str(int(i)) for i in sorted(members)) + "\n")
        marker["counts"] = {f"cam{c}": n for c, n in counts.items()}
        marker["ids"] = {split: len(members) for split, members in splits.items()}
    log(f"synthetic sysu: {sum(counts.values())} images ({counts}) in {time.time() - start:.1f}s")
    return Path(root)


def make_regdb(root, num_ids=160, images_per_id=10, height=128, width=64, seed=0, log=print):
    """Write a synthetic world in the RegDB layout to `root` (which must not exist); returns Path(root).

    A dual camera films each identity walking towards or away from it (one view per identity, as RegDB);
    visible and thermal images of a pair share pose and occluders, with a small misalignment.
    idx/{train,test}_{visible,thermal}_{k}.txt, k = 1..10: per trial a random half of the identities
    (num_ids // 2) trains, labelled 0..num_ids//2 - 1 in id order; the test labels are the folder ids.
    """
    params = dict(num_ids=num_ids, images_per_id=images_per_id, height=height, width=width, seed=seed)
    for name, low in (("num_ids", 2), ("images_per_id", 1), ("height", 32), ("width", 16), ("seed", 0)):
        _check(name, params[name], low)
    ids = list(range(1, num_ids + 1))
    world = World(ids, seed, {c: dict(cfg, place=0) for c, cfg in REGDB_CAMERAS.items()}, height, width)
    numbers = np.random.default_rng([seed, 4]).choice(np.arange(1, 10 ** 5), num_ids, replace=False)
    marker = dict(kind="regdb", version=VERSION, params=params)
    atomic = _Atomic(root, marker)
    names = {}
    start = time.time()
    log(f"synthetic regdb: generating {num_ids} identities into {root}")
    with atomic as tmp:
        for done, pid in enumerate(ids, 1):
            trng = np.random.default_rng([seed, 6, pid])
            shots = make_track(trng, images_per_id, height, width, 1.0, views=("front", "back"), jitter=0.0)
            stem = f"{'male' if world.people[pid].male else 'female'}_{shots[0].view}_%s_{numbers[pid - 1]:05d}"
            names[pid] = []
            for k, shot in enumerate(shots, 1):
                name = f"{stem}_{k}.bmp"
                names[pid].append(name)
                thermal = Shot(**{**shot.__dict__, "dx": shot.dx + trng.normal(0, 0.02),
                                  "scale": shot.scale * trng.uniform(0.97, 1.03), "foot": shot.foot + trng.normal(0, 0.01)})
                for folder, cam, s in (("Visible", "v", shot), ("Thermal", "t", thermal)):
                    (tmp / folder / str(pid)).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(world.render(pid, cam, s, trng)).save(tmp / folder / str(pid) / (name % cam))
            _progress(log, "regdb", done, num_ids, 2 * images_per_id * done, start)
        (tmp / "idx").mkdir()
        for trial in range(1, 11):
            perm = np.random.default_rng([seed, 7, trial]).permutation(ids)
            train, test = sorted(perm[:num_ids // 2]), sorted(perm[num_ids // 2:])
            for folder, cam, mod in (("Visible", "v", "visible"), ("Thermal", "t", "thermal")):
                for split, members, label in (("train", train, {p: i for i, p in enumerate(train)}),
                                              ("test", test, {p: p for p in test})):
                    lines = [f"{folder}/{p}/{n % cam} {label[p]}" for p in members for n in names[p]]
                    (tmp / "idx" / f"{split}_{mod}_{trial}.txt").write_text("\n".join(lines) + "\n")
        marker["counts"] = {"visible": num_ids * images_per_id, "thermal": num_ids * images_per_id}
    log(f"synthetic regdb: {2 * num_ids * images_per_id} images in {time.time() - start:.1f}s")
    return Path(root)


def make_llcm(root, num_ids=60, num_test=20, images_per_cam=3, height=128, width=64, seed=0, log=print):
    """Write a synthetic world in the LLCM layout to `root` (which must not exist); returns Path(root).

    num_ids identities, num_test of them in the test split; each walks past a random subset of the nine
    places (at least one visible and one infrared camera), images_per_cam +- images_per_cam // 2 images per
    camera. Test images: test_vis/cam<k>/<4-digit id>/<n>.jpg, test_nir/cam<k>/...; idx/test_id.txt. Training
    images: train_vis/cam<k>/<4-digit id>/<n>.jpg and train_nir/..., listed in idx/train_vis.txt and
    idx/train_nir.txt as '<relative path> <label>', labels 0..N-1 in id order (the released lists' form; the
    training folder names are this world's choice, the real dataset's lists name their own paths).
    """
    params = _check_split_world("llcm", num_ids=num_ids, num_test=num_test, images_per_cam=images_per_cam,
                                height=height, width=width, seed=seed)
    rng = np.random.default_rng([seed, 8])
    ids = np.sort(rng.choice(np.arange(1, 2 * num_ids + 1), num_ids, replace=False))
    test = set(int(i) for i in rng.choice(ids, num_test, replace=False))
    train = [int(i) for i in ids if i not in test]
    label = {pid: i for i, pid in enumerate(train)}
    cameras = llcm_cameras()
    world = World(ids, seed, cameras, height, width)
    marker = dict(kind="llcm", version=VERSION, params=params)
    atomic = _Atomic(root, marker)
    lists = {"v": [], "r": []}
    images, start = 0, time.time()
    log(f"synthetic llcm: generating {num_ids} identities into {root}")
    with atomic as tmp:
        for done, pid in enumerate(ids, 1):
            pid = int(pid)
            prng = np.random.default_rng([seed, 9, pid])
            visible = [k for k in LLCM_VISIBLE if prng.random() < 0.5] or [int(prng.choice(LLCM_VISIBLE))]
            infrared = [k for k in LLCM_INFRARED if prng.random() < 0.5] or [int(prng.choice(LLCM_INFRARED))]
            part = "test" if pid in test else "train"
            for m, folder, places in (("v", "vis", visible), ("r", "nir", infrared)):
                for k in places:
                    trng = np.random.default_rng([seed, 10, pid, k, m == "r"])
                    n = max(1, images_per_cam + int(trng.integers(-(images_per_cam // 2), images_per_cam // 2 + 1)))
                    rel = Path(f"{part}_{folder}") / f"cam{k}" / f"{pid:04d}"
                    (tmp / rel).mkdir(parents=True)
                    cam = cameras[f"{m}{k}"]
                    for j, shot in enumerate(make_track(trng, n, height, width, cam["size"]), 1):
                        img = world.render(pid, f"{m}{k}", shot, trng)
                        Image.fromarray(img if img.ndim == 3 else np.repeat(img[..., None], 3, 2)) \
                            .save(tmp / rel / f"{j:04d}.jpg", quality=cam["quality"])
                        if part == "train":
                            lists[m].append(f"{rel.as_posix()}/{j:04d}.jpg {label[pid]}")
                    images += n
            _progress(log, "llcm", done, num_ids, images, start)
        (tmp / "idx").mkdir()
        (tmp / "idx" / "train_vis.txt").write_text("\n".join(lists["v"]) + "\n")
        (tmp / "idx" / "train_nir.txt").write_text("\n".join(lists["r"]) + "\n")
        (tmp / "idx" / "test_id.txt").write_text(",".join(str(i) for i in sorted(test)) + "\n")
        marker["counts"] = {"images": images, "train ids": len(train), "test ids": num_test}
    log(f"synthetic llcm: {images} images in {time.time() - start:.1f}s")
    return Path(root)


MAKERS = {"sysu": make_sysu, "regdb": make_regdb, "llcm": make_llcm}


def world_params(kind, **params):
    """The maker's parameters with defaults filled in; unknown names raise UserError."""
    if kind not in MAKERS:
        raise UserError(f"synthetic world kind {kind!r} is unknown; choose one of {sorted(MAKERS)}")
    defaults = {k: v.default for k, v in inspect.signature(MAKERS[kind]).parameters.items() if k not in ("root", "log")}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UserError(f"synthetic {kind} world has no parameter(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **params}


def ensure_world(cache_dir, kind="sysu", log=print, **params):
    """Path of a complete synthetic world with these parameters under `cache_dir`, generating it if needed.
    Worlds are named by a hash of (kind, VERSION, parameters) and completed atomically, so concurrent or
    interrupted runs never see a half-written world."""
    params = world_params(kind, **params)
    marker = dict(kind=kind, version=VERSION, params=params)
    key = hashlib.sha1(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) / f"synthetic-{kind}-{key}"

    def complete():
        try:
            found = json.loads((root / MARKER).read_text())
        except (OSError, ValueError):
            return False
        return {k: found.get(k) for k in marker} == marker

    if complete():
        return root
    if root.exists():
        raise UserError(f"{root} exists but is not a complete synthetic world; delete it to regenerate")
    try:
        return MAKERS[kind](root, log=log, **params)
    except UserError:
        if complete():                      # another process finished the same world first
            return root
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a synthetic VI-ReID world in the SYSU-MM01 (default) "
                                             "or RegDB layout.")
    ap.add_argument("--out", required=True, help="directory to create (must not exist)")
    ap.add_argument("--regdb", action="store_true", help="RegDB layout instead of SYSU-MM01")
    ap.add_argument("--llcm", action="store_true", help="LLCM layout (low-light visible, 9 cameras)")
    ap.add_argument("--num-ids", type=int, help="identities (default: sysu 140, regdb 160)")
    ap.add_argument("--num-test", type=int, help="sysu: test identities (default 40)")
    ap.add_argument("--images-per-cam", type=int, help="sysu: mean images per (identity, camera) (default 5)")
    ap.add_argument("--images-per-id", type=int, help="regdb: images per identity and modality (default 10)")
    ap.add_argument("--height", type=int, help="image height (default 128)")
    ap.add_argument("--width", type=int, help="image width (default 64)")
    ap.add_argument("--seed", type=int, help="seed (default 0)")
    args = ap.parse_args(argv)
    kind = "regdb" if args.regdb else "llcm" if args.llcm else "sysu"
    given = {k: v for k, v in vars(args).items() if k not in ("out", "regdb", "llcm") and v is not None}
    try:
        MAKERS[kind](args.out, **world_params(kind, **given))
    except UserError as e:
        print(f"synthetic.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
