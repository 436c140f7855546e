"""RFM: the robust feature mining network of Tan et al., "Exploring Invariant Representation for Visible-Infrared
Person Re-Identification" (arXiv 2023; Xiamen University / Tencent Youtu).

Implements:
- Alg. 1, the linear transformation generator (LTG, Sec. IV-B): with probability p, random rectangles of each
  image are rescaled per channel by alpha = f_g / max(region) until the memory matrix M of cumulative factors
  reaches t_min somewhere. An image transform on both modalities, run as the data.Augment `extra` hook on the
  float [0, 1] batch: Alg. 1's loop per image, each rectangle's update vectorised over channels and pixels.
  `LinearTransformationGenerator` is the algorithm alone (numpy, copyable as it is); `LTG` the adapter (checks
  the flags, the loader hook).
  f_g: Beta(0.5, 0.5), Beta(0.3, 0.3), uniform, or the constant 0, Table III. `constant` is one black rectangle
  (pixel 0 before normalisation) of Alg. 1's size, NOT random erasing [31] (mean-colour fill, corner-inside
  sampler): Table III's "Random Erasing" row is `--ltg false --erasing 0.5` (data.Augment's random erasing).
- Sec. IV-A: a single-path ResNet up to Residual-Block 3 (torchvision layer3, last stride 1) gives F; PCB cuts
  the (attended) F into K horizontal stripes, each average pooled, reduced by a fully connected layer and classified.
- Eq. (7), the modality-aware spatial attention (MAM, Sec. IV-D): modality-specific copies f_m of Residual-Block 4
  run on F^m; their spatial-wise average pooling (the mean over channels at each position) through a sigmoid is
  the attention map that weights F^m. Table V's alternatives: CBAM's spatial attention [43], or none.
- Eq. (5) center loss, Eq. (6) cross-center loss, and the hetero-center loss of [33] (the Table IV comparison);
  L_tri with online hard mining (batch hard) [34]; Eq. (8) L_cls = L_id + L_tri + lambda L_cc for every part;
  Eq. (9) L = L_id^v + L_id^n + sum_k L_cls^k, with L_id^v / L_id^n on the pooled Residual-Block 4 features.
- Ablations from the command line: Table II (--ltg, --center cross|none, --attention mam|none), Table III
  (--f-g; its RE row: --ltg false --erasing 0.5), Table IV (--center center|hetero|cross), Table V
  (--attention none|spatial|mam). Table II's baseline (--ltg false --center none --attention none) reads the
  paper's "PCB baseline" as PCB on the Residual-Block 3 map of Fig. 4, so it has NO layer4 at all (several times
  fewer parameters than with MAM's two layer4 copies); the +MAM rows mix attention with that capacity.
  `--pcb-map stage4` (with `--attention none`) is the other reading, PCB [29] as published: a shared
  Residual-Block 4 (last stride 1) on F, the stripes cut from its map.
  Table IV's `center` is a batch-centre variant of Eq. (5) (centres = mini-batch class means), not the learned
  centres of [32].
- Pictures (figures): LTG samples under their inputs (Fig. 9) and attention maps over test images (Fig. 10).

Readings and choices:
- Alg. 1 writes W_r = S_r / r_r, which is not a length; we use W_r = sqrt(S_r / r_r) (H_r W_r = S_r, H_r / W_r =
  r_r), as random erasing [31], whose parameters the LTG takes. Corners are integer pixels, uniform in the image;
  a rectangle that leaves the image is redrawn (area, aspect and corner together), exactly as Alg. 1's loop. The
  release keeps a size that fits and then draws the corner inside (random_erasing.py:88-93), which favours larger
  rectangles on average.
- f_g is drawn per channel (Alg. 1 calls f_g inside the channel loop). Alg. 1 bounds the image by 1
  (alpha_max = 1 / max), so a rescaled region's maximum is f_g <= 1: outputs stay in [0, 1], but can exceed the
  input's own maximum when that is below 1.
- F_att of Sec. IV-A (the map that PCB cuts) is read as F^m (.) F_att^m, the stage-3 map weighted by Eq. (7).
- Eq. (5)-(6) centres are the class (per modality) means of the mini-batch features, gradients flowing through
  them; D is the Euclidean distance (Sec. IV-C), not its square; both losses are divided by the batch size N
  (Sec. V-D says center and cross-center loss are normalised so); `--cc-distance squared-unit` is the release's
  form. The metric losses sit on the L2-normalised BN output of each part head, as in the release: on the raw FC
  output, with lambda = 3, every part feature collapses to one point (TestRFMCollapse). The training log warns
  (common.Run.watch) if L_tri stays at its margin for an epoch or the features' pairwise distance falls below
  5 % of their norm. The hetero-center loss is the one of [33]: squared distance of the two modality centres,
  summed over the identities (its 'default' in Table IV; HC-Loss*(3.0) = --lam 3/N).
- Each part is reduced by a fully connected layer ("we attach the constraints after a fully connected layer",
  Sec. IV-A); the paper says nothing of normalisation, so the head is the release's ClassBlock: Linear(C, 512) ->
  BN; m_k = L2-normalised BN output feeds L_tri, the centre loss and the test feature; Dropout(0.5) -> Linear
  gives L_id (model.py:101-141). Test feature: the K m_k concatenated and L2-normalised; `flip_test` adds the
  mirror's (release test.py:109-119; off by default, as the paper does not say).
- Not stated: epochs (80: the decays at 40 and 70 and the DDAG schedule [21] the paper follows), SGD momentum
  0.9, weight decay 5e-4, triplet margin 0.3; from the release where the paper is silent: Nesterov, backbone and
  layer4 copies at 0.1 x lr, no pad, random erasing p = 0.5 AFTER the LTG (the release applies both,
  train.py:106-107; Table III compares augmentations, it does not drop RE).

Deviations:
- Alg. 1 loops until min(M) <= t_min with no bound; here an image gets at most `ltg_max_rects` rectangles (50,
  well above what Beta(0.5, 0.5) needs at t_min = 1e-6; `python bench.py rfm` prints the mean per image).
- A rectangle channel that is all zero keeps alpha = 1 (alpha_max = 1 / 0 is undefined; no factor changes it).
- L_id^v and L_id^n sit on a BNNeck [30] (BatchNorm1d with frozen shift, bias-free linear classifier) after the
  average pooled f_v(F^v), f_n(F^n); the paper names only the classifier, the release uses ClassBlock (2048 -> 512,
  BN, Dropout, FC).
- With images too small for 12 stripes on the stage-3 map (CPU recipes), K is a setting and must not exceed the
  map's height; resnet18/34 are allowed for CPU runs (the paper uses ResNet-50).

Released code differs (stone96123/RFM at 4d0c685; `--recipe release` sets the release column):
| setting | paper value | release value | released file:line |
|---|---|---|---|
| LTG t_min | 1e-6 (Sec. V-A) | 1e-2 (fewer rectangles per image) | train.py:106 |
| LTG attempts | loop until t_min | 100 attempts | random_erasing.py:82,113 |
| LTG rectangle | Alg. 1 (corner uniform, reject) | size that fits, corner inside | random_erasing.py:88-93 |
| random erasing | not stated | p = 0.5 after the LTG | train.py:107 |
| cc_distance | "euclidean", (1/2) sum D / N | "squared-unit": mean squared, no 1/2 | cross_center_loss.py:13,33-36 |
| lr groups | "lr 0.03" | backbone + layer4 copies 0.003, heads 0.03, Nesterov | train.py:192-204 |
| schedule | x0.1 at 40, 70; 80 epochs (assumed) | x0.1 at 30, 60; 101 epochs | train.py:208-216,362 |
| model selection | (final epoch here) | best on the test set, every epoch | train.py:384-412 |
| part head | "a fully connected layer" | 512-d, BN, Dropout 0.5, own init | model.py:23-40,101-122 |
| test flip | not stated | image + mirror summed | test.py:109-119 |
| pad / crop | not stated (flip) | none (crop of pre-resized images) | train.py:103 |
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
from methods import common



@dataclass
class Settings:
    arch: str = "resnet50"               # Sec. V-A: ResNet-50
    pretrained: str = "imagenet"         # Sec. V-A: pre-trained on ImageNet
    height: int = 384                    # Sec. V-A: inputs resized to 384 x 192
    width: int = 192
    epochs: int = 80                     # not stated: lr decays at 40 and 70, the 80-epoch schedule of [21]
    P: int = 7                           # Sec. V-A: 7 identities per batch
    K: int = 8                           #   x 8 visible + 8 infrared images each
    lr: float = 0.03                     # Sec. V-A: SGD, lr 0.03
    milestones: tuple = (40, 70)         # Sec. V-A: lr x0.1 after epoch 40 and again after epoch 70
    warmup: int = 0                      # Sec. V-A: no warm-up stated
    momentum: float = 0.9                # not stated; the community value [21]
    weight_decay: float = 5e-4           # not stated; the community value [21]
    nesterov: bool = True                # not stated; release: SGD(nesterov=True), stone96123/RFM train.py:192-204
    backbone_lr_mult: float = 0.1        # "lr initiated from 0.03" is ambiguous; release: backbone and both
                                         #   layer4 copies at 0.1 x lr, heads at lr (train.py:192-204)
    pad: int = 0                         # not stated (Sec. V-A: flipping); release: no pad, RandomCrop on
                                         #   pre-resized images is the identity (train.py:103)
    erasing: float = 0.5                 # not stated; release: RandomErasing(0.5) after the LTG (train.py:106-107)
    parts: int = 12                      # Sec. V-C: PCB with K = 12 parts; Deviation: a setting (small CPU images)
    part_dim: int = 512                  # Sec. IV-A: a fully connected layer reduces each part; release:
                                         #   ClassBlock Linear(1024, 512) -> BN (model.py:101-107)
    part_dropout: float = 0.5            # not stated; release: Dropout(0.5) before each part classifier
                                         #   (model.py:106)
    cc_distance: str = "euclidean"       # Sec. IV-C: D is the Euclidean distance (1/2, / N); release:
                                         #   "squared-unit", mean squared distance (cross_center_loss.py:13,33-36)
    flip_test: bool = False              # not stated; release: features of image + mirror summed (test.py:109-119)
    margin: float = 0.3                  # not stated for L_tri [34]; the community value
    lam: float = 3.0                     # Sec. V-A, Fig. 8: lambda = 3 in Eq. (8)
    center: str = "cross"                # Table IV: cross (Eq. 6) | center (Eq. 5) | hetero ([33]) | none
    attention: str = "mam"               # Table V: mam (Eq. 7) | spatial (CBAM [43]) | none
    pcb_map: str = "stage3"              # Fig. 4: PCB cuts the Residual-Block 3 map; stage4 (only with attention
                                         #   none): Table II's "PCB baseline" read as PCB [29], on layer4's map
    ltg: bool = True                     # Table II: the LTG on or off
    ltg_p: float = 0.5                   # Sec. V-A: LTG probability p = 0.5
    ltg_area: tuple = (0.02, 0.4)        # Sec. V-A: s_min, s_max (fraction of the image area)
    ltg_aspect: tuple = (0.3, 3.33)      # Sec. V-A: r_min = 1 / r_max = 0.3
    f_g: str = "beta0.5"                 # Sec. IV-B, Table III: beta0.5 | beta0.3 | uniform | constant
    t_min: float = 1e-6                  # Sec. V-A: t_min = 1e-6; release: 1e-2 (train.py:106)
    ltg_max_rects: int = 50              # Deviation: Alg. 1's loop has no bound


CHOICES = {"f_g": ("beta0.5", "beta0.3", "uniform", "constant"), "center": ("cross", "center", "hetero", "none"),
           "attention": ("mam", "spatial", "none"), "cc_distance": ("euclidean", "squared-unit"),
           "pcb_map": ("stage3", "stage4")}

# The values with which the authors' release (stone96123/RFM at 4d0c685) runs.
RELEASE = dict(
    epochs=101,                  # train.py:362 `for epoch in range(start_epoch, 101)`
    milestones=(30, 60),         # train.py:208-216 adjust_learning_rate: x0.1 at 30 and 60
    lr=0.03,                     # train.py:192-204 heads at args.lr (0.03, train.py args)
    backbone_lr_mult=0.1,        # train.py:192-204 backbone and both layer4 copies at 0.1 * args.lr
    nesterov=True,               # train.py:192-204 optim.SGD(..., nesterov=True)
    momentum=0.9,                # train.py:192-204
    weight_decay=5e-4,           # train.py:192-204
    pad=0,                       # train.py:103 RandomCrop((384,192)) on images pre-resized to 384x192
    erasing=0.5,                 # train.py:107 RandomErasing(probability=0.5) after RandomLinear
    t_min=1e-2,                  # train.py:106 RandomLinear(probability=0.5, min_out=1e-2)
    ltg_p=0.5,                   # train.py:106
    part_dim=512,                # model.py:101 num_bottleneck=512
    part_dropout=0.5,            # model.py:106 nn.Dropout(p=0.5)
    cc_distance="squared-unit",  # cross_center_loss.py:13 MSELoss(reduction='sum'); :33-36 mean per sample
    margin=0.3,                  # loss.py:9-54 TripletLoss(margin=0.3)
    lam=3.0,                     # train.py:271-272 loss weight 3 on the cross-center loss
    flip_test=True,              # test.py:109-119 features of the image and its mirror summed
    P=7, K=8,                    # train.py:35-42 batch 7 ids x (8 + 8)
)


# CPU recipe for the built-in synthetic world: resnet18 from scratch at 96 x 48 (stage-3 map 6 x 3: 4 stripes), 10
# epochs of 35 batches (steps at 6 and 9), every other value the paper recipe's except t_min. Chosen on --split val
# (python reid.py --method rfm --split val --height 96 --width 48 ..., seed 0, one thread each):
#   old pins (pad 10, erasing 0, no Nesterov, backbone x1, dropout 0), t_min 1e-6: part L_id stayed at 4 ln 75 and
#     L_id^v above ln 75 for 5 epochs (killed: no embedding learned);
#   old pins, t_min 1e-2: val all-single rank-1 25.4 / mAP 33.6, training fit 35.2;
#   + erasing 0.5, pad 0: 25.6 / 33.0, fit 84.4;
#   + backbone x0.1, Nesterov, part dropout 0.5 (= the paper recipe but t_min), 14 epochs, steps at 9 and 12: 28.4 /
#     35.0, fit 89.5 (the recipe until the 5-minute budget; its test runs took 6:13-7:12 alone);
#   the same at 11 epochs, steps at 7 and 10: 25.7 / 33.9, fit 79.7, 367 s of training beside another job;
#   at 10 epochs, steps at 6 and 9: 24.5 / 32.8, fit 64.8 (within-modality rank-1 65.1 / 61.4, centroid cosine 0.635
#     against 0.024: aligned), 331 s (chosen: the budget; alone, two threads, a test seed takes 4.0-4.2 min).
# t_min = 1e-2 is the release's value (train.py:106): the paper's 1e-6 darkens about 14 rectangles per image.
SYNTHETIC = dict(arch="resnet18", pretrained="none", height=96, width=48, epochs=10, P=8, K=4, lr=0.05,
                 warmup=2, milestones=(6, 9), parts=4, part_dim=128, t_min=1e-2)
SMOKE = dict(arch="resnet18", pretrained="none", height=64, width=32, epochs=1, P=4, K=2, milestones=(),
             parts=2, part_dim=32)


F_G = CHOICES["f_g"]                # Table III's f_g; constant = 0 (a black rectangle, not random erasing)
CENTERS = CHOICES["center"]         # Table IV (and Table II's CC on/off)
ATTENTIONS = CHOICES["attention"]   # Table V (and Table II's MAM on/off)


# ---------------------------------------------------------------- Alg. 1: linear transformation generator

class LinearTransformationGenerator:
    """Alg. 1, portable (numpy only, nothing of this project): `transform(x, rng)` runs the LTG on each image of
    x (N, C, H, W) in [0, 1], every draw from the numpy Generator rng; the parameters are taken as given.

    Each image runs Alg. 1's loop; the work inside a rectangle is vectorised over channels and pixels. (Stepping
    all images of a batch together would cost whole-image passes per step while rectangles cover a fifth of an
    image, and the batch would wait for its slowest image.)"""

    def __init__(self, p=0.5, area=(0.02, 0.4), aspect=(0.3, 3.33), f_g="beta0.5", t_min=1e-6, max_rects=50):
        self.p, self.area, self.aspect, self.f_g, self.t_min, self.max_rects = p, area, aspect, f_g, t_min, max_rects

    def draw_f_g(self, rng, n):
        """n draws of f_g(.) on [0, 1] (Sec. IV-B, Table III)."""
        if self.f_g == "constant":
            return np.zeros(n)
        if self.f_g == "uniform":
            return rng.random(n)
        a = float(self.f_g[len("beta"):])
        return rng.beta(a, a, n)

    def rectangle(self, rng, H, W, tries=8):
        """(y_r, x_r, H_r, W_r) drawn as Alg. 1 draws it: area, aspect and corner at random, drawn again until the
        rectangle lies inside (the first inside of `tries` candidates drawn at once: the same distribution)."""
        while True:
            S_r = rng.uniform(*self.area, tries) * W * H
            r_r = rng.uniform(*self.aspect, tries)
            H_r = np.rint(np.sqrt(S_r * r_r)).astype(np.int64)
            W_r = np.rint(np.sqrt(S_r / r_r)).astype(np.int64)        # Reading: sqrt; Alg. 1 prints S_r / r_r
            x_r, y_r = rng.integers(0, W, tries), rng.integers(0, H, tries)
            inside = np.flatnonzero((x_r + W_r <= W) & (y_r + H_r <= H))
            if inside.size:
                i = inside[0]
                return int(y_r[i]), int(x_r[i]), int(H_r[i]), int(W_r[i])

    def image(self, I, M, rng):
        """Alg. 1 on one image, in place: I (C, H, W) float array in [0, 1] becomes I*, M (C, H, W) of ones
        becomes the memory matrix. Returns the number of rectangles applied."""
        C, H, W = I.shape
        if rng.random() >= self.p:                                    # p_1 >= p: I* = I
            return 0
        for n in range(1, self.max_rects + 1):                        # Deviation: at most max_rects rectangles
            y_r, x_r, H_r, W_r = self.rectangle(rng, H, W)
            I_rle = I[:, y_r:y_r + H_r, x_r:x_r + W_r]                # (C, H_r, W_r) views into I and M
            M_rle = M[:, y_r:y_r + H_r, x_r:x_r + W_r]
            peak = I_rle.reshape(C, -1).max(1)                        # (C,) max(I_c)
            alpha = np.divide(self.draw_f_g(rng, C), peak, out=np.ones(C), where=peak > 0)  # alpha_max * f_g
            alpha = alpha.astype(I.dtype)[:, None, None]              # Deviation: an all-zero channel keeps alpha = 1
            I_rle *= alpha                                            # I(I_c) <- alpha * I_c
            M_rle *= alpha                                            # M(M_c) <- alpha * M_c
            if M_rle.min() <= self.t_min:                             # min(M) <= t_min (M changed only in I_rle)
                return n
        return self.max_rects

    def transform(self, x, rng):
        """Alg. 1 on each image of x (N, C, H, W) in [0, 1] -> I* (N, C, H, W), M (N, C, H, W), rectangles (N,)."""
        I = x.detach().cpu().numpy().copy()
        M = np.ones_like(I)
        rects = np.array([self.image(I[i], M[i], rng) for i in range(len(I))])
        return torch.from_numpy(I), torch.from_numpy(M), torch.from_numpy(rects)


class LTG(LinearTransformationGenerator):
    """The adapter, data.Augment's `extra` hook: Alg. 1 on 'x_v' and 'x_r' (B, 3, H, W) in [0, 1]. Picklable
    (loader worker processes get a copy); the draws come from a numpy Generator seeded from the loader's
    torch.Generator, so a batch depends only on (seed, epoch, batch index). `check` validates the flags."""

    def __call__(self, batch, g):
        rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=g)))
        B = batch["x_v"].shape[0]
        x, _, _ = self.transform(torch.cat([batch["x_v"], batch["x_r"]]), rng)   # both modalities
        return {**batch, "x_v": x[:B], "x_r": x[B:]}


# ---------------------------------------------------------------- model

class SpatialAttention(nn.Module):
    """CBAM's spatial attention [43] (Table V's 'Spatial-Attention'): sigmoid(conv7x7([mean_c F; max_c F]))."""

    def __init__(self, kernel=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x):                                            # x: (B, C, h, w) -> (B, 1, h, w)
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


def stage3_height(height):
    """Rows of the Residual-Block 3 map: four stride-2 steps (conv1, maxpool, layer2, layer3)."""
    for _ in range(4):
        height = (height - 1) // 2 + 1
    return height


def classifier(dim, num_classes):
    """BNNeck [30]: BatchNorm1d (shift frozen), then a bias-free linear classifier. The metric losses act on the
    features before it, cross-entropy after it. Deviation: for L_id^v / L_id^n the paper names only a classifier."""
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)
    return nn.Sequential(bn, nn.Linear(dim, num_classes, bias=False))


def part_head(c, dim, dropout, num_classes):
    """One part's head as the release's ClassBlock (stone96123/RFM model.py:101-122): Linear(c, dim) -> BN, whose
    output m_k, L2-normalised, is what L_tri, the centre loss and the test feature see; Dropout -> Linear for L_id.
    Init as model.py:23-40: Kaiming fan_out FC, BN weight N(1, 0.01), classifier N(0, 0.001), zero biases."""
    fc, bn, cls = nn.Linear(c, dim), nn.BatchNorm1d(dim), nn.Linear(dim, num_classes)
    nn.init.kaiming_normal_(fc.weight, mode="fan_out")
    nn.init.normal_(bn.weight, 1.0, 0.01)
    nn.init.normal_(cls.weight, 0.0, 0.001)
    for b in (fc.bias, bn.bias, cls.bias):
        nn.init.zeros_(b)
    return nn.Sequential(fc, bn), nn.Sequential(nn.Dropout(dropout), cls)


class RFM(nn.Module):
    def __init__(self, settings, num_classes):
        super().__init__()
        net = common.resnet(settings.arch, settings.pretrained, last_stride=1)
        c = common.channels(settings.arch)
        layer1, layer2, layer3, layer4 = common.stages(net)
        self.backbone = nn.Sequential(common.stem(net), layer1, layer2, layer3)   # single path -> F (Sec. IV-A)
        self.attention = settings.attention
        if self.attention == "mam":
            self.f_v, self.f_n = layer4, copy.deepcopy(layer4)       # f_m of Eq. (7): Residual-Block 4 per modality
            self.id_v, self.id_n = classifier(c[3], num_classes), classifier(c[3], num_classes)  # L_id^v, L_id^n
        elif self.attention == "spatial":
            self.spatial = SpatialAttention()
        self.f_S = layer4 if settings.pcb_map == "stage4" else None   # PCB [29]: shared layer4 (attention none)
        self.parts = settings.parts
        c_part = c[3] if self.f_S is not None else c[2]            # channels of the map that PCB cuts
        heads = [part_head(c_part, settings.part_dim, settings.part_dropout, num_classes)
                 for _ in range(settings.parts)]
        self.reduce = nn.ModuleList(h[0] for h in heads)           # FC -> BN per part
        self.classifiers = nn.ModuleList(h[1] for h in heads)      # Dropout -> FC per part
        self.flip_test = settings.flip_test

    def attend(self, F_m, modality):
        """F^m (B, C3, h, w) of one modality -> attention map (B, 1, h, w), high-level feature f_m(F^m) or None."""
        if self.attention == "mam":
            high = (self.f_v if modality == "v" else self.f_n)(F_m)            # (B, C4, h, w), stride 1
            return torch.sigmoid(high.mean(1, keepdim=True)), high              # Eq. (7): sigma(f_S(f_m(F^m)))
        if self.attention == "spatial":
            return self.spatial(F_m), None
        return torch.ones_like(F_m[:, :1]), None

    def part_features(self, F_att):
        """PCB: (B, C3, h, w) -> K part features (B, part_dim): K stripes, average pooled, FC then BN (the release's
        placement, model.py:104-122; the paper says only "after a fully connected layer"). With pcb_map stage4
        the stripes are cut from the shared layer4's map (B, C4, h, w) of F_att instead."""
        if self.f_S is not None:
            F_att = self.f_S(F_att)                                            # (B, C4, h, w), stride 1
        V = F.adaptive_avg_pool2d(F_att, (self.parts, 1)).flatten(2)           # (B, C, K): V_1..V_K
        return [reduce(V[:, :, k]) for k, reduce in enumerate(self.reduce)]    # BN(FC(V_k)), (B, part_dim) each

    def forward(self, x_v, x_r):
        """Training forward, x_v and x_r (B, 3, H, W) -> K unit part features m_k (2B, d) (visible first; what the
        metric losses see), K part logits (2B, classes), and the high-level logits (B, classes) of each modality
        (None without MAM)."""
        B = x_v.shape[0]
        F_vr = self.backbone(torch.cat([x_v, x_r]))                            # (2B, C3, h, w): F
        A_v, high_v = self.attend(F_vr[:B], "v")
        A_n, high_n = self.attend(F_vr[B:], "r")
        h = self.part_features(F_vr * torch.cat([A_v, A_n]))                   # F_att = F (.) attention
        logits = [classify(h_k) for classify, h_k in zip(self.classifiers, h)]
        f = [F.normalize(h_k, dim=1) for h_k in h]                             # release model.py:141 l2norm
        high = None if high_v is None else (self.id_v(high_v.mean((2, 3))), self.id_n(high_n.mean((2, 3))))
        return f, logits, high


