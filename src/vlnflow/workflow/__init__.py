"""Functions the Snakefile's rules call at parse time (input functions, fingerprints)."""
