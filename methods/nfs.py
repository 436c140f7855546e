"""NFS: Chen, Wan, Li, Jing and Sun, "Neural Feature Search for RGB-Infrared Person Re-Identification", CVPR 2021.

No code of this paper was ever published; this file is the first implementation. Readings and choices are tagged
`# Choice:` on the line they change, deviations `# Deviation:`.

Implements:
- the two-stream baseline (Sec. 3.1, supplement Table 5): modality-specific conv1 block, shared ResNet stages
  layer1-4 ("Stage 1-4" of Table 4), last stride 1, global average pooling, a shared BN layer and a classifier;
  L_b = L_id + L_tri with the weighted-regularisation triplet (Eq. 1);
- modality-aware search cells (Sec. 3.2, Fig. 2 left) after every searched shared stage L: for each modality
  m in (v, r) a pixel-level probability field P_L^m in R^{C x H x W} (H, W: the stage's output size at the
  configured input size, Eq. 3) and a channel-level field P_L^m in R^C, initialised uniformly; P~ = sigmoid(P);
  binary gates G select features (Eq. 4);
- the gate sampler (Eq. 6-9): x ~ ContinuousBernoulli(P~) by the inverse CDF of u ~ U(0, 1), with the normalising
  constant C(P~) of Eq. 8 computed stably near P~ = 1/2; hard gates G ~ Bernoulli(P~) (Eq. 6); the backward pass
  is the straight-through estimator dG/dP~ = 1 (Eq. 9);
- the bilevel search (Eq. 5, Alg. 1): an 80/20 image split (line 1); alternating a weight step on D_train with
  L_train (line 3) and a gate step on D_val with L_val at the virtual weights W' = W - xi grad_W L_train (line 4,
  second order: the Hessian-vector product exactly by autograd, or by DARTS's finite differences with
  `--hessian finite-difference`; `--first-order true` drops it); the binary gates derived from P~ (line 5) are
  saved to OUT/gates.pt and the network is retrained from its initial weights on the whole training set with the
  gates fixed (line 6); reid.py evaluates it (line 7). `--phase search|retrain|both`, `--gates FILE`;
- the cross-modality contrastive loss (Eq. 10-13) and the total objective L = L_b + lambda L_c (Eq. 14), used
  as L_train, L_val (Eq. 5) and in the retraining;
- ablation switches: Table 3 (B, B+N, B+C, B+N+C) = `--feature-search`, `--contrastive`; Table 4 =
  `--search-stages`;
- pictures (Fig. 4): OUT/gates.png (per searched stage and modality: the pixel gate averaged over channels and
  the channel gate) and OUT/features.png (channel-mean feature maps of the first searched stage before and after
  its gates, for test images of both modalities).

Readings and choices:
- The hard gate thresholds the continuous-Bernoulli sample at its own (1 - P~)-quantile, G = [x > F^-1(1 - P~)],
  so that G ~ Bernoulli(P~) as Eq. 6 writes. The continuous Bernoulli serves only as the sampler: the sample
  carries no gradient (F^-1 is increasing, so G = [u > 1 - P~] exactly), and Eq. 9, taken literally, is the whole
  gradient that reaches P: the gradient reaching a hard gate is passed unchanged to P~ (and through the sigmoid
  to P); nothing is relaxed in the forward pass.
- The pixel-level field: Sec. 3.2 says the pixel subspace holds "vectors in each spatial position" (one gate per
  position, shared over channels), but gives the field the shape P_L^m in R^{C_out x W/2 x H/2} (one gate per
  element). The stated shape is followed: one pixel gate per (channel, position).
- Pixel and channel gates are searched jointly by multiplying them: feature (c, h, w) is kept iff its pixel gate
  and the gate of channel c are both 1. One gate draw per image and per field element.
- Fields are initialised U(0, 1) (`gate_init`; the paper says "uniform distribution"), so P~ starts in
  (0.5, 0.73): every derived gate starts open and the search closes what L_val pushes below 1/2. Derived gates:
  P~ > 0.5 (`threshold`, Alg. 1 line 5). Search-time keep rate at initialisation: a feature is kept with
  probability P~_pix P~_ch, so a search cell keeps E[sigmoid(U(0, 1))]^2 = ln((1 + e) / 2)^2 = 38.5 % of its
  output per image (each searched stage drops about 62 % of its features at random), while the derived network
  at the same point keeps 100 %. (With `--gate-sample round`: E[sigmoid(U(0, 1) / 2)]^2 = 31.6 %.)
- xi of the virtual step is the current learning rate of each weight's parameter group (DARTS [28]); the virtual
  step is the plain gradient step Alg. 1 writes (DARTS adds momentum and weight decay). BN running statistics are
  restored after every gate step, so only weight steps move them.
- The gate step (line 4) takes its virtual step on the D_train batch that line 3 has just used, at the weights
  line 3 has just updated (Alg. 1's order; DARTS's search script takes the architecture step before the weight
  step). It draws its own gate noise, so its virtual gradient is not the step line 3 actually took.
- The D_val batches go through the same crop-and-flip augmentation and the same P x K identity sampler as the
  D_train batches. An identity with fewer than K validation images in a modality is sampled with replacement
  (RegDB: 2 validation images per identity and modality against K = 4), so those batches repeat images.
- The 80/20 split (Alg. 1 line 1, "randomly split") is stratified: 80 % of the images of every (modality,
  identity), so both parts hold every identity (data.TrainSet.split_images).
- The second-order term is exact by default (autograd through grad_W L_train). DARTS's finite difference
  (`--hessian finite-difference`, eps = 0.01 / ||xi grad_W' L_val||) is kept as an option: on a ResNet its step
  crosses ReLU kinks, so its gate gradient is far from the exact one, and it approaches it only for steps that
  float32 cannot resolve. The exact term costs more time and memory. `python bench.py nfs` measures both (the
  figures are in the README's "Speed and memory"). With `--amp`, the finite-difference evaluations run in float32:
  its step, of norm 0.01 over all weights (about 2e-6 per weight on a ResNet-50), is below bf16 resolution, so
  under bf16 the difference would be rounding noise.
- Gate optimiser: Adam, lr 3e-4, betas (0.5, 0.999) (DARTS's architecture optimiser) without weight decay:
  the per-element gradients of the fields are far smaller than DARTS's 1e-3 decay term, which would otherwise
  drive every P to 0 regardless of the loss.
- Search length and schedule: the training recipe of Sec. 4.1 (the only one the paper gives). The lr decays when
  the 0-based epoch index reaches a milestone (16, 50), i.e. from the 17th and 51st epoch on, the convention of the
  community code the paper cites (methods/common.py WarmupMultiStep).
- L_c pairs: all P K x P K visible-infrared pairs of the batch, averaged (the expectation of the paper's random
  pairing, without its sampling noise), on the pooled features that L_tri uses.
- The shared BN layer is a BNNeck (AGW convention, [66]): its shift is frozen, the classifier has no bias, L_id is
  computed on BN(f) and L_tri (and L_c) on the pooled f. Sec. 3.1 says only "a shared batch normalization layer".
- The max pool sits in the modality-specific stem (methods/common.py), where supplement Table 5 puts it at the
  start of the shared conv2; it has no parameters, so the outputs are identical.
- Learning rates: 0.1 for BNNeck and classifier, 0.01 for the backbone (the community baseline [66] the paper
  trains with, whose base lr is the paper's 0.1); SGD momentum 0.9, Nesterov, weight decay 5e-4 (same source).
- The search and retrain networks start from the same initial weights (built under the run seed with the CPU
  generator only; the other generators, CUDA's included, are left untouched).
- `--phase search` returns the search network, tested with its derived gates. Its BatchNorm running statistics were
  gathered under the stochastic gates (about 38 % of the features kept at initialisation, against all of them
  under the derived gates at that point), so they do not match the derived network's inputs and are re-estimated
  first: one no-grad pass over an epoch of D_train batches with the derived gates, BN in train mode, cumulative
  average (reestimate_bn). Re-estimating rather than refusing: the number then says how good the searched gates
  are with the search's weights, a cheap check of a search before its retraining, which a refusal would take
  away. It is still not Alg. 1 line 7's result (weights trained on 80 % of the images under random gates);
  `--phase both` gives that. The run's meta says so (nfs_bn).

Deviations:
- Alg. 1 line 4 writes the virtual step without a step size (W - grad_W L_train); this file scales it by xi
  (DARTS's form, which the line cites).
- For float32 sampling P~ is clamped to [1e-6, 1 - 1e-6]: a saturated gate (|P| > 13.8) flips with probability
  1e-6 instead of exp(-|P|).
- `--gate-sample round` (not the default) rounds the sample, G = [x > 1/2]: then P(G = 1) = sqrt(P~) / (sqrt(P~) +
  sqrt(1 - P~)) = sigmoid(P / 2), not Eq. 6's P~. It is the rule of earlier versions of this file, kept for
  comparison.

Released code differs: no code was released, so there is no RELEASE recipe (`--recipe release` refuses).
"""
import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
from methods import common