def build(settings, num_classes, meta=None):
    return RFM(settings, num_classes)


# ---------------------------------------------------------------- losses (n = NIR in the paper = r here)

# Original; copied verbatim into cmnas.py and ssft.py, test_all.TestCopies keeps the copies equal
def L_tri_hard(f, y, margin):
    """Triplet loss with online hard mining (batch hard): for each anchor, the farthest positive and the closest
    negative in the batch; mean over anchors of max(0, d_ap - d_an + margin). f (N, d), y (N,)."""
    d = (f.pow(2).sum(1, keepdim=True) + f.pow(2).sum(1) - 2 * f @ f.t()).clamp(min=1e-12).sqrt()   # (N, N)
    same = y[:, None] == y[None, :]                                   # (N, N), the diagonal included
    d_ap = d.masked_fill(~same, float("-inf")).amax(1)                # (N,) hardest positive
    d_an = d.masked_fill(same, float("inf")).amin(1)                  # (N,) hardest negative
    return F.relu(d_ap - d_an + margin).mean()


def D(a, b):
    """Euclidean distance of matching rows, (N, d), (N, d) -> (N,)."""
    return (a - b).pow(2).sum(1).clamp(min=1e-12).sqrt()


def class_centres(f, y, ids):
    """Mean of the rows of f (N, d) of each identity in ids (U,): (U, d)."""
    member = (ids[:, None] == y[None, :]).to(f.dtype)                 # (U, N)
    return member @ f / member.sum(1, keepdim=True)


