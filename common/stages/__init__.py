"""One module per notebook, named after it: what each stage reads, runs and writes."""