PHASES = ("search", "retrain", "both")
HESSIANS = ("finite-difference", "autograd")
GATE_SAMPLES = ("quantile", "round")
MODALITIES = ("v", "r")
GATE_BETAS = (0.5, 0.999)   # Choice: DARTS [28]'s Adam betas for architecture parameters
FD_SCALE = 0.01             # Choice: DARTS's finite-difference step, eps = 0.01 / ||v||
SERIES = 1e-2               # |z| below which the power series replaces a closed form that is 0/0 at z = 0
LAMBDA_EPS = 1e-6           # P~ is clamped to [eps, 1 - eps] before sampling (float32): |P| > 13.8 acts as 13.8


@dataclass
class Settings:
    arch: str = "resnet50"               # Sec. 4.1: ResNet-50
    pretrained: str = "imagenet"         # Sec. 4.1: pretrained on ImageNet
    height: int = 288                    # Sec. 4.1: images resized to 288 x 144
    width: int = 144
    epochs: int = 80                     # Sec. 4.1: 80 epochs (retraining, Alg. 1 line 6)
    P: int = 8                           # Sec. 4.1: 8 identities per batch
    K: int = 4                           #   x 4 RGB + 4 IR images each
    lr: float = 0.1                      # Sec. 4.1: initial lr 0.1 (BNNeck, classifier)
    backbone_lr: float = 0.01            # Choice: 0.1 x lr for the backbone, community baseline [66]
    momentum: float = 0.9                # Sec. 4.1: SGD with momentum 0.9
    weight_decay: float = 5e-4           # Choice: community baseline [66]
    warmup: int = 10                     # Sec. 4.1: warm-up [34] (10 epochs in [34])
    milestones: tuple = (16, 50)         # Sec. 4.1: lr x0.1 at epoch 16, x0.01 at epoch 50 (0-based index, [66])
    erasing: float = 0.0                 # Sec. 4.1: random cropping and flipping only (no random erasing)
    T: float = 15.0                      # Sec. 4.4: contrastive margin T (Eq. 12)
    lam: float = 0.04                    # Sec. 4.4: trade-off lambda (Eq. 14)
    contrastive: bool = True             # Table 3: C, the contrastive loss L_c
    feature_search: bool = True          # Table 3: N, neural feature search (false: rows B, B+C)
    search_stages: tuple = (1, 2, 3)     # Table 4 row 11: search cells after stages 1, 2, 3 (layer1-3)
    phase: str = "both"                  # Alg. 1: search (lines 1-5), retrain (6-7) from --gates, or both
    gates: str = ""                      # gates.pt of a finished search, for --phase retrain
    search_split: float = 0.8            # Sec. 4.1: 80 % search-train / 20 % search-validation images
    search_epochs: int = 80              # Choice: not given; the training recipe of Sec. 4.1
    gate_lr: float = 3e-4                # Choice: not given; DARTS [28]'s Adam lr for architecture parameters
    gate_init: tuple = (0.0, 1.0)        # Sec. 3.2: "uniform distribution"; Choice: range U(0, 1)
    threshold: float = 0.5               # Alg. 1 line 5: not given; Choice: G = [P~ > 0.5]
    first_order: bool = False            # Alg. 1 line 4 is second order; true: grad of L_val at W
    hessian: str = "autograd"            # Choice: second-order term exact (autograd), or finite-difference (DARTS)
    gate_sample: str = "quantile"        # Eq. 6: G ~ Bernoulli(P~), x above its (1 - P~)-quantile; Deviation:
                                         #   "round", G = [x > 1/2], P(G = 1) = sigmoid(P / 2) (the earlier rule)