def check_both_modalities(y_v, y_n):
    ids = y_v.unique()
    if not torch.equal(ids, y_n.unique()):
        raise ValueError("modality centres need every identity of the batch in both modalities")
    return ids


def L_c(f, y):
    """Eq. (5), center loss: L_c = 1/2 sum_{i=1}^N D(f(I_i), c_{y_i}), D the Euclidean distance, c_{y_i} the centre
    of class y_i. Reading: c = the batch mean of the class, and the sum divided by the batch size N (Sec. V-D)."""
    ids = y.unique()
    c = class_centres(f, y, ids)                                      # (U, d): c_{y_i}; Reading: batch class means
    return 0.5 * D(f, c[torch.searchsorted(ids, y)]).sum() / len(y)   # Eq. (5); Reading: / N, D unsquared


def L_cc(f_v, y_v, f_n, y_n, distance="euclidean"):
    """Eq. (6), cross-center loss, each visible feature to the NIR centre of its class and vice versa:
    L_cc = 1/2 (sum_{i=1}^{N_v} D(f(I_i^v), c_{y_i^n}) + sum_{i=1}^{N_n} D(f(I_i^n), c_{y_i^v})), with c^m_k the
    centre of class k in modality m and D the Euclidean distance.
    "euclidean" (the paper; Reading: c^m_k the batch mean, the sum divided by the batch size N = N_v + N_n, Sec.
    V-D, and D unsquared, Sec. IV-C), i.e. 1/(2N) sum_i [D(f_i^v, c^n_{y_i}) + D(f_i^n, c^v_{y_i})].
    "squared-unit" (release cross_center_loss.py:13,33-36): the mean over the samples of the squared distance,
    no 1/2 (on the unit features the release feeds it)."""
    ids = check_both_modalities(y_v, y_n)
    c_v, c_n = class_centres(f_v, y_v, ids), class_centres(f_n, y_n, ids)   # (U, d) each; Reading: batch means
    to_n = D(f_v, c_n[torch.searchsorted(ids, y_v)])                  # (N_v,) D(f(I_i^v), c_{y_i^n})
    to_v = D(f_n, c_v[torch.searchsorted(ids, y_n)])                  # (N_n,) D(f(I_i^n), c_{y_i^v})
    if distance == "squared-unit":                                    # Released code differs: squared, mean
        return torch.cat([to_n, to_v]).pow(2).mean()
    return 0.5 * (to_n.sum() + to_v.sum()) / (len(y_v) + len(y_n))   # Eq. (6); Reading: / N, D unsquared


