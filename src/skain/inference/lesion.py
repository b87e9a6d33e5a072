"""One answer per lesion from the answers for its images (`skain predict --per-lesion`, lesion-level scoring).

A lesion's probabilities are the mean of its images' log-probabilities, renormalised (a geometric mean: each
image is an independent look at the same lesion, so their evidence multiplies; one confident image does not
drown the others the way it would in a plain mean of probabilities). The lesion's class then comes from the SAME
decision rule as an image's (the bundle's `Decision`), and p_malignant / triage from the SAME trust layer
(`TrustLayer.annotate`), on the lesion's probabilities.

Which images count: images that could not be read are left out; images the OOD check turned away ("not a
dermoscopic image") are left out of the average unless every readable image of the lesion was turned away, and
a lesion is turned away only when all of its readable images were (its `ood_score` is the lowest of theirs, so
`ood_score > 1` <=> turned away, as for an image).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from skain.inference.decision import Decision
from skain.trust.runtime import TrustLayer
from skain.trust.triage import malignant_columns

LOG_FLOOR = 1e-12  # the decision rule's own clip of log p (decision._adjusted_logs)
RULE = ("mean of the images' log-probabilities, renormalised; unreadable images left out; images turned away by "
        "the OOD check left out unless all were; turned away only if all were")


def has_lesions(frame: pd.DataFrame) -> bool:
    """Whether a table names lesions: its lesion_id is not simply the image id (`schema.clean_metadata` fills an
    absent or blank lesion_id with the image id)."""
    return "lesion_id" in frame and bool((frame["lesion_id"].astype(str) != frame["image_id"].astype(str)).any())


def lesion_log_mean(probs: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, k) probabilities of n images and their lesion ids -> (lesion ids in order of first appearance,
    images per lesion, (lesions, k) probabilities = softmax of the mean log-probability of the lesion's images)."""
    probs = np.asarray(probs, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    if probs.ndim != 2 or len(probs) != len(groups):
        raise ValueError(f"need one lesion id per row of probabilities (got {len(groups)} ids, shape {probs.shape})")
    ids, first, lesion_of, counts = np.unique(groups, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first)                       # lesions in order of their first image
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(len(order))
    logs = np.log(np.clip(probs, LOG_FLOOR, 1.0))
    sums = np.zeros((len(ids), probs.shape[1]))
    np.add.at(sums, rank[lesion_of], logs)
    mean = sums / counts[order][:, None]
    out = np.exp(mean - mean.max(1, keepdims=True))
    return ids[order], counts[order], out / out.sum(1, keepdims=True)


def _flag(column: pd.Series) -> np.ndarray:
    """An `ood` column as read back from a CSV or made in memory -> bool (missing: False)."""
    return column.map(lambda v: str(v).lower() in ("true", "1", "1.0")).to_numpy(dtype=bool)


def lesion_table(pred: pd.DataFrame, lesion_ids: np.ndarray, classes: list[str] | tuple[str, ...],
                 decide: Decision | None = None, trust: TrustLayer | None = None) -> pd.DataFrame:
    """A per-image predictions table (skain predict's columns) and each row's lesion id -> one row per lesion:
    lesion_id, n_images, n_averaged, pred, prob, p_<class> (s_<class> under a prior-adjusted rule), ood,
    ood_score, p_malignant, triage, image_ids, error.

    `decide` / `trust`: the model's decision rule and trust layer. Without `decide` (scoring a predictions CSV
    with no model at hand) the class is the arg-max of the lesion's mean log s_<class> where the CSV has decision
    scores (the same decision: log s = log p - tau log prior + a constant per image) and of its probabilities
    otherwise; without `trust`, p_malignant is the sum of the lesion's malignant-class probabilities and there is no
    triage."""
    classes = list(classes)
    lesion_ids = np.asarray(lesion_ids).astype(str)
    if len(lesion_ids) != len(pred):
        raise ValueError(f"{len(lesion_ids)} lesion ids for {len(pred)} predictions")
    pcols, scols = [f"p_{c}" for c in classes], [f"s_{c}" for c in classes]
    probs = pred[pcols].to_numpy(dtype=np.float64)
    readable = np.isfinite(probs).all(1)
    rejected = _flag(pred["ood"]) if "ood" in pred else np.zeros(len(pred), dtype=bool)
    frame = pd.DataFrame({"lesion_id": lesion_ids, "image_id": pred["image_id"].astype(str).to_numpy(),
                          "readable": readable, "rejected": rejected & readable})
    per = frame.groupby("lesion_id", sort=False)
    summary = pd.DataFrame({"n_images": per.size(), "n_readable": per["readable"].sum(),
                            "n_rejected": per["rejected"].sum(),
                            "image_ids": per["image_id"].agg(";".join)})
    all_rejected = (summary["n_rejected"] == summary["n_readable"]) & (summary["n_readable"] > 0)
    # the images that are averaged: readable, and accepted by the OOD check unless none of the lesion's was
    use = readable & (~rejected | frame["lesion_id"].map(all_rejected).to_numpy(dtype=bool))
    ids, n_used, mean = lesion_log_mean(probs[use], lesion_ids[use])
    out = pd.DataFrame({"lesion_id": summary.index.to_numpy()})
    out["n_images"] = summary["n_images"].to_numpy()
    out["n_averaged"] = pd.Series(n_used, index=ids).reindex(out["lesion_id"]).fillna(0).astype(int).to_numpy()
    lesion_probs = pd.DataFrame(mean, index=ids, columns=pcols).reindex(out["lesion_id"]).to_numpy()
    ok = np.isfinite(lesion_probs).all(1)
    safe = np.where(ok[:, None], lesion_probs, 1.0 / len(classes))
    if decide is not None:
        chosen, scores = decide(safe), (decide.scores(safe) if decide.adjusted else None)
    elif set(scols) <= set(pred.columns):
        _, _, s = lesion_log_mean(pred[scols].to_numpy(dtype=np.float64)[use], lesion_ids[use])
        scores = pd.DataFrame(s, index=ids).reindex(out["lesion_id"]).to_numpy()
        chosen = np.where(ok, np.nan_to_num(scores, nan=0.0).argmax(1), 0)
    else:
        chosen, scores = safe.argmax(1), None
    out["pred"] = np.where(ok, np.array(classes)[chosen], "")
    out["prob"] = np.where(ok, safe[np.arange(len(safe)), chosen], np.nan)
    for j, c in enumerate(classes):
        out[f"p_{c}"] = np.where(ok, safe[:, j], np.nan)
    if scores is not None:
        for j, c in enumerate(classes):
            out[f"s_{c}"] = np.where(ok, scores[:, j], np.nan)
    if "ood" in pred and pred["ood"].notna().any():
        out["ood"] = np.where(ok, all_rejected.to_numpy(), None)
        lowest = pd.Series(pred["ood_score"].to_numpy(dtype=np.float64)[readable], index=lesion_ids[readable])
        out["ood_score"] = lowest.groupby(level=0).min().reindex(out["lesion_id"]).to_numpy()
    if trust is not None:
        annotated = trust.annotate(safe, None)
        out["p_malignant"] = np.where(ok, annotated["p_malignant"].to_numpy(), np.nan)
        out["triage"] = np.where(ok, annotated["triage"].to_numpy(), None)
    elif "p_malignant" in pred and malignant_columns(classes) is not None:
        out["p_malignant"] = np.where(ok, safe[:, malignant_columns(classes)].sum(1), np.nan)
    out["image_ids"] = summary["image_ids"].to_numpy()
    out["error"] = np.where(ok, "", "no readable image of this lesion")
    return out

