"""AU detection from frozen TCAE embeddings (SPEC section 6), and how well AU and pose are separated.

    tcae probe runs/tcae/checkpoint.pt                    # data, split and seed from the checkpoint's config
    report = probe(model, "data/", held_out=0.25)   # from Python

The detector is SPEC's: an image's frozen AU embedding → BatchNorm1d →
Linear without bias → one sigmoid per AU, trained with binary cross-entropy
on the frames of some identities, its threshold per AU chosen for the best F1
on those identities, each scored by a detector fitted without it
(:func:`held_out_thresholds`), and scored (F1 per AU, and their mean) on the frames
of the others (:func:`tcae.frames.split_identities`;
with the checkpoint's split and seed, the test identities are the ones the
TCAE was validated on, never trained on).

Disentanglement: the same detector on the *pose* embedding should do worse,
and, where the labels have head pose (synthetic data), a ridge regression
predicts pose better from the pose embedding than from the AU embedding (R²
per pose parameter on the test identities).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import load_model
from .common import POSE_NAMES
from .distributed import check_device
from .errors import TCAEError
from .frames import MAX_PIXELS, split_identities
from .labels import LabelledFrames
from .model import TCAE

EMBEDDINGS = ("au_embedding", "pose_embedding")


class NonFiniteModelError(TCAEError, ValueError):
    """The model's weights or embeddings hold NaN or ±inf: there is nothing to probe."""


def _check_finite(model: TCAE, embeddings: dict[str, torch.Tensor], n_frames: int) -> None:
    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteModelError(f"the model has non-finite (NaN or inf) weights in {len(bad)} tensors, first "
                                  f"{bad[:3]} (a diverged run?); probe an earlier checkpoint")
    for kind in EMBEDDINGS:
        rows = int((~torch.isfinite(embeddings[kind])).any(1).sum())
        if rows:
            raise NonFiniteModelError(f"the model's {kind} is non-finite (NaN or inf) for {rows} of {n_frames} "
                                      "frames: there is nothing to probe")


@torch.no_grad()
def embed_frames(model: TCAE, frames: LabelledFrames, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Frozen embeddings and labels of every frame, on the CPU.

    Returns ``au_embedding`` and ``pose_embedding`` [N, D] float32,
    ``occurrence`` [N, K] float32 0/1, ``valid`` [N, K] bool, ``pose``
    [N, 5] when the labels have it, and ``identity``, a list of N names.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    identities: list[str] = []
    for batch in DataLoader(frames, batch_size=batch_size):
        identities += batch["identity"]
        au, pose = model.embed(batch["image"].to(device))
        found = {"au_embedding": au.float(), "pose_embedding": pose.float(),
                 "occurrence": batch["au_occurrence"], "valid": batch["au_valid"]}
        if "pose" in batch:
            found["pose"] = batch["pose"]
        for k, v in found.items():
            parts.setdefault(k, []).append(v.cpu())
    model.train(was_training)
    return {**{k: torch.cat(v) for k, v in parts.items()}, "identity": identities}


def fit_detector(features: torch.Tensor, occurrence: torch.Tensor, valid: torch.Tensor, epochs: int = 30,
                 lr: float = 1e-2, batch_size: int = 256, seed: int = 0) -> nn.Sequential:
    """SPEC's AU detector, BatchNorm1d(D) → Linear(D, K, bias=False), trained with Adam.

    features [N, D]; occurrence [N, K] 0/1; valid [N, K] masks AUs not coded
    in a frame out of the binary cross-entropy. Returns the detector in eval
    mode; it outputs logits (sigmoid > 0.5 ⇔ logit > 0).
    """
    g = torch.Generator().manual_seed(seed)
    dim, n_aus = features.shape[1], occurrence.shape[1]
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        detector = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, n_aus, bias=False))
    optimizer = torch.optim.Adam(detector.parameters(), lr=lr)
    mask = valid.float()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            bce = nn.functional.binary_cross_entropy_with_logits(detector(features[idx]), occurrence[idx],
                                                                 reduction="none")
            loss = (bce * mask[idx]).sum() / mask[idx].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return detector.eval()


