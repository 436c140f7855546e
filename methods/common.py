"""Plumbing every method needs in the same way, kept in one place.

- `UserError` (defined in data.py, the lowest layer): a problem the user can fix; reid.py prints it as one line
  and exits 2.
- `resnet`, `stem`, `stages`: torchvision ResNets with ImageNet weights and last stride 1, cut into
  the stages the papers name (stem = conv1, bn1, relu, maxpool; then layer1..layer4).
- `WarmupMultiStep`: the lr schedule of the community baseline (linear warm-up, then x gamma at milestones).
- `Run`: device, bf16 autocast, progress lines, atomic per-epoch checkpoints and exact resume.

Paper logic never lives here: a method file holds its paper's model, losses and loops.
"""
import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision

from data import UserError  # re-exported: the methods raise common.UserError (defined in data.py, the lowest layer)


# ---------------------------------------------------------------- backbone

ARCHS = ("resnet18", "resnet34", "resnet50")


def imagenet_state(arch):
    """torchvision's ImageNet weights for `arch`, from the local torch hub cache or downloaded."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # no network, proxy, interrupted download: all end the same way
        raise UserError(f"could not load ImageNet weights for {arch} ({type(e).__name__}: {e}); "
                        f"download {weights.url} to {cached}, or pass --pretrained PATH or --pretrained none") from None


def resnet(arch, pretrained="none", last_stride=1):
    """A torchvision ResNet with `pretrained` in {'imagenet', 'none', PATH} and the last stage's stride set."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch!r} is not supported; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "imagenet":
        net.load_state_dict(imagenet_state(arch))
    elif pretrained != "none":
        if not os.path.isfile(pretrained):
            raise UserError(f"--pretrained {pretrained!r}: no such file; give 'imagenet', 'none' or a .pth of {arch}")
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--pretrained {pretrained!r} cannot be read as a PyTorch file ({type(e).__name__}); "
                            f"give a .pth state dict of {arch}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"--pretrained {pretrained!r} holds a {type(state).__name__}, not a state dict of "
                            f"tensors; give a .pth state dict of {arch}")
        load_model_state(net, state, pretrained)
    if last_stride == 1:  # keep the layer4 resolution: (H/16, W/16) instead of (H/32, W/32)
        block = net.layer4[0]
        (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    return net


def stem(net):
    """conv1, bn1, relu, maxpool of a torchvision ResNet (the 'conv1 block' / 'stage 1' of the papers)."""
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)


def stages(net):
    """[layer1, layer2, layer3, layer4] of a torchvision ResNet."""
    return [net.layer1, net.layer2, net.layer3, net.layer4]


def channels(arch):
    """Output channels of layer1..layer4."""
    return [64, 128, 256, 512] if arch in ("resnet18", "resnet34") else [256, 512, 1024, 2048]


