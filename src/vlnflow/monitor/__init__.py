"""vlnflow.monitor."""