CHOICES = {"phase": PHASES, "hessian": HESSIANS, "gate_sample": GATE_SAMPLES}
LIMITS = {"search_epochs": 1}  # Alg. 1 without a search epoch would derive the gates from their initialisation


# CPU recipe for the built-in synthetic world: a small network from scratch, a short search, then retraining. The
# lr, backbone_lr, warm-up, milestones and gate_lr were set when this file was written, before the val split
# existed, and no val comparison of alternatives to them has been run (README, Recipes). The size and the search
# epochs were chosen on --split val, seed 0, to bring a run to about 5 minutes (issue: recipes): the earlier 96 x 48
# with 2 search epochs (`python reid.py --method nfs --split val --height 96 --width 48 --search-epochs 2`): val
# all-single rank-1 30.1 +- 3.6, mAP 36.3 +- 2.0 (over trials), training fit 41.2, within-modality rank-1 64.1 /
# 49.6, centroid cosine 0.427 against 0.023, gates keep 73-97 %, last-batch L_id 0.63, L_tri 0.53; 80 x 40, one
# search epoch (`python reid.py --method nfs --split val`): 26.4 +- 1.7, mAP 33.4 +- 1.1, fit 33.7, within 51.9 /
# 43.5, cosine 0.430 against 0.024, gates keep 89-98 %; last-batch retraining L_id 0.81, L_tri 0.61. Healthy, and
# 0.61 of the time (369 s against 606 s of training, both on one thread beside another job); rank-1 lower by one
# trial-std, mAP by 2.8: 80 x 40, one search epoch.
SYNTHETIC = dict(arch="resnet18", pretrained="none", height=80, width=40, search_epochs=1, epochs=10,
                 lr=0.1, backbone_lr=0.1, warmup=2, milestones=(6, 9), gate_lr=0.02)
SMOKE = dict(arch="resnet18", pretrained="none", height=64, width=32, search_epochs=1, epochs=1, P=4, K=2,
             warmup=1, milestones=())


# ---------------------------------------------------------------- continuous Bernoulli (Eq. 6-9)

def C(lam):
    """Eq. (8): the continuous Bernoulli normalising constant, 2 atanh(1 - 2 lam) / (1 - 2 lam), and 2 at lam = 1/2.

    The closed form is 0/0 at lam = 1/2 and loses precision near it; for |1 - 2 lam| < SERIES the series
    2 (1 + z^2/3 + z^4/5 + z^6/7), z = 1 - 2 lam, is used (next term z^8 / 9 < 1e-16)."""
    z = 1 - 2 * lam
    small = z.abs() < SERIES
    z_safe = torch.where(small, torch.ones_like(z), z)  # keeps the discarded branch (and its gradient) finite
    z2 = z * z
    series = 2 * (1 + z2 / 3 + z2 * z2 / 5 + z2 * z2 * z2 / 7)
    return torch.where(small, series, 2 * torch.atanh(z_safe) / z_safe)          # Eq. (8)


def sample_cb(lam, u):
    """x ~ ContinuousBernoulli(lam) (Eq. 6-7) by the inverse CDF of u ~ U(0, 1).

    The CDF of p(x | lam) = C(lam) lam^x (1 - lam)^(1 - x) is F(x) = (lam^x (1 - lam)^(1 - x) + lam - 1) / (2 lam - 1),
    so x = log(1 + u (2 lam - 1) / (1 - lam)) / log(lam / (1 - lam)). With log(lam / (1 - lam)) = (2 lam - 1) C(lam)
    this is x = u / ((1 - lam) C(lam)) * log1p(a) / a, a = u (2 lam - 1) / (1 - lam): both factors are smooth and
    finite at lam = 1/2, where the first form is 0/0 (and x = u). lam, u broadcast; returns their broadcast shape."""
    lam = lam.clamp(LAMBDA_EPS, 1 - LAMBDA_EPS)                   # Deviation: float32 sampling, |P| > 13.8 as 13.8
    a = u * (2 * lam - 1) / (1 - lam)
    small = a.abs() < SERIES
    a_safe = torch.where(small, torch.ones_like(a), a)
    log1p_ratio = torch.where(small, 1 - a / 2 + a * a / 3 - a ** 3 / 4 + a ** 4 / 5, torch.log1p(a_safe) / a_safe)
    return u / ((1 - lam) * C(lam)) * log1p_ratio                                # Eq. (6)-(7) via Eq. (8)


def gate(P, u, rule="quantile"):
    """Hard gate of probability-field logits P (any shape) for uniform noise u (broadcastable to it, a leading batch
    axis in practice); backward dG/dP~ = 1 (Eq. 9). Forward, with x = F^-1(u) ~ CB(P~), P~ = sigmoid(P):
      quantile: G = [x > F^-1(1 - P~)], the sample above its own (1 - P~)-quantile; F^-1 is increasing, so
                G = [u > 1 - P~] and P(G = 1) = P~ (Eq. 6);
      round:    G = [x > 1/2], P(G = 1) = 1 - F(1/2) = sqrt(P~) / (sqrt(P~) + sqrt(1 - P~)) = sigmoid(P / 2)."""
    P_tilde = torch.sigmoid(P)                                  # P~ = sigma(P), Sec. 3.2
    with torch.no_grad():
        x = sample_cb(P_tilde, u)                               # Eq. (6)-(7)
        if rule == "quantile":
            lam = P_tilde.clamp(LAMBDA_EPS, 1 - LAMBDA_EPS)    # Deviation: the float32 clamp sample_cb applies
            q = sample_cb(lam, 1 - lam)                         # F^-1(1 - P~): P(x > q) = P~, Eq. (6)
        else:
            q = 0.5                                             # Deviation: "round", P(G = 1) = sigma(P / 2)
    G = (x > q).to(P_tilde.dtype)
    return G + (P_tilde - P_tilde.detach())                     # Eq. (9), Choice: literal STE; value exactly G


# ---------------------------------------------------------------- modules

def stage_shapes(arch, height, width):
    """(C, H, W) of the outputs Y_L of layer1..layer4 at an input of height x width, from the strides: conv1 and the
    max pool halve (3x3 / 7x7 kernels with 'same' padding: ceil(n / 2)), layer2 and layer3 halve, layer4 keeps
    (last stride 1). E.g. ResNet-50 at 288 x 144: (256, 72, 36), (512, 36, 18), (1024, 18, 9), (2048, 18, 9)."""
    def halve(n):
        return (n + 1) // 2
    h, w = halve(halve(height)), halve(halve(width))
    shapes = []
    for c, stride in zip(common.channels(arch), (1, 2, 2, 1)):
        if stride == 2:
            h, w = halve(h), halve(w)
        shapes.append((c, h, w))
    return shapes


