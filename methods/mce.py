"""MCE: Cheng, Wang, Wang, Wang, Wang and Gao, "Cross-Modality Person Re-identification with Memory-Based
Contrastive Embedding", AAAI 2023.

Implements:
- one weight-sharing ResNet (stem and layer1-4 shared by every modality), last stride 1, non-local blocks as in
  AGW/CAJ, GeM pooling and a BNNeck; three inputs per batch: visible (v), infrared (r) and the auxiliary modality
  (a) made from each visible image by channel exchange (CAJ: one of R, G, B copied to all three channels);
- modality-aware memories W^v, W^r, W^a and the modality-agnostic memory W^u (d x N^p), initialised with class-mean
  features from a feature-extraction pass (Eq. 1), cluster contrast with temperature tau (Eq. 2) summed into L_W
  (Eq. 4), momentum update from the mean batch feature of each class (Eq. 3);
- historical centroids C^v, C^r, C^a, C^u: class means from a full feature-extraction pass over the training set at
  the end of every epoch, fixed during the next one;
- cross-modality mutual information (Eq. 5-8): KL divergence between a feature's probability responses to its own
  and to the other modality's historical centroids, for v<->r and a<->r;
- global modality-agnostic cluster contrast (Eq. 9): margin alpha between the distance to the own-class agnostic
  historical centroid and the nearest other one;
- L = L_W + lambda1 L_MI + lambda2 L_GC (Eq. 10);
- the ablations of Table 3: two or three input modalities (`auxiliary`), the CE baseline, L^u only, L_W, L_W + L_MI
  and L_W + L_MI + L_GC (`objective`), with historical or up-to-date ("dynamic", L^D) centroids (`centroids`).

Readings and choices:
- Every feature f is the L2-normalised BNNeck output (after GeM pooling, p = 3, as in the AGW/CAJ baseline the paper
  builds on); the test feature is the same vector. Centroids are L2-normalised after the class mean (Eq. 1, and the
  historical centroids) and after every momentum update (Eq. 3), so f . W / tau with tau = 0.05 lies in [-20, 20].
- Eq. (5)-(6) write the response to the positive centroid c_+ only; a single term p log(p / q) is not a divergence
  (it can be negative), so the responses are read as the full softmax distributions over the N^p centroids and
  Eq. (7) as their KL divergence, averaged over the batch. The cross-modality response (P^v_r for a visible feature)
  is the target and carries no gradient; the gradient flows through the own-modality response (P^v_v).
  Aggregation (paper silent): the mean over all KL rows (every sample of every term), as the release's
  KLDivLoss('batchmean') over its concatenated blocks (IDLNL/MCE model.py:17, 115); a sum of the four batch-mean
  terms would be about 4x the release's L_MI for the same lambda1 = 1.2.
- W^u and C^u are class means over the features of all modalities together (v, r and a pooled); L^u and L_GC use
  every feature of the batch.
- The auxiliary images of the centroid pass take one channel per image drawn from a generator seeded by (seed,
  epoch), so the pass is reproducible and a resumed run is exact.
- W is initialised once, before the first epoch, and afterwards only moves by Eq. (3) (`reinit_memory` False).
  No centroid pass runs after the last epoch (its result would be unused).
- Warm-up: linear over the first 10 epochs from lr / 10 (the paper says "with a warmup strategy"; the release's
  lr (e + 1) / 10 for e < 10, train.py:170-171).
- Non-local inner width (paper silent, "following CAJ"): the release backbone's 1 channel (resnet.py:36).

Deviations:
- The auxiliary image shares the crop and flip of its visible image (random erasing is drawn independently) and its
  channel exchange acts on [0, 1] pixels before ImageNet normalisation (CAJ draws a separate crop and exchanges
  normalised channels), because the project pipeline augments per batch and adds 'x_a' in the `extra` hook.
- With a backbone of fewer blocks than ResNet-50 (resnet18/34, for CPU runs), the non-local blocks go after the
  last min(n, blocks) blocks of layer2 and layer3 (as in agw.py).

Released code differs (IDLNL/MCE at deea895; `--recipe release` sets the settings named):

| setting | paper (default) | release | released file:line |
|---|---|---|---|
| mi_form | Eq. (7): a feature on both modalities' C; a<->r both ways | paired i-th v, r rows on one C; a->r only | model.py:97-115 |
| agnostic_update | W^u: batch class mean (Eq. 3) | hardest (least similar) sample of the class | memory.py:27-39, train.py:44, 188 |
| gamma_aware | 0.3 | 0.25 | train.py:48, 189-191 |
| weight_a | 1 (Eq. 4) | 0.4 (sid x caid) | model.py:106-107, train.py:47 |
| gc_negatives | all classes (Eq. 9) | classes of the batch only | GlobalCenterLoss.py:14-25 |
| agnostic_centroid | C^u, W^u: normalised mean over v, r, a images pooled | unnormalised mean of the 3 modality centroids | train.py:210-212 |
| centroids=dynamic | L_MI^D and L_GC^D use W | L_GC always uses the epoch-start centres (--gx affects L_MI only) | model.py:63, 86-95 |
| reinit_memory | False: W initialised once | True: W rebuilt from a full pass every epoch | train.py:184-212 |
| epochs | 80 | 160, best test mAP checkpoint kept (not reproduced) | train.py:368, 378-390 |
| milestones | (20, 40) | (21, 40): x0.1 for e > 20 | train.py:169-175 |
| sampler | without-replacement | community (images with replacement, int(N/PK)+1 batches) | utils.py:62-91, train.py:369 |
| RegDB (RELEASE_REGDB) | the SYSU recipe (paper: one recipe, 384 x 128) | 288 x 144, K = 5, lr steps (31, 60) | train.py:66-67, 169 |
| GeM p | fixed 3 | learnable nn.Parameter (not reproduced) | resnet.py:309-320 |
| infrared augmentation | none | ChannelAdapGray(0.5) on SYSU (not reproduced) | data_loader.py:122-130 |
| erasing | fill 0; 'a' erased after the exchange | CIFAR-mean fill; before it (not reproduced) | ChannelAug.py:107 |
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from methods import common

OBJECTIVES = ("CE", "u", "W", "W+MI", "W+MI+GC")   # Table 3 rows
CENTROIDS = ("historical", "dynamic")               # Table 3: L_MI, L_GC vs. L_MI^D, L_GC^D
EXTRACT_BATCH = 128                                 # images per forward in the centroid pass


@dataclass
class Settings:
    arch: str = "resnet50"               # Implementation details: ResNet-50
    pretrained: str = "imagenet"         # Implementation details: pre-trained on ImageNet
    height: int = 384                    # Implementation details: 384 x 128 input
    width: int = 128
    epochs: int = 80                     # Implementation details: 80 epochs
    P: int = 8                           # Implementation details: 8 identities per batch
    K: int = 4                           #   x 4 RGB + 4 infrared images each (batch 64)
    lr: float = 3.5e-4                   # Implementation details: Adam, initial lr 0.00035
    weight_decay: float = 5e-4           # Implementation details: weight decay 0.0005
    warmup: int = 10                     # "with a warmup strategy" (length not given; the CAJ/AGW baseline's 10)
    milestones: tuple = (20, 40)         # Implementation details: lr / 10 at epochs 20 and 40
    tau: float = 0.05                    # Implementation details: temperature of Eq. (2), (5), (6)
    gamma_aware: float = 0.3             # Implementation details: Eq. (3) momentum for W^v, W^r, W^a
    gamma_agnostic: float = 0.1          # Implementation details: Eq. (3) momentum for W^u
    lambda1: float = 1.2                 # Eq. (10), Fig. 2: weight of L_MI
    lambda2: float = 1.0                 # Eq. (10), Fig. 3: weight of L_GC
    alpha: float = 0.3                   # Eq. (9) margin
    objective: str = "W+MI+GC"           # Table 3: CE | u | W | W+MI | W+MI+GC
    centroids: str = "historical"        # Table 3: historical (L_MI, L_GC) or dynamic (L_MI^D, L_GC^D)
    auxiliary: bool = True               # Table 3: 3 "channels" (v, r, a) or 2 (v, r)
    non_local: bool = True               # Implementation details: non-local blocks, following CAJ
    non_local_inner: str = "one"         # paper silent: the release's 1 channel (resnet.py:36); "half": C/2
    gem_p: float = 3.0                   # not in the paper: GeM pooling of the AGW/CAJ baseline
    erasing: float = 0.5                 # Implementation details: random erasing
    weight_a: float = 1.0                # Eq. (4): L^a weighted as the others; release 0.4 (model.py:107)
    agnostic_update: str = "mean"        # Eq. (3): class mean in the batch; release "hardest" (memory.py:9-41)
    agnostic_centroid: str = "pooled"    # reading: W^u, C^u over v, r, a pooled; release "modality-mean"
    gc_negatives: str = "all"            # Eq. (9): min over all k != y; release "batch" (GlobalCenterLoss.py:21-25)
    mi_form: str = "paper"               # Eq. (7)-(8); release "release": paired samples, one a-r direction
    reinit_memory: bool = False          # paper: W moves only by Eq. (3); release True (train.py:184-212)
    sampler: str = "without-replacement"  # project sampler (data.py); release "community" (utils.py:62-91)


CHOICES = {"objective": OBJECTIVES, "centroids": CENTROIDS, "non_local_inner": ("one", "half"),
           "agnostic_update": ("mean", "hardest"), "agnostic_centroid": ("pooled", "modality-mean"),
           "gc_negatives": ("all", "batch"), "mi_form": ("paper", "release"), "sampler": data.SAMPLERS}

# --recipe release: IDLNL/MCE at deea895 (file:line of each value).
RELEASE = dict(
    arch="resnet50", pretrained="imagenet",    # model.py:13 resnet50(pretrained=True)
    height=384, width=128,                     # train.py:61 (SYSU)
    epochs=160,                                # train.py:368 range(start_epoch, 160 + start_epoch)
    P=8, K=4,                                  # train.py:31 --batch-size 8, train.py:34 --num_pos 4
    lr=3.5e-4, weight_decay=5e-4,              # train.py:20, train.py:165 Adam
    warmup=10, milestones=(21, 40),            # train.py:169-175: (e + 1) / 10 for e < 10; x0.1 e > 20; x0.01 e >= 40
    tau=0.05,                                  # model.py:85, memory.py:73
    gamma_aware=0.25,                          # train.py:48 --mem_up 0.25, train.py:189-191
    gamma_agnostic=0.1,                        # train.py:188 momentum=0.1
    lambda1=1.2,                               # train.py:41 --kl 1.2, model.py:116
    lambda2=1.0,                               # train.py:46 --gc 1, model.py:64
    alpha=0.3,                                 # model.py:39 GlobalCenterTriplet(0.3)
    weight_a=0.4,                              # train.py:42 --sid 1, train.py:47 --caid 0.4, model.py:107
    agnostic_update="hardest",                 # train.py:44 --nhard store_false, train.py:188; memory.py:27-39
    agnostic_centroid="modality-mean",         # train.py:210-212 (sum of the 3 normalised centroids / 3)
    gc_negatives="batch",                      # GlobalCenterLoss.py:14-25 (centres of the batch labels)
    mi_form="release",                         # model.py:97-115
    reinit_memory=True,                        # train.py:184-212 (fresh memories every epoch)
    non_local=True, non_local_inner="one",     # resnet.py:36 reduc_ratio // reduc_ratio
    erasing=0.5,                               # data_loader.py:129, 140, 149 ChannelRandomErasing(0.5)
    sampler="community",                       # train.py:369, utils.py:62-91 IdentitySampler
)
# --recipe release --dataset regdb, on top of RELEASE
RELEASE_REGDB = dict(
    height=288, width=144,                     # train.py:66
    K=5,                                       # train.py:67 args.num_pos = 5
    milestones=(31, 60),                       # train.py:169-175: [30, 60], x0.1 for e > 30, x0.01 for e >= 60
)


# CPU recipe for the built-in synthetic world: resnet18 from scratch at AGW's val-chosen 96 x 48, 6 epochs of 46
# batches, warm-up 2 and lr steps at 4 and 5 (the 5-minute budget). The lr was chosen on --split val at the earlier
# 10-epoch recipe (python reid.py --method mce --split val --height 96 --width 48 --epochs 10 --warmup 2
# --milestones 7 9 [--lr L], seed 0, alone, two threads): the paper's 3.5e-4 gave all-single val rank-1 15.5 / mAP
# 20.6, training fit 5.7; 1e-3 gave 18.9 / 24.0, fit 9.1 (chosen; one seed, so the margin is within the seed-to-seed
# spread). Size and epochs were then chosen on --split val among recipes that meet the budget (seed 0, one thread,
# two runs side by side): 96 x 48, 6 epochs, steps at 4 and 5: 11.7 / 18.6, fit 4.6 (chosen); 80 x 40, 8 epochs,
# steps at 5 and 7: 11.5 / 18.1, fit 4.1; 64 x 32, 10 epochs, steps at 7 and 9: 11.4 / 18.3, fit 0.9. None is
# healthy: L_GC stays at 0.30-0.39 against its margin 0.3 all run (0.32-0.36 at 10 epochs) and the fit is far
# below AGW's (val 25.0, fit 27.3). Why, measured at the 10-epoch recipe on --split val (seed 0;
# reid.training_fit's within-modality figures): the network learns each modality's identities apart but not across
# them. Full objective: rank-1 within visible 62.1 and within infrared 49.6 (across each modality's cameras)
# against 5.8 across the modalities (chance 1.3); cosine of the visible and infrared class centroids 0.182 for one
# identity against 0.066 for two. --objective W (L_W alone): within 76.0 and 53.3 against 5.3 across (its
# training fit); cosine 0.084 against 0.014. Reading of the equations: once the codes are modality-specific,
# no term of Eq. (10) needs them aligned: W^u and C^u are class means over v, r and a (Eq. 1, 3), close to each
# modality's own code of the class, and L_MI's target (the detached cross-modality response) is then flat, so L_MI
# flattens the own-modality response instead (it ends at 2.9-4.0 in the test rows' logs). Whether ImageNet
# weights (the paper's start) avoid this: not measured. See README, Results.
SYNTHETIC = dict(arch="resnet18", pretrained="none", height=96, width=48, epochs=6, lr=1e-3, warmup=2,
                 milestones=(4, 5))
SMOKE = dict(arch="resnet18", pretrained="none", height=64, width=32, epochs=1, P=4, K=2, warmup=1, milestones=())


# ---------------------------------------------------------------- auxiliary modality

def channel_exchange(x, g):
    """CAJ channel exchange: each image's R, G or B channel (uniformly at random) copied to all three channels.

    x: (B, 3, H, W), any dtype -> (B, 3, H, W)."""
    channel = torch.randint(0, 3, (x.shape[0],), generator=g)                    # (B,)
    return x[torch.arange(x.shape[0]), channel][:, None].expand_as(x).contiguous()


def add_auxiliary(batch, g):
    """Augment `extra` hook: 'x_a' (B, 3, H, W) in [0, 1] from 'x_v', before normalisation; labels are 'y_v'."""
    batch["x_a"] = channel_exchange(batch["x_v"], g)    # Deviation: x_v's crop and flip, exchange on [0, 1] pixels
    return batch


# ---------------------------------------------------------------- model (backbone as in agw.py)

# Copy of agw.NonLocal; test_all.TestCopies keeps them equal
class NonLocal(nn.Module):
    """Non-local block (dot-product form): z = W_z(softmax-free affinity(theta, phi) g) + x, W_z's BN starts at 0."""

    def __init__(self, c, inner="one"):
        super().__init__()
        ci = 1 if inner == "one" else c // 2       # community: 1 channel; Wang et al. (2018): C/2
        self.theta, self.phi, self.g = nn.Conv2d(c, ci, 1), nn.Conv2d(c, ci, 1), nn.Conv2d(c, ci, 1)
        self.W = nn.Sequential(nn.Conv2d(ci, c, 1), nn.BatchNorm2d(c))
        nn.init.zeros_(self.W[1].weight)  # the block starts as the identity
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x):                                   # x: (B, C, H, W)
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)    # (B, HW, C')
        phi = self.phi(x).flatten(2)                        # (B, C', HW)
        g = self.g(x).flatten(2).transpose(1, 2)            # (B, HW, C')
        f = theta @ phi / phi.shape[-1]                     # (B, HW, HW), normalised by N = HW
        y = (f @ g).transpose(1, 2).reshape(b, -1, h, w)    # (B, C', H, W)
        return self.W(y) + x


