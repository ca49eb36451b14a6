"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) from k-nearest-neighbour balls.

Each set of feature vectors stands for its distribution's support as the union of balls, one
per vector, whose radius is the distance to the vector's k-th nearest neighbour in the same
set. Precision is the share of generated vectors inside the real set's balls (how many samples
look real); recall is the share of real vectors inside the generated set's balls (how much of
the real data the generator covers).

Distances are computed with `torch.cdist` in chunks of rows, so two sets of 10,000 vectors
never hold more than `_CHUNK_ELEMENTS` distances at once.
"""

from __future__ import annotations

import torch

from auxhead.gan._metric_checks import check_finite

# Distances held at once: 2**23 float64 values are 64 MB, whatever the sizes of the two sets.
_CHUNK_ELEMENTS = 1 << 23


def _rows_per_chunk(n_columns: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, n_columns))


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) distance from each row of (N, d) `features` to its k-th nearest other row."""
    n = len(features)
    step = _rows_per_chunk(n)
    radii = []
    for start in range(0, n, step):
        distances = torch.cdist(features[start : start + step], features)  # (b, N)
        rows = torch.arange(len(distances), device=distances.device)
        distances[rows, rows + start] = float("inf")  # a vector is not its own neighbour
        radii.append(distances.topk(k, dim=1, largest=False).values[:, -1])  # k-th smallest
    return torch.cat(radii)


def inside_any_ball(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor
) -> torch.Tensor:
    """(P,) bool: whether each of the (P, d) `points` lies within `radii[j]` of some
    `centres[j]` (on the sphere counts as inside)."""
    step = _rows_per_chunk(len(centres))
    return torch.cat(
        [
            (torch.cdist(points[start : start + step], centres) <= radii).any(dim=1)
            for start in range(0, len(points), step)
        ]
    )


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(
            f"k must be a positive integer (the neighbour that sets each ball's radius), got "
            f"{k!r}; the paper uses k=3"
        )


class KNNBalls:
    """The k-NN balls of a set of feature vectors: the paper's estimate of its support.

    Args:
        features: (N, d) feature vectors (further dimensions are flattened), N > k.
        k: the neighbour that sets each ball's radius.
        what: what the vectors are ("real", "generated"), for error messages.
    """

    def __init__(self, features: torch.Tensor, k: int, what: str) -> None:
        _check_k(k)
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"{what} features must be a tensor, got {type(features).__name__}")
        if features.dim() == 0:
            raise ValueError(f"{what} features must be (N, d), got a scalar")
        check_finite(features, f"{what} features")
        if len(features) <= k:
            raise ValueError(
                f"k={k} needs at least {k + 1} {what} feature vectors (a vector's k nearest "
                f"neighbours exclude itself), got {len(features)}; lower k or score more "
                "samples"
            )
        # float64: the ball test compares distances with radii, and float32 distances
        # computed through a matrix product can put a copy of a vector outside its own ball.
        self.centres = features.reshape(len(features), -1).double()  # (N, d)
        self.k, self.what = k, what
        self.radii = knn_radii(self.centres, k)  # (N,)

    def share_inside(self, other: KNNBalls) -> float:
        """The share of `other`'s vectors that lie inside at least one of these balls."""
        if other.centres.shape[1] != self.centres.shape[1]:
            raise ValueError(
                f"{self.what} feature vectors have {self.centres.shape[1]} values, "
                f"{other.what} ones {other.centres.shape[1]}; extract both with the same network"
            )
        points = other.centres.to(self.centres.device)
        return inside_any_ball(points, self.centres, self.radii).double().mean().item()


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, *, k: int = 3
) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated feature vectors.

    A generated vector counts toward precision if it lies inside the k-NN ball of some real
    vector (the ball's radius: the distance from that real vector to its k-th nearest other
    real vector); a real vector counts toward recall if it lies inside the k-NN ball of some
    generated vector. Both are shares in [0, 1]; compare them with the same figures for a
    second real sample of the same size, since the balls grow as the sets shrink.

    Args:
        real_features: (N, d) feature vectors of real images (further dimensions are
            flattened), N > k.
        fake_features: (M, d) feature vectors of generated images, M > k.
        k: the neighbour that sets each ball's radius; the paper uses 3.

    Returns:
        A dict with "precision", the share of generated vectors inside the real balls, and
            "recall", the share of real vectors inside the generated balls.

    Raises:
        ValueError: k is not a positive integer, a set has k or fewer vectors, holds NaN or
            infinite values, or the two sets' vectors differ in size.

    Example:
        >>> real, fake = torch.randn(500, 64), torch.randn(400, 64) + 0.5
        >>> precision_recall(real, fake, k=3)["recall"]  # doctest: +SKIP
    """
    return precision_recall_of_balls(
        KNNBalls(real_features, k, "real"), KNNBalls(fake_features, k, "generated")
    )


def precision_recall_of_balls(real: KNNBalls, fake: KNNBalls) -> dict[str, float]:
    """`precision_recall` from balls built beforehand (the real ones can be reused)."""
    return {"precision": real.share_inside(fake), "recall": fake.share_inside(real)}
