"""cm-SSFT: Lu et al., "Cross-modality Person re-identification with Shared-Specific Feature Transfer", CVPR 2020.

No implementation was ever published; this is the first. The paper's RGB modality R is `v` here, infrared I is `r`.
Each deviation is tagged `# Deviation:` on the line it changes.

Implements:
- the two-stream feature extractor (Sec. 3.1): per-modality Conv1^m (stem, layer1, layer2), a shared Conv2^S and
  per-modality Conv2^m (layer3, layer4, last stride 1), global average pooling and feature blocks Feat (BNNeck, or
  fully-connected with --aug false): shared features H^m and specific features P^m (Eq. 1); classification L_c
  (Eq. 2), single-modality triplet L_smT on P (Eq. 3) and cross-modality triplet L_cmT on H (Eq. 4);
- the Shared-Specific Transfer Network SSTN (Sec. 3.2): zero-padded three-segment features Z (Eq. 5); intra-modality
  affinity from specific, inter-modality affinity from shared features (Eq. 6) with the normalised distance d
  (Eq. 7, a similarity in [0, 1]); the k nearest neighbours per row of each block, T(., k) (Eq. 8); stacked Z (Eq. 9);
  propagation sigma(D^-1/2 A D^-1/2 Z W) with ReLU (Eq. 10); Feat^t (Eq. 11); L_c(T) (Eq. 12); L_t(T) (Eq. 13).
  During training SSTN runs over the batch;
- complementary learning (Sec. 3.3): a three-layer modality discriminator and L_ma (Eq. 14); per-modality
  projection matrices Theta^m and L_pa (Eq. 15); per-modality decoders De^m of four sub-pixel convolution layers
  (Eq. 16) and the L2 reconstruction loss L_re (Eq. 17);
- optimisation (Sec. 3.4): L(H), L(P), L(T) (Eq. 18), L_feat (Eq. 19), L_min and L_max (Eq. 20) and the alternating
  min-max updates (Eq. 21): the min step moves the network Theta_N, the max step the discriminator Theta_D and the
  projections Theta^m;
- testing (Sec. 3.4, 4.5): `distance` runs SSTN over all queries and the gallery together (`--ssft-test
  transductive`, the paper's main tables) or once per query with the amplified affinity of Eq. 22 (`--ssft-test
  single-query`, Table 5). Both work on sparse neighbour lists and in chunks, so SYSU-MM01 multi-shot (~3,800
  queries + 3,000 gallery) needs no N x N matrix: memory O(N (k + c)) plus bounded chunks (and the Nq x Ng result).
  No identity or camera label enters the test graph: `distance` sees only the trial's [H | P | m] rows, and its
  result does not depend on the order of queries or gallery;
- Fig. 3 (`figures`): images and their reconstructions from the shared, the specific and both features.
- Table 3 ablations as flags (every row keeps ShL):
    row 1   --spl false --moa false --pa false --re false --sht false --spt false
    row 2   --moa false --pa false --re false --sht false --spt false
    row 3   --pa false --re false --sht false --spt false
    row 4   --re false --sht false --spt false
    row 5   --sht false --spt false
    row 6   --moa false --pa false --re false
    row 7   --pa false --re false
    row 8   --re false
    row 9   --spt false
    row 10  --sht false
    row 11  the defaults
  Rows 1-5 test on H (no SSTN), rows 6-11 on T. `--shl false` is an extra switch, not a Table 3 row: it drops only
  L(H); the shared stream stays and still feeds SSTN, L_ma, L_pa and the test. Table 4 'wo aug': add --aug false
  (FC feature blocks, no random erasing; crop and flip stay);
- the test-time feature layout (what `extract` returns and `distance` reads), one row per image:
    [H (c) | P (c) | m (1)]   H: shared feature, P: specific feature (feature-block outputs), m: 0 visible, 1 infrared;
  with --spl false the P segment is absent: [H (c) | m (1)]. c = 2048 for ResNet-50, 512 for ResNet-18/34.

Readings and choices:
- Test representation: only the transferred feature T = Feat^t(Z~) (its BN output with BNNeck) is L2-normalised and
  compared; H and P enter only as SSTN's input. Sec. 3.4's "All features are L2-normalized" could also be read
  as a concatenation such as [H; T] or [H; P; T]; that reading is not provided. Without SSTN (Table 3 rows 1-5)
  the test compares H.
- SSTN during training: the affinity A is differentiable, so L(T)'s gradients reach H and P through the kept
  top-k values of d (Eq. 6-8) as well as through Z (the paper does not say whether A is a constant). Each sample is
  its own first intra-modality neighbour (d = 1), so k = 4 keeps 3 other intra- and 4 inter-modality neighbours,
  as Eq. 22's explicit k A^{q,q} self term suggests. A is asymmetric (top-k per row) and its row degrees
  d_ii = sum_j A_ij (Eq. 10) are used on both sides of D^-1/2 A D^-1/2, as written; this is not the symmetric GCN
  normalisation.
- Margins rho1 (L_cmT) = rho2 (L_smT) = 0.3, BoT's triplet margin (the paper gives none).
- With BNNeck (BoT [30]) each feature block returns the pooled feature for the triplet terms and its BN output for
  everything else (classifiers, SSTN's Z and affinities, L_ma, L_pa, the test); without it both are the FC output.
- Classifiers: four bias-free linear layers, one shared by both modalities on H, one per modality on P (Eq. 2),
  one on T (Eq. 12). Of BoT's tricks only the two Sec. 4.1 names are used (BNNeck, random erasing p = 0.5): no
  label smoothing, no warm-up, no centre loss.
- The decoders read the feature maps that H^m and P^m are pooled from (Eq. 16's [P^m; H^m] as maps of c + c
  channels at stride 16): four x2 sub-pixel layers then restore the input size, which is why the last stride is 1.
  The first three layers output 64 channels with ReLU, the fourth the 3 image channels; the target is the
  (normalised, augmented, random-erased) input and L_re is the mean squared error per pixel.
- The modality discriminator is Linear(c, c/2), ReLU, Linear(c/2, c/2), ReLU, Linear(c/2, 2).
- W of Eq. (10) maps the 3c-dimensional Z to c dimensions (bias-free); Feat^t is a feature block as above.
- Ablations ShT / SpT set the untransferred segments of Z to zero; the affinities (Eq. 6) are unchanged. With
  neither, there is no SSTN and the test compares the shared features H.
- Optimisers: Adam (betas 0.9, 0.999) with weight decay 5e-4 (BoT's, coupled L2) for the network; the adversaries
  (Theta_D, Theta^m) have their own Adam with the same lr, betas, weight decay and lr schedule. No warm-up (Sec.
  4.1 names none); image size 256 x 128 (BoT's; not stated). An epoch is data.py's max(#visible, #infrared) //
  (P K) batches (695 on SYSU-MM01).
- Each iteration does one forward pass of the network, then the max step on its (detached) features, then the min
  step against the updated discriminator and projections: the alternation of Eq. 21, one step of each per batch.
- Eq. (15) and (20) are implemented literally, and the min-max they define has no bound (the default). The network
  minimises -l3 L_pa with L_pa = ||Theta^m P - H||, which is linear in the scale of its inputs: rescaling H and P
  by s rescales the projection error of every Theta, the adversary's best one included, by exactly s, so the
  network can raise L_pa by growing its features rather than by decorrelating them. Only weight decay resists,
  and the test's L2 normalisation makes the growth free. Likewise -l2 L_ma is the saturating minimax form: the
  network is rewarded for pushing the discriminator's cross-entropy towards +inf (flipping the modalities), not
  for confusing them. The training log prints the mean ||H|| of each logged batch (term `||H||`, not part of any
  loss) so a run shows whether this happens; --pa-form scale-free and --ma-form confusion (Deviations) remove the
  two incentives. The default stays the paper's literal form: on --split val the scale-free form did not differ
  from it by more than one trial-std (the numbers and the commands: README, "Deviations from the papers").

Deviations:
- Eq. (3), (4), (13) sum over all triplets; here every anchor takes its hardest positive and hardest negative in the
  batch (batch-hard mining of Hermans et al. [17], the paper's reference for L_smT), averaged over anchors.
- `--pa-form scale-free` (default literal): L_pa (Eq. 15) on L2-normalised P and H, in both steps; the projection
  error no longer grows with the features' scale.
- `--ma-form confusion` (default literal): the network's term of Eq. (20) becomes +l2 L_conf, the discriminator's
  cross-entropy against the uniform target (minimal, log 2, where it predicts 1/2 for each modality), instead of
  -l2 L_ma. The max step (the discriminator minimising L_ma, Eq. 21) is unchanged.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
from methods import common

ERASING = 0.5               # random-erasing probability of the 'w aug' rows (BoT [30], Zhong et al. [54])
CHUNK_ELEMENTS = 2 ** 24    # test-time SSTN: elements per temporary block, bounds memory at any test size: the
                            # transductive d blocks are float64 (128 MB), and each chunk also makes a float64
                            # normalised copy of its modality's features (N_m x c x 8 bytes); single-query on
                            # CUDA uses a share of the free memory instead (`single_query_chunk`)
SINGLE_QUERY_LIVE = 4       # float32 (Ng, n, c) blocks alive at once in single-query SSTN (two of the previous
                            # chunk until they are replaced, a product and its result)
TEST_MODES = ("transductive", "single-query")
PA_FORMS = ("literal", "scale-free")
MA_FORMS = ("literal", "confusion")


@dataclass
class Settings:
    arch: str = "resnet50"               # Sec. 4.1: ResNet-50 backbone
    pretrained: str = "imagenet"         # Sec. 4.1 (BoT [30]): ImageNet initialisation
    height: int = 256                    # not stated; BoT [30]'s 256 x 128, whose tricks Sec. 4.1 adopts
    width: int = 128
    epochs: int = 120                    # Sec. 4.1: Adam for 120 epochs
    P: int = 8                           # Sec. 4.1: 8 identities per batch
    K: int = 4                           #   x 4 RGB + 4 infrared images (batch 64)
    lr: float = 3.5e-4                   # Sec. 4.1: learning rate 0.00035
    milestones: tuple = (40, 70)         # Sec. 4.1: decayed 10 times at epochs 40 and 70
    warmup: int = 0                      # Sec. 4.1 names no warm-up
    weight_decay: float = 5e-4           # not stated; BoT [30]'s Adam weight decay
    k: int = 4                           # Sec. 4.1: k = 4 near neighbours (Eq. 8, 22)
    lambda1: float = 1.0                 # Sec. 4.1: weight of L_re (Eq. 20)
    lambda2: float = 0.2                 # Sec. 4.1: weight of L_ma
    lambda3: float = 0.2                 # Sec. 4.1: weight of L_pa
    rho1: float = 0.3                    # margin of L_cmT (Eq. 4, 13); not given in the paper, BoT's 0.3
    rho2: float = 0.3                    # margin of L_smT (Eq. 3, 13); not given in the paper, BoT's 0.3
    aug: bool = True                     # Table 4 'w aug': BNNeck feature blocks + random erasing; false: FC, none
    shl: bool = True                     # L(H) of Eq. (18); an extra switch: every Table 3 row has ShL
    spl: bool = True                     # Table 3 SpL: the specific streams and L(P)
    moa: bool = True                     # Table 3 MoA: modality adaptation, L_ma (Eq. 14)
    pa: bool = True                      # Table 3 PA: project adversarial learning, L_pa (Eq. 15)
    re: bool = True                      # Table 3 RE: reconstruction enhancement, L_re (Eq. 16-17)
    sht: bool = True                     # Table 3 ShT: SSTN transfers the shared features
    spt: bool = True                     # Table 3 SpT: SSTN transfers the specific features
    ssft_test: str = "transductive"      # Sec. 3.4 / Table 1-2: all queries + gallery; 'single-query': Eq. 22
    pa_form: str = "literal"             # Eq. (15) as written; 'scale-free': a deviation, L_pa on L2-normalised P, H
    ma_form: str = "literal"             # Eq. (20) as written (-l2 L_ma); 'confusion': a deviation, the network
                                         #   pushes the discriminator toward p(m | H) = 1/2 (see L_conf)


# CPU recipe for the built-in synthetic world: a small network trained from scratch. The lr and backbone were set
# when this file was written, before the val split existed, and no val comparison of alternatives to them has been
# run (README, Recipes). The epochs were chosen on --split val, seed 0, twice. First, to bring the default run under
# the 10-minute bound (10 epochs took 10.0-10.9 min a test seed): 10 epochs, steps (7, 9) (`python reid.py --method
# ssft --split val --epochs 10 --milestones 7 9`): val all-single rank-1 20.8 +- 2.0, mAP 31.2 +- 2.0 (over trials),
# training fit 52.2, 8:01 wall; 8 epochs, steps (5, 7) (the same tail: two epochs at lr/10, one at lr/100; `--epochs
# 8 --milestones 5 7`): 23.5 +- 3.4, mAP 31.0 +- 2.1, fit 37.6, 6:34 wall. Second, to bring a run to about 5 minutes
# (issue: recipes; on one thread beside another job): 6 epochs, steps (3, 5) (the same tail; `python reid.py
# --method ssft --split val`): 19.5 +- 2.9, mAP 28.7 +- 1.5, fit 20.6, within-modality rank-1 58.2 / 42.5,
# last-batch L(H) 3.28, L(P) 2.73, L(T) 2.99, 428 s of training; 64 x 32 with 10 epochs, steps (7, 9) (`--height 64
# --width 32 --epochs 10 --milestones 7 9`; 80 x 40 is refused, the decoders need multiples of 16): 17.1 +- 2.6, mAP
# 27.0 +- 0.9, fit 21.6, 422 s. Both halve the fit of 8 epochs and stay far above chance (1.3); rank-1 of 6 epochs
# is 1.4 trial-stds below 8 epochs', mAP 2.3 below: 6 epochs at 96 x 48.
SYNTHETIC = dict(arch="resnet18", pretrained="none", height=96, width=48, epochs=6, lr=1e-3, milestones=(3, 5))
SMOKE = dict(arch="resnet18", pretrained="none", height=32, width=16, epochs=1, P=4, K=2, milestones=())
CHOICES = {"ssft_test": TEST_MODES, "pa_form": PA_FORMS, "ma_form": MA_FORMS}


def check(settings):
    """Settings a user can get wrong, with the fix."""
    for name, allowed in CHOICES.items():
        if getattr(settings, name) not in allowed:
            raise common.UserError(f"--{name.replace('_', '-')} {getattr(settings, name)!r} is not one of "
                                   f"{', '.join(allowed)}; choose one of them")
    if not settings.spl and (settings.sht or settings.spt or settings.pa or settings.re):
        raise common.UserError("--spl false removes the specific features, which SSTN's intra-modality affinity "
                               "(Eq. 6), L_pa and the decoders need; add --sht false --spt false --pa false --re false")
    if not (settings.shl or settings.spl):
        raise common.UserError("--shl false --spl false leaves no feature learning loss (Eq. 18); keep one of them")
    if settings.re and (settings.height % 16 or settings.width % 16):
        raise common.UserError(f"--height {settings.height} --width {settings.width}: the decoders' four x2 "
                               f"sub-pixel layers need both to be multiples of 16 (or --re false)")
    if settings.k < 1:
        raise common.UserError(f"--k {settings.k}: SSTN needs at least one near neighbour; give k >= 1")


# ---------------------------------------------------------------- modules

class Feat(nn.Module):
    """Feature block: BNNeck (BoT [30], bias frozen) or, with --aug false, a fully-connected layer (Table 4).

    (N, c) -> (f_tri, f): the feature the triplet losses see, and the one everything else sees."""

    def __init__(self, c, bnneck):
        super().__init__()
        self.bnneck = bnneck
        if bnneck:
            self.layer = nn.BatchNorm1d(c)
            self.layer.bias.requires_grad_(False)
        else:
            self.layer = nn.Linear(c, c)

    def forward(self, x):
        f = self.layer(x)
        return (x, f) if self.bnneck else (f, f)


class Decoder(nn.Sequential):
    """De^m (Eq. 16): four sub-pixel convolution layers [36], 64 channels, x2 each.

    (N, 2c, h, w) -> (N, 3, 16h, 16w)."""

    def __init__(self, c_in, channels=64):
        layers = []
        for i in range(4):
            c_out = 3 if i == 3 else channels
            layers += [nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2)]
            if i < 3:
                layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        super().__init__(*layers)


class SSTN(nn.Module):
    """Shared-Specific Transfer Network (Sec. 3.2): W of Eq. (10), Feat^t of Eq. (11) and the classifier of Eq. (12)."""

    def __init__(self, c, num_classes, bnneck):
        super().__init__()
        self.W = nn.Linear(3 * c, c, bias=False)                   # Eq. (10): W, 3c -> c
        self.feat = Feat(c, bnneck)                                # Eq. (11): Feat^t
        self.classifier = nn.Linear(c, num_classes, bias=False)    # Eq. (12)

    def forward(self, A, Z):
        """Dense SSTN: A (N, N) affinity, Z (N, 3c) padded features -> (T_tri, T), (N, c) each."""
        Z_tilde = F.relu(normalised_affinity(A) @ self.W(Z))      # Eq. (10): sigma(D^-1/2 A D^-1/2 Z W)
        return self.feat(Z_tilde)                                  # Eq. (11): T = Feat^t(Z~)


class SSFT(nn.Module):
    """The two-stream feature extractor (Eq. 1) with its heads, SSTN, the decoders and the two adversaries."""

    def __init__(self, settings, num_classes):
        super().__init__()
        self.k, self.spl, self.sht, self.spt = settings.k, settings.spl, settings.sht, settings.spt
        self.c = c = common.channels(settings.arch)[3]
        nets = {m: common.resnet(settings.arch, settings.pretrained) for m in ("v", "r")}
        self.conv1 = nn.ModuleDict({m: nn.Sequential(common.stem(net), *common.stages(net)[:2])  # Conv1^m
                                    for m, net in nets.items()})
        self.conv2_s = nn.Sequential(*common.stages(common.resnet(settings.arch, settings.pretrained))[2:])  # Conv2^S
        self.feat_s = Feat(c, settings.aug)                                 # Feat^S
        self.classifier_h = nn.Linear(c, num_classes, bias=False)
        if settings.spl:
            self.conv2 = nn.ModuleDict({m: nn.Sequential(*common.stages(net)[2:])           # Conv2^m
                                        for m, net in nets.items()})
            self.feat = nn.ModuleDict({m: Feat(c, settings.aug) for m in nets})                           # Feat^m
            self.classifier_p = nn.ModuleDict({m: nn.Linear(c, num_classes, bias=False) for m in nets})
        self.sstn = SSTN(c, num_classes, settings.aug) if settings.sht or settings.spt else None
        if settings.re:
            self.decoder = nn.ModuleDict({m: Decoder(2 * c) for m in nets})                          # De^m
        # the adversaries of Eq. (21), moved only by the max step
        if settings.moa:
            self.discriminator = nn.Sequential(nn.Linear(c, c // 2), nn.ReLU(inplace=True),           # Theta_D
                                               nn.Linear(c // 2, c // 2), nn.ReLU(inplace=True), nn.Linear(c // 2, 2))
        if settings.pa:
            self.projection = nn.ModuleDict({m: nn.Linear(c, c, bias=False) for m in nets})          # Theta^m

    def adversaries(self):
        """Theta_D and Theta^m: the modules the max step of Eq. (21) moves."""
        return [getattr(self, name) for name in ("discriminator", "projection") if hasattr(self, name)]

    def encode(self, x_v=None, x_r=None):
        """Eq. (1) on (B_v, 3, H, W) visible and/or (B_r, 3, H, W) infrared images; rows: visible, then infrared.

        Returns {'S': shared maps (N, c, h, w), 'H_tri', 'H': (N, c)} and with the specific streams also
        {'Pmap': specific maps (N, c, h, w), 'P_tri', 'P': (N, c)}; h, w = H/16, W/16."""
        xs = [(m, x) for m, x in (("v", x_v), ("r", x_r)) if x is not None]
        a = [self.conv1[m](x) for m, x in xs]                              # Conv1^m: (B_m, c/4, H/8, W/8)
        S = self.conv2_s(torch.cat(a))                                     # Conv2^S: both modalities in one batch
        H_tri, H = self.feat_s(S.mean((2, 3)))                             # Eq. (1): Feat^S(Conv2^S(Conv1^m(X^m)))
        out = {"S": S, "H_tri": H_tri, "H": H}
        if self.spl:
            Pmaps = [self.conv2[m](a_m) for (m, _), a_m in zip(xs, a)]    # Conv2^m: (B_m, c, h, w)
            P_tri, P = zip(*[self.feat[m](p.mean((2, 3))) for (m, _), p in zip(xs, Pmaps)])
            out.update(Pmap=torch.cat(Pmaps), P_tri=torch.cat(P_tri), P=torch.cat(P))  # Eq. (1): Feat^m(Conv2^m(.))
        return out

    def forward(self, x_v, x_r):
        """Training forward on a batch [visible; infrared], B images each: features, logits, SSTN outputs and
        reconstructions (whatever the switches enable), as a dict of tensors with 2B rows (or B per modality)."""
        B = len(x_v)
        out = self.encode(x_v, x_r)
        out["logits_H"] = self.classifier_h(out["H"])                                      # Eq. (2), H
        is_r = torch.arange(2 * B, device=x_v.device) >= B                                 # (2B,) infrared rows
        if self.spl:
            out["logits_P"] = [self.classifier_p["v"](out["P"][:B]), self.classifier_p["r"](out["P"][B:])]  # Eq. (2)
        if self.sstn is not None:
            A = affinity(out["H"], out["P"], is_r, self.k)                                 # Eq. (6)-(8), (2B, 2B)
            Z = pad(out["H"], out["P"], is_r, self.sht, self.spt)                          # Eq. (5), (9), (2B, 3c)
            out["T_tri"], out["T"] = self.sstn(A, Z)                                       # Eq. (10), (11)
            out["logits_T"] = self.sstn.classifier(out["T"])                               # Eq. (12)
        if hasattr(self, "decoder"):
            maps = torch.cat([out["Pmap"], out["S"]], dim=1)                               # [P^m; H^m]: (2B, 2c, h, w)
            out["X_hat"] = torch.cat([self.decoder["v"](maps[:B]), self.decoder["r"](maps[B:])])  # Eq. (16)
        return out


def build(settings, num_classes, meta=None):
    return SSFT(settings, num_classes)


# ---------------------------------------------------------------- SSTN pieces (Eq. 5-10)

# Copy of agw.pairwise_distance; test_all.TestCopies keeps them equal
def pairwise_distance(x, y):
    """Euclidean distances (N, M) between rows of x (N, d) and y (M, d)."""
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()
    return d2.clamp(min=1e-12).sqrt()


def d(a, b):
    """Eq. (7): d(a, b) = 1 - 0.5 ||a/|a| - b/|b|||, (N, c) x (M, c) -> (N, M); a similarity in [0, 1]:
    1 for the same direction, 0 for opposite ones. In float64 (never autocast): in float32 the Gram-matrix distance
    of two near-identical unit vectors is sqrt(rounding noise) ~ 3e-4, enough to reorder near neighbours. This
    protects the test, which runs in float32. At training time with --amp, H and P come out of the autocast forward
    in bf16 already, so there the neighbour order is set at bf16 precision anyway."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    return (1 - 0.5 * pairwise_distance(a, b)).to(dtype)                    # Eq. (7)