def L_hc(f_v, y_v, f_n, y_n):
    """Hetero-center loss [33]: L_hc = sum_k ||c^v_k - c^n_k||_2^2 over the identities k of the batch, c^m_k the
    batch mean of class k in modality m (not divided by N: Table IV's default HC-Loss)."""
    ids = check_both_modalities(y_v, y_n)
    return (class_centres(f_v, y_v, ids) - class_centres(f_n, y_n, ids)).pow(2).sum()


def center_term(kind, f, y_v, y_n, distance="euclidean"):
    """The lambda-weighted term of Eq. (8) for one part: f (2B, d) visible first."""
    B = len(y_v)
    if kind == "cross":
        return L_cc(f[:B], y_v, f[B:], y_n, distance)
    if kind == "center":
        return L_c(f, torch.cat([y_v, y_n]))
    return L_hc(f[:B], y_v, f[B:], y_n)


# ---------------------------------------------------------------- training

def check(settings):
    if settings.center not in CENTERS:
        raise common.UserError(f"--center {settings.center!r}: choose one of {', '.join(CENTERS)}")
    if settings.attention not in ATTENTIONS:
        raise common.UserError(f"--attention {settings.attention!r}: choose one of {', '.join(ATTENTIONS)}")
    if settings.cc_distance not in CHOICES["cc_distance"]:
        raise common.UserError(f"--cc-distance {settings.cc_distance!r}: choose one of "
                               f"{', '.join(CHOICES['cc_distance'])}")
    if settings.pcb_map not in CHOICES["pcb_map"]:
        raise common.UserError(f"--pcb-map {settings.pcb_map!r}: choose one of {', '.join(CHOICES['pcb_map'])}")
    if settings.pcb_map == "stage4" and settings.attention != "none":
        raise common.UserError(f"--pcb-map stage4 is the PCB reading of Table II's baseline, which has no attention; "
                               f"add --attention none, or keep --pcb-map stage3 with --attention {settings.attention}")
    if settings.ltg:                                                  # the LTG's parameters, Alg. 1
        area, aspect, H, W = settings.ltg_area, settings.ltg_aspect, settings.height, settings.width
        if settings.f_g not in F_G:
            raise common.UserError(f"--f-g {settings.f_g!r} is not an f_g of Table III; choose one of {', '.join(F_G)}")
        if not (len(area) == 2 and 0 < area[0] <= area[1] <= 1 and len(aspect) == 2 and 0 < aspect[0] <= aspect[1]):
            raise common.UserError(f"--ltg-area {area} / --ltg-aspect {aspect}: give two increasing numbers each, "
                                   f"areas in (0, 1] (fractions of the image) and aspects > 0, e.g. 0.02 0.4 / "
                                   f"0.3 3.33")
        r, S = np.linspace(aspect[0], aspect[1], 101), area[0] * H * W
        if not np.any((np.rint(np.sqrt(S * r)) <= H) & (np.rint(np.sqrt(S / r)) <= W)):
            raise common.UserError(f"--ltg-area {area} --ltg-aspect {aspect}: no rectangle fits a {H}x{W} image; "
                                   f"lower the area or bring the aspect range nearer {H / W:.2f}")
        if not (0 <= settings.ltg_p <= 1 and settings.t_min >= 0 and settings.ltg_max_rects >= 1):
            raise common.UserError(f"LTG: need 0 <= --ltg-p <= 1 (got {settings.ltg_p}), --t-min >= 0 (got "
                                   f"{settings.t_min}) and --ltg-max-rects >= 1 (got {settings.ltg_max_rects})")
    rows = stage3_height(settings.height)
    if not 1 <= settings.parts <= rows:
        raise common.UserError(f"--parts {settings.parts}: the Residual-Block 3 map of a {settings.height}-pixel "
                               f"image has {rows} rows; give 1..{rows} parts, or raise --height")