def f1_scores(predicted: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """F1 per column of [N, K] 0/1 arrays over the valid entries; 0 where an AU has no positive either way."""
    p, t, v = predicted.astype(bool), truth.astype(bool), valid.astype(bool)
    tp = (p & t & v).sum(0)
    fp = (p & ~t & v).sum(0)
    fn = (~p & t & v).sum(0)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def best_thresholds(logits: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per AU, the logit threshold with the best F1 on these (training) frames → [K].

    F1 depends on the threshold, and a detector trained with cross-entropy on
    rare positives sits too high at logit 0; choosing it on the training
    identities keeps the test identities unseen. The candidates are −∞
    (every frame positive: the always-present detector, which a weak
    detector falls back to) and 39 quantiles of the logits.
    """
    candidates = np.concatenate([np.full((1, logits.shape[1]), -np.inf),
                                 np.quantile(logits, np.linspace(0.0, 1.0, 41)[1:-1], axis=0)])
    best = np.zeros(logits.shape[1])
    for k in range(logits.shape[1]):
        scores = [f1_scores(logits[:, k:k + 1] > c, truth[:, k:k + 1], valid[:, k:k + 1])[0]
                  for c in candidates[:, k]]
        best[k] = candidates[int(np.argmax(scores)), k]
    return best


def held_out_thresholds(features: torch.Tensor, occurrence: torch.Tensor, valid: torch.Tensor,
                        identities: list[str], folds: int = 4, **fit) -> np.ndarray:
    """:func:`best_thresholds` on out-of-fold logits: each training identity scored by a detector fitted
    without it (whole identities per fold), as the test identities will be → [K].

    Thresholds chosen on the frames a detector was fitted on sit where it
    separates identities it has memorised, not new ones.
    """
    fold = identity_folds(identities, folds)
    logits = np.zeros(tuple(occurrence.shape), dtype=np.float32)
    for k in np.unique(fold):
        held = torch.from_numpy(fold == k)
        detector = fit_detector(features[~held], occurrence[~held], valid[~held], **fit)
        with torch.no_grad():
            logits[held.numpy()] = detector(features[held]).numpy()
    return best_thresholds(logits, occurrence.numpy(), valid.numpy())


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  alphas: tuple[float, ...]) -> list[np.ndarray]:
    """Predictions [N_test, P] of ridge regressions fitted on train, one per penalty in ``alphas``.

    Features are standardized with the train statistics; alpha is the penalty
    on the weights of the standardized features. One SVD of the training
    features serves every alpha.
    """
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    a, b = (x_train - mean) / std, (x_test - mean) / std
    y_mean = y_train.mean(0)
    u, sv, vt = np.linalg.svd(a, full_matrices=False)
    uty = u.T @ (y_train - y_mean)
    return [b @ (vt.T @ ((sv / (sv**2 + alpha))[:, None] * uty)) + y_mean for alpha in alphas]


def r2_scores(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """R² = 1 − SS_res/SS_tot per column of [N, P] (negative: worse than predicting truth's mean)."""
    spread = ((truth - truth.mean(0)) ** 2).sum(0)
    return 1.0 - ((predicted - truth) ** 2).sum(0) / np.maximum(spread, 1e-12)


def ridge_r2(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             alpha: float = 1.0) -> np.ndarray:
    """R² per target column of a ridge regression (:func:`ridge_predict`) fitted on train, scored on test."""
    return r2_scores(ridge_predict(x_train, y_train, x_test, (alpha,))[0], y_test)


RIDGE_ALPHAS = tuple(10.0**k for k in range(-1, 6))


def identity_folds(groups: list[str], folds: int = 4) -> np.ndarray:
    """The fold (0 … folds − 1) of each item, whole identities (``groups``) per fold → [N] int."""
    names = sorted(set(groups))
    fold_of = {name: i % min(folds, len(names)) for i, name in enumerate(names)}
    return np.array([fold_of[g] for g in groups])


def select_alpha(x: np.ndarray, y: np.ndarray, groups: list[str], alphas: tuple[float, ...] = RIDGE_ALPHAS,
                 folds: int = 4) -> float:
    """The ridge penalty with the best mean R² when whole groups (identities) are held out in turn.

    With embeddings as wide as the data is long, an unpenalized fit explains
    the training identities and nothing else; the penalty must be chosen on
    unseen identities, as the probe is scored.
    """
    if len(set(groups)) < 2:
        return alphas[len(alphas) // 2]
    fold = identity_folds(groups, folds)
    scores = np.zeros(len(alphas))
    for k in np.unique(fold):
        held = fold == k
        for i, predicted in enumerate(ridge_predict(x[~held], y[~held], x[held], alphas)):
            scores[i] += r2_scores(predicted, y[held]).mean()
    return alphas[int(np.argmax(scores))]


def probe(model: TCAE, data: str | Path, held_out: float | int = 0.25, seed: int = 0, epochs: int = 30,
          lr: float = 1e-2, device: str | torch.device = "cpu", max_pixels: int = MAX_PIXELS) -> dict:
    """Fit and score the AU detector (and pose regression) on frozen embeddings of ``data``'s labelled frames.

    Returns ``au_names``, ``f1`` (per embedding: {AU: F1, "mean": mean F1}),
    ``f1_always_present`` (the same for a detector that says every AU is
    present in every frame: the floor a useful detector must beat),
    ``pose_names`` and ``pose_r2`` (per embedding: {name: R², "mean": …}; empty
    without pose labels; ``ridge_alpha`` the penalty :func:`select_alpha`
    chose on the training identities), ``train_identities``,
    ``test_identities``, ``n_train`` and ``n_test`` (frames), and
    ``skipped_frames``, the unreadable frames left out (frames of more than
    ``max_pixels`` among them).

    Raises :class:`NonFiniteModelError` when the model's weights or embeddings are not finite.
    """
    size = model.config.image_size
    everything = LabelledFrames(data, size=size, max_pixels=max_pixels)
    names = everything.au_names
    train_ids, test_ids = split_identities(everything.identities, held_out, seed)
    train_frames, test_frames = (LabelledFrames(data, size, ids, names, max_pixels) for ids in (train_ids, test_ids))
    train = embed_frames(model, train_frames, device=device)
    test = embed_frames(model, test_frames, device=device)
    _check_finite(model, train, len(train["identity"]))
    _check_finite(model, test, len(test["identity"]))
    skipped = {*everything.skipped_paths, *train_frames.skipped_paths, *test_frames.skipped_paths}
    report: dict = {"au_names": names, "f1": {}, "thresholds": {}, "pose_names": [], "pose_r2": {}, "ridge_alpha": {},
                    "train_identities": train_ids, "test_identities": test_ids,
                    "n_train": len(train["occurrence"]), "n_test": len(test["occurrence"]),
                    "skipped_frames": len(skipped)}
    truth, valid = test["occurrence"].numpy(), test["valid"].numpy()
    always = f1_scores(np.ones_like(truth), truth, valid)
    report["f1_always_present"] = {**dict(zip(names, always.tolist())), "mean": float(always.mean())}
    has_pose = "pose" in train and "pose" in test
    if has_pose:
        report["pose_names"] = list(POSE_NAMES)
    for kind in EMBEDDINGS:
        detector = fit_detector(train[kind], train["occurrence"], train["valid"], epochs=epochs, lr=lr, seed=seed)
        thresholds = held_out_thresholds(train[kind], train["occurrence"], train["valid"], train["identity"],
                                         epochs=epochs, lr=lr, seed=seed)
        with torch.no_grad():
            predicted = detector(test[kind]).numpy() > thresholds
        report["thresholds"][kind] = dict(zip(names, thresholds.tolist()))
        f1 = f1_scores(predicted, truth, valid)
        report["f1"][kind] = {**dict(zip(names, f1.tolist())), "mean": float(f1.mean())}
        if has_pose:
            x, y = train[kind].double().numpy(), train["pose"].double().numpy()
            alpha = select_alpha(x, y, train["identity"])
            r2 = ridge_r2(x, y, test[kind].double().numpy(), test["pose"].double().numpy(), alpha)
            report["pose_r2"][kind] = {**dict(zip(POSE_NAMES, r2.tolist())), "mean": float(r2.mean())}
            report["ridge_alpha"][kind] = alpha
    return report


def format_report(report: dict) -> str:
    """The probe's results as a plain-text table."""
    def row(label: str, values: list[float]) -> str:
        return f"{label:<8}" + "".join(f"{v:>14.3f}" if not math.isnan(v) else f"{'n/a':>14}" for v in values)

    head = f"{'':<8}{'AU emb':>14}{'pose emb':>14}"
    skipped = (f"; {report['skipped_frames']} unreadable frames skipped" if report.get("skipped_frames")
               else "")
    lines = [f"AU detection F1 on {len(report['test_identities'])} held-out identities "
             f"({report['n_test']} frames; detector trained on {report['n_train']}{skipped})",
             head + f"{'always on':>14}"]
    for name in [*report["au_names"], "mean"]:
        lines.append(row(name, [report["f1"][k][name] for k in EMBEDDINGS] + [report["f1_always_present"][name]]))
    if report["pose_r2"]:
        alphas = " / ".join(f"{report['ridge_alpha'][k]:g}" for k in EMBEDDINGS)
        lines += ["", f"pose R² (ridge regression, penalty {alphas} chosen on held-out training identities)", head]
        for name in [*report["pose_names"], "mean"]:
            lines.append(row(name, [report["pose_r2"][k][name] for k in EMBEDDINGS]))
        lines.append("R² = 1 − (squared error)/(spread of the test values): 1 is perfect, 0 is no better than "
                     "predicting the test identities' mean, and negative is worse than that (the regression "
                     "carries offsets of the training identities over to new ones).")
    return "\n".join(lines)


def probe_checkpoint(path: str | Path, data: str | Path | None = None, held_out: float | int | None = None,
                     seed: int | None = None, device: str | torch.device = "cpu", **kwargs) -> dict:
    """:func:`probe` on a checkpoint's model; data, held_out, seed and the frame size limit default to its
    training config."""
    device = check_device(device)
    model, config = load_model(path, device)
    kwargs.setdefault("max_pixels", config.get("max_frame_pixels", MAX_PIXELS))
    # A run validated on its training identities (held_out 0) has no split to reuse.
    held_out = held_out if held_out is not None else config["held_out"] or 0.25
    return probe(model, data if data is not None else config["data"], held_out=held_out,
                 seed=config["seed"] if seed is None else seed, device=device, **kwargs)
