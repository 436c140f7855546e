"""CM-NAS: Fu, Hu, Wu, Shi, Mei, He, "CM-NAS: Cross-Modality Neural Architecture Search for Visible-Infrared
Person Re-Identification", ICCV 2021.

Implements:
- the BN-oriented search space (Sec. 3.2, Fig. 3): every BatchNorm2d of a torchvision ResNet (53 for ResNet-50:
  stem, 16 bottlenecks x 3, 4 downsample paths) becomes a searchable unit with o1 = separate visible / infrared
  BN and o2 = one shared BN, mixed by the softmax of its architecture parameters alpha (Eq. 1-2);
- the bilevel search (Eq. 3): training identities split 8:2 into search-train / search-validation (Sec. 4.1),
  alternating alpha steps on L_val and weight steps on L_train; the discrete architecture is the argmax per layer;
- the genotype in the notation of Fig. 4 (one bit per BN layer, grouped by stage and block, '0' separate,
  '1' shared; in a stage's first block the downsample BN comes first, as in the authors' released loader), written
  to OUT/genotype.txt with each layer's probabilities; the two architectures of Fig. 4 are built in. The paper
  fixes only the grouping; the order inside a block matters only for the s3_1 groups (SYSU "0001", RegDB "1100",
  every other group is all 0 or all 1), and the authors' own config.cfg (53 space-separated ints) loads unchanged;
- the objective (Eq. 4-10): L_CMMD with k(x, y) = (x . y)^2 per class (Eq. 4), the correlation consistency L_CC
  of row-normalised Gram matrices (Eq. 5-8), L_C3MMD (Eq. 9) and L_train = L_basic + L_C3MMD (Eq. 10),
  L_basic = L_cls + L_triplet; L_val has the same form (`--val-cls false`: without L_cls, see below);
- phase 2: retraining the derived (or a given) architecture on the whole training set (Sec. 4.1);
- the Table 1 ablations: --network one-stream | one-stream-in | two-stream | two-stream-in | two-stream-bn,
  --c3mmd both | search | retrain | none, --lambdas 0 5 (w/o CMMD), --lambdas 0.05 0 (w/o CC),
  --class-specific false (CMMD -> MMD). `--c3mmd` defaults to both, so the baseline rows without C3MMD need an
  explicit `--c3mmd none`. Table 1's Auto-ReID [30] row is not provided (a different search space, no code here).

Readings and choices:
- Head: last stride 1, average pooling, BNNeck (bias frozen) and a bias-free classifier; L_cls on the BN
  feature, L_triplet (batch-hard, margin 0.4) on the pooled feature, L_C3MMD on the BN feature; test feature =
  the L2-normalised BN feature (all as the released code).
- Architecture optimiser: first-order alternation as in DARTS [25] (Alg. 1 order: alpha step on a validation
  batch, then weight step on a training batch), Adam lr 3e-4, betas (0.5, 0.999), weight decay 1e-3, alpha = 0
  at the start (p = 0.5 each). Validation batches are drawn in a cycle over the validation split. Alpha steps run
  in train mode, so they also move the BN running statistics with validation images (as DARTS does); only a
  `--phase search` supernet evaluation sees this, phase 2 starts again from ImageNet.
- Search length: the Sec. 4.1 recipe (120 epochs) on the search-train split. No search code was released.
- L_val (`val_cls`, default true = the paper's "same form as the training loss"): its L_cls uses the one
  classifier over all training identities (labels stay global), whose rows of the validation identities are
  trained only as negatives during the weight steps, so that term carries no identity information and grows
  during the search; it also dominates L_val (at initialisation a cross-entropy of the order of log(#classes),
  far above the lambda-weighted L_CMMD and L_CC). `--val-cls false` drops it (a deviation: L_val = L_triplet +
  L_C3MMD, identity-agnostic). Measured on `--split val` of the synthetic world (`python reid.py --method cmnas
  --phase search --split val --seeds 0 1 2 --val-cls true|false`, SYNTHETIC recipe): with L_cls 18 of the 20 BN
  bits agree across the three seeds (2, 0 and 0 shared BNs), without it 17 of 20 (2, 1, 1); the search networks'
  val all-single rank-1 17.4 ± 4.4 against 15.1 ± 2.1 (at the earlier 128 x 64 and 3 search epochs: 18 and 16
  of 20, 23.2 ± 1.1 against 22.3 ± 3.8). The identity-agnostic form is not better or more stable there, so the
  default stays the paper's reading. In both, every p_o2 stayed within 0.45-0.51 after the two search epochs:
  the genotypes rest on small margins.
- Separate BNs and IN layers start from the (pretrained) BN they replace. IN = affine InstanceNorm2d, which
  normalises with instance statistics at test time too. The two-stream baselines separate the paper's stages 1-2:
  stem and layer1.
- EMA (`ema_decay`, default 0 = none, as the paper): the released retraining keeps an exponential moving average
  of the whole state (weights and BN running statistics), updated after every weight step, with decay 0.997 on
  SYSU and 0.968 on RegDB, and copies it back into the training model after every `test_freq` epochs (2 on SYSU,
  10 on RegDB); the published numbers are then those of the raw weights of the last epoch (its test scripts load
  checkpoint['model'], `--ema` commented out). So the EMA periodically resets the training trajectory; it is not
  an averaged model for evaluation. `--ema-decay D --ema-every E` does the same in phase 2 (and in the one-phase
  baselines, whose released script train_base.py sets 0); the last epoch keeps its raw weights.
- `--amp`: the backbone runs under bf16 autocast, but its output is cast to float32 before pooling and the BNNeck
  runs outside autocast, so L_CMMD and L_CC (of order 1e-3 to 1e-2) see float32 features (bf16 rounding of the
  feature map itself, about 4e-3 relative per element, remains; the released code has no AMP).
- From the release, where the paper is silent (each one flag, `--recipe release` sets the release's form):
  L_triplet is one batch-hard term mining over the whole two-modality batch (`--triplet joint`; it mostly picks
  cross-modal hardest positives), the release averages four batch-hard terms v-v, r-r, v-r, r-v
  (`--triplet four-term`); the BNNeck and classifier keep PyTorch's initialisation (BN weight 1, Linear
  U(+-1/sqrt(C)), std 0.013 for C = 2048), the release draws BN weight ~ N(1, 0.01) and classifier ~ N(0, 0.001)
  (`--head-init release`); a batch holds 8 identities (Sec. 4.1), the release 16 (`--P 16`); images of an
  identity are drawn without replacement (`--sampler community`: with replacement, as the release).
- Data pipeline (data.py, not switchable here): random erasing writes 0 into the normalised tensor; the release's
  RandomErasing writes 0.485 / 0.456 / 0.406 into the normalised tensor (utils/utils.py:110-112,
  train_eval.py:98).

Deviations:
- L_CMMD is the SQUARED MMD (biased estimate) on L2-normalised features, averaged over the identities of the
  batch, as in the authors' released code; Eq. (4) writes the RKHS norm itself. The square is smooth where the
  two modalities already agree (the norm's gradient has unit length however small the gap, and none at 0), and
  the released code's lambda1 = 0.05 goes with the square.
- lambda1 (CMMD) = 0.05 and lambda2 (CC) = 5.0, the best values of the parameter analysis (Fig. 5) and of the
  released code; Sec. 4.1 prints them swapped (5.0, 0.05): `--lambdas 5.0 0.05`.
- The backbone learns at 0.1 x lr (0.001) and the lr warms up linearly over 10 epochs (released code); Sec. 4.1
  states only lr 0.01, /10 at epochs 40, 70. The warm-up is the project's WarmupMultiStep ((e + 1) / 10 x lr);
  `--warmup-form release` gives the release's (0.01 + 0.99 e / 10) x lr.

Released code differs (JDAI-CV/CM-NAS at bbc77f4, phase 2 only: train_eval.py; `--recipe release` sets these):

| setting | paper (default) | release | released file:line |
|---|---|---|---|
| P (identities per batch) | 8 (Sec. 4.1), 32 + 32 images | 16, 64 + 64 images, 348 iterations per SYSU epoch | train_sysu.sh:39-41, utils/utils.py:131-136, train_eval.py:216-217 |
| sampler | without-replacement | community: images with replacement, int(N / 64) + 1 batches | utils/utils.py:131-136 |
| ema_decay | 0 (no EMA) | 0.997 SYSU, 0.968 RegDB (RELEASE_REGDB) | train_sysu.sh:52, train_regdb.sh:70, train_eval.py:164-166, 303 |
| ema_every | (unused) | EMA copied into the model every 2 (SYSU) / 10 (RegDB) epochs | train_sysu.sh:37, train_regdb.sh:55, train_eval.py:230, 245-246 |
| triplet | joint: one batch-hard term | four-term: mean of v-v, r-r, v-r, r-v | train_eval.py:285-288 |
| head_init | pytorch | release: BNNeck N(1, 0.01), classifier N(0, 0.001) | models/model_eval_op.py:273-274, models/utils.py:5-25 |
| warmup_form | project: (e + 1) / 10 | release: 0.01 + 0.99 e / 10 | train_eval.py:42-43, 189, utils/lr_scheduler.py:25-35 |
| phase / genotype | search, then retrain | retrain only, from config.cfg (= Fig. 4): `--phase retrain --genotype paper-sysu` | train_eval.py:155-159 |
| erasing fill | 0 in the normalised tensor | ImageNet mean values in the normalised tensor (not reproduced) | utils/utils.py:110-112, train_eval.py:98 |
| evaluated weights | final epoch | raw weights of the last epoch (checkpoint['model']) | train_eval.py:238-246, test.py:124-127 |
"""
import copy
import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from methods import common


