"""layerfs benchmarks: the same workloads on native, kernel overlayfs, fuse-overlayfs and
layerfs, on one data set, in one run. Run ``python -m benchmarks --help``."""
