"""Shared test support: declarative layer stacks, mounts, snapshots and operation scripts."""