# Copy of agw.with_non_local; test_all.TestCopies keeps them equal
def with_non_local(stage, c, num, inner):
    """`stage` with a non-local block (inner width `inner`) after each of its last `num` residual blocks."""
    blocks = list(stage)
    first = len(blocks) - min(num, len(blocks))  # Deviation: fewer blocks than ResNet-50 -> last ones
    out = []
    for i, block in enumerate(blocks):
        out.append(block)
        if i >= first:
            out.append(NonLocal(c, inner))
    return nn.Sequential(*out)


# Copy of agw.gem; test_all.TestCopies keeps them equal
def gem(x, p):
    """Generalised-mean pooling over H, W: (mean x^p)^(1/p); x >= 0 after ReLU. (B, C, H, W) -> (B, C)."""
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class MCE(nn.Module):
    """One weight-sharing ResNet for v, r and a: stem + layer1-4 (non-local in layer2, layer3), GeM, BNNeck."""

    def __init__(self, settings, num_classes):
        super().__init__()
        net = common.resnet(settings.arch, settings.pretrained)
        layer1, layer2, layer3, layer4 = common.stages(net)
        c = common.channels(settings.arch)
        if settings.non_local:
            inner = settings.non_local_inner
            layer2, layer3 = with_non_local(layer2, c[1], 2, inner), with_non_local(layer3, c[2], 3, inner)
        self.backbone = nn.Sequential(common.stem(net), layer1, layer2, layer3, layer4)
        self.gem_p = settings.gem_p
        self.bnneck = nn.BatchNorm1d(c[3])
        self.bnneck.bias.requires_grad_(False)                             # BNNeck: no shift
        # Table 3 "CE" baseline: a classifier on the BN feature instead of the memories
        self.classifier = nn.Linear(c[3], num_classes, bias=False) if settings.objective == "CE" else None

    def forward(self, x):
        """(B, 3, H, W) of any modality -> BN feature (B, d); the feature f of the paper is its L2 normalisation."""
        return self.bnneck(gem(self.backbone(x), self.gem_p))