def apply_gates(y, n_v, gates):
    """Eq. (4): Y~ = Y where the gate is 1, 0 where it is 0. y (B, C, H, W), rows [:n_v] visible, [n_v:] infrared;
    gates {m: (pixel (n_m or 1, C, H, W), channel (n_m or 1, C))}. Choice: pixel and channel gates multiply."""
    parts = []
    for m, rows in zip(MODALITIES, (slice(0, n_v), slice(n_v, None))):
        G_pix, G_ch = gates[m]
        parts.append(y[rows] * (G_pix * G_ch[..., None, None]).to(y.dtype))    # Eq. (4)
    return torch.cat(parts)


class SearchCell(nn.Module):
    """Modality-aware search cell of one shared stage (Sec. 3.2, Fig. 2 left).

    For each modality m: pixel-level field P_pix[m] (C, H, W) and channel-level field P_ch[m] (C,), uniform in
    `init`. Training mode: stochastic hard gates (Eq. 6-9, `sample` the gate() rule), Choice: one draw per image
    and element; evaluation mode: the derived gates."""

    def __init__(self, c, h, w, init, threshold, sample="quantile"):
        super().__init__()
        lo, hi = init
        self.P_pix = nn.ParameterDict({m: nn.Parameter(torch.empty(c, h, w).uniform_(lo, hi)) for m in MODALITIES})
        self.P_ch = nn.ParameterDict({m: nn.Parameter(torch.empty(c).uniform_(lo, hi)) for m in MODALITIES})
        self.threshold, self.sample = threshold, sample

    def draw_noise(self, n):
        """u ~ U(0, 1) for n images: (pixel (n, C, H, W), channel (n, C))."""
        pix, ch = self.P_pix["v"], self.P_ch["v"]
        return (torch.rand(n, *pix.shape, device=pix.device), torch.rand(n, *ch.shape, device=ch.device))

    def derived(self):
        """Alg. 1 line 5: {'v.pixel': (C, H, W), 'v.channel': (C,), 'r.pixel', 'r.channel'} bool, P~ > threshold."""
        out = {}
        for m in MODALITIES:
            out[f"{m}.pixel"] = torch.sigmoid(self.P_pix[m]).detach() > self.threshold
            out[f"{m}.channel"] = torch.sigmoid(self.P_ch[m]).detach() > self.threshold
        return out

    def probabilities(self):
        """P~ = sigmoid(P) of every field, with the keys of derived()."""
        return {f"{m}.{level}": torch.sigmoid(field[m]).detach()
                for m in MODALITIES for level, field in (("pixel", self.P_pix), ("channel", self.P_ch))}

    def forward(self, y, n_v, noise=None):
        """y = Y_L (B, C, H, W), rows [:n_v] visible; noise: draw_noise(B) to reuse a draw, None for a fresh one."""
        if not self.training:
            d = self.derived()
            return apply_gates(y, n_v, {m: (d[f"{m}.pixel"], d[f"{m}.channel"]) for m in MODALITIES})
        u_pix, u_ch = self.draw_noise(y.shape[0]) if noise is None else noise
        gates = {}
        for m, rows in zip(MODALITIES, (slice(0, n_v), slice(n_v, None))):
            gates[m] = (gate(self.P_pix[m], u_pix[rows], self.sample),
                        gate(self.P_ch[m], u_ch[rows], self.sample))          # (n_m, C, H, W), (n_m, C)
        return apply_gates(y, n_v, gates)


class GateCell(nn.Module):
    """A search cell with fixed binary gates (Alg. 1 line 6): bool buffers G_pix_<m> (C, H, W), G_ch_<m> (C,)."""

    def __init__(self, c, h, w):
        super().__init__()
        for m in MODALITIES:
            self.register_buffer(f"G_pix_{m}", torch.ones(c, h, w, dtype=torch.bool))
            self.register_buffer(f"G_ch_{m}", torch.ones(c, dtype=torch.bool))

    def derived(self):
        return {f"{m}.{level}": getattr(self, f"G_{key}_{m}").clone()
                for m in MODALITIES for level, key in (("pixel", "pix"), ("channel", "ch"))}

    def set(self, gates):
        """gates: the derived() dict of a search cell."""
        for m in MODALITIES:
            getattr(self, f"G_pix_{m}").copy_(gates[f"{m}.pixel"])
            getattr(self, f"G_ch_{m}").copy_(gates[f"{m}.channel"])

    def forward(self, y, n_v, noise=None):
        return apply_gates(y, n_v, {m: (getattr(self, f"G_pix_{m}"), getattr(self, f"G_ch_{m}")) for m in MODALITIES})