@dataclass
class Settings:
    arch: str = "resnet50"               # Sec. 3.1: ResNet-50 backbone (any torchvision ResNet works)
    pretrained: str = "imagenet"         # Sec. 4.1: pre-trained on ImageNet
    height: int = 256                    # Sec. 4.1: pad 10, random crop to 256 x 128
    width: int = 128
    epochs: int = 120                    # Sec. 4.1: training finishes at the 120th epoch (phase 2)
    search_epochs: int = 120             # paper silent: phase 1 follows the same recipe (Sec. 4.1)
    P: int = 8                           # Sec. 4.1: 8 identities per batch; release 16 (utils/utils.py:133)
    K: int = 4                           #   x 4 visible + 4 infrared images each
    lr: float = 0.01                     # Sec. 4.1: initial lr 0.01 (BNNeck and classifier)
    backbone_lr: float = 0.001           # Deviation: backbone at 0.1 x lr (train_eval.py:185); Sec. 4.1 one lr
    betas: tuple = (0.5, 0.999)          # Sec. 4.1: Adam (beta1, beta2)
    weight_decay: float = 5e-4           # Sec. 4.1
    milestones: tuple = (40, 70)         # Sec. 4.1: lr / 10 at epochs 40 and 70
    warmup: int = 10                     # Deviation: linear warm-up epochs (train_eval.py:42); Sec. 4.1 none
    warmup_form: str = "project"         # (e + 1) / warmup x lr; release "release" (utils/lr_scheduler.py:25-35)
    erasing: float = 0.5                 # Sec. 4.1: random erasing (probability from the released code)
    margin: float = 0.4                  # L_triplet margin; paper silent, released code 0.4
    triplet: str = "joint"               # paper silent: one batch-hard term; release "four-term" (train_eval.py:285)
    head_init: str = "pytorch"           # paper silent: PyTorch's init; release "release" (models/utils.py:5-25)
    sampler: str = "without-replacement"  # project sampler (data.py); release "community" (utils/utils.py:131-136)
    ema_decay: float = 0.0               # paper: no EMA; release 0.997 SYSU, 0.968 RegDB (train_*.sh --ema_decay)
    ema_every: int = 2                   # with ema_decay > 0: epochs between copying the EMA back; release 2 / 10
    lambdas: tuple = (0.05, 5.0)         # Deviation: Eq. (9) (lambda1 CMMD, lambda2 CC) of Fig. 5; Sec. 4.1 (5.0, 0.05)
    c3mmd: str = "both"                  # Table 1: phases using L_C3MMD: both | search | retrain | none
    class_specific: bool = True          # Table 1: false replaces L_CMMD by one L_MMD over the whole batch
    network: str = "cm-nas"              # Table 1 row, one of NETWORKS; the baselines train in one phase
    phase: str = "both"                  # Sec. 4.1: search (phase 1) | retrain (phase 2) | both
    genotype: str = ""                   # --phase retrain: paper-sysu | paper-regdb (Fig. 4) | FILE; '' = searched
    search_split: float = 0.8            # Sec. 4.1: identities split 8:2 into search-train / search-validation
    val_cls: bool = True                 # Sec. 3.2: L_val has L_train's form; false: no L_cls (a deviation)
    arch_lr: float = 3e-4                # paper silent: DARTS [25] Adam for alpha
    arch_weight_decay: float = 1e-3      # paper silent: DARTS [25]


