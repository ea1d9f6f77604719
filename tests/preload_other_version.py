"""A fault injected into a real Dask worker (`dask worker --preload`): it says it runs another
nightly-recs version, as a machine with a stale install would."""


def dask_setup(worker):
    import recommend.run.infra.preflight as preflight

    preflight.project_version = lambda: "0.0.0-stale"
