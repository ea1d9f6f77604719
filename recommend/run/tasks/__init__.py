"""Work the refresh sends to the Dask workers: the fit and the gate over user blocks, the item side and the index, the lists
in blocks, the publish's points (each runs in this process too, without a client)."""
