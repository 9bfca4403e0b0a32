"""Test data for actstore and the tools built on it (as ``zarr.testing``): planted stores whose ground truth is
known — a dictionary's atoms, a crosscoder's shared and one-model atoms — written without a model. Used by the test
suite and the benchmarks; nothing else in the library imports it."""
