"""Namespace labs and an embedded etcd: what the demo, the tests and the benchmarks run on."""