NETWORKS = ("cm-nas", "one-stream", "one-stream-in", "two-stream", "two-stream-in", "two-stream-bn")
PHASES = ("search", "retrain", "both")
C3MMD_PHASES = ("both", "search", "retrain", "none")
CHOICES = {"network": NETWORKS, "phase": PHASES, "c3mmd": C3MMD_PHASES, "triplet": ("joint", "four-term"),
           "head_init": ("pytorch", "release"), "warmup_form": ("project", "release"), "sampler": data.SAMPLERS}
LIMITS = {"ema_every": 1}

# --recipe release: JDAI-CV/CM-NAS at bbc77f4, train_sysu.sh + train_eval.py (file:line of each value). The release
# has phase 2 only; give --phase retrain --genotype paper-sysu for its run (not set here: the synthetic world's
# resnet18 has no 53-bit genotype).
RELEASE = dict(
    arch="resnet50", pretrained="imagenet",    # train_eval.py:159 TwoStreamSwitchBNOp(pretrained=True), resnet50
    height=256, width=128,                     # train_sysu.sh:47-48 --img_w 128 --img_h 256
    epochs=120,                                # train_sysu.sh:38 --epochs 120
    P=16, K=4,                                 # train_sysu.sh:39-41 --batch_size 64 --num_pos 4; utils/utils.py:133
    sampler="community",                       # utils/utils.py:131-136 np.random.choice(idxs, num_pos), N/64 + 1
    lr=0.01, backbone_lr=0.001,                # train_sysu.sh:43 --lr 0.01; train_eval.py:185 0.1 * lr
    betas=(0.5, 0.999), weight_decay=5e-4,     # train_sysu.sh:44-46; train_eval.py:184-188 Adam
    milestones=(40, 70),                       # train_eval.py:40 --steps [40, 70], :41 gamma 0.1
    warmup=10, warmup_form="release",          # train_eval.py:42-43 warmup_epochs 10, factor 0.01
    erasing=0.5,                               # train_eval.py:98 RandomErasing(p=0.5)
    margin=0.4,                                # train_sysu.sh:55 --margin 0.4
    triplet="four-term",                       # train_eval.py:285-288
    head_init="release",                       # models/model_eval_op.py:273-274, models/utils.py:5-25
    lambdas=(0.05, 5.0),                       # train_sysu.sh:53-54 --sp_lambda 5.0 --cmmd_lambda 0.05
    ema_decay=0.997, ema_every=2,              # train_sysu.sh:52 --ema_decay 0.997, :37 --test_freq 2
)
# --recipe release --dataset regdb, on top of RELEASE
RELEASE_REGDB = dict(
    ema_decay=0.968, ema_every=10,             # train_regdb.sh:70 --ema_decay 0.968, :55 --test_freq 10
)

# CPU recipe for the built-in synthetic world: resnet18 from scratch, small images, short phases. The lr,
# backbone_lr, warm-up, milestones, retraining epochs and arch_lr were set when this file was written, before the
# val split existed, and no val comparison of alternatives to them has been run (README, Recipes). The size and the
# search epochs were chosen on --split val, seed 0, to bring a run to about 5 minutes (issue: recipes): the earlier
# 128 x 64 with 3 search epochs (`python reid.py --method cmnas --split val --height 128 --width 64
# --search-epochs 3`): val all-single rank-1 30.4 +- 3.4, mAP 36.9 +- 1.4 (over trials), training fit 50.9,
# within-modality rank-1 76.1 / 67.1, centroid cosine 0.551 against 0.112, last-batch L_cls 1.54, L_triplet 0.57;
# 96 x 48 with 2 search epochs (`python reid.py --method cmnas --split val`): 25.9 +- 3.1, mAP 35.8 +- 1.4, fit
# 38.3, within 66.1 / 54.8, cosine 0.494 against 0.099, last-batch L_cls 1.78, L_triplet 0.58. Healthy, and 0.52 of
# the time (313 s against 602 s of training, both on one thread beside another job); rank-1 lower by 1.3 trial-stds,
# mAP by 1.1, the fit by 12.6: 96 x 48, two search epochs.
SYNTHETIC = dict(arch="resnet18", pretrained="none", height=96, width=48, epochs=6, search_epochs=2,
                 lr=0.001, backbone_lr=0.001, warmup=1, milestones=(5,), arch_lr=3e-3)
