"""Stage 2 of nightly-recs: FAISS over whatever item vectors it is given; k-NN answered in blocks.

Knows nothing about users, Qdrant or files it was not handed. Every search returns ``(scores, ids)``.
"""
