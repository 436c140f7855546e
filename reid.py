"""Train and evaluate one VI-ReID method:

    python reid.py --method rfm                                     # built-in synthetic world, CPU recipe
    python reid.py --method agw --dataset sysu --data-root DIR      # the paper's recipe on SYSU-MM01
    python reid.py --method agw --dataset regdb --data-root DIR --trial all
    python reid.py --method nfs --smoke                             # install check: well under a minute on a CPU
    python reid.py --resume runs/agw-synthetic                      # continue a killed run
    python reid.py --eval-only --checkpoint runs/agw-synthetic/model.pt

Every field of the method's Settings dataclass is an option (--lr 0.01, --milestones 40 70, --non-local false).
This file only dispatches: the method files hold every piece of paper logic.
"""
import argparse
import dataclasses
import importlib
import json
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
from methods.common import UserError

KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
SMOKE_ITERS = 2  # iterations per epoch in --smoke runs
SMOKE_WORLDS = {  # the tiny synthetic worlds of --smoke runs and of the tests
    "sysu": dict(num_ids=16, num_test=6, images_per_cam=2, height=64, width=32),
    "regdb": dict(num_ids=12, images_per_id=3, height=64, width=32),
}


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
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "sysu", "regdb"),
                   help="synthetic (default: a generated world in the SYSU-MM01 layout), sysu or regdb")
    p.add_argument("--data-root", help="dataset directory (the one holding exp/ for SYSU-MM01, idx/ for RegDB)")
    p.add_argument("--trial", default="1", help="RegDB trial 1..10, or 'all' to train and test all ten in turn")
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
    return p