SMOKE = dict(arch="resnet18", pretrained="none", height=64, width=32, epochs=1, search_epochs=1, P=4, K=2,
             warmup=1, milestones=())

PAPER_GENOTYPES = {  # Fig. 4, ResNet-50
    "paper-sysu": "0 | 0000 010 011 | 0001 000 111 101 | 1111 101 111 111 111 111 | 1111 111 111",
    "paper-regdb": "0 | 0000 000 110 | 1100 000 100 100 | 1111 111 111 111 111 111 | 1111 111 111",
}


# ---------------------------------------------------------------- search space (Sec. 3.2, Fig. 3)

class SeparateBN(nn.Module):
    """o1: two BNs, `v` for visible and `r` for infrared images, each normalising with its own statistics.

    `modality` (set by CMNASNet.forward) tells the batch layout: 'vr' = first half visible, second half infrared
    (equal halves); 'v' or 'r' = the whole batch is of that modality."""

    def __init__(self, bn):
        super().__init__()
        self.v, self.r = bn, copy.deepcopy(bn)
        self.modality = "vr"

    def forward(self, x):                                   # x: (B, C, H, W)
        if self.modality != "vr":
            return getattr(self, self.modality)(x)
        x_v, x_r = x.chunk(2)                               # (B/2, C, H, W) each
        return torch.cat([self.v(x_v), self.r(x_r)])


class MixedBN(nn.Module):
    """A searchable BN layer l: x_{l+1} = p_o1 o1(x_l) + p_o2 o2(x_l); o1 = SeparateBN, o2 = one shared BN."""

    def __init__(self, bn):
        super().__init__()
        self.o1, self.o2 = SeparateBN(copy.deepcopy(bn)), bn
        self.alpha = nn.Parameter(torch.zeros(2))           # (alpha_o1, alpha_o2)

    def probabilities(self):
        return torch.softmax(self.alpha, 0)                 # Eq. (1): (p_o1, p_o2)

    def forward(self, x):                                   # x: (B, C, H, W)
        p = self.probabilities()
        return p[0] * self.o1(x) + p[1] * self.o2(x)        # Eq. (2)


def bn_layers(body):
    """The BN layers of body = Sequential(stem, layer1, ..., layer4) in genotype (Fig. 4) order, grouped
    [stage][block] -> [(parent module, attribute, label)]. Stage s1 is the stem's BN, s2..s5 are layer1..layer4;
    inside a block the downsample BN comes first, then bn1, bn2 (, bn3)."""
    stages = [[[(body[0], "1", "s1.bn1")]]]
    for s, stage in enumerate(body[1:], start=2):
        blocks = []
        for b, block in enumerate(stage, start=1):
            layers = [(block.downsample, "1", f"s{s}_{b}.downsample")] if block.downsample is not None else []
            layers += [(block, n, f"s{s}_{b}.{n}") for n in ("bn1", "bn2", "bn3") if hasattr(block, n)]
            blocks.append(layers)
        stages.append(blocks)
    return stages


def flat(stages):
    return [layer for stage in stages for block in stage for layer in block]


def genotype_string(bits, stages):
    """'0|1' bits -> Fig. 4 notation: stages separated by ' | ', blocks by ' '."""
    it = iter(bits)
    return " | ".join(" ".join("".join(next(it) for _ in block) for block in stage) for stage in stages)


def parse_genotype(text, stages):
    """Fig. 4 notation (spaces and '|' optional) -> bit string, checked against the network's BN layers."""
    bits = "".join(text.replace("|", " ").split())
    n = len(flat(stages))
    if set(bits) - {"0", "1"} or len(bits) != n:
        layout = genotype_string("x" * n, stages)
        raise common.UserError(f"genotype {text!r} has {len(bits)} symbols, but this network has {n} BN "
                               f"layers: give {n} bits of 0 (separate) / 1 (shared) laid out as {layout}, or change "
                               f"--arch (the paper genotypes are for resnet50)")
    return bits


def read_genotype(spec):
    """--genotype value: 'paper-sysu', 'paper-regdb' or a file whose first line (not starting with '#') holds it."""
    if spec in PAPER_GENOTYPES:
        return PAPER_GENOTYPES[spec]
    if not os.path.isfile(spec):
        raise common.UserError(f"--genotype {spec!r} is neither {' nor '.join(PAPER_GENOTYPES)} nor an existing "
                               f"file; give one of those (a search writes OUT/genotype.txt)")
    with open(spec) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise common.UserError(f"--genotype {spec}: the file holds no genotype line; write one such as "
                               f"'{PAPER_GENOTYPES['paper-sysu']}'")
    return lines[0]


