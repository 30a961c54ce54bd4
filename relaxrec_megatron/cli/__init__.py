"""The `relaxrec` command line: a thin layer over the pipeline stages."""
