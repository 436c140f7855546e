"""Train and evaluate one VI-ReID method:

    python reid.py --method rfm                                     # built-in synthetic world, CPU recipe
    python reid.py --method agw --dataset sysu --data-root DIR      # the paper's recipe on SYSU-MM01
    python reid.py --method agw --dataset regdb --data-root DIR --trial all
    python reid.py --method nfs --smoke                             # install check: well under a minute on a CPU
    python reid.py --method rfm --recipe release                    # the authors' released code's values
    python reid.py --method rfm --split val --seeds 0 1 2           # tune on validation ids, spread over seeds
    python reid.py --resume runs/agw-synthetic                      # continue a killed run
    python reid.py --eval-only --checkpoint runs/agw-synthetic/model.pt
    python reid.py --report runs/*                                  # the README's results table, in Markdown

Every field of the method's Settings dataclass is an option (--lr 0.01, --milestones 40 70, --non-local false).
Where a setting's value comes from, lowest precedence first (args.json records the source of every value):

    paper      the Settings defaults: the paper's recipe (where the paper is silent, the release's, cited)
    release    the method's RELEASE dict, with --recipe release (RELEASE_REGDB on top of it for --dataset regdb)
    synthetic  the method's SYNTHETIC dict, on the built-in synthetic world (the CPU budget; chosen on --split val)
    smoke      the method's SMOKE dict, with --smoke
    flag       an option written on the command line

This file only dispatches: the method files hold every piece of paper logic.
"""
import argparse
import dataclasses
import importlib
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import eval as evaluation
import synthetic
from methods import METHODS, common
from data import UserError

KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
RECIPES = ("paper", "release")
FIT_MAX_QUERIES = 3000  # training fit: at most this many infrared training images query (evenly spaced)
FIT_KEYS = ("rank1", "mAP", "within_v_rank1", "within_r_rank1", "cos_same", "cos_other")  # averaged over seeds
SMOKE_ITERS = 2  # iterations per epoch in --smoke runs
SMOKE_WORLDS = {  # the tiny synthetic worlds of --smoke runs and of the tests
    "sysu": dict(num_ids=16, num_test=6, images_per_cam=2, height=64, width=32),
    "regdb": dict(num_ids=12, images_per_id=3, height=64, width=32),
    "llcm": dict(num_ids=16, num_test=6, images_per_cam=2, height=64, width=32),
}
LAYOUTS = {"sysu": "exp/ and cam1..cam6/", "regdb": "idx/, Visible/ and Thermal/",
           "llcm": "idx/, test_vis/ and test_nir/"}


# ---------------------------------------------------------------- command line

def str2bool(text):
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message says what is wrong
        self.exit(2, f"reid.py: error: {message} (see python reid.py --help)\n")


def common_parser(add_help=True):
    """The options every method shares. The first pass (add_help=False) only finds --method, so that --help,
    answered by the second, full parser, lists the chosen method's settings too."""
    p = Parser(description="Visible-infrared person re-identification: train and evaluate.",
               allow_abbrev=False, add_help=add_help)
    p.add_argument("--method", choices=METHODS, help="the paper to run")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "sysu", "regdb", "llcm"),
                   help="synthetic (default: a generated world in the SYSU-MM01 layout), sysu, regdb or llcm")
    p.add_argument("--data-root", help="dataset directory (the one holding exp/ for SYSU-MM01, idx/ for RegDB "
                                       "and LLCM); with --smoke and no --data-root, a tiny synthetic world in "
                                       "the dataset's layout")
    p.add_argument("--trial", default="1", help="RegDB trial 1..10, or 'all' to train and test all ten in turn")
    p.add_argument("--recipe", default="paper", choices=RECIPES,
                   help="paper (default: the paper's values) or release (the authors' released code's values)")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="test (default), or val: train without the validation ids and evaluate them (recipe choices)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="train and evaluate once per seed (OUT/seed-S/), then report mean ± std over seeds")
    p.add_argument("--report", nargs="+", metavar="PATH",
                   help="print the Markdown results table of these run directories (or results.json files); no run")
    p.add_argument("--smoke", action="store_true", help="tiny world, small images, a few iterations: checks an install")
    p.add_argument("--out", help="output directory (default runs/<method>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT after its last finished epoch")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint without training")
    p.add_argument("--checkpoint", help="model.pt written by a finished run (with --eval-only)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast on a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader processes (0: in the main process)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "vireid"),
                   help="where the synthetic world and the decoded-image caches live")
    p.add_argument("--log-every", type=int, default=20, help="iterations between progress lines")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="with --split val: also evaluate every N epochs (the best-epoch minus final-epoch gap)")
    return p