def near_neighbours(S, k, block=None):
    """T(., k) of Eq. (8) in sparse form: the k largest entries of each row of S (N, M), among the columns that
    `block` (N, M) bool marks (all if None). Returns (values, columns), (N, min(k, M)) each; a row whose block has
    fewer than k entries gets value 0 for the rest."""
    if block is not None:
        S = S.masked_fill(~block, float("-inf"))
    values, columns = S.topk(min(k, S.shape[1]), dim=1)
    return values.clamp(min=0), columns                # d >= 0, so the clamp only zeroes the -inf of short rows


def T(S, k, block=None):
    """T(., k) of Eq. (8), dense: S (N, M) with all but the k largest entries per row (inside `block`) set to 0."""
    values, columns = near_neighbours(S, k, block)
    return torch.zeros_like(S).scatter(1, columns, values)


def affinity(H, P, is_r, k):
    """Eq. (6)-(8): the affinity matrix A (N, N) of samples with shared H (N, c), specific P (N, c) features and
    modality is_r (N,) bool. Same-modality pairs: d of the specific features; cross-modality pairs: d of the
    shared features; each block keeps its k nearest per row. With rows [visible; infrared] this is Eq. (8)'s
    [[T(A^RR), T(A^RI)], [T(A^IR), T(A^II)]]."""
    same = is_r[:, None] == is_r[None, :]              # (N, N): the intra-modality blocks
    return T(d(P, P), k, same) + T(d(H, H), k, ~same)  # Eq. (6) A^{m,m} = d(P, P), A^{m,m'} = d(H, H'); Eq. (8)


