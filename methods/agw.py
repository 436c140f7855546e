"""AGW: the cross-modality baseline of Ye et al., "Deep Learning for Person Re-identification: A Survey and
Outlook", TPAMI 2021 (the 'AGW' rows that NFS, CM-NAS, cm-SSFT, RFM and MCE compare against).

Implements, as the survey describes it for visible-infrared Re-ID:
- a two-stream ResNet-50: modality-specific stem (conv1, bn1, relu, maxpool), shared layer1-4, last stride 1;
- non-local attention blocks after layer2 blocks 2-3 and layer3 blocks 3-5 (0-indexed);
- generalised-mean (GeM) pooling with p = 3, then a BNNeck (BatchNorm1d, bias frozen) and a bias-free classifier;
- L = L_id + L_wrt: cross-entropy on the BN feature, weighted-regularisation triplet on the pooled feature;
- test feature: the L2-normalised BN feature.

Deviations:
- With a backbone of fewer blocks than ResNet-50 (resnet18/34, for CPU runs), the non-local blocks go after the
  last min(n, blocks) blocks of layer2 and layer3.
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
    epochs: int = 80                     # AGW: 80 epochs
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
    erasing: float = 0.5                 # AGW: random erasing probability


# CPU recipe for the built-in synthetic world: a small network trained from scratch.
SYNTHETIC = dict(arch="resnet18", pretrained="none", height=128, width=64, epochs=10, lr=0.1, backbone_lr=0.05,
                 warmup=1, milestones=(6, 9))
SMOKE = dict(arch="resnet18", pretrained="none", height=64, width=32, epochs=1, P=4, K=2, lr=0.01, backbone_lr=0.01,
             warmup=1, milestones=())


class NonLocal(nn.Module):
    """Non-local block (dot-product form): z = W_z(softmax-free affinity(theta, phi) g) + x, W_z's BN starts at 0."""

    def __init__(self, c, reduction=2):
        super().__init__()
        ci = c // reduction
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


def with_non_local(stage, c, num):
    """`stage` with a non-local block after each of its last `num` residual blocks."""
    blocks = list(stage)
    first = len(blocks) - min(num, len(blocks))  # Deviation: fewer blocks than ResNet-50 -> last ones
    out = []
    for i, block in enumerate(blocks):
        out.append(block)
        if i >= first:
            out.append(NonLocal(c))
    return nn.Sequential(*out)


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
            layer2, layer3 = with_non_local(layer2, c[1], 2), with_non_local(layer3, c[2], 3)
        self.shared = nn.Sequential(layer1, layer2, layer3, layer4)
        self.gem_p = settings.gem_p
        self.bnneck = nn.BatchNorm1d(c[3])
        self.bnneck.bias.requires_grad_(False)                             # BNNeck: no shift
        self.classifier = nn.Linear(c[3], num_classes, bias=False)

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


def pairwise_distance(x, y):
    """Euclidean distances (N, M) between rows of x (N, d) and y (M, d)."""
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.t()
    return d2.clamp(min=1e-12).sqrt()


def L_wrt(f, y):
    """Weighted-regularisation triplet (AGW): softmax-weighted positive and negative distances, soft margin.

    For anchor i: d_p = sum_j w_ij d_ij over positives with w_ij ∝ exp(d_ij); d_n = sum_k w_ik d_ik over negatives
    with w_ik ∝ exp(-d_ik); loss = log(1 + exp(d_p - d_n)), averaged over anchors."""
    d = pairwise_distance(f, f)                                      # (N, N)
    pos = (y[:, None] == y[None, :]).float()
    neg = 1.0 - pos
    w_p = torch.softmax(d.masked_fill(pos == 0, float("-inf")), dim=1)
    w_n = torch.softmax((-d).masked_fill(neg == 0, float("-inf")), dim=1)
    d_p = (w_p * d).sum(1)
    d_n = (w_n * d).sum(1)
    return F.softplus(d_p - d_n).mean()


def train(settings, trainset, run):
    model = build(settings, trainset.num_classes).to(run.device)
    augment = data.Augment(settings.height, settings.width, erasing=settings.erasing)
    loader = data.train_loader(trainset, settings.P, settings.K, run.seed, augment, workers=run.workers)
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
        model.train()
        for it, batch in run.batches(loader, epoch):
            y = torch.cat([batch["y_v"], batch["y_r"]])              # (2PK,) visible first, then infrared
            with run.autocast():
                f, logits = model(batch["x_v"], batch["x_r"])
            l_id = F.cross_entropy(logits.float(), y)
            l_wrt = L_wrt(f.float(), y)
            loss = l_id + l_wrt
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(epoch, it, {"L_id": l_id.detach(), "L_wrt": l_wrt.detach()}, optimizer.param_groups[1]["lr"])
    return model


@torch.no_grad()
def extract(model, x, modality):
    """Test feature: the L2-normalised BN feature, (B, C)."""
    return F.normalize(model.features(x, modality)[1], dim=1)
