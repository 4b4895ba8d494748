"""vlnflow: cache VGGT spatial features once, then train JanusVLN-style Qwen2.5-VL fast."""

__version__ = "0.1.0"
