"""vlnflow.train."""
