"""vlnflow.cache."""