def recipe_layers(method, args):
    """[(source, overrides), ...] above the paper defaults, lowest precedence first (see the module docstring)."""
    layers = []
    if args.recipe == "release":
        if getattr(method, "RELEASE", None) is None:
            raise UserError(f"--recipe release: no code was published for {method.__name__.split('.')[-1]}, so it "
                            f"has no released recipe; use --recipe paper")
        layers.append(("release", method.RELEASE))
        per_dataset = getattr(method, f"RELEASE_{args.dataset.upper()}", None)
        if per_dataset:
            layers.append(("release", per_dataset))
    if args.dataset == "synthetic":
        layers.append(("synthetic", method.SYNTHETIC))
    if args.smoke:
        layers.append(("smoke", method.SMOKE))
    return layers


def add_settings_options(parser, method):
    """One --field-name option per Settings field, default None so explicit flags can be told apart. The help
    shows the paper's value and, where they differ, the release's and the synthetic world's."""
    group = parser.add_argument_group("method settings (paper: the default; release: with --recipe release; "
                                      "synthetic: on the built-in synthetic world, when no --dataset is given)")
    release = getattr(method, "RELEASE", None) or {}
    choices = getattr(method, "CHOICES", {})

    def show(v):
        return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)

    for f in dataclasses.fields(method.Settings):
        flag = "--" + f.name.replace("_", "-")
        text = f"paper {show(f.default)}"
        for name, layer in (("release", release), ("synthetic", method.SYNTHETIC)):
            if f.name in layer and layer[f.name] != f.default:
                text += f"; {name} {show(layer[f.name])}"
        if isinstance(f.default, bool):
            group.add_argument(flag, type=str2bool, metavar="true|false", help=text)
        elif isinstance(f.default, tuple):
            element = type(f.default[0]) if f.default else int
            group.add_argument(flag, type=element, nargs="*", help=text)
        else:
            group.add_argument(flag, type=type(f.default), choices=choices.get(f.name), help=text)


def resolve_settings(method, args, argv_given, trained=None):
    """(Settings, {field: source}): paper defaults < release < synthetic < smoke < explicit flags. With
    --eval-only, the checkpoint's settings (`trained`) take the place of the first four: explicit flags still
    win (a test-time choice such as --ssft-test single-query; a flag that changes the network fails when the
    weights load)."""
    values = dataclasses.asdict(method.Settings())
    sources = dict.fromkeys(values, "paper")
    layers = [("checkpoint", trained)] if trained is not None else recipe_layers(method, args)
    for source, layer in layers:
        unknown = sorted(set(layer) - set(values))
        if unknown:
            raise UserError(f"{source} settings name {unknown[:5]}, which {method.__name__} does not have; "
                            f"was the checkpoint written by another version of this code?")
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    for name in values:
        given = getattr(args, name)
        if given is not None and name in argv_given:
            values[name] = tuple(given) if isinstance(values[name], tuple) else given
            sources[name] = "flag"
    return method.Settings(**values), sources


def flags_given(argv):
    """Names of the options written on the command line (--lr 0.1 or --lr=0.1)."""
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


# ---------------------------------------------------------------- data

def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def layout_of(root):
    """The dataset whose layout `root` holds, or None."""
    root = Path(root)
    if (root / "exp").is_dir() and (root / "cam3").is_dir():
        return "sysu"
    if (root / "idx").is_dir() and (root / "test_vis").is_dir():
        return "llcm"
    if (root / "idx").is_dir() and (root / "Thermal").is_dir():
        return "regdb"
    return None


def check_root(dataset, root, smoke=False):
    if not root:
        if smoke:
            return None  # --smoke without data: the synthetic world in this layout
        raise UserError(f"--dataset {dataset} needs --data-root DIR (the directory holding {LAYOUTS[dataset]})")
    found = layout_of(root)
    if found and found != dataset:
        raise UserError(f"--data-root {root} holds {found} ({LAYOUTS[found]}), not {dataset}; use --dataset {found}")
    return Path(root)


def trials_of(args):
    if args.dataset != "regdb":
        return [None]
    if args.trial == "all":
        return list(range(1, 11))
    if not args.trial.isdigit() or not 1 <= int(args.trial) <= 10:
        raise UserError(f"--trial {args.trial!r}: RegDB has trials 1..10; give one of them or 'all'")
    return [int(args.trial)]


def load_data(args, settings, trial, log):
    """(TrainSet, TestSet) of the chosen dataset at the method's image size; with --split val the TestSet holds
    the validation identities instead of the test ones."""
    cache = Path(args.cache_dir)
    if args.dataset == "synthetic":
        root = synthetic.ensure_world(cache, "sysu", **(SMOKE_WORLDS["sysu"] if args.smoke else {}), log=log)
        return data.load_sysu(root, settings.height, settings.width, cache, log=log, expect_published=False,
                              split=args.split)
    root = check_root(args.dataset, args.data_root, args.smoke)
    published = root is not None
    if root is None:
        log(f"--smoke without --data-root: a tiny synthetic world in the {args.dataset} layout")
        root = synthetic.ensure_world(cache, args.dataset, **SMOKE_WORLDS[args.dataset], log=log)
    size = settings.height, settings.width
    if args.dataset == "sysu":
        return data.load_sysu(root, *size, cache, log=log, split=args.split, expect_published=published)
    if args.dataset == "llcm":
        return data.load_llcm(root, *size, cache, log=log, split=args.split, expect_published=published)
    return data.load_regdb(root, trial, *size, cache, log=log, split=args.split, expect_published=published)