def normalised_affinity(A):
    """D^-1/2 A D^-1/2 of Eq. (10), with D = diag(d_ii), d_ii = sum_j A_ij. A (N, N) -> (N, N)."""
    s = A.sum(1).clamp(min=1e-12).rsqrt()              # (N,) d_ii^-1/2 (d_ii >= A_ii = 1: every row keeps itself)
    return s[:, None] * A * s[None, :]


def pad(H, P, is_r, sht=True, spt=True):
    """Eq. (5) and (9): Z_i = [P_i; H_i; 0] for a visible sample, [0; H_i; P_i] for an infrared one, stacked in
    sample order. H, P (N, c), is_r (N,) bool -> Z (N, 3c).
    Table 3: a segment SSTN does not transfer (ShT, SpT) is 0."""
    r = is_r[:, None]
    P_v = torch.where(r, 0.0, P) if spt else torch.zeros_like(P)   # RGB-specific segment
    P_r = torch.where(r, P, 0.0) if spt else torch.zeros_like(P)   # infrared-specific segment
    return torch.cat([P_v, H if sht else torch.zeros_like(H), P_r], dim=1)   # Eq. (5); rows stacked: Eq. (9)


# ---------------------------------------------------------------- losses

def L_c(logits, y):
    """Eq. (2), (12): classification loss E[-log p(y_i | feature_i)]."""
    return F.cross_entropy(logits, y)                                 # Eq. (2), (12)


