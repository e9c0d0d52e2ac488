"""Model families: one file per family over the shared pieces in `common.py` and `cache.py`."""
