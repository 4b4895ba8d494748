"""vlnflow.bench."""
