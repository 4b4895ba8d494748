"""vlnflow.report."""
