"""Artifacts of a ViT: outlier-token statistics, the hooked scan that measures them, pictures of them, the
verdict on them, test-time registers, and the ``regablate inspect`` command (``regablate.artifacts.inspect``)."""