def build(settings, num_classes, meta=None):
    return MCE(settings, num_classes)


# ---------------------------------------------------------------- memories and historical centroids

class Memory:
    """Up-to-date memories W[m] (Eq. 1-3) and historical centroids C[m], m in v, r, [a], u: (N^p, d) each, rows
    L2-normalised. state_dict / load_state_dict let Run.epochs checkpoint them, so a resumed run is exact."""

    def __init__(self, keys, num_classes, dim, device):
        self.device = device
        self.W = {m: torch.zeros(num_classes, dim, device=device) for m in keys}
        self.C = {m: torch.zeros(num_classes, dim, device=device) for m in keys}

    def initialise(self, centroids):
        """Eq. (1): W^m_k = mean of the class-k features of modality m; they are also the first historical C."""
        self.W = {m: c.clone() for m, c in centroids.items()}
        self.C = {m: c.clone() for m, c in centroids.items()}

    @torch.no_grad()
    def update(self, m, f, y, gamma, rule="mean"):
        """Eq. (3): W^m_y <- gamma W^m_y + (1 - gamma) mean of the batch features of class y; Choice: then
        L2-normalised (the paper does not say).

        rule "hardest" (the release's W^u, memory.py:27-39): the class's batch feature least similar to W^m_y
        instead of the mean. f: (B, d) detached features of modality m, y: (B,) labels."""
        classes, inverse = torch.unique(y, return_inverse=True)                 # (n,), (B,)
        if rule == "hardest":
            sim = (f * self.W[m][y]).sum(1)                                       # (B,)
            f_bar = torch.stack([f[inverse == j][sim[inverse == j].argmin()] for j in range(len(classes))])
        else:
            f_bar = torch.zeros(len(classes), f.shape[1], device=f.device).index_add_(0, inverse, f)
            f_bar /= torch.bincount(inverse, minlength=len(classes))[:, None]  # (n, d) class means in the batch
        W_y = F.normalize(gamma * self.W[m][classes] + (1 - gamma) * f_bar, dim=1)   # Eq. (3)
        self.W[m] = self.W[m].index_copy(0, classes, W_y)   # a new tensor: the batch's loss graph keeps the old W

    def state_dict(self):
        return {"W": dict(self.W), "C": dict(self.C)}

    def load_state_dict(self, state):
        self.W = {m: w.to(self.device) for m, w in state["W"].items()}
        self.C = {m: c.to(self.device) for m, c in state["C"].items()}