def genotype_of(body):
    """The discrete architecture of `body` in Fig. 4 notation; a MixedBN layer takes the operation with the
    larger probability ('0' when p_o1 > p_o2, Sec. 3.2)."""
    bits = []
    for parent, name, _ in flat(bn_layers(body)):
        unit = getattr(parent, name)
        if isinstance(unit, MixedBN):
            p = unit.probabilities()
            bits.append("0" if p[0] > p[1] else "1")
        else:
            bits.append("0" if isinstance(unit, SeparateBN) else "1")
    return genotype_string(bits, bn_layers(body))


def apply_genotype(body, bits):
    """Turns each BN of `body` into a MixedBN (bits None: the search space), a SeparateBN ('0') or keeps it ('1')."""
    for (parent, name, _), bit in zip(flat(bn_layers(body)), bits or itertools.repeat(None)):
        bn = getattr(parent, name)
        if bit is None:
            setattr(parent, name, MixedBN(bn))
        elif bit == "0":
            setattr(parent, name, SeparateBN(bn))


def instance_norm(module):
    """Table 1 '(IN)' rows: every BatchNorm2d inside `module` becomes an affine InstanceNorm2d with its weights."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = nn.InstanceNorm2d(child.num_features, eps=child.eps, affine=True)
            norm.weight.data.copy_(child.weight.data)
            norm.bias.data.copy_(child.bias.data)
            setattr(module, name, norm)
        else:
            instance_norm(child)


class CMNASNet(nn.Module):
    """ResNet (last stride 1) + average pooling + BNNeck + classifier, for CM-NAS and the Table 1 baselines.

    network 'cm-nas': every BN is a MixedBN (genotype None: the search space) or fixed by `genotype`;
    'one-stream' shares everything, 'two-stream-bn' separates only the BNs of stages 1-2 (genotypes too);
    'two-stream' separates whole stages 1-2 (stem + layer1, `specific`); '-in' replaces every BN by IN."""

    def __init__(self, settings, num_classes, genotype=None):
        super().__init__()
        net = common.resnet(settings.arch, settings.pretrained)
        self.specific = None                                # modality-specific stages, run before `body`
        if settings.network in ("two-stream", "two-stream-in"):
            net_r = common.resnet(settings.arch, settings.pretrained)
            self.specific = nn.ModuleDict({"v": nn.Sequential(common.stem(net), net.layer1),
                                           "r": nn.Sequential(common.stem(net_r), net_r.layer1)})
            self.body = nn.Sequential(net.layer2, net.layer3, net.layer4)
        else:
            self.body = nn.Sequential(common.stem(net), *common.stages(net))
        if settings.network.endswith("-in"):
            instance_norm(self)
        elif settings.network == "two-stream-bn":          # separate BNs in stages s1, s2 (stem, layer1)
            apply_genotype(self.body, "".join(("0" if s < 2 else "1") * len(flat([stage]))
                                              for s, stage in enumerate(bn_layers(self.body))))
        elif settings.network == "cm-nas":
            apply_genotype(self.body, None if genotype is None else parse_genotype(genotype, bn_layers(self.body)))
        # 'one-stream': every BN stays one shared BN
        c = common.channels(settings.arch)[-1]
        self.bnneck = nn.BatchNorm1d(c)
        self.bnneck.bias.requires_grad_(False)              # BNNeck: no shift
        self.classifier = nn.Linear(c, num_classes, bias=False)
        if settings.head_init == "release":                 # models/model_eval_op.py:273-274, models/utils.py:5-25
            nn.init.normal_(self.bnneck.weight, 1.0, 0.01)
            nn.init.zeros_(self.bnneck.bias)
            nn.init.normal_(self.classifier.weight, std=0.001)

    def alphas(self):
        return [m.alpha for m in self.modules() if isinstance(m, MixedBN)]

    def forward(self, x, modality="vr"):
        """x (B, 3, H, W), visible first then infrared ('vr'), or one modality ('v' / 'r')
        -> pooled feature f (B, C), BN feature (B, C)."""
        for m in self.modules():
            if isinstance(m, SeparateBN):
                m.modality = modality
        if self.specific is not None:
            if modality == "vr":
                x_v, x_r = x.chunk(2)
                x = torch.cat([self.specific["v"](x_v), self.specific["r"](x_r)])
            else:
                x = self.specific[modality](x)
        f = self.body(x).float().mean(dim=(2, 3))           # (B, C) average pooling, float32 under --amp
        with torch.autocast(x.device.type, enabled=False):  # the BNNeck (and so L_C3MMD's input) in float32
            return f, self.bnneck(f)


def build(settings, num_classes, meta=None):
    """The phase-2 network of the stored genotype; the search space when the weights are the search's own
    (meta supernet) or when no genotype is known."""
    meta = meta or {}
    if settings.network != "cm-nas" or meta.get("supernet"):
        genotype = None
    elif meta.get("genotype"):
        genotype = meta["genotype"]
    elif settings.genotype:
        genotype = read_genotype(settings.genotype)
    else:
        genotype = None
    return CMNASNet(settings, num_classes, genotype)


# ---------------------------------------------------------------- losses (Eq. 4-10)

# Copy of rfm.L_tri_hard; test_all.TestCopies keeps them equal
def L_tri_hard(f, y, margin):
    """Triplet loss with online hard mining (batch hard): for each anchor, the farthest positive and the closest
    negative in the batch; mean over anchors of max(0, d_ap - d_an + margin). f (N, d), y (N,)."""
    d = (f.pow(2).sum(1, keepdim=True) + f.pow(2).sum(1) - 2 * f @ f.t()).clamp(min=1e-12).sqrt()   # (N, N)
    same = y[:, None] == y[None, :]                                   # (N, N), the diagonal included
    d_ap = d.masked_fill(~same, float("-inf")).amax(1)                # (N,) hardest positive
    d_an = d.masked_fill(same, float("inf")).amin(1)                  # (N,) hardest negative
    return F.relu(d_ap - d_an + margin).mean()


def k_poly(a, b):
    """Polynomial kernel k(x, y) = (x . y)^2 = psi(x) . psi(y) with psi(x) = vec(x x^T). (m, d), (n, d) -> (m, n)."""
    return (a @ b.t()).pow(2)


def mmd2(a, b):
    """Squared MMD, biased estimate: ||mean psi(a) - mean psi(b)||_H^2 = mean k(a, a) + mean k(b, b)
    - 2 mean k(a, b). a (m, d), b (n, d)."""
    return k_poly(a, a).mean() + k_poly(b, b).mean() - 2 * k_poly(a, b).mean()


def L_CMMD(f_v, f_r, y_v, y_r):
    """Eq. (4), squared: L_CMMD = 1/C sum_c ||1/m^c sum_i psi(f_i^{c,vis}) - 1/n^c sum_j psi(f_j^{c,ir})||_H^2 over
    the C identities of the batch, k(x, y) = psi(x) . psi(y) = (x . y)^2 (mmd2). Deviation: the square of Eq. (4)'s
    RKHS norm, on L2-normalised features, as the released code. f_v (n, d), f_r (n, d), y_v, y_r (n,)."""
    f_v, f_r = F.normalize(f_v, dim=1), F.normalize(f_r, dim=1)       # Deviation: L2-normalised (released code)
    return torch.stack([mmd2(f_v[y_v == c], f_r[y_r == c]) for c in y_v.unique()]).mean()   # Eq. (4); Deviation: squared


def L_MMD(f_v, f_r):
    """Table 1 ablation 'CMMD -> MMD': one squared MMD between all visible and all infrared features."""
    return mmd2(F.normalize(f_v, dim=1), F.normalize(f_r, dim=1))


def L_tri_cross(a, b, y_a, y_b, margin):
    """Batch-hard triplet with anchors a (m, d) and candidates b (n, d): each anchor's farthest positive and closest
    negative among b; mean of max(0, d_ap - d_an + margin). One of the release's four terms (train_eval.py:285-288);
    b = a gives L_tri_hard."""
    d = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.t()).clamp(min=1e-12).sqrt()   # (m, n)
    same = y_a[:, None] == y_b[None, :]
    d_ap = d.masked_fill(~same, float("-inf")).amax(1)                # (m,)
    d_an = d.masked_fill(same, float("inf")).amin(1)                  # (m,)
    return F.relu(d_ap - d_an + margin).mean()


def L_triplet(f, y, n, settings):
    """L_triplet on the pooled features f (2n, C) = [visible; infrared], labels y (2n,): 'joint' one batch-hard
    term over the whole batch; 'four-term' the release's mean of the v-v, r-r, v-r and r-v terms."""
    if settings.triplet == "joint":
        return L_tri_hard(f, y, settings.margin)                        # Choice: one batch-hard term (paper silent)
    f_v, f_r, y_v, y_r = f[:n], f[n:], y[:n], y[n:]
    return (L_tri_cross(f_v, f_v, y_v, y_v, settings.margin) + L_tri_cross(f_r, f_r, y_r, y_r, settings.margin)
            + L_tri_cross(f_v, f_r, y_v, y_r, settings.margin)
            + L_tri_cross(f_r, f_v, y_r, y_v, settings.margin)) / 4   # the release's form (paper silent)


