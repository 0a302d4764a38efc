"""The classification linear probe against its regularisation C, on MiniLM's 20 Newsgroups features.

    python benchmarks/trial_probe_c.py --bundle MINILM_20NG_BUNDLE --data-dir DIR [--features F.npz]

DIR holds 20ng-train.jsonl (the training split, k = 16 per label drawn per seed as ``edgeft train
--k-shot 16`` draws it) and 20ng-test.jsonl (1,000 examples of the test split). One forward pass per
set gives the pooled features (cached in --features); then per seed the probe for each C of a grid
and the C that 4-fold cross-validated loss picks (``fit_linear_probe_cv``). Prints one line per seed:
(C, (test accuracy, test loss)). The classification start uses C = 1 (``runtime/start.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

GRID = (1e-1, 1.0, 10.0, 100.0, 1000.0)


def features(bundle: Path, data_dir: Path, seeds) -> dict[str, np.ndarray]:
    from edgeft.data import k_shot, load_dataset
    from edgeft.runtime import Bundle, DeviceProfile
    from edgeft.runtime.evaluate import pooled_features

    b = Bundle(bundle, DeviceProfile(threads=1))
    theta = b.layout.initial(0)
    out = {}
    full = load_dataset(data_dir / "20ng-train.jsonl", b.labels)
    sets = {f"train{seed}": k_shot(full, 16, seed) for seed in seeds}
    sets["test"] = load_dataset(data_dir / "20ng-test.jsonl", b.labels)
    for key, ds in sets.items():
        enc = b.encode(ds.texts, ds.labels)
        out[f"{key}_H"], out[f"{key}_Y"] = pooled_features(b, theta, enc, 32), enc.labels
    return out


def main(argv=None) -> None:
    from edgeft.runtime.probe import fit_linear_probe, fit_linear_probe_cv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--features", type=Path, default=Path("/tmp/edgeft-20ng-features.npz"))
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.features.is_file():
        np.savez(args.features, **features(args.bundle, args.data_dir, seeds))
    d = np.load(args.features)
    labels = int(d["test_Y"].max()) + 1

    def score(w, b):
        z = d["test_H"].astype(np.float64) @ w.T + b
        y = d["test_Y"]
        zz = z - z.max(1, keepdims=True)
        loss = np.mean(np.log(np.exp(zz).sum(1)) - zz[np.arange(len(y)), y])
        return round(float((z.argmax(1) == y).mean()), 3), round(float(loss), 3)

    for seed in seeds:
        h, y = d[f"train{seed}_H"], d[f"train{seed}_Y"]
        row = [(c, score(*fit_linear_probe(h, y, labels, c=c))) for c in GRID]
        w, b, c = fit_linear_probe_cv(h, y, labels, grid=GRID)
        print(seed, row, "cross-validated", c, score(w, b))


if __name__ == "__main__":
    main()
