"""vlnflow.data."""
