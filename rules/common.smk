# Shared helpers for every rule file: config validation and input functions.
from vlnflow.config import validate_config
from vlnflow.workflow import helpers as wf

validate_config(config)

RESULTS = "results"

# Shard names never hold a "/": results/cache/{shard}.h5 must not claim results/cache/vision/<shard>.h5.
wildcard_constraints:
    shard=r"[^/]+",

# Any encoder setting (weights, preset, layer, dtype, resolution, frame order) changes this
# value, and with it the params of every precompute job: all shards become stale.
from vlnflow.spatial.fingerprint import encoder_fingerprint

ENCODER_FINGERPRINT = encoder_fingerprint(config["spatial"])