# Copy of rfm.L_tri_hard; test_all.TestCopies keeps them equal
def L_tri_hard(f, y, margin):
    """Triplet loss with online hard mining (batch hard): for each anchor, the farthest positive and the closest
    negative in the batch; mean over anchors of max(0, d_ap - d_an + margin). f (N, d), y (N,)."""
    d = (f.pow(2).sum(1, keepdim=True) + f.pow(2).sum(1) - 2 * f @ f.t()).clamp(min=1e-12).sqrt()   # (N, N)
    same = y[:, None] == y[None, :]                                   # (N, N), the diagonal included
    d_ap = d.masked_fill(~same, float("-inf")).amax(1)                # (N,) hardest positive
    d_an = d.masked_fill(same, float("inf")).amin(1)                  # (N,) hardest negative
    return F.relu(d_ap - d_an + margin).mean()


def L_smT(f_v, f_r, y_v, y_r, rho2):
    """Eq. (3), single-modality triplet on the specific features: L_smT(P) =
    sum_{i,j,k} max[rho2 + ||P_i^R - P_j^R|| - ||P_i^R - P_k^R||, 0] + sum_{i,j,k} max[rho2 + ||P_i^I - P_j^I||
    - ||P_i^I - P_k^I||, 0], y_i = y_j != y_k. Deviation: batch hard, each anchor i takes only its hardest j and k
    in the batch, mean over anchors (L_tri_hard per modality). f_v (B_v, d), f_r (B_r, d)."""
    return L_tri_hard(f_v, y_v, rho2) + L_tri_hard(f_r, y_r, rho2)    # Eq. (3); Deviation: batch-hard, not all triplets