# ---------------------------------------------------------------- testing

@torch.no_grad()
def extract_images(method, model, images, modality, device, batch_size=128):
    """(N, d) test features of uint8 images (N, H, W, 3)."""
    model.eval()
    return torch.cat([method.extract(model, x.to(device), modality).float().cpu()
                      for x in data.test_batches(images, batch_size)])


def extract_pools(method, model, testset, device):
    """Test features of every pool image, extracted once: {'v': (Nv, d), 'r': (Nr, d)}."""
    return {m: extract_images(method, model, pool.images, m, device) for m, pool in testset.pools.items()}


def distance_fn(method, model, settings):
    if hasattr(method, "distance"):
        return lambda q, g: method.distance(model, q, g, settings)
    return lambda q, g: torch.cdist(F.normalize(q, dim=1), F.normalize(g, dim=1))


def cross_camera_rank1(feat, labels, cams, q_idx):
    """Rank-1 (%) of the rows q_idx of feat (N, d) against the rows of the other cameras of the same set, Euclidean
    distance of L2-normalised features. One camera's images are near-duplicates of one tracklet: an untrained MCE
    network (SYNTHETIC size, the 75 --split val training ids) matched them at rank-1 89.5 (visible) and 95.5
    (infrared), against 9.6 and 18.9 across cameras (chance 1.3); so they are left out. Queries whose identity has
    no image in another camera are skipped; None when none is left (one camera per modality, as on RegDB).
    labels, cams: (N,)."""
    f, q = F.normalize(feat.float(), dim=1), torch.from_numpy(q_idx)
    y, c = torch.from_numpy(labels), torch.from_numpy(cams)
    other = c[q][:, None] != c[None, :]                                            # (Q, N) another camera
    d = torch.cdist(f[q], f).masked_fill(~other, float("inf"))                     # (Q, N)
    valid = (other & (y[q][:, None] == y[None, :])).any(1)                         # (Q,) a match exists
    if not valid.any():
        return None
    return 100 * float((y[d.argmin(1)] == y[q])[valid].float().mean())


def centroid_cosines(f_v, y_v, f_r, y_r):
    """Mean cosine between the visible and the infrared class centroid (the mean of L2-normalised features,
    normalised) of the same identity, and of two different identities: (same, other), over the identities
    present in both modalities. Aligned modalities: same far above other; modality-specific codes: same ~ other."""
    ids = np.intersect1d(y_v, y_r)

    def centroids(f, y):
        f = F.normalize(f.float(), dim=1)
        return F.normalize(torch.stack([f[torch.from_numpy(y == k)].mean(0) for k in ids]), dim=1)   # (n, d)
    cos = centroids(f_v, y_v) @ centroids(f_r, y_r).t()                            # (n, n)
    n = len(ids)
    same = float(cos.diagonal().mean())
    other = float((cos.sum() - cos.diagonal().sum()) / (n * n - n)) if n > 1 else float("nan")
    return same, other


def training_fit(method, model, settings, trainset, device):
    """How well the final model fits its own training identities: infrared training images (at most
    FIT_MAX_QUERIES, evenly spaced) query all visible training images, no camera rule, the test-time distance.
    A model that learned an embedding scores far above chance (about 1 / num_classes); a collapsed one does not.
    Beside it, what tells an unlearned model from one whose modalities are not aligned: the rank-1 within each
    modality across its cameras (cross_camera_rank1; at most FIT_MAX_QUERIES queries each) and the class-centroid
    cosines of the two modalities (centroid_cosines)."""
    def spaced(n):
        return np.unique(np.linspace(0, n - 1, min(n, FIT_MAX_QUERIES)).astype(np.int64))
    q_idx = spaced(len(trainset.r))
    r_feat = extract_images(method, model, trainset.r.images, "r", device)
    g_feat = extract_images(method, model, trainset.v.images, "v", device)
    dist = distance_fn(method, model, settings)(r_feat[q_idx].to(device), g_feat.to(device)).float().cpu()
    q = trainset.r.subset(q_idx)
    r = evaluation.evaluate(dist, q.labels, trainset.v.labels, q.cams, trainset.v.cams, protocol="regdb",
                            max_rank=1)
    same, other = centroid_cosines(g_feat.cpu(), trainset.v.labels, r_feat.cpu(), trainset.r.labels)
    return {"rank1": 100 * float(r["cmc"][0]), "mAP": 100 * float(r["mAP"]), "queries": len(q),
            "ids": int(trainset.num_classes), "chance_rank1": 100 / trainset.num_classes,
            "within_v_rank1": cross_camera_rank1(g_feat.cpu(), trainset.v.labels, trainset.v.cams,
                                                 spaced(len(trainset.v))),
            "within_r_rank1": cross_camera_rank1(r_feat.cpu(), trainset.r.labels, trainset.r.cams, q_idx),
            "cos_same": same, "cos_other": other}