def L_CC(F_vis, F_ir):
    """Eq. (5)-(8), correlation consistency: L_CC = 1/n^2 ||G_vis - G_ir||_F^2 (Eq. 8), with the correlation
    matrices G~_vis = F_vis F_vis^T, G~_ir = F_ir F_ir^T (Eq. 6) and G their rows L2-normalised (Eq. 7).
    F_vis, F_ir (n, d) (Eq. 5): row i of both from the same identity."""
    G_vis = F.normalize(F_vis @ F_vis.t(), dim=1)           # Eq. (6), (7): (n, n), rows L2-normalised
    G_ir = F.normalize(F_ir @ F_ir.t(), dim=1)
    n = F_vis.shape[0]
    return (G_vis - G_ir).pow(2).sum() / n ** 2             # Eq. (8)


def objective(model, batch, settings, c3mmd=True, cls=True):
    """Eq. (10) on one batch: L_train = L_basic + L_C3MMD, L_basic = L_cls + L_triplet, L_C3MMD = lambda1 L_CMMD +
    lambda2 L_CC (Eq. 9) -> (loss, {term: value}). c3mmd False: without L_C3MMD (`--c3mmd`, Table 1).
    L_val of Eq. (3) has the same form: this function on a validation batch (cls False: without L_cls).
    The network and the classifier run under the caller's autocast, the losses in float32."""
    x = torch.cat([batch["x_v"], batch["x_r"]])             # (2n, 3, H, W): visible first, then infrared
    y = torch.cat([batch["y_v"], batch["y_r"]])             # (2n,)
    f, f_bn = model(x)                                      # (2n, C) each, float32 (CMNASNet.forward)
    logits = model.classifier(f_bn) if cls else None        # (2n, classes)
    with torch.autocast(x.device.type, enabled=False):      # the losses in float32 under --amp
        terms = {"L_triplet": L_triplet(f, y, len(batch["y_v"]), settings)}
        if cls:
            terms["L_cls"] = F.cross_entropy(logits.float(), y)
        loss = terms["L_triplet"] + terms.get("L_cls", 0.0)     # L_basic
        if c3mmd:
            lambda1, lambda2 = (float(v) for v in settings.lambdas)   # Deviation: Fig. 5's order; Sec. 4.1 swaps them
            F_vis, F_ir = f_bn.chunk(2)                         # Eq. (5): (n, C) each, identity-aligned rows
            if settings.class_specific:
                terms["L_CMMD"] = L_CMMD(F_vis, F_ir, batch["y_v"], batch["y_r"])
            else:
                terms["L_MMD"] = L_MMD(F_vis, F_ir)
            terms["L_CC"] = L_CC(F_vis, F_ir)
            L_C3MMD = lambda1 * terms.get("L_CMMD", terms.get("L_MMD")) + lambda2 * terms["L_CC"]   # Eq. (9)
            loss = loss + L_C3MMD                               # Eq. (10)
    return loss, {k: v.detach() for k, v in terms.items()}


