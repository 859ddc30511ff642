"""The authorization matrix: every route against every kind of caller (test_matrix.py)."""