def fitted_here(checkpoint, args, trainset):
    """Whether an --eval-only checkpoint was trained on this training set (same dataset, split and number of
    identities), so that its training fit can be measured again. RegDB checkpoints do not record their trial."""
    return (checkpoint.get("dataset", "synthetic") == args.dataset != "regdb"
            and checkpoint.get("split", "test") == args.split and checkpoint["num_classes"] == trainset.num_classes)


def fit_line(fit):
    """The training fit in one line (a seed's or the mean over seeds)."""
    within = ", ".join(f"{name} {'n/a (one camera)' if fit.get(key) is None else format(fit[key], '.1f')}"
                       for name, key in (("visible", "within_v_rank1"), ("infrared", "within_r_rank1")))
    return (f"rank-1 {fit['rank1']:.1f}, mAP {fit['mAP']:.1f} (chance {fit['chance_rank1']:.1f}); within a modality "
            f"across cameras, rank-1 {within}; visible-infrared class-centroid cosine: same identity "
            f"{fit['cos_same']:.3f}, other identities {fit['cos_other']:.3f}")


def test(method, model, settings, testset, device, out, log):
    features = extract_pools(method, model, testset, device)
    dist = distance_fn(method, model, settings)
    results = evaluation.run_protocol(features, testset, dist, device)
    common.save_atomic({"features": features,
                        "pids": {m: torch.from_numpy(p.labels) for m, p in testset.pools.items()},
                        "cams": {m: torch.from_numpy(p.cams) for m, p in testset.pools.items()},
                        "files": {m: p.files for m, p in testset.pools.items()}}, out / "features.pt")
    for protocol in testset.protocols[:2]:
        q_idx, g_idx = protocol.trials[0]
        q, g = testset.pools[protocol.query].subset(q_idx), testset.pools[protocol.gallery].subset(g_idx)
        d = dist(features[protocol.query][q_idx].to(device), features[protocol.gallery][g_idx].to(device)).cpu()
        cams = dict(q_cams=q.cams, g_cams=g.cams) if protocol.kind == "sysu" else {}  # same-room rule
        evaluation.ranked_list_picture(out / f"ranked-{protocol.name}.png", q.images, g.images, d, q.labels,
                                       g.labels, **cams)
    return results


def average_trials(per_trial):
    """RegDB --trial all: mean and std over the trained trials of each setting's numbers."""
    out = {}
    for name in per_trial[0]:
        out[name] = {}
        for key in KEYS:
            values = [r[name][key] for r in per_trial]
            out[name][key] = float(np.mean(values))
            out[name][key + "_std"] = float(np.std(values))
        out[name]["trials"] = [r[name] for r in per_trial]
    return out


def mean_std(values):
    """(mean, sample standard deviation with n - 1; 0 for one value) of a list of numbers."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def aggregate_seeds(per_seed, keys=KEYS):
    """--seeds: {setting: {key: mean over seeds, key_std: sample std over seeds, 'per_seed': {key: [...]}}}
    from the per-seed results (each per-seed value is already the mean over that seed's gallery trials)."""
    out = {}
    for name in per_seed[0]:
        out[name] = {"per_seed": {}}
        for key in keys:
            values = [r[name][key] for r in per_seed]
            out[name][key], out[name][key + "_std"] = mean_std(values)
            out[name]["per_seed"][key] = values
    return out


def aggregate_fit(fits):
    out = {"per_seed": fits}
    for key in FIT_KEYS:
        if all(f[key] is not None for f in fits):  # within-modality figures are None on RegDB (one camera)
            out[key], out[key + "_std"] = mean_std([f[key] for f in fits])
    out["chance_rank1"] = fits[0]["chance_rank1"]
    return out


def table(results):
    lines = [f"{'setting':<22}" + "".join(f"{k:>14}" for k in KEYS)]
    for name, r in results.items():
        lines.append(f"{name:<22}" + "".join(f"{r[k]:>8.2f} ±{r[k + '_std']:>4.1f}" for k in KEYS))
    return "\n".join(lines)


def machine(device):
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device), "threads": torch.get_num_threads()}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count()}


# ---------------------------------------------------------------- report

def _cell(r, keys):
    return " / ".join(f"{r[k]:.1f} ± {r[k + '_std']:.1f}" if k + "_std" in r else f"{r[k]:.1f}" for k in keys)