def load_model_state(model, state, source):
    """Strict load that names the first mismatched keys instead of a bare traceback."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{source} does not match the model: missing keys {missing[:3]}, unexpected keys "
                        f"{unexpected[:3]}, wrong shapes {wrong[:3]}; was it written by another --method, --arch "
                        f"or image size?")
    model.load_state_dict(state)


# ---------------------------------------------------------------- lr schedule

class WarmupMultiStep:
    """lr = base_lr * f(epoch): f = (e + 1) / warmup for e < warmup, then gamma^(number of milestones <= e).

    Set per epoch, as the community baseline does. Each param group keeps its own base lr."""

    def __init__(self, optimizer, milestones, gamma=0.1, warmup=10):
        self.optimizer, self.milestones, self.gamma, self.warmup = optimizer, list(milestones), gamma, warmup
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    def factor(self, epoch):
        if epoch < self.warmup:
            return (epoch + 1) / self.warmup
        return self.gamma ** sum(epoch >= m for m in self.milestones)

    def step_epoch(self, epoch):
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(epoch)

    def state_dict(self):
        return {"base_lrs": self.base_lrs}

    def load_state_dict(self, state):
        self.base_lrs = list(state["base_lrs"])


# ---------------------------------------------------------------- run: device, logging, checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a killed run never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk surfaces from torch.save as a RuntimeError
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short"
        try:
            why += f"; {shutil.disk_usage(path.parent).free / 2 ** 20:.1f} MB free there"
        except OSError:
            pass
        raise UserError(f"cannot write {path} ({why}); free disk space or give another --out") from None


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; give the model.pt of a finished run (OUT/model.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is not a checkpoint written "
                        f"by reid.py, or it is damaged") from None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """What a training loop needs from outside: the device, autocast, progress lines and checkpoints.

        for epoch in run.epochs("train", settings.epochs, model=model, optimizer=opt, schedule=sched, loader=loader):
            sched.step_epoch(epoch)
            for it, batch in run.batches(loader, epoch):
                ...
                run.log(epoch, it, {"L_id": l_id, "L_wrt": l_wrt}, lr=opt.param_groups[0]["lr"])

    `watch(name, feature, loss=None, margin=None)`, called each iteration for a feature (N, d) that a metric loss
    sees (and that loss's value and margin, e.g. batch-hard triplet), is the collapse alarm: at the end of each
    epoch `log` prints "WARNING collapse?" naming it when the loss stayed within 5 % of its margin on every
    iteration, or when the epoch's mean pairwise distance of the feature fell below 5 % of its mean norm.

    `epochs` restores every named object from OUT/<phase>.pt when it exists (resume) and saves them, with the
    RNG states and the phase's training seconds so far (`seconds`), atomically after every epoch. The loader is
    seeded per (seed, epoch, batch), so a resumed run ends with the same weights as an uninterrupted one.
    """

    def __init__(self, out, device, seed=0, amp=False, workers=0, log_every=20, say=print, max_its=None,
                 evaluate=None, eval_every=0):
        self.out, self.device, self.seed, self.amp = Path(out), torch.device(device), seed, amp
        self.evaluate, self.eval_every = evaluate, eval_every  # evaluate(phase, epoch, model) after such epochs
        self.workers, self.max_its = workers, max_its  # max_its: iterations per epoch cap (--smoke)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_every, self.say = log_every, say  # say(line): a plain line; log(...): the loss-term progress line
        self.meta = {}  # small JSON-able facts (a genotype, a gate file): in every checkpoint, given to build()
        self.seconds = {}  # phase -> wall seconds of its finished epochs, over every resume (kept in checkpoints)
        self._phase, self._num_epochs, self._its, self._timer = "", 0, 0, None

    def autocast(self):
        """bf16 autocast on CUDA with --amp; a no-op otherwise."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def checkpoint_path(self, phase):
        return self.out / f"{phase}.pt"

    def epochs(self, phase, num_epochs, **objects):
        path = self.checkpoint_path(phase)
        start = 0
        if path.exists():
            state = load_checkpoint(path)
            for name, obj in objects.items():
                if isinstance(obj, nn.Module):
                    load_model_state(obj, state[name], path)
                else:
                    obj.load_state_dict(state[name])
            set_rng_state(state["rng"])
            self.meta.update(state["meta"])
            self.seconds[phase] = state.get("seconds", 0.0)
            start = state["epoch"] + 1
            self.say(f"[{phase}] resumed from {path} after epoch {start}/{num_epochs}")
        self._phase, self._num_epochs = phase, num_epochs
        for epoch in range(start, num_epochs):
            t0 = time.time()
            yield epoch
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.time() - t0
            state = {name: obj.state_dict() for name, obj in objects.items()}
            state.update(epoch=epoch, rng=rng_state(), meta=dict(self.meta), seconds=self.seconds[phase])
            save_atomic(state, path)
            self.say(f"[{phase}] epoch {epoch + 1}/{num_epochs} done in {time.time() - t0:.1f}s")
            if self.evaluate and phase != "search" and (epoch + 1) % self.eval_every == 0 and "model" in objects:
                model = objects["model"]
                was_training = model.training
                self.evaluate(phase, epoch, model)  # --eval-every: a curve on --split val; no RNG is drawn
                model.train(was_training)

    def batches(self, loader, epoch):
        """Batches of `loader.epoch(epoch)` on the device; times the wait for data for the progress line."""
        self._its = min(len(loader), self.max_its or len(loader))
        self._timer = {"start": time.time(), "wait": 0.0, "images": 0}
        t = time.time()
        for it, batch in enumerate(loader.epoch(epoch)):
            if it == self._its:
                break
            self._timer["wait"] += time.time() - t
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self._timer["images"] += sum(v.shape[0] for k, v in batch.items() if k.startswith("x_"))
            yield it, batch
            t = time.time()

    def watch(self, name, feature, loss=None, margin=None):
        """Collapse alarm input for one iteration: feature (N, d) that a metric loss sees; loss and margin of it."""
        w = self.__dict__.setdefault("_watched", {}).setdefault(name, [0, True, 0.0, 0.0])  # n, near, dist, norm
        x = feature.detach().float()
        d = torch.cdist(x, x)
        w[0] += 1
        w[2] += float(d.sum() / max(len(x) * (len(x) - 1), 1))
        w[3] += float(x.norm(dim=1).mean())
        if loss is not None:
            w[1] = w[1] and abs(float(loss) - margin) <= 0.05 * abs(margin)

    def collapse_warnings(self):
        """The collapse alarm's lines for the iterations watched since the last call (see the class docstring)."""
        lines = []
        for name, (n, near, dist, norm) in self.__dict__.pop("_watched", {}).items():
            if near and n:
                lines.append(f"WARNING collapse? {name}: the loss stayed within 5% of its margin all epoch")
            if n and dist < 0.05 * norm:
                lines.append(f"WARNING collapse? {name}: mean pairwise distance {dist / n:.4f} < 5% of mean norm "
                             f"{norm / n:.4f}")
        return lines

    def log(self, epoch, it, losses, lr):
        """Progress line every `log_every` iterations: loss terms by their paper names, lr, img/s, data wait, ETA;
        at an epoch's last iteration, the collapse alarm's warnings (`watch`)."""
        if it + 1 == self._its:
            for line in self.collapse_warnings():
                self.say(f"[{self._phase}] ep {epoch + 1}/{self._num_epochs} {line}")
        if (it + 1) % self.log_every and it + 1 != self._its:
            return
        timer = self._timer
        elapsed = max(time.time() - timer["start"], 1e-9)
        done_its = it + 1
        left_its = (self._its - done_its) + (self._num_epochs - epoch - 1) * self._its
        eta = elapsed / done_its * left_its
        values = {k: float(v) for k, v in losses.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:  # stop here rather than train on for hours and report chance-level numbers
            raise UserError(f"[{self._phase}] epoch {epoch + 1} iteration {done_its}: {', '.join(bad)} is not finite, "
                            f"training diverged; lower the learning rate (--lr, now {lr:.2e}) or a loss weight")
        terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.say(f"[{self._phase}] ep {epoch + 1}/{self._num_epochs} it {done_its}/{self._its} {terms} "
                 f"lr {lr:.2e} | {timer['images'] / elapsed:.0f} img/s data-wait "
                 f"{100 * timer['wait'] / elapsed:.0f}% eta {int(eta // 60)}m{int(eta % 60):02d}s")
