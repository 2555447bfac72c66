"""Rows in host RAM: one contiguous range of the global table per :class:`TableShard`."""

from .shard import TableShard

__all__ = ["TableShard"]
