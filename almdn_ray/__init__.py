"""almdn-ray: Ray-distributed active learning for object detection with AL-MDN."""

__version__ = "0.1.0"
