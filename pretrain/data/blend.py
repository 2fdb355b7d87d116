"""Weighted blending of datasets with random access and no index to precompute.

Dataset d's k-th sample is placed at the ideal position (k + 0.5) / w_d of the blended stream; the
stream is the merge of all datasets by that key (ties by dataset id). Any prefix of n samples then
holds n * w_d samples of dataset d to within one, and the assignment of any range of the stream is
computed directly, so the whole sampler state stays a single integer.
"""

import numpy as np

from .errors import DataError


def _count_below(x: float, weights: np.ndarray) -> np.ndarray:
    """Per dataset, how many of its keys (k + 0.5) / w are < x."""
    return np.maximum(np.ceil(x * weights - 0.5), 0).astype(np.int64)


def blend_assignment(weights, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, sample index within that dataset) of blended samples start..start+count-1."""
    w = np.asarray(weights, dtype=np.float64)
    lo = max(start - len(w) - 1.0, 0.0)  # at most start keys lie below lo
    base = _count_below(lo, w)
    # Below lo lie at most lo + D/2 keys, so at most 1.5 D + 1 ranks before `start` are skipped; from lo,
    # (count + 3D + 4) w_d keys per dataset cover at least count + 2D + 4 ranks of the merge.
    n_each = np.ceil((count + 3 * len(w) + 4) * w).astype(np.int64) + 2
    ds = np.concatenate([np.full(n, d) for d, n in enumerate(n_each)])
    ks = np.concatenate([b + np.arange(n) for b, n in zip(base, n_each)])
    keys = (ks + 0.5) / w[ds]
    order = np.lexsort((ds, keys))
    skip = start - int(base.sum())
    take = order[skip:skip + count]
    return ds[take], ks[take]


class BlendedDataset:
    """`blended[g]` = a sample of dataset d drawn by the weights. `on_exhaust`: "wrap" lets every dataset
    continue into new, reshuffled epochs (infinite stream); "stop" ends the stream at the first sample
    that would need a dataset's second epoch."""

    def __init__(self, datasets: list, weights: list[float], on_exhaust: str = "wrap"):
        if len(datasets) != len(weights) or not datasets:
            raise DataError(f"blend needs one weight per dataset, got {len(weights)} weights for {len(datasets)}")
        if any(w <= 0 for w in weights):
            raise DataError(f"blend weights must be positive, got {weights}")
        if on_exhaust not in ("wrap", "stop"):
            raise DataError(f"on_exhaust={on_exhaust!r} is unknown; use 'wrap' or 'stop'")
        total = float(sum(weights))
        self.datasets, self.weights, self.on_exhaust = datasets, np.asarray(weights) / total, on_exhaust
        self.length = None
        if on_exhaust == "stop":  # the stream ends where the first dataset would start its second epoch
            keys = [(len(ds) + 0.5) / w for ds, w in zip(datasets, self.weights)]
            self.length = int(_count_below(min(keys), self.weights).sum())

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("a wrapping blend is infinite; iterate it by index")
        return self.length

    def __getitem__(self, g: int) -> dict:
        if self.length is not None and g >= self.length:
            raise IndexError(f"sample {g} is past the end of the blend ({self.length} samples)")
        d, k = blend_assignment(self.weights, int(g), 1)
        return self.datasets[int(d[0])][int(k[0])]


def parse_blend(spec) -> list[tuple[float, str]]:
    """Megatron-style "w1 path1 w2 path2 ..." (a string or list) or a YAML-style list of
    {"weight": w, "path": p} -> [(weight, path)]."""
    if isinstance(spec, str):
        spec = spec.split()
    if spec and isinstance(spec[0], dict):
        try:
            return [(float(item["weight"]), str(item["path"])) for item in spec]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"blend entries need 'weight' and 'path': {spec} ({err})") from err
    if len(spec) == 1:
        return [(1.0, str(spec[0]))]
    if len(spec) % 2:
        raise DataError(f"blend {spec} must alternate weight and path")
    try:
        return [(float(spec[i]), str(spec[i + 1])) for i in range(0, len(spec), 2)]
    except ValueError as err:
        raise DataError(f"blend {spec} must alternate weight and path ({err})") from err
