"""What a refresh runs on: the Dask cluster and the preflight of its workers, the refresh lock, memory handed back to
the OS, progress and logging."""