def report(paths):
    """The README's results table in Markdown, one row per results.json (a run directory or the file itself)."""
    rows = []
    for p in paths:
        path = Path(p)
        path = path / "results.json" if path.is_dir() else path
        if path.name != "results.json" or not path.is_file():
            raise UserError(f"--report {p}: no results.json there; give the output directory of a finished run")
        try:
            rows.append(json.loads(path.read_text()))
        except ValueError:
            raise UserError(f"--report {p}: {path} is not valid JSON; rerun that run or leave it out") from None
    names = []
    for r in rows:
        names += [n for n in r["results"] if n not in names]
    head = ["method", "recipe", "split", "seeds"] + [f"{n} R1 / mAP / mINP" for n in names] + \
        ["training fit R1 / mAP", "time per seed (min)", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = r.get("seeds") or [r["seed"]]
        cells = [r["method"], r.get("recipe", "paper"), r.get("split", "test"), str(len(seeds))]
        cells += [_cell(r["results"][n], ("rank1", "mAP", "mINP")) if n in r["results"] else "–" for n in names]
        fit = r.get("fit")
        cells.append(_cell(fit, ("rank1", "mAP")) if fit else "–")
        t = r.get("time")
        cells.append(f"{(t['train_s'] + t['test_s']) / 60 / len(seeds):.1f}" if t else "–")
        cells.append(f"`{r.get('command', '')}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


RUN_MARKER = ".reid-run"  # written into every output directory this program creates; --overwrite needs it


def _inside(path, root):
    """True when `path` is `root` or lies below it (both resolved)."""
    return path == root or root in path.parents


def protected_paths(args):
    """Directories --overwrite must never remove, nor any directory above them: the working directory, this
    repository, the data root, the cache and the checkpoint being evaluated."""
    keep = [Path.cwd(), Path(__file__).resolve().parent, Path(args.cache_dir)]
    keep += [Path(p) for p in (args.data_root, args.checkpoint) if p]
    return [p.resolve() for p in keep]


def out_dir(args):
    suffix = ("-smoke" if args.smoke else "") + ("-eval" if args.eval_only else "")
    return Path(args.resume or args.out or f"runs/{args.method}-{args.dataset}{suffix}")


def prepare_out(args, method_name):
    out = out_dir(args)  # with --resume, parse() has checked that it holds a started run (its args.json)
    if not args.resume and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; give a directory path")
    elif not args.resume and out.exists() and any(out.iterdir()):
        ours = (out / RUN_MARKER).is_file()
        if not ours:
            raise UserError(f"output directory {out} is not empty and was not written by reid.py (no {RUN_MARKER} "
                            f"in it); reid.py never deletes it: give an empty or new directory with --out")
        if not args.overwrite:
            raise UserError(f"output directory {out} already holds a run; pass --resume {out} to continue it, "
                            f"--overwrite to replace it, or --out for another directory")
        target = out.resolve()
        for kept in protected_paths(args):
            if _inside(kept, target):
                raise UserError(f"--overwrite refused: {out} is or holds {kept}, which reid.py must not delete; "
                                f"give another --out")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("written by reid.py; --overwrite may replace this directory\n")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); give a writable directory") from None
    return out


def write_json(path, obj):
    """JSON written to a temporary file, then renamed: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({e.strerror}); free disk space or give another --out") from None


RESUME_SAFE = ("workers", "log_every", "cache_dir", "eval_every")  # flags --resume accepts: they cannot change results
POSITIVE = ("height", "width", "epochs", "P", "K")    # settings that must be >= 1 (a method's LIMITS may add more)


def check_values(args, method, settings):
    """Values argparse cannot judge: one line naming the flag and its range."""
    if args.eval_every and args.split != "val":
        raise UserError("--eval-every evaluates during training, which would select on the test identities; "
                        "use it with --split val")
    checks = [("--workers", args.workers, args.workers >= 0, ">= 0"),
              ("--eval-every", args.eval_every, args.eval_every >= 0, ">= 0"),
              ("--log-every", args.log_every, args.log_every >= 1, ">= 1"),
              ("--seed", args.seed, args.seed >= 0, ">= 0")]
    limits = {**dict.fromkeys(POSITIVE, 1), **getattr(method, "LIMITS", {})}
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in limits:
            checks.append((flag, v, v >= limits[f.name], f">= {limits[f.name]}"))
        elif f.name.endswith("epochs"):
            checks.append((flag, v, v >= 0, ">= 0"))
        elif f.name == "lr" or f.name.endswith("_lr"):
            checks.append((flag, v, v > 0 and np.isfinite(v), "> 0"))
        elif "erasing" in f.name:
            checks.append((flag, v, 0 <= v <= 1, "a probability in [0, 1]"))
    if args.seeds is not None:
        checks.append(("--seeds", " ".join(map(str, args.seeds)), len(set(args.seeds)) == len(args.seeds)
                       and min(args.seeds) >= 0, "distinct seeds >= 0"))
        if args.eval_only:
            raise UserError("--seeds trains one model per seed; with --eval-only, evaluate each seed's "
                            "OUT/seed-<s>/model.pt on its own")
    for flag, value, ok, rule in checks:
        if not ok:
            raise UserError(f"{flag} {value}: must be {rule}")
    if min(settings.height, settings.width) < 16:
        raise UserError(f"--height {settings.height} --width {settings.width}: images must be at least 16 x 16 pixels")


def command_of(argv):
    """The command that reproduces a run, without the flags that only say where files go."""
    words, skip = ["python", "reid.py"], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--cache-dir", "--resume"):
            skip = True
        elif a != "--overwrite" and not a.startswith(("--out=", "--cache-dir=", "--resume=")):
            words.append(a)
    return " ".join(words)


def run_seed(args, method, settings, checkpoint, device, seed, out, log):
    """Train (or load) and test one seed, every RegDB trial of it: {'results', 'fit', 'time'}."""
    trials = trials_of(args)
    per_trial, fits, curves, train_s, test_s = [], [], [], 0.0, 0.0
    for trial in trials:
        trial_out = out if len(trials) == 1 else out / f"trial-{trial}"
        trial_out.mkdir(exist_ok=True)
        seed_everything(seed)
        trainset, testset = load_data(args, settings, trial, log)
        if checkpoint is None and hasattr(settings, "K"):
            data.check_K(trainset, settings.K)
        t0 = time.time()
        if checkpoint is not None:
            model = method.build(settings, checkpoint["num_classes"], checkpoint.get("meta"))
            common.load_model_state(model, checkpoint["model"], args.checkpoint)
            model = model.to(device)
            if fitted_here(checkpoint, args, trainset):  # the saved model's fit on its own training identities
                fits.append(training_fit(method, model, settings, trainset, device))
                log(f"training fit of the loaded model ({fits[-1]['ids']} ids): {fit_line(fits[-1])}")
        else:
            curve_file = trial_out / "curve.json"      # --eval-every: kept on disk, so --resume continues it
            curve = json.loads(curve_file.read_text()) if args.resume and curve_file.exists() else []

            def evaluate(phase, epoch, model):
                r = evaluation.run_protocol(extract_pools(method, model, testset, device), testset,
                                            distance_fn(method, model, settings), device)
                point = {"phase": phase, "epoch": epoch + 1,
                         **{n: {k: v[k] for k in ("rank1", "mAP", "mINP")} for n, v in r.items()}}
                curve[:] = [c for c in curve if (c["phase"], c["epoch"]) != (phase, epoch + 1)] + [point]
                write_json(curve_file, curve)
                first = next(iter(r))
                log(f"[{phase}] epoch {epoch + 1}: {args.split} {first} rank-1 {r[first]['rank1']:.2f} "
                    f"mAP {r[first]['mAP']:.2f}")
            run = common.Run(trial_out, device, seed=seed, amp=args.amp, workers=args.workers,
                             log_every=args.log_every, say=log, max_its=SMOKE_ITERS if args.smoke else None,
                             evaluate=evaluate if args.eval_every else None, eval_every=args.eval_every)
            if args.resume and not [p for p in trial_out.glob("*.pt") if p.name not in ("model.pt", "features.pt")]:
                log(f"--resume: {trial_out} holds no checkpoint yet; training starts at epoch 1")
            model = method.train(settings, trainset, run)
            train_s += sum(run.seconds.values())  # every phase's epochs, those of earlier (resumed) sessions too
            log(f"trained in {time.time() - t0:.1f}s ({sum(run.seconds.values()):.1f}s of epochs over all sessions)")
            broken = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if broken:  # the last steps diverged after the last logged (finite) loss; keep no such model.pt
                raise UserError(f"training diverged: the final weights are not finite ({broken[0]}, ...); lower "
                                f"the learning rate (--lr) and start again (--overwrite, or another --out)")
            common.save_atomic({"method": args.method, "dataset": args.dataset, "split": args.split,
                                "settings": dataclasses.asdict(settings), "num_classes": trainset.num_classes,
                                "meta": run.meta, "model": model.state_dict()}, trial_out / "model.pt")
            fits.append(training_fit(method, model, settings, trainset, device))
            log(f"training fit (infrared training images query visible ones, {fits[-1]['ids']} ids): "
                f"{fit_line(fits[-1])}")
        if checkpoint is None and args.eval_every:
            curves.append(curve)
        t0 = time.time()
        per_trial.append(test(method, model, settings, testset, device, trial_out, log))
        if hasattr(method, "figures"):
            write_figures(method, model, settings, trainset, testset, trial_out)
        test_s += time.time() - t0
        log(f"tested in {time.time() - t0:.1f}s")
    fit = None
    if fits:
        fit = {k: (None if any(f[k] is None for f in fits) else float(np.mean([f[k] for f in fits])))
               for k in (*FIT_KEYS, "chance_rank1")}
    results = per_trial[0] if len(per_trial) == 1 else average_trials(per_trial)
    out = {"results": results, "fit": fit, "time": {"train_s": train_s, "test_s": test_s}}
    if curves and curves[0] and len(per_trial) == 1:  # what selecting the best epoch on these ids would gain
        out["curve"] = curves[0]
        out["best_minus_final"] = {n: {k: max(c[n][k] for c in curves[0]) - results[n][k] for k in ("rank1", "mAP")}
                                   for n in results}
        first = next(iter(results))
        log(f"best evaluated epoch minus final epoch ({first}): rank-1 {out['best_minus_final'][first]['rank1']:+.2f}, "
            f"mAP {out['best_minus_final'][first]['mAP']:+.2f}")
    return out


def write_figures(method, model, settings, trainset, testset, out):
    """method.figures into a temporary folder, then each picture renamed into `out`: a full disk leaves no half
    picture behind (main turns its OSError into one line)."""
    tmp = out / ".figures.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        method.figures(model, settings, trainset, testset, tmp)
        for p in sorted(tmp.iterdir()):
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse(argv):
    """argv -> (args, method module, settings, setting sources, checkpoint or None, the argv in force)."""
    parser = common_parser(add_help=False)
    first, _ = parser.parse_known_args(argv)
    given = flags_given(argv)
    if first.resume:  # a resumed run takes its method, dataset and settings from its args.json
        path = Path(first.resume) / "args.json"
        try:
            saved = json.loads(path.read_text())
            saved_argv = [str(a) for a in saved["argv"]]
        except FileNotFoundError:
            raise UserError(f"--resume {first.resume}: no args.json there; give the output directory of a "
                            f"started run") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--resume {first.resume}: {path} is damaged or incomplete; start the run again "
                            f"with --out (or --overwrite)") from None
        changing = sorted(given - {"resume"} - set(RESUME_SAFE))
        if changing:
            raise UserError(f"--resume takes every setting from {path}; "
                            f"{', '.join('--' + c.replace('_', '-') for c in changing)} would change the run: "
                            f"leave {'it' if len(changing) == 1 else 'them'} out, or start a new run with --out")
        argv = saved_argv + argv  # the later flags (--resume OUT and the safe ones) win
        first, _ = parser.parse_known_args(argv)
        given = flags_given(argv)
    checkpoint = None
    if first.checkpoint and not first.eval_only:
        raise UserError("--checkpoint is only read with --eval-only; add --eval-only, or leave --checkpoint out")
    if first.eval_only:
        if not first.checkpoint:
            raise UserError("--eval-only needs --checkpoint FILE (the model.pt of a finished run)")
        checkpoint = common.load_checkpoint(first.checkpoint)
        for key in ("method", "settings", "model", "num_classes"):
            if key not in checkpoint:
                raise UserError(f"{first.checkpoint} has no '{key}' entry: it is not a model.pt written by reid.py")
        if checkpoint["method"] not in METHODS:
            raise UserError(f"{first.checkpoint} names method {checkpoint['method']!r}, which is none of "
                            f"{', '.join(METHODS)}: it was not written by this code")
        first.method = first.method or checkpoint["method"]
    if first.method is None and ("-h" in argv or "--help" in argv):
        common_parser().parse_args(["--help"])  # prints the shared options and exits
    if first.method is None:
        raise UserError(f"--method is required; choose one of {', '.join(METHODS)}")
    method = importlib.import_module(f"methods.{first.method}")
    parser = common_parser()
    add_settings_options(parser, method)
    args = parser.parse_args(argv)
    args.method = first.method  # with --eval-only it may come from the checkpoint
    if args.data_root and "dataset" not in given:
        found = layout_of(args.data_root)
        raise UserError(f"--data-root {args.data_root} without --dataset: "
                        + (f"pass --dataset {found} to run on it" if found else
                           "pass --dataset sysu, regdb or llcm (without both, the built-in synthetic world is used)"))
    if "trial" in given and args.dataset != "regdb":
        raise UserError(f"--trial {args.trial}: trials exist only for --dataset regdb; leave --trial out")
    if checkpoint is not None:
        if checkpoint["method"] != args.method:
            raise UserError(f"{args.checkpoint} was trained with --method {checkpoint['method']}, not {args.method}")
        trained_on = checkpoint.get("dataset", "synthetic")
        if "dataset" not in given and trained_on != "synthetic":
            raise UserError(f"{args.checkpoint} was trained on {trained_on}; pass --dataset {trained_on} --data-root "
                            f"DIR to evaluate it there (or --dataset synthetic for the built-in world)")
        trained = {k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["settings"].items()}
        settings, sources = resolve_settings(method, args, given, trained)
    else:
        settings, sources = resolve_settings(method, args, given)
    check_values(args, method, settings)
    return args, method, settings, sources, checkpoint, argv


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    first, _ = common_parser(add_help=False).parse_known_args(argv)
    if first.report:
        text = report(first.report)
        print(text)
        return text
    args, method, settings, sources, checkpoint, argv = parse(argv)
    device = pick_device(args.device)
    trials_of(args)
    data.check_cache_dir(args.cache_dir)  # before anything is written: the synthetic world lives there too
    if args.dataset != "synthetic":
        check_root(args.dataset, args.data_root, args.smoke)
    existed = out_dir(args).is_dir()
    out = prepare_out(args, args.method)  # refuses a non-empty directory unless it is a run to resume or replace
    try:
        try:
            return _run(args, method, settings, sources, checkpoint, argv, device, out)
        except OSError as e:  # a full disk at a write that has no message of its own (log.txt, a picture)
            if e.errno not in data._FULL_DISK:
                raise
            raise UserError(f"cannot write into {out} ({os.strerror(e.errno)}); free disk space or give another "
                            f"--out") from None
    except UserError:
        # a run that failed before it wrote any checkpoint leaves nothing behind (the directory was empty or new);
        # features.pt is no checkpoint: a failed --eval-only run leaves nothing either
        if not args.resume and not any(p.name != "features.pt" for p in out.rglob("*.pt")):
            shutil.rmtree(out, ignore_errors=True)
            if existed:
                out.mkdir(exist_ok=True)
        raise


def _run(args, method, settings, sources, checkpoint, argv, device, out):
    command = command_of(argv)
    if not args.resume:
        write_json(out / "args.json", {"argv": [a for a in argv if a != "--overwrite"], "command": command,
                                       "method": args.method, "dataset": args.dataset, "recipe": args.recipe,
                                       "split": args.split, "settings": dataclasses.asdict(settings),
                                       "setting_sources": sources, "seed": args.seed, "seeds": args.seeds,
                                       "device": str(device)})
    with open(out / "log.txt", "a") as log_file:

        def log(line):
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        log(f"method {args.method} | dataset {args.dataset} | recipe {args.recipe} | split {args.split} | "
            f"device {device} | out {out}")
        log("settings " + json.dumps(dataclasses.asdict(settings)))
        moved = {k: v for k, v in sources.items() if v != "paper"}
        if moved:
            log("not the paper's value (setting: source): " + json.dumps(moved))
        if args.amp and device.type != "cuda":
            log("note: --amp has no effect on the CPU (bf16 autocast runs on CUDA only); training in float32")
        if checkpoint is not None:
            at_training = json.loads(json.dumps(checkpoint["settings"]))    # through JSON: tuples become lists
            now = json.loads(json.dumps(dataclasses.asdict(settings)))
            changed = {k: v for k, v in now.items() if at_training.get(k) != v}
            if changed:
                log("evaluating with settings other than the training run's: " + json.dumps(changed))
        if checkpoint is None and settings.pretrained == "none":
            log("training from scratch (--pretrained none)" if args.dataset == "synthetic" else
                "WARNING: training from scratch on a real benchmark (--pretrained none); the papers start from "
                "ImageNet")

        summary = {"method": args.method, "dataset": args.dataset,
                   "trial": args.trial if args.dataset == "regdb" else None, "recipe": args.recipe,
                   "split": args.split, "command": command, "settings": dataclasses.asdict(settings),
                   "setting_sources": sources, "smoke": args.smoke, "machine": machine(device),
                   "model": "final epoch (no selection on the test set)"}
        seeds = args.seeds or [args.seed]
        per_seed = []
        for seed in seeds:
            seed_out = out if args.seeds is None else out / f"seed-{seed}"
            if args.seeds is not None:
                seed_out.mkdir(exist_ok=True)
                (seed_out / RUN_MARKER).write_text("written by reid.py\n")
                log(f"---- seed {seed} ({seeds.index(seed) + 1}/{len(seeds)}) -> {seed_out}")
            one = run_seed(args, method, settings, checkpoint, device, seed, seed_out, log)
            per_seed.append(one)
            if args.seeds is not None:
                write_json(seed_out / "results.json", {**summary, "seed": seed, **one})
        if args.seeds is None:
            summary.update(seed=args.seed, **per_seed[0])
            head = "mean ± std over trials"
        else:
            fits = [p["fit"] for p in per_seed if p["fit"]]
            summary.update(seed=None, seeds=seeds, results=aggregate_seeds([p["results"] for p in per_seed]),
                           fit=aggregate_fit(fits) if fits else None,
                           time={k: sum(p["time"][k] for p in per_seed) for k in ("train_s", "test_s")})
            if all("best_minus_final" in p for p in per_seed):
                summary["best_minus_final"] = aggregate_seeds([p["best_minus_final"] for p in per_seed],
                                                              ("rank1", "mAP"))
            head = f"mean ± std over {len(seeds)} seeds"
        write_json(out / "results.json", summary)
        split = " on the validation identities (--split val)" if args.split == "val" else ""
        log(f"\n{args.method} on {args.dataset}{split} (final-epoch model; {head}, in %)\n{table(summary['results'])}")
        fit = summary["fit"]
        if fit:
            log(f"training fit: {fit_line(fit)}")
        if args.seeds is not None and "best_minus_final" in summary:
            gap = next(iter(summary["best_minus_final"].items()))
            log(f"best evaluated epoch minus final epoch ({gap[0]}, {head}): rank-1 {gap[1]['rank1']:+.2f} ± "
                f"{gap[1]['rank1_std']:.2f}, mAP {gap[1]['mAP']:+.2f} ± {gap[1]['mAP_std']:.2f}")
        log(f"results: {out / 'results.json'}")
        return summary["results"]


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # exit status 2, as argparse's own errors
        print(f"reid.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("reid.py: interrupted; continue with --resume OUT")
