# Shared helpers for every rule file: config validation and input functions.
from vlnflow.config import validate_config
from vlnflow.workflow import helpers as wf

validate_config(config)

RESULTS = "results"