def add_settings_options(parser, settings_cls, synthetic=None):
    """One --field-name option per Settings field, default None so explicit flags can be told apart. The help
    shows the paper's default and, where it differs, the synthetic world's CPU recipe (`synthetic`)."""
    group = parser.add_argument_group("method settings (defaults: the paper's recipe; in brackets: the "
                                      "synthetic world's, used when no --dataset is given)")
    def show(v):
        return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)

    for f in dataclasses.fields(settings_cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"default {show(f.default)}"
        if synthetic and f.name in synthetic and synthetic[f.name] != f.default:
            text += f" [{show(synthetic[f.name])}]"
        if isinstance(f.default, bool):
            group.add_argument(flag, type=str2bool, metavar="true|false", help=text)
        elif isinstance(f.default, tuple):
            element = type(f.default[0]) if f.default else int
            group.add_argument(flag, type=element, nargs="*", help=text)
        else:
            group.add_argument(flag, type=type(f.default), help=text)


def resolve_settings(method, args, argv_given, trained=None):
    """Paper defaults, then the synthetic CPU recipe, then --smoke, then explicit flags. With --eval-only, the
    checkpoint's settings (`trained`) take the place of the first three: explicit flags still win (a test-time
    choice such as --ssft-test single-query; a flag that changes the network fails when the weights load)."""
    values = dataclasses.asdict(method.Settings())
    if trained is not None:
        values.update(trained)
    else:
        if args.dataset == "synthetic":
            values.update(method.SYNTHETIC)
        if args.smoke:
            values.update(method.SMOKE)
    for name in values:
        given = getattr(args, name)
        if given is not None and name in argv_given:
            values[name] = tuple(given) if isinstance(values[name], tuple) else given
    return method.Settings(**values)


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


def check_root(dataset, root):
    if not root:
        raise UserError(f"--dataset {dataset} needs --data-root DIR (the directory holding "
                        f"{'exp/ and cam1..cam6/' if dataset == 'sysu' else 'idx/, Visible/ and Thermal/'})")
    root = Path(root)
    if dataset == "sysu" and (root / "idx").is_dir() and (root / "Thermal").is_dir():
        raise UserError(f"--data-root {root} holds RegDB (idx/, Thermal/), not SYSU-MM01; use --dataset regdb")
    if dataset == "regdb" and (root / "exp").is_dir() and (root / "cam3").is_dir():
        raise UserError(f"--data-root {root} holds SYSU-MM01 (exp/, cam3/), not RegDB; use --dataset sysu")
    return root


def trials_of(args):
    if args.dataset != "regdb":
        return [None]
    if args.trial == "all":
        return list(range(1, 11))
    if not args.trial.isdigit() or not 1 <= int(args.trial) <= 10:
        raise UserError(f"--trial {args.trial!r}: RegDB has trials 1..10; give one of them or 'all'")
    return [int(args.trial)]


def load_data(args, settings, trial, log):
    """(TrainSet, TestSet) of the chosen dataset at the method's image size."""
    cache = Path(args.cache_dir)
    if args.dataset == "synthetic":
        root = synthetic.ensure_world(cache, "sysu", **(SMOKE_WORLDS["sysu"] if args.smoke else {}), log=log)
        return data.load_sysu(root, settings.height, settings.width, cache, log=log, expect_published=False)
    root = check_root(args.dataset, args.data_root)
    if args.dataset == "sysu":
        return data.load_sysu(root, settings.height, settings.width, cache, log=log)
    return data.load_regdb(root, trial, settings.height, settings.width, cache, log=log)


# ---------------------------------------------------------------- testing

@torch.no_grad()
def extract_pools(method, model, testset, device, batch_size=128):
    """Test features of every pool image, extracted once: {'v': (Nv, d), 'r': (Nr, d)}."""
    model.eval()
    return {m: torch.cat([method.extract(model, x.to(device), m).float().cpu()
                          for x in data.test_batches(pool.images, batch_size)])
            for m, pool in testset.pools.items()}


def distance_fn(method, model, settings):
    if hasattr(method, "distance"):
        return lambda q, g: method.distance(model, q, g, settings)
    return lambda q, g: torch.cdist(F.normalize(q, dim=1), F.normalize(g, dim=1))


def test(method, model, settings, testset, device, out, log):
    t0 = time.time()
    features = extract_pools(method, model, testset, device)
    dist = distance_fn(method, model, settings)
    results = evaluation.run_protocol(features, testset, dist, device)
    torch.save({"features": features,
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
    log(f"tested in {time.time() - t0:.1f}s")
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


def table(results):
    lines = [f"{'setting':<22}" + "".join(f"{k:>14}" for k in KEYS)]
    for name, r in results.items():
        lines.append(f"{name:<22}" + "".join(f"{r[k]:>8.2f} ±{r[k + '_std']:>4.1f}" for k in KEYS))
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


def prepare_out(args, method_name):
    suffix = ("-smoke" if args.smoke else "") + ("-eval" if args.eval_only else "")
    out = Path(args.resume or args.out or f"runs/{method_name}-{args.dataset}{suffix}")
    if args.resume:
        if not (out / "args.json").is_file():
            raise UserError(f"--resume {out}: no args.json there; give the output directory of a started run")
    elif out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; give a directory path")
    elif out.exists() and any(out.iterdir()):
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
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text("written by reid.py; --overwrite may replace this directory\n")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = common_parser(add_help=False)
    first, _ = parser.parse_known_args(argv)
    given = flags_given(argv)

    if first.resume:  # a resumed run takes its method, dataset and settings from its args.json
        saved = json.loads((Path(first.resume) / "args.json").read_text()) \
            if (Path(first.resume) / "args.json").is_file() else None
        if saved is None:
            raise UserError(f"--resume {first.resume}: no args.json there; give the output directory of a started run")
        argv = saved["argv"] + ["--resume", first.resume]
        first, _ = parser.parse_known_args(argv)
        given = flags_given(argv)
    checkpoint = None
    if first.eval_only:
        if not first.checkpoint:
            raise UserError("--eval-only needs --checkpoint FILE (the model.pt of a finished run)")
        checkpoint = common.load_checkpoint(first.checkpoint)
        for key in ("method", "settings", "model", "num_classes"):
            if key not in checkpoint:
                raise UserError(f"{first.checkpoint} has no '{key}' entry: it is not a model.pt written by reid.py")
        first.method = first.method or checkpoint["method"]
    if first.method is None and ("-h" in argv or "--help" in argv):
        common_parser().parse_args(["--help"])  # prints the shared options and exits
    if first.method is None:
        raise UserError(f"--method is required; choose one of {', '.join(METHODS)}")
    method = importlib.import_module(f"methods.{first.method}")
    parser = common_parser()
    add_settings_options(parser, method.Settings, method.SYNTHETIC)
    args = parser.parse_args(argv)
    args.method = first.method
    if checkpoint is not None:
        if checkpoint["method"] != args.method:
            raise UserError(f"{args.checkpoint} was trained with --method {checkpoint['method']}, not {args.method}")
        trained = {k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["settings"].items()}
        settings = resolve_settings(method, args, given, trained)
    else:
        settings = resolve_settings(method, args, given)

    device = pick_device(args.device)
    trials = trials_of(args)
    if args.dataset != "synthetic":
        check_root(args.dataset, args.data_root)
    out = prepare_out(args, args.method)
    if not args.resume:
        (out / "args.json").write_text(json.dumps({"argv": [a for a in argv if a != "--overwrite"],
                                                   "method": args.method, "dataset": args.dataset,
                                                   "settings": dataclasses.asdict(settings), "seed": args.seed,
                                                   "device": str(device)}, indent=1))
    log_file = open(out / "log.txt", "a")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"method {args.method} | dataset {args.dataset} | device {device} | out {out}")
    log("settings " + json.dumps(dataclasses.asdict(settings)))
    if checkpoint is not None:
        at_training = json.loads(json.dumps(checkpoint["settings"]))    # through JSON: tuples become lists
        now = json.loads(json.dumps(dataclasses.asdict(settings)))
        changed = {k: v for k, v in now.items() if at_training.get(k) != v}
        if changed:
            log("evaluating with settings other than the training run's: " + json.dumps(changed))
    if checkpoint is None and settings.pretrained == "none":
        log("training from scratch (--pretrained none)" if args.dataset == "synthetic" else
            "WARNING: training from scratch on a real benchmark (--pretrained none); the papers start from ImageNet")

    per_trial = []
    for trial in trials:
        trial_out = out if len(trials) == 1 else out / f"trial-{trial}"
        trial_out.mkdir(exist_ok=True)
        seed_everything(args.seed)
        trainset, testset = load_data(args, settings, trial, log)
        if checkpoint is not None:
            model = method.build(settings, checkpoint["num_classes"], checkpoint.get("meta"))
            common.load_model_state(model, checkpoint["model"], args.checkpoint)
            model = model.to(device)
        else:
            run = common.Run(trial_out, device, seed=args.seed, amp=args.amp, workers=args.workers,
                             log_every=args.log_every, log=log, max_its=SMOKE_ITERS if args.smoke else None)
            t0 = time.time()
            model = method.train(settings, trainset, run)
            log(f"trained in {time.time() - t0:.1f}s")
            common.save_atomic({"method": args.method, "settings": dataclasses.asdict(settings),
                                "num_classes": trainset.num_classes, "meta": run.stored,
                                "model": model.state_dict()}, trial_out / "model.pt")
        per_trial.append(test(method, model, settings, testset, device, trial_out, log))
        if hasattr(method, "figures"):
            method.figures(model, settings, trainset, testset, trial_out)
    results = per_trial[0] if len(per_trial) == 1 else average_trials(per_trial)
    (out / "results.json").write_text(json.dumps({
        "method": args.method, "dataset": args.dataset, "trial": args.trial if args.dataset == "regdb" else None,
        "settings": dataclasses.asdict(settings), "seed": args.seed, "smoke": args.smoke,
        "model": "final epoch (no selection on the test set)", "results": results}, indent=1))
    log(f"\n{args.method} on {args.dataset} (final-epoch model; mean ± std over trials, in %)\n{table(results)}")
    log(f"results: {out / 'results.json'}")
    log_file.close()
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # exit status 2, as argparse's own errors
        print(f"reid.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("reid.py: interrupted; continue with --resume OUT")
