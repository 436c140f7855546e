"""CMC, mAP and mINP exactly as the visible-infrared re-id community computes them.

Implements: the community protocol (`eval_sysu` / `eval_regdb` in mangye16/Cross-Modal-Re-ID-baseline), re-stated
here step by step; verified against the released evaluators of CM-NAS and MCE and the community baseline (NFS and
cm-SSFT published no code). For each query:

1. rank: sort the gallery by distance, smaller = more similar.
2. remove same-room camera (SYSU-MM01 only): for a query from camera 3, drop every gallery image from
   camera 2 (both cameras are in the same room), whatever its identity. RegDB removes nothing. LLCM
   (`eval_llcm` in ZYK100/LLCM DEEN/eval_metrics.py) drops the gallery images of the query's identity
   taken under the query's camera number.
3. matches: gallery entries of the kept list with the query's identity. A query without any match is
   skipped; the result counts the skipped queries. If every query is skipped that is an error.
4. de-duplicate identities (SYSU-MM01 and LLCM, the SYSU-MM01 authors' MATLAB rule): keep only the first
   occurrence of each identity in the kept list, then cumulate the matches of that shorter list and
   truncate at `max_rank`: `cmc`. RegDB's `cmc` and every protocol's `cmc_standard` cumulate the
   matches of the full kept list (clipped at 1). A list shorter than `max_rank` is padded with its last
   value. Both are averaged over the queries with a match.
5. average precision over the full kept list: the mean, over the matches, of
   (matches up to and including it) / (its rank). mAP is its mean over the queries with a match.
6. mINP (AGW survey, Ye et al. TPAMI 2021): (number of matches) / (rank of the last match),
   averaged over the queries with a match.

Vectorised: no loop over queries or ranks; queries are processed in chunks of about `CHUNK_ELEMENTS`
distance entries, so the working memory stays near 0.1 GB whatever the matrix size (bench.py measures it).
Because a match's first occurrence in the de-duplicated list is the first match itself, its
de-duplicated rank is the number of distinct identities seen in the kept list up to the first match;
that count is all step 4 needs.

Deviations:
- Ties: gallery entries at the same distance are ranked by gallery index, the earlier first (a stable
  sort). The community uses numpy's default unstable argsort, whose order among ties is unspecified;
  ties between a match and a non-match are rare with real-valued distances, so both give the same
  numbers to within noise (and exactly the same without ties; bench.py checks it).
- Distances are ranked at float32 precision, that of the features and of the community's matrices;
  a float64 matrix is rounded to float32 first.
"""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import UserError

CHUNK_ELEMENTS = 2 ** 22   # distance entries evaluated at once (about 25 bytes of working memory each)
SAME_ROOM = (3, 2)         # SYSU-MM01: (query camera, gallery camera) in the same room
RANKS = (1, 5, 10, 20)     # CMC ranks reported by run_protocol