class NFS(nn.Module):
    """Two-stream baseline (Sec. 3.1) with a cell after each searched shared stage (Sec. 3.2).

    kind: 'baseline' (no cells: Table 3 rows B, B+C), 'search' (SearchCell) or 'retrain' (GateCell). The backbone
    and head are created before the cells, so under one seed every kind starts from the same weights."""

    def __init__(self, settings, num_classes, kind):
        super().__init__()
        net_v = common.resnet(settings.arch, settings.pretrained)
        net_r = common.resnet(settings.arch, settings.pretrained)
        self.stem_v, self.stem_r = common.stem(net_v), common.stem(net_r)   # modality-specific conv1 block
        self.stages = nn.ModuleList(common.stages(net_v))                   # shared conv2-conv5 (Stage 1-4)
        c = common.channels(settings.arch)
        self.bnneck = nn.BatchNorm1d(c[3])                                   # shared BN after pooling
        self.bnneck.bias.requires_grad_(False)                               # Choice: BNNeck, AGW [66]
        self.classifier = nn.Linear(c[3], num_classes, bias=False)           # Choice: bias-free, AGW [66]
        cells = {}
        if kind != "baseline":
            shapes = stage_shapes(settings.arch, settings.height, settings.width)
            for s in sorted(settings.search_stages):
                ch, h, w = shapes[s - 1]
                cells[f"layer{s}"] = (
                    SearchCell(ch, h, w, settings.gate_init, settings.threshold, settings.gate_sample)
                    if kind == "search" else GateCell(ch, h, w))
        self.cells = nn.ModuleDict(cells)

    def backbone(self, x, n_v, noise=None):
        """Stem output x (B, 64, h, w), rows [:n_v] visible -> pooled feature f (B, C). noise: {cell: draw}."""
        for i, stage in enumerate(self.stages, 1):
            x = stage(x)                                                     # Y_L, Eq. (3)
            name = f"layer{i}"
            if name in self.cells:
                x = self.cells[name](x, n_v, None if noise is None else noise[name])   # Y~_L, Eq. (4)
        return x.mean(dim=(2, 3))                                            # global average pooling

    def forward(self, x_v, x_r, noise=None):
        """(B, 3, H, W) each -> f (2B, C), logits (2B, classes); visible first, then infrared."""
        x = torch.cat([self.stem_v(x_v), self.stem_r(x_r)])
        f = self.backbone(x, len(x_v), noise)
        return f, self.classifier(self.bnneck(f))

    def features(self, x, modality):
        """(B, 3, H, W) of one modality -> pooled feature f (B, C) and BN feature (B, C)."""
        stem = self.stem_v if modality == "v" else self.stem_r
        f = self.backbone(stem(x), len(x) if modality == "v" else 0)
        return f, self.bnneck(f)

    def draw_noise(self, n):
        """One gate draw for a batch of n images: {cell name: (pixel noise, channel noise)}."""
        return {name: cell.draw_noise(n) for name, cell in self.cells.items()}

    def named_weights(self):
        """The network weights W (Eq. 5, lower level): trainable parameters outside the cells."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("cells.")]

    def weights(self):
        return [p for _, p in self.named_weights()]

    def fields(self):
        """The probability fields P (Eq. 5, upper level)."""
        return list(self.cells.parameters())

    def gates(self):
        """Derived binary gates {'layer1.v.pixel': (C, H, W) bool, 'layer1.v.channel': (C,) bool, ...}."""
        return {f"{name}.{k}": g for name, cell in self.cells.items() for k, g in cell.derived().items()}

    def set_gates(self, gates):
        for name, cell in self.cells.items():
            cell.set({k[len(name) + 1:]: g for k, g in gates.items() if k.startswith(name + ".")})


def model_kind(settings):
    """The kind of network train() returns for these settings."""
    if not settings.feature_search:
        return "baseline"
    return "search" if settings.phase == "search" else "retrain"


def initial_model(settings, num_classes, kind, seed):
    """The network at its initial weights, identical for every kind under one seed. Choice: Alg. 1 line 6 retrains
    from the weights the search started from. The network is built on the CPU, so only the CPU generator is seeded
    (and restored afterwards); the CUDA generators are not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return NFS(settings, num_classes, kind)


def build(settings, num_classes, meta=None):
    """The network train() returned; meta['nfs_model'] names its kind. Retrained gates are buffers of its state."""
    return NFS(settings, num_classes, (meta or {}).get("nfs_model", model_kind(settings)))


# ---------------------------------------------------------------- losses

# Copy of agw.pairwise_distance; test_all.TestCopies keeps them equal
def pairwise_distance(x, y):
    """Euclidean distances (N, M) between rows of x (N, d) and y (M, d)."""
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()
    return d2.clamp(min=1e-12).sqrt()


# Copy of agw.L_wrt; test_all.TestCopies keeps them equal
def L_wrt(f, y):
    """Weighted-regularisation triplet of the AGW survey, averaged over the anchors i of the batch:

    L_wrt(i) = log(1 + exp(sum_{j in P_i} w^p_ij d^p_ij - sum_{k in N_i} w^n_ik d^n_ik)),
    w^p_ij = exp(d^p_ij) / sum_{d in P_i} exp(d),   w^n_ik = exp(-d^n_ik) / sum_{d in N_i} exp(-d),
    with P_i / N_i the positives / negatives of anchor i in the batch and d the Euclidean distance.
    Reading: P_i includes i itself (d_ii ~ 0; the survey does not say), as the community loss does. f (N, d), y (N,)."""
    d = pairwise_distance(f, f)                                      # (N, N)
    pos = (y[:, None] == y[None, :]).float()
    neg = 1.0 - pos
    w_p = torch.softmax(d.masked_fill(pos == 0, float("-inf")), dim=1)
    w_n = torch.softmax((-d).masked_fill(neg == 0, float("-inf")), dim=1)
    d_p = (w_p * d).sum(1)
    d_n = (w_n * d).sum(1)
    return F.softplus(d_p - d_n).mean()


def L_c(f_v, f_r, y_v, y_r, T):
    """Cross-modality contrastive loss (Eq. 10-13) of visible f_v (N_v, d) and infrared f_r (N_r, d) embeddings:

    L_c = Label (D_E)^2 + (1 - Label) (D_T)^2 (Eq. 13) per pair (i_rgb, i_ir), with Label = [ID(i_rgb) = ID(i_ir)]
    (Eq. 10), D_E = ||i_rgb - i_ir||_2 (Eq. 11) and D_T = max(0, T - ||i_rgb - i_ir||_2) (Eq. 12).
    Choice: every (visible, infrared) pair of the batch is a pair, and Eq. (13) is averaged over them."""
    label = (y_v[:, None] == y_r[None, :]).float()                  # Eq. (10), (N_v, N_r)
    D = pairwise_distance(f_v, f_r)                                  # ||i_rgb - i_ir||_2, (N_v, N_r)
    D_E = D                                                          # Eq. (11)
    D_T = (T - D).clamp(min=0)                                       # Eq. (12)
    return (label * D_E.pow(2) + (1 - label) * D_T.pow(2)).mean()    # Eq. (13); Choice: mean over all pairs


def objective(model, batch, settings, noise=None, params=None):
    """Eq. (14) on one batch: L = L_b + lambda L_c, L_b = L_id + L_tri (Eq. 1) -> (L, {term: value}). L_train and
    L_val of Eq. (5) are this function on a D_train and a D_val batch.

    noise: a model.draw_noise() to reuse; params: {name: tensor} replacing weights (virtual weights, Alg. 1 line 4).
    The forward runs under the caller's autocast, the losses in float32."""
    inputs = (batch["x_v"], batch["x_r"], noise)
    f, logits = model(*inputs) if params is None else torch.func.functional_call(model, params, inputs)
    with torch.autocast(f.device.type, enabled=False):              # the losses in float32 under --amp
        if f.dtype in (torch.float16, torch.bfloat16):
            f, logits = f.float(), logits.float()
        y = torch.cat([batch["y_v"], batch["y_r"]])                  # (2PK,) visible first, then infrared
        terms = {"L_id": F.cross_entropy(logits, y), "L_tri": L_wrt(f, y)}      # Choice: L_tri on f, L_id on BN(f)
        loss = terms["L_id"] + terms["L_tri"]                        # Eq. (1)
        if settings.contrastive:
            n_v = len(batch["x_v"])
            terms["L_c"] = L_c(f[:n_v], f[n_v:], batch["y_v"], batch["y_r"], settings.T)   # Choice: on f, as L_tri
            loss = loss + settings.lam * terms["L_c"]                # Eq. (14)
    return loss, {k: v.detach() for k, v in terms.items()}


