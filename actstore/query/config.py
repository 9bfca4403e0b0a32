"""The query stage's choices and defaults, in a module light enough for the CLI to build its options from."""

RANK_BY = ("variance", "frequency", "label-association")
"""How ``top_features`` ranks: activation variance over all tokens (the paper's choice), firing frequency, or label
association."""
TOP_TOKENS_N = 20
"""Rows ``top_tokens`` returns by default."""
CONTEXT_TOKENS = 8
"""Tokens of context ``top_tokens`` shows on each side by default."""
TOP_FEATURES_N = 10
"""Features ``top_features`` returns by default (per label for label-association)."""