def _numpy(x):
    """numpy view of an array or tensor; floating tensors as float32 (numpy has no bfloat16)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def rank_gallery(distmat):
    """(Nq, Ng) distances -> (Nq, Ng) gallery indices, nearest first; ties: earlier gallery index first.

    Distances are ranked at float32 precision (that of the features). A stable sort, made fast: each
    distance's float32 bits, mapped to an integer of the same order, go to the upper half of an int64 key
    and the gallery index to the lower half; the keys are distinct, so numpy's fast unstable sort of the
    keys gives the stable order, faster than numpy's stable argsort (and than its default one).
    """
    if np.isnan(distmat).any():
        raise UserError("the distance matrix contains NaN; the features are not finite, check the model "
                        "(a diverged training run) before evaluating")
    bits = (distmat.astype(np.float32) + np.float32(0)).view(np.int32)   # (+ 0 turns -0.0 into 0.0)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)                          # negative floats: reverse their order
    keys = (ordered.astype(np.int64) << 32) | np.arange(distmat.shape[1])  # (Nq, Ng) distinct int64 keys
    keys.sort(axis=1)                                                     # Deviation: stable tie order
    return keys & 0xFFFFFFFF                                              # (Nq, Ng) gallery indices


def remove_same_room(order, q_cams, g_cams):
    """(Nq, Ng) ranked gallery indices -> (Nq, Ng) bool, False where a camera-3 query meets a camera-2 image."""
    q_cam, g_cam = SAME_ROOM
    return ~((q_cams[:, None] == q_cam) & (g_cams[order] == g_cam))


def _evaluate_chunk(distmat, q_pids, g_pids, q_cams, g_cams, g_ids, num_ids, protocol):
    """Per-query (rank of first match, de-duplicated rank of first match, AP, INP, has a match)."""
    order = rank_gallery(distmat)                                          # (C, Ng)
    if protocol == "sysu":
        keep = remove_same_room(order, q_cams, g_cams)                     # (C, Ng) bool
    elif protocol == "llcm":                                               # same identity under the same camera
        keep = ~((g_pids[order] == q_pids[:, None]) & (g_cams[order] == q_cams[:, None]))
    else:
        keep = np.ones(order.shape, dtype=bool)
    matches = (g_pids[order] == q_pids[:, None]) & keep                    # (C, Ng) bool
    rank = np.cumsum(keep, axis=1, dtype=np.int32)                         # (C, Ng) 1-based rank in the kept list
    valid = matches.any(axis=1)                                            # (C,)
    rows = np.arange(len(order))

    # cumulate: the CMC only needs the rank of the first match
    first = matches.argmax(axis=1)                                         # (C,) position in the full list
    first_rank = rank[rows, first]

    # de-duplicate identities: distinct identities in the kept list up to and including the first match
    seen = keep & (np.arange(order.shape[1]) <= first[:, None])            # (C, Ng)
    r, c = np.nonzero(seen)
    identity_seen = np.zeros((len(order), num_ids), dtype=bool)            # (C, U)
    identity_seen[r, g_ids[order[r, c]]] = True
    dedup_rank = identity_seen.sum(axis=1)

    # average precision: mean over the matches of (matches so far) / rank
    r, c = np.nonzero(matches)                                             # every match, row by row, in rank order
    num_matches = np.bincount(r, minlength=len(order))                     # (C,)
    row_start = np.cumsum(num_matches) - num_matches
    hits = np.arange(len(r)) - row_start[r] + 1                            # 1 at a row's first match, 2 at...
    ap = np.bincount(r, hits / rank[r, c], minlength=len(order)) / np.maximum(num_matches, 1)

    # INP: matches / rank of the last (hardest) match
    last = order.shape[1] - 1 - matches[:, ::-1].argmax(axis=1)
    inp = num_matches / np.maximum(rank[rows, last], 1)                    # (a query without match gives 0)
    return first_rank, dedup_rank, ap, inp, valid


def evaluate(distmat, q_pids, g_pids, q_cams, g_cams, protocol="sysu", max_rank=20):
    """Community CMC / mAP / mINP of a (Nq, Ng) distance matrix (numpy arrays or torch tensors).

    protocol: 'sysu' (remove same-room camera, de-duplicated CMC), 'llcm' (remove the query's identity under
    its camera, de-duplicated CMC) or 'regdb' (standard CMC).
    Returns {'cmc': (max_rank,) fractions, cmc[k-1] = rank-k accuracy; 'cmc_standard': the same without
    identity de-duplication (equal to 'cmc' for RegDB); 'mAP', 'mINP': fractions;
    'num_valid': queries with a match, 'num_skipped': queries without}.
    """
    if protocol not in ("sysu", "regdb", "llcm"):
        raise ValueError(f"unknown protocol {protocol!r}; use 'sysu', 'regdb' or 'llcm'")
    distmat, q_pids, g_pids, q_cams, g_cams = map(_numpy, (distmat, q_pids, g_pids, q_cams, g_cams))
    num_q, num_g = distmat.shape
    if (len(q_pids), len(q_cams), len(g_pids), len(g_cams)) != (num_q, num_q, num_g, num_g):
        raise ValueError(f"distance matrix {distmat.shape} does not fit {len(q_pids)} query ids, "
                         f"{len(q_cams)} query cameras, {len(g_pids)} gallery ids, {len(g_cams)} gallery cameras")
    identities, g_ids = np.unique(g_pids, return_inverse=True)             # g_ids: (Ng,) identities as 0..U-1

    step = max(1, CHUNK_ELEMENTS // max(num_g, 1))
    chunks = [_evaluate_chunk(distmat[s:s + step], q_pids[s:s + step], g_pids, q_cams[s:s + step], g_cams,
                              g_ids, len(identities), protocol) for s in range(0, num_q, step)]
    first_rank, dedup_rank, ap, inp, valid = (np.concatenate(x) for x in zip(*chunks))
    if not valid.any():
        raise UserError(f"no query has a matching identity in the gallery ({num_q} queries, {num_g} gallery "
                        f"images, protocol {protocol!r}); check that query and gallery come from the same test ids")

    ranks = np.arange(1, max_rank + 1)
    cmc_standard = (first_rank[valid, None] <= ranks).mean(axis=0)
    cmc = (dedup_rank[valid, None] <= ranks).mean(axis=0) if protocol in ("sysu", "llcm") else cmc_standard
    return {"cmc": cmc, "cmc_standard": cmc_standard, "mAP": float(ap[valid].mean()),
            "mINP": float(inp[valid].mean()), "num_valid": int(valid.sum()), "num_skipped": int((~valid).sum())}


def run_protocol(features, testset, distance, device):
    """Evaluate every protocol of `testset` on features extracted once per pool.

    features: {'v': (Nv, d), 'r': (Nr, d)} tensors, rows in the order of testset.pools.
    distance(q_feat, g_feat) -> (Nq, Ng) tensor, called on `device` once per trial with all the trial's
    queries and its whole gallery (cm-SSFT's transductive distance needs them together).
    Returns {protocol name: {'rank1', 'rank5', 'rank10', 'rank20', 'mAP', 'mINP': percent, mean over
    trials; '<key>_std': population standard deviation over trials; 'num_skipped': skipped queries
    summed over trials; 'trials': one dict per trial with the same keys}}.
    """
    results = {}
    for protocol in testset.protocols:
        q_pool, g_pool = testset.pools[protocol.query], testset.pools[protocol.gallery]
        trials = []
        for q_idx, g_idx in protocol.trials:
            q_feat = features[protocol.query][torch.as_tensor(q_idx)].to(device)   # (Nq, d)
            g_feat = features[protocol.gallery][torch.as_tensor(g_idx)].to(device)  # (Ng, d)
            distmat = distance(q_feat, g_feat).float().cpu().numpy()               # (Nq, Ng)
            r = evaluate(distmat, q_pool.labels[q_idx], g_pool.labels[g_idx], q_pool.cams[q_idx],
                         g_pool.cams[g_idx], protocol=protocol.kind, max_rank=max(RANKS))
            trial = {f"rank{k}": 100 * float(r["cmc"][k - 1]) for k in RANKS}
            trial.update(mAP=100 * r["mAP"], mINP=100 * r["mINP"], num_skipped=r["num_skipped"])
            trials.append(trial)
        summary = {}
        for key in [f"rank{k}" for k in RANKS] + ["mAP", "mINP"]:
            values = np.array([t[key] for t in trials])
            summary[key], summary[f"{key}_std"] = float(values.mean()), float(values.std())
        summary["num_skipped"] = sum(t["num_skipped"] for t in trials)
        summary["trials"] = trials
        results[protocol.name] = summary
    return results


def ranked_list_picture(path, q_images, g_images, distmat, q_pids, g_pids, num_queries=5, top=10,
                        q_cams=None, g_cams=None):
    """Write a PNG: one row per query, the query image then its `top` nearest gallery images.

    The query has a grey border and its identity below; gallery images a green border for the query's
    identity, red otherwise, and their distance below.
    Queries are spread evenly over the query list. Images: (N, H, W, 3) uint8 arrays of one size.
    With q_cams and g_cams, the SYSU-MM01 same-room rule is applied: a camera-3 query's ranked list
    skips the camera-2 gallery images, as evaluate does (RegDB has no camera 3, so nothing is skipped).
    """
    distmat, q_pids, g_pids = _numpy(distmat), _numpy(q_pids), _numpy(g_pids)
    border, label = 4, 14
    h, w = q_images.shape[1] + 2 * border, q_images.shape[2] + 2 * border
    queries = np.unique(np.linspace(0, len(distmat) - 1, num_queries).round().astype(int))
    order = rank_gallery(distmat[queries])                                  # (num_queries, Ng)
    keep = (remove_same_room(order, _numpy(q_cams)[queries], _numpy(g_cams)) if q_cams is not None
            else np.ones(order.shape, dtype=bool))

    canvas = Image.new("RGB", ((top + 1) * w + border, len(queries) * (h + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, q in enumerate(queries):
        ranked = order[row][keep[row]][:top]                               # (top,) gallery indices
        y = row * (h + label)
        cells = [(q_images[q], "gray", f"id {q_pids[q]}")]                  # the query, grey border
        cells += [(g_images[g], "green" if g_pids[g] == q_pids[q] else "red", f"{distmat[q, g]:.3f}") for g in ranked]
        for col, (image, colour, text) in enumerate(cells):
            x = col * w + (border if col else 0)
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
            canvas.paste(Image.fromarray(image), (x + border, y + border))
            draw.text((x + border, y + h + 1), text, fill="black")
    tmp = f"{path}.tmp"  # written whole, then renamed: a full disk never leaves half a picture
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"cannot write {path} ({e.strerror or e}); free disk space or give another --out") from None
