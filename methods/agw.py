"""AGW: the cross-modality baseline of Ye et al., "Deep Learning for Person Re-identification: A Survey and
Outlook", TPAMI 2021 (the 'AGW' rows that NFS, CM-NAS, cm-SSFT, RFM and MCE compare against), as the survey
describes it for visible-infrared Re-ID.

Implements:
- a two-stream ResNet-50: modality-specific stem (conv1, bn1, relu, maxpool), shared layer1-4, last stride 1;
- non-local attention blocks after layer2 blocks 2-3 and layer3 blocks 3-5 (0-indexed);
- generalised-mean (GeM) pooling with p = 3, then a BNNeck (BatchNorm1d, bias frozen) and a bias-free classifier;
- L = L_id + L_wrt: cross-entropy on the BN feature, weighted-regularisation triplet on the pooled feature;
- test feature: the L2-normalised BN feature.

Readings and choices:
- Non-local inner width: the survey does not state it; the community code that produced every quoted AGW number
  squeezes C channels to 1 (Cross-Modal-Re-ID-baseline model.py:21, `reduc_ratio//reduc_ratio`), so that is the
  default (`non_local_inner="one"`); `--non-local-inner half` gives the C/2 of Wang et al. (2018).
- BNNeck weight ~ N(1, 0.01), classifier ~ N(0, 0.001), as the community code (model.py:80-89, 177-178).
- Random erasing off: the community AGW trains without it (train.py:114-121); only CAJ adds it (default off).
- Sampler: identities without replacement in a batch (as the community); images without replacement and
  max(#v, #r) // (P K) batches by default, so that no batch repeats an image; `--sampler community` draws each
  identity's K images with replacement and runs int(N / (P K)) + 1 batches (utils.py:60-95).
- Epochs: 80 (0..79); the community loop runs 81 (0..80, train.py:362); the release recipe uses 81.
- Model selection: the final-epoch model (never selected on the test set); the community keeps the checkpoint of
  best trial-0 test rank-1 (train.py:384-400).

Deviations:
- With a backbone of fewer blocks than ResNet-50 (resnet18/34, for CPU runs), the non-local blocks go after the
  last min(n, blocks) blocks of layer2 and layer3.

Released code differs (mangye16/Cross-Modal-Re-ID-baseline at e817a26; `--recipe release` sets these):

| setting | paper (default) | release | released file:line |
|---|---|---|---|
| epochs | 80 | 81 (0..80) | train.py:362 |
| sampler | without-replacement, N // (P K) batches | community: images with replacement, int(N/(P K)) + 1 batches | utils.py:73-78 |
| model selection | final epoch | best trial-0 test rank-1 (not reproduced) | train.py:384-400 |
| resize kernel | bilinear (data.py) | LANCZOS (not reproduced) | pre_process_sysu.py:48-56 |
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from methods import common


@dataclass
class Settings:
    arch: str = "resnet50"               # AGW: ResNet-50 backbone
    pretrained: str = "imagenet"         # AGW: ImageNet initialisation
    height: int = 288                    # AGW cross-modality setting: 288 x 144 input
    width: int = 144
    epochs: int = 80                     # AGW: 80 epochs (the community loop runs 81, train.py:362)
    P: int = 8                           # AGW: 8 identities per batch
    K: int = 4                           #   x 4 visible + 4 infrared images each
    lr: float = 0.1                      # AGW: SGD lr 0.1 for BNNeck and classifier
    backbone_lr: float = 0.01            # AGW: 0.01 for the pretrained backbone
    momentum: float = 0.9                # AGW: SGD momentum 0.9 (Nesterov)
    weight_decay: float = 5e-4           # AGW: weight decay 5e-4
    warmup: int = 10                     # AGW: linear warm-up over the first 10 epochs
    milestones: tuple = (20, 50)         # AGW: lr x0.1 at epoch 20, x0.01 at epoch 50
    gem_p: float = 3.0                   # AGW: GeM pooling, p = 3
    non_local: bool = True               # AGW: non-local attention on
    non_local_inner: str = "one"         # survey silent; community 1 channel (model.py:21); "half": C/2
    erasing: float = 0.0                 # community AGW: no random erasing (train.py:114-121)
    sampler: str = "without-replacement"  # project sampler (data.py); release: "community" (utils.py:60-95)


CHOICES = {"non_local_inner": ("one", "half"), "sampler": data.SAMPLERS}

# --recipe release: mangye16/Cross-Modal-Re-ID-baseline at e817a26 (file:line of each value).
RELEASE = dict(
    arch="resnet50",                     # train.py:25 --arch resnet50
    pretrained="imagenet",               # model.py:4, resnet.py resnet50(pretrained=True)
    height=288, width=144,               # train.py:40-43 --img_h 288 --img_w 144
    epochs=81,                           # train.py:362 range(start_epoch, 81 - start_epoch)
    P=8, K=4,                            # train.py:44 --batch-size 8, train.py:52 --num_pos 4
    lr=0.1, backbone_lr=0.01,            # train.py:23 --lr 0.1; train.py:212 0.1 * lr for the backbone
    momentum=0.9, weight_decay=5e-4,     # train.py:215 SGD momentum 0.9, Nesterov, wd 5e-4
    warmup=10, milestones=(20, 50),      # train.py:218-227
    gem_p=3.0,                           # model.py:234 p = 3.0
    non_local=True,                      # train.py: --method agw builds embed_net(no_local='on')
    non_local_inner="one",               # model.py:21 reduc_ratio // reduc_ratio
    erasing=0.0,                         # train.py:114-121 (no RandomErasing)
    sampler="community",                 # utils.py:73-78 np.random.choice(pos, num_pos), int(N/(P K)) + 1
)


# CPU recipe for the built-in synthetic world: a small network trained from scratch. Image size chosen on
# --split val (python reid.py --method agw --split val --height H --width W, seed 0, one thread each, before the
# 1-channel non-local and erasing 0 became the defaults): 96 x 48 gave all-single val rank-1 23.4 / mAP 30.5 and
# training fit 23.5, 128 x 64 gave 21.7 / 29.0 and 16.0, at 0.62x the training time (622 s against 1012 s).
SYNTHETIC = dict(arch="resnet18", pretrained="none", height=96, width=48, epochs=10, lr=0.1, backbone_lr=0.05,
                 warmup=1, milestones=(6, 9))
SMOKE = dict(arch="resnet18", pretrained="none", height=64, width=32, epochs=1, P=4, K=2, lr=0.01, backbone_lr=0.01,
             warmup=1, milestones=())


# Original; copied verbatim into mce.py, test_all.TestCopies keeps the copies equal
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


# Original; copied verbatim into mce.py, test_all.TestCopies keeps the copies equal
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


# Original; copied verbatim into mce.py, test_all.TestCopies keeps the copies equal
def gem(x, p):
    """Generalised-mean pooling over H, W: (mean x^p)^(1/p); x >= 0 after ReLU. (B, C, H, W) -> (B, C)."""
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class AGW(nn.Module):
    def __init__(self, settings, num_classes):
        super().__init__()
        net_v = common.resnet(settings.arch, settings.pretrained)
        net_r = common.resnet(settings.arch, settings.pretrained)
        self.stem_v, self.stem_r = common.stem(net_v), common.stem(net_r)  # modality-specific stems
        layer1, layer2, layer3, layer4 = common.stages(net_v)              # shared layer1-4
        c = common.channels(settings.arch)
        if settings.non_local:
            inner = settings.non_local_inner
            layer2, layer3 = with_non_local(layer2, c[1], 2, inner), with_non_local(layer3, c[2], 3, inner)
        self.shared = nn.Sequential(layer1, layer2, layer3, layer4)
        self.gem_p = settings.gem_p
        self.bnneck = nn.BatchNorm1d(c[3])
        self.bnneck.bias.requires_grad_(False)                             # BNNeck: no shift
        self.classifier = nn.Linear(c[3], num_classes, bias=False)
        nn.init.normal_(self.bnneck.weight, 1.0, 0.01)                     # community model.py:80-82
        nn.init.zeros_(self.bnneck.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.001)                # community model.py:84-87

    def features(self, x, modality):
        """(B, 3, H, W) -> pooled feature f (B, C) and BN feature (B, C)."""
        stem = self.stem_v if modality == "v" else self.stem_r
        f = gem(self.shared(stem(x)), self.gem_p)
        return f, self.bnneck(f)

    def forward(self, x_v, x_r):
        """Training forward: (B, 3, H, W) each -> f (2B, C), logits (2B, classes); visible first, then infrared."""
        x = torch.cat([self.stem_v(x_v), self.stem_r(x_r)])
        f = gem(self.shared(x), self.gem_p)
        return f, self.classifier(self.bnneck(f))


def build(settings, num_classes, meta=None):
    return AGW(settings, num_classes)


# Original; copied verbatim into nfs.py, ssft.py and mce.py, test_all.TestCopies keeps the copies equal
def pairwise_distance(x, y):
    """Euclidean distances (N, M) between rows of x (N, d) and y (M, d)."""
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()
    return d2.clamp(min=1e-12).sqrt()


# Original; copied verbatim into nfs.py, test_all.TestCopies keeps the copies equal
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


def check(settings):
    for name, allowed in CHOICES.items():
        if getattr(settings, name) not in allowed:
            raise common.UserError(f"--{name.replace('_', '-')} {getattr(settings, name)!r} is not one of "
                                   f"{', '.join(allowed)}")


def objective(model, batch, settings):
    """The AGW loss on one batch: L = L_id + L_wrt, L_id the cross-entropy of the classifier on the BN feature,
    L_wrt the weighted-regularisation triplet on the pooled feature f of both modalities -> (L, {name: value}).
    `settings` is unused (AGW's loss has no weight or switch); it keeps the signature of every method's objective."""
    y = torch.cat([batch["y_v"], batch["y_r"]])                      # (2PK,) visible first, then infrared
    f, logits = model(batch["x_v"], batch["x_r"])                    # (2PK, C), (2PK, classes)
    with torch.autocast(y.device.type, enabled=False):               # the losses in float32, under --amp too
        terms = {"L_id": F.cross_entropy(logits.float(), y), "L_wrt": L_wrt(f.float(), y)}
    return terms["L_id"] + terms["L_wrt"], terms


def train(settings, trainset, run):
    check(settings)
    model = build(settings, trainset.num_classes).to(run.device).train()  # all epochs (run.evaluate restores it)
    augment = data.Augment(settings.height, settings.width, erasing=settings.erasing)
    loader = data.train_loader(trainset, settings.P, settings.K, run.seed, augment, workers=run.workers,
                               sampler=settings.sampler)
    head = list(model.bnneck.parameters()) + list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.SGD([{"params": backbone, "lr": settings.backbone_lr},
                                 {"params": [p for p in head if p.requires_grad], "lr": settings.lr}],
                                momentum=settings.momentum, weight_decay=settings.weight_decay, nesterov=True)
    schedule = common.WarmupMultiStep(optimizer, settings.milestones, warmup=settings.warmup)
    for epoch in run.epochs("train", settings.epochs, model=model, optimizer=optimizer, schedule=schedule,
                            loader=loader):
        schedule.step_epoch(epoch)
        for it, batch in run.batches(loader, epoch):
            with run.autocast():
                loss, terms = objective(model, batch, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(epoch, it, {k: v.detach() for k, v in terms.items()}, optimizer.param_groups[1]["lr"])
    return model


@torch.no_grad()
def extract(model, x, modality):
    """Test feature: the L2-normalised BN feature, (B, C)."""
    return F.normalize(model.features(x, modality)[1], dim=1)