# ---------------------------------------------------------------- search (Alg. 1)

def gate_gradient(model, batch_t, batch_v, settings, xi, autocast=contextlib.nullcontext, fd_scale=FD_SCALE):
    """Alg. 1 line 4: the gradient w.r.t. the fields P of L_val(W', P) with W' = W - xi grad_W L_train(W, P).

    grad = grad_P L_val(W', P) - (d^2 L_train / dP dW) v, v = xi grad_W' L_val(W', P) (the chain rule through W').
    The mixed second derivative times v is, with `settings.hessian`:
      finite-difference: (grad_P L_train(W + eps v) - grad_P L_train(W - eps v)) / (2 eps), eps = fd_scale / ||v||;
      autograd: exact, by differentiating L_val(W - xi grad_W L_train) through the graph of grad_W L_train.
    `settings.first_order`: grad_P L_val(W, P). Every L_train evaluation uses one gate draw, so the finite difference
    compares one function at two points. `autocast`: the context factory every objective evaluation runs under (the
    run's); the finite-difference evaluations run in float32 whatever it is (its step is below bf16 resolution).
    xi: one step size per model.weights() entry. Weights and BN buffers are left as they were.
    Returns ([grad per model.fields() entry], L_val value)."""
    names, W = zip(*model.named_weights())
    P = model.fields()
    n_t, n_val = len(batch_t["x_v"]) + len(batch_t["x_r"]), len(batch_v["x_v"]) + len(batch_v["x_r"])
    buffers = [(b, b.clone()) for b in model.buffers()]
    if settings.first_order:
        with autocast():
            L_val = objective(model, batch_v, settings)[0]
        grads = torch.autograd.grad(L_val, P)
    else:
        if settings.hessian == "finite-difference":
            autocast = contextlib.nullcontext               # Choice: W +- eps v is below bf16 resolution: float32
        u_t, u_v = model.draw_noise(n_t), model.draw_noise(n_val)
        with autocast():
            L_train = objective(model, batch_t, settings, noise=u_t)[0]
        if settings.hessian == "autograd":
            g = torch.autograd.grad(L_train, W, create_graph=True)
            W_virtual = {n: w - x * gw for n, w, x, gw in zip(names, W, xi, g)}  # Deviation: xi; W' depends on P
            with autocast():
                L_val = objective(model, batch_v, settings, noise=u_v, params=W_virtual)[0]
            grads = torch.autograd.grad(L_val, P)
        else:
            g = torch.autograd.grad(L_train, W)
            W0 = [w.detach().clone() for w in W]
            with torch.no_grad():
                for w, x, gw in zip(W, xi, g):
                    w.sub_(x * gw)                                 # Deviation: W' = W - xi grad L_train (xi: DARTS)
            with autocast():
                L_val = objective(model, batch_v, settings, noise=u_v)[0]
            d = torch.autograd.grad(L_val, list(W) + P)
            dW, dP = d[:len(W)], d[len(W):]
            v = [x * dw for x, dw in zip(xi, dW)]
            eps = fd_scale / torch.cat([t.flatten() for t in v]).norm().clamp(min=1e-12)
            sides = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for w, w0, vi in zip(W, W0, v):
                        w.copy_(w0 + sign * eps * vi)                                    # W +- eps v
                with autocast():
                    L_side = objective(model, batch_t, settings, noise=u_t)[0]             # L_train(W +- eps v)
                sides.append(torch.autograd.grad(L_side, P))
            with torch.no_grad():
                for w, w0 in zip(W, W0):
                    w.copy_(w0)
            grads = [dp - (gp - gn) / (2 * eps) for dp, gp, gn in zip(dP, *sides)]
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)                                  # Choice: only weight steps move BN running statistics
    return list(grads), L_val.detach()


def weight_optimizer(model, settings):
    """SGD over the weights W: lr for BNNeck and classifier, backbone_lr for the rest; momentum, Nesterov."""
    head_ids = {id(p) for p in list(model.bnneck.parameters()) + list(model.classifier.parameters())}
    head = [p for p in model.weights() if id(p) in head_ids]
    backbone = [p for p in model.weights() if id(p) not in head_ids]
    return torch.optim.SGD([{"params": backbone, "lr": settings.backbone_lr}, {"params": head, "lr": settings.lr}],
                           momentum=settings.momentum, weight_decay=settings.weight_decay, nesterov=True)


def step_sizes(model, optimizer):
    """xi of Alg. 1 line 4, one per model.weights() entry: the current lr of its parameter group (Choice, DARTS)."""
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return [lr_of[id(w)] for w in model.weights()]