def L_cmT(f_v, f_r, y_v, y_r, rho1):
    """Eq. (4), cross-modality triplet on the shared features: L_cmT(H) =
    sum_{i,j,k} max[rho1 + ||H_i^R - H_j^I|| - ||H_i^R - H_k^I||, 0] + sum_{i,j,k} max[rho1 + ||H_i^I - H_j^R||
    - ||H_i^I - H_k^R||, 0], y_i = y_j != y_k: visible anchors take their positives and negatives among the
    infrared samples, infrared anchors among the visible ones. Deviation: batch hard, each anchor i takes only its
    hardest j and k, mean over anchors. f_v (B_v, d), f_r (B_r, d)."""
    dist = pairwise_distance(f_v, f_r)                                 # (B_v, B_r)
    same = y_v[:, None] == y_r[None, :]
    pos, neg = dist.masked_fill(~same, float("-inf")), dist.masked_fill(same, float("inf"))
    loss_v = F.relu(rho1 + pos.amax(1) - neg.amin(1)).mean()           # anchors R, candidates I; Deviation: batch-hard
    loss_r = F.relu(rho1 + pos.amax(0) - neg.amin(0)).mean()           # anchors I, candidates R; Deviation: batch-hard
    return loss_v + loss_r                                             # Eq. (4)


def L_t(T_v, T_r, y_v, y_r, rho1, rho2):
    """Eq. (13): L_t(T) = L_cmT(T) + L_smT(T), Eq. (4) and (3) on the transferred features T (both batch hard)."""
    return L_cmT(T_v, T_r, y_v, y_r, rho1) + L_smT(T_v, T_r, y_v, y_r, rho2)   # Eq. (13); Deviation: batch-hard


def L_ma(discriminator, H, is_r):
    """Eq. (14): E[-log p(m | H_i^m, Theta_D)], the modality discriminator's cross-entropy. H (N, c), is_r (N,)."""
    return F.cross_entropy(discriminator(H), is_r.long())             # Eq. (14), modality labels 0 = v, 1 = r


def L_conf(discriminator, H):
    """--ma-form confusion, a deviation from Eq. (20)'s -l2 L_ma (Eq. 14): E[-1/2 sum_m log p(m | H_i, Theta_D)],
    the discriminator's cross-entropy against the uniform target. It is at its minimum, log 2, where the
    discriminator predicts 1/2 for both modalities; the network minimises it (+l2 L_conf in L_min) instead of
    maximising L_ma, which rewards flipping the modalities without bound. H (N, c)."""
    return -F.log_softmax(discriminator(H), dim=1).mean(1).mean()   # Deviation: uniform target, not -L_ma


