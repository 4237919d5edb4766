"""DINOv2's frozen-feature protocols (Oquab et al., 2023), run as facebookresearch/dinov2 runs them.

``regablate probe RUN --probe.protocol dinov2`` trains its heads with the backbone in the loop
(fresh augmented views every iteration, sliding windows, depth at the ground truth's resolution),
so its numbers can sit beside the paper's. Modules: ``settings`` (every parameter, DINOv2's values
as defaults), ``data`` (raw samples of a data module and the loaders), ``views`` (the transforms),
``backbone`` (the frozen backbone's last blocks at any input size), ``classification``,
``segmentation``, ``depth`` (the three protocols), ``schedules`` (mmcv's lr schedules)
and ``runner`` (all of them into one report). Only ``settings`` is imported here, so that
``regablate.probe.protocol`` can hold the settings without importing the protocols.
"""

from regablate.probe.dinov2.settings import DINOv2Settings

__all__ = ["DINOv2Settings"]
