"""vlnflow.spatial: the VGGT aggregator (own code, VGGT-1B state-dict compatible) and the
SpatialEncoder that turns a sample's frames into its cached spatial feature."""

from vlnflow.spatial.aggregator import PRESETS, Aggregator, AggregatorConfig, StreamCache
from vlnflow.spatial.checkpoint import CheckpointError, load_aggregator_weights
from vlnflow.spatial.encoder import ENCODER_CODE_VERSION, SpatialEncoder, resolve_device
from vlnflow.spatial.preprocess import load_frame, preprocess_image

__all__ = [
    "ENCODER_CODE_VERSION",
    "PRESETS",
    "Aggregator",
    "AggregatorConfig",
    "CheckpointError",
    "SpatialEncoder",
    "StreamCache",
    "load_aggregator_weights",
    "load_frame",
    "preprocess_image",
    "resolve_device",
]