def auxiliary_batches(images, batch_size, g):
    """Channel-exchanged test batches (B, 3, H, W), normalised, of the uint8 visible images (N, H, W, 3)."""
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[s:s + batch_size])).permute(0, 3, 1, 2)   # (B, 3, H, W) uint8
        yield from data.test_batches(channel_exchange(x, g).permute(0, 2, 3, 1).numpy(), batch_size)


def pass_generator(seed, epoch):
    """The generator of the auxiliary channels in the centroid pass after `epoch` (-1: the initial pass)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch + 1]).generate_state(1)[0]))


@torch.no_grad()
def class_centroids(model, trainset, keys, run, g, agnostic="pooled"):
    """Eq. (1) over the whole training set (no augmentation, eval mode): {m: (N^p, d)} L2-normalised class means of
    the features f of modality m; 'u' pools v, r and a ("pooled"), or is the unnormalised mean of the modality
    centroids ("modality-mean", the release's, train.py:210-212). A class without images in m keeps a zero row."""
    model.eval()
    n, d, device = trainset.num_classes, model.bnneck.num_features, run.device
    modal = [m for m in keys if m != "u"]
    sums, counts = {}, {}
    for m in modal:
        images = trainset.r if m == "r" else trainset.v
        batches = (auxiliary_batches(images.images, EXTRACT_BATCH, g) if m == "a"
                   else data.test_batches(images.images, EXTRACT_BATCH))
        labels = torch.from_numpy(images.labels).to(device)                       # (N,)
        sums[m] = torch.zeros(n, d, device=device)                                # (N^p, d)
        start = 0
        for x in batches:
            with run.autocast():
                f = F.normalize(model(x.to(device)).float(), dim=1)               # (B, d)
            sums[m].index_add_(0, labels[start:start + len(f)], f)
            start += len(f)
        counts[m] = torch.bincount(labels, minlength=n).float()                   # (N^p,)
    sums["u"], counts["u"] = sum(sums[m] for m in modal), sum(counts[m] for m in modal)
    out = {m: F.normalize(sums[m] / counts[m].clamp(min=1)[:, None], dim=1) for m in keys}
    if agnostic == "modality-mean":
        out["u"] = sum(out[m] for m in modal) / len(modal)
    return out


# ---------------------------------------------------------------- losses

def L_m(f, y, W, tau):
    """Eq. (2), memory-based cluster contrast of modality m, averaged over the batch:
    L^m = -log [exp(f_i^m . W^m_{y_i} / tau) / sum_{k=1}^{N^p} exp(f_i^m . W^m_k / tau)].

    f: (B, d) L2-normalised features, y: (B,), W: (N^p, d) memory (no gradient)."""
    return F.cross_entropy(f @ W.t() / tau, y)                                    # Eq. (2)


def L_W(f, y, W, tau):
    """Eq. (4): L_W = L^v + L^r + L^a + L^u over the modalities present in `f` ({m: (B_m, d)}); returns the terms."""
    return {m: L_m(f[m], y[m], W[m], tau) for m in f}                              # Eq. (4), summed by the caller


def log_P(f, C, tau):
    """Eq. (5), (6): log probability responses of features f (B, d) to the centroids C (N^p, d): (B, N^p)."""
    return F.log_softmax(f @ C.t() / tau, dim=1)          # Eq. (5) (own modality's C), Eq. (6) (the other's)


def KL(log_p, log_q):
    """Per row: sum_k p_k log(p_k / q_k); log_p, log_q: (B, N^p) -> (B,)."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


def L_MI_mn(f_m, f_n, C_m, C_n, tau):
    """Eq. (7), L_MI^{m<->n} = P^m_n(f_i^m | C^n) log(P^m_n(f_i^m | C^n) / P^m_m(f_i^m | C^m))
    + P^n_m(f_i^n | C^m) log(P^n_m(f_i^n | C^m) / P^n_n(f_i^n | C^n)), per sample: KL(P^m_n || P^m_m) for each
    feature of m, then KL(P^n_m || P^n_n) for each of n: (B + B',). Reading: the responses are the full softmax
    distributions over the N^p centroids (Eq. 5-6 write the c_+ term only), and the cross-modality response
    P^m_n(f^m | C^n) is the target (detached); f_m: (B, d), f_n: (B', d), C: (N^p, d)."""
    return torch.cat([KL(log_P(f_m, C_n, tau).detach(), log_P(f_m, C_m, tau)),     # Eq. (7), first term; Reading: KL
                      KL(log_P(f_n, C_m, tau).detach(), log_P(f_n, C_n, tau))])    # Eq. (7), second term


def L_MI_release(f, C, tau):
    """The release's KL rows (model.py:97-113): KL(P(f^r_i | C^v) || P(f^v_i | C^v)), KL(P(f^v_i | C^r) ||
    P(f^r_i | C^r)) for the i-th visible and infrared samples (same identity), and KL(P(f^a | C^r) || P(f^a | C^a))."""
    rows = [KL(log_P(f["r"], C["v"], tau).detach(), log_P(f["v"], C["v"], tau)),
            KL(log_P(f["v"], C["r"], tau).detach(), log_P(f["r"], C["r"], tau))]
    if "a" in f:
        rows.append(KL(log_P(f["a"], C["r"], tau).detach(), log_P(f["a"], C["a"], tau)))
    return torch.cat(rows)


def L_MI(f, C, tau, form="paper"):
    """Eq. (8): L_MI = L_MI^{v<->r} + L_MI^{a<->r} (the second only with the auxiliary modality), aggregated as the
    release does (paper silent): the mean over every KL row (model.py:17, 115, KLDivLoss 'batchmean' over the
    concatenated blocks). form "release": the release's rows (L_MI_release) instead of Eq. (7)'s."""
    if form == "release":
        return L_MI_release(f, C, tau).mean()
    rows = [L_MI_mn(f["v"], f["r"], C["v"], C["r"], tau)]
    if "a" in f:
        rows.append(L_MI_mn(f["a"], f["r"], C["a"], C["r"], tau))
    return torch.cat(rows).mean()                                                 # Eq. (8); Choice: mean of all rows


# Copy of agw.pairwise_distance; test_all.TestCopies keeps them equal
def pairwise_distance(x, y):
    """Euclidean distances (N, M) between rows of x (N, d) and y (M, d)."""
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()
    return d2.clamp(min=1e-12).sqrt()


def L_GC(f, y, C_u, alpha, negatives="all"):
    """Eq. (9): max(||f - c^u_y|| - min_{k != y} ||f - c^u_k|| + alpha, 0), mean over f (B, d) of all modalities.

    negatives "batch" (the release's, GlobalCenterLoss.py:14-25): k only over the classes of y."""
    d = pairwise_distance(f, C_u)                                                 # (B, N^p)
    d_pos = d.gather(1, y[:, None])[:, 0]                                         # (B,)
    other = d.scatter(1, y[:, None], float("inf"))                                # (B, N^p)
    if negatives == "batch":
        absent = torch.ones(C_u.shape[0], dtype=torch.bool, device=d.device)
        absent[y] = False
        other = other.masked_fill(absent, float("inf"))                           # Deviation (release): batch only
    d_neg = other.min(1).values                                                   # (B,) nearest other centroid
    return F.relu(d_pos - d_neg + alpha).mean()                                   # Eq. (9)


# ---------------------------------------------------------------- training

def total_loss(terms, settings):
    """Eq. (10): L = L_W + lambda1 L_MI + lambda2 L_GC, L_W = L^v + L^r + w_a L^a + L^u (Eq. 4; w_a = 1 in the
    paper); `terms` holds the L_* present. The CE and u objectives are their single term."""
    loss = 0
    for name, value in terms.items():
        weight = {"L_a": settings.weight_a, "L_MI": settings.lambda1, "L_GC": settings.lambda2}.get(name, 1.0)
        loss = loss + weight * value                                              # Eq. (4), Eq. (10)
    return loss


def objective(model, batch, settings, memory):
    """Eq. (10) on one batch: L = L_W + lambda1 L_MI + lambda2 L_GC, L_W = L^v + L^r + w_a L^a + L^u (Eq. 4), or
    the Table 3 row of `settings.objective` -> (L, {loss term name: value}); then the memories W of `memory` (a
    Memory with the keys v, r, [a,] u) move by Eq. (3). The CE row neither reads nor moves `memory`."""
    modal = ("v", "r", "a") if settings.auxiliary else ("v", "r")                # the input modalities
    x = torch.cat([batch["x_" + m] for m in modal])                               # (B_v + B_r [+ B_a], 3, H, W)
    b = model(x)
    with torch.autocast(x.device.type, enabled=False):   # the losses and Eq. (3) in float32, under --amp too
        b = b.float()                                                             # (B_total, d) BN features
        f_all = F.normalize(b, dim=1)
        f = dict(zip(modal, f_all.split([batch["x_" + m].shape[0] for m in modal])))   # {m: (B_m, d)}
        y = {m: batch["y_r"] if m == "r" else batch["y_v"] for m in f}           # 'a' shares the visible labels
        f["u"], y["u"] = f_all, torch.cat([y[m] for m in modal])
        if settings.objective == "CE":
            terms = {"L_CE": F.cross_entropy(model.classifier(b), y["u"])}
            return total_loss(terms, settings), terms
        if settings.objective == "u":
            terms = {"L_u": L_m(f["u"], y["u"], memory.W["u"], settings.tau)}   # Eq. (2) for u only
        else:
            terms = {"L_" + m: l for m, l in L_W(f, y, memory.W, settings.tau).items()}
            C = memory.C if settings.centroids == "historical" else memory.W  # L^D: up-to-date memories
            if settings.objective in ("W+MI", "W+MI+GC"):
                terms["L_MI"] = L_MI(f, C, settings.tau, settings.mi_form)
            if settings.objective == "W+MI+GC":
                terms["L_GC"] = L_GC(f["u"], y["u"], C["u"], settings.alpha, settings.gc_negatives)
        loss = total_loss(terms, settings)                                        # Eq. (10)
        for m in f:                                                               # v, r, [a,] u
            agnostic = m == "u"
            memory.update(m, f[m].detach(), y[m], settings.gamma_agnostic if agnostic else settings.gamma_aware,
                          settings.agnostic_update if agnostic else "mean")      # Eq. (3)
    return loss, terms


def check(settings):
    for name, allowed in CHOICES.items():
        if getattr(settings, name) not in allowed:
            raise common.UserError(f"--{name.replace('_', '-')} {getattr(settings, name)!r} is not one of "
                                   f"{', '.join(allowed)}")


def train(settings, trainset, run):
    check(settings)
    model = build(settings, trainset.num_classes).to(run.device)
    keys = ("v", "r", "a", "u") if settings.auxiliary else ("v", "r", "u")
    memory = Memory(keys, trainset.num_classes, common.channels(settings.arch)[3], run.device)
    uses_memory = settings.objective != "CE"
    refresh_C = settings.objective in ("W+MI", "W+MI+GC") and settings.centroids == "historical"
    centroid_pass = uses_memory and (refresh_C or settings.reinit_memory)
    augment = data.Augment(settings.height, settings.width, erasing=settings.erasing,
                           extra=add_auxiliary if settings.auxiliary else None)
    loader = data.train_loader(trainset, settings.P, settings.K, run.seed, augment, workers=run.workers,
                               sampler=settings.sampler)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                 weight_decay=settings.weight_decay)
    schedule = common.WarmupMultiStep(optimizer, settings.milestones, warmup=settings.warmup)
    for epoch in run.epochs("train", settings.epochs, model=model, memory=memory, optimizer=optimizer,
                            schedule=schedule, loader=loader):
        schedule.step_epoch(epoch)
        if epoch == 0 and uses_memory:
            memory.initialise(class_centroids(model, trainset, keys, run, pass_generator(run.seed, -1),
                                              settings.agnostic_centroid))                                 # Eq. (1)
        model.train()
        for it, batch in run.batches(loader, epoch):
            with run.autocast():
                loss, terms = objective(model, batch, settings, memory)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(epoch, it, {k: v.detach() for k, v in terms.items()}, optimizer.param_groups[0]["lr"])
        if centroid_pass and epoch + 1 < settings.epochs:  # none after the last epoch: it would be unused
            centroids = class_centroids(model, trainset, keys, run, pass_generator(run.seed, epoch),
                                        settings.agnostic_centroid)
            if refresh_C:    # historical centroids of the model at the end of this epoch, fixed during the next
                memory.C = centroids
            if settings.reinit_memory:   # the release: memories rebuilt from the pass before every epoch
                memory.W = {m: c.clone() for m, c in centroids.items()}
    return model


@torch.no_grad()
def extract(model, x, modality):
    """Test feature: the L2-normalised BN feature f, (B, d), for either modality (the network is shared)."""
    return F.normalize(model(x), dim=1)