def L_pa(projection, P, H, is_r, form="literal"):
    """Eq. (15): E[ ||Theta^m P_i^m - H_i^m|| ], projection error of specific onto shared features (L2 norm).
    projection: {'v': Theta^R, 'r': Theta^I}; P, H (N, c); is_r (N,) bool.
    form 'scale-free' (--pa-form, a deviation): P and H are L2-normalised first, so rescaling either changes
    nothing and the network cannot raise the adversary's error by growing ||H|| (see the module docstring)."""
    if form == "scale-free":
        P, H = F.normalize(P, dim=1), F.normalize(H, dim=1)           # Deviation: Eq. (15) on unit-length P, H
    projected = torch.where(is_r[:, None], projection["r"](P), projection["v"](P))   # Theta^m P_i^m, (N, c)
    return (projected - H).norm(dim=1).mean()                         # Eq. (15)


def L_re(X_hat, X):
    """Eq. (17): L2 reconstruction loss, the mean squared error per pixel. X_hat, X (N, 3, H, W)."""
    return F.mse_loss(X_hat, X)                                       # Eq. (17); Choice: L2 = MSE per pixel


# ---------------------------------------------------------------- training

def max_step(model, out, settings, optimizer):
    """Max step of Eq. (21): maximise L_max = -l2 L_ma - l3 L_pa (Eq. 20) over Theta_D and Theta^m only.

    `out`: the training forward of a [visible; infrared] batch; its features are constants here (detached), so
    the network does not move. Maximising -L_ma trains the discriminator to recognise the modality of H;
    maximising -L_pa trains the projections to map P onto H. Returns L_max (a float tensor)."""
    H = out["H"].detach()                                                    # (2B, c)
    is_r = torch.arange(len(H), device=H.device) >= len(H) // 2               # (2B,) infrared rows
    L_max = 0.0
    if settings.moa:
        L_max = L_max - settings.lambda2 * L_ma(model.discriminator, H, is_r)              # Eq. (20): - l2 L_ma
    if settings.pa:
        L_max = L_max - settings.lambda3 * L_pa(model.projection, out["P"].detach(), H, is_r,
                                                settings.pa_form)                          # Eq. (20): - l3 L_pa
    optimizer.zero_grad(set_to_none=True)
    (-L_max).backward()                                   # Eq. (21): max over Theta_D, Theta^m, by ascent on L_max
    optimizer.step()                                      # Eq. (21)
    return L_max.detach()


def objective(model, batch, settings, adversary_step=None):
    """Eq. (20) on one batch, the min player's loss: L_min = L_feat + l1 L_re - l2 L_ma - l3 L_pa, L_feat = L(H) +
    L(P) + L(T) (Eq. 19), L(H), L(P), L(T) of Eq. (18) -> (L_min, {term: value}).

    Eq. (21) minimises it over the network Theta_N only; the discriminator and projections are the adversaries'.
    The minus signs make the network fool them: shared features whose modality cannot be told, specific features
    that do not project onto the shared ones. --ma-form confusion replaces -l2 L_ma by +l2 L_conf, --pa-form
    scale-free normalises L_pa's inputs (deviations). `adversary_step(out) -> L_max`, when given, is Eq. (21)'s
    max step (train() passes max_step) on this forward's features: it runs between the forward and L_min, so L_min
    sees the updated adversaries, and L_max is the first term. The last term, the batch's mean ||H||, is logged
    only. The network runs under the caller's autocast, the adversaries and the losses in float32."""
    s = settings
    y_v, y_r = batch["y_v"], batch["y_r"]
    B = len(y_v)
    out = model(batch["x_v"], batch["x_r"])                                  # one forward of the network
    with torch.autocast(y_v.device.type, enabled=False):                     # float32 under --amp
        out = {k: [t.float() for t in v] if isinstance(v, list) else v.float() for k, v in out.items()}
        terms = {"L_max": adversary_step(out)} if adversary_step is not None else {}   # Eq. (21): the max step
        y = torch.cat([y_v, y_r])                                            # (2B,) visible first, then infrared
        is_r = torch.arange(2 * B, device=y.device) >= B
        H, L_feat = out["H"], 0.0
        if s.shl:
            H_tri = out["H_tri"]
            L_H = L_c(out["logits_H"], y) + 0.5 * L_cmT(H_tri[:B], H_tri[B:], y_v, y_r, s.rho1)    # Eq. (18): L(H)
            L_feat, terms["L(H)"] = L_feat + L_H, L_H.detach()
        if s.spl:
            P_tri = out["P_tri"]
            L_P = (0.5 * (L_c(out["logits_P"][0], y_v) + L_c(out["logits_P"][1], y_r))
                   + 0.5 * L_smT(P_tri[:B], P_tri[B:], y_v, y_r, s.rho2))                        # Eq. (18): L(P)
            L_feat, terms["L(P)"] = L_feat + L_P, L_P.detach()
        if model.sstn is not None:
            T_tri = out["T_tri"]
            L_T = L_c(out["logits_T"], y) + 0.25 * L_t(T_tri[:B], T_tri[B:], y_v, y_r, s.rho1, s.rho2)   # Eq. (18)
            L_feat, terms["L(T)"] = L_feat + L_T, L_T.detach()
        L_min = L_feat                                                       # Eq. (19): L_feat = L(H) + L(P) + L(T)
        if s.re:
            l_re = L_re(out["X_hat"], torch.cat([batch["x_v"], batch["x_r"]]).float())
            L_min, terms["L_re"] = L_min + s.lambda1 * l_re, l_re.detach()   # Eq. (20): + l1 L_re
        if s.moa and s.ma_form == "confusion":
            l_conf = L_conf(model.discriminator, H)
            L_min, terms["L_conf"] = L_min + s.lambda2 * l_conf, l_conf.detach()   # Deviation: +l2 L_conf, not -l2 L_ma
        elif s.moa:
            l_ma = L_ma(model.discriminator, H, is_r)
            L_min, terms["L_ma"] = L_min - s.lambda2 * l_ma, l_ma.detach()   # Eq. (20): - l2 L_ma
        if s.pa:
            l_pa = L_pa(model.projection, out["P"], H, is_r, s.pa_form)
            L_min, terms["L_pa"] = L_min - s.lambda3 * l_pa, l_pa.detach()   # Eq. (20): - l3 L_pa
        terms["||H||"] = H.detach().norm(dim=1).mean()    # logged only, not in L_min: Eq. (15), (20) can grow it
    return L_min, terms


def split_parameters(model):
    """(Theta_N, [Theta_D, Theta^m]): the trainable parameters of the network, and those of the adversaries."""
    adversaries = [p for m in model.adversaries() for p in m.parameters()]
    ids = {id(p) for p in adversaries}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in ids], adversaries


