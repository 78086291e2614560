"""Detection transfer: MoCo -> detectron2 weight conversion and the C4 detectors (Faster/Mask R-CNN).

Importing the package registers the C4 ROI head with detectron2, so a config saved by one process
builds its model in another.
"""

from pipeline.detection import c4  # noqa: F401