# ---------------------------------------------------------------- phase 1: search (Eq. 3), phase 2: retrain

def weight_optimizer(settings, model):
    """Adam (Sec. 4.1) over the weights w (not alpha); BNNeck and classifier at lr, the backbone at backbone_lr."""
    head = [p for p in list(model.bnneck.parameters()) + list(model.classifier.parameters()) if p.requires_grad]
    skip = {id(p) for p in head + model.alphas()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    optimizer = torch.optim.Adam([{"params": backbone, "lr": settings.backbone_lr},
                                  {"params": head, "lr": settings.lr}],
                                 betas=tuple(settings.betas), weight_decay=settings.weight_decay)
    schedule = (ReleaseWarmup if settings.warmup_form == "release" else common.WarmupMultiStep)
    return optimizer, schedule(optimizer, settings.milestones, warmup=settings.warmup)


class ReleaseWarmup(common.WarmupMultiStep):
    """The release's warm-up (utils/lr_scheduler.py:25-35): f = 0.01 (1 - e / warmup) + e / warmup for e < warmup,
    then gamma^(number of milestones <= e)."""

    def factor(self, epoch):
        if epoch < self.warmup:
            return 0.01 + 0.99 * epoch / self.warmup
        return self.gamma ** sum(epoch >= m for m in self.milestones)


class EMA:
    """Exponential moving average of a model's whole state (weights and BN running statistics), as the release's
    EMA (utils/utils.py:233-255): after every weight step s <- decay s + (1 - decay) w; integer buffers
    (num_batches_tracked) are copied. `copy_back` loads s into the model (train_eval.py:245-246)."""

    def __init__(self, model, decay):
        self.model, self.decay = model, decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self):
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(self.decay).add_(v, alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_back(self):
        self.model.load_state_dict(self.shadow)

    def state_dict(self):
        return {"shadow": self.shadow}

    def load_state_dict(self, state):
        own = self.model.state_dict()
        self.shadow = {k: v.to(own[k].device).clone() for k, v in state["shadow"].items()}


def search_step(model, batch, val_batch, settings, c3mmd, optimizer, arch_optimizer, autocast):
    """One iteration of Eq. (3), first order: an alpha step on L_val (validation batch, w fixed), then a w step on
    L_train (training batch, alpha fixed); `autocast`: the context factory both objectives run under (the run's).
    -> L_val, the L_train terms."""
    weights = [p for group in optimizer.param_groups for p in group["params"]]
    alphas = arch_optimizer.param_groups[0]["params"]
    with autocast():   # Eq. (3) upper level: L_val(w, alpha); Deviation: without L_cls when settings.val_cls is false
        l_val, _ = objective(model, val_batch, settings, c3mmd=c3mmd, cls=settings.val_cls)
    arch_optimizer.zero_grad(set_to_none=True)
    l_val.backward(inputs=alphas)                           # Eq. (3): min over alpha, w fixed
    arch_optimizer.step()
    with autocast():
        loss, terms = objective(model, batch, settings, c3mmd=c3mmd)   # Eq. (3) lower level: L_train(w, alpha)
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=weights)                           # Eq. (3): min over w, alpha fixed
    optimizer.step()
    return l_val.detach(), terms


def cycle(loader, epoch, num_epochs, device):
    """Endless validation batches for search epoch `epoch`: loader epochs epoch, epoch + num_epochs, ...
    (deterministic, so a resumed search sees the same batches)."""
    for k in itertools.count():
        for batch in loader.epoch(epoch + k * num_epochs):
            yield {key: v.to(device, non_blocking=True) for key, v in batch.items()}


def search(settings, trainset, augment, run):
    """Phase 1: alternate alpha steps on L_val and weight steps on L_train (Eq. 3, first order). -> search network."""
    train_part, val_part = trainset.split_ids(settings.search_split, run.seed)   # Sec. 4.1: identities 8:2
    val_ids = len(np.intersect1d(val_part.v.labels, val_part.r.labels))
    if val_ids < settings.P:
        run.say(f"[search] the validation split has {val_ids} identities: validation batches take P={val_ids}")
    loader = data.train_loader(train_part, settings.P, settings.K, run.seed, augment, workers=run.workers,
                               sampler=settings.sampler)
    val_loader = data.train_loader(val_part, min(settings.P, val_ids), settings.K, run.seed + 1, augment,
                                   workers=run.workers, sampler=settings.sampler)
    model = CMNASNet(settings, trainset.num_classes).to(run.device)
    optimizer, schedule = weight_optimizer(settings, model)
    arch_optimizer = torch.optim.Adam(model.alphas(), lr=settings.arch_lr, betas=tuple(settings.betas),
                                      weight_decay=settings.arch_weight_decay)
    c3mmd = settings.c3mmd in ("both", "search")
    for epoch in run.epochs("search", settings.search_epochs, model=model, optimizer=optimizer,
                            arch_optimizer=arch_optimizer, schedule=schedule, loader=loader, val_loader=val_loader):
        schedule.step_epoch(epoch)
        model.train()
        val_batches = cycle(val_loader, epoch, settings.search_epochs, run.device)
        for it, batch in run.batches(loader, epoch):
            l_val, terms = search_step(model, batch, next(val_batches), settings, c3mmd, optimizer, arch_optimizer,
                                       run.autocast)                                     # Eq. (3)
            run.log(epoch, it, {**terms, "L_val": l_val}, optimizer.param_groups[1]["lr"])
        run.meta.update(genotype=genotype_of(model.body))
    return model