def make_ltg(settings):
    return LTG(settings.ltg_p, settings.ltg_area, settings.ltg_aspect,
               settings.f_g, settings.t_min, settings.ltg_max_rects)


def objective(model, batch, settings, watch=None):
    """Eq. (9) on one batch: L = L_id^v + L_id^n + sum_{k=1}^K L_cls^k, L_cls^k = L_id^k + L_tri^k + lambda L_cc^k
    (Eq. 8; L_cc or the Table IV alternative of `center`) -> (L, {loss term name: value}). `watch` (the signature
    of common.Run.watch), when given, gets each unit part feature m_k (2B, d) and its L_tri: the collapse alarm."""
    y_v, y_n = batch["y_v"], batch["y_r"]
    y = torch.cat([y_v, y_n])                                         # (2B,) visible first, then infrared
    f, logits, high = model(batch["x_v"], batch["x_r"])              # K x (2B, d), K x (2B, classes), 2 or None
    with torch.autocast(y.device.type, enabled=False):               # the losses in float32, under --amp too
        f = [f_k.float() for f_k in f]
        terms = {"L_id": sum(F.cross_entropy(z.float(), y) for z in logits),             # sum_k L_id^k
                 "L_tri": sum(L_tri_hard(f_k, y, settings.margin) for f_k in f)}         # sum_k L_tri^k
        loss = terms["L_id"] + terms["L_tri"]
        if settings.center != "none":
            name = {"cross": "L_cc", "center": "L_c", "hetero": "L_hc"}[settings.center]
            terms[name] = sum(center_term(settings.center, f_k, y_v, y_n, settings.cc_distance) for f_k in f)
            loss = loss + settings.lam * terms[name]                  # Eq. (8), summed over the K parts
        if high is not None:
            terms["L_id^v"] = F.cross_entropy(high[0].float(), y_v)
            terms["L_id^n"] = F.cross_entropy(high[1].float(), y_n)
            loss = loss + terms["L_id^v"] + terms["L_id^n"]          # Eq. (9)
        if watch is not None:
            for k, m_k in enumerate(f):                                # the collapse alarm, per part
                watch(f"L_tri on part {k + 1} m_k", m_k, loss=L_tri_hard(m_k.detach(), y, settings.margin),
                      margin=settings.margin)
    return loss, terms


