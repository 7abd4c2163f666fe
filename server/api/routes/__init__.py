"""HTTP routes: each handler parses, calls the registry/engine, and responds. Nothing else."""
