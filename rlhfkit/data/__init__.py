"""Data: the one record contract shared by labelers, the labeling app and every trainer."""