def val_batches(loader, epoch, its, device):
    """The D_val batches of search epoch `epoch` (`its` iterations): the smaller loader's epochs epoch R ..
    epoch R + R - 1 chained, R = ceil(its / len(loader)); deterministic per epoch, so resuming repeats them."""
    R = -(-its // len(loader))
    for e in range(epoch * R, (epoch + 1) * R):
        for batch in loader.epoch(e):
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def kept(gates):
    """Share of selected features per gate, {'layer1.v.pixel': 0.93, ...}."""
    return {k: round(float(g.float().mean()), 4) for k, g in gates.items()}


def search(settings, trainset, run):
    """Alg. 1 lines 1-4: alternate weight steps on D_train and gate steps on D_val; returns the search network.

    Eq. (5): the gates (fields P) are the upper-level variables, optimised on L_val; the weights W the lower-level
    ones, optimised on L_train; Eq. (2)'s selection of a feature subset y in Y is the derived gates."""
    d_train, d_val = trainset.split_images(settings.search_split, run.seed)               # Alg. 1 line 1
    model = initial_model(settings, trainset.num_classes, "search", run.seed).to(run.device)
    augment = data.Augment(settings.height, settings.width, erasing=settings.erasing)
    loader = data.train_loader(d_train, settings.P, settings.K, run.seed, augment, workers=run.workers)
    loader_val = data.train_loader(d_val, settings.P, settings.K, run.seed + 1, augment, workers=run.workers)
    optimizer = weight_optimizer(model, settings)
    gate_optimizer = torch.optim.Adam(model.fields(), lr=settings.gate_lr, betas=GATE_BETAS)
    schedule = common.WarmupMultiStep(optimizer, settings.milestones, warmup=settings.warmup)
    for epoch in run.epochs("search", settings.search_epochs, model=model, optimizer=optimizer,
                            gate_optimizer=gate_optimizer, schedule=schedule, loader=loader, loader_val=loader_val):
        schedule.step_epoch(epoch)
        xi = step_sizes(model, optimizer)                            # Choice: xi = current lr (DARTS)
        model.train()
        val = val_batches(loader_val, epoch, len(loader), run.device)
        for it, batch in run.batches(loader, epoch):                                 # Alg. 1 line 2
            with run.autocast():
                loss, terms = objective(model, batch, settings)                      # Alg. 1 line 3: L_train
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=model.weights())
            optimizer.step()
            grads, l_val = gate_gradient(model, batch, next(val), settings, xi, run.autocast)   # Alg. 1 line 4, Eq. (5)
            for p, g in zip(model.fields(), grads):
                p.grad = g
            gate_optimizer.step()
            run.log(epoch, it, {**terms, "L_val": l_val}, optimizer.param_groups[1]["lr"])
        run.say(f"[search] derived gates after epoch {epoch + 1}, share kept: {kept(model.gates())}")
    return model


@torch.no_grad()
def reestimate_bn(model, batches, autocast=contextlib.nullcontext):
    """Re-estimate every BatchNorm's running statistics of a search network under its derived gates: BN layers in
    train mode, cells in eval mode (derived gates), the cumulative average over `batches` (momentum None); weights
    and fields are not changed. Returns the number of batches. For --phase search: the statistics gathered under
    the stochastic gates do not match the derived network's inputs."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None                                   # cumulative average over the batches
    model.train()
    for cell in model.cells.values():
        cell.eval()                                          # the derived gates (Alg. 1 line 5)
    n = 0
    for batch in batches:
        with autocast():
            model(batch["x_v"], batch["x_r"])
        n += 1
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.train()
    return n


# ---------------------------------------------------------------- gates file

def save_gates(model, settings, path):
    """Alg. 1 line 5's result: derived gates, the probabilities P~ they come from, and what they fit."""
    common.save_atomic({"arch": settings.arch, "height": settings.height, "width": settings.width,
                        "search_stages": list(settings.search_stages), "threshold": settings.threshold,
                        "gates": {k: g.cpu() for k, g in model.gates().items()},
                        "probabilities": {f"{name}.{k}": p.cpu() for name, cell in model.cells.items()
                                          for k, p in cell.probabilities().items()}}, path)


def load_gates(path, model, settings):
    """The gates of a gates.pt, checked against `model`'s cells; a UserError names any mismatch."""
    if not path:
        raise common.UserError("--phase retrain needs --gates FILE, the gates.pt a search wrote "
                               "(python reid.py --method nfs --phase search writes OUT/gates.pt)")
    if not os.path.isfile(path):
        raise common.UserError(f"--gates {path}: no such file; give the gates.pt written by a search")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        gates = state["gates"]
    except Exception as e:
        raise common.UserError(f"--gates {path} cannot be read as a gates file ({type(e).__name__}); give the "
                               f"gates.pt written by a search") from None
    want = {k: g.shape for k, g in model.gates().items()}
    if set(gates) != set(want) or any(gates[k].shape != want[k] for k in want):
        raise common.UserError(
            f"--gates {path} was searched with --arch {state.get('arch')} --height {state.get('height')} --width "
            f"{state.get('width')} --search-stages {' '.join(map(str, state.get('search_stages', [])))}, this run has "
            f"--arch {settings.arch} --height {settings.height} --width {settings.width} --search-stages "
            f"{' '.join(map(str, settings.search_stages))}; use the search's values")
    return {k: g.bool() for k, g in gates.items()}


# ---------------------------------------------------------------- training

def check(settings):
    """Settings a user can get wrong, as one-line UserErrors."""
    if settings.phase not in PHASES:
        raise common.UserError(f"--phase {settings.phase!r}: choose one of {', '.join(PHASES)}")
    if settings.hessian not in HESSIANS:
        raise common.UserError(f"--hessian {settings.hessian!r}: choose one of {', '.join(HESSIANS)}")
    if settings.gate_sample not in GATE_SAMPLES:
        raise common.UserError(f"--gate-sample {settings.gate_sample!r}: choose one of {', '.join(GATE_SAMPLES)}")
    stages = tuple(settings.search_stages)
    if not stages or len(set(stages)) != len(stages) or not set(stages) <= {1, 2, 3, 4}:
        raise common.UserError(f"--search-stages {' '.join(map(str, stages))}: give distinct stages among 1 2 3 4")
    if not settings.feature_search and (settings.phase != "both" or settings.gates):
        raise common.UserError("--feature-search false trains the baseline (Table 3 rows B, B+C); leave out "
                               "--phase and --gates")
    if settings.gates and settings.phase != "retrain":
        raise common.UserError(f"--gates is for --phase retrain (this run has --phase {settings.phase}); add "
                               f"--phase retrain, or leave out --gates to search")
    if not 0.0 < settings.threshold < 1.0:
        raise common.UserError(f"--threshold {settings.threshold}: give a probability in (0, 1), e.g. 0.5")
    if len(settings.gate_init) != 2 or not settings.gate_init[0] < settings.gate_init[1]:
        raise common.UserError(f"--gate-init {' '.join(map(str, settings.gate_init))}: give two numbers LOW HIGH "
                               f"with LOW < HIGH, e.g. 0 1")


