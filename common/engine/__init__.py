"""The training engine and prediction loops (embedder, classifier, detector), torchrun launching, throughput."""
