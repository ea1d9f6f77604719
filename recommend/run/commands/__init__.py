"""The commands beside the refresh that read a workdir: `recs check`, `recs eval`, and the sample shop `recs sample` writes."""
