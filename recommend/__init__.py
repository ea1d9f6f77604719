"""Stage 3 of nightly-recs: profiles, lists, publishing to Qdrant, the read path, the pipeline and the CLI.

Apps and notebooks start from the facade: ``from recommend.serving.facade import Recommender``.
"""
