"""encoding: every token of a layer encoded by an SAE into a feature-clustered Parquet table."""
