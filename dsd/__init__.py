"""dsd: NUMA-sharded inference daemon for Mixture-of-Experts models on CPU servers."""
__version__ = "0.1.0"
