"""vlnflow.model."""