def train(settings, trainset, run):
    check(settings)
    model = build(settings, trainset.num_classes).to(run.device)
    augment = data.Augment(settings.height, settings.width, erasing=ERASING if settings.aug else 0.0)
    loader = data.train_loader(trainset, settings.P, settings.K, run.seed, augment, workers=run.workers)
    net_params, adv_params = split_parameters(model)
    opt_net = torch.optim.Adam(net_params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedules = [common.WarmupMultiStep(opt_net, settings.milestones, warmup=settings.warmup)]
    objects = dict(model=model, opt_net=opt_net, schedule_net=schedules[0], loader=loader)
    adversary_step = None
    if adv_params:                                                           # with --moa or --pa
        opt_adv = torch.optim.Adam(adv_params, lr=settings.lr, weight_decay=settings.weight_decay)
        schedules.append(common.WarmupMultiStep(opt_adv, settings.milestones, warmup=settings.warmup))
        objects.update(opt_adv=opt_adv, schedule_adv=schedules[1])

        def adversary_step(out):                                             # Eq. (21): max over Theta_D, Theta^m
            return max_step(model, out, settings, opt_adv)
    for epoch in run.epochs("train", settings.epochs, **objects):
        for schedule in schedules:
            schedule.step_epoch(epoch)
        model.train()
        for it, batch in run.batches(loader, epoch):
            with run.autocast():                                             # Eq. (21): max step, then L_min
                L_min, terms = objective(model, batch, settings, adversary_step=adversary_step)
            opt_net.zero_grad(set_to_none=True)
            L_min.backward(inputs=net_params)              # Eq. (21): min over Theta_N; gradients reach Theta_N only
            opt_net.step()                                 # Eq. (21)
            run.log(epoch, it, terms, opt_net.param_groups[0]["lr"])
    return model


# ---------------------------------------------------------------- testing

@torch.no_grad()
def extract(model, x, modality):
    """Per-image features for test-time SSTN: (B, 2c + 1) = [H | P | m], m = 0 visible, 1 infrared (see the module
    docstring; (B, c + 1) without the specific streams)."""
    out = model.encode(**{f"x_{modality}": x})
    flag = torch.full((len(x), 1), float(modality == "r"), device=x.device)
    return torch.cat([out["H"], out["P"], flag] if model.spl else [out["H"], flag], dim=1)


def split_features(model, f):
    """(N, 2c + 1) extracted features -> H (N, c), P (N, c) or None, is_r (N,) bool."""
    c = model.c
    return f[:, :c], f[:, c:2 * c] if model.spl else None, f[:, -1] > 0.5


def sstn_transductive(model, H, P, is_r, k):
    """SSTN over all samples at once (Sec. 3.4): H, P (N, c), is_r (N,) bool -> T (N, c).

    The computation of `affinity` + `SSTN.forward`, with A kept sparse (the k intra- and k inter-modality
    neighbours of each row, Eq. 8) and rows in chunks: memory O(N (k + c)) besides one (chunk, N) block."""
    N = len(H)
    chunk = max(1, CHUNK_ELEMENTS // N)
    blocks, deg = [], H.new_zeros(N)                  # blocks: (rows, values, columns) of A; deg: d_ii = sum_j A_ij
    for m in (False, True):                           # rows of the visible, then of the infrared samples
        same, other = (is_r == m).nonzero()[:, 0], (is_r != m).nonzero()[:, 0]   # samples of this modality, the other
        for s in range(0, len(same), chunk):
            r = same[s:s + chunk]
            for S, columns in ((d(P[r], P[same]), same), (d(H[r], H[other]), other)):   # Eq. (6): A^{m,m}, A^{m,m'}
                values, j = near_neighbours(S, k)                                       # Eq. (8): T(., k)
                blocks.append((r, values, columns[j]))
                deg.index_add_(0, r, values.sum(1))
    ZW = torch.cat([model.sstn.W(pad(H[s:s + chunk], P[s:s + chunk], is_r[s:s + chunk], model.sht, model.spt))
                    for s in range(0, N, chunk)])                            # Eq. (5), (9): Z W, (N, c)
    Z_tilde = torch.zeros_like(ZW)
    for r, values, j in blocks:
        w = values * (deg[r, None] * deg[j]).rsqrt()                         # entries of D^-1/2 A D^-1/2, (n, k)
        Z_tilde.index_add_(0, r, torch.bmm(w[:, None, :], ZW[j])[:, 0])      # D^-1/2 A D^-1/2 Z W
    return model.sstn.feat(F.relu(Z_tilde))[1]                               # Eq. (10) sigma = ReLU; Eq. (11): T


def sstn_single_query(model, Hq, Pq, q_is_r, Hg, Pg, g_is_r, k):
    """Single-query SSTN (Sec. 4.5, Eq. 22): every query propagates with the gallery alone, over
    Z = [z^q; Z^G] and A = [[k A^{q,q}, T(A^{q,G}, k)], [k A^{G,q}, T(A^{G,G}, k)]].
    Queries Hq, Pq (Nq, c) all of one modality, the gallery Hg, Pg (Ng, c) all of the other; q_is_r (Nq,),
    g_is_r (Ng,) bool.

    Returns the distances (Nq, Ng) of the L2-normalised T^q and T^G (the gallery's T changes with the query).
    Gallery-only terms are computed once; queries go in chunks, memory O(chunk Ng c)."""
    Nq, Ng, c = len(Hq), len(Hg), model.c
    v_GG, c_GG = near_neighbours(d(Pg, Pg), k)                               # Eq. (22): T(A^{G,G}, k), (Ng, k)
    deg_GG = v_GG.sum(1)                                                     # (Ng,) gallery degrees without the query
    Y_G = model.sstn.W(pad(Hg, Pg, g_is_r, model.sht, model.spt))            # Z^G W, (Ng, c)
    Y_q = model.sstn.W(pad(Hq, Pq, q_is_r, model.sht, model.spt))            # z^q W, (Nq, c)
    Y_nb = Y_G[c_GG]                                                         # (Ng, k, c) Z W of each gallery neighbour
    a_qq = k * 1.0                                                           # Eq. (22): k A^{q,q} = k d(P^q, P^q) = k
    A_qG = d(Hq, Hg)                                                         # (Nq, Ng) A^{q,G}, as large as the result
    chunk = single_query_chunk(Ng, c, Hq.device)
    out = []
    for s in range(0, Nq, chunk):
        q = slice(s, s + chunk)
        a_qG = A_qG[q]                                                       # (n, Ng); A^{G,q} is its transpose
        v_q, c_q = near_neighbours(a_qG, k)                                  # Eq. (22): T(A^{q,G}, k), (n, k)
        s_q = (a_qq + v_q.sum(1)).rsqrt()                                    # (n,) query d_qq^-1/2
        s_G = (deg_GG + k * a_qG).rsqrt().t()                                # (Ng, n) gallery d_gg^-1/2 with the query
        # Eq. (10), query rows: k A^{q,q} z^q W and the k gallery neighbours, normalised by D^-1/2 on both sides
        Zt_q = a_qq * s_q[:, None] ** 2 * Y_q[q] + torch.bmm(
            (v_q * s_q[:, None] * s_G.t().gather(1, c_q))[:, None, :], Y_G[c_q])[:, 0]          # (n, c)
        # Eq. (10), gallery rows: the amplified query column k A^{G,q}, then the k gallery neighbours
        w_q = k * a_qG.t() * s_G * s_q                                       # Eq. (22): k A^{G,q}, normalised, (Ng, n)
        w_nb = s_G[:, :, None] * v_GG[:, None, :] * s_G[c_GG].transpose(1, 2)                     # (Ng, n, k)
        Zt_G = torch.baddbmm(w_q[:, :, None] * Y_q[q], w_nb, Y_nb).relu_()                       # (Ng, n, c)
        T_q = F.normalize(model.sstn.feat(F.relu(Zt_q))[1], dim=1)                                # Eq. (11), (n, c)
        T_G = model.sstn.feat(Zt_G.view(-1, c))[1].view(Ng, -1, c)                               # Eq. (11), (Ng, n, c)
        # || T_q/|T_q| - T_G/|T_G| ||, as sqrt(2 - 2 cos): no normalised copy of the (Ng, n, c) block
        cos = torch.einsum("gnc,nc->ng", T_G, T_q) / T_G.norm(dim=2).t().clamp(min=1e-12)        # (n, Ng)
        out.append((2 - 2 * cos).clamp(min=0).sqrt())
    return torch.cat(out)


def single_query_chunk(Ng, c, device):
    """Queries per chunk of `sstn_single_query`: each (Ng, n, c) block holds CHUNK_ELEMENTS elements, or on CUDA
    as many as lets its SINGLE_QUERY_LIVE float32 blocks fill half the free memory (if that is more). At SYSU-MM01
    multi-shot size (Ng = 3,010, c = 2048) CHUNK_ELEMENTS alone allows 2 queries, i.e. ~1,900 chunks a trial."""
    elements = CHUNK_ELEMENTS
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        elements = max(elements, free // (2 * SINGLE_QUERY_LIVE * 4))
    return max(1, elements // (Ng * c))


@torch.no_grad()
def distance(model, q_feat, g_feat, settings):
    """(Nq, Ng) test distances: Euclidean distances of the L2-normalised transferred features T (Sec. 3.4).

    q_feat, g_feat: `extract` rows [H | P | m]. Transductive: SSTN over all queries and the gallery together;
    single-query: Eq. 22, one query at a time. Without SSTN (--sht false --spt false): the shared features H."""
    check(settings)
    model.eval()
    Hq, Pq, q_is_r = split_features(model, q_feat.float())
    Hg, Pg, g_is_r = split_features(model, g_feat.float())
    if model.sstn is None:
        return torch.cdist(F.normalize(Hq, dim=1), F.normalize(Hg, dim=1))
    if settings.ssft_test == "transductive":
        T_all = sstn_transductive(model, torch.cat([Hq, Hg]), torch.cat([Pq, Pg]), torch.cat([q_is_r, g_is_r]),
                                  settings.k)
        T_all = F.normalize(T_all, dim=1)
        return torch.cdist(T_all[:len(Hq)], T_all[len(Hq):])
    if (q_is_r != q_is_r[0]).any() or (g_is_r == q_is_r[0]).any():
        raise common.UserError("--ssft-test single-query needs all queries of one modality and the gallery of the "
                               "other (Eq. 22); use --ssft-test transductive")
    return sstn_single_query(model, Hq, Pq, q_is_r, Hg, Pg, g_is_r, settings.k)


# ---------------------------------------------------------------- Fig. 3

def to_uint8(x):
    """(N, 3, H, W) ImageNet-normalised -> (N, H, W, 3) uint8."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    return (x.cpu().float() * std + mean).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def figures(model, settings, trainset, testset, out, num_images=6):
    """Fig. 3: test images of each modality (visible left, infrared right); rows = the input, its reconstruction
    from the shared features only, from the specific features only, from both (Eq. 16 with P^m or H^m set to 0).
    Written to out/reconstruction.png. Needs the decoders (--re true); without them nothing is drawn."""
    if not hasattr(model, "decoder"):
        return
    model.eval()
    device = next(model.parameters()).device
    columns = []
    for m in ("v", "r"):
        pool = testset.pools[m]
        idx = np.unique(np.linspace(0, len(pool) - 1, num_images).round().astype(int))
        x = next(data.test_batches(pool.images[idx], len(idx))).to(device)
        f = model.encode(**{f"x_{m}": x})
        P_map, H_map = f["Pmap"], f["S"]
        rows = [x] + [model.decoder[m](torch.cat([p, h], dim=1))           # Eq. (16)
                      for p, h in ((torch.zeros_like(P_map), H_map), (P_map, torch.zeros_like(H_map)), (P_map, H_map))]
        columns.append(np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0))
    height, label = columns[0].shape[0] // 4, 64
    gap = np.full((columns[0].shape[0], 8, 3), 255, dtype=np.uint8)
    picture = Image.fromarray(np.concatenate([np.full((len(gap), label, 3), 255, np.uint8), columns[0], gap, columns[1]],
                                             axis=1))
    draw = ImageDraw.Draw(picture)
    for row, text in enumerate(("input", "shared H", "specific P", "both")):
        draw.text((2, row * height + height // 2 - 5), text, fill="black")
    picture.save(out / "reconstruction.png")