def train(settings, trainset, run):
    check(settings)
    ltg = make_ltg(settings) if settings.ltg else None
    model = build(settings, trainset.num_classes).to(run.device)
    augment = data.Augment(settings.height, settings.width, pad=settings.pad, erasing=settings.erasing, extra=ltg)
    loader = data.train_loader(trainset, settings.P, settings.K, run.seed, augment, workers=run.workers)
    slow = [model.backbone] + ([model.f_v, model.f_n] if settings.attention == "mam" else []) + \
        ([model.f_S] if model.f_S is not None else [])                # every pretrained stage at 0.1 x lr
    slow_ids = {id(p) for m in slow for p in m.parameters()}
    groups = [{"params": [p for m in slow for p in m.parameters()], "lr": settings.backbone_lr_mult * settings.lr},
              {"params": [p for p in model.parameters() if id(p) not in slow_ids], "lr": settings.lr}]
    optimizer = torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum,  # release train.py:192-204
                                weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    schedule = common.WarmupMultiStep(optimizer, settings.milestones, warmup=settings.warmup)
    for epoch in run.epochs("train", settings.epochs, model=model, optimizer=optimizer, schedule=schedule,
                            loader=loader):
        schedule.step_epoch(epoch)
        model.train()
        for it, batch in run.batches(loader, epoch):
            with run.autocast():
                loss, terms = objective(model, batch, settings, watch=run.watch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(epoch, it, {"L": loss.detach(), **{k: v.detach() for k, v in terms.items()}},
                    optimizer.param_groups[-1]["lr"])
    return model


@torch.no_grad()
def extract(model, x, modality):
    """Test feature: the K BN part features, each L2-normalised, concatenated, L2-normalised: (B, K part_dim).
    With flip_test (release test.py:109-119) the concatenations of the image and its mirror are summed first."""
    def parts(x):
        F_m = model.backbone(x)
        A, _ = model.attend(F_m, modality)
        return torch.cat([F.normalize(h_k, dim=1) for h_k in model.part_features(F_m * A)], 1)

    e = parts(x) + parts(x.flip(3)) if model.flip_test else parts(x)
    return F.normalize(e, dim=1)


# ---------------------------------------------------------------- pictures (Fig. 9, Fig. 10)

def heat(maps, size):
    """(B, 1, h, w) -> (B, H, W, 3) uint8 jet-like colours, each map stretched to its own [min, max]."""
    m = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    t = ((m - lo) / (hi - lo).clamp(min=1e-8)).cpu().numpy()
    rgb = np.stack([np.clip(1.5 - np.abs(4 * t - k), 0, 1) for k in (3, 2, 1)], -1)
    return (255 * rgb).astype(np.uint8)


def grid(rows, labels=None, label_width=120):
    """A list of rows, each a list of (H, W, 3) uint8 images of one size -> one PIL image with 2-pixel gaps; with
    labels (one text per row, lines split by newlines) a white column on the left names each row."""
    h, w = rows[0][0].shape[:2]
    left = label_width if labels else 0
    canvas = Image.new("RGB", (left + max(len(r) for r in rows) * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        if labels:
            draw.multiline_text((2, i * (h + 2) + 2), labels[i], fill="black")
        for j, image in enumerate(row):
            canvas.paste(Image.fromarray(image), (left + j * (w + 2), i * (h + 2)))
    return canvas


@torch.no_grad()
def figures(model, settings, trainset, testset, out, n=8):
    """ltg.png: training images (top row) over their LTG outputs (bottom row), p = 1 (Fig. 9).
    attention.png, unless --attention none: n/2 visible then n/2 infrared test images (top row), and over them the
    channel mean of F, the attention map, and the channel mean of the attended map (Fig. 10), each stretched to
    its own range."""
    def spread(images):                                               # n // 2 images from across the set
        return images[np.linspace(0, len(images) - 1, n // 2).astype(int)]

    images = np.concatenate([spread(trainset.v.images), spread(trainset.r.images)])   # (n, H, W, 3) uint8
    ltg = make_ltg(settings)
    ltg.p = 1.0
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x_star, _, _ = ltg.transform(x, np.random.default_rng(0))
    after = (x_star.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid([list(images), list(after)], ["training\nimages", "LTG output\n(p = 1)"]).save(out / "ltg.png")
    if settings.attention == "none":
        return
    model.eval()
    device = next(model.parameters()).device
    rows = [[], [], [], []]
    for modality in ("v", "r"):
        shown = spread(testset.pools[modality].images)
        F_m = model.backbone(next(data.test_batches(shown, len(shown))).to(device))
        A, _ = model.attend(F_m, modality)
        maps = (F_m.mean(1, keepdim=True), A, (F_m * A).mean(1, keepdim=True))
        rows[0] += list(shown)
        for row, m in zip(rows[1:], maps):
            row += list((0.5 * shown + 0.5 * heat(m, shown.shape[1:3])).astype(np.uint8))
    branch = {"mam": "MAM: f_v on visible,\nf_n on infrared", "spatial": "CBAM spatial,\nshared"}[settings.attention]
    labels = [f"input: {n // 2} visible,\nthen {n // 2} infrared", "mean_c F\n(stage-3 map)",
              f"attention A\n{branch}", "mean_c F (.) A\n(what PCB cuts)"]
    grid(rows, labels).save(out / "attention.png")