def genotype_report(model):
    """OUT/genotype.txt: the derived genotype (Fig. 4 notation) and each layer's softmax probabilities (Eq. 1)."""
    lines = [genotype_of(model.body),
             "# CM-NAS genotype (Fig. 4): one bit per BN layer, 0 = separate visible/infrared BN (o1), 1 = shared (o2)",
             f"# {'layer':<18} {'p_o1 separate':>13} {'p_o2 shared':>11}  bit"]
    for parent, name, label in flat(bn_layers(model.body)):
        p = getattr(parent, name).probabilities().tolist()
        lines.append(f"# {label:<18} {p[0]:13.4f} {p[1]:11.4f}  {0 if p[0] > p[1] else 1}")
    return "\n".join(lines) + "\n"


def fit(settings, model, trainset, augment, run, phase, c3mmd):
    """Trains the weights of a fixed architecture with Eq. (10) (phase 2, or a Table 1 baseline). With
    ema_decay > 0, the release's EMA: updated after every step, copied back into the model after every
    `ema_every` epochs except the last (train_eval.py:230-246: the last epoch's raw weights are the ones tested)."""
    loader = data.train_loader(trainset, settings.P, settings.K, run.seed, augment, workers=run.workers,
                               sampler=settings.sampler)
    optimizer, schedule = weight_optimizer(settings, model)
    ema = {"ema": EMA(model, settings.ema_decay)} if settings.ema_decay > 0 else {}
    for epoch in run.epochs(phase, settings.epochs, model=model, optimizer=optimizer, schedule=schedule,
                            loader=loader, **ema):
        schedule.step_epoch(epoch)
        model.train()
        for it, batch in run.batches(loader, epoch):
            with run.autocast():
                loss, terms = objective(model, batch, settings, c3mmd=c3mmd)           # Eq. (10)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema:
                ema["ema"].update()
            run.log(epoch, it, terms, optimizer.param_groups[1]["lr"])
        if ema and (epoch + 1) % settings.ema_every == 0 and epoch + 1 < settings.epochs:
            ema["ema"].copy_back()
    return model


def check(settings):
    for field, allowed in CHOICES.items():
        value = getattr(settings, field)
        if value not in allowed:
            raise common.UserError(f"--{field.replace('_', '-')} {value!r} is not one of {', '.join(allowed)}")
    if not 0 <= settings.ema_decay < 1:
        raise common.UserError(f"--ema-decay {settings.ema_decay} is not in [0, 1); 0 turns the EMA off "
                               f"(the release: 0.997 SYSU, 0.968 RegDB)")
    if settings.ema_every < 1:
        raise common.UserError(f"--ema-every {settings.ema_every}: give the epochs between EMA copies, >= 1")
    if len(settings.lambdas) != 2:
        raise common.UserError(f"--lambdas takes two values (lambda1 for CMMD, lambda2 for CC), got {settings.lambdas}")
    if settings.network != "cm-nas" and (settings.phase != "both" or settings.genotype):
        raise common.UserError(f"--phase and --genotype belong to --network cm-nas; --network {settings.network} "
                               f"is a fixed Table 1 baseline trained in one phase")
    if settings.network == "cm-nas" and settings.phase == "retrain" and not settings.genotype:
        raise common.UserError("--phase retrain needs --genotype paper-sysu, paper-regdb or FILE "
                               "(a search writes OUT/genotype.txt)")
    if settings.network == "cm-nas" and settings.phase != "retrain" and settings.genotype:
        raise common.UserError(f"--genotype {settings.genotype} retrains a given architecture: add --phase retrain, "
                               f"or drop --genotype to use the searched one")


def train(settings, trainset, run):
    check(settings)
    augment = data.Augment(settings.height, settings.width, pad=10, flip=True, erasing=settings.erasing)  # Sec. 4.1
    retrain_c3mmd = settings.c3mmd in ("both", "retrain")
    if settings.network != "cm-nas":
        model = build(settings, trainset.num_classes).to(run.device)
        return fit(settings, model, trainset, augment, run, "train", retrain_c3mmd)
    if settings.phase == "retrain":
        genotype = read_genotype(settings.genotype)
    else:
        supernet = search(settings, trainset, augment, run)
        genotype = genotype_of(supernet.body)
        (run.out / "genotype.txt").write_text(genotype_report(supernet))
        run.say(f"[search] genotype {genotype} (written to {run.out / 'genotype.txt'})")
        if settings.phase == "search":
            run.meta.update(genotype=genotype, supernet=True)
            return supernet
    run.meta.update(genotype=genotype, supernet=False)
    model = build(settings, trainset.num_classes, run.meta).to(run.device)
    return fit(settings, model, trainset, augment, run, "retrain", retrain_c3mmd)


@torch.no_grad()
def extract(model, x, modality):
    """Test feature: the L2-normalised BN feature, (B, C); separate BNs use the statistics of `modality`."""
    return F.normalize(model(x, modality)[1], dim=1)