def fit(model, settings, trainset, run, phase):
    """Train W on the whole training set with the network's gates fixed (Alg. 1 line 6; the baseline rows too)."""
    augment = data.Augment(settings.height, settings.width, erasing=settings.erasing)
    loader = data.train_loader(trainset, settings.P, settings.K, run.seed, augment, workers=run.workers)
    optimizer = weight_optimizer(model, settings)
    schedule = common.WarmupMultiStep(optimizer, settings.milestones, warmup=settings.warmup)
    for epoch in run.epochs(phase, settings.epochs, model=model, optimizer=optimizer, schedule=schedule,
                            loader=loader):
        schedule.step_epoch(epoch)
        model.train()
        for it, batch in run.batches(loader, epoch):
            with run.autocast():
                loss, terms = objective(model, batch, settings)                      # Eq. (14)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(epoch, it, terms, optimizer.param_groups[1]["lr"])


def train(settings, trainset, run):
    check(settings)
    num_classes = trainset.num_classes
    if not settings.feature_search:                                      # Table 3 rows B, B+C
        model = initial_model(settings, num_classes, "baseline", run.seed).to(run.device)
        run.meta.update(nfs_model="baseline")
        fit(model, settings, trainset, run, "train")
        return model
    if settings.phase != "retrain":
        searched = search(settings, trainset, run)                      # Alg. 1 lines 1-4
        gates, source = searched.gates(), str(run.out / "gates.pt")     # Alg. 1 line 5
        save_gates(searched, settings, source)
        run.say(f"[search] gates written to {source}; share kept: {kept(gates)}")
        if settings.phase == "search":
            d_train, _ = trainset.split_images(settings.search_split, run.seed)         # the search's D_train
            augment = data.Augment(settings.height, settings.width, erasing=settings.erasing)
            loader = data.train_loader(d_train, settings.P, settings.K, run.seed, augment, workers=run.workers)
            n = reestimate_bn(searched, (b for _, b in run.batches(loader, settings.search_epochs)), run.autocast)
            note = (f"search network: BN statistics re-estimated with the derived gates over {n} D_train batches; "
                    f"weights trained on {settings.search_split:.0%} of the images under random gates, not Alg. 1 "
                    f"line 7's retrained network (--phase both)")
            run.say(f"[search] {note}")
            run.meta.update(nfs_model="search", gates=source, kept=kept(gates), nfs_bn=note)
            return searched
    model = initial_model(settings, num_classes, "retrain", run.seed)   # the weights the search started from
    if settings.phase == "retrain":
        gates, source = load_gates(settings.gates, model, settings), settings.gates
    model.set_gates(gates)
    model = model.to(run.device)
    run.meta.update(nfs_model="retrain", gates=source, kept=kept(gates))
    fit(model, settings, trainset, run, "retrain")                     # Alg. 1 line 6 (line 7: reid.py tests)
    return model


@torch.no_grad()
def extract(model, x, modality):
    """Test feature: the L2-normalised BN feature, (B, C), through the derived gates of `modality`."""
    return F.normalize(model.features(x, modality)[1], dim=1)


# ---------------------------------------------------------------- pictures

HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def heat(v):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, dark (0) to bright yellow (1)."""
    x = np.clip(v, 0, 1) * (len(HEAT) - 1)
    return np.stack([np.interp(x, np.arange(len(HEAT)), HEAT[:, c]) for c in range(3)], -1).astype(np.uint8)


def panel(rgb, height):
    """An (h, w, 3) uint8 array scaled (nearest) to `height` rows, as a PIL image."""
    h, w = rgb.shape[:2]
    return Image.fromarray(rgb).resize((max(1, round(w * height / h)), height), Image.NEAREST)


def grid(rows, labels, pad=4, label_h=12):
    """Paste rows of PIL images into one picture, each with a text label above."""
    width = max(sum(im.width + pad for im in row) for row in rows) + pad
    height = sum(max(im.height for im in row) + label_h + pad for row in rows) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for row, label in zip(rows, labels):
        draw.text((pad, y), label, fill=(0, 0, 0))
        x = pad
        for im in row:
            canvas.paste(im, (x, y + label_h))
            x += im.width + pad
        y += max(im.height for im in row) + label_h + pad
    return canvas


def figures(model, settings, trainset, testset, out):
    """gates.png: per searched stage (rows) and modality, the pixel gate averaged over channels (share of channels
    kept at each position) and the channel gate (32 channels per row, bright = kept).
    features.png (Fig. 4): 4 visible and 4 infrared test images (top), the channel mean of Y_L at the first
    searched stage (middle) and of the gated Y~_L (bottom); both maps of an image share one scale."""
    if not len(model.cells):
        return
    gates = model.gates()
    rows, labels = [], []
    for name in model.cells:
        row, text = [], []
        for m in MODALITIES:
            pix, ch = gates[f"{name}.{m}.pixel"].float().cpu(), gates[f"{name}.{m}.channel"].float().cpu()
            ch_grid = F.pad(ch, (0, -len(ch) % 32), value=0.5).view(-1, 32)    # (C / 32, 32), grey = padding
            row += [panel(heat(pix.mean(0).numpy()), max(128, pix.shape[1])),
                    panel(heat(ch_grid.numpy()), 8 * len(ch_grid))]
            text.append(f"{m}: pixel {100 * float(pix.mean()):.1f}% kept, channel {100 * float(ch.mean()):.1f}%")
        rows.append(row)
        labels.append(f"{name}   " + "   |   ".join(text))
    grid(rows, labels).save(out / "gates.png")

    model.eval()
    device = next(model.parameters()).device
    first = next(iter(model.cells))
    rows = [[], [], []]
    with torch.no_grad():
        for m in MODALITIES:
            pool = testset.pools[m]
            idx = np.linspace(0, len(pool) - 1, 4).round().astype(int)
            x = next(data.test_batches(pool.images[idx], 4)).to(device)
            y = (model.stem_v if m == "v" else model.stem_r)(x)
            for i, stage in enumerate(model.stages, 1):
                y = stage(y)                                                    # Y_L (4, C, H_L, W_L)
                if f"layer{i}" == first:
                    break
            y_gated = model.cells[first](y, len(x) if m == "v" else 0)         # Y~_L, Eq. (4)
            for j in range(len(x)):
                scale = y[j].mean(0).max().clamp(min=1e-12)
                rows[0].append(panel(np.asarray(pool.images[idx[j]]), 128))
                rows[1].append(panel(heat((y[j].mean(0) / scale).cpu().numpy()), 128))
                rows[2].append(panel(heat((y_gated[j].mean(0) / scale).cpu().numpy()), 128))
    grid(rows, ["test images: 4 visible, 4 infrared", f"channel mean of Y at {first}",
                f"channel mean of the gated Y~ at {first}"]).save(out / "features.png")
