"""vlnflow.spatial."""
